"""A worker's registrations with several gateways, over real gRPC registry servers on port 0
(no model): one stream per gateway, every report to each, a restarted gateway joined again
at once, a name resolving to several addresses taken as several gateways."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.config import parse_addresses
from pdserve.scheduler.balancers import DUE_HORIZONS_S
from pdserve.scheduler.registry import WorkerRegistry
from pdserve.services.gateway.membership import RegistryServicer, load_of
from pdserve.services.registration import REPORT_INTERVAL_S, Registrations, resolve
from pdserve.services.server import create_server
from pdserve.v1 import common_pb2, registry_pb2_grpc
from tests.helpers import async_wait_until

INFO = common_pb2.WorkerInfo(
    worker_id="decode-7", role="decode", address="127.0.0.1:1", epoch=1, hash_namespace="ns",
    layout_fingerprint="fp", block_tokens=16, total_pages=10, max_context=100, vocab_size=50)


async def gateway(port: int = 0):
    registry = WorkerRegistry()
    server, bound, _ = await create_server(
        [lambda s: registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(registry),
                                                                     s)],
        [], "127.0.0.1", port)
    return server, bound, registry


async def test_a_worker_reports_to_every_gateway_and_rejoins_a_restarted_one_at_once():
    (s1, p1, r1), (s2, p2, r2) = await gateway(), await gateway()
    free = {"pages": 10}
    stop, changed = asyncio.Event(), asyncio.Event()

    def load() -> common_pb2.LoadReport:
        return common_pb2.LoadReport(free_pages=free["pages"], total_pages=10)

    joins = Registrations(f"127.0.0.1:{p1}, 127.0.0.1:{p2}", 60.0, INFO, load, stop, changed)
    task = asyncio.create_task(joins.run())
    try:
        await async_wait_until(lambda: "decode-7" in r1.workers and "decode-7" in r2.workers,
                               10, what="registered with both")
        assert joins.addresses == sorted([f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"])
        # A change reaches both gateways at once (not only at the next interval).
        free["pages"] = 3
        changed.set()
        await async_wait_until(
            lambda: r1.workers["decode-7"].load.free_pages == 3
            and r2.workers["decode-7"].load.free_pages == 3, 5, what="the change at both")
        # One gateway goes away and comes back on its port: the other never loses the worker,
        # and the new one has it again within about two report intervals of listening.
        await s2.stop(0)
        s2, _, r2 = await gateway(p2)
        t0 = time.monotonic()
        await async_wait_until(lambda: "decode-7" in r2.workers, 10, interval_s=0.005,
                               what="registered with the restarted gateway")
        back = time.monotonic() - t0
        assert back < 4 * REPORT_INTERVAL_S, back
        assert r1.workers["decode-7"].in_rotation  # the other gateway kept it all along
        assert r1.workers["decode-7"].last_report > t0  # and its reports went on
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await s1.stop(0)
        await s2.stop(0)
    # Stopping ends both streams: each gateway sees the worker leave.
    assert "decode-7" not in r1.workers


def test_a_load_report_keeps_a_prefill_queue_profile_only_when_it_is_one():
    good = [0.0, 1.0] + [2.0] * (len(DUE_HORIZONS_S) - 2)
    ld = load_of(common_pb2.LoadReport(due_s=good, prefill_rate=500.0, prefill_slack=3.0))
    assert (ld.due_s, ld.prefill_rate, ld.prefill_slack) == (tuple(good), 500.0, 3.0)
    assert ld.due_in(100.0) == 0.6  # due 3 x its own 0.2 s after it is placed
    # How long the gateway's Prefill call waits beyond rpc_timeout_s: until the prompt is
    # due there, or, where the worker defers prompts, the deferral's wait if longer.
    assert ld.defer_wait_s == 0 and ld.may_hold(100.0) == 0.6
    ld = load_of(common_pb2.LoadReport(prefill_rate=500.0, prefill_slack=3.0, defer_wait_s=100))
    assert (ld.defer_wait_s, ld.may_hold(100.0), ld.may_hold(1e6)) == (100.0, 100.0, 6000.0)
    # A profile of the wrong length, or with a value that is not a time, is dropped (it only
    # breaks ties), as are a rate or slack that are not ones; the rest of the report stands.
    for bad in (good[:-1], [float("nan")] + good[1:], [-1.0] + good[1:]):
        ld = load_of(common_pb2.LoadReport(due_s=bad, free_pages=7, prefill_rate=-5.0,
                                           prefill_slack=float("inf"), defer_wait_s=-1))
        assert (ld.due_s, ld.prefill_rate, ld.prefill_slack, ld.defer_wait_s,
                ld.free_pages) == ((), 0, 0, 0, 7)


async def test_names_resolve_to_every_address_and_literals_stay():
    assert parse_addresses("a:1, [::1]:2,10.0.0.1:3") == [("a", 1), ("::1", 2), ("10.0.0.1", 3)]
    got = await resolve([("localhost", 50051), ("10.1.2.3", 7), ("::1", 9)])
    # localhost: its IPv4 address only (a dual-stack name would list each gateway twice).
    assert got == {"localhost:50051": ["127.0.0.1:50051"], "10.1.2.3:7": ["10.1.2.3:7"],
                   "[::1]:9": ["[::1]:9"]}
    # A name that does not resolve keeps what it resolved to before (else the name itself).
    missing = ("no-such-gateway.invalid", 1)
    assert await resolve([missing]) == {"no-such-gateway.invalid:1": ["no-such-gateway.invalid:1"]}
    before = {"no-such-gateway.invalid:1": ["10.9.9.9:1", "10.9.9.8:1"]}
    assert await resolve([missing], before) == before


@pytest.mark.parametrize("spec", ["", "a", "a:0", "a:x", ":5"])
def test_bad_gateway_lists_are_refused_naming_the_flag(spec):
    from pdserve.config import DecodeSettings, SettingsError, load_settings

    with pytest.raises(SettingsError, match="--gateway"):
        load_settings(DecodeSettings, gateway=spec)
