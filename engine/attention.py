"""Paged attention over a page-major KV pool, in plain torch.

Pool: kv[num_pages, num_layers, block_tokens, kv_dim]; for GQA the last dim is [K heads | V heads].

A batch is a list of sequences, each contributing `q_len` new tokens to a flat token axis T:

    flat tokens  | seq 0: q_len 5 | seq 1: q_len 1 | seq 2: q_len 1 |
    context      | ctx 5 (fresh)  | ctx 130        | ctx 64         |

The new tokens' K/V are written to their slots first. Then:
- decode sequences (one new token) form groups of similar page counts: each group's pages are
  gathered whole (one index_select of page-sized rows) and one batched attention call serves the
  group, the unused tail of each table masked. Groups are merged while the padding costs at most
  a quarter more rows than exact grouping, so a batch of similar lengths is one call;
- prefill chunks gather their context pages and attend one sequence at a time, with a causal mask
  (or, `varlen`, all of them in one flex attention call: engine/flex.py).

On CPU in float32 (the `cpu-kernels` and `cpu-fused` backends) the decode sequences take another
path: one call of a C kernel (engine/cpu_kernels.py) attends all of them over their pages in
place, no copy, no padding.

GQA without copies: query heads that share a KV head are consecutive, so q viewed as
[G, KVH, H/KVH, hd] attends K/V viewed as [G, KVH, S, hd] with no repeat of K/V.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from pdserve.engine import cpu_kernels, flex


@dataclass
class AttnBatch:
    q_lens: list[int]
    ctx_lens: list[int]           # context length of each sequence including its new tokens
    slot_pages: torch.Tensor      # [T] page of each new token
    slot_offsets: torch.Tensor    # [T] offset inside that page
    positions: torch.Tensor       # [T] absolute position of each new token
    last_indices: torch.Tensor    # [B] flat index of each sequence's last new token
    masks: list[CausalBias | None]  # per sequence: causal [q, ctx] bias, None when q_len == 1
    # Decode sequences grouped by page count: (flat query indices [G], page tables [G, n],
    # valid rows [G, n * block_tokens]); None until `decode_groups` is first read, which
    # builds them from the lists below (the CPU kernels' decode never reads them).
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None
    page_tables: list[torch.Tensor]  # per sequence: the pages covering its context
    block_tokens: int
    # Every sequence's pages, concatenated, built on the first gather() only: the GQA decode
    # path reads its groups' pages and never needs them.
    _ctx_pages: torch.Tensor | None = None
    # Called with each layer's index before the layer runs: a prefill whose cached blocks are
    # still arriving waits there until that layer's KV is in place (services/layer_fetch.py).
    before_layer: Callable[[int], None] | None = None
    # False for a padded static step (engine/graphs.py): its ctx_lens and page_tables are
    # placeholders and only decode_groups' tables and masks describe the sequences, so the
    # CPU kernels (which read ctx_lens and page_tables) must not take it.
    exact_tables: bool = True
    # A decode step (ModelRunner.decode): its products read GGUF blocks where the model has
    # them (cpu_kernels.py); prefill chunks keep the float32 products, so a prompt's KV is the
    # same bits however it is chunked.
    decode_step: bool = False
    # Per sequence: whether its caller reads only the argmax of its logits (greedy sampling
    # without log-probabilities). The head may then return, for those rows, exact logits at
    # every token that can be the argmax and -inf elsewhere (engine/greedy_head.py).
    argmax_only: list[bool] | None = None
    _plan: cpu_kernels.DecodePlan | None = None
    _varlen: flex.VarlenPlan | None = None  # engine/flex.py's, built on first use

    @property
    def decode_groups(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The decode sequences grouped by page count (see `groups`), built on first use."""
        if self.groups is None:
            tables, dev = self.page_tables, self.last_indices.device
            decode = [i for i, q in enumerate(self.q_lens) if q == 1]
            self.groups = []
            for members, n in decode_groups([len(tables[i]) for i in decode], decode):
                group_table = torch.stack([torch.cat([tables[i], tables[i][:1].expand(
                    n - len(tables[i]))]) for i in members])
                lens = torch.tensor([self.ctx_lens[i] for i in members], device=dev)
                valid = (torch.arange(n * self.block_tokens, device=dev).unsqueeze(0)
                         < lens.unsqueeze(1))
                self.groups.append((self.last_indices[members], group_table, valid))
        return self.groups

    def decode_plan(self) -> cpu_kernels.DecodePlan:
        """The decode sequences for the CPU attention kernel, built on first use."""
        if self._plan is None:
            last = self.last_indices.tolist()
            decode = [i for i, q in enumerate(self.q_lens) if q == 1]
            self._plan = cpu_kernels.DecodePlan.build(
                [last[i] for i in decode], [self.ctx_lens[i] for i in decode],
                [self.page_tables[i] for i in decode])
        return self._plan

    @classmethod
    def build(cls, q_lens: list[int], ctx_lens: list[int], page_tables: list[list[int]],
              block_tokens: int, device: torch.device | str = "cpu",
              decode_step: bool = False) -> AttnBatch:
        slot_pages: list[torch.Tensor] = []
        slot_offsets: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        last: list[int] = []
        tables: list[torch.Tensor] = []
        masks: list[CausalBias | None] = []
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
            # Causal over the context, aligned to its end (the new tokens are its last q):
            # a bias object, not a [q, ctx] tensor, so SDPA can pick a fused causal kernel.
            masks.append(None if q == 1 else causal_lower_right(q, ctx))

        def cat(xs: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(xs).to(device)

        return cls(list(q_lens), list(ctx_lens), cat(slot_pages), cat(slot_offsets),
                   cat(positions), torch.tensor(last, dtype=torch.long, device=device),
                   masks, None, [t.to(device) for t in tables], block_tokens,
                   decode_step=decode_step)

    def write(self, kv: torch.Tensor, layer: int, rows: torch.Tensor) -> None:
        """Stores the new tokens' rows [T, kv_dim] of one layer in their slots."""
        kv[self.slot_pages, layer, self.slot_offsets] = rows.to(kv.dtype)

    def gather(self, kv: torch.Tensor, layer: int) -> torch.Tensor:
        """Every sequence's context pages of one layer, concatenated page by page:
        [sum(pages) * block_tokens, kv_dim]; `sequences()` says which rows are whose."""
        if self._ctx_pages is None:
            self._ctx_pages = torch.cat(self.page_tables)
        return layer_pages(kv, layer, self._ctx_pages).view(-1, kv.shape[-1])

    def sequences(self) -> Iterator[tuple[slice, slice, int, int, CausalBias | None]]:
        """Yields (query slice, context slice, q_len, ctx_len, mask) per sequence; the context
        slice indexes the rows of `gather()`."""
        q0 = c0 = 0
        for q, ctx, mask, table in zip(self.q_lens, self.ctx_lens, self.masks, self.page_tables):
            yield slice(q0, q0 + q), slice(c0, c0 + ctx), q, ctx, mask
            q0 += q
            c0 += table.numel() * self.block_tokens


def layer_pages(kv: torch.Tensor, layer: int, pages: torch.Tensor) -> torch.Tensor:
    """The rows of `pages` at one layer: [len(pages), block_tokens * kv_dim]. One contiguous
    page-layer region per page, copied by index_select (several times faster than indexing
    token by token)."""
    return kv.view(kv.shape[0], kv.shape[1], -1)[:, layer].index_select(0, pages)


def decode_groups(page_counts: list[int], members: list[int],
                  slack: float = 1.25) -> list[tuple[list[int], int]]:
    """Groups decode sequences for batched attention: (member indices, padded page count).
    Sequences sorted by page count; a group grows while its padded rows stay within `slack`
    times the rows it really needs."""
    order = sorted(range(len(members)), key=lambda j: -page_counts[j])
    groups: list[tuple[list[int], int]] = []
    cur: list[int] = []
    width = need = 0
    for j in order:
        n = page_counts[j]
        if cur and (len(cur) + 1) * width > slack * (need + n):
            groups.append((cur, width))
            cur, need = [], 0
        if not cur:
            width = n
        cur.append(members[j])
        need += n
    if cur:
        groups.append((cur, width))
    return groups


def paged_attention(
    q: torch.Tensor,   # [T, H, hd]
    k: torch.Tensor,   # [T, KVH, hd]
    v: torch.Tensor,   # [T, KVH, hd]
    kv: torch.Tensor,  # [P, L, B, 2*KVH*hd] the whole pool
    layer: int,
    batch: AttnBatch,
    scale: float,
    c_kernel: bool = False,  # decode attention by the C kernel (float32 CPU; backend.py)
    varlen: bool = False,    # every prefill chunk in one flex attention call (engine/flex.py)
    paged: bool = False,     # decode rows read their pages in place (engine/paged_decode.py)
) -> torch.Tensor:     # [T, H, hd]
    n_kv, hd = k.shape[1], k.shape[2]
    half = n_kv * hd
    # Step 1: store the new tokens' K/V in their slots.
    batch.write(kv, layer, torch.cat([k.reshape(-1, half), v.reshape(-1, half)], dim=-1))
    out = torch.empty_like(q)
    # Step 2: decode groups, one batched call each over whole pages (on CPU float32: one
    # kernel call for all of them, reading the pages in place).
    n_heads = q.shape[1]
    groups = batch.decode_groups
    if groups and c_kernel:
        assert batch.exact_tables, "a padded static step (CUDA graphs) never runs on CPU"
        cpu_kernels.decode_attention(q, kv, layer, n_kv, batch.decode_plan(), scale, out)
        groups = []
    if groups and paged:  # Triton (CUDA; tests: its interpreter): no copy, no padded rows
        from pdserve.engine.paged_decode import paged_decode

        for q_idx, tables, valid in groups:
            out[q_idx] = paged_decode(q[q_idx], kv, layer, tables, valid.sum(-1), n_kv, scale)
        groups = []
    for q_idx, tables, valid in groups:
        g = q_idx.numel()
        pages = layer_pages(kv, layer, tables.flatten()).view(g, -1, 2 * half).to(q.dtype)
        k_g = pages[..., :half].view(g, -1, n_kv, hd).transpose(1, 2)        # [G, KVH, S, hd]
        v_g = pages[..., half:].view(g, -1, n_kv, hd).transpose(1, 2)
        q_g = q[q_idx].view(g, n_kv, n_heads // n_kv, hd)                    # [G, KVH, rep, hd]
        o = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=valid[:, None, None, :],
                                           scale=scale)
        out[q_idx] = o.reshape(g, n_heads, hd)
    if len(batch.decode_groups) and all(m is None for m in batch.masks):
        return out
    # Step 3: prefill chunks, one sequence at a time over its gathered context rows (or all
    # in one call: varlen).
    ctx_kv = batch.gather(kv, layer).to(q.dtype)                  # [N, 2*half]
    keys = ctx_kv[:, :half].view(-1, n_kv, hd).transpose(0, 1)     # [KVH, N, hd]
    values = ctx_kv[:, half:].view(-1, n_kv, hd).transpose(0, 1)
    if varlen:
        packed = flex.varlen_prefill(q, keys, values, batch, scale)
        if packed is not None:
            out[packed[0]] = packed[1]
        return out
    for qs, cs, q_len, _, mask in batch.sequences():
        if q_len == 1:
            continue
        o = F.scaled_dot_product_attention(
            q[qs].transpose(0, 1).unsqueeze(0), keys[:, cs].unsqueeze(0),
            values[:, cs].unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True)
        out[qs] = o[0].transpose(0, 1)
    return out
