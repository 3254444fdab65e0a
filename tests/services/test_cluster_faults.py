"""Faults with real processes and real kills, on 2 prefill + 2 decode workers: every request
either finishes with exactly the fault-free tokens or fails with a retryable status, and every
page comes back (read from the workers' own counters)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from pdserve.client import Client
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.helpers import service_metrics, wait_until

LEASE_S, QUARANTINE_S = 15.0, 2.0

pytestmark = pytest.mark.integration  # starts processes

LONG = [1000 + (i * 7919) % 40000 for i in range(1200)]   # seconds of prefill on this CPU
SHORT = [2000 + (i * 104729) % 40000 for i in range(40)]


@pytest.fixture(scope="module")
def fcluster(tmp_path_factory):
    from pdserve.cluster import LocalCluster
    from pdserve.config import UpSettings

    d = tmp_path_factory.mktemp("faults")
    c = LocalCluster(UpSettings(data_dir=Path(d), port=0, num_prefill=2, num_decode=2),
                     progress=False,
                     extra_env={"PDSERVE_LEASE_S": str(LEASE_S),
                                "PDSERVE_QUARANTINE_S": str(QUARANTINE_S),
                                "PDSERVE_WORKER_TIMEOUT_S": "2",
                                # one worker computes each prompt: these tests kill it (a
                                # pipeline's stage dying costs only time, test_pipeline.py)
                                "PDSERVE_PIPELINE_IDLE_TOKENS": "0"})
    c.start()
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def revive(fcluster):
    """A test that fails between its kill and its restart leaves the next one a whole cluster."""
    yield
    for svc in fcluster.services:
        if svc.proc.poll() is not None:
            fcluster.restart(svc.name)


@pytest.fixture(scope="module")
def reference(fcluster):
    """Fault-free tokens of each prompt (greedy, and seeded sampling)."""
    out = {}
    with Client(fcluster.gateway_address) as c:
        out["long"] = c.generate(token_ids=LONG, max_tokens=12, cache_salt="ref").token_ids
        out["short"] = c.generate(token_ids=SHORT, max_tokens=60, cache_salt="ref").token_ids
        out["short-seeded"] = c.generate(token_ids=SHORT, max_tokens=60, temperature=0.8,
                                         seed=42, cache_salt="ref").token_ids
    assert len(out["short"]) == 60 or out["short"][-1] in (0, 1, 2)
    return out


def stats(c) -> list:
    with grpc.insecure_channel(c.gateway_address) as ch:
        return list(gateway_pb2_grpc.GatewayStub(ch).Stats(
            gateway_pb2.ClusterStatsRequest()).workers)


def busy_worker(c, role: str, timeout: float = 60) -> str:
    return wait_until(lambda: next((w.worker_id for w in stats(c) if w.role == role
                                    and w.in_rotation and w.running > 0), None),
                      timeout, what=f"a busy {role} worker")




def wait_pages_back(c, timeout: float = LEASE_S + QUARANTINE_S + 20) -> None:
    """Every live decode and prefill worker's pool is entirely free again."""
    def used() -> dict[str, float]:
        return {s.name: service_metrics(c, s.name)["pdserve_kv_pages_used"] for s in c.services
                if s.name.startswith(("prefill", "decode")) and s.proc.poll() is None}

    wait_until(lambda: not any(used().values()), timeout, interval_s=0.25,
               what="every worker's pages free")


def retries(gateway_metrics: dict[str, float]) -> float:
    """Attempts the gateway restarted on another worker, all stages."""
    return sum(v for k, v in gateway_metrics.items()
               if k.startswith("pdserve_request_retries_total"))


