"""The step agreement of an EP group (the engine's `agree` hook, engine/hooks.py).

Collectives must line up: every engine step of every rank starts with one small all-gather of
each rank's planned tokens and step kind. No rank with work: no step, and no other collective.
Otherwise every rank steps; a rank with nothing planned runs an idle step, which joins every MoE
layer's exchanges with no tokens of its own and computes its experts for the others' tokens.
Every `--eplb-interval-steps` steps the experts are rebalanced first (eplb.py). The group's
expert products are a decode step's when every working rank's batch is a decode
batch, a prefill's otherwise, so the same rows get the same products on whichever rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.engine.ep.moe import ExpertParallel
from pdserve.engine.hooks import EngineHooks
from pdserve.engine.scheduler import BatchKind, ScheduledBatch

if TYPE_CHECKING:
    from pdserve.engine.deepseek import DeepseekV3ForCausalLM
    from pdserve.engine.ep.eplb import LiveEPLB

_KINDS = {None: 0, BatchKind.PREFILL: 1, BatchKind.DECODE: 2}


class EPHooks(EngineHooks):
    def __init__(self, ep: ExpertParallel, model: DeepseekV3ForCausalLM,
                 eplb: LiveEPLB | None = None) -> None:
        self.ep = ep
        self.model = model
        self.eplb = eplb
        self.steps = 0       # steps the group took (the same on every rank)
        self.idle_steps = 0  # of them, steps this rank joined with nothing of its own

    def agree(self, batch: ScheduledBatch | None) -> ScheduledBatch | None:
        if batch is not None and batch.kind not in _KINDS:
            raise ValueError(f"an EP group does not run {batch.kind.value} batches")
        if self.eplb is not None and self.eplb.due(self.steps):
            self.eplb.rebalance(self.steps)  # between two steps, at the same one on every rank
        mine = [0 if batch is None else batch.num_tokens,
                _KINDS[None if batch is None else batch.kind]]
        plans = self.ep.comm.gather_ints(mine)
        working = [kind for tokens, kind in plans if tokens > 0]
        if not working:
            return None
        self.steps += 1
        self.ep.decode_products = all(kind == _KINDS[BatchKind.DECODE] for kind in working)
        if batch is None:
            self.idle_steps += 1
            self.model.idle_step()
            return None
        return batch
