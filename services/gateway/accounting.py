"""Request accounting at the gateway: the outcome of each request, its miss reason, its ledger
row and the Prometheus counters, and the workers' load samples. One place, so the ledger and the
metrics always count the same requests."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.cache.analytics import run_named
from pdserve.cache.block_hash import BlockHash, block_hashes
from pdserve.cache.ledger import Ledger, MissReason
from pdserve.metrics import GatewayMetrics
from pdserve.scheduler.registry import Role, WorkerRegistry, WorkerSpec
from pdserve.services.kvstore_client import LookupResult
from pdserve.v1 import gateway_pb2

TENANT_MEMORY = 1 << 20  # unsalted block prefixes remembered for the different_salt reason


def tenant_of(cache_salt: str) -> str:
    """The ledger's tenant: a hash of the cache salt (never the salt itself); '' = no salt."""
    return hashlib.sha256(cache_salt.encode()).hexdigest()[:16] if cache_salt else ""


@dataclass
class Outcome:
    """What the ledger row of one request says; filled in as the request goes."""

    ts: float
    t0: float
    request_id: str
    tenant: str
    status: str | None = None
    error: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prefill_worker: str = ""
    decode_worker: str = ""
    kv_bytes: int = 0
    fetch_s: float = 0.0
    compute_s: float = 0.0
    miss_reason: MissReason | None = None
    attempts: int = 1


def kv_usage(registry: WorkerRegistry) -> float:
    ws = registry.active(Role.DECODE)
    total = sum(w.load.total_pages for w in ws)
    return sum(w.load.total_pages - w.load.free_pages for w in ws) / total if total else 0.0


class Accounting:
    def __init__(self, registry: WorkerRegistry, ledger: Ledger | None,
                 metrics: GatewayMetrics | None, data_dir: Path | None) -> None:
        self.registry = registry
        self.ledger = ledger
        self.metrics = metrics
        self.data_dir = data_dir
        if ledger is not None and metrics is not None:  # read at scrape time, not per request
            metrics.ledger_pending.set_function(lambda: ledger.requests.pending)
            metrics.ledger_dropped.set_function(lambda: ledger.requests.dropped)
        # unsalted block-prefix hash (8 bytes) -> tenant that last sent it
        self._prefix_tenants: OrderedDict[bytes, str] = OrderedDict()

    def miss_reason(self, spec: WorkerSpec, salt: str, prompt: list[int], keys: list[BlockHash],
                    cacheable: int, found: LookupResult, cached_blocks: int,
                    tenant: str) -> MissReason:
        """Why the first uncached token was not a hit (cache/ledger.py MISS_REASONS); also
        remembers this prompt's blocks for the different_salt answer of later requests."""
        unsalted = keys if not salt else block_hashes(spec.hash_namespace, "", prompt,
                                                      spec.block_tokens)
        if cached_blocks >= cacheable:
            reason = MissReason.PARTIAL_BLOCK
        elif found.prefix is None:
            reason = MissReason.STORE_UNAVAILABLE
        elif cached_blocks < found.prefix:
            reason = MissReason.FETCH_FAILED
        elif found.first_miss_evicted:
            reason = MissReason.EVICTED
        elif self._prefix_tenants.get(unsalted[cached_blocks][:8], tenant) != tenant:
            reason = MissReason.DIFFERENT_SALT
        else:
            reason = MissReason.NEVER_SEEN
        for k in unsalted[:cacheable]:
            self._prefix_tenants[k[:8]] = tenant
            self._prefix_tenants.move_to_end(k[:8])
        while len(self._prefix_tenants) > TENANT_MEMORY:
            self._prefix_tenants.popitem(last=False)
        return reason

    def record(self, rec: Outcome) -> None:
        e2e = time.monotonic() - rec.t0
        n = rec.completion_tokens
        tpot = (e2e - rec.ttft_s) / (n - 1) if n > 1 else 0.0
        m = self.metrics
        if m is not None:
            m.requests.labels(rec.status).inc()
            m.prompt_tokens.inc(rec.prompt_tokens)
            m.cached_tokens.labels("store").inc(rec.cached_tokens)
            if rec.prompt_tokens > rec.cached_tokens and rec.miss_reason is not None:
                m.uncached_tokens.labels(rec.miss_reason.value).inc(
                    rec.prompt_tokens - rec.cached_tokens)
            m.completion_tokens.inc(n)
            m.kv_bytes.inc(rec.kv_bytes)
            if rec.status == "OK":
                m.ttft.observe(rec.ttft_s)
                m.e2e.observe(e2e)
        if self.ledger is not None:
            self.ledger.record_request(
                ts=rec.ts, request_id=rec.request_id, tenant=rec.tenant,
                model=self.model_id(), status=rec.status or "INTERNAL",
                finish_reason=rec.finish_reason, prompt_tokens=rec.prompt_tokens,
                cached_tokens=rec.cached_tokens, completion_tokens=n, ttft_s=rec.ttft_s,
                tpot_s=tpot, e2e_s=e2e, prefill_worker=rec.prefill_worker,
                decode_worker=rec.decode_worker, kv_bytes=rec.kv_bytes, fetch_s=rec.fetch_s,
                compute_s=rec.compute_s,
                miss_reason=rec.miss_reason.value if rec.miss_reason is not None else "",
                error=rec.error,
                attempts=rec.attempts)

    def model_id(self) -> str:
        return next((w.spec.model_id for w in self.registry.workers.values()), "")

    async def sample_workers(self, every_s: float, stop: asyncio.Event) -> None:
        """Writes every worker's last load report into the ledger's `workers` table."""
        while not stop.is_set():
            # In the middle of the wall-clock slots of `every_s` seconds, as every gateway
            # does: the report counts a worker once per slot (cache/analytics.py).
            wait = every_s - (time.time() - every_s / 2) % every_s
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except asyncio.TimeoutError:
                pass
            now = time.time()
            if self.ledger is None:
                return
            for w in list(self.registry.workers.values()):
                ld = w.load
                self.ledger.record_worker(
                    ts=now, worker_id=w.spec.worker_id, role=w.spec.role.value,
                    in_rotation=w.in_rotation, running=ld.running,
                    queued_tokens=ld.queued_tokens, used_pages=ld.total_pages - ld.free_pages,
                    total_pages=ld.total_pages, interval_s=every_s)

    def query(self, name: str, params: dict[str, str]
              ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """A named ledger query (blocking: run it in a thread); rows queued so far included."""
        assert self.ledger is not None and self.data_dir is not None
        self.ledger.flush()
        return run_named(self.data_dir, name, params)


def analytics_value(v: Any) -> gateway_pb2.AnalyticsValue:
    if v is None:
        return gateway_pb2.AnalyticsValue()
    if isinstance(v, bool):
        return gateway_pb2.AnalyticsValue(b=v)
    if isinstance(v, int) and -(1 << 63) <= v < (1 << 63):
        return gateway_pb2.AnalyticsValue(i=v)
    if isinstance(v, float):
        return gateway_pb2.AnalyticsValue(d=v)
    if isinstance(v, (dt.datetime, dt.date)):
        return gateway_pb2.AnalyticsValue(s=v.isoformat())
    try:  # Decimal and friends
        return gateway_pb2.AnalyticsValue(d=float(v))
    except (TypeError, ValueError):
        return gateway_pb2.AnalyticsValue(s=str(v))


