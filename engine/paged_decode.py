"""Decode attention that reads the KV pool's pages where they lie (Triton), for the GPU.

The default decode path (attention.py, step 2) gathers every sequence's pages of a layer into a
padded batch and runs SDPA on the copy; at batch 256 on a GPU the copy costs (issue #23: decode
at 1.98x transformers, the goal 2.5x). Here one program per (sequence, KV head) walks its page
table and reads each page's rows of this layer in place: the pool is page-major,
[pages, layers, block_tokens, K heads | V heads], so a row is at
page * stride(0) + layer * stride(1) + token * stride(2) and a head at a further h * hd (V heads
after the K heads). The query heads that share the KV head (GQA) are one tile of REP_P rows
(padded to 16 for tl.dot), with an online softmax over the pages, as flash decoding does in one
split. FlashInfer's paged kernels take the same strides; this one is a page of Python that the
CPU tests run under Triton's interpreter (TRITON_INTERPRET=1, numpy), and that CUDA graphs
capture like any kernel (the tables and lengths are device tensors of fixed shape).

Imported only where the setting asks for it: Triton comes with CUDA builds of torch, not with
the CPU one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]  # triton has no type information
def _paged_decode(Q, KV, Out, Tables, Lens,  # type: ignore[no-untyped-def]  # a Triton kernel's
                  # arguments are pointers and scalars Triton types at launch
                  q_stride, o_stride, table_stride, page_stride, token_stride, layer_offset,
                  v_offset, scale,
                  REP: tl.constexpr, REP_P: tl.constexpr, HD: tl.constexpr,
                  BT: tl.constexpr, IEEE: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    n = tl.load(Lens + s)
    r = tl.arange(0, REP_P)
    d = tl.arange(0, HD)
    t = tl.arange(0, BT)
    head = g * REP + r
    q = tl.load(Q + s * q_stride + head[:, None] * HD + d[None, :], mask=(r < REP)[:, None],
                other=0.0).to(tl.float32)
    m = tl.full([REP_P], float("-inf"), tl.float32)
    denom = tl.full([REP_P], 0.0, tl.float32)
    acc = tl.full([REP_P, HD], 0.0, tl.float32)
    for p in range((n + BT - 1) // BT):
        page = tl.load(Tables + s * table_stride + p).to(tl.int64)
        rows = page * page_stride + layer_offset + t.to(tl.int64) * token_stride
        seen = p * BT + t < n
        k = tl.load(KV + rows[:, None] + g * HD + d[None, :], mask=seen[:, None],
                    other=0.0).to(tl.float32)
        v = tl.load(KV + rows[:, None] + v_offset + g * HD + d[None, :], mask=seen[:, None],
                    other=0.0).to(tl.float32)
        if IEEE:
            score = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            score = tl.dot(q, tl.trans(k)) * scale
        score = tl.where(seen[None, :], score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=1))
        alpha = tl.exp(m - m_new)
        w = tl.exp(score - m_new[:, None])
        denom = denom * alpha + tl.sum(w, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(w, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(w, v)
        m = m_new
    out = acc / denom[:, None]
    tl.store(Out + s * o_stride + head[:, None] * HD + d[None, :],
             out.to(Out.dtype.element_ty), mask=(r < REP)[:, None])


def supported(head_dim: int, block_tokens: int) -> str | None:
    """Why the kernel cannot take this shape (None: it can): tl.arange needs powers of two."""
    for name, v in (("head dim", head_dim), ("--block-tokens", block_tokens)):
        if v < 16 or v & (v - 1):
            return f"{name} {v} is not a power of two >= 16"
    return None


def paged_decode(q: torch.Tensor, kv: torch.Tensor, layer: int, tables: torch.Tensor,
                 lens: torch.Tensor, n_kv: int, scale: float) -> torch.Tensor:
    """Attention of one query token per sequence over its pages: `q` [G, H, hd]; `kv` the
    pool [pages, layers, block_tokens, 2 * n_kv * hd]; `tables` [G, n] page ids (entries past
    a sequence's pages are never read); `lens` [G] context lengths (>= 1). Returns
    [G, H, hd] in q's dtype. Elsewhere than CUDA, Triton's interpreter runs it (tests: it is
    chosen before triton is first imported, tests/conftest.py)."""
    g, h, hd = q.shape
    rep = h // n_kv
    q = q.contiguous()
    out = torch.empty_like(q)
    if g == 0:
        return out
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the paged decode kernel runs on CUDA (or under TRITON_INTERPRET=1)")
    _paged_decode[(g, n_kv)](
        q, kv, out, tables, lens,
        q.stride(0), out.stride(0), tables.stride(0), kv.stride(0), kv.stride(2),
        layer * kv.stride(1), n_kv * hd, scale,
        REP=rep, REP_P=max(16, triton.next_power_of_2(rep)), HD=hd, BT=kv.shape[2],
        IEEE=q.dtype == torch.float32)
    return out
