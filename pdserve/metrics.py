"""Prometheus metrics: one registry per process, served on `--metrics-port` at /metrics.

Token counters of requests (prompt, cached by source, completion) live only on the gateway, which
sees each request exactly once: summing `pdserve_cached_tokens_total` over every service counts
each hit once. Workers export the work they did under their own names (`pdserve_prefill_*`,
`pdserve_decode_*`), and the kvstore its block counters (`pdserve_store_*`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pdserve.cache.records import StoreStats
    from pdserve.engine.ep.hooks import EPHooks
    from pdserve.engine.scheduler import Scheduler
    from pdserve.services.kvstore.staging import StagingArea
    from pdserve.services.transfer import NixlEndpoint

log = logging.getLogger(__name__)


class PagePool(Protocol):
    """What the pool gauges read (engine/kv_pool.py; no torch import here)."""

    @property
    def num_pages(self) -> int: ...

    @property
    def num_free(self) -> int: ...

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int | None:
    """Starts the /metrics HTTP server (port 0 = any free port); None when port < 0 (off)."""
    if port < 0:
        return None
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        from pdserve.services.server import ListenError

        raise ListenError(f"--metrics-port {port}: cannot listen on {host}:{port}: {e}") \
            from None
    actual = server.server_port
    log.info("metrics serving", extra={"port": actual})
    return actual


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("pdserve_requests", "requests by final status", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "prompt tokens of admitted requests",
                                     registry=r)
        self.cached_tokens = Counter("pdserve_cached_tokens",
                                     "prompt tokens served from a KV cache instead of computed",
                                     ["source"], registry=r)
        self.uncached_tokens = Counter("pdserve_uncached_tokens",
                                       "prompt tokens computed, by the reason they missed",
                                       ["reason"], registry=r)
        self.completion_tokens = Counter("pdserve_completion_tokens", "generated tokens",
                                         registry=r)
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved prefill -> decode",
                                registry=r)
        self.ttft = Histogram("pdserve_ttft_seconds", "time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdserve_inter_token_latency_seconds",
                             "time between streamed tokens", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_e2e_seconds", "request time, arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("pdserve_requests_in_flight", "requests being served", registry=r)
        self.retries = Counter("pdserve_request_retries", "attempts restarted on another worker "
                               "(stage: prefill = before any token, decode = migration)",
                               ["stage"], registry=r)
        self.reserve_refused = Counter(
            "pdserve_reserve_refused", "decode reservations refused for room and placed on the "
            "next candidate (several gateways placed on the same loads between reports)",
            registry=r)
        self.prefix_waits = Counter(
            "pdserve_prefix_waits", "requests that waited for another request computing their "
            "next prefix blocks instead of computing them again", registry=r)
        self.workers = Gauge("pdserve_workers_in_rotation", "workers taking requests", ["role"],
                             registry=r)
        self.queued_tokens = Gauge("pdserve_cluster_queued_tokens",
                                   "prompt tokens waiting on prefill workers (last reports)",
                                   registry=r)
        self.kv_usage = Gauge("pdserve_cluster_decode_kv_usage",
                              "share of decode KV pages in use (last reports)", registry=r)
        self.ledger_pending = Gauge("pdserve_ledger_pending_rows", "ledger rows not yet written",
                                    registry=r)
        self.ledger_dropped = Gauge("pdserve_ledger_dropped_rows",
                                    "ledger rows dropped because the writer fell behind",
                                    registry=r)


class _WorkerMetrics:
    """What prefill and decode workers share: pool occupancy and transfers."""

    def __init__(self, registry: CollectorRegistry, role: str) -> None:
        r = registry
        self.pages_used = Gauge("pdserve_kv_pages_used", "KV pages in use", registry=r)
        self.pages_total = Gauge("pdserve_kv_pages_total", "KV pages in the pool", registry=r)
        self.pages_usage = Gauge("pdserve_kv_usage_ratio", "share of KV pages in use (an "
                                 "autoscaling signal)", registry=r)
        self.transfer_bytes = Counter(f"pdserve_{role}_transfer_bytes",
                                      "KV bytes sent (prefill) or received (decode) over NIXL",
                                      registry=r)
        self.transfer_seconds = Histogram(f"pdserve_{role}_transfer_seconds",
                                          "KV transfer time per request" if role == "prefill"
                                          else "reservation to KV landed, per request",
                                          buckets=LATENCY_BUCKETS, registry=r)

    def watch_pool(self, pool: PagePool) -> None:
        """The pool gauges read the pool at scrape time."""
        self.pages_total.set_function(lambda: pool.num_pages)
        self.pages_used.set_function(lambda: pool.num_pages - pool.num_free)
        self.pages_usage.set_function(lambda: 1 - pool.num_free / pool.num_pages)


class PrefillMetrics(_WorkerMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "prefill")
        r = registry
        self.queue = Gauge("pdserve_prefill_queue_requests", "prompts in the compute queue",
                           registry=r)
        self.queued_tokens = Gauge("pdserve_prefill_queued_tokens",
                                   "prompt tokens still to compute", registry=r)
        self.parked = Gauge("pdserve_prefill_parked_requests", "prompts in the compute queue "
                            "that hold no KV pages yet (their turn is more than a step away)",
                            registry=r)
        self.computed_tokens = Counter("pdserve_prefill_computed_tokens",
                                       "prompt tokens computed", registry=r)
        self.fetched_tokens = Counter("pdserve_prefill_fetched_tokens",
                                      "prompt tokens read from the kvstore", registry=r)
        self.pipelined = Counter("pdserve_prefill_pipelined", "prompts this worker headed "
                                 "as a pipelined prefill, by outcome (ok: the stages "
                                 "delivered; fallback: computed here alone)", ["outcome"],
                                 registry=r)
        self.pipeline_stages = Counter("pdserve_prefill_pipeline_stages", "pipeline stages "
                                       "run for prompts other workers headed", registry=r)
        self.page_waits = Counter("pdserve_prefill_page_waits", "prompts that waited for this "
                                  "worker's KV pages (more prompt queued than its pool holds, "
                                  "--num-pages)", registry=r)
        self.lease_renewals = Counter("pdserve_prefill_lease_renewals", "decode reservations' "
                                      "leases renewed while their prompts waited or computed "
                                      "here", registry=r)
        self.fetch_seconds = Histogram("pdserve_prefill_fetch_seconds",
                                       "time reading cached blocks per request",
                                       buckets=LATENCY_BUCKETS, registry=r)


class DecodeMetrics(_WorkerMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "decode")
        r = registry
        self.running = Gauge("pdserve_decode_running", "requests decoding", registry=r)
        self.waiting = Gauge("pdserve_decode_waiting_kv",
                             "requests with pages reserved, waiting for their KV", registry=r)
        self.tokens = Counter("pdserve_decode_tokens", "tokens decoded", registry=r)
        self.quarantined = Gauge("pdserve_decode_quarantined_pages", "pages of abandoned "
                                 "reservations held until no late WRITE can reach them",
                                 registry=r)
        self.failed = Counter("pdserve_decode_failed", "requests failed on this worker",
                              ["reason"], registry=r)
        self.threads = Gauge("pdserve_decode_threads", "OpenMP threads decode steps run with "
                             "(--adapt-threads lowers it while other work holds the cores; 0 "
                             "before the first step)", registry=r)


class StoreCollector(Collector):
    """Reads the store's own (persisted) counters at scrape time."""

    def __init__(self, stats: Callable[[], StoreStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, help_ in (("hits", "blocks found by lookups and gets"),
                            ("misses", "blocks asked for and not found"),
                            ("puts", "blocks stored"),
                            ("evicted", "blocks evicted (capacity)"),
                            ("expired", "blocks expired (age)"),
                            ("corrupt", "corrupt blocks found and deleted"),
                            ("write_errors", "writes the disk refused")):
            c = CounterMetricFamily(f"pdserve_store_{name}", help_)
            c.add_metric([], getattr(s, name))
            yield c
        for name, help_, value in (("blocks", "blocks stored", s.num_blocks),
                                   ("bytes", "bytes stored", s.num_bytes)):
            g = GaugeMetricFamily(f"pdserve_store_{name}", help_)
            g.add_metric([], value)
            yield g


class StagingCollector(Collector):
    """The kvstore's NIXL staging buffer (services/staging.py), read at scrape time."""

    def __init__(self, staging: StagingArea) -> None:
        self._staging = staging

    def collect(self) -> Iterator[Metric]:
        st = self._staging
        for name, help_, value in (
                ("staged_blocks", "blocks staged for NIXL READ, copied into the buffer",
                 st.staged_blocks),
                ("staged_in_place_blocks", "blocks staged for NIXL READ where they lie (their "
                 "segment files mapped)", st.mapped_blocks),
                ("stage_released", "staged regions released by their reader", st.released),
                ("stage_expired", "staged regions dropped when their lease ended", st.expired),
                ("staged_mismatched", "staged blocks a reader found not matching their "
                 "checksum (then verified by the store)", st.mismatched)):
            c = CounterMetricFamily(f"pdserve_store_{name}", help_)
            c.add_metric([], value)
            yield c
        for name, help_, value in (
                ("staging_bytes", "size of the NIXL staging buffer", st.extents.size),
                ("staging_leased_bytes", "staging bytes held for readers",
                 st.extents.size - st.extents.free_bytes),
                ("staging_mapped_segments", "segment files mapped for in-place staging",
                 st.mapped_segments)):
            g = GaugeMetricFamily(f"pdserve_store_{name}", help_)
            g.add_metric([], value)
            yield g


class StoreReadCollector(Collector):
    """A prefill worker's NIXL READs (services/transfer.py; its own agent's and its read
    lanes'), read at scrape time: READs that landed, READs of staged blocks that failed (those
    blocks then computed again: a hit lost), and the times a store's regions were forgotten
    because it had closed some (a reload, not an error)."""

    def __init__(self, endpoint: NixlEndpoint) -> None:
        self._endpoint = endpoint

    def collect(self) -> Iterator[Metric]:
        readers = [self._endpoint, *(lane.endpoint for lane in self._endpoint.lanes)]
        eps = [e for e in readers if e is not None]  # with its read lanes, once made
        for name, help_, value in (
                ("store_reads", "NIXL READs that landed (blocks staged by a kvstore; a "
                 "pipeline stage's pages from the stage before)",
                 sum(e.reads for e in eps)),
                ("store_read_failures", "NIXL READs of staged blocks that failed or timed out "
                 "(those blocks then computed again)", sum(e.read_failures for e in eps)),
                ("store_regions_forgotten", "times a kvstore's regions were forgotten, it "
                 "having closed some since they were loaded",
                 sum(e.regions_forgotten for e in eps))):
            c = CounterMetricFamily(f"pdserve_prefill_{name}", help_)
            c.add_metric([], value)
            yield c


class PrefillOrderCollector(Collector):
    """A prefill worker's deadline order (engine/scheduler.py), read at scrape time: the
    prefill rate its deadlines are set with, how many prompts (and pipeline stages) ended
    after their deadline (many: the worker is overloaded, or `--prefill-slack` is tight) and
    how many it deferred."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        s = self._scheduler
        g = GaugeMetricFamily("pdserve_prefill_rate_tokens_per_second", "the prefill rate "
                              "this worker measured (tokens' worth of work a second, "
                              "attention counted), which its prompts' deadlines are set with")
        g.add_metric([], s.rate.per_second)
        yield g
        c = CounterMetricFamily("pdserve_prefill_late_prompts", "prompts (and pipeline "
                                "stages) whose prefill ended after their deadline (with "
                                "--prefill-slack > 0, once a first prefill step measured "
                                "the rate)")
        c.add_metric([], s.num_late)
        yield c
        c = CounterMetricFamily("pdserve_prefill_deferred_prompts", "prompts (and pipeline "
                                "stages) this worker deferred while overloaded "
                                "(--prefill-defer-share)")
        c.add_metric([], s.num_deferred)
        yield c


class EPCollector(Collector):
    """A rank of an expert-parallel group (engine/ep/), read at scrape time: the rows it
    dispatched and its experts received, the bytes it sent, the group's rebalances, and the
    group's load balance in the last EPLB window (max/mean rows over the ranks)."""

    def __init__(self, hooks: EPHooks) -> None:
        self._hooks = hooks

    def collect(self) -> Iterator[Metric]:
        ep, eplb = self._hooks.ep, self._hooks.eplb
        comm, stats = ep.comm, ep.stats
        for name, help_, value in (
                ("moe_dispatched_tokens", "(token, expert) rows this rank dispatched",
                 stats.sent_rows),
                ("moe_received_tokens", "rows this rank's experts computed", stats.received_rows),
                ("moe_dispatch_bytes", "bytes of the rows this rank dispatched (values and "
                 "scales, as --ep-dispatch-dtype sends them)", stats.dispatch_bytes),
                ("tbo_steps", "group steps this rank ran as two overlapped micro-batches",
                 self._hooks.overlapped_steps),
                ("eplb_rebalances", "expert placements applied",
                 0 if eplb is None else eplb.rebalances),
                ("ep_idle_steps", "group steps this rank joined with nothing of its own",
                 self._hooks.idle_steps)):
            c = CounterMetricFamily(f"pdserve_{name}", help_)
            c.add_metric([], value)
            yield c
        w = CounterMetricFamily("pdserve_moe_wait_seconds", "time this rank waited for "
                                "dispatches and combines to land (what overlap did not hide)")
        w.add_metric([], stats.wait_s)
        yield w
        g = GaugeMetricFamily("pdserve_moe_load_max_over_mean",
                              "the group's max/mean expert load over the ranks in the last "
                              "EPLB window, under the placement it had then (1 before any)")
        g.add_metric([], 1.0 if eplb is None or eplb.balance is None else eplb.balance[0])
        yield g
        info = GaugeMetricFamily("pdserve_ep_rank", "this worker's rank in its EP group",
                                 labels=["size"])
        info.add_metric([str(comm.size)], comm.rank)
        yield info


def watch_ep(registry: CollectorRegistry, hooks: object) -> None:
    """Registers an EPCollector when `hooks` are an EP group's."""
    from pdserve.engine.ep.hooks import EPHooks

    if isinstance(hooks, EPHooks):
        registry.register(EPCollector(hooks))


def parse_metrics(text: str) -> dict[str, float]:
    """{'name{labels}': value} from the Prometheus text format (for tests and `up`)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
