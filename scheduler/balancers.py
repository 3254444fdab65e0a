"""Prefill and decode load balancers (DESIGN §5), pure functions over load snapshots.

Both pick the worker that minimises the *resulting maximum* of two normalised loads, where a
load is normalised by the cluster mean after the assignment. The mean after assignment is the
same whichever worker is picked, so each objective reduces to the resulting max; we compute
them in O(n) from the top two values, vectorised with numpy (1,000 workers well under 1 ms).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


def request_pages(block_tokens: int, prompt_tokens: int, max_tokens: int) -> int:
    """KV pages a request reserves up front on its decode worker: KV is stored for every token
    but the last generated one. The gateway places with it, the decode worker reserves with it."""
    return -(-(prompt_tokens + max_tokens - 1) // block_tokens)


def attention_work(cached: int, new: int) -> float:
    """Core-attention cost of computing `new` tokens after `cached` ones: each new token attends
    to the cached prefix and, causally, to half the new tokens on average."""
    return new * (cached + new / 2)


# A unit of attention work in tokens' worth of prefill time: the replay's cost model's ratio
# (attention_s x prefill_tps); it matters for long prompts only.
ATTENTION_PER_TOKEN = 2.4e-5


def prefill_work(cached: int, new: int) -> float:
    """A prompt's prefill in tokens' worth of work: its new tokens and their attention."""
    return new + ATTENTION_PER_TOKEN * attention_work(cached, new)


# What a prefill worker reports of its queue, for the tie between equally balanced workers:
# the seconds of prefill due (in its earliest-deadline order) within each of these horizons
# from the report. A new prompt waits for the work due before its own deadline, not for the
# whole queue: a long prompt due in a minute does not hold up a short one due in a second.
DUE_HORIZONS_S = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, math.inf)


def due_profile(items: Iterable[tuple[float, float]]) -> list[float]:
    """(due in seconds from now, seconds of work) pieces -> the seconds of work due within
    each of DUE_HORIZONS_S, cumulative (the last is all of it)."""
    out = [0.0] * len(DUE_HORIZONS_S)
    for due, seconds in items:
        out[bisect.bisect_left(DUE_HORIZONS_S, due)] += seconds
    for k in range(1, len(out)):
        out[k] += out[k - 1]
    return out


def work_ahead(profiles: np.ndarray, due: np.ndarray) -> np.ndarray:
    """Per row of `due_profile`s [n, H], the seconds due within that row's `due` seconds
    (linear between horizons): how long a prompt due then would wait there for work due
    before it. Vectorised: a gateway's thousand workers in microseconds."""
    horizons = np.asarray(DUE_HORIZONS_S)
    k = np.clip(np.searchsorted(horizons, due, side="right") - 1, 0, len(horizons) - 2)
    lo, hi = horizons[k], horizons[k + 1]
    rows = np.arange(len(profiles))
    at_lo, at_hi = profiles[rows, k], profiles[rows, k + 1]
    frac = np.where(np.isinf(hi), 0.0, (due - lo) / np.where(np.isinf(hi), 1.0, hi - lo))
    result: np.ndarray = at_lo + (at_hi - at_lo) * np.clip(frac, 0.0, 1.0)
    return result


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


def _pick_min_max(loads_a: np.ndarray, add_a: float, loads_b: np.ndarray, add_b: float,
                  allowed: np.ndarray, rng: np.random.Generator | None = None,
                  prefer: np.ndarray | None = None) -> int | None:
    """Index minimising max(resulting max of a / mean a, resulting max of b / mean b); ties go
    to the lowest `prefer` (when given), then to the lower current normalised load, then to a
    random one of those (`rng`; without it, the lowest index). O(n), vectorised.

    Random, not lowest-index: several gateways placing on the same loads between two reports
    would otherwise all pick the same worker, and a burst through N gateways would land N
    requests on it before any report says so."""
    n = len(loads_a)
    if not allowed.any():
        return None
    mean_a = (loads_a.sum() + add_a) / n or 1.0
    mean_b = (loads_b.sum() + add_b) / n or 1.0

    def resulting_max(loads: np.ndarray, add: float) -> np.ndarray:
        # max over workers after adding `add` to worker i: the larger of its new load and the
        # largest other load (the second largest where i holds the largest).
        top = int(np.argmax(loads))
        first = loads[top]
        second = np.max(np.delete(loads, top)) if n > 1 else -np.inf
        others = np.full(n, first)
        others[top] = second
        result: np.ndarray = np.maximum(loads + add, others)
        return result

    score = np.maximum(resulting_max(loads_a, add_a) / mean_a,
                       resulting_max(loads_b, add_b) / mean_b)
    tie = loads_a / mean_a + loads_b / mean_b
    score = np.where(allowed, score, np.inf)
    best = score.min()
    candidates = np.flatnonzero(score <= best)
    if prefer is not None:
        first = prefer[candidates]
        candidates = candidates[first <= first.min()]
    least = tie[candidates]
    candidates = candidates[least <= least.min()]
    if rng is None or len(candidates) == 1:
        return int(candidates[0])
    return int(candidates[rng.integers(len(candidates))])


