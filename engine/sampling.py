"""Token sampling: greedy and temperature, reproducible per request and per position."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int = 0
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Pick the token at output position `index` from logits [vocab].

    The random stream is seeded by (seed, index), so the prefill worker (token 0) and a decode
    worker (tokens 1..) draw exactly what one process would.
    """
    if params.temperature <= 0.0:
        return int(torch.argmax(logits).item())
    gen = torch.Generator(device="cpu")
    gen.manual_seed((params.seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def finish_reason(token: int, num_generated: int, params: SamplingParams) -> str | None:
    """'stop' on a stop token, 'length' at max_tokens, else None (keep going)."""
    if token in params.stop_token_ids:
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None
