"""Paged attention over a page-major KV pool, in plain torch.

Pool: kv[num_pages, num_layers, block_tokens, kv_dim]; for GQA the last dim is [K heads | V heads].

A batch is a list of sequences, each contributing `q_len` new tokens to a flat token axis T:

    flat tokens  | seq 0: q_len 5 | seq 1: q_len 1 | seq 2: q_len 1 |
    context      | ctx 5 (fresh)  | ctx 130        | ctx 64         |

The new tokens' K/V are written to their slots first. Then:
- decode sequences (one new token) with the same number of pages form a group: their pages are
  gathered whole and one batched attention call serves the group, the unused tail of each last
  page masked (at most block_tokens - 1 wasted rows per sequence, never padding to the longest);
- prefill chunks gather their context rows (token-level indices built once per step) and attend
  one sequence at a time, with a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnBatch:
    q_lens: list[int]
    ctx_lens: list[int]           # context length of each sequence including its new tokens
    slot_pages: torch.Tensor      # [T] page of each new token
    slot_offsets: torch.Tensor    # [T] offset inside that page
    positions: torch.Tensor       # [T] absolute position of each new token
    last_indices: torch.Tensor    # [B] flat index of each sequence's last new token
    masks: list[torch.Tensor | None]  # per sequence: causal mask [q, ctx], None when q_len == 1
    # Decode sequences grouped by page count: (flat query indices [G], page tables [G, n],
    # valid rows [G, n * block_tokens]).
    decode_groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    page_tables: list[torch.Tensor]  # per sequence: the pages covering its context
    block_tokens: int
    # Token-level gather indices of every context row, built on the first gather() only: the
    # GQA decode path reads whole pages and never needs them.
    _ctx_index: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, q_lens: list[int], ctx_lens: list[int], page_tables: list[list[int]],
              block_tokens: int, device: torch.device | str = "cpu") -> AttnBatch:
        slot_pages, slot_offsets, positions, last = [], [], [], []
        tables: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        flat = 0
        for q, ctx, table in zip(q_lens, ctx_lens, page_tables):
            if q <= 0 or q > ctx or len(table) * block_tokens < ctx:
                raise ValueError(f"bad sequence in batch: q_len={q} ctx={ctx} pages={len(table)}")
            pages = torch.as_tensor(table[: -(-ctx // block_tokens)], dtype=torch.long)
            tables.append(pages)
            new = torch.arange(ctx - q, ctx)  # positions of the new tokens: O(q), not O(ctx)
            slot_pages.append(pages[new // block_tokens])
            slot_offsets.append(new % block_tokens)
            positions.append(new)
            flat += q
            last.append(flat - 1)
            masks.append(None if q == 1 else
                         (torch.arange(ctx).unsqueeze(0) <= new.unsqueeze(1)).to(device))
        by_pages: dict[int, list[int]] = {}
        for i, (q, ctx) in enumerate(zip(q_lens, ctx_lens)):
            if q == 1:
                by_pages.setdefault(-(-ctx // block_tokens), []).append(i)
        groups = []
        for n, members in sorted(by_pages.items()):
            tables = torch.tensor([list(page_tables[i][:n]) for i in members], dtype=torch.long)
            lens = torch.tensor([ctx_lens[i] for i in members]).unsqueeze(1)
            valid = torch.arange(n * block_tokens).unsqueeze(0) < lens
            groups.append((torch.tensor([last[i] for i in members], dtype=torch.long).to(device),
                           tables.to(device), valid.to(device)))
        cat = lambda xs: torch.cat(xs).to(device)  # noqa: E731
        return cls(list(q_lens), list(ctx_lens), cat(slot_pages), cat(slot_offsets),
                   cat(positions), torch.tensor(last, dtype=torch.long, device=device),
                   masks, groups, [t.to(device) for t in tables], block_tokens)

    def write(self, kv: torch.Tensor, layer: int, rows: torch.Tensor) -> None:
        """Stores the new tokens' rows [T, kv_dim] of one layer in their slots."""
        kv[self.slot_pages, layer, self.slot_offsets] = rows.to(kv.dtype)

    def gather(self, kv: torch.Tensor, layer: int) -> torch.Tensor:
        """Every sequence's context rows of one layer, concatenated: [sum(ctx), kv_dim]."""
        if self._ctx_index is None:
            bt = self.block_tokens
            pages, offsets = [], []
            for table, ctx in zip(self.page_tables, self.ctx_lens):
                pos = torch.arange(ctx, device=table.device)
                pages.append(table[pos // bt])
                offsets.append(pos % bt)
            self._ctx_index = (torch.cat(pages), torch.cat(offsets))
        ctx_pages, ctx_offsets = self._ctx_index
        return kv[ctx_pages, layer, ctx_offsets]

    def sequences(self):  # type: ignore[no-untyped-def]
        """Yields (query slice, context slice, q_len, ctx_len, mask) per sequence."""
        q0 = c0 = 0
        for q, ctx, mask in zip(self.q_lens, self.ctx_lens, self.masks):
            yield slice(q0, q0 + q), slice(c0, c0 + ctx), q, ctx, mask
            q0 += q
            c0 += ctx


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
    batch.write(kv, layer, torch.cat([k.reshape(-1, half), v.reshape(-1, half)], dim=-1))
    out = torch.empty_like(q)
    # Step 2: decode groups, one batched call each over whole pages.
    for q_idx, tables, valid in batch.decode_groups:
        g = q_idx.numel()
        pages = kv[tables, layer].reshape(g, -1, 2 * half).to(q.dtype)       # [G, S, 2*half]
        k_g = pages[..., :half].view(g, -1, n_kv, hd).transpose(1, 2)        # [G, KVH, S, hd]
        v_g = pages[..., half:].view(g, -1, n_kv, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[q_idx].unsqueeze(2), k_g, v_g, attn_mask=valid[:, None, None, :], scale=scale,
            enable_gqa=True)                                                  # [G, H, 1, hd]
        out[q_idx] = o[:, :, 0]
    if len(batch.decode_groups) and all(m is None for m in batch.masks):
        return out
    # Step 3: prefill chunks, one sequence at a time over its gathered context rows.
    ctx_kv = batch.gather(kv, layer).to(q.dtype)                  # [N, 2*half]
    keys = ctx_kv[:, :half].view(-1, n_kv, hd).transpose(0, 1)     # [KVH, N, hd]
    values = ctx_kv[:, half:].view(-1, n_kv, hd).transpose(0, 1)
    for qs, cs, q_len, _, mask in batch.sequences():
        if q_len == 1:
            continue
        o = F.scaled_dot_product_attention(
            q[qs].transpose(0, 1).unsqueeze(0), keys[:, cs].unsqueeze(0),
            values[:, cs].unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True)
        out[qs] = o[0].transpose(0, 1)
    return out
