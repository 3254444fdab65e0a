"""Prefill and decode load balancers (DESIGN §5), pure functions over load snapshots.

Both pick the worker that minimises the *resulting maximum* of two normalised loads, where a
load is normalised by the cluster mean after the assignment. The mean after assignment is the
same whichever worker is picked, so each objective reduces to the resulting max; we compute
them in O(n) from the top two values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def attention_work(cached: int, new: int) -> float:
    """Core-attention cost of computing `new` tokens after `cached` ones: each new token attends
    to the cached prefix and, causally, to half the new tokens on average."""
    return new * (cached + new / 2)


@dataclass(frozen=True)
class PrefillCandidate:
    worker_id: str
    queued_attention: float
    queued_tokens: int


@dataclass(frozen=True)
class DecodeCandidate:
    worker_id: str
    used_pages: int
    free_pages: int
    running: int


def _top2(values: Sequence[float]) -> tuple[float, int, float]:
    """(max, argmax, second max)."""
    best, arg, second = float("-inf"), -1, float("-inf")
    for i, v in enumerate(values):
        if v > best:
            best, arg, second = v, i, best
        elif v > second:
            second = v
    return best, arg, second


def _pick_min_max(loads_a: Sequence[float], add_a: float,
                  loads_b: Sequence[float], add_b: float,
                  allowed: Sequence[bool]) -> int | None:
    n = len(loads_a)
    mean_a = (sum(loads_a) + add_a) / n or 1.0
    mean_b = (sum(loads_b) + add_b) / n or 1.0
    max_a, arg_a, second_a = _top2(loads_a)
    max_b, arg_b, second_b = _top2(loads_b)
    best: tuple[float, float, int] | None = None
    for i in range(n):
        if not allowed[i]:
            continue
        res_a = max(loads_a[i] + add_a, second_a if i == arg_a else max_a)
        res_b = max(loads_b[i] + add_b, second_b if i == arg_b else max_b)
        score = (max(res_a / mean_a, res_b / mean_b), loads_a[i] / mean_a + loads_b[i] / mean_b, i)
        if best is None or score < best:
            best = score
    return None if best is None else best[2]


def pick_prefill(cands: Sequence[PrefillCandidate], cached: int, new: int) -> str | None:
    """Worker for a request with `cached` cached and `new` uncached prompt tokens."""
    if not cands:
        return None
    i = _pick_min_max([c.queued_attention for c in cands], attention_work(cached, new),
                      [float(c.queued_tokens) for c in cands], float(new),
                      [True] * len(cands))
    return None if i is None else cands[i].worker_id


def pick_decode(cands: Sequence[DecodeCandidate], pages_needed: int) -> str | None:
    """Worker for a request needing `pages_needed` KV pages; None when none can hold it."""
    if not cands:
        return None
    i = _pick_min_max([float(c.used_pages) for c in cands], float(pages_needed),
                      [float(c.running) for c in cands], 1.0,
                      [c.free_pages >= pages_needed for c in cands])
    return None if i is None else cands[i].worker_id
