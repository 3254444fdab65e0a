"""Paged attention over a page-major KV pool, in plain torch.

Pool: kv[num_pages, num_layers, block_tokens, kv_dim]; for GQA the last dim is [K heads | V heads].

A batch is a list of sequences, each contributing `q_len` new tokens to a flat token axis T:

    flat tokens  | seq 0: q_len 5 | seq 1: q_len 1 | seq 2: q_len 1 |
    context      | ctx 5 (fresh)  | ctx 130        | ctx 64         |

The new tokens' K/V are written to their slots first, then each sequence attends over its
first `ctx_len` cached tokens, gathered through its page table. No padding to the longest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnBatch:
    q_lens: list[int]
    ctx_lens: list[int]           # context length of each sequence including its new tokens
    page_tables: list[torch.Tensor]  # [pages_i] int64, pages covering ctx_lens[i]
    slot_pages: torch.Tensor      # [T] page of each new token
    slot_offsets: torch.Tensor    # [T] offset inside that page
    positions: torch.Tensor       # [T] absolute position of each new token
    last_indices: torch.Tensor    # [B] flat index of each sequence's last new token

    @classmethod
    def build(
        cls, q_lens: list[int], ctx_lens: list[int], page_tables: list[list[int]], block_tokens: int
    ) -> AttnBatch:
        positions: list[int] = []
        pages: list[int] = []
        offsets: list[int] = []
        last: list[int] = []
        flat = 0
        for q, ctx, table in zip(q_lens, ctx_lens, page_tables):
            if q <= 0 or q > ctx or len(table) * block_tokens < ctx:
                raise ValueError(f"bad sequence in batch: q_len={q} ctx={ctx} pages={len(table)}")
            for pos in range(ctx - q, ctx):
                positions.append(pos)
                pages.append(table[pos // block_tokens])
                offsets.append(pos % block_tokens)
            flat += q
            last.append(flat - 1)
        n_pages = [-(-c // block_tokens) for c in ctx_lens]
        return cls(
            q_lens=list(q_lens),
            ctx_lens=list(ctx_lens),
            page_tables=[torch.tensor(t[:n], dtype=torch.long) for t, n in zip(page_tables, n_pages)],
            slot_pages=torch.tensor(pages, dtype=torch.long),
            slot_offsets=torch.tensor(offsets, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            last_indices=torch.tensor(last, dtype=torch.long),
        )


def paged_attention(
    q: torch.Tensor,   # [T, H, hd]
    k: torch.Tensor,   # [T, KVH, hd]
    v: torch.Tensor,   # [T, KVH, hd]
    kv: torch.Tensor,  # [P, L, B, 2*KVH*hd] the whole pool
    layer: int,
    batch: AttnBatch,
    scale: float,
) -> torch.Tensor:     # [T, H, hd]
    n_kv, hd = k.shape[1], k.shape[2]
    half = n_kv * hd
    # Step 1: store the new tokens' K/V in their slots.
    kv[batch.slot_pages, layer, batch.slot_offsets] = torch.cat(
        [k.reshape(-1, half), v.reshape(-1, half)], dim=-1
    ).to(kv.dtype)
    # Step 2: per sequence, attend over its gathered context.
    out = torch.empty_like(q)
    start = 0
    for q_len, ctx, table in zip(batch.q_lens, batch.ctx_lens, batch.page_tables):
        ctx_kv = kv[table, layer].reshape(-1, 2 * half)[:ctx].to(q.dtype)  # [ctx, 2*half]
        ks = ctx_kv[:, :half].view(ctx, n_kv, hd).transpose(0, 1)          # [KVH, ctx, hd]
        vs = ctx_kv[:, half:].view(ctx, n_kv, hd).transpose(0, 1)
        qs = q[start:start + q_len].transpose(0, 1)                         # [H, q, hd]
        if q_len == 1:
            mask = None
        else:
            q_pos = torch.arange(ctx - q_len, ctx).unsqueeze(1)
            mask = torch.arange(ctx).unsqueeze(0) <= q_pos                   # [q, ctx]
        o = F.scaled_dot_product_attention(
            qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        out[start:start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out
