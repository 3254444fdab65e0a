"""One MoE layer across an EP group (each rank calls it with its own tokens, possibly none).

1. The gate (replicated) picks logical experts `idx` [T, K] and weights `w`; each (token, k)
   pair gets a physical slot (placement.SlotMap.choose), whose rank is slot // slots-per-rank.
2. Pairs are grouped by destination rank (a stable sort: the send order is the handle, token
   ids never travel), counts exchanged, rows and slot ids dispatched: in the model's dtype, or
   as `--ep-dispatch-dtype` says (FP8: DeepSeek's `act_quant` format, one scale per token per
   128 channels, dequantized at the receiver; bf16).
3. Each received row runs through the expert its slot holds, slots in ascending order.
4. Results combine back (in bf16 when the dispatch was narrowed and the model is not float32),
   are put back in (token, k) order, and summed on the source rank in ascending logical-expert
   order, as the single-process MoE does.

Each of those is a phase of its own (`dispatch_start`, `dispatch_wait`, `compute`,
`combine_start`, `combine_wait`), so that two micro-batches can interleave them (tbo.py);
`routed` runs them in a row. A rank with no tokens still joins every exchange and computes its
experts for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pdserve.engine.ep.comm import CommStats, EPComm, Pending
from pdserve.engine.ep.placement import SlotMap

Expert = Callable[[torch.Tensor, bool], torch.Tensor]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0      # e4m3's largest finite value
ACT_BLOCK = 128      # channels per activation scale
DISPATCH_DTYPES = {"fp8": FP8, "bf16": torch.bfloat16, "fp32": torch.float32}


def act_quant(x: torch.Tensor, block: int = ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's activation quantization (inference/kernel.py `act_quant`): per row and per
    `block` channels, amax clamped to 1e-4, scale = amax / 448, value = e4m3(x / scale),
    saturated at ±448 as their kernel's cast does. x [M, D] -> (q [M, D] float8_e4m3fn,
    scales [M, ceil(D / block)] float32); a partial last block is one block."""
    m, d = x.shape
    nb = -(-d // block)
    xb = F.pad(x.float(), (0, nb * block - d)).view(m, nb, block)
    scale = xb.abs().amax(dim=-1).clamp(min=1e-4) / FP8_MAX
    q = (xb / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(m, nb * block)[:, :d].contiguous(), scale


def act_dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                block: int = ACT_BLOCK) -> torch.Tensor:
    """The receiver's side: q [M, D] float8 times its block's scale, in `dtype`."""
    m, d = q.shape
    nb = scale.shape[1]
    qb = F.pad(q.float(), (0, nb * block - d)).view(m, nb, block)
    return (qb * scale.unsqueeze(-1)).view(m, nb * block)[:, :d].to(dtype)


@dataclass
class Routed:
    """One micro-batch's MoE layer under way, phase to phase."""

    layer: int
    x: torch.Tensor        # [T, D] this rank's tokens
    idx: torch.Tensor      # [T, K] logical experts
    w: torch.Tensor        # [T, K] their weights
    comm: EPComm
    order: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    send: list[int] = field(default_factory=list)
    recv: list[int] = field(default_factory=list)
    pending: Pending | None = None
    rows: torch.Tensor | None = None   # received rows, in the model's dtype
    slots: torch.Tensor | None = None  # their slots
    out: torch.Tensor | None = None    # the experts' outputs for them


class ExpertParallel:
    """What every MoE layer of one rank shares: the group's exchanges and the slot map.

    `comms`: one communicator per micro-batch (the second is for two-batch overlap, tbo.py);
    `dispatch_dtype`: "fp8" | "bf16" | "fp32", None for the model's own dtype (exact against
    one process)."""

    def __init__(self, comm: EPComm, slots: SlotMap, second: EPComm | None = None,
                 dispatch_dtype: str | None = None) -> None:
        if dispatch_dtype is not None and dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(f"dispatch dtype {dispatch_dtype!r}: one of "
                             f"{', '.join(DISPATCH_DTYPES)}")
        self.comms = [comm] if second is None else [comm, second]
        self.slots = slots
        self.dispatch_dtype = dispatch_dtype
        # Whether the experts run a decode step's products (hooks.EPHooks sets it each step,
        # the same on every rank, so a row gets the same product whichever rank computes it).
        self.decode_products = False
        # Whether this step runs as two overlapped micro-batches (EPHooks, the same everywhere).
        self.overlap = False
        self.group_epoch = 0  # which start of the group this is (the same on every rank)
        # (operation, micro-batch, seconds) of overlapped steps, in the order they ran, when a
        # test or benchmark asks for it (a list), else None
        self.trace: list[tuple[str, int, float]] | None = None

    @property
    def comm(self) -> EPComm:
        return self.comms[0]

    @property
    def stats(self) -> CommStats:
        return self.comm.stats

    @property
    def rank(self) -> int:
        return self.comm.rank

    def held(self) -> dict[int, list[int]]:
        """MoE layer -> the logical experts this rank's slots hold there."""
        return {layer: self.slots.held_at(layer, self.rank)
                for layer, slots in enumerate(self.slots.phy2log) if slots}

    def combine_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The expert outputs travel back in bf16 when the dispatch was narrowed (fp32 when an
        FP8 dispatch serves a float32 model), else in the model's dtype."""
        if self.dispatch_dtype == "bf16" or (self.dispatch_dtype == "fp8"
                                             and model_dtype != torch.float32):
            return torch.bfloat16
        return model_dtype

    # -- the phases ---------------------------------------------------------------------------
    def dispatch_start(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                       micro_batch: int = 0) -> Routed:
        r = Routed(layer, x, idx, w, self.comms[micro_batch])
        k = idx.shape[1]
        slot = self.slots.choose(layer, idx, self.rank)                       # [T, K]
        dest = (slot // self.slots.slots_per_rank(layer)).flatten()
        r.order = torch.argsort(dest, stable=True)
        send_t = torch.bincount(dest, minlength=r.comm.size)
        r.send, r.recv = send_t.tolist(), r.comm.exchange_counts(send_t).tolist()
        rows = x[r.order // k]
        wire: tuple[torch.Tensor, ...]
        if self.dispatch_dtype == "fp8":
            wire = act_quant(rows)
        elif self.dispatch_dtype is not None:
            wire = (rows.to(DISPATCH_DTYPES[self.dispatch_dtype]),)
        else:
            wire = (rows,)
        r.pending = r.comm.dispatch(wire, slot.flatten()[r.order], r.send, r.recv)
        return r

    def dispatch_wait(self, r: Routed) -> None:
        assert r.pending is not None
        *wire, r.slots = r.pending.wait()
        r.rows = act_dequant(wire[0], wire[1], r.x.dtype) if len(wire) == 2 else \
            wire[0].to(r.x.dtype)

    def compute(self, r: Routed, experts: Callable[[int], Expert]) -> None:
        """The local experts over the received rows; `experts(e)`: logical expert e's module."""
        assert r.rows is not None and r.slots is not None
        r.out = torch.empty_like(r.rows)
        phy2log = self.slots.phy2log[r.layer]
        for s in torch.unique(r.slots).tolist():                             # ascending slots
            rows = torch.nonzero(r.slots == s).flatten()
            r.out[rows] = experts(phy2log[s])(r.rows[rows], self.decode_products)

    def combine_start(self, r: Routed) -> None:
        assert r.out is not None
        r.pending = r.comm.combine(r.out.to(self.combine_dtype(r.x.dtype)), r.send, r.recv)

    def combine_wait(self, r: Routed) -> torch.Tensor:
        """The routed experts' weighted sum for the micro-batch's tokens [T, D]."""
        assert r.pending is not None
        (back,) = r.pending.wait()
        t, k = r.idx.shape
        x = r.x
        per = torch.empty(t * k, x.shape[1], dtype=x.dtype, device=x.device)
        per[r.order] = back.to(x.dtype)
        per = per.view(t, k, x.shape[1])
        out = torch.zeros_like(x)
        for e in torch.unique(r.idx).tolist():                               # ascending experts
            tok, pos = torch.where(r.idx == e)
            out.index_add_(0, tok, per[tok, pos] * r.w[tok, pos, None].to(x.dtype))
        return out

    def routed(self, layer: int, experts: Callable[[int], Expert], x: torch.Tensor,
               idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for this rank's tokens x [T, D], the phases in a
        row."""
        r = self.dispatch_start(layer, x, idx, w)
        self.dispatch_wait(r)
        self.compute(r, experts)
        self.combine_start(r)
        return self.combine_wait(r)
