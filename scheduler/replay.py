"""Trace replay on a simulated clock: the real balancer functions against simple policies.

A Mooncake-format trace (timestamp ms, input_length, output_length, hash_ids of 512-token
blocks) drives N prefill and M decode instances with a cost model:

- prefill of n new tokens after c cached ones takes  n / prefill_tps + attention_s * n * (c + n/2)
  seconds; each prefill instance computes a whole prompt without a break, in arrival order
  (the anchors' workers, as vLLM's and SGLang's by default), or, for `pdserve`, by deadline:
  arrival + `prefill_slack` x the prompt's own prefill time, earliest first (engine/scheduler.py
  does the same; 0: arrival order);
- `pdserve` prefills a prompt of at least `pipeline_min_tokens` new tokens (or of at least
  `pipeline_idle_tokens`, where that gives its first token sooner) as a pipeline over
  the instances the balancer picks (scheduler/balancers.py, plan_prefill_index; the workers do
  it as services/pipeline.py describes): each of G stages runs 1/G of the layers over the whole
  prompt, so takes 1/G of the time and work, chunk by chunk (chunks as the workers cut them,
  balancers.pipeline_chunk), a chunk once the stage before computed it and one hop passed,
  each chunk in the deadline order of its prompt (a stage's allowance is the slack times its
  own share of the prompt's time, 1/G of it: a long pipelined prompt lets shorter ones by,
  but only for so long); an overloaded instance defers
  its longest prompts not yet begun, as engine/scheduler.py's Deferral does (`defer_*`);
- a decode instance advances all its running requests one token per step; a step takes
  step_s + per_req_s * batch + per_kv_s * (KV tokens held);
- a global KV store of bounded capacity (LRU over blocks) holds each prefix block once a
  prefill computed it; a request's cached tokens are its leading stored blocks (never its last
  token); a request whose KV does not fit any decode instance it may use is rejected.

Policies: `pdserve` (DeepSeek's balancers, scheduler/balancers.py; ties go to the instance
where the prompt would wait least for work due before its deadline, from the queue profile a
worker reports, `due_ties`, then at random as a gateway breaks them, from `seed`),
`round_robin`,
`least_requests`, and the policies users of the anchors run, each from its documentation with
its defaults (the instance-local prefix they score is what that instance prefilled before,
Dynamo's from KV events once stored; or, for SGLang's and llm-d's approximate trees, what was
routed to it): `dynamo`, `llm_d`, `sglang`, `mooncake` (scheduler/anchors.py).


Per policy: TTFT p50/p99, hit share, rejected, and for every balanced quantity the max/mean
across instances averaged over 1-second windows (time-averaged outstanding prefill attention
work and tokens; decode KV tokens and requests).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdserve.scheduler.anchors import ANCHORS, anchor_decode, anchor_prefill
from pdserve.scheduler.balancers import (
    attention_work,
    pick_decode_index,
    pipeline_chunk,
    plan_prefill_index,
    work_ahead,
)
from pdserve.scheduler.instances import (
    CostModel,
    DecodeInstance,
    LRUStore,
    Meter,
    PrefillInstance,
    Stage,
)
from pdserve.scheduler.traces import BLOCK, TraceRequest

__all__ = ["POLICIES", "CostModel", "LRUStore", "pooled_reference", "simulate"]

POLICIES = ("pdserve", "round_robin", "least_requests", *ANCHORS)


def _usable_blocks(r: TraceRequest) -> int:
    """Leading blocks of a prompt that may come from the store: whole ones, never its last
    token (that one is computed for the first output token)."""
    return (r.input_length - 1) // BLOCK


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def pooled_reference(trace: Sequence[TraceRequest], n_prefill: int,
                     cost: CostModel = CostModel(), order: str = "deadline") -> dict[str, float]:
    """TTFT p50/p99/max of the prefills on one preemptive server `n_prefill` times as fast
    (work moves between instances for free and never waits behind a started prompt), every
    prompt's prefix a hit as far as any earlier arrival's blocks go (no store limit, nothing
    computed twice), in `order`: "deadline" (pdserve's workers': arrival + prefill_slack x
    the prompt's own time, earliest first) or "srpt" (shortest remaining work first). What a
    placement could reach at best with that order: a reference for the balancers, not a policy
    (SRPT's tail is the longest prompts', which wait for everything shorter)."""
    if order not in ("deadline", "srpt"):
        raise ValueError("order must be 'deadline' or 'srpt'")
    seen: set[int] = set()
    jobs: list[tuple[float, float]] = []  # (arrival, seconds on the pooled server)
    for r in trace:
        usable = min(_usable_blocks(r), len(r.hash_ids))
        hit = 0
        while hit < usable and r.hash_ids[hit] in seen:
            hit += 1
        seen.update(r.hash_ids)
        jobs.append((r.arrival_s, cost.prefill_s(hit * BLOCK, r.input_length - hit * BLOCK)
                     / n_prefill))
    jobs.sort(key=lambda j: j[0])
    ttft: list[float] = []
    queue: list[list[float]] = []  # [priority, seconds left, arrival]
    t, k = 0.0, 0
    while k < len(jobs) or queue:
        if not queue:
            t = max(t, jobs[k][0])
        while k < len(jobs) and jobs[k][0] <= t:
            a, s = jobs[k]
            pri = s if order == "srpt" else a + cost.prefill_slack * s * n_prefill
            heapq.heappush(queue, [pri, s, a])
            k += 1
        head = queue[0]
        arrival = jobs[k][0] if k < len(jobs) else math.inf
        if t + head[1] <= arrival:  # it finishes before the next arrival
            heapq.heappop(queue)
            t += head[1]
            ttft.append(t - head[2])
        else:  # it runs until the next arrival, which may take over
            head[1] -= arrival - t
            if order == "srpt":
                head[0] = head[1]
            t = arrival
    return {"ttft_p50_s": round(_pct(ttft, 0.5), 4), "ttft_p99_s": round(_pct(ttft, 0.99), 4),
            "ttft_max_s": round(max(ttft, default=0.0), 4)}


def simulate(trace: Sequence[TraceRequest], policy: str, n_prefill: int, n_decode: int,
             cost: CostModel = CostModel(), store_blocks: int = 0,
             dynamo_temperature: float = 0.0, seed: int = 0) -> dict[str, Any]:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}")
    rng = random.Random(seed)  # the anchors' random tie breaks and draws
    np_rng = np.random.default_rng(seed)  # pdserve's, as a gateway breaks ties (registry.py)
    prefills = [PrefillInstance() for _ in range(n_prefill)]
    decodes = [DecodeInstance() for _ in range(n_decode)]
    store = LRUStore(store_blocks)
    events: list[tuple[Any, ...]] = []
    seq = itertools.count()
    for i, r in enumerate(trace):
        heapq.heappush(events, (r.arrival_s, next(seq), "arrive", i, -1))
    meters = {k: Meter(n) for k, n in (("prefill_attention", n_prefill),
                                         ("prefill_tokens", n_prefill),
                                         ("decode_kv", n_decode), ("decode_requests", n_decode))}
    rr = itertools.count()
    ttft: list[float] = []
    decode_of: dict[int, int] = {}
    rejected = cached_total = input_total = 0
    done: set[int] = set()            # requests whose prefill is over
    computing: dict[int, int] = {}    # block -> the request computing it now (pdserve's waits)
    waited_on: set[int] = set()       # requests some other one waits for
    wait_blocks = -(-cost.prefix_wait_tokens // BLOCK) if policy == "pdserve" else 0

    def sample(t: float) -> None:
        meters["prefill_attention"].advance(t, [p.work for p in prefills])
        meters["prefill_tokens"].advance(t, [p.tokens for p in prefills])
        meters["decode_kv"].advance(t, [d.kv + d.reserved for d in decodes])
        meters["decode_requests"].advance(t, [len(d.running) for d in decodes])

    by_deadline = policy == "pdserve"

    def start_next(w: int, t: float) -> None:
        """Instance `w`, idle at `t`, starts its next piece of work, if any is ready."""
        p = prefills[w]
        if p.running is not None:
            return
        ready = [s for s in p.queue if s.ready(t, cost.pipeline_hop_s, done)]
        if not ready:
            return
        s = ready[0]  # first come first served
        if by_deadline:
            if cost.defer_share > 0 and cost.prefill_slack > 0:  # (in arrival order: none)
                p.defer(t, cost)
            s = min(ready, key=lambda x: x.rank(t))
        p.running, p.busy_until = s, t + s.piece_s
        heapq.heappush(events, (p.busy_until, next(seq), "piece_done", s.i, w))

    def step(d_idx: int, t: float) -> None:
        d = decodes[d_idx]
        if not d.running:
            d.stepping = False
            return
        d.stepping = True
        dt = cost.step_s + cost.per_req_s * len(d.running) + cost.per_kv_s * d.kv
        heapq.heappush(events, (t + dt, next(seq), "step", -1, d_idx))

    while events:
        t, _, kind, i, w = heapq.heappop(events)
        sample(t)
        if kind == "arrive":
            r = trace[i]
            usable = _usable_blocks(r)
            hit = store.prefix(r.hash_ids[:usable])
            after: set[int] = set()
            if wait_blocks:
                more, most = hit, min(usable, len(r.hash_ids))
                while more < most and r.hash_ids[more] in computing:  # an earlier one's now
                    after.add(computing[r.hash_ids[more]])
                    more += 1
                if more - hit >= wait_blocks:
                    hit = more
                    waited_on |= after
                else:
                    after = set()
            c = hit * BLOCK
            n = r.input_length - c
            need = r.input_length + r.output_length
            k = next(rr)
            # Decode choice.
            if policy == "pdserve":
                dj = pick_decode_index(
                    np.array([float(d.kv + d.reserved) for d in decodes]),
                    np.array([float(cost.decode_kv_tokens - d.kv - d.reserved) for d in decodes]),
                    np.array([float(len(d.running)) for d in decodes]), need, rng=np_rng)
            elif policy in ANCHORS:
                dj = anchor_decode(policy, decodes, need, cost, rng, dynamo_temperature)
            else:
                if policy == "round_robin":
                    dj = k % n_decode
                else:
                    dj = min(range(n_decode), key=lambda j: len(decodes[j].running))
                if cost.decode_kv_tokens - decodes[dj].kv - decodes[dj].reserved < need:
                    dj = None
            if dj is None:
                rejected += 1
                continue
            decodes[dj].reserved += need
            decode_of[i] = dj
            # Prefill choice.
            own_s = cost.prefill_s(c, n)
            deadline = r.arrival_s + cost.prefill_slack * own_s
            if policy == "pdserve":
                # ties go to the instance where the prompt would wait least for work due
                # before its deadline, from the profile a worker reports
                ahead = (work_ahead(np.array([p.due(t) for p in prefills]),
                                    np.full(n_prefill, deadline - t))
                         if cost.due_ties else None)
                plan = plan_prefill_index(np.array([p.work for p in prefills]),
                                          np.array([float(p.tokens) for p in prefills]), c, n,
                                          min_pipeline_tokens=cost.pipeline_min_tokens,
                                          max_stages=cost.pipeline_max_stages,
                                          rng=np_rng, ahead=ahead,
                                          idle_pipeline_tokens=cost.pipeline_idle_tokens,
                                          own_s=np.full(n_prefill, own_s))
            elif policy == "round_robin":
                pw = k % n_prefill
            elif policy == "least_requests":
                pw = min(range(n_prefill), key=lambda j: len(prefills[j].queue))
            else:
                pw = anchor_prefill(policy, prefills, r, usable, c, n, t, cost, rng,
                                     dynamo_temperature)
                if policy in ("sglang", "llm_d"):  # their trees learn from routing, not events
                    prefills[pw].served.update(r.hash_ids)
            if policy != "pdserve":
                plan = [pw]
            g = len(plan)
            if g > 1:  # each stage is due as slack x its own share of the prompt's time
                deadline = r.arrival_s + cost.prefill_slack * own_s / g
            stages: list[Stage] = []
            for s_idx, pw in enumerate(plan[1:] + plan[:1]):  # the head runs the last layers
                chunks = -(-n // pipeline_chunk(n, g, cost.pipeline_chunk_tokens)) if g > 1 else 1
                stages.append(Stage(i, pw, s_idx, stages, own_s / g,
                                     attention_work(c, n) / g, n / g, chunks, deadline,
                                     after=frozenset(after), arrival=r.arrival_s))
                prefills[pw].queue.append(stages[-1])
                if by_deadline:
                    prefills[pw].credit = min(cost.defer_burst,
                                              prefills[pw].credit + cost.defer_share)
                prefills[pw].work += stages[-1].work
                prefills[pw].tokens += stages[-1].tokens
                prefills[pw].active += r.input_length / g
            cached_total += c
            input_total += r.input_length
            if wait_blocks:  # later prompts may wait for the blocks it computes
                for b in r.hash_ids[hit: r.input_length // BLOCK]:
                    computing.setdefault(b, i)
            start_next(stages[0].w, t)
        elif kind == "wake":  # a pipeline chunk reached instance w
            start_next(w, t)
        elif kind == "piece_done":
            p = prefills[w]
            s = p.running
            assert s is not None and s.i == i
            p.running = None
            s.ends.append(t)
            s.left = max(0.0, s.left - s.piece_s)
            if s.stage + 1 < len(s.stages):  # the chunk goes on to the next stage
                heapq.heappush(events, (t + cost.pipeline_hop_s, next(seq), "wake", i,
                                        s.stages[s.stage + 1].w))
            if len(s.ends) < s.chunks:
                start_next(w, t)
                continue
            p.queue.remove(s)
            p.work -= s.work
            p.tokens -= s.tokens
            p.active -= trace[i].input_length / len(s.stages)
            start_next(w, t)
            if s.stage + 1 < len(s.stages):
                continue
            r = trace[i]
            store.add(r.hash_ids[: r.input_length // BLOCK])
            done.add(i)
            for b in r.hash_ids[: r.input_length // BLOCK]:
                if computing.get(b) == i:
                    del computing[b]
            if i in waited_on:  # the prompts that waited for its blocks may start
                waited_on.discard(i)
                for w2 in range(n_prefill):
                    start_next(w2, t)
            p.served.update(r.hash_ids)
            ttft.append(t - r.arrival_s)
            d = decodes[decode_of[i]]
            need = r.input_length + r.output_length
            d.reserved -= need
            d.kv += need
            d.running[i] = r.output_length - 1  # the first token came from prefill
            if not d.stepping:
                step(decode_of[i], t)
        else:  # decode step done
            d = decodes[w]
            for j in list(d.running):
                d.running[j] -= 1
                if d.running[j] <= 0:
                    del d.running[j]
                    r = trace[j]
                    d.kv -= r.input_length + r.output_length
            step(w, t)
    return {
        "policy": policy,
        "requests": len(trace),
        "ttft_p50_s": round(_pct(ttft, 0.5), 4),
        "ttft_p99_s": round(_pct(ttft, 0.99), 4),
        "ttft_max_s": round(max(ttft, default=0.0), 4),
        "hit_share": round(cached_total / input_total, 4) if input_total else 0.0,
        "rejected": rejected,
        "deferred": sum(p.deferred for p in prefills),
        "prefill_load_max_over_mean": round(meters["prefill_attention"].result(), 4),
        "prefill_tokens_max_over_mean": round(meters["prefill_tokens"].result(), 4),
        "decode_kv_max_over_mean": round(meters["decode_kv"].result(), 4),
        "decode_requests_max_over_mean": round(meters["decode_requests"].result(), 4),
    }
