"""What many tests need: waiting for a condition with a deadline (never a bare sleep), a kvstore
shard on port 0, a local cluster, and the metrics a service serves."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class NotReached(AssertionError):
    """A condition did not hold within its deadline."""


def wait_until(cond: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.02,
               what: str = "") -> T:
    """Polls `cond` until it returns something true, which it returns; NotReached (naming
    `what`) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise NotReached(f"not reached within {timeout_s:g} s: {what or cond}")
        time.sleep(interval_s)


async def async_wait_until(cond: Callable[[], T], timeout_s: float = 30.0,
                           interval_s: float = 0.01, what: str = "") -> T:
    """wait_until on an event loop: the loop keeps running while it polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if loop.time() > deadline:
            raise NotReached(f"not reached within {timeout_s:g} s: {what or cond}")
        await asyncio.sleep(interval_s)


async def eventually_async(cond: Callable[[], Awaitable[T]], timeout_s: float = 30.0,
                           interval_s: float = 0.05, what: str = "") -> T:
    """async_wait_until for an asynchronous condition."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = await cond()
        if got:
            return got
        if loop.time() > deadline:
            raise NotReached(f"not reached within {timeout_s:g} s: {what or cond}")
        await asyncio.sleep(interval_s)


class FakeClock:
    """A clock tests move by hand (for what ages: leases, quarantine, access times)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- real services -----------------------------------------------------------------------------
async def start_shard(path: Path, staging_mb: int = 0, lease_s: float = 10.0,
                      name: str = "", **store_settings: Any) -> Shard:
    """A kvstore shard (the real servicer over a real store) on port 0; with `staging_mb` a
    NIXL staging buffer too, its agent polled as the service does. `store_settings` go to
    BlockStore (capacity, watermarks, clock, ...)."""
    from pdserve.cache.store import BlockStore
    from pdserve.services.kvstore.servicer import KVStoreServicer
    from pdserve.services.kvstore.staging import StagingArea
    from pdserve.services.server import create_server
    from pdserve.v1 import kvstore_pb2_grpc

    store = BlockStore(path, **store_settings)
    staging = (StagingArea(name or f"kvstore-test-{path.name}-{time.time_ns()}",
                           staging_mb << 20, lease_s) if staging_mb else None)
    servicer = KVStoreServicer(store, staging)
    server, port, _ = await create_server(
        [lambda s: kvstore_pb2_grpc.add_KVStoreServicer_to_server(servicer, s)], [],
        "127.0.0.1", 0)
    poller = asyncio.create_task(staging.poll()) if staging is not None else None
    return Shard(server, store, staging, poller, f"127.0.0.1:{port}")


class Shard:
    def __init__(self, server: Any, store: Any, staging: Any, poller: asyncio.Task[None] | None,
                 address: str) -> None:
        self.server, self.store, self.staging = server, store, staging
        self.poller, self.address = poller, address

    async def stop(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
        await self.server.stop(0)
        if self.staging is not None:
            self.staging.close()
        self.store.close()


@contextmanager
def local_cluster(data_dir: Path, extra_env: dict[str, str] | None = None,
                  **settings: Any) -> Iterator[Any]:
    """`pdserve up` as real processes on free ports, stopped at the end."""
    from pdserve.cluster import LocalCluster
    from pdserve.config import UpSettings

    c = LocalCluster(UpSettings(data_dir=data_dir, port=0, **settings), progress=False,
                     extra_env=extra_env)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def read_metrics(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """{'name{labels}': value} from a Prometheus /metrics URL."""
    from pdserve.metrics import parse_metrics

    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return parse_metrics(r.read().decode())


def metric(url: str, name: str, timeout_s: float = 10.0) -> float:
    """One sample of a service's metrics (0 when absent)."""
    return read_metrics(url, timeout_s).get(name, 0.0)


def kv_rows(pool: Any, pages: Any, n_tokens: int) -> Any:
    """The KV of a prompt's first n_tokens tokens in its pages, every layer, as one tensor."""
    import torch

    bt = pool.layout.block_tokens
    return torch.cat([pool.kv[p, :, :min(bt, n_tokens - i * bt)].reshape(-1)
                      for i, p in enumerate(pages)])
