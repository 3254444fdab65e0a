"""Named queries, the report and its plot, over a ledger whose every number is known."""

from __future__ import annotations

import json

import pytest

from pdserve import cli
from pdserve.cache.analytics import NAMED_QUERIES, Prices, plot, report, run_named
from pdserve.cache.ledger import Ledger, QueryError
from tests.helpers import ledger_row

H = 3600.0
T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    d = tmp_path_factory.mktemp("ledger")
    led = Ledger(d)
    rows = [
        # hour 0, tenant a
        ledger_row(0, ts=T0 + 10, tenant="a", prompt_tokens=200, cached_tokens=0,
                   completion_tokens=4, ttft_s=0.5, e2e_s=0.8, miss_reason="never_seen",
                   compute_s=0.4),
        ledger_row(1, ts=T0 + 20, tenant="a", prompt_tokens=200, cached_tokens=192,
                   completion_tokens=4, ttft_s=0.1, e2e_s=0.4, miss_reason="partial_block",
                   compute_s=0.02),
        # hour 1, tenant b
        ledger_row(2, ts=T0 + H + 5, tenant="b", prompt_tokens=2000, cached_tokens=1024,
            completion_tokens=1, ttft_s=1.0, e2e_s=1.0, miss_reason="evicted", compute_s=0.98),
        ledger_row(3, ts=T0 + H + 6, tenant="b", prompt_tokens=300, cached_tokens=0,
            completion_tokens=11, ttft_s=0.2, e2e_s=2.2, miss_reason="different_salt",
            compute_s=0.3),
        # failures count in status_counts only
        ledger_row(4, ts=T0 + H + 7, tenant="b", status="UNAVAILABLE", prompt_tokens=50,
            cached_tokens=0, completion_tokens=0, e2e_s=9.0, miss_reason=""),
    ]
    for r in rows:
        led.record_request(**r)
    for k in range(4):  # workers sampled every 900 s over the first hour
        for wid, role, busy in (("p0", "prefill", k % 2), ("d0", "decode", 1), ("d1", "decode", 0)):
            led.record_worker(ts=T0 + 900 * k, worker_id=wid, role=role, in_rotation=True,
                              running=busy, queued_tokens=0, used_pages=0, total_pages=8,
                              interval_s=900.0)
    led.close()
    return d


def q(d, name, **params):
    cols, rows = run_named(d, name, {k: str(v) for k, v in params.items()})
    return [dict(zip(cols, r)) for r in rows]


def test_hit_share_by_hour_and_tenant(ledger):
    by_hour = q(ledger, "hit_share_by_hour")
    assert [(r["requests"], r["prompt_tokens"], r["cached_tokens"]) for r in by_hour] == [
        (2, 400, 192), (2, 2300, 1024)]
    assert by_hour[0]["hour"].timestamp() == T0
    assert by_hour[1]["hit_share"] == round(1024 / 2300, 4)
    by_tenant = {r["tenant"]: r for r in q(ledger, "hit_share_by_tenant")}
    assert by_tenant["a"]["hit_share"] == round(192 / 400, 4)
    assert by_tenant["b"]["prompt_tokens"] == 2300  # the failed request is not in it
    assert [r["tenant"] for r in q(ledger, "hit_share_by_tenant", tenant="a")] == ["a"]


def test_prompt_length_buckets_miss_reasons_savings_slowest(ledger):
    buckets = {r["bucket"]: (r["requests"], r["cached_tokens"])
               for r in q(ledger, "hit_share_by_prompt_length")}
    assert buckets == {"0-255": (2, 192), "256-1023": (1, 0), "1024-4095": (1, 1024)}
    reasons = {r["miss_reason"]: (r["requests"], r["uncached_tokens"])
               for r in q(ledger, "miss_reasons")}
    assert reasons == {"never_seen": (1, 200), "partial_block": (1, 8), "evicted": (1, 976),
                       "different_salt": (1, 300)}
    [s] = q(ledger, "savings")
    computed = 200 + 8 + 976 + 300
    assert (s["cached_tokens"], s["computed_tokens"]) == (1216, computed)
    assert s["compute_s_saved"] == pytest.approx(1216 * (0.4 + 0.02 + 0.98 + 0.3) / computed)
    slow = q(ledger, "slowest", limit=2)
    assert [r["request_id"] for r in slow] == ["r4", "r3"]
    assert {r["status"]: r["requests"] for r in q(ledger, "status_counts")} == {
        "OK": 4, "UNAVAILABLE": 1}