def pick_prefill_index(attention: np.ndarray, tokens: np.ndarray, cached: int,
                       new: int, allowed: np.ndarray | None = None,
                       rng: np.random.Generator | None = None,
                       ahead: np.ndarray | None = None) -> int | None:
    """Array form of pick_prefill: queued attention work and tokens per worker -> row
    (`allowed`: rows that may be picked; default all; `rng`: random tie breaks; `ahead`: the
    seconds this prompt would wait on each row for work due before it (work_ahead), which
    breaks ties between rows the balance cannot tell apart)."""
    if len(attention) == 0:
        return None
    ok = np.ones(len(attention), dtype=bool) if allowed is None else allowed
    return _pick_min_max(attention, attention_work(cached, new), tokens, float(new), ok, rng,
                         ahead)


def pipeline_chunk(new: int, stages: int, most: int, least: int = 256) -> int:
    """Tokens per chunk of a pipelined prefill: G stages over k chunks take (k + G - 1) / k of
    the ideal time, so at least 4 chunks per stage, within [least, most] (the worker's prefill
    chunk) tokens."""
    return int(_chunk_tokens(new, np.asarray(stages), most, least))


def _chunk_tokens(new: int, stages: np.ndarray, most: int, least: int) -> np.ndarray:
    result: np.ndarray = np.maximum(1, np.minimum(most, np.maximum(least,
                                                                   -(-new // (4 * stages)))))
    return result


def pipeline_seconds(own_s: np.ndarray, new: int, stages: np.ndarray, most: int = 4096,
                     least: int = 256) -> np.ndarray:
    """A prompt of `own_s` seconds on one instance, pipelined over `stages` (arrays, element by
    element): each stage takes 1/G of it, and the last stage's first chunk waits for the G - 1
    stages before it: (k + G - 1) / k of the ideal with k chunks (pipeline_chunk's sizes)."""
    g = np.maximum(stages, 1)  # one stage: (k + 0) / k, its own time
    k = -(-new // _chunk_tokens(new, g, most, least))
    result: np.ndarray = own_s / g * (k + g - 1) / k
    return result


def soonest_pipeline(ahead: np.ndarray, own_s: np.ndarray, rows: np.ndarray, single: int,
                     new: int, limit: int) -> list[int]:
    """The rows (of `rows`, at most `limit`) over which a prompt's first token comes soonest:
    the G rows where it would wait least (`ahead`, seconds of work due before it), G
    minimising the longest wait among them plus its pipelined time (pipeline_seconds, on the
    slowest of them); `single` alone unless that beats its own wait plus its whole time."""
    order = rows[np.argsort(ahead[rows], kind="stable")][:limit]
    wait = np.maximum.accumulate(ahead[order])
    slowest = np.maximum.accumulate(own_s[order])
    finish = wait + pipeline_seconds(slowest, new, np.arange(1, len(order) + 1))
    best = int(np.argmin(finish)) + 1
    if best < 2 or finish[best - 1] >= ahead[single] + own_s[single]:
        return [single]
    # Stages in the order they can start: the head, which runs the last layers and starts
    # last anyway, is the one with the longest wait.
    chosen = [int(r) for r in order[:best]]
    return chosen[-1:] + chosen[:-1]


def plan_prefill_index(attention: np.ndarray, tokens: np.ndarray, cached: int, new: int,
                       allowed: np.ndarray | None = None, min_pipeline_tokens: int = 0,
                       max_stages: int = 0, rng: np.random.Generator | None = None,
                       ahead: np.ndarray | None = None, idle_pipeline_tokens: int = 0,
                       own_s: np.ndarray | None = None) -> list[int]:
    """Rows that prefill the request: one row, or, for a prompt with at least
    `min_pipeline_tokens` new tokens (0: never), a pipeline of G rows that each run 1/G of the
    layers over the whole prompt and so take 1/G of its attention work and token volume
    (Mooncake's chunked pipeline parallelism, services/pipeline.py). The stages are the G
    least loaded rows; G, up to `max_stages` (0: every allowed row), minimises the highest
    normalised load among them once each has its share (the request is done when its slowest
    stage is), the smallest G on ties. The first row is the head (the least loaded), which
    runs the last layers and owns the result. A prompt with fewer new tokens, but at least
    `idle_pipeline_tokens` (0: none), goes over the rows where its first token comes soonest
    (`soonest_pipeline`, from `ahead` and `own_s`, the seconds the whole prompt takes on each
    row), or, without those estimates, over the rows with nothing queued, when there are two
    or more (at most `max_stages`; the head first, then in row order). Empty when no row is
    allowed."""
    n = len(attention)
    ok = np.ones(n, dtype=bool) if allowed is None else allowed
    single = pick_prefill_index(attention, tokens, cached, new, ok, rng, ahead)
    if single is None:
        return []
    rows = np.flatnonzero(ok)
    limit = len(rows) if max_stages <= 0 else min(max_stages, len(rows))
    if not min_pipeline_tokens or limit < 2:
        return [single]
    if new < min_pipeline_tokens:
        if not idle_pipeline_tokens or new < idle_pipeline_tokens:
            return [single]
        # A shorter prompt goes where its first token comes soonest: the rows' time free
        # before its deadline shortens it and takes nothing from work due earlier.
        if ahead is not None and own_s is not None and bool((own_s[rows] > 0).all()):
            return soonest_pipeline(ahead, own_s, rows, single, new, limit)
        idle = rows[(attention[rows] <= 0) & (tokens[rows] <= 0)]
        if len(idle) < 2 or single not in idle:
            return [single]
        return [single] + [int(r) for r in idle if r != single][:limit - 1]
    work = attention_work(cached, new)
    mean_a = (attention.sum() + work) / n or 1.0
    mean_b = (tokens.sum() + new) / n or 1.0
    norm = np.maximum(attention / mean_a, tokens / mean_b)
    # Least loaded first, stable: equal loads keep row order.
    order = rows[np.argsort(norm[rows], kind="stable")]
    g = np.arange(1, limit + 1)
    # Highest load among the first G rows after each takes 1/G: the loads are sorted, so it
    # is the G-th row's (its own share is the same as every other stage's).
    a_sorted, b_sorted = attention[order[:limit]], tokens[order[:limit]]
    peak_a = np.maximum.accumulate(a_sorted) + work / g
    peak_b = np.maximum.accumulate(b_sorted) + new / g
    score = np.maximum(peak_a / mean_a, peak_b / mean_b)
    best_g = int(np.flatnonzero(score <= score.min() * (1 + 1e-9))[0]) + 1
    return [single] if best_g == 1 else [int(r) for r in order[:best_g]]


def pick_decode_index(used: np.ndarray, free: np.ndarray, running: np.ndarray,
                      pages_needed: int, allowed: np.ndarray | None = None,
                      rng: np.random.Generator | None = None) -> int | None:
    """Array form of pick_decode: used / free pages and running requests per worker -> row."""
    if len(used) == 0:
        return None
    ok = free >= pages_needed
    return _pick_min_max(used, float(pages_needed), running, 1.0,
                         ok if allowed is None else ok & allowed, rng)


def pick_prefill(cands: Sequence[PrefillCandidate], cached: int, new: int) -> str | None:
    """Worker for a request with `cached` cached and `new` uncached prompt tokens."""
    i = pick_prefill_index(np.array([c.queued_attention for c in cands], dtype=float),
                           np.array([c.queued_tokens for c in cands], dtype=float), cached, new)
    return None if i is None else cands[i].worker_id


def pick_decode(cands: Sequence[DecodeCandidate], pages_needed: int) -> str | None:
    """Worker for a request needing `pages_needed` KV pages; None when none can hold it."""
    i = pick_decode_index(np.array([c.used_pages for c in cands], dtype=float),
                          np.array([c.free_pages for c in cands], dtype=float),
                          np.array([c.running for c in cands], dtype=float), pages_needed)
    return None if i is None else cands[i].worker_id
