"""EPLB applied live: every `interval` group steps (the step number is the same on every rank)
the tokens each logical expert received over the window are summed across the group, rank 0
computes a new placement with scheduler/eplb.py (hierarchical when nodes divide the expert
groups, global otherwise), every rank receives it, loads the experts its new slots need that it
does not hold (re-read from the checkpoint: one expert's tensors, FP8 and scales as stored),
drops the ones it no longer needs, and all ranks switch maps at the same step, between steps.

Replicas are the checkpoint's weights, so the outputs do not change because a placement
changed (up to the usual float32 summation order of products with other row counts)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors import safe_open

from pdserve.engine.ep.moe import ExpertParallel
from pdserve.engine.ep.placement import SlotMap
from pdserve.engine.fp8 import FP8, FP8Linear
from pdserve.engine.hf_loader import tensor_files
from pdserve.engine.llama import MLP
from pdserve.scheduler.eplb import gpu_loads, max_over_mean, rebalance_experts

if TYPE_CHECKING:
    from pdserve.engine.backend import Backend
    from pdserve.engine.deepseek import DeepseekV3ForCausalLM

log = logging.getLogger(__name__)


class ExpertReader:
    """One routed expert's weights, read from a Hugging Face checkpoint directory."""

    def __init__(self, path: Path, dtype: torch.dtype, backend: Backend) -> None:
        self.dtype, self.backend = dtype, backend
        # (layer, expert) -> {tensor name within the expert: file}, indexed once.
        self.index: dict[tuple[int, int], dict[str, Path]] = {}
        for key, f in tensor_files(path).items():
            parts = key.split(".", 6)  # model.layers.L.mlp.experts.E.<name>
            if len(parts) == 7 and parts[3:5] == ["mlp", "experts"]:
                self.index.setdefault((int(parts[2]), int(parts[5])), {})[parts[6]] = f

    def expert(self, layer: int, e: int, hidden: int, inter: int,
               block: tuple[int, int] | None) -> MLP:
        tensors: dict[str, torch.Tensor] = {}
        names = self.index[(layer, e)]
        for f in sorted(set(names.values())):  # each file opened once
            with safe_open(str(f), framework="pt") as st:
                tensors.update({n: st.get_tensor(f"model.layers.{layer}.mlp.experts.{e}.{n}")
                                for n, nf in names.items() if nf == f})
        mlp = MLP(hidden, inter)
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = tensors[f"{name}.weight"]
            if w.dtype == FP8:
                assert block is not None
                lin = FP8Linear.like(getattr(mlp, name), block)
                lin.weight.data, lin.weight_scale_inv.data = w, tensors[
                    f"{name}.weight_scale_inv"].float()
                setattr(mlp, name, lin)
            else:
                getattr(mlp, name).weight.data = w.to(self.dtype)
        mlp.requires_grad_(False)
        mlp.prepare(self.backend)
        return mlp


class LiveEPLB:
    def __init__(self, ep: ExpertParallel, model: DeepseekV3ForCausalLM, interval_steps: int,
                 reader: ExpertReader, num_nodes: int = 1) -> None:
        if interval_steps < 1:
            raise ValueError(f"--eplb-interval-steps must be >= 1 (got {interval_steps})")
        self.ep, self.model, self.interval = ep, model, interval_steps
        self.reader = reader
        self.num_nodes = num_nodes
        self.moe_layers = [m.layer for m in model.moe_layers()]
        self.counted = model.expert_counts.clone()
        self.last_step = 0
        self.rebalances = 0
        self.balance: tuple[float, float] | None = None  # max/mean load before, after
        self.received_at: list[int] = []  # this rank's received rows at each rebalance

    def due(self, step: int) -> bool:
        return step > self.last_step and step % self.interval == 0

    def rebalance(self, step: int) -> None:
        """Called by every rank at the same group step (a collective)."""
        self.last_step = step
        self.received_at.append(self.ep.stats.received_rows)
        window = (self.model.expert_counts - self.counted).to(torch.float64)
        self.counted = self.model.expert_counts.clone()
        dist.all_reduce(window, group=self.ep.comm.group)
        loads = window[self.moe_layers]                                     # [L_moe, E]
        old = self.ep.slots
        slots = len(old.phy2log[self.moe_layers[0]])
        cfg = self.model.config
        if self.ep.rank == 0:
            placement = rebalance_experts(loads.tolist(), slots, cfg.n_group, self.num_nodes,
                                          self.ep.comm.size)
            table = torch.tensor(placement.phy2log, dtype=torch.long)
        else:
            table = torch.empty(len(self.moe_layers), slots, dtype=torch.long)
        dist.broadcast(table, src=0, group=self.ep.comm.group)
        new = SlotMap.from_phy2log(table.tolist(), self.moe_layers, len(old.phy2log),
                                   old.num_experts, old.ep_size, old.local_first)
        self._move_weights(new)
        before, after = self._balance(loads, old), self._balance(loads, new)
        self.ep.slots = new  # every rank switches here, between the same two steps
        self.rebalances += 1
        self.balance = (before, after)
        log.info("experts rebalanced", extra={"step": step, "rank": self.ep.rank,
                                              "max_over_mean_before": round(before, 3),
                                              "max_over_mean_after": round(after, 3)})

    def _move_weights(self, new: SlotMap) -> None:
        cfg, rank = self.model.config, self.ep.rank
        for moe in self.model.moe_layers():
            need = set(new.held_at(moe.layer, rank))
            have = {int(e) for e in moe.experts}
            for e in sorted(need - have):
                moe.experts[str(e)] = self.reader.expert(moe.layer, e, cfg.hidden_size,
                                                         cfg.moe_intermediate_size,
                                                         cfg.fp8_block)
            for e in sorted(have - need):
                del moe.experts[str(e)]

    def _balance(self, loads: torch.Tensor, slots: SlotMap) -> float:
        """The worst layer's max/mean load over the ranks under `slots`."""
        worst = 1.0
        for row, layer in zip(loads.tolist(), self.moe_layers):
            p2l = list(slots.phy2log[layer])
            count = [p2l.count(e) for e in range(slots.num_experts)]
            worst = max(worst, max_over_mean(gpu_loads(row, p2l, count, slots.ep_size)))
        return worst
