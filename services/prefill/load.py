"""What a prefill worker reports to the gateway's prefill balancer (scheduler/balancers.py): the
core-attention work and the prompt tokens it has accepted and not finished, and how many
requests (and pipeline stages) it holds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class PrefillLoad:
    queued_tokens: int = 0
    queued_attention: float = 0.0
    in_flight: int = 0

    @contextlib.contextmanager
    def charge(self, tokens: int, attention: float) -> Iterator[None]:
        """Counts a request's work while it runs (its share, for a pipeline's head or stage)."""
        self.queued_tokens += tokens
        self.queued_attention += attention
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.queued_tokens -= tokens
            self.queued_attention -= attention
