"""One request's state inside an engine, and what a step reports about it.

A sequence is one of three kinds, by what the engine does with it:
- a whole request (the single-process engine, and a decode worker's requests once their KV has
  landed): prefilled, then decoded until it finishes; the engine frees its pages at the end;
- a prefill-only prompt (`stop_after_prefill`, a prefill worker's): it leaves the engine once
  its first token is sampled, and its pages stay with the caller, which still sends them;
- a pipeline stage (`stage`, services/prefill/pipeline.py): layers [lo, hi) of a prompt, chunk
  by chunk, each chunk's hidden states out (or, on the last layers, the first token).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.engine.kv_pool import PageId
from pdserve.engine.sampling import FinishReason, SamplingParams

__all__ = ["EngineEvent", "FailedEvent", "FinishEvent", "FinishReason", "HiddenEvent",
           "Sequence", "StageWork", "TokenEvent"]


@dataclass
class StageWork:
    """A pipeline stage's part of a prompt: layers [layer_begin, layer_end), in chunks of
    `chunk_tokens` (the first stage cuts the prompt itself) or as the previous stage's hidden
    states arrive in `inputs` ((begin position, hidden [n, D]), appended by another thread)."""

    layer_begin: int
    layer_end: int
    chunk_tokens: int
    inputs: deque[tuple[int, torch.Tensor]] = field(default_factory=deque)
    begun: bool = False  # a chunk of it was planned

    @property
    def first(self) -> bool:
        return self.layer_begin == 0


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    pages: list[PageId] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_computed: int = 0  # prompt tokens whose KV is in the pages
    # A prefill worker's prompt: it leaves the engine once its first token is sampled, and the
    # caller, not the engine, frees its pages (it still sends them to a decode worker).
    stop_after_prefill: bool = False
    stage: StageWork | None = None  # a pipeline stage's layer range (implies the above)
    # The scheduler's order for its prompt (engine/scheduler.py): when its prefill is due,
    # and when its first chunk was planned (a prompt once started keeps its place).
    deadline: float = 0.0
    allowance: float = 0.0  # deadline - arrival (0: no estimate, first come first served)
    arrival: float | None = None  # when it reached the worker (None: when the scheduler got it)
    started_at: float | None = None
    # Set when an overloaded worker deferred it (engine/scheduler.py, Deferral): its arrival
    # plus the deferral's wait, when it goes first.
    deferred_until: float | None = None
    # A prefill worker's prompt that takes its pages only when the scheduler calls it
    # (`parked` until the caller has them and its cached KV is on its way): `on_call` runs
    # once, on the engine thread, when its turn is near.
    parked: bool = False
    on_call: Callable[[], None] | None = None
    called: bool = False

    @property
    def order(self) -> float:
        """Its place in the prefill order: the deadline, or the start if earlier."""
        return self.deadline if self.started_at is None else min(self.deadline, self.started_at)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def keeps_pages(self) -> bool:
        """The caller frees this sequence's pages after it leaves the engine."""
        return self.stop_after_prefill or self.stage is not None

    @property
    def prefill_left(self) -> int:
        return len(self.prompt) - self.num_computed


# -- what a step reports ---------------------------------------------------------------------
@dataclass(frozen=True)
class TokenEvent:
    """A new token of a sequence; `finish_reason` set when it was the last."""

    request_id: str
    token: int
    finish_reason: FinishReason | None
    logprob: float | None = None


@dataclass(frozen=True)
class FinishEvent:
    """A sequence ended without a new token (it joined already finished, or was aborted)."""

    request_id: str
    reason: FinishReason


@dataclass(frozen=True)
class HiddenEvent:
    """A pipeline stage's output for one chunk: hidden states [n, D] of positions begin.."""

    request_id: str
    begin: int
    hidden: torch.Tensor


@dataclass(frozen=True)
class FailedEvent:
    """The step that ran this sequence failed; the sequence left the engine."""

    request_id: str
    error: str


EngineEvent = TokenEvent | FinishEvent | HiddenEvent | FailedEvent
