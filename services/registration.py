"""Worker side of the registry: join every gateway and keep streaming load reports to each.

The stream is the membership: a gateway takes a worker out of rotation when its stream ends
or goes quiet, so a worker that dies needs no deregistration. Every gateway gets every
report, so each one routes on a whole view of the workers without talking to the others (no
consensus service: the workers' reports are the state, docs in README "Several gateways").

`--gateway` lists gateways as host:port, comma-separated; a host name that resolves to several
addresses (a Kubernetes headless Service) is one gateway per address. Names are looked up
again every `resolve_s`: a gateway that appears gets this worker's registration at once, one
that is gone from the name stops being called. Each gateway has its own stream and its own
reconnect, so one gateway's restart does not disturb the others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable

import grpc

from pdserve.config import parse_addresses
from pdserve.services.server import CHANNEL_OPTIONS, channel
from pdserve.v1 import common_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.1
# A gateway that restarts has this worker back within about two report intervals: the
# channel retries the connection at most this often, and the Join waits for it.
RECONNECT_MS = 200
_REGISTRATION_OPTIONS = [o for o in CHANNEL_OPTIONS if "reconnect_backoff" not in o[0]] + [
    ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MS)]


def _join_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(targets: list[tuple[str, int]], previous: dict[str, list[str]] | None = None
                  ) -> dict[str, list[str]]:
    """Each target's addresses: a literal address is itself; a name, every address it resolves
    to (IPv4 only when it has any: a dual-stack name lists each gateway twice), or, when the
    lookup fails, what it resolved to before (else the name itself, for gRPC to resolve)."""
    loop = asyncio.get_running_loop()
    out: dict[str, list[str]] = {}
    for host, port in targets:
        key = _join_host(host, port)
        try:
            ipaddress.ip_address(host)
            out[key] = [key]
            continue
        except ValueError:
            pass
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            out[key] = (previous or {}).get(key) or [key]
            log.warning("gateway name did not resolve", extra={"gateway": key, "why": str(e)})
            continue
        v4 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET})
        v6 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET6})
        out[key] = [_join_host(a, port) for a in (v4 or v6)] or [key]
    return out


async def join_gateway(
    address: str,
    info: common_pb2.WorkerInfo,
    load: Callable[[], common_pb2.LoadReport],
    stop: asyncio.Event,
    changed: asyncio.Event | None = None,
) -> None:
    """One gateway: register, then report every interval and at once when `changed` is set;
    on any failure register again as soon as the gateway answers (same epoch: same process,
    same memory)."""
    async with channel(address, _REGISTRATION_OPTIONS) as ch:
        stub = registry_pb2_grpc.RegistryStub(ch)
        while not stop.is_set():

            async def messages() -> AsyncIterator[registry_pb2.WorkerMessage]:
                yield registry_pb2.WorkerMessage(register=info)
                while not stop.is_set():
                    yield registry_pb2.WorkerMessage(load=load())
                    # Report every interval, or at once when the load changed.
                    waiter = changed.wait() if changed else asyncio.sleep(REPORT_INTERVAL_S)
                    try:
                        await asyncio.wait_for(waiter, REPORT_INTERVAL_S)
                    except asyncio.TimeoutError:
                        pass
                    if changed:
                        changed.clear()

            try:
                await stub.Join(messages(), wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                log.info("gateway connection lost", extra={"gateway": address,
                                                           "code": e.code().name})
            if not stop.is_set():
                await asyncio.sleep(REPORT_INTERVAL_S)


class Registrations:
    """This worker's streams to every gateway `spec` names, kept in step with the names."""

    def __init__(self, spec: str, resolve_s: float, info: common_pb2.WorkerInfo,
                 load: Callable[[], common_pb2.LoadReport], stop: asyncio.Event,
                 changed: asyncio.Event | None = None) -> None:
        self.targets = parse_addresses(spec)
        self.resolve_s = resolve_s
        self.info, self.load, self.stop, self.changed = info, load, stop, changed
        self.joins: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}

    @property
    def addresses(self) -> list[str]:
        return sorted(self.joins)

    def _sync(self, wanted: set[str]) -> None:
        for addr in set(self.joins) - wanted:
            task, _ = self.joins.pop(addr)
            task.cancel()
            log.info("gateway gone from --gateway, no longer joined", extra={"gateway": addr})
        for addr in sorted(wanted - set(self.joins)):
            event = asyncio.Event()
            task = asyncio.create_task(join_gateway(addr, self.info, self.load, self.stop,
                                                    event))
            self.joins[addr] = (task, event)

    async def _fan_out(self) -> None:
        """One `changed` for the worker, one per gateway stream: each hears every change."""
        assert self.changed is not None
        while not self.stop.is_set():
            await self.changed.wait()
            self.changed.clear()
            for _, event in self.joins.values():
                event.set()

    async def run(self) -> None:
        fan = asyncio.create_task(self._fan_out()) if self.changed is not None else None
        resolved: dict[str, list[str]] = {}
        try:
            while not self.stop.is_set():
                resolved = await resolve(self.targets, resolved)
                self._sync({a for addrs in resolved.values() for a in addrs})
                try:
                    await asyncio.wait_for(self.stop.wait(), self.resolve_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            if fan is not None:
                fan.cancel()
            for task, _ in self.joins.values():
                task.cancel()  # a stream to a gateway that is down may wait for it forever
            await asyncio.gather(*(t for t, _ in self.joins.values()), return_exceptions=True)