def test_period_filters(ledger):
    assert len(q(ledger, "hit_share_by_hour", since=T0 + H)) == 1
    assert len(q(ledger, "hit_share_by_hour", until="2026-01-01T00:30:00")) == 1
    assert q(ledger, "hit_share_by_hour", since=T0 + 2 * H) == []


@pytest.mark.parametrize("name,params,why", [
    ("nope", {}, "unknown 'nope'"),
    ("slowest", {"limit": "0"}, "limit: 0"),
    ("slowest", {"limit": "ten"}, "limit: 'ten'"),
    ("slowest", {"since": "yesterday"}, "since: 'yesterday'"),
    ("slowest", {"color": "red"}, "unknown \\['color'\\]"),
])
def test_bad_named_queries_name_the_problem(ledger, name, params, why):
    with pytest.raises(QueryError, match=why):
        run_named(ledger, name, params)


def test_report_numbers(ledger):
    prices = Prices(gpu_hour=2.0, gpus_per_worker=8, input_hit_per_m=0.14, input_miss_per_m=0.55,
                    output_per_m=2.19)
    r = report(ledger, prices=prices)
    assert (r.requests, r.failed_requests) == (4, 1)
    assert (r.input_tokens, r.cached_input_tokens, r.output_tokens) == (2700, 1216, 20)
    assert r.cache_hit_share == round(1216 / 2700, 4)
    # per request (n-1)/(e2e-ttft), for requests with more than one token
    rates = [3 / 0.3, 3 / 0.3, 10 / 2.0]
    assert r.avg_output_tokens_per_s == pytest.approx(sum(rates) / 3, abs=1e-3)
    kv = sum(c * p + c * (c - 1) / 2 for p, c in ((200, 4), (200, 4), (2000, 1), (300, 11)))
    assert r.avg_kv_length_per_output_token == round(kv / 20, 1)
    # worker time from the samples: p0 4 x 900 s = 1 h; d0 + d1 = 2 h
    assert (r.prefill_worker_hours, r.decode_worker_hours) == (1.0, 2.0)
    assert r.peak_prefill_workers == 1 and r.peak_decode_workers == 2
    assert r.prefill_tokens_per_s_per_worker == round(2700 / 3600, 1)
    assert r.decode_tokens_per_s_per_worker == round(20 / 7200, 1)
    cost = 3.0 * 8 * 2.0
    revenue = (1216 * 0.14 + (2700 - 1216) * 0.55 + 20 * 2.19) / 1e6
    assert r.cost_usd == round(cost, 6) and r.revenue_usd == round(revenue, 6)
    assert r.margin == round((revenue - cost) / revenue, 4)
    one_hour = report(ledger, since=str(T0 + H), prices=prices)
    assert (one_hour.requests, one_hour.input_tokens) == (2, 2300)


