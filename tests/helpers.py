"""What many tests need: waiting for a condition with a deadline (never a bare sleep), a kvstore
shard on port 0, a local cluster, and the metrics a service serves."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
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
               what: str | Callable[[], str] = "") -> T:
    """Polls `cond` until it returns something true, which it returns; NotReached (naming
    `what`, or what it returns then if it is a function) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise NotReached(f"not reached within {timeout_s:g} s: {said or cond}")
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
                      name: str = "", map_segments: bool = True,
                      **store_settings: Any) -> Shard:
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
                           staging_mb << 20, lease_s, map_segments) if staging_mb else None)
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


# -- the transformers reference -------------------------------------------------------------
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a hash chain is.",
]


def hf_greedy(hf, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Reference greedy tokens and, per step, the gap between the top-2 logits."""
    import torch

    model, tok = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tok.eos_token_id)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    gaps = []
    for s in out.scores:
        top = torch.topk(s[0].float(), 2).values
        gaps.append(float(top[0] - top[1]))
    return tokens, gaps


def assert_logits_follow(ref: Any, runner: Any, seq: list[int], pages: Any, steps: int,
                         atol: float = 1e-4) -> list[int]:
    """Prefill `seq` with `runner`, then decode `steps` greedy tokens (the reference's argmax):
    each step's logits must equal the reference model's (transformers, `ref(ids).logits`) on
    the whole sequence so far, within `atol`. Returns the sequence grown by the steps."""
    import torch

    seq = list(seq)
    logits = runner.prefill(seq, pages)
    for step in range(steps):
        with torch.no_grad():
            expect = ref(torch.tensor([seq])).logits[0, -1].float()
        torch.testing.assert_close(logits, expect, atol=atol, rtol=atol,
                                   msg=lambda m, step=step: f"step {step}: {m}")
        seq.append(int(torch.argmax(expect)))
        logits = runner.decode([seq[-1]], [len(seq)], [pages])[0]
    return seq


def agree_until_near_tie(ours: list[int], ref: list[int], gaps: list[float],
                         tie: float = 1e-3) -> int:
    """Number of leading tokens that must agree: up to (and including) the first step whose
    reference top-2 gap is below `tie`, where two faithful implementations may part."""
    n = min(len(ours), len(ref))
    for i in range(n):
        if gaps[i] < tie:
            return i  # tokens before the near-tie must agree; the tie itself may differ
    return n


def start_store_process(data: Path, ready: Path) -> tuple[Any, int]:
    """`pdserve kvstore` as a process on a free port; (process, port) once it is ready."""
    ready.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-m", "pdserve", "kvstore", "--port", "0",
                          "--data-dir", str(data), "--sync", "every_write",
                          "--ready-file", str(ready)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def started() -> bool:
        assert p.poll() is None, p.stderr.read().decode() if p.stderr else "kvstore exited"
        return ready.exists()

    wait_until(started, 60, what="the kvstore process ready")
    return p, json.loads(ready.read_text())["port"]


def ledger_row(i: int, **kw: Any) -> dict[str, Any]:
    """A ledger row with plausible values, `kw` replacing some."""
    base = dict(ts=1_700_000_000.0 + i, request_id=f"r{i}", tenant="t", model="m", status="OK",
                finish_reason="stop", prompt_tokens=100, cached_tokens=64, completion_tokens=5,
                ttft_s=0.1, tpot_s=0.01, e2e_s=0.2, prefill_worker="p0", decode_worker="d0",
                kv_bytes=1000, fetch_s=0.001, compute_s=0.05, miss_reason="partial_block",
                error="", attempts=1, gateway="")
    base.update(kw)
    return base


def service_metrics(c: Any, name: str) -> dict[str, float]:
    """A local cluster's service's /metrics, parsed."""
    return read_metrics(f"http://127.0.0.1:{c.service(name).metrics_port}/metrics", 5)
