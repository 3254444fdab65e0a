from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdserve.scheduler.replay import CostModel, TraceRequest, load_trace, simulate


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


@pytest.mark.parametrize("policy", ["pdserve", "round_robin", "least_requests", "cache_affinity"])
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
    # chunk (16 chunks of 4,000 tokens: 4 per stage) and one hop after the stage before it.
    lag = t / 4 / 16 + cost.pipeline_hop_s
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
                                           "cache_affinity"]
    for r in rows:
        assert set(r) >= {"ttft_p50_s", "ttft_p99_s", "hit_share", "rejected",
                          "prefill_load_max_over_mean"}
    with open(trace) as f:
        lines = sum(1 for line in f if line.strip())
    assert len(load_trace(trace, limit=200)) == min(200, lines)
