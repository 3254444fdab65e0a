"""The engine's scheduler: which sequences wait, which run, and what the next step computes.

Policy (pure: no model, no threads; the clock is a parameter):

Prompts (whole ones and pipeline stages) go earliest deadline first, a prompt's deadline
being when it arrived plus `prefill_slack` times its own prefill time (its new tokens and
their attention over the cached prefix, at the rate this worker's prefill steps measured; a
pipeline stage: its layers' share of that, the time it takes here): a short prompt passes a
long one that came shortly before it, but a long one is passed only until its deadline, so
nothing waits for ever. 0 is first come first served. In a queue that builds up (more prompt
work arriving than the workers compute), arrival order makes every prompt wait as long as
the queue, the shortest included; by deadline the short ones (most of them) wait little and
the longest wait longer: on the synthetic trace (no deferrals) the median TTFT falls from
0.50 to 0.07 s and p99 from 33.8 to 32.2 s, while the longest wait grows from 38 to 45 s
(scheduler/replay.py, README's Scheduler). `due` tells the gateway how long a new prompt
would wait here, in that order.

Overload (`Deferral`): while the earliest-due prompt here would end more than `lateness_s`
after its deadline, the worker defers its longest prompt not yet begun (if that one takes
`lateness_s` or more itself): it goes after every prompt not deferred until it has waited
`max_wait_s` since its arrival, and then before all of them. At most `share` of the prompts
admitted are deferred (a bucket that fills by `share` a prompt, up to `burst`), and none
while a deferred prompt whose wait is over still waits, so a long overload cannot defer
everyone and bring them all back at once. A few long prompts wait longer so that the many
behind them do not: on the synthetic trace p99 TTFT falls from 32.2 to 21.4 s (0.60x the
best anchor's) while the longest wait grows from 45 to 110 s.

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

A prefill worker's prompt joins the order on arrival but takes its KV pages only when its
turn is near (`Sequence.parked`; `_call`): about one step's prompt tokens before it would run,
the scheduler calls it, the worker reserves its pages and starts fetching its cached prefix,
and `unpark` lets it run. Until then it holds no pages, so a prompt that waits long (behind
earlier-due ones, or deferred) does not keep them from the prompts that run first (as vLLM's
and SGLang's schedulers allocate KV blocks when they schedule a request, not when it
arrives).

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


@dataclass(frozen=True)
class Deferral:
    """When an overloaded worker defers its longest prompts (the module's docstring)."""

    share: float = 0.02        # of the prompts admitted, at most this many deferred (0: never)
    lateness_s: float = 5.0    # overloaded: the earliest-due prompt would end this late
    max_wait_s: float = 100.0  # a deferred prompt goes first once it has waited this long
    burst: float = 5.0         # deferrals banked at most (the bucket's size)

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:
            raise ValueError(f"deferral share {self.share} must be within [0, 1]")
        if not (self.lateness_s >= 0 and self.max_wait_s > 0 and self.burst >= 1):
            raise ValueError(f"deferral lateness_s {self.lateness_s} must be >= 0, max_wait_s "
                             f"{self.max_wait_s} > 0 and burst {self.burst} >= 1")


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
                 clock: Callable[[], float] = time.monotonic,
                 deferral: Deferral = Deferral(), num_layers: int = 0) -> None:
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
        self.deferral = deferral
        self.num_layers = num_layers  # the model's (a stage's share of a prompt's time)
        self.num_deferred = 0  # prompts (and stages) deferred (Deferral)
        self._credit = 0.0     # deferrals allowed now
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stages: list[Sequence] = []

    # -- membership -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """A sequence with prompt left to compute (a stage: with a layer range); its deadline
        is set now, counted from its arrival (`seq.arrival`: when it reached the worker, which
        may have waited for pages before; else now). A pipeline stage's allowance is the slack
        times its own share of the prompt's time (its layers' share), as it takes that long
        here: a prompt pipelined over G workers is as patient as one of 1/G of its length."""
        seq.allowance = self.prefill_slack * self.seconds_left(seq)
        seq.deadline = (self.clock() if seq.arrival is None else seq.arrival) + seq.allowance
        (self.stages if seq.stage is not None else self.waiting).append(seq)
        self._credit = min(self.deferral.burst, self._credit + self.deferral.share)
        self._call()

    def allowance(self, work: float) -> float:
        """How long after its arrival a prompt of `work` (balancers.prefill_work) is due:
        `prefill_slack` times its own time at the measured rate (0 before any step)."""
        return self.prefill_slack * self.rate.seconds_for(work)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose prompt KV is in its pages and first token sampled: decode it."""
        self.running.append(seq)

    def remove(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running, self.stages):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._call()
                    return seq
        return None

    def unpark(self, request_id: str, num_computed: int) -> bool:
        """A called prompt has its pages, KV of positions < `num_computed` in them (or on its
        way: `ready`): it runs in its turn from now on. False if it is not here (aborted)."""
        for seq in self.waiting:
            if seq.request_id == request_id and seq.parked:
                seq.parked = False
                seq.num_computed = num_computed
                return True
        return False

    def _call(self) -> None:
        """Calls the parked prompts (Sequence.parked) whose turn is near: in the prefill
        order, while less than a step's prompt tokens (`max_prefill_tokens`) are ahead of them
        among the prompts that have pages or were called. So a prompt takes its pages (and
        fetches its cached prefix) about a step before it runs, not when it arrives, and one
        that waits (behind others, or deferred) holds none meanwhile."""
        if not any(q.parked and not q.called for q in self.waiting):
            return  # (every step calls this: no sort when nobody waits to be called)
        now = self.clock()
        ahead = 0
        for seq in sorted(self.waiting, key=lambda q: self._rank(q, now)):
            if seq.parked and not seq.called:
                if ahead >= self.max_prefill_tokens:
                    return
                seq.called = True
                if seq.on_call is not None:
                    seq.on_call()
            ahead += seq.prefill_left

    def remove_prefilled(self, seq: Sequence) -> None:
        """A sequence whose prompt is done leaves the prefill queues (counted in `num_late`
        if after a deadline that had an estimate: not in arrival order, nor before the
        worker's first prefill step measured its rate)."""
        (self.stages if seq.stage is not None else self.waiting).remove(seq)
        if seq.allowance > 0 and self.clock() > seq.deadline:
            self.num_late += 1
        self._call()

    def drop_finished(self) -> None:
        self.running = [s for s in self.running if not s.finished]

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.stages)

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens still to compute, over the waiting sequences."""
        return sum(s.prefill_left for s in self.waiting)

    def seconds_left(self, seq: Sequence) -> float:
        """Its prompt's time still to compute here at the measured rate (a stage: its layers'
        share of the model's `num_layers`; 0 before the first measured step)."""
        seconds = self.rate.seconds_for(prefill_work(seq.num_computed, seq.prefill_left))
        if seq.stage is not None and self.num_layers:
            seconds *= (seq.stage.layer_end - seq.stage.layer_begin) / self.num_layers
        return seconds

    def due(self) -> list[float]:
        """The prefill queued here as balancers.due_profile: the seconds of it due within each
        horizon from now, in this scheduler's order (a deferred prompt: when it goes first),
        at the measured rate (`seconds_left`; all 0 before the first measured step). What a
        new prompt would wait for, for the gateway; safe to call from another thread (it
        reads copies of the queues)."""
        now = self.clock()
        items = []
        for seq in (*list(self.waiting), *list(self.stages)):
            due = seq.order if seq.deferred_until is None else seq.deferred_until
            items.append((due - now, self.seconds_left(seq)))
        return due_profile(items)

    def _rank(self, seq: Sequence, now: float) -> tuple[int, float]:
        """Its place in the prefill order: by `order`, deferred ones after the others until
        their wait is over, and then first."""
        if seq.deferred_until is None:
            return (0, seq.order)
        return (-1, seq.deferred_until) if now >= seq.deferred_until else (1, seq.order)

    def _defer(self, now: float) -> None:
        """While the earliest-due prompt (or stage) not deferred would end more than
        `lateness_s` late and the bucket allows, defer the longest one not yet begun, if its
        own time is `lateness_s` or more (Deferral); none while a deferred one whose wait is
        over still waits (the overload outlasted it: more would come back later, together)."""
        d = self.deferral
        while self._credit >= 1:
            queued = (*self.waiting, *self.stages)
            if any(q.deferred_until is not None and q.deferred_until <= now for q in queued):
                return  # the overload outlasted a deferral's wait: more would come back later
            pending = [q for q in queued if q.deferred_until is None and q.allowance > 0]
            if not pending:
                return
            head = min(pending, key=lambda q: q.order)
            if now + self.seconds_left(head) - head.deadline <= d.lateness_s:
                return
            # (a prompt shorter than the lateness is not worth it: it would wait long for
            # little; a stage's prompt counts whole)
            idle = [q for q in pending if q.started_at is None
                    and (q.stage is None or not q.stage.begun)
                    and self.rate.seconds_for(prefill_work(q.num_computed, q.prefill_left))
                    >= d.lateness_s]
            if not idle:
                return
            longest = max(idle, key=lambda q: q.allowance)  # the latest due
            longest.deferred_until = longest.deadline - longest.allowance + d.max_wait_s
            self._credit -= 1
            self.num_deferred += 1

    # -- the plan ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Whether `schedule` would plan a step now."""
        return bool(any(not s.parked for s in self.waiting) or self.running
                    or any(self._stage_chunk(s) is not None for s in self.stages))

    def schedule(self) -> ScheduledBatch | None:
        now = self.clock()
        if self.deferral.share > 0:
            self._defer(now)
        self._call()  # the work ahead shrank, or a deferral moved a prompt back
        chunks = [c for c in map(self._stage_chunk, self.stages) if c is not None]
        stage = (min(chunks, key=lambda c: self._rank(c.seq, now))  # stable
                 if chunks else None)
        room = self.max_batch - len(self.running)
        candidates = (sorted((s for s in self.waiting if not s.parked),
                             key=lambda s: self._rank(s, now))[:room] if room > 0 else [])
        ready = [s for s in candidates if self.ready(s)]
        if stage is not None and (
                not ready or self._rank(stage.seq, now) < self._rank(ready[0], now)):
            return self._stage_batch(stage)  # steps 1 and 2
        plan = plan_chunks(ready, self.max_prefill_tokens)  # step 1
        if not plan and stage is not None:  # step 2
            return self._stage_batch(stage)
        plan = plan or plan_chunks(candidates, self.max_prefill_tokens)  # step 3
        if plan:
            for c in plan:  # a prompt once started is not passed (as the replay's, whole)
                if c.seq.started_at is None:
                    c.seq.started_at = now
            return ScheduledBatch(BatchKind.PREFILL, tuple(plan))
        if self.running:  # step 4
            return ScheduledBatch(BatchKind.DECODE, tuple(
                ScheduledChunk(s, s.num_tokens - 1, 1) for s in self.running[:self.max_batch]))
        return None

    @staticmethod
    def _stage_batch(chunk: ScheduledChunk) -> ScheduledBatch:
        assert chunk.seq.stage is not None
        chunk.seq.stage.begun = True
        return ScheduledBatch(BatchKind.STAGE, (chunk,))

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
