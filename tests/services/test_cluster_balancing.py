"""Two prefill and two decode workers as real processes: a burst spreads over all of them (by
the workers' own counters), a killed decode worker leaves rotation and later requests succeed,
and a restarted worker (new epoch) serves again without anything stale from its old life."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from pdserve.client import Client
from pdserve.cluster import LocalCluster
from pdserve.config import UpSettings
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from pdserve.scheduler.balancers import DUE_HORIZONS_S
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.helpers import service_metrics, wait_until

pytestmark = pytest.mark.integration  # starts processes

@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    # Prompts of 256 uncached tokens or more are pipelined over both prefill workers.
    c = LocalCluster(UpSettings(data_dir=Path(tmp_path_factory.mktemp("c2")), port=0,
                                num_prefill=2, num_decode=2, threads=1), progress=False,
                     extra_env={"PDSERVE_PIPELINE_MIN_TOKENS": "256"})
    c.start()
    yield c
    c.stop()


def workers(cluster, role):
    with grpc.insecure_channel(cluster.gateway_address) as ch:
        s = gateway_pb2_grpc.GatewayStub(ch).Stats(gateway_pb2.ClusterStatsRequest())
    return {w.worker_id: w for w in s.workers if w.role == role}


def ask(cluster, i, max_tokens=6):
    with Client(cluster.gateway_address) as c:
        return c.generate(token_ids=[1, 4093, 198] + [100 + i] * (40 + 10 * i) + [2, 198, 1, 520],
                          max_tokens=max_tokens, cache_salt=f"burst-{i}")


def wait_for(pred, timeout=30.0):
    wait_until(pred, timeout, interval_s=0.1)


def test_a_burst_spreads_over_every_worker(cluster2):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: ask(cluster2, i), range(8)))
    assert all(r.finish_reason in ("stop", "length") for r in results)
    wait_for(lambda: sum(w.num_finished for w in workers(cluster2, "decode").values()) == 8)
    for role in ("prefill", "decode"):
        done = {wid: w.num_finished for wid, w in workers(cluster2, role).items()}
        assert len(done) == 2 and sum(done.values()) == 8
        assert min(done.values()) >= 2, f"{role} burst not spread: {done}"
    # Each prefill worker reports how it orders prompts, for the balancer's ties: the rate its
    # steps measured, its slack, and its queue by deadline (empty now: all of it done); and
    # its deferrals' wait, for the gateway's Prefill deadline.
    idle = [0.0] * len(DUE_HORIZONS_S)
    wait_for(lambda: all(list(w.due_s) == idle for w in workers(cluster2, "prefill").values()))
    for w in workers(cluster2, "prefill").values():
        assert w.prefill_rate > 0 and w.prefill_slack == 3.0 and w.defer_wait_s == 100.0


def test_a_long_prompt_is_prefilled_by_both_workers_as_a_pipeline(cluster2, loaded):
    prompt = [1 + (i * 7919) % 40000 for i in range(700)]
    before = {n: service_metrics(cluster2, n) for n in ("prefill-0", "prefill-1")}
    with Client(cluster2.gateway_address) as c:
        r = c.generate(token_ids=prompt, max_tokens=8, cache_salt="pipeline")
    after = {n: service_metrics(cluster2, n) for n in ("prefill-0", "prefill-1")}

    def grew(name):
        return {n: after[n].get(name, 0) - before[n].get(name, 0) for n in after}

    # One worker headed it (the stages delivered), the other ran the first 15 layers.
    assert sorted(grew('pdserve_prefill_pipelined_total{outcome="ok"}').values()) == [0, 1]
    assert sorted(grew("pdserve_prefill_pipeline_stages_total").values()) == [0, 1]
    assert sum(grew('pdserve_prefill_pipelined_total{outcome="fallback"}').values()) == 0
    # The tokens of the single-process engine.
    eng = LLMEngine(ModelRunner(loaded.model, KVPool(loaded.layout, 64)))
    assert r.token_ids == eng.generate([prompt], SamplingParams(max_tokens=8))[0]


def test_a_burst_with_one_new_prefix_computes_it_once(cluster2):
    """Six prompts sharing 640 new tokens, sent at once: the first placed computes them; the
    others wait for its prefill (the gateway's prefix_wait_tokens, 512) and read them from the
    store, so the two prefill workers compute the prefix once, not up to six times."""
    prefix = [1 + (i * 104729) % 40000 for i in range(640)]

    def one(i):
        with Client(cluster2.gateway_address) as c:
            return c.generate(token_ids=prefix + [200 + i] * 30, max_tokens=4,
                              cache_salt="one-new-prefix")

    names = ("prefill-0", "prefill-1")
    before = {n: service_metrics(cluster2, n) for n in (*names, "gateway")}
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    after = {n: service_metrics(cluster2, n) for n in (*names, "gateway")}

    def grew(n, name):
        return after[n].get(name, 0) - before[n].get(name, 0)

    assert all(r.finish_reason in ("stop", "length") for r in results)
    assert sorted(r.cached_tokens for r in results) == [0] + [640] * 5
    assert grew("gateway", "pdserve_prefix_waits_total") == 5
    computed = sum(grew(n, "pdserve_prefill_computed_tokens_total") for n in names)
    assert computed == 640 + 6 * 30


def test_killed_decode_leaves_rotation_and_restart_serves_again(cluster2):
    old_epoch = workers(cluster2, "decode")["decode-0"].epoch
    cluster2.kill("decode-0")
    wait_for(lambda: "decode-0" not in workers(cluster2, "decode"))
    results = [ask(cluster2, 20 + i) for i in range(3)]
    assert all(r.completion_tokens > 0 for r in results)
    cluster2.restart("decode-0")
    wait_for(lambda: "decode-0" in workers(cluster2, "decode"))
    new = workers(cluster2, "decode")["decode-0"]
    assert new.in_rotation and new.epoch != old_epoch
    before = new.num_finished
    # Requests land on the restarted worker too, through its new agent and pages.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: ask(cluster2, 40 + i), range(6)))
    assert all(r.completion_tokens > 0 for r in results)
    wait_for(lambda: workers(cluster2, "decode")["decode-0"].num_finished > before)


def test_sigterm_drains_a_decode_worker_before_it_stops(cluster2):
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, cluster2, 60 + i, 40) for i in range(4)]
        wait_for(lambda: workers(cluster2, "decode").get("decode-1") is not None
                 and workers(cluster2, "decode")["decode-1"].running >= 1)
        svc = cluster2.service("decode-1")
        svc.terminate()  # SIGTERM: leave rotation, finish what was accepted, then exit
        results = [f.result(timeout=120) for f in futures]
    # Nothing cut short: every request ended by its own stop token or max_tokens.
    assert all((r.finish_reason, r.completion_tokens == 40) in (("stop", False), ("length", True))
               for r in results)
    assert svc.proc.wait(60) == 0
    wait_for(lambda: "decode-1" not in workers(cluster2, "decode"))
    assert ask(cluster2, 99).completion_tokens == 6  # the others still serve


def test_no_decode_room_is_resource_exhausted_with_a_retry_hint(tmp_path):
    """A decode pool of 8 pages (512 tokens): a request needing more is refused at once."""
    c = LocalCluster(UpSettings(data_dir=tmp_path, port=0, decode_pages=8, threads=1),
                     progress=False)
    c.start()
    try:
        with grpc.insecure_channel(c.gateway_address) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(gateway_pb2.GenerateRequest(
                    prompt_token_ids=[100] * 400, max_tokens=200)))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "KV pages" in e.value.details()
            assert ("retry-after-ms", "500") in e.value.trailing_metadata()
            ok = list(stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids=[100] * 100,
                                                                max_tokens=4)))
            assert ok[-1].finish_reason in ("stop", "length")
    finally:
        c.stop()
