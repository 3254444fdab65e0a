"""Cache-hit analytics on the real system: a known set of requests, and the ledger, the named
queries (CLI and RPC), the report and every service's Prometheus counters all give exactly the
counts computed from what was sent. Then a trace slice replayed live: the report's hit share
equals the ideal share computed from the slice's hash ids."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from pdserve.cache.analytics import report, run_named
from pdserve.cache.ledger import run_query
from pdserve.client import Client
from pdserve.metrics import parse_metrics
from pdserve.scheduler.traces import load_trace
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc
from tests.helpers import wait_until

pytestmark = pytest.mark.integration  # starts processes

SLICE = Path(__file__).parent.parent / "data" / "mooncake_slice_3960.jsonl"
BT = 64


@pytest.fixture(scope="module")
def acluster(tmp_path_factory):
    from pdserve.cluster import LocalCluster
    from pdserve.config import UpSettings

    data = tmp_path_factory.mktemp("analytics")
    c = LocalCluster(UpSettings(data_dir=Path(data), port=0), progress=False,
                     # The ledger is written only when asked (QueryAnalytics) or at shutdown, so
                     # the last test can show that a clean shutdown loses nothing.
                     extra_env={"PDSERVE_WORKER_SAMPLE_S": "0.5",
                                "PDSERVE_LEDGER_FLUSH_S": "3600",
                                "PDSERVE_LEDGER_FLUSH_RECORDS": "100000"})
    c.start()
    yield c
    c.stop()


def scrape(cluster) -> dict[str, dict[str, float]]:
    out = {}
    alive = {s.name for s in cluster.services if s.proc.poll() is None}
    for name, url in cluster.metrics_urls().items():
        if name not in alive:
            continue
        with urllib.request.urlopen(url, timeout=5) as r:
            out[name] = parse_metrics(r.read().decode())
    return out


def flush(cluster) -> None:
    """QueryAnalytics writes the gateway's queued ledger rows before it answers."""
    with grpc.insecure_channel(cluster.gateway_address) as ch:
        gateway_pb2_grpc.GatewayStub(ch).QueryAnalytics(
            gateway_pb2.AnalyticsRequest(query="status_counts"))


def store_blocks(cluster) -> int:
    with grpc.insecure_channel(cluster.kvstore_address) as ch:
        return kvstore_pb2_grpc.KVStoreStub(ch).Stats(kvstore_pb2.StatsRequest()).num_blocks


def wait_blocks(cluster, n: int) -> None:
    wait_until(lambda: store_blocks(cluster) >= n, 30, what=f"the store holding {n} blocks")


