"""Several gateways over the same workers (no single point of failure), with real processes:
every worker reports to every gateway, a burst through both spreads, an Abort finds its
request through either gateway, the ledgers of both read as one, and a gateway SIGKILLed
mid-load costs only its own open streams."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from pdserve.cache.analytics import report
from pdserve.cache.ledger import run_query
from pdserve.client import Client
from pdserve.services.registration import REPORT_INTERVAL_S
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.helpers import wait_until

pytestmark = pytest.mark.integration  # starts processes

SAMPLE_S = 0.5  # the gateways' worker samples, often enough to compare worker-hours


@pytest.fixture(scope="module")
def gcluster(tmp_path_factory):
    from pdserve.cluster import LocalCluster
    from pdserve.config import UpSettings

    d = tmp_path_factory.mktemp("gateways")
    c = LocalCluster(UpSettings(data_dir=Path(d), port=0, gateways=2, num_prefill=2,
                                num_decode=2),
                     progress=False, extra_env={"PDSERVE_WORKER_SAMPLE_S": str(SAMPLE_S),
                                                "PDSERVE_LEDGER_FLUSH_S": "0.2"})
    c.start()
    yield c
    c.stop()


def stats(address: str) -> gateway_pb2.ClusterStatsResponse:
    with grpc.insecure_channel(address) as ch:
        return gateway_pb2_grpc.GatewayStub(ch).Stats(gateway_pb2.ClusterStatsRequest(),
                                                      timeout=5)


def in_rotation(address: str) -> set[str]:
    try:
        return {w.worker_id for w in stats(address).workers if w.in_rotation}
    except grpc.RpcError:
        return set()


WORKERS = {"prefill-0", "prefill-1", "decode-0", "decode-1"}


def prompt(i: int, n: int = 200) -> list[int]:
    return [1000 + (i * 7919 + k * 104729) % 40000 for k in range(n)]


def test_every_worker_is_in_both_gateways_and_a_burst_through_both_spreads(gcluster):
    a, b = gcluster.gateway_addresses
    assert gcluster.service("gateway-0") and gcluster.service("gateway-1")
    for address in (a, b):
        wait_until(lambda address=address: in_rotation(address) == WORKERS, 30,
                   what=lambda address=address: f"{address}: {in_rotation(address)}")
    before = {w.worker_id: w.num_finished for w in stats(a).workers}

    def send(i: int) -> tuple[str, int]:
        with Client((a, b)[i % 2]) as c:
            r = c.generate(token_ids=prompt(i), max_tokens=4, ignore_eos=True,
                           request_id=f"burst-{i}", cache_salt=f"burst-{i}")
        return r.request_id, r.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(16)))
    assert all(n == 4 for _, n in results)

    def served() -> dict[str, int]:
        now = {w.worker_id: w.num_finished for w in stats(a).workers}
        return {w: now[w] - before.get(w, 0) for w in now}

    # Every worker took part of the burst (the load reports lag the count a little).
    wait_until(lambda: all(n > 0 for n in served().values()) and
               sum(n for w, n in served().items() if w.startswith("decode")) >= 16, 10,
               what=lambda: f"finished per worker {served()}")
    # A prompt repeated through the other gateway finds the same blocks in the store.
    with Client(a) as ca, Client(b) as cb:
        first = ca.generate(token_ids=prompt(99, 300), max_tokens=2, cache_salt="repeat")
        # (the prefill worker stores the blocks just after answering: poll for them)
        again_a = wait_until(lambda: (r := ca.generate(token_ids=prompt(99, 300), max_tokens=2,
                                                       cache_salt="repeat")).cached_tokens
                             and r, 10, interval_s=0.1)
        again_b = cb.generate(token_ids=prompt(99, 300), max_tokens=2, cache_salt="repeat")
    assert first.cached_tokens == 0
    assert again_b.cached_tokens == again_a.cached_tokens == 256
    assert again_b.token_ids == again_a.token_ids == first.token_ids


def test_abort_through_the_other_gateway_stops_the_stream(gcluster):
    a, b = gcluster.gateway_addresses
    got: dict[str, object] = {}
    started = threading.Event()

    def run() -> None:
        with Client(a) as c:
            got["result"] = c.generate(token_ids=prompt(7), max_tokens=400, ignore_eos=True,
                                       request_id="held-by-a",
                                       on_text=lambda _: started.set())

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(60)
    with Client(b) as cb:
        assert cb.abort("held-by-a")  # b does not hold it: a does, and stops it
        assert not cb.abort("held-by-nobody")
    t.join(60)
    r = got["result"]
    assert r.finish_reason == "abort" and r.completion_tokens < 400


def test_the_ledgers_of_both_gateways_count_each_request_once(gcluster):
    data = gcluster.data_dir
    ids = [f"burst-{i}" for i in range(16)]

    def rows() -> list[tuple]:
        return run_query(data, "SELECT request_id, gateway FROM requests WHERE request_id IN "
                         f"({', '.join(repr(i) for i in ids)})")[1]

    wait_until(lambda: len(rows()) >= 16, 10, what=lambda: f"{len(rows())} rows")
    found = rows()
    assert sorted(r[0] for r in found) == sorted(ids)  # each once
    assert {r[1] for r in found} == {"gateway-0", "gateway-1"}  # half through each
    # Worker time: both gateways sampled every worker; the report counts it once.
    _, per_gateway = run_query(data, """
        SELECT gateway, role, sum(interval_s) FILTER (in_rotation) FROM workers
        GROUP BY 1, 2""")
    view = {(g, role): s for g, role, s in per_gateway}
    r = report(data)
    for role, hours in (("prefill", r.prefill_worker_hours), ("decode", r.decode_worker_hours)):
        one = max(view[("gateway-0", role)], view[("gateway-1", role)])
        both = view[("gateway-0", role)] + view[("gateway-1", role)]
        # One gateway's view, give or take a slot per worker at the edges; never the sum.
        assert abs(hours * 3600 - one) <= 2 * SAMPLE_S * 2 + 1e-6, (role, hours * 3600, one)
        assert hours * 3600 < 0.75 * both
    assert r.peak_prefill_workers == 2 and r.peak_decode_workers == 2


def test_a_gateway_killed_mid_load_costs_only_its_open_streams(gcluster):
    a, b = gcluster.gateway_addresses
    outcomes: list[str] = []
    lock = threading.Lock()

    def through_b(i: int) -> None:
        try:
            with Client(b) as c:
                c.generate(token_ids=prompt(200 + i), max_tokens=200, ignore_eos=True)
            what = "ok"
        except grpc.RpcError as e:
            what = e.code().name
        with lock:
            outcomes.append(what)

    streams = [threading.Thread(target=through_b, args=(i,)) for i in range(4)]
    for t in streams:
        t.start()
    wait_until(lambda: stats(b).requests_in_flight >= 4, 30, what="4 streams open on b")
    gcluster.kill("gateway-1")
    for t in streams:
        t.join(120)
    # Its open streams failed UNAVAILABLE (none could have finished 200 tokens by then).
    assert outcomes == ["UNAVAILABLE"] * 4, outcomes
    # Every request sent after the kill, to both addresses, is served (by the survivor).
    with Client(f"{a},{b}") as c:
        results = [c.generate(token_ids=prompt(300 + i), max_tokens=3) for i in range(6)]
    assert all(r.completion_tokens == 3 for r in results)
    assert in_rotation(a) == WORKERS  # no worker left the survivor's rotation
    # The restarted gateway (same port) has every worker back within two report intervals
    # of starting to listen (measured from its ready file; polled from here).
    svc = gcluster.restart("gateway-1")
    listening = svc.ready_file.stat().st_mtime
    wait_until(lambda: in_rotation(b) == WORKERS, 10, interval_s=0.01)
    back_s = time.time() - listening
    print(f"workers back on the restarted gateway after {back_s * 1000:.0f} ms")
    assert back_s < max(2 * REPORT_INTERVAL_S + 0.3, 0.5), back_s
    with Client(b) as c:
        assert c.generate(token_ids=prompt(400), max_tokens=2).completion_tokens == 2
