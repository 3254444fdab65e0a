"""Prefill attention for every chunk of a step in one call (varlen), by torch's flex attention.

paged_attention's default prefill path (attention.py, step 3) attends one sequence at a time:
on a GPU, a step of several chunks is several small SDPA launches, each waiting for the one
before (issue #23: prefill at 0.36x transformers on an H200). Here the chunks' queries are
packed into one sequence [1, H, T, hd] that attends the gathered context rows [1, KVH, N, hd]
(AttnBatch.gather: each sequence's pages, one sequence after another) under one mask: query i
of a sequence with q new tokens, whose ctx context rows start at row c0, sees rows
c0 .. c0 + ctx - q + i, its own context, causally aligned to its end (as causal_lower_right).

Why flex attention and not FlashInfer's ragged prefill: it is torch's own (nothing to install
beside a CUDA torch, and it runs on CPU, where CI compares it with SDPA), and the mask above is
a few lines of Python that it turns into a block-sparse map of 128 x 128 tiles: tiles no query
sees are skipped, so the packed call does the per-sequence calls' work, not a dense [T, N]
product's. On CUDA the kernel is torch.compile'd once (Triton; dynamic shapes, so a new step
length does not recompile); elsewhere it runs eagerly, the unfused reference implementation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

if TYPE_CHECKING:  # attention.py imports this module
    from pdserve.engine.attention import AttnBatch

TILE = 128  # flex attention's default tile, queries and keys

_compiled: Callable[..., Any] | None = None


def _eager(*args: Any, **kwargs: Any) -> Any:
    """flex_attention uncompiled, without its warning that this is the unfused path: here that
    is meant (CPU, for checking)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        return flex_attention(*args, **kwargs)


def _kernel(device: torch.device) -> Callable[..., Any]:
    global _compiled
    if device.type != "cuda":
        return _eager
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


def _tile_map(start: torch.Tensor, limit: torch.Tensor, n: int) -> torch.Tensor:
    """[R, C] bool: whether any query of q-tile r sees any row of kv-tile c (query j sees rows
    start[j] .. limit[j])."""
    t = start.numel()
    rows = -(-t // TILE)
    pad = rows * TILE - t  # padded queries see nothing: start past limit
    lo = torch.nn.functional.pad(start, (0, pad), value=n).view(rows, TILE, 1)
    hi = torch.nn.functional.pad(limit, (0, pad), value=-1).view(rows, TILE, 1)
    c0 = torch.arange(0, -(-n // TILE) * TILE, TILE, device=start.device).view(1, 1, -1)
    return ((lo <= c0 + TILE - 1) & (hi >= c0)).any(dim=1)


@dataclass(frozen=True)
class VarlenPlan:
    """What every layer of a step shares: the prefill chunks' flat query indices and the
    block mask (built once per step, on first use)."""
    rows: torch.Tensor
    mask: BlockMask


def _plan(batch: AttnBatch, n: int, device: torch.device) -> VarlenPlan | None:
    idx: list[torch.Tensor] = []
    starts: list[torch.Tensor] = []
    limits: list[torch.Tensor] = []
    for qs, cs, q_len, ctx, _ in batch.sequences():
        if q_len == 1:
            continue
        i = torch.arange(q_len)
        idx.append(qs.start + i)
        starts.append(torch.full((q_len,), cs.start))
        limits.append(cs.start + ctx - q_len + i)
    if not idx:
        return None
    rows, start, limit = (torch.cat(x).to(device) for x in (idx, starts, limits))

    def sees(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor,
             kv: torch.Tensor) -> torch.Tensor:
        return (kv >= start[qi]) & (kv <= limit[qi])

    tiles = _tile_map(start, limit, n)
    num = tiles.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(~tiles, dim=-1, stable=True).to(torch.int32)  # seen tiles first
    mask = BlockMask.from_kv_blocks(num[None, None], order[None, None], BLOCK_SIZE=TILE,
                                    mask_mod=sees, seq_lengths=(rows.numel(), n),
                                    compute_q_blocks=False)  # inference: no backward
    return VarlenPlan(rows, mask)


def varlen_prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   batch: AttnBatch, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The prefill chunks of `batch` (sequences with more than one new token) in one call:
    (flat query indices [T], their outputs [T, H, hd]); None when the step has none.
    `q` [all tokens, H, hd]; `keys`, `values` [KVH, N, hd]: the gathered context rows."""
    if batch._varlen is None:
        batch._varlen = _plan(batch, keys.shape[1], q.device)
    plan = batch._varlen
    if plan is None:
        return None
    out = _kernel(q.device)(q[plan.rows].transpose(0, 1).unsqueeze(0), keys.unsqueeze(0),
                            values.unsqueeze(0), block_mask=plan.mask, scale=scale,
                            enable_gqa=True)
    return plan.rows, out[0].transpose(0, 1)