def test_plot_writes_a_png(ledger, tmp_path):
    out = plot(ledger, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_cli_analytics_csv_named_and_refusals(ledger, capsys):
    assert cli.main(["analytics", "--data-dir", str(ledger), "--format", "csv",
                     "SELECT request_id, cached_tokens FROM requests ORDER BY request_id"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "request_id,cached_tokens" and lines[1:3] == ["r0,0", "r1,192"]
    assert len(lines) == 6
    assert cli.main(["analytics", "--data-dir", str(ledger), "--format", "json",
                     "--param", "tenant=a", "hit_share_by_tenant"]) == 0
    assert json.loads(capsys.readouterr().out)["cached_tokens"] == 192
    assert cli.main(["analytics", "--data-dir", str(ledger), "DROP VIEW requests"]) == 2
    assert "only read-only SELECT" in capsys.readouterr().err
    assert cli.main(["analytics", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in NAMED_QUERIES)
    assert cli.main(["analytics", "--data-dir", str(ledger / "missing"), "SELECT 1"]) == 2


def test_cli_report_json_and_plot(ledger, tmp_path, capsys):
    assert cli.main(["report", "--data-dir", str(ledger), "--json", "--gpus-per-worker", "8",
                     "--plot", str(tmp_path / "r.png")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cache_hit_share"] == round(1216 / 2700, 4) and r["cost_usd"] == 48.0
    assert (tmp_path / "r.png").exists()
    assert cli.main(["report", "--data-dir", str(ledger), "--until", "tomorrow"]) == 2
    assert "until: 'tomorrow'" in capsys.readouterr().err


def test_several_gateways_ledgers_read_as_one_and_workers_count_once(tmp_path):
    """Two gateways on one data directory: each writes its own segments (rows carry its id),
    the queries read both, each request counts once, and the report's worker-hours are one
    gateway's view (both sampled the same workers in the same slots, at different instants),
    also while one of them was down; a second writer with a taken id is refused."""
    from pdserve.supervise import DirectoryInUse

    a, b = (Ledger(tmp_path, gateway=g) for g in ("gw-a", "gw-b"))
    with pytest.raises(DirectoryInUse, match="--gateway-id 'gw-a'"):
        Ledger(tmp_path, gateway="gw-a")
    for i, led in enumerate((a, b, a)):
        led.record_request(**ledger_row(i, ts=T0 + i))
    for k in range(8):  # 8 slots of 60 s; gateway b was down for the last 3
        for led, phase in ((a, 30.0), (b, 41.5)):
            if led is b and k >= 5:
                continue
            for wid, role in (("p0", "prefill"), ("d0", "decode")):
                led.record_worker(ts=T0 + 60 * k + phase, worker_id=wid, role=role,
                                  in_rotation=True, running=0, queued_tokens=0, used_pages=0,
                                  total_pages=8, interval_s=60.0)
    a.close()
    b.close()
    assert {r["request_id"] for r in q(tmp_path, "slowest", limit=10)} == {"r0", "r1", "r2"}
    from pdserve.cache.ledger import run_query

    _, rows = run_query(tmp_path, "SELECT gateway, count(*) FROM requests GROUP BY 1 ORDER BY 1")
    assert rows == [("gw-a", 2), ("gw-b", 1)]
    r = report(tmp_path)
    assert r.requests == 3
    assert r.prefill_worker_hours == pytest.approx(8 * 60 / H, abs=1e-6)  # a's view: 8 slots
    assert r.decode_worker_hours == pytest.approx(8 * 60 / H, abs=1e-6)
    assert r.peak_prefill_workers == 1 and r.peak_decode_workers == 1


def test_a_role_no_sample_caught_in_rotation_falls_back_to_its_request_spans(tmp_path):
    """A run shorter than the sampling interval: the one sample came before the decode worker
    joined. Prefill time comes from the sample, decode time from the decode worker's span of
    requests (not 0)."""
    led = Ledger(tmp_path, gateway="g")
    for i in range(3):
        led.record_request(**ledger_row(i, ts=T0 + 2 * i, e2e_s=1.0, ttft_s=0.2))
    led.record_worker(ts=T0 + 1, worker_id="p0", role="prefill", in_rotation=True, running=0,
                      queued_tokens=0, used_pages=0, total_pages=8, interval_s=10.0)
    led.close()
    r = report(tmp_path)
    assert r.prefill_worker_hours == pytest.approx(10.0 / H, abs=1e-6)  # the sample's
    assert r.decode_worker_hours == pytest.approx(5.0 / H, abs=1e-6)  # d0: 4 s + the last 1 s
    assert r.peak_prefill_workers == 1