def stream(c, rid: str, prompt, max_tokens: int, on_token=None, **kw):
    """(tokens received, finish_reason or None, error code or None)."""
    tokens, reason = [], None
    with grpc.insecure_channel(c.gateway_address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        try:
            for msg in stub.Generate(gateway_pb2.GenerateRequest(
                    prompt_token_ids=prompt, max_tokens=max_tokens, request_id=rid,
                    cache_salt=rid, **kw), timeout=300):
                tokens.extend(msg.token_ids)
                if on_token:
                    on_token(tokens)
                reason = msg.finish_reason or reason
        except grpc.RpcError as e:
            return tokens, reason, e.code()
    return tokens, reason, None


def ledger_row(c, rid: str) -> dict:
    from pdserve.cache.ledger import run_query

    with grpc.insecure_channel(c.gateway_address) as ch:  # writes queued ledger rows
        gateway_pb2_grpc.GatewayStub(ch).QueryAnalytics(
            gateway_pb2.AnalyticsRequest(query="status_counts"))
    _, rows = run_query(c.data_dir, "SELECT status, attempts, completion_tokens, prefill_worker, "
                        "error FROM requests "
                        f"WHERE request_id = '{rid}'")
    return dict(zip(("status", "attempts", "completion_tokens", "prefill_worker", "error"),
                    rows[0]))


def kill_when_busy(c, role: str, done: dict) -> threading.Thread:
    def run():
        wid = busy_worker(c, role)
        c.kill(wid)
        done["killed"] = wid
    t = threading.Thread(target=run)
    t.start()
    return t


def test_prefill_killed_mid_prefill_is_retried_on_the_other(fcluster, reference):
    done = {}
    t = kill_when_busy(fcluster, "prefill", done)
    tokens, reason, err = stream(fcluster, "p-kill", LONG, 12)
    t.join()
    assert err is None and tokens == reference["long"] and reason == "length"
    row = ledger_row(fcluster, "p-kill")
    assert (row["status"], row["attempts"], row["completion_tokens"]) == ("OK", 2, 12)
    g = service_metrics(fcluster, "gateway")
    assert g['pdserve_request_retries_total{stage="prefill"}'] >= 1
    wait_pages_back(fcluster)  # the abandoned reservation too, after lease + quarantine
    fcluster.restart(done["killed"])


def test_without_retries_a_dead_prefill_is_unavailable(fcluster):
    fcluster.restart("gateway", extra_args=["--prefill-retries", "0"])
    fcluster._wait_serving(time.monotonic() + 120)
    done = {}
    t = kill_when_busy(fcluster, "prefill", done)
    tokens, _, err = stream(fcluster, "p-kill-0", LONG, 12)
    t.join()
    assert err == grpc.StatusCode.UNAVAILABLE and tokens == [], (done, ledger_row(fcluster,
                                                                              "p-kill-0"))
    row = ledger_row(fcluster, "p-kill-0")
    assert (row["status"], row["attempts"]) == ("UNAVAILABLE", 1), row
    wait_pages_back(fcluster)
    fcluster.restart(done["killed"])


def test_decode_killed_mid_stream_ends_unavailable_with_the_tokens_sent(fcluster, reference):
    done = {}

    def on_token(tokens):
        if len(tokens) >= 10 and "t" not in done:
            done["t"] = kill_when_busy(fcluster, "decode", done)

    tokens, reason, err = stream(fcluster, "d-kill", SHORT, 60, on_token)
    done["t"].join()
    assert err == grpc.StatusCode.UNAVAILABLE and reason is None
    assert 10 <= len(tokens) < 60 and tokens == reference["short"][:len(tokens)]
    wait_pages_back(fcluster)
    fcluster.restart(done["killed"])


@pytest.mark.parametrize("kind", ["short", "short-seeded"])
def test_with_migration_a_dead_decode_loses_and_repeats_no_token(fcluster, reference, kind):
    if "--migrate" not in fcluster.service("gateway").args:
        fcluster.restart("gateway", extra_args=["--migrate"])
        fcluster._wait_serving(time.monotonic() + 120)
    done = {}

    def on_token(tokens):
        if len(tokens) >= 15 and "t" not in done:
            done["t"] = kill_when_busy(fcluster, "decode", done)

    kw = {"temperature": 0.8, "seed": 42} if kind == "short-seeded" else {}
    tokens, reason, err = stream(fcluster, f"m-{kind}", SHORT, 60, on_token, **kw)
    done["t"].join()
    assert err is None and tokens == reference[kind], (  # nothing lost, nothing twice
        err, done, ledger_row(fcluster, f"m-{kind}"))
    row = ledger_row(fcluster, f"m-{kind}")
    assert (row["status"], row["attempts"], row["completion_tokens"]) == (
        "OK", 2, len(reference[kind]))
    wait_pages_back(fcluster)
    fcluster.restart(done["killed"])


def test_client_cancellation_frees_pages_everywhere(fcluster):
    with grpc.insecure_channel(fcluster.gateway_address) as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(gateway_pb2.GenerateRequest(
            prompt_token_ids=LONG, max_tokens=50, request_id="cancel-me", cache_salt="x"))
        busy_worker(fcluster, "prefill")
        call.cancel()
    assert call.code() == grpc.StatusCode.CANCELLED  # it had not finished
    wait_until(lambda: not any(  # the prefill job was dropped, not finished
        service_metrics(fcluster, f"prefill-{i}")["pdserve_prefill_queue_requests"]
        for i in range(2)), 20, interval_s=0.1, what="the prefill queues empty")
    wait_pages_back(fcluster)
    assert ledger_row(fcluster, "cancel-me")["status"] == "CANCELLED"
    assert service_metrics(fcluster, "gateway")["pdserve_requests_in_flight"] == 0


def test_abort_during_the_prefill_cancels_it_and_frees_every_page(fcluster):
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(
        zip(("tokens", "reason", "err"), stream(fcluster, "abort-pre", LONG, 50))))
    t.start()
    busy_worker(fcluster, "prefill")
    with Client(fcluster.gateway_address) as c:
        assert c.abort("abort-pre")
    t.join(120)
    assert (got["tokens"], got["reason"], got["err"]) == ([], "abort", None)
    wait_until(lambda: not any(  # the prefill job was dropped, not finished
        service_metrics(fcluster, f"prefill-{i}")["pdserve_prefill_queue_requests"]
        for i in range(2)), 20, interval_s=0.1, what="the prefill queues empty")
    wait_pages_back(fcluster)  # after the lease + quarantine: a WRITE may have been under way
    row = ledger_row(fcluster, "abort-pre")
    assert (row["status"], row["attempts"], row["completion_tokens"]) == ("CANCELLED", 1, 0)


