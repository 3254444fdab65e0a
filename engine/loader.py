"""Find and load a model: weights into the torch module, tokenizer, id and KV layout."""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pdserve.engine import fp8, invariant
from pdserve.engine.backend import (
    Backend,
    BackendError,
    choose_backend,
    with_decode_attention,
    with_prefill_attention,
)
from pdserve.engine.backend import batch_invariant as invariant_backend
from pdserve.engine.cpu_kernels import QuantWeight
from pdserve.engine.deepseek import DeepseekV3ForCausalLM
from pdserve.engine.ep.moe import ExpertParallel
from pdserve.engine.files import default_model_path, load_tokenizer, model_id_of
from pdserve.engine.layout import KVLayout, dtype_name
from pdserve.engine.llama import LlamaForCausalLM
from pdserve.engine.model_config import DeepseekV3Config, LlamaConfig
from pdserve.engine.tokenizer import Tokenizer
from pdserve.startup import phase

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "default_model_path", "load_model", "load_tokenizer"]


@dataclass
class LoadedModel:
    model: LlamaForCausalLM | DeepseekV3ForCausalLM
    config: LlamaConfig | DeepseekV3Config
    tokenizer: Tokenizer | None  # None: a directory without tokenizer serves token ids only
    model_id: str
    layout: KVLayout
    backend: Backend  # how it runs (engine/backend.py), chosen once here
    ep: ExpertParallel | None = None  # a rank of an EP group: its exchanges and slots

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its hidden states; its KV pool's may differ)."""
        return self.model.model.embed_tokens.weight.dtype

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
    backend: str = "auto",
    ep: ExpertParallel | None = None,
    batch_invariant: bool = False,
    decode_only: bool = False,
    kv_dtype: torch.dtype | None = None,
    prefill_attention: str = "auto",
    decode_attention: str = "auto",
) -> LoadedModel:
    """`backend`: how the model runs (engine/backend.py; BackendError when that cannot be had
    here); `batch_invariant`: every row the same bits whatever else is in its step
    (engine/invariant.py; for the whole process). Backends whose decode products read GGUF
    blocks keep a GGUF file's Q4_1/Q8_0 blocks beside the float32 weights. `decode_only` (a
    decode worker): those products pack no float32 weights for prefill unless one comes.
    `kv_dtype`: the KV pool's (default: `dtype`); the CPU kernels read float32 or float16 KV
    (float16 halves the pool, the store's blocks and the transfers; attention then computes in
    float32 over the rounded values). `prefill_attention`: "sdpa" (auto) or "flex", a step's
    prefill chunks in one call (engine/backend.py, with_prefill_attention); `decode_attention`:
    "gather" (auto) or "paged", decode rows reading their pages in place (CUDA,
    with_decode_attention)."""
    p = Path(path) if path else default_model_path()
    if not p.exists():
        raise FileNotFoundError(f"model path does not exist: {p}")
    t0 = time.perf_counter()
    cfg: LlamaConfig | DeepseekV3Config
    held = None if ep is None else ep.held()  # a rank of an EP group: its slots' experts
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"unsupported model directory {p}: no config.json")
        from pdserve.engine.hf_loader import load_hf_config

        family = "deepseek" if isinstance(load_hf_config(p), DeepseekV3Config) else "llama"
    elif p.suffix == ".gguf":
        family = "llama"
    else:
        raise ValueError(f"unsupported model format {p}: expected a .gguf file or a "
                         "Hugging Face directory")
    # The backend and the attention settings are checked before the weights are read.
    chosen = with_decode_attention(with_prefill_attention(
        choose_backend(backend, device, dtype, family) if not batch_invariant
        else invariant_backend(backend, device, family), prefill_attention, family),
        decode_attention, device, family)
    blocks: dict[str, QuantWeight] | None = None
    if p.is_dir():
        from pdserve.engine.hf_loader import load_hf_dir

        skip = None if held is None else _not_held(held)
        cfg, state, tokenizer, _ = load_hf_dir(p, dtype=dtype, progress=progress, skip=skip)
    else:
        # GGUF Q4_1/Q8_0 blocks, kept for the CPU float32 decode kernel (cpu_kernels.py)
        blocks = {} if chosen.block_products else None
        from pdserve.engine.gguf_loader import load_gguf

        cfg, state, tokenizer = load_gguf(p, dtype=dtype, progress=progress, blocks=blocks)
    phase("model load")  # the weights read from the file
    if chosen.paged_decode:
        from pdserve.engine.paged_decode import supported

        why = supported(cfg.head_dim if isinstance(cfg, LlamaConfig) else 0, block_tokens)
        if why:
            raise BackendError(f"--decode-attention paged: {why}")
    if chosen.batch_invariant:
        invariant.enable()
    if decode_only:
        chosen = replace(chosen, decode_only=True)
    model: LlamaForCausalLM | DeepseekV3ForCausalLM
    if ep is not None and not (isinstance(cfg, DeepseekV3Config) and cfg.n_routed_experts):
        raise ValueError(f"{p}: expert parallelism needs a mixture-of-experts model")
    with torch.device("meta"):
        if isinstance(cfg, DeepseekV3Config):
            model = DeepseekV3ForCausalLM(cfg, held)
        else:
            model = LlamaForCausalLM(cfg)
    if isinstance(cfg, DeepseekV3Config) and cfg.fp8_block is not None:
        n = fp8.install(model, state, cfg.fp8_block)
        log.info("FP8 weights", extra={"linear_layers": n, "block": cfg.fp8_block})
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
    if isinstance(model, LlamaForCausalLM):
        chosen = model.prepare(chosen, blocks)
    else:
        chosen = model.prepare(chosen)
        if ep is not None:
            model.join_group(ep)
    _return_freed_memory()  # the state dict read from the files, and copies made by prepare
    phase("weight packing")
    kv = dtype if kv_dtype is None else kv_dtype
    if (chosen.c_attention or chosen.fused_layers) and kv not in (torch.float32, torch.float16):
        raise BackendError(f"--kv-dtype {dtype_name(kv)}: backend {chosen.name}'s CPU kernels read "
                           "float32 or float16 KV (or run --backend torch)")
    layout = cfg.kv_layout(dtype_name(kv), block_tokens)
    log.info("model ready", extra={"model": p.name, "backend": chosen.name,
                                   "seconds": round(time.perf_counter() - t0, 2)})
    return LoadedModel(model, cfg, tokenizer, model_id_of(p), layout, chosen, ep)


def _return_freed_memory() -> None:
    """Gives the heap's free pages back to the system (glibc's malloc_trim): loading frees
    gigabytes in pieces too small for their own mappings, which would otherwise stay resident."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.malloc_trim(0)


def _not_held(held: dict[int, list[int]]) -> Callable[[str], bool]:
    """Names the routed-expert tensors of experts not in `held` (never read)."""
    sets = {layer: set(experts) for layer, experts in held.items()}

    def skip(key: str) -> bool:
        parts = key.split(".")  # model.layers.L.mlp.experts.E.…
        if len(parts) < 6 or parts[:2] != ["model", "layers"] or parts[3:5] != ["mlp", "experts"]:
            return False
        layer = int(parts[2])
        return layer in sets and int(parts[5]) not in sets[layer]

    return skip
