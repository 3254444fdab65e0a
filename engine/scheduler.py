"""The engine's scheduler: which sequences wait, which run, and what the next step computes.

Policy (pure: no model, no threads; the clock is a parameter):

Prompts (whole ones and pipeline stages) go earliest deadline first, a prompt's deadline
being when it arrived plus `prefill_slack` times its own prefill time (its new tokens and
their attention over the cached prefix, at the rate this worker's prefill steps measured):
a short prompt passes a long one that came shortly before it, but a long one is passed only
until its deadline, so nothing waits for ever. 0 is first come first served. In a queue that
builds up (more prompt work arriving than the workers compute), arrival order makes every
prompt wait as long as the queue, the shortest included; by deadline the short ones (most of
them) wait little and the longest wait longer: on the synthetic trace p99 TTFT falls from
35.4 to 29.6 s and the median from 0.60 to 0.08 s, while the longest wait grows from 40 to
107 s (a 135k-token prompt that takes 29 s itself; scheduler/replay.py, README's Scheduler).
`due` tells the gateway how long a new prompt would wait here, in that order.

1. When sequences wait and the batch has room: prompt chunks of several of them within a
   token budget (chunked prefill), by deadline; a pipeline stage's next chunk first if its
   prompt's deadline is earlier. A prompt once started keeps its place (from then on it counts
   as due when it started, if that is earlier): a prompt passed halfway would have waited for
   nothing.
   A sequence whose cached KV is still arriving runs only when no other is ready (`ready`): a
   step waits for the slowest fetch in it, and a slow store must not hold up prompts that
   need nothing from it.
2. Otherwise, a pipeline stage's next chunk, when it can run (earliest deadline first).
3. Otherwise, prompts whose KV is still arriving (the step waits for it).
4. Otherwise, when sequences run: one decode step for up to `max_batch` of them.

    waiting ──prefill chunks──> (prompt done) ──> running ──decode steps──> finished
       │                              └── stop_after_prefill: leaves with its first token
    stages ──one chunk per step──> (last chunk) ──> leaves
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pdserve.engine.sequence import Sequence
from pdserve.scheduler.balancers import due_profile, prefill_work

PREFILL_SLACK = 3.0  # deadline = arrival + this x own prefill time (replay: CostModel)


class PrefillRate:
    """How fast this worker prefills, in tokens' worth of work per second, from its own steps:
    a decaying sum of work over a decaying sum of seconds, so that a step that computed
    little weighs little and the estimate follows the load."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.work = 0.0
        self.seconds = 0.0

    def observe(self, work: float, seconds: float) -> None:
        if work > 0 and seconds > 0:
            self.work = self.work * self.decay + work
            self.seconds = self.seconds * self.decay + seconds

    @property
    def per_second(self) -> float:
        """Tokens' worth of work a second (0 before any step)."""
        return self.work / self.seconds if self.seconds else 0.0

    def seconds_for(self, work: float) -> float:
        """The time `work` takes at the rate measured so far (0 before any step)."""
        return work * self.seconds / self.work if self.work else 0.0


