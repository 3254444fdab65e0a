"""The step agreement of an EP group (the engine's `agree` hook, engine/hooks.py).

Collectives must line up: every engine step of every rank starts with one small all-gather of
each rank's planned tokens and step kind. No rank with work: no step, and no other collective.
Otherwise every rank steps; a rank with nothing planned runs an idle step, which joins every MoE
layer's exchanges with no tokens of its own and computes its experts for the others' tokens.
Every `--eplb-interval-steps` steps the experts are rebalanced first (eplb.py). The group's
expert products are a decode step's when every working rank's batch is a decode
batch, a prefill's otherwise, so the same rows get the same products on whichever rank.

The agreement also carries each rank's vote on two-batch overlap (tbo.py): a working rank votes
yes when `--tbo on` and its batch splits into two non-empty halves (two tokens or more), or,
`--tbo auto`, when it also has `--tbo-min-tokens` tokens or more; an idle rank does not object
(it runs two empty halves). The group overlaps the step only when no rank objects."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from pdserve.engine.ep.comm import EPComm
from pdserve.engine.ep.moe import ExpertParallel
from pdserve.engine.errors import EPError
from pdserve.engine.hooks import EngineHooks
from pdserve.engine.scheduler import BatchKind, ScheduledBatch
from pdserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from pdserve.engine.deepseek import DeepseekV3ForCausalLM
    from pdserve.engine.ep.eplb import LiveEPLB

_KINDS = {None: 0, BatchKind.PREFILL: 1, BatchKind.DECODE: 2}
TBO_MODES = ("off", "on", "auto")


def tbo_vote(mode: str, min_tokens: int, tokens: int) -> bool:
    """A rank's vote on overlapping this step with `tokens` of its own (0: idle)."""
    if mode == "off":
        return False
    if tokens == 0:
        return True
    return tokens >= 2 and (mode == "on" or tokens >= min_tokens)


def check_same_flags(comm: EPComm, flags: dict[str, str]) -> None:
    """At start-up: every rank of the group was started with the same values of `flags` (the
    settings whose collectives or arithmetic must match), else EPError naming the flag."""
    mine = [zlib.crc32(value.encode()) for value in flags.values()]
    everyone = comm.gather_ints(mine)
    for i, (flag, value) in enumerate(flags.items()):
        differ = [r for r, theirs in enumerate(everyone) if theirs[i] != mine[i]]
        if differ:
            raise EPError(f"{flag}: the ranks of the EP group disagree (rank {comm.rank} has "
                          f"{value!r}, ranks {differ} another value); start them all alike")


class EPHooks(EngineHooks):
    def __init__(self, ep: ExpertParallel, model: DeepseekV3ForCausalLM,
                 eplb: LiveEPLB | None = None, inner: EngineHooks | None = None,
                 on_failure: Callable[[BaseException], None] | None = None,
                 tbo: str = "off", tbo_min_tokens: int = 0) -> None:
        """`inner`: a worker's own hooks (its CPU turns taken by rank 0 for the group);
        `on_failure`: what a failed collective does (by default it raises); `tbo`,
        `tbo_min_tokens`: two-batch overlap, off, on or auto above that many tokens."""
        if tbo not in TBO_MODES:
            raise ValueError(f"--tbo {tbo!r}: one of {', '.join(TBO_MODES)}")
        self.ep = ep
        self.model = model
        self.eplb = eplb
        self.inner = inner or EngineHooks()
        self.on_failure = on_failure
        self.steps = 0       # steps the group took (the same on every rank)
        self.idle_steps = 0  # of them, steps this rank joined with nothing of its own
        self.overlapped_steps = 0  # of them, steps run as two micro-batches
        self.tbo, self.tbo_min_tokens = tbo, tbo_min_tokens

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
        tokens = 0 if batch is None else batch.num_tokens
        mine = [tokens, _KINDS[None if batch is None else batch.kind],
                int(tbo_vote(self.tbo, self.tbo_min_tokens, tokens))]
        plans = self.ep.comm.gather_ints(mine)
        working = [kind for tokens, kind, _ in plans if tokens > 0]
        if not working:
            return None
        self.steps += 1
        self.ep.decode_products = all(kind == _KINDS[BatchKind.DECODE] for kind in working)
        self.ep.overlap = all(vote for _, _, vote in plans)
        self.overlapped_steps += self.ep.overlap
        if batch is None:
            self.idle_steps += 1
            self.model.idle_step()
            return None
        return batch
