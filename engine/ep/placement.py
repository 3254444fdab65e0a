"""Physical expert slots: `phy2log[layer][slot]` is the logical expert a slot holds; the slots
split evenly over the ranks (rank r holds slots [r·S/N, (r+1)·S/N)). With R redundant slots,
S = E + R and some experts have several replicas; which replica a (token, choice) pair uses is
decided here, the same way on every rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SlotMap:
    phy2log: tuple[tuple[int, ...], ...]  # [layers, slots]; layers without experts: ()
    num_experts: int
    ep_size: int
    # A rank's own replica first (no transfer for those rows), or every replica in turn (the
    # even split EPLB's placement assumes; bench/bench_ep.py measures both).
    local_first: bool = True
    _own: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, compare=False,
                                                      repr=False)
    _tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for layer, slots in enumerate(self.phy2log):
            if not slots:
                continue
            if len(slots) % self.ep_size:
                raise ValueError(f"layer {layer}: {len(slots)} expert slots do not split evenly "
                                 f"over {self.ep_size} ranks")
            missing = set(range(self.num_experts)) - set(slots)
            if missing or any(not 0 <= e < self.num_experts for e in slots):
                raise ValueError(f"layer {layer}: every expert 0..{self.num_experts - 1} needs a "
                                 f"slot (missing {sorted(missing)[:5]})")

    @classmethod
    def default(cls, moe_layers: Sequence[int], num_layers: int, num_experts: int, ep_size: int,
                redundant: int = 0, local_first: bool = True) -> SlotMap:
        """Slot s < E holds expert s; redundant slot E + i holds expert i (before any load is
        known, every expert equally likely)."""
        slots = tuple(list(range(num_experts)) + [i % num_experts for i in range(redundant)])
        return cls(tuple(slots if layer in moe_layers else () for layer in range(num_layers)),
                   num_experts, ep_size, local_first)

    @classmethod
    def from_phy2log(cls, phy2log: Sequence[Sequence[int]], moe_layers: Sequence[int],
                     num_layers: int, num_experts: int, ep_size: int,
                     local_first: bool = True) -> SlotMap:
        """`phy2log` of the MoE layers only (as scheduler/eplb.py gives it), in layer order."""
        if len(phy2log) != len(moe_layers):
            raise ValueError(f"{len(phy2log)} layers of placement for {len(moe_layers)} MoE "
                             "layers")
        rows = dict(zip(moe_layers, phy2log))
        return cls(tuple(tuple(rows.get(layer, ())) for layer in range(num_layers)),
                   num_experts, ep_size, local_first)

    def slots_per_rank(self, layer: int) -> int:
        return len(self.phy2log[layer]) // self.ep_size

    def rank_slots(self, layer: int, rank: int) -> range:
        n = self.slots_per_rank(layer)
        return range(rank * n, (rank + 1) * n)

    def held_at(self, layer: int, rank: int) -> list[int]:
        return sorted({self.phy2log[layer][s] for s in self.rank_slots(layer, rank)})

    def _table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[E, max replicas] slots (ascending; padded with the first) and [E] replica counts."""
        got = self._tables.get(layer)
        if got is None:
            reps: list[list[int]] = [[] for _ in range(self.num_experts)]
            for s, e in enumerate(self.phy2log[layer]):
                reps[e].append(s)
            width = max(len(r) for r in reps)
            table = torch.tensor([r + [r[0]] * (width - len(r)) for r in reps], dtype=torch.long)
            got = self._tables[layer] = (table, torch.tensor([len(r) for r in reps]))
        return got

    def _own_slot(self, layer: int, rank: int) -> torch.Tensor:
        """[E]: the lowest slot of each expert on `rank`, -1 where it has none."""
        key = (layer, rank)
        got = self._own.get(key)
        if got is None:
            own = [-1] * self.num_experts
            for s in self.rank_slots(layer, rank):
                e = self.phy2log[layer][s]
                if own[e] < 0:
                    own[e] = s
            got = self._own[key] = torch.tensor(own, dtype=torch.long)
        return got

    def choose(self, layer: int, idx: torch.Tensor, rank: int) -> torch.Tensor:
        """Slots for logical experts `idx` [T, K] of a rank's tokens: with `local_first` the
        token's own rank's replica if it has one; else replica number ((pair position + rank)
        mod replica count), pairs numbered token by token: consecutive pairs, and the same pair
        position on different ranks, go to different replicas."""
        table, count = self._table(layer)
        pos = torch.arange(idx.numel()).view(idx.shape) + rank
        spread = table[idx, pos % count[idx]]
        if not self.local_first:
            return spread
        own = self._own_slot(layer, rank)[idx]
        return torch.where(own >= 0, own, spread)
