"""Read a Llama-family GGUF file: config, dequantized weights (HF layout) and tokenizer."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from pdserve.engine.cpu_kernels import KINDS, QuantWeight
from pdserve.engine.gguf_file import GGUFFile
from pdserve.engine.model_config import LlamaConfig
from pdserve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def config_from_fields(fields: dict[str, Any]) -> LlamaConfig:
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}; expected a Llama-family model")
    a = arch
    scaling = fields.get(f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", None):  # YaRN and others: read from Hugging Face configs only
        raise ValueError(f"GGUF field {a}.rope.scaling.type {scaling!r} is not supported (none); "
                         "serve the Hugging Face checkpoint for a scaled rope")
    n_heads = int(fields[f"{a}.attention.head_count"])
    hidden = int(fields[f"{a}.embedding_length"])
    vocab = fields.get(f"{a}.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(fields[f"{a}.feed_forward_length"]),
        num_hidden_layers=int(fields[f"{a}.block_count"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(fields.get(f"{a}.attention.head_count_kv", n_heads)),
        head_dim=int(fields.get(f"{a}.rope.dimension_count", hidden // n_heads)),
        rms_norm_eps=float(fields[f"{a}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(fields.get(f"{a}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(fields.get(f"{a}.context_length", 2048)),
        tie_word_embeddings=True,  # fixed below once we know whether output.weight exists
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two RoPE halves of Q and K rows; undo it so that
    # the weights match Hugging Face's rotate_half convention.
    out: np.ndarray = (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )
    return out


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True,
    blocks: dict[str, QuantWeight] | None = None,
) -> tuple[LlamaConfig, dict[str, torch.Tensor], Tokenizer]:
    """Returns (config, state dict with Hugging Face Llama names, tokenizer). `blocks`, when
    given, also receives each Q4_1/Q8_0 weight's GGUF blocks under the same name (rows in the
    state dict's order), for the quantized-weight kernel (cpu_kernels.py)."""
    t0 = time.perf_counter()
    reader = GGUFFile(path)
    fields = reader.fields
    cfg = config_from_fields(fields)
    tokenizer = Tokenizer.from_gguf_fields(fields)
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(reader.tensors, desc=f"loading {Path(path).name}", unit="tensor",
               disable=not progress, leave=False)
    for t in bar:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        q = None
        if blocks is not None and t.tensor_type.name in KINDS and w.ndim == 2:
            q = QuantWeight.from_gguf(t.tensor_type.name, t.data, (w.shape[0], w.shape[1]))
        name = t.name
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, idx, kind, _ = name.split(".", 3)
            if kind not in _LAYER_NAMES:
                raise ValueError(f"unexpected tensor {name} in {path}")
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
            if kind in heads:  # rows move whole: the blocks of a row move with it
                w = _unpermute(w, heads[kind])
                if q is not None:
                    q = QuantWeight(q.kind, torch.from_numpy(
                        np.ascontiguousarray(_unpermute(q.blocks.numpy(), heads[kind]))), q.shape)
            key = f"model.layers.{idx}.{_LAYER_NAMES[kind]}.weight"
        else:
            continue  # e.g. rope_freqs: recomputed from the config
        state[key] = torch.from_numpy(np.array(w, copy=True)).to(dtype)
        if q is not None and blocks is not None:
            blocks[key] = q
    tied = "lm_head.weight" not in state
    cfg = LlamaConfig(**{**cfg.__dict__, "tie_word_embeddings": tied})
    log.info("model loaded", extra={"path": str(path), "tensors": len(state),
                                    "seconds": round(time.perf_counter() - t0, 2)})
    return cfg, state, tokenizer
