"""Block keys: a SHA-256 hash chain over full blocks of a prompt (DESIGN §3).

    h0 = H(namespace || cache_salt)       namespace = model id | layout fingerprint | algorithm
    h_i = H(h_{i-1} || tokens of block i)  tokens as little-endian int32

Two prompts share block i's key only if they share every token up to the end of block i, the
model, the KV layout and the salt. Only full blocks get keys; a prompt's tail is never cached.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

import numpy as np

BlockHash = NewType("BlockHash", bytes)

HASH_ALGORITHM = "sha256"


def hash_namespace(model_id: str, layout_fingerprint: str) -> str:
    return f"{model_id}|{layout_fingerprint}|{HASH_ALGORITHM}"


def chain_root(namespace: str, cache_salt: str) -> bytes:
    ns, salt = namespace.encode(), cache_salt.encode()
    # Length-prefix both parts so that ("ab", "c") and ("a", "bc") never collide.
    return hashlib.sha256(struct.pack("<I", len(ns)) + ns + struct.pack("<I",
                                                                        len(salt)) + salt).digest()


def block_hashes(
    namespace: str, cache_salt: str, tokens: Sequence[int], block_tokens: int
) -> list[BlockHash]:
    """Keys of the full blocks of `tokens`, in order."""
    arr = np.asarray(tokens, dtype="<i4")
    prev = chain_root(namespace, cache_salt)
    out: list[BlockHash] = []
    for b in range(len(arr) // block_tokens):
        block = arr[b * block_tokens:(b + 1) * block_tokens].tobytes()
        prev = hashlib.sha256(prev + block).digest()
        out.append(BlockHash(prev))
    return out


def cacheable_blocks(num_prompt_tokens: int, block_tokens: int) -> int:
    """Leading blocks whose KV may be loaded instead of computed: at least the last prompt
    token is always computed, since its logits give the first output token."""
    return max(0, (num_prompt_tokens - 1) // block_tokens)