class BatchKind(enum.Enum):
    PREFILL = "prefill"  # prompt chunks of several sequences, every layer
    STAGE = "stage"      # one chunk of one pipeline stage, its layer range
    DECODE = "decode"    # one new token for each running sequence


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `seq` from position `start` (for decode: its last token)."""

    seq: Sequence
    start: int
    num_tokens: int
    hidden: torch.Tensor | None = None  # a stage's input: the previous stage's output

    @property
    def tokens(self) -> list[int]:
        s = self.seq
        if self.start >= len(s.prompt):  # a decode step
            return [s.last_token]
        return s.prompt[self.start:self.start + self.num_tokens]

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def completes_prompt(self) -> bool:
        return self.end == len(self.seq.prompt)


@dataclass(frozen=True)
class ScheduledBatch:
    kind: BatchKind
    chunks: tuple[ScheduledChunk, ...]

    @property
    def seqs(self) -> list[Sequence]:
        return [c.seq for c in self.chunks]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def plan_chunks(seqs: Iterable[Sequence], budget: int) -> list[ScheduledChunk]:
    """Chunked prefill in the given order: each sequence's next chunk, within `budget` tokens
    over all of them."""
    plan: list[ScheduledChunk] = []
    for seq in seqs:
        if budget <= 0:
            break
        n = min(seq.prefill_left, budget)
        if n > 0:
            plan.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
    return plan


def _always_ready(seq: Sequence) -> bool:
    return True


class Scheduler:
    def __init__(self, max_batch: int = 64, max_prefill_tokens: int = 2048,
                 ready: Callable[[Sequence], bool] = _always_ready,
                 prefill_slack: float = PREFILL_SLACK,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch <= 0 or max_prefill_tokens <= 0:
            raise ValueError(f"max_batch {max_batch} and max_prefill_tokens "
                             f"{max_prefill_tokens} must be positive")
        if not prefill_slack >= 0:
            raise ValueError(f"prefill_slack {prefill_slack} must be >= 0")
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.ready = ready
        self.prefill_slack = prefill_slack
        self.rate = PrefillRate()
        self.num_late = 0  # prompts (and stages) whose prefill ended after their deadline
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stages: list[Sequence] = []

    # -- membership -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """A sequence with prompt left to compute (a stage: with a layer range); its deadline
        is set now. A stage's is its whole prompt's, as on one worker, the same on every
        stage's worker."""
        seq.allowance = self.prefill_slack * self.rate.seconds_for(
            prefill_work(seq.num_computed, seq.prefill_left))
        seq.deadline = self.clock() + seq.allowance
        (self.stages if seq.stage is not None else self.waiting).append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose prompt KV is in its pages and first token sampled: decode it."""
        self.running.append(seq)

    def remove(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running, self.stages):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    return seq
        return None

    def remove_prefilled(self, seq: Sequence) -> None:
        """A sequence whose prompt is done leaves the prefill queues (counted in `num_late`
        if after a deadline that had an estimate: not in arrival order, nor before the
        worker's first prefill step measured its rate)."""
        (self.stages if seq.stage is not None else self.waiting).remove(seq)
        if seq.allowance > 0 and self.clock() > seq.deadline:
            self.num_late += 1

    def drop_finished(self) -> None:
        self.running = [s for s in self.running if not s.finished]

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.stages)

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens still to compute, over the waiting sequences."""
        return sum(s.prefill_left for s in self.waiting)

    def due(self, num_layers: int) -> list[float]:
        """The prefill queued here as balancers.due_profile: the seconds of it due within each
        horizon from now, in this scheduler's order, at the measured rate (a stage: its
        layers' share; all 0 before the first measured step). What a new prompt would wait
        for, for the gateway; safe to call from another thread (it reads copies of the
        queues)."""
        now = self.clock()
        items = []
        for seq in (*list(self.waiting), *list(self.stages)):
            seconds = self.rate.seconds_for(prefill_work(seq.num_computed, seq.prefill_left))
            if seq.stage is not None:
                seconds *= (seq.stage.layer_end - seq.stage.layer_begin) / num_layers
            items.append((seq.order - now, seconds))
        return due_profile(items)

    # -- the plan ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Whether `schedule` would plan a step now."""
        return bool(self.waiting or self.running
                    or any(self._stage_chunk(s) is not None for s in self.stages))

    def schedule(self) -> ScheduledBatch | None:
        chunks = [c for c in map(self._stage_chunk, self.stages) if c is not None]
        stage = min(chunks, key=lambda c: c.seq.order) if chunks else None  # stable
        room = self.max_batch - len(self.running)
        candidates = sorted(self.waiting, key=lambda s: s.order)[:room] if room > 0 else []
        ready = [s for s in candidates if self.ready(s)]
        if stage is not None and (not ready or stage.seq.order < ready[0].order):
            return ScheduledBatch(BatchKind.STAGE, (stage,))  # steps 1 and 2
        plan = plan_chunks(ready, self.max_prefill_tokens)  # step 1
        if not plan and stage is not None:  # step 2
            return ScheduledBatch(BatchKind.STAGE, (stage,))
        plan = plan or plan_chunks(candidates, self.max_prefill_tokens)  # step 3
        if plan:
            now = self.clock()
            for c in plan:  # a prompt once started is not passed (as the replay's, whole)
                if c.seq.started_at is None:
                    c.seq.started_at = now
            return ScheduledBatch(BatchKind.PREFILL, tuple(plan))
        if self.running:  # step 4
            return ScheduledBatch(BatchKind.DECODE, tuple(
                ScheduledChunk(s, s.num_tokens - 1, 1) for s in self.running[:self.max_batch]))
        return None

    @staticmethod
    def _stage_chunk(seq: Sequence) -> ScheduledChunk | None:
        stage = seq.stage
        assert stage is not None
        if stage.first:
            n = min(stage.chunk_tokens, seq.prefill_left)
            return ScheduledChunk(seq, seq.num_computed, n) if n > 0 else None
        if not stage.inputs:
            return None
        begin, hidden = stage.inputs[0]
        return ScheduledChunk(seq, begin, hidden.shape[0], hidden)