def test_a_burst_larger_than_the_prefill_pools_waits_for_pages_and_loses_nothing(
        fcluster, reference):
    """Prefill workers with 24 KV pages, room for one 1,200-token prompt (19 pages) at a
    time, and a burst of four: the prompts that find no pages wait for them (first come first
    served) instead of failing, and every one gets the fault-free tokens, none retried."""
    for i in range(2):
        fcluster.restart(f"prefill-{i}", extra_args=["--num-pages", "24"])
    fcluster._wait_serving(time.monotonic() + 120)
    names = ["prefill-0", "prefill-1", "gateway"]
    before = {n: service_metrics(fcluster, n) for n in names}
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda i: stream(fcluster, f"pages-{i}", LONG, 6), range(4)))
    after = {n: service_metrics(fcluster, n) for n in names}
    assert all(err is None and tokens == reference["long"][:6] for tokens, _, err in out), out
    waits = sum(after[n].get("pdserve_prefill_page_waits_total", 0)
                - before[n].get("pdserve_prefill_page_waits_total", 0) for n in names[:2])
    assert waits >= 1
    assert retries(after["gateway"]) == retries(before["gateway"])
    wait_pages_back(fcluster)
    for i in range(2):
        fcluster.restart(f"prefill-{i}")
    fcluster._wait_serving(time.monotonic() + 120)


def test_a_prefill_longer_than_the_lease_renews_it_and_decodes_the_same_tokens(
        fcluster, reference):
    """Decode workers with a 1 s lease: the 1,200-token prefill takes longer, so the prefill
    worker renews the reservation's lease with the decode worker (Decode.Renew) while it
    computes; the KV lands and decode gives the fault-free tokens, nothing expires, nothing
    is retried. (A lease that does run out: no WRITE starts and decode fails the request,
    tests/services/test_transfer.py.)"""
    for i in range(2):
        fcluster.restart(f"decode-{i}", extra_args=["--lease-s", "1"])
    fcluster._wait_serving(time.monotonic() + 120)
    names = [f"decode-{i}" for i in range(2)] + [f"prefill-{i}" for i in range(2)] + ["gateway"]
    before = {n: service_metrics(fcluster, n) for n in names}
    t0, first = time.monotonic(), []
    tokens, reason, err = stream(fcluster, "late", LONG, 8,
                                 on_token=lambda _: first or first.append(time.monotonic()))
    after = {n: service_metrics(fcluster, n) for n in names}

    def delta(key: str, prefix: str) -> float:
        return sum(after[n].get(key, 0) - before[n].get(key, 0) for n in names
                   if n.startswith(prefix))

    assert err is None and tokens == reference["long"][:8] and reason == "length"
    assert first[0] - t0 > 1.0  # the first token came after the first lease's end
    assert delta("pdserve_prefill_lease_renewals_total", "prefill") >= 1
    assert delta('pdserve_decode_failed_total{reason="DEADLINE_EXCEEDED"}', "decode") == 0
    assert retries(after["gateway"]) == retries(before["gateway"])
    wait_pages_back(fcluster)
    for i in range(2):
        fcluster.restart(f"decode-{i}")