def test_replayed_trace_report_hit_share_equals_the_ideal_share(acluster):
    """Runs first: the store must be complete for the slice (the next test stops it)."""
    since = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "pdserve", "replay", str(SLICE), "--live", "--json",
         "--address", acluster.gateway_address, "--tokens-per-block", str(BT),
         "--max-blocks", "6", "--max-tokens", "8", "--concurrency", "1", "--time-scale", "0.1"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    live = json.loads(out.stdout)
    assert live["succeeded"] == len(load_trace(str(SLICE))) == 24
    ideal = live["ideal_hit_share"]
    assert ideal > 0.3  # the slice really shares prefixes
    flush(acluster)
    rep = subprocess.run(
        [sys.executable, "-m", "pdserve", "report", "--data-dir", str(acluster.data_dir),
         "--since", str(since), "--json"], capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr
    r = json.loads(rep.stdout)
    assert r["requests"] == 24 and r["failed_requests"] == 0
    assert r["cache_hit_share"] == pytest.approx(ideal, abs=1e-4)
    assert r["cache_hit_share"] == pytest.approx(live["hit_share"], abs=1e-4)
    assert r["prefill_worker_hours"] > 0 and r["decode_worker_hours"] > 0
    text = subprocess.run(
        [sys.executable, "-m", "pdserve", "report", "--data-dir", str(acluster.data_dir),
         "--since", str(since)], capture_output=True, text=True, timeout=60).stdout
    assert f"({100 * r['cache_hit_share']:.1f} %)" in text


def test_known_requests_give_exact_counts_everywhere(acluster):
    gw = acluster.gateway_address
    since = time.time()
    rng = random.Random(7)
    a = [rng.randrange(100, 40000) for _ in range(200)]          # 3 full blocks + 8
    b = a[:128] + [rng.randrange(100, 40000) for _ in range(100)]  # shares 2 blocks with a
    c = [rng.randrange(100, 40000) for _ in range(150)]
    before = scrape(acluster)
    base_blocks = store_blocks(acluster)
    sent = []  # (request_id, tenant salt, prompt, expected cached, expected reason)
    got = {}

    def send(rid, prompt, salt, cached, reason):
        with Client(gw) as cl:
            r = cl.generate(token_ids=prompt, max_tokens=4, cache_salt=salt, request_id=rid)
        assert r.cached_tokens == cached, rid
        sent.append((rid, salt, prompt, cached, reason))
        got[rid] = r

    send("k1", a, "", 0, "never_seen")
    wait_blocks(acluster, base_blocks + 3)
    send("k2", a, "", 192, "partial_block")
    send("k3", b, "", 128, "never_seen")
    wait_blocks(acluster, base_blocks + 4)
    send("k4", a, "tenant-x", 0, "different_salt")
    wait_blocks(acluster, base_blocks + 7)
    with grpc.insecure_channel(gw) as ch, pytest.raises(grpc.RpcError) as e:
        list(gateway_pb2_grpc.GatewayStub(ch).Generate(gateway_pb2.GenerateRequest(
            prompt_token_ids=a, max_tokens=-1, request_id="k5")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    store_metrics = scrape(acluster)["kvstore"]
    acluster.kill("kvstore")
    send("k6", c, "", 0, "store_unavailable")

    ok = sent
    prompt_total = sum(len(p) for _, _, p, _, _ in ok)
    cached_total = sum(x for *_, x, _ in ok)
    completion_total = sum(got[rid].completion_tokens for rid, *_ in ok)

    # 1. The ledger: one row per request, exact values.
    flush(acluster)
    _, rows = run_query(acluster.data_dir, "SELECT request_id, status, prompt_tokens, "
                        "cached_tokens, completion_tokens, miss_reason, tenant FROM requests "
                        f"WHERE ts >= to_timestamp({since}) ORDER BY request_id")
    by_id = {r[0]: r[1:] for r in rows}
    assert sorted(by_id) == ["k1", "k2", "k3", "k4", "k5", "k6"]
    for rid, salt, prompt, cached, reason in ok:
        status, n_prompt, n_cached, n_out, why, tenant = by_id[rid]
        assert (status, n_prompt, n_cached, n_out, why) == (
            "OK", len(prompt), cached, got[rid].completion_tokens, reason), rid
        # the tenant is a hash of the salt, never the salt itself
        assert tenant == (hashlib.sha256(salt.encode()).hexdigest()[:16] if salt else "")
    assert by_id["k5"][:2] == ("INVALID_ARGUMENT", 0)

    # 2. Named queries, from the CLI and through the gateway RPC.
    p = {"since": str(since)}
    reasons = {r[0]: (r[1], r[2]) for r in run_named(acluster.data_dir, "miss_reasons", p)[1]}
    assert reasons == {"never_seen": (2, 200 + 100), "partial_block": (1, 8),
                       "different_salt": (1, 200), "store_unavailable": (1, 150)}
    out = subprocess.run([sys.executable, "-m", "pdserve", "analytics", "--data-dir",
                          str(acluster.data_dir), "--format", "csv", "--param", f"since={since}",
                          "hit_share_by_tenant"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "tenant,requests,prompt_tokens,cached_tokens,hit_share"
    tenants = {ln.split(",")[0]: ln.split(",")[1:4] for ln in lines[1:]}
    assert tenants[""] == ["4", str(200 + 200 + 228 + 150), "320"]
    assert [v for k, v in tenants.items() if k] == [["1", "200", "0"]]
    with grpc.insecure_channel(gw) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        r = stub.QueryAnalytics(gateway_pb2.AnalyticsRequest(query="miss_reasons", params=p))
        assert list(r.columns) == ["miss_reason", "requests", "uncached_tokens"]
        assert {row.values[0].s: (row.values[1].i, row.values[2].i) for row in r.rows} == reasons
        assert "slowest" in stub.QueryAnalytics(gateway_pb2.AnalyticsRequest()).queries
        for bad, field in (({"query": "DROP TABLE requests"}, "query: unknown"),
                           ({"query": "slowest", "params": {"limit": "-3"}}, "limit: -3")):
            with pytest.raises(grpc.RpcError) as e:
                stub.QueryAnalytics(gateway_pb2.AnalyticsRequest(**bad))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in e.value.details()

    # 3. The report.
    rep = report(acluster.data_dir, since=str(since))
    assert (rep.requests, rep.failed_requests) == (5, 1)
    assert (rep.input_tokens, rep.cached_input_tokens, rep.output_tokens) == (
        prompt_total, cached_total, completion_total)

    # 4. Prometheus: the gateway counts each request once; summed over every service, cached
    # tokens are counted exactly once (no double counting on the workers).
    after = scrape(acluster)
    g0, g1 = before["gateway"], after["gateway"]

    def delta(name):
        return g1.get(name, 0) - g0.get(name, 0)

    assert delta("pdserve_prompt_tokens_total") == prompt_total
    assert delta('pdserve_cached_tokens_total{source="store"}') == cached_total
    assert delta("pdserve_completion_tokens_total") == completion_total
    assert delta('pdserve_requests_total{status="OK"}') == 5
    assert delta('pdserve_requests_total{status="INVALID_ARGUMENT"}') == 1
    assert delta('pdserve_uncached_tokens_total{reason="store_unavailable"}') == 150
    assert delta("pdserve_ttft_seconds_count") == 5
    for name in after:
        if name != "gateway":
            assert not any(k.startswith("pdserve_cached_tokens") for k in after[name]), name
    pre0, pre1 = before["prefill-0"], after["prefill-0"]
    assert pre1["pdserve_prefill_store_read_failures_total"] == 0  # no hit lost to a READ
    # the hits came by NIXL READ (on the worker's read lanes, by default)
    assert (pre1["pdserve_prefill_store_reads_total"]
            > pre0.get("pdserve_prefill_store_reads_total", 0))
    assert "pdserve_prefill_store_regions_forgotten_total" in pre1
    # The deadline order's rate, measured from the prefill steps run, and its late prompts.
    assert pre1["pdserve_prefill_rate_tokens_per_second"] > 0
    assert 0 <= pre1["pdserve_prefill_late_prompts_total"] <= 5
    # five prompts bank 0.1 of a deferral (--prefill-defer-share 0.02): none deferred
    assert pre1["pdserve_prefill_deferred_prompts_total"] == 0
    assert (pre1["pdserve_prefill_fetched_tokens_total"]
            - pre0["pdserve_prefill_fetched_tokens_total"]) == cached_total
    assert (pre1["pdserve_prefill_computed_tokens_total"]
            - pre0["pdserve_prefill_computed_tokens_total"]) == prompt_total - cached_total
    d1 = after["decode-0"]
    assert d1["pdserve_kv_pages_total"] == 512 and d1["pdserve_kv_pages_used"] == 0
    assert d1["pdserve_decode_transfer_bytes_total"] > 0
    # decode steps ran, so the thread governor read the team's count (torch's default)
    assert 1 <= d1["pdserve_decode_threads"] <= (os.cpu_count() or 1)
    blocks_fetched = cached_total // BT  # every hit block was read once from the store
    assert (store_metrics["pdserve_store_hits_total"]
            - before["kvstore"]["pdserve_store_hits_total"]) == blocks_fetched
    assert store_metrics["pdserve_store_blocks"] == base_blocks + 7
    # Those blocks reached prefill by NIXL READ where they lie (their segment files mapped).
    assert (store_metrics["pdserve_store_staged_in_place_blocks_total"]
            - before["kvstore"]["pdserve_store_staged_in_place_blocks_total"]) == blocks_fetched
    assert store_metrics["pdserve_store_staged_blocks_total"] == 0  # none copied
    assert store_metrics["pdserve_store_staging_mapped_segments"] >= 1
    assert store_metrics["pdserve_store_staging_bytes"] == int(
        os.environ["PDSERVE_NIXL_STAGING_MB"]) << 20


def test_ledger_is_flushed_on_clean_shutdown(acluster):
    """SIGTERM: the rows queued in the gateway (nothing flushed them) all reach disk."""
    flush(acluster)
    n0 = run_query(acluster.data_dir, "SELECT count(*) FROM requests")[1][0][0]
    with Client(acluster.gateway_address) as cl:
        for i in range(3):
            cl.generate(token_ids=[500 + i] * 10, max_tokens=2, request_id=f"last-{i}")
    assert run_query(acluster.data_dir, "SELECT count(*) FROM requests")[1][0][0] == n0
    gw = acluster.service("gateway")
    gw.terminate()
    gw.wait(30)
    assert gw.proc.returncode == 0
    _, rows = run_query(acluster.data_dir, "SELECT request_id, status FROM requests "
                        "WHERE request_id LIKE 'last-%' ORDER BY 1")
    assert rows == [(f"last-{i}", "OK") for i in range(3)]
    assert run_query(acluster.data_dir, "SELECT count(*) FROM requests")[1][0][0] == n0 + 3
    workers = run_query(acluster.data_dir, "SELECT count(DISTINCT worker_id) FROM workers")[1]
    assert workers == [(2,)]
