"""The placement policies users of the anchors run, for the replay (scheduler/replay.py), each
from its documentation with its defaults. The instance-local prefix they score is what that
instance prefilled before (Dynamo's from KV events once stored; for SGLang's and llm-d's
approximate trees, what was routed to it):

- `dynamo`: NVIDIA Dynamo's KV router: cost = overlap weight (1.0) x prefill blocks (the
  instance's active prompt tokens + this prompt's tokens it does not hold, in blocks) + decode
  blocks (the instance's active KV blocks); lowest wins, or with `dynamo_temperature` > 0 a
  softmax over the costs (normalised) draws it. Decode instances by the same cost (no prefix).
- `llm_d`: llm-d's default scorer mix, max score wins (ties at random): prefix-cache-scorer
  (weight 3: share of the prompt's blocks the instance holds), kv-cache-utilization-scorer
  (weight 2: 1 - KV use), queue-scorer (weight 2: queue length min-max normalised, shorter
  higher). Decode instances by the KV and queue scorers.
- `sglang`: SGLang's cache-aware router (`cache_threshold` 0.3, `balance_abs_threshold` 64,
  `balance_rel_threshold` 1.5): shortest queue while the loads are imbalanced (both
  thresholds exceeded), else the instance with the longest prefix match if its match rate
  exceeds the threshold, else the one with the least cached (smallest tree). Decode instances:
  `power_of_two` (the less loaded of two drawn at random).
- `mooncake`: Mooncake's Conductor: the prefill instance with the lowest estimated TTFT (its
  queue's remaining time + this prompt's prefill after the cached prefix), the decode instance
  with the lowest estimated step time.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Container, Iterable, Sequence
from typing import TYPE_CHECKING

from pdserve.scheduler.traces import BLOCK, TraceRequest

if TYPE_CHECKING:
    from pdserve.scheduler.instances import CostModel, DecodeInstance, PrefillInstance

ANCHORS = ("dynamo", "llm_d", "sglang", "mooncake")
SGLANG_CACHE_THRESHOLD, SGLANG_BALANCE_ABS, SGLANG_BALANCE_REL = 0.3, 64, 1.5
LLM_D_WEIGHTS = {"prefix": 3.0, "kv": 2.0, "queue": 2.0}
DYNAMO_OVERLAP_WEIGHT = 1.0


def _prefix_match(served: Container[int], hash_ids: Iterable[int]) -> int:
    """Leading blocks of a request an instance has served before (cache affinity)."""
    return sum(1 for _ in itertools.takewhile(lambda b: b in served, hash_ids))


def _min_max_scores(values: Sequence[float]) -> list[float]:
    """llm-d's queue-scorer: lower is better, min-max normalised to [0, 1] (all 1 when equal)."""
    lo, hi = min(values), max(values)
    return [1.0 if hi == lo else (hi - v) / (hi - lo) for v in values]


def _draw(costs: Sequence[float], allowed: Sequence[int], temperature: float,
          rng: random.Random) -> int:
    """Dynamo's worker selection: the lowest cost, or with a temperature a softmax over the
    negated costs normalised by their range."""
    if temperature <= 0:
        return min(allowed, key=lambda j: (costs[j], j))
    cs = [costs[j] for j in allowed]
    span = (max(cs) - min(cs)) or 1.0
    weights = [math.exp(-(c - min(cs)) / span / temperature) for c in cs]
    return rng.choices(list(allowed), weights)[0]


def anchor_prefill(policy: str, prefills: list[PrefillInstance], r: TraceRequest, usable: int,
                    c: int, n: int, t: float, cost: CostModel, rng: random.Random,
                    temperature: float) -> int:
    """The prefill instance an anchor's policy picks (module docstring)."""
    ids = r.hash_ids[:usable]
    held = [_prefix_match(p.served, ids) for p in prefills]  # instance-local prefix, blocks
    idx = range(len(prefills))
    if policy == "dynamo":
        costs = [DYNAMO_OVERLAP_WEIGHT * (p.tokens + r.input_length - h * BLOCK) / BLOCK
                 + p.active / BLOCK for p, h in zip(prefills, held)]
        return _draw(costs, idx, temperature, rng)
    if policy == "llm_d":
        queue = _min_max_scores([len(p.queue) for p in prefills])
        kv = [1.0 - min(1.0, p.active / cost.decode_kv_tokens) for p in prefills]
        w = LLM_D_WEIGHTS
        scores = [w["prefix"] * h / max(1, len(ids)) + w["kv"] * k + w["queue"] * q
                  for h, k, q in zip(held, kv, queue)]
        best = max(scores)
        return rng.choice([j for j in idx if scores[j] == best])
    if policy == "sglang":
        loads = [len(p.queue) for p in prefills]
        if (max(loads) - min(loads) > SGLANG_BALANCE_ABS
                and max(loads) > SGLANG_BALANCE_REL * min(loads)):
            return min(idx, key=lambda j: (loads[j], j))
        best = max(idx, key=lambda j: (held[j], -j))
        if held[best] * BLOCK / r.input_length > SGLANG_CACHE_THRESHOLD:
            return best
        return min(idx, key=lambda j: (len(prefills[j].served), j))  # the smallest tree
    assert policy == "mooncake"
    return min(idx, key=lambda j: (prefills[j].wait(t) + cost.prefill_s(c, n), j))


def anchor_decode(policy: str, decodes: list[DecodeInstance], need: int, cost: CostModel,
                   rng: random.Random, temperature: float) -> int | None:
    """The decode instance an anchor's policy picks among those with room for `need`."""
    room = [j for j, d in enumerate(decodes)
            if cost.decode_kv_tokens - d.kv - d.reserved >= need]
    if not room:
        return None
    if policy == "dynamo":
        return _draw([(d.kv + d.reserved + need) / BLOCK for d in decodes], room,
                     temperature, rng)
    if policy == "llm_d":
        queue = _min_max_scores([len(decodes[j].running) for j in room])
        scores = [LLM_D_WEIGHTS["kv"] * (1.0 - (decodes[j].kv + decodes[j].reserved)
                                         / cost.decode_kv_tokens)
                  + LLM_D_WEIGHTS["queue"] * q for j, q in zip(room, queue)]
        best = max(scores)
        return rng.choice([j for j, sc in zip(room, scores) if sc == best])
    if policy == "sglang":  # power of two choices
        a, b = (rng.sample(room, 2) if len(room) > 1 else (room[0], room[0]))
        return min((a, b), key=lambda j: (len(decodes[j].running), j))
    assert policy == "mooncake"
    return min(room, key=lambda j: (cost.step_s + cost.per_req_s * len(decodes[j].running)
                                    + cost.per_kv_s * decodes[j].kv, j))
