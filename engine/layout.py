"""KV layout: the shape every page, transfer and store block shares (DESIGN §3)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


@dataclass(frozen=True)
class KVLayout:
    """One page = one store block = `block_tokens` tokens of every layer.

    Pool shape: kv[num_pages, num_layers, block_tokens, kv_dim]. For GQA the last dim holds
    K then V: kv_dim = 2 * num_kv_heads * head_dim.
    """

    num_layers: int
    kv_dim: int
    dtype: str
    block_tokens: int = 64

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.kv_dim * self.torch_dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_tokens

    def fingerprint(self) -> str:
        """Short stable id of the layout; blocks of different layouts never mix."""
        text = f"L{self.num_layers}-D{self.kv_dim}-{self.dtype}-B{self.block_tokens}"
        return text + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)
