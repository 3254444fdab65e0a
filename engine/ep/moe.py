"""One MoE layer across an EP group (each rank calls it with its own tokens, possibly none).

1. The gate (replicated) picks logical experts `idx` [T, K] and weights `w`; each (token, k)
   pair gets a physical slot (placement.SlotMap.choose), whose rank is slot // slots-per-rank.
2. Pairs are grouped by destination rank (a stable sort: the send order is the handle, token
   ids never travel), counts exchanged, rows and slot ids dispatched.
3. Each received row runs through the expert its slot holds, slots in ascending order.
4. Results combine back, are put back in (token, k) order, and summed on the source rank in
   ascending logical-expert order, as the single-process MoE does.

A rank with no tokens still joins every exchange and computes its experts for the others.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.engine.ep.comm import EPComm
from pdserve.engine.ep.placement import SlotMap

Expert = Callable[[torch.Tensor, bool], torch.Tensor]


class ExpertParallel:
    """What every MoE layer of one rank shares: the group's exchanges and the slot map."""

    def __init__(self, comm: EPComm, slots: SlotMap) -> None:
        self.comm = comm
        self.slots = slots
        # Whether the experts run a decode step's products (hooks.EPHooks sets it each step,
        # the same on every rank, so a row gets the same product whichever rank computes it).
        self.decode_products = False
        self.group_epoch = 0  # which start of the group this is (the same on every rank)

    @property
    def rank(self) -> int:
        return self.comm.rank

    def held(self) -> dict[int, list[int]]:
        """MoE layer -> the logical experts this rank's slots hold there."""
        return {layer: self.slots.held_at(layer, self.rank)
                for layer, slots in enumerate(self.slots.phy2log) if slots}

    def routed(self, layer: int, experts: Callable[[int], Expert], x: torch.Tensor,
               idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for this rank's tokens x [T, D]; `experts(e)`: the
        local module of logical expert e."""
        t, k = idx.shape
        slot = self.slots.choose(layer, idx, self.rank)                       # [T, K]
        spr = self.slots.slots_per_rank(layer)
        dest = (slot // spr).flatten()
        order = torch.argsort(dest, stable=True)
        send_t = torch.bincount(dest, minlength=self.comm.size)
        recv_t = self.comm.exchange_counts(send_t)
        send, recv = send_t.tolist(), recv_t.tolist()
        rx, rslot = self.comm.dispatch(x[order // k], slot.flatten()[order], send, recv).wait()
        ry = torch.empty_like(rx)
        phy2log = self.slots.phy2log[layer]
        for s in torch.unique(rslot).tolist():                               # ascending slots
            rows = torch.nonzero(rslot == s).flatten()
            ry[rows] = experts(phy2log[s])(rx[rows], self.decode_products)
        (back,) = self.comm.combine(ry, send, recv).wait()
        per = torch.empty(t * k, x.shape[1], dtype=x.dtype, device=x.device)
        per[order] = back
        per = per.view(t, k, x.shape[1])
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():                                 # ascending experts
            tok, pos = torch.where(idx == e)
            out.index_add_(0, tok, per[tok, pos] * w[tok, pos, None].to(x.dtype))
        return out
