"""One request's state inside an engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.kv_pool import PageId
from pdserve.engine.sampling import SamplingParams


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    pages: list[PageId] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    num_computed: int = 0  # prompt tokens whose KV is in the pages

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
