"""Token sampling: greedy, temperature, top-k, top-p; reproducible per request and position;
optional log-probability of the chosen token."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class FinishReason(str, enum.Enum):
    """Why a sequence ended (the wire names of `finish_reason`)."""

    STOP = "stop"      # a stop token (or, at the gateway, a stop string)
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"    # the client or the caller ended it


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int = 0
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    top_k: int = 0        # 0 = no limit
    top_p: float = 1.0    # nucleus mass kept; 1 = no limit
    logprobs: bool = False
    position_offset: int = 0  # output position of this request's first token (migration)
    min_tokens: int = 0       # the stop tokens cannot be drawn before this many outputs

    def holds_stops(self, index: int) -> bool:
        """Whether output position `index` (this request's) may not draw a stop token."""
        return bool(self.stop_token_ids) and index + self.position_offset < self.min_tokens


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Masks logits outside the top-k and the top-p nucleus (both keep at least one token)."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Picks the token at output position `index` from logits [vocab].

    The random stream is seeded by (seed, index), so the prefill worker (token 0) and a decode
    worker (tokens 1..) draw exactly what one process would.
    """
    if params.holds_stops(index):  # min_tokens: as vLLM, the stop tokens are masked
        logits = logits.clone()
        logits[sorted(params.stop_token_ids)] = float("-inf")
    if params.temperature <= 0.0:
        return int(torch.argmax(logits).item())
    gen = torch.Generator(device="cpu")
    index += params.position_offset
    gen.manual_seed((params.seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
    scaled = _filter(logits.float().cpu() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def logprob_of(logits: torch.Tensor, token: int) -> float:
    """Log-probability of `token` under the model's raw distribution (before temperature)."""
    return float(torch.log_softmax(logits.float(), dim=-1)[token].item())


def finish_reason(token: int, num_generated: int,
                  params: SamplingParams) -> FinishReason | None:
    """STOP on a stop token, LENGTH at max_tokens, else None (keep going)."""
    if token in params.stop_token_ids:
        return FinishReason.STOP
    if num_generated >= params.max_tokens:
        return FinishReason.LENGTH
    return None
