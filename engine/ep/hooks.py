"""The step agreement of an EP group (the engine's `agree` hook, engine/hooks.py).

Collectives must line up: every engine step of every rank starts with one small all-gather of
each rank's planned tokens and step kind. No rank with work: no step, and no other collective.
Otherwise every rank steps; a rank with nothing planned runs an idle step, which joins every MoE
layer's exchanges with no tokens of its own and computes its experts for the others' tokens.
Every `--eplb-interval-steps` steps the experts are rebalanced first (eplb.py). The group's
expert products are a decode step's when every working rank's batch is a decode
batch, a prefill's otherwise, so the same rows get the same products on whichever rank."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from pdserve.engine.ep.moe import ExpertParallel
from pdserve.engine.hooks import EngineHooks
from pdserve.engine.scheduler import BatchKind, ScheduledBatch
from pdserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from pdserve.engine.deepseek import DeepseekV3ForCausalLM
    from pdserve.engine.ep.eplb import LiveEPLB

_KINDS = {None: 0, BatchKind.PREFILL: 1, BatchKind.DECODE: 2}


class EPHooks(EngineHooks):
    def __init__(self, ep: ExpertParallel, model: DeepseekV3ForCausalLM,
                 eplb: LiveEPLB | None = None, inner: EngineHooks | None = None,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        """`inner`: a worker's own hooks (its CPU turns taken by rank 0 for the group);
        `on_failure`: what a failed collective does (by default it raises)."""
        self.ep = ep
        self.model = model
        self.eplb = eplb
        self.inner = inner or EngineHooks()
        self.on_failure = on_failure
        self.steps = 0       # steps the group took (the same on every rank)
        self.idle_steps = 0  # of them, steps this rank joined with nothing of its own

    def ready(self, seq: Sequence) -> bool:
        return self.inner.ready(seq)

    def before_layer(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        return self.inner.before_layer(batch)

    def settle(self, seq: Sequence) -> int | None:
        return self.inner.settle(seq)

    def turn(self, kind: BatchKind) -> contextlib.AbstractContextManager[None]:
        """One CPU turn per group, not per rank: rank 0 takes the worker's turn, and the
        others, held in lockstep by the group's collectives, compute inside it (ranks taking
        turns one at a time would never meet in a collective)."""
        return self.inner.turn(kind) if self.ep.rank == 0 else contextlib.nullcontext()

    def group_steps(self) -> int:
        return self.steps

    def agree(self, batch: ScheduledBatch | None) -> ScheduledBatch | None:
        try:
            return self._agree(batch)
        except RuntimeError as e:  # a collective failed: a rank is gone or timed out
            if self.on_failure is None:
                raise
            self.on_failure(e)
            return None

    def _agree(self, batch: ScheduledBatch | None) -> ScheduledBatch | None:
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
