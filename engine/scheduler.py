"""The engine's scheduler: which sequences wait, which run, and what the next step computes.

Policy (pure: no model, no threads; the clock is a parameter):
1. A pipeline stage's next chunk, when it can run and its stage has waited `stage_age_limit_s`
   since it reached this worker (oldest stage first).
2. Otherwise, when sequences wait and the batch has room: prompt chunks of several of them
   within a token budget (chunked prefill, first come first served). A sequence whose cached
   KV is still arriving runs only when no other is ready (`ready`): a step waits for the
   slowest fetch in it, and a slow store must not hold up prompts that need nothing from it.
3. Otherwise, a pipeline stage's next chunk, when it can run (oldest stage first). Stages run
   in the gaps between whole prompts: a pipelined prompt (a long one, over several workers)
   would otherwise stall all of them at once, every short prompt waiting behind it; the age
   limit keeps it from waiting for ever (scheduler/replay.py measures the trade).
4. Otherwise, prompts whose KV is still arriving (the step waits for it).
5. Otherwise, when sequences run: one decode step for up to `max_batch` of them.

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

STAGE_AGE_LIMIT_S = 20.0  # step 1 (scheduler/replay.py: CostModel.pipeline_age_limit_s)


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
    """First come first served chunked prefill: each sequence's next chunk, within `budget`
    tokens over all of them."""
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
                 stage_age_limit_s: float = STAGE_AGE_LIMIT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch <= 0 or max_prefill_tokens <= 0:
            raise ValueError(f"max_batch {max_batch} and max_prefill_tokens "
                             f"{max_prefill_tokens} must be positive")
        if stage_age_limit_s < 0:
            raise ValueError(f"stage_age_limit_s {stage_age_limit_s} must be >= 0")
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.ready = ready
        self.stage_age_limit_s = stage_age_limit_s
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stages: list[Sequence] = []

    # -- membership -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """A sequence with prompt left to compute (a stage: with a layer range)."""
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
        """A sequence whose prompt is done leaves the prefill queues."""
        (self.stages if seq.stage is not None else self.waiting).remove(seq)

    def drop_finished(self) -> None:
        self.running = [s for s in self.running if not s.finished]

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.stages)

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens still to compute, over the waiting sequences."""
        return sum(s.prefill_left for s in self.waiting)

    # -- the plan ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Whether `schedule` would plan a step now."""
        return bool(self.waiting or self.running
                    or any(self._stage_chunk(s) is not None for s in self.stages))

    def schedule(self) -> ScheduledBatch | None:
        chunks = [c for c in map(self._stage_chunk, self.stages) if c is not None]
        now = self.clock()
        for chunk in chunks:  # step 1
            stage = chunk.seq.stage
            assert stage is not None
            if now - stage.since >= self.stage_age_limit_s:
                return ScheduledBatch(BatchKind.STAGE, (chunk,))
        room = self.max_batch - len(self.running)
        candidates = list(self.waiting)[:room] if room > 0 else []
        ready = [s for s in candidates if self.ready(s)]
        plan = plan_chunks(ready, self.max_prefill_tokens)  # step 2
        if not plan and chunks:  # step 3
            return ScheduledBatch(BatchKind.STAGE, (chunks[0],))
        plan = plan or plan_chunks(candidates, self.max_prefill_tokens)  # step 4
        if plan:
            return ScheduledBatch(BatchKind.PREFILL, tuple(plan))
        if self.running:  # step 5
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
