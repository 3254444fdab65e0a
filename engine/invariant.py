"""Batch-invariant execution (`--batch-invariant`): every row's result is the same bits however
many other rows share its step, so two runs that group the same tokens differently (two-batch
overlap on or off, an expert parallel group against one process) agree bitwise, as SGLang's
deterministic inference and vLLM's batch-invariant mode promise.

A matrix product's bits depend on the shapes it runs at (the library picks its blocking from
them; shared/research/ep-tbo.md §0.3: 3 of 10 prefix sizes of one fp32 product differ). Here:

- `enable()` replaces torch's CPU `mm`, `addmm` and `bmm` for the rest of the process by the
  same products over fixed tiles of `TILE` rows (the last one padded), so a row's dot products
  always run at one shape. Every product of the model goes through them (`F.linear`, einsum,
  `@`); the backends that bypass them (packed oneDNN weights, the C kernels) are not used.
- `attention()` is multi-head latent attention in its absorbed form with an online softmax over
  key tiles of a fixed width at absolute positions: a key tile past a query's causal limit is
  masked whole and leaves its sums unchanged bit for bit, so a query gets the same bits whether
  its chunk was cut short or not, and whoever else is in the batch.
Elementwise and row-wise work (norms, RoPE, softmax over a tile) is invariant as it is.
"""

from __future__ import annotations

import warnings

import torch

TILE = 16        # rows per product tile
KEY_TILE = 64    # keys per attention tile

_lib: torch.library.Library | None = None


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = a.shape[0]
    out = torch.empty(m, b.shape[1], dtype=a.dtype, device=a.device)
    tile = torch.zeros(TILE, a.shape[1], dtype=a.dtype, device=a.device)
    buf = torch.empty(TILE, b.shape[1], dtype=a.dtype, device=a.device)
    for i in range(0, m, TILE):
        n = min(TILE, m - i)
        tile[:n] = a[i:i + n]
        if n < TILE:
            tile[n:] = 0
        torch.ops.aten.mm.out(tile, b, out=buf)  # the .out overload is not replaced
        out[i:i + n] = buf[:n]
    return out


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1,
           alpha: float = 1) -> torch.Tensor:
    y = _mm(a, b)
    if alpha != 1:
        y = y * alpha
    return y + (bias if beta == 1 else bias * beta)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([_mm(a[i], b[i]) for i in range(a.shape[0])]) if a.shape[0] else \
        torch.empty(0, a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)


def enable() -> None:
    """Batch-invariant products from now on, in this process (idempotent)."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # torch warns that it overrides its own kernel: we mean to
        warnings.simplefilter("ignore", UserWarning)
        lib.impl("mm", _mm, "CPU")
        lib.impl("addmm", _addmm, "CPU")
        lib.impl("bmm", _bmm, "CPU")
    _lib = lib


def disable() -> None:
    """Torch's own products again (tests)."""
    global _lib
    if _lib is not None:
        _lib._destroy()
        _lib = None


def enabled() -> bool:
    return _lib is not None


def attention(q_lat: torch.Tensor, q_rope: torch.Tensor, ctx: torch.Tensor, rank: int,
              positions: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence's latent attention. q_lat [n, H, r] (queries folded into latent space),
    q_rope [n, H, dr], ctx [S, r + dr] its cached [latent | rotated key] rows by position
    (S: at least its context; rows past a query's position are masked), positions [n].
    Returns the latent outputs [n, H, r]."""
    n, h, _ = q_lat.shape
    ql = q_lat.reshape(n * h, rank)
    qr = q_rope.reshape(n * h, -1)
    limit = positions.repeat_interleave(h).unsqueeze(1)                  # [n*H, 1]
    m = torch.full((n * h,), float("-inf"))
    total = torch.zeros(n * h)
    acc = torch.zeros(n * h, rank, dtype=q_lat.dtype, device=q_lat.device)
    keys = torch.arange(KEY_TILE)
    last = int(positions.max()) + 1 if n else 0
    for k0 in range(0, last, KEY_TILE):
        tile = torch.zeros(KEY_TILE, ctx.shape[1], dtype=ctx.dtype, device=ctx.device)
        rows = ctx[k0:min(k0 + KEY_TILE, last)]
        tile[:rows.shape[0]] = rows
        c, kr = tile[:, :rank], tile[:, rank:]
        s = ((ql @ c.T + qr @ kr.T) * scale).float()                      # [n*H, KEY_TILE]
        s = s.masked_fill(keys + k0 > limit, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=1))
        keep = torch.exp(m - m_new)
        p = torch.exp(s - m_new.unsqueeze(1))
        total = total * keep + p.sum(dim=1)
        acc = acc * keep.unsqueeze(1).to(acc.dtype) + p.to(c.dtype) @ c
        m = m_new
    return (acc / total.unsqueeze(1).to(acc.dtype)).view(n, h, rank)
