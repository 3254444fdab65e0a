from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from pdserve.scheduler.replay import POLICIES, CostModel, simulate
from pdserve.scheduler.traces import TraceRequest, load_trace


def spaced_trace():
    """Three conversations; arrivals 100 s apart, so every prefill is done before the next."""
    reqs = []
    t = 0.0
    for turn in range(3):
        for conv in range(3):
            blocks = tuple(range(conv * 100, conv * 100 + 2 + turn))  # the prefix grows per turn
            reqs.append(TraceRequest(t, 512 * len(blocks) + 100, 5, blocks))
            t += 100.0
    return reqs


def ideal_hit_share(trace):
    seen, hit, total = set(), 0, 0
    for r in trace:
        usable = min(r.input_length // 512, (r.input_length - 1) // 512)
        n = 0
        while n < usable and r.hash_ids[n] in seen:
            n += 1
        hit += 512 * n
        total += r.input_length
        seen.update(r.hash_ids[: r.input_length // 512])
    return hit / total


@pytest.mark.parametrize("policy", POLICIES)
def test_hit_share_equals_the_ideal_with_an_unbounded_store(policy):
    trace = spaced_trace()
    r = simulate(trace, policy, 2, 2)
    assert r["hit_share"] == pytest.approx(ideal_hit_share(trace), abs=1e-4)
    assert r["rejected"] == 0 and r["requests"] == 9


def test_ttft_follows_the_cost_model():
    cost = CostModel(prefill_tps=1000.0, attention_s=0.0)
    r = simulate([TraceRequest(0.0, 1000, 3, (1,))], "pdserve", 1, 1, cost)
    assert r["ttft_p50_s"] == pytest.approx(1.0)


def test_requests_that_fit_no_decode_instance_are_rejected():
    cost = CostModel(decode_kv_tokens=2000)
    trace = [TraceRequest(0.0, 1500, 10, (1, 2)), TraceRequest(0.1, 1500, 10, (3, 4))]
    # The first holds 1,510 of 2,000 tokens on its instance until it finishes.
    assert simulate(trace, "pdserve", 1, 1, cost)["rejected"] == 1
    assert simulate(trace, "pdserve", 1, 2, cost)["rejected"] == 0
    assert simulate(trace, "round_robin", 1, 2, cost)["rejected"] == 0


def test_balancer_spreads_a_burst_by_attention_work():
    # One huge and several small requests at once: ours keeps the small ones off the busy
    # instance; round robin puts every other one behind the huge prefill.
    trace = [TraceRequest(0.0, 60_000, 2, ())] + [
        TraceRequest(0.001 * i, 2_000, 2, ()) for i in range(1, 9)]
    ours = simulate(trace, "pdserve", 2, 2)
    rr = simulate(trace, "round_robin", 2, 2)
    assert ours["ttft_p50_s"] < rr["ttft_p50_s"]
    assert ours["prefill_tokens_max_over_mean"] <= rr["prefill_tokens_max_over_mean"]


def test_a_long_prompt_is_pipelined_over_the_idle_instances():
    from dataclasses import replace

    cost = CostModel()
    trace = [TraceRequest(0.0, 64_000, 2, ())]
    t = cost.prefill_s(0, 64_000)
    alone = simulate(trace, "pdserve", 4, 1, replace(cost, pipeline_min_tokens=0))
    piped = simulate(trace, "pdserve", 4, 1, cost)
    assert alone["ttft_p50_s"] == pytest.approx(t, abs=1e-3)
    # Four stages of a quarter of the layers start together; each later stage finishes one
    # chunk (32 chunks of at most 2,048 tokens, the worker's prefill chunk) and one hop after
    # the stage before it.
    lag = t / 4 / 32 + cost.pipeline_hop_s
    assert piped["ttft_p50_s"] == pytest.approx(t / 4 + 3 * lag, abs=1e-3)
    # One instance holds all the work alone; the pipeline spreads it.
    assert alone["prefill_load_max_over_mean"] > 3.9
    assert piped["prefill_load_max_over_mean"] < 1.3
    # Round robin never pipelines.
    assert simulate(trace, "round_robin", 4, 1, cost)["ttft_p50_s"] == pytest.approx(t, abs=1e-3)


def test_pipeline_stages_wait_for_their_instance_and_the_stage_before():
    """Stage 0 of a pipelined prompt waits for its instance; the head's stage, on an idle
    instance, starts with it and ends one chunk after it."""
    cost = CostModel(prefill_tps=1000.0, attention_s=0.0, pipeline_min_tokens=2000,
                     pipeline_chunk_tokens=1000, pipeline_hop_s=0.0)
    trace = [TraceRequest(0.0, 500, 2, ()), TraceRequest(0.01, 4000, 2, ())]
    r = simulate(trace, "pdserve", 2, 2, cost)
    # Request 0 holds instance 0 until 0.5 s. Request 1 is split over both (the slowest stage
    # at 1.11 of the mean load, against 1.97 alone on instance 1), head on the idle instance 1:
    # stage 0 runs 0.5 -> 2.5 s on instance 0; the head starts at 0.5 and ends one chunk
    # (2 s / 8 chunks of 500 tokens) after stage 0: 2.75 s, so TTFT 2.74 s against 4 s alone.
    assert r["ttft_p99_s"] == pytest.approx(2.74)


def test_a_mid_sized_prompt_goes_where_its_first_token_comes_soonest():
    """A 3,000-token prompt (3 s on one instance) below pipeline_min_tokens but above the
    idle threshold: on two idle instances it is pipelined; behind a short wait too; behind
    a long one it goes alone to the free instance."""
    from dataclasses import replace

    cost = CostModel(prefill_tps=1000.0, attention_s=0.0, pipeline_min_tokens=10_000,
                     pipeline_idle_tokens=2000, pipeline_chunk_tokens=1000, pipeline_hop_s=0.0)
    alone = [TraceRequest(0.0, 3000, 2, ())]
    # Two stages of 1.5 s in chunks of 375 tokens (pipeline_chunk: at least 4 per stage, at
    # least 256 tokens): the head ends one chunk (0.1875 s) after stage 0.
    assert simulate(alone, "pdserve", 2, 2, cost)["ttft_p50_s"] == pytest.approx(1.6875)
    off = replace(cost, pipeline_idle_tokens=0)
    assert simulate(alone, "pdserve", 2, 2, off)["ttft_p50_s"] == pytest.approx(3.0)
    # Instance 0 busy with a 500-token prompt until 0.5 s: stage 0 runs on instance 1 from
    # 0.01 s, the head on instance 0 from 0.5 s, chunk by chunk after it: done at 2.0 s.
    busy = [TraceRequest(0.0, 500, 2, ()), TraceRequest(0.01, 3000, 2, ())]
    assert simulate(busy, "pdserve", 2, 2, cost)["ttft_max_s"] == pytest.approx(1.99)
    # Busy with 1,900 tokens until 1.9 s: 1.89 + 1.69 s is later than 3 s alone on instance 1.
    long_wait = [TraceRequest(0.0, 1900, 2, ()), TraceRequest(0.01, 3000, 2, ())]
    assert simulate(long_wait, "pdserve", 2, 2, cost)["ttft_max_s"] == pytest.approx(3.0)


def test_short_prompts_pass_a_pipelined_one_until_its_deadline():
    """An 8,000-token prompt pipelined over both instances (two stages of 4 s, chunks of
    0.5 s), two 500-token prompts arriving at 1.2 s, one per instance."""
    from dataclasses import replace

    cost = CostModel(prefill_tps=1000.0, attention_s=0.0, pipeline_min_tokens=2000,
                     pipeline_chunk_tokens=1000, pipeline_hop_s=0.0)
    trace = [TraceRequest(0.0, 8000, 2, ()), TraceRequest(1.2, 500, 2, ()),
             TraceRequest(1.2, 500, 2, ())]
    # Deadlines (slack 3): the long prompt 0 + 3 x 8 s, the short ones 1.2 + 3 x 0.5 s. They
    # run at the next chunk boundary (1.5 s) and take 0.5 s: TTFT 0.8 s; the pipelined
    # prompt ends 0.5 s later than alone (4 s + one chunk behind stage 0: 4.5 s).
    r = simulate(trace, "pdserve", 2, 2, cost)
    assert (r["ttft_p50_s"], r["ttft_max_s"]) == (pytest.approx(0.8), pytest.approx(5.0))
    # In arrival order (slack 0), or once the long prompt's deadline came before theirs
    # (slack 0.1: 0.8 s against 1.25 s), they wait for its stages: the one behind stage 0
    # from 4 s, the one behind the head from 4.5 s.
    for late in (replace(cost, prefill_slack=0.0), replace(cost, prefill_slack=0.1)):
        r = simulate(trace, "pdserve", 2, 2, late)
        assert (r["ttft_p50_s"], r["ttft_max_s"]) == (pytest.approx(3.8), pytest.approx(4.5))
    # The replay's default is the workers' (engine/scheduler.py, the prefill setting).
    from pdserve.config import PrefillSettings
    from pdserve.engine.scheduler import PREFILL_SLACK
    from pdserve.scheduler.balancers import ATTENTION_PER_TOKEN

    assert CostModel().prefill_slack == PREFILL_SLACK == PrefillSettings().prefill_slack
    from pdserve.engine.scheduler import Deferral

    c, d, ps = CostModel(), Deferral(), PrefillSettings()
    assert (c.defer_share, c.defer_lateness_s, c.defer_wait_s, c.defer_burst) == (
        d.share, d.lateness_s, d.max_wait_s, d.burst)
    assert (d.share, d.lateness_s, d.max_wait_s) == (
        ps.prefill_defer_share, ps.prefill_defer_lateness_s, ps.prefill_defer_wait_s)
    # and pipelines as the gateway does by default
    from pdserve.config import GatewaySettings

    gw = GatewaySettings()
    assert (CostModel().pipeline_min_tokens, CostModel().pipeline_idle_tokens) == (
        gw.pipeline_min_tokens, gw.pipeline_idle_tokens)
    # and the workers weigh attention against tokens as the replay's cost model does
    assert ATTENTION_PER_TOKEN == pytest.approx(CostModel().attention_s * CostModel().prefill_tps)


def test_deadlines_let_short_prompts_through_a_queue_but_not_for_ever():
    """One instance; a 10 s prompt at 0, then 20 prompts of 0.5 s every 0.25 s from 0.1 s:
    more work than the instance computes, so a queue builds up behind the first prompt."""
    from dataclasses import replace

    cost = CostModel(prefill_tps=1000.0, attention_s=0.0, pipeline_min_tokens=0)
    trace = [TraceRequest(0.0, 10_000, 2, ()), TraceRequest(0.05, 20_000, 2, ())] + [
        TraceRequest(0.1 + 0.25 * k, 500, 2, ()) for k in range(20)]
    fifo = simulate(trace, "pdserve", 1, 1, replace(cost, prefill_slack=0.0))
    edf = simulate(trace, "pdserve", 1, 1, cost)
    # In arrival order every short prompt waits for both long ones (30 s of work): the k-th
    # ends at 30 + 0.5 (k + 1) s, TTFT 30.4 + 0.25 k s; by deadline they pass the 20 s one
    # (deadline 60 s) and wait for the first alone: 10.4 + 0.25 k s. The median is k = 9
    # in arrival order (the 20 s prompt, 29.95 s, sorts before them), k = 10 by deadline.
    assert fifo["ttft_p50_s"] == pytest.approx(30.4 + 0.25 * 9)
    assert edf["ttft_p50_s"] == pytest.approx(10.4 + 0.25 * 10)
    # The 20 s prompt waits for the short ones instead (10 s of them), no longer.
    assert edf["ttft_max_s"] == pytest.approx(10 + 10 + 20 - 0.05)
    assert fifo["ttft_max_s"] < edf["ttft_max_s"]


def test_an_overloaded_instance_defers_a_long_prompt_and_lets_the_queue_through():
    """One instance, 1,000 tokens a second; a 6 s prompt at 0.05 s among 199 prompts of 0.1 s,
    one every 0.095 s: the short ones alone are more work than the instance computes, so they
    fall behind. Without deferrals the long prompt runs at its deadline (18.05 s) and the
    short prompts arriving then wait 6 s behind it; deferred once the queue is 0.5 s late
    (at 14.2 s), it runs after them, when the instance is free, within its wait."""
    cost = CostModel(prefill_tps=1000.0, attention_s=0.0, pipeline_min_tokens=0,
                     pipeline_idle_tokens=0, defer_share=0.25, defer_burst=1.0,
                     defer_lateness_s=0.5, defer_wait_s=30.0)
    trace = [TraceRequest(0.0, 100, 2, ()), TraceRequest(0.05, 6000, 2, ())] + [
        TraceRequest(0.1 + 0.095 * k, 100, 2, ()) for k in range(198)]
    never = simulate(trace, "pdserve", 1, 1, replace(cost, defer_share=0.0))
    deferred = simulate(trace, "pdserve", 1, 1, cost)
    # p99 of 200 is the second longest TTFT: the slowest short prompt's.
    assert never["deferred"] == 0 and never["ttft_p99_s"] > 6.0
    assert deferred["deferred"] == 1 and deferred["ttft_p99_s"] < 1.5
    # The long prompt waits longer, but no longer than its wait and its own time.
    assert never["ttft_max_s"] < deferred["ttft_max_s"] <= 30.0 + 6.0
    # Prompts shorter than the lateness are never deferred (each would wait for little).
    short = simulate(trace, "pdserve", 1, 1, replace(cost, defer_lateness_s=7.0))
    assert short["deferred"] == 0 and short["ttft_p99_s"] == never["ttft_p99_s"]
    # In arrival order nothing is deferred, as on the workers (no deadlines to be late for).
    assert simulate(trace, "pdserve", 1, 1, replace(cost, prefill_slack=0.0))["deferred"] == 0
    # Its wait over, it goes first: deferred at 14.2 s with a 16 s wait, it runs from 16.05 s
    # (after the short prompt then running), and the short prompts then arriving wait behind
    # it again.
    soon = simulate(trace, "pdserve", 1, 1, replace(cost, defer_wait_s=16.0))
    assert soon["deferred"] == 1
    assert soon["ttft_max_s"] == pytest.approx(16.0 + 6.0 + 0.1, abs=0.15)
    assert soon["ttft_p99_s"] > 6.0


def test_prompts_wait_for_a_prefix_an_earlier_one_is_computing():
    # Five prompts at once share 4 new blocks (2,048 tokens) and add 513 tokens each. With
    # the wait, one computes the prefix and the others then only their own 513 tokens; without,
    # four instances each compute the whole 2,561 and the fifth queues behind one of them.
    cost = CostModel(prefill_tps=1000.0, attention_s=0.0, pipeline_min_tokens=0,
                     pipeline_idle_tokens=0)
    trace = [TraceRequest(0.001 * i, 2561, 2, (1, 2, 3, 4, 10 + i)) for i in range(5)]
    waits = simulate(trace, "pdserve", 4, 4, cost)
    computes = simulate(trace, "pdserve", 4, 4, replace(cost, prefix_wait_tokens=0))
    assert waits["hit_share"] == pytest.approx(4 * 2048 / (5 * 2561), abs=1e-4)
    assert computes["hit_share"] == 0
    # the four that waited all start at 2.561 s; the balancer spread their 513 tokens over the
    # loads, two of them on one of the three free instances
    assert waits["ttft_max_s"] == pytest.approx(2.561 + 2 * 0.513, abs=0.01)
    assert computes["ttft_max_s"] == pytest.approx(2 * 2.561, abs=0.01)
    # Fewer shared tokens than prefix_wait_tokens: computed again, as without.
    assert simulate(trace, "pdserve", 4, 4, replace(cost, prefix_wait_tokens=2049)) == computes
    # The anchors never wait.
    assert simulate(trace, "dynamo", 4, 4, cost)["hit_share"] == 0


@pytest.mark.integration
def test_cli_replays_the_shared_trace_slice(tmp_path):
    import os

    trace = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "traces",
                         "mooncake_synthetic_trace.jsonl")
    if not os.path.exists(trace):
        trace = str(tmp_path / "t.jsonl")
        with open(trace, "w") as f:
            for r in spaced_trace():
                f.write(json.dumps({"timestamp": r.arrival_s * 1000, "input_length": r.input_length,
                                    "output_length": r.output_length,
                                    "hash_ids": list(r.hash_ids)}) + "\n")
    out = subprocess.run([sys.executable, "-m", "pdserve", "replay", trace, "--prefill", "2",
                          "--decode", "2", "--limit", "200", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["policy"] for r in rows] == ["pdserve", "round_robin", "least_requests",
                                           "dynamo", "llm_d", "sglang", "mooncake"]
    for r in rows:
        assert set(r) >= {"ttft_p50_s", "ttft_p99_s", "hit_share", "rejected",
                          "prefill_load_max_over_mean"}
    with open(trace) as f:
        lines = sum(1 for line in f if line.strip())
    assert len(load_trace(trace, limit=200)) == min(200, lines)


def _placements(policy: str, trace, n_prefill: int = 2, **kw) -> list[int]:
    """The prefill instance of each request (from the instances' served blocks)."""
    from pdserve.scheduler import replay

    placed: list[int] = []
    real = replay.anchor_prefill

    def spy(*a, **k):
        placed.append(real(*a, **k))
        return placed[-1]

    replay.anchor_prefill = spy
    try:
        simulate(trace, policy, n_prefill, 1, **kw)
    finally:
        replay.anchor_prefill = real
    return placed


def test_the_anchors_follow_their_documented_rules():
    # A conversation's second turn: its first turn's instance holds its prefix.
    first = TraceRequest(0.0, 2100, 2, (1, 2, 3, 4))
    other = TraceRequest(0.05, 2100, 2, (9, 8, 7, 6))  # while instance 0 computes the first
    second = TraceRequest(100.0, 2600, 2, (1, 2, 3, 4, 5))
    # SGLang: the prefix match (4 of 5 blocks > 0.3) wins over the idle, emptier instance.
    assert _placements("sglang", [first, other, second]) == [0, 1, 0]
    # Below the threshold it takes the smallest tree: instance 1 holds fewer blocks.
    small = TraceRequest(0.5, 600, 2, (9, 8))
    fresh = TraceRequest(100.0, 5200, 2, (1, 20, 21, 22, 23, 24, 25, 26, 27, 28))
    assert _placements("sglang", [first, small, fresh])[-1] == 1
    # Dynamo: with no load anywhere the overlap decides.
    assert _placements("dynamo", [first, other, second]) == [0, 1, 0]
    # llm-d: ties at random; the queue scorer sends the second request elsewhere, and the
    # prefix scorer (weight 3) brings the next turn back to its first turn's instance.
    a, b, c = _placements("llm_d", [first, other, second])
    assert b != a and c == a
    # Mooncake: the lowest estimated TTFT: instance 0 is busy for a long prompt, so the
    # next one goes to the idle instance although 0 holds its prefix (the store is shared).
    long_ = TraceRequest(0.0, 200_000, 2, tuple(range(100, 490)))
    again = TraceRequest(0.1, 2600, 2, (100, 101, 102, 103, 104))
    assert _placements("mooncake", [long_, again]) == [0, 1]
    assert _placements("dynamo", [long_, again]) == [0, 1]  # its prefill blocks say so too


def test_dynamo_temperature_draws_among_workers():
    trace = [TraceRequest(0.01 * i, 1000, 2, (i,)) for i in range(40)]
    cold = set(_placements("dynamo", trace, 4))
    hot = _placements("dynamo", trace, 4, dynamo_temperature=5.0)
    assert len(set(hot)) == 4 and len(cold) >= 1
    assert hot != _placements("dynamo", trace, 4, dynamo_temperature=5.0, seed=1)


def test_stress_shapes_are_seeded_and_have_their_shape():
    from pdserve.scheduler.traces import SHAPES, stress_trace

    for shape in SHAPES:
        a, b = stress_trace(shape, 1, 300), stress_trace(shape, 1, 300)
        assert a == b and a != stress_trace(shape, 2, 300) and len(a) == 300
        assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))
        assert all(len(r.hash_ids) == -(-r.input_length // 512) for r in a)
    bursts = stress_trace("bursts", 0, 120)
    starts = sorted({round(r.arrival_s) for r in bursts})
    assert len(starts) <= 6  # 3 bursts of 40, each within 50 ms
    assert max(r.input_length for r in stress_trace("huge", 0, 300)) == 190_000
    tenants = stress_trace("tenants", 0, 600)
    firsts = {r.hash_ids[0] for r in tenants}
    assert 10 <= len(firsts) <= 60  # Zipf-popular tenants, each behind its own prefix


def test_the_pooled_reference_serves_one_fast_preemptive_server_in_order():
    from pdserve.scheduler.replay import pooled_reference

    cost = CostModel(prefill_tps=1000.0, attention_s=0.0)
    # 4 s of prefill (1 s on the pooled server of 4), then 0.4 s (0.1 s) arriving at 0.1 s,
    # and one alone much later (the median is the middle one of three).
    trace = [TraceRequest(0.0, 4000, 2, ()), TraceRequest(0.1, 400, 2, ()),
             TraceRequest(100.0, 10, 2, ())]
    # By deadline (3 x own time: 12 s and 1.3 s) the short one takes over at once, as does
    # shortest remaining first.
    for order in ("deadline", "srpt"):
        r = pooled_reference(trace, 4, cost, order)
        assert (r["ttft_p50_s"], r["ttft_max_s"]) == (pytest.approx(0.1), pytest.approx(1.1))
    # In arrival order (slack 0) the long one keeps the server.
    r = pooled_reference(trace, 4, replace(cost, prefill_slack=0.0))
    assert (r["ttft_p50_s"], r["ttft_max_s"]) == (pytest.approx(1.0), pytest.approx(1.0))
    # A repeated prefix is a hit, its last token excepted: 1,100 tokens, two blocks cached.
    again = [TraceRequest(0.0, 1024, 2, (1, 2)), TraceRequest(5.0, 1100, 2, (1, 2, 3)),
             TraceRequest(9.0, 1100, 2, (1, 2, 4))]
    r = pooled_reference(again, 1, cost)
    assert (r["ttft_p50_s"], r["ttft_max_s"]) == (pytest.approx(0.076), pytest.approx(1.024))
    with pytest.raises(ValueError, match="order"):
        pooled_reference(trace, 4, cost, "fifo")
