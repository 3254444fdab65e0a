"""Named ledger queries and the period report (the shape of DeepSeek's daily statistics).

Named queries take the parameters `since` / `until` (ISO-8601 time or Unix seconds; the period
is [since, until)), `tenant` (optional filter) and `limit` (rows, for `slowest`). They are the
only queries the gateway's `QueryAnalytics` RPC runs; arbitrary SQL is for the local CLI.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pdserve.cache.errors import QueryError
from pdserve.cache.ledger import run_query

_PERIOD = "ts >= $since AND ts < $until AND ($tenant IS NULL OR tenant = $tenant)"
_OK = f"status = 'OK' AND {_PERIOD}"
_HIT = ("sum(prompt_tokens) AS prompt_tokens, sum(cached_tokens) AS cached_tokens, "
        "round(sum(cached_tokens) / nullif(sum(prompt_tokens), 0), 4) AS hit_share")

NAMED_QUERIES: dict[str, tuple[str, str]] = {
    "hit_share_by_hour": (
        "share of prompt tokens served from the KV cache, per hour",
        f"SELECT date_trunc('hour', ts) AS hour, count(*) AS requests, {_HIT} "
        f"FROM requests WHERE {_OK} GROUP BY 1 ORDER BY 1"),
    "hit_share_by_tenant": (
        "hit share per tenant (hashed cache salt)",
        f"SELECT tenant, count(*) AS requests, {_HIT} "
        f"FROM requests WHERE {_OK} GROUP BY 1 ORDER BY prompt_tokens DESC, tenant"),
    "hit_share_by_prompt_length": (
        "hit share per prompt length bucket (powers of 4 tokens)",
        "SELECT CASE WHEN prompt_tokens < 256 THEN '0-255' "
        "WHEN prompt_tokens < 1024 THEN '256-1023' WHEN prompt_tokens < 4096 THEN '1024-4095' "
        "WHEN prompt_tokens < 16384 THEN '4096-16383' ELSE '16384+' END AS bucket, "
        f"min(prompt_tokens) AS min_len, count(*) AS requests, {_HIT} "
        f"FROM requests WHERE {_OK} GROUP BY 1 ORDER BY min(prompt_tokens)"),
    "miss_reasons": (
        "why the uncached tokens were not hits (reason of each request's first uncached token)",
        "SELECT miss_reason, count(*) AS requests, "
        "sum(prompt_tokens - cached_tokens) AS uncached_tokens "
        f"FROM requests WHERE {_OK} AND prompt_tokens > cached_tokens "
        "GROUP BY 1 ORDER BY uncached_tokens DESC, miss_reason"),
    "savings": (
        "tokens and prefill compute the cache saved (compute priced at the measured seconds "
        "per computed prompt token)",
        "SELECT count(*) AS requests, sum(cached_tokens) AS cached_tokens, "
        "sum(prompt_tokens - cached_tokens) AS computed_tokens, "
        "sum(compute_s) AS compute_s, "
        "sum(cached_tokens) * sum(compute_s) / nullif(sum(prompt_tokens - cached_tokens), 0) "
        "AS compute_s_saved, sum(fetch_s) AS fetch_s "
        f"FROM requests WHERE {_OK}"),
    "status_counts": (
        "requests per final status",
        f"SELECT status, count(*) AS requests FROM requests WHERE {_PERIOD} "
        "GROUP BY 1 ORDER BY 2 DESC, 1"),
    "slowest": (
        "the slowest requests by end-to-end time",
        "SELECT ts, request_id, tenant, status, prompt_tokens, cached_tokens, completion_tokens, "
        "ttft_s, e2e_s, prefill_worker, decode_worker, miss_reason "
        f"FROM requests WHERE {_PERIOD} ORDER BY e2e_s DESC, request_id LIMIT $limit"),
}

MAX_LIMIT = 10_000
_FAR_PAST = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_FAR_FUTURE = dt.datetime(9999, 1, 1, tzinfo=dt.timezone.utc)


def parse_time(name: str, value: str | None, default: dt.datetime) -> dt.datetime:
    if value is None or value == "":
        return default
    try:
        t = dt.datetime.fromtimestamp(float(value), dt.timezone.utc)
    except ValueError:
        try:
            t = dt.datetime.fromisoformat(value)
        except ValueError:
            raise QueryError(f"{name}: {value!r} is neither ISO-8601 time nor Unix seconds") \
                from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
    return t


def query_params(params: dict[str, str]) -> dict[str, Any]:
    unknown = set(params) - {"since", "until", "tenant", "limit"}
    if unknown:
        raise QueryError(f"params: unknown {sorted(unknown)}; known: since, until, tenant, limit")
    try:
        limit = int(params.get("limit") or 20)
    except ValueError:
        raise QueryError(f"limit: {params['limit']!r} is not an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit: {limit}, must be in [1, {MAX_LIMIT}]")
    return {"since": parse_time("since", params.get("since"), _FAR_PAST),
            "until": parse_time("until", params.get("until"), _FAR_FUTURE),
            "tenant": params.get("tenant") or None, "limit": limit}


def run_named(data_dir: Path, name: str, params: dict[str, str] | None = None
              ) -> tuple[list[str], list[tuple[Any, ...]]]:
    if name not in NAMED_QUERIES:
        raise QueryError(f"query: unknown {name!r}; one of {', '.join(NAMED_QUERIES)}")
    sql = NAMED_QUERIES[name][1]
    values = query_params(params or {})
    used = set(re.findall(r"\$(\w+)", sql))
    return run_query(data_dir, sql, {k: v for k, v in values.items() if k in used},
                     max_rows=MAX_LIMIT)


# -- the report --------------------------------------------------------------------------------
@dataclass
class Prices:
    gpu_hour: float = 2.0           # USD per GPU-hour (DeepSeek's H800 rental assumption)
    gpus_per_worker: int = 1
    input_hit_per_m: float = 0.14   # USD per million input tokens served from the KV cache
    input_miss_per_m: float = 0.55  # USD per million input tokens computed
    output_per_m: float = 2.19      # USD per million output tokens


@dataclass
class Report:
    since: str
    until: str
    requests: int
    failed_requests: int
    input_tokens: int
    cached_input_tokens: int
    cache_hit_share: float
    output_tokens: int
    avg_output_tokens_per_s: float      # per request, after its first token
    avg_kv_length_per_output_token: float
    prefill_worker_hours: float
    decode_worker_hours: float
    prefill_tokens_per_s_per_worker: float   # input tokens (hits included) per prefill worker
    decode_tokens_per_s_per_worker: float    # output tokens per decode worker
    peak_prefill_workers: int
    peak_decode_workers: int
    cost_usd: float
    revenue_usd: float
    margin: float
    prices: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _r(x: float | None, nd: int = 6) -> float:
    return 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def report(data_dir: Path, since: str | None = None, until: str | None = None,
           prices: Prices | None = None) -> Report:
    prices = prices or Prices()
    p = query_params({"since": since or "", "until": until or ""})
    period = {"since": p["since"], "until": p["until"]}
    _, [row] = run_query(data_dir, """
        SELECT count(*) FILTER (status = 'OK'),
               count(*) FILTER (status <> 'OK'),
               coalesce(sum(prompt_tokens) FILTER (status = 'OK'), 0),
               coalesce(sum(cached_tokens) FILTER (status = 'OK'), 0),
               coalesce(sum(completion_tokens) FILTER (status = 'OK'), 0),
               avg((completion_tokens - 1) / (e2e_s - ttft_s))
                   FILTER (status = 'OK' AND completion_tokens > 1 AND e2e_s > ttft_s),
               sum(completion_tokens * prompt_tokens
                   + completion_tokens * (completion_tokens - 1) / 2) FILTER (status = 'OK'),
               min(ts), max(ts + to_microseconds(CAST(e2e_s * 1e6 AS BIGINT)))
        FROM requests WHERE ts >= $since AND ts < $until""", period)
    ok, failed, inp, cached, out, rate, kv_sum, first, last = row
    # Worker time: from the gateways' worker samples; without any, each worker's span of
    # requests in the period. Every gateway samples every worker once per interval (in the
    # middle of the same wall-clock slots, accounting.sample_workers): a worker's slot counts
    # once whichever gateways sampled it, so worker-hours are one gateway's view.
    _, wrows = run_query(data_dir, """
        SELECT role, sum(secs), max(n) FROM (
            SELECT role, secs, count(secs) OVER (PARTITION BY slot, role) AS n FROM (
                SELECT role, worker_id, slot, max(interval_s) FILTER (in_rotation) AS secs
                FROM (SELECT role, worker_id, interval_s, in_rotation,
                             CAST(floor(epoch(ts) / interval_s) AS BIGINT) AS slot
                      FROM workers WHERE ts >= $since AND ts < $until AND interval_s > 0)
                GROUP BY role, worker_id, slot))
        GROUP BY role""", period)
    secs = {r: s or 0.0 for r, s, _ in wrows}
    peak = {r: int(n or 0) for r, _, n in wrows}
    # A role no sample caught in rotation (a run shorter than the sampling interval: the one
    # sample may come before its workers joined) falls back to the spans, role by role.
    if ok and not all(secs.get(r) for r in ("prefill", "decode")):
        _, spans = run_query(data_dir, """
            SELECT role, sum(span) FROM (
                SELECT 'prefill' AS role, prefill_worker AS w, epoch(max(ts)) - epoch(min(ts))
                       + max(ttft_s) AS span FROM requests
                WHERE status = 'OK' AND ts >= $since AND ts < $until GROUP BY w
                UNION ALL
                SELECT 'decode', decode_worker, epoch(max(ts)) - epoch(min(ts)) + max(e2e_s)
                FROM requests WHERE status = 'OK' AND ts >= $since AND ts < $until GROUP BY 2)
            GROUP BY role""", period)
        secs.update({r: s or 0.0 for r, s in spans if not secs.get(r)})
    ps, ds = secs.get("prefill", 0.0), secs.get("decode", 0.0)
    hours = (ps + ds) / 3600
    cost = hours * prices.gpus_per_worker * prices.gpu_hour
    revenue = (cached * prices.input_hit_per_m + (inp - cached) * prices.input_miss_per_m
               + out * prices.output_per_m) / 1e6
    return Report(
        since=(first or p["since"]).isoformat() if since is None else p["since"].isoformat(),
        until=(last or p["until"]).isoformat() if until is None else p["until"].isoformat(),
        requests=int(ok), failed_requests=int(failed), input_tokens=int(inp),
        cached_input_tokens=int(cached), cache_hit_share=_r(cached / inp if inp else 0.0, 4),
        output_tokens=int(out), avg_output_tokens_per_s=_r(rate, 3),
        avg_kv_length_per_output_token=_r(kv_sum / out if out else 0.0, 1),
        prefill_worker_hours=_r(ps / 3600), decode_worker_hours=_r(ds / 3600),
        prefill_tokens_per_s_per_worker=_r(inp / ps if ps else 0.0, 1),
        decode_tokens_per_s_per_worker=_r(out / ds if ds else 0.0, 1),
        peak_prefill_workers=peak.get("prefill", 0), peak_decode_workers=peak.get("decode", 0),
        cost_usd=_r(cost), revenue_usd=_r(revenue),
        margin=_r((revenue - cost) / revenue if revenue else 0.0, 4), prices=asdict(prices))


def format_report(r: Report) -> str:
    lines = [
        f"pdserve report {r.since} .. {r.until}",
        f"  requests               {r.requests:,} ok, {r.failed_requests:,} failed",
        f"  input tokens           {r.input_tokens:,}  of which KV-cache hits "
        f"{r.cached_input_tokens:,} ({100 * r.cache_hit_share:.1f} %)",
        f"  output tokens          {r.output_tokens:,}",
        f"  output rate            {r.avg_output_tokens_per_s:.2f} tokens/s per request",
        f"  KV length / out token  {r.avg_kv_length_per_output_token:,.1f} tokens",
        f"  prefill throughput     {r.prefill_tokens_per_s_per_worker:,.1f} input tokens/s per "
        f"worker ({r.prefill_worker_hours:.4f} worker-hours, peak {r.peak_prefill_workers})",
        f"  decode throughput      {r.decode_tokens_per_s_per_worker:,.1f} output tokens/s per "
        f"worker ({r.decode_worker_hours:.4f} worker-hours, peak {r.peak_decode_workers})",
        f"  cost                   ${r.cost_usd:,.6f} at ${r.prices['gpu_hour']}/GPU-hour x "
        f"{r.prices['gpus_per_worker']} GPU/worker",
        f"  theoretical revenue    ${r.revenue_usd:,.6f} (hit ${r.prices['input_hit_per_m']}/M,"
        f" miss ${r.prices['input_miss_per_m']}/M, output ${r.prices['output_per_m']}/M)",
        f"  margin                 {100 * r.margin:.1f} %",
    ]
    return "\n".join(lines)


def plot(data_dir: Path, out: Path, since: str | None = None, until: str | None = None,
         buckets: int = 60) -> Path:
    """Hit share, tokens/s and busy workers over the period, one panel each (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = query_params({"since": since or "", "until": until or ""})
    period = {"since": p["since"], "until": p["until"]}
    _, [(t0, t1)] = run_query(data_dir, "SELECT epoch(min(ts)), epoch(max(ts)) FROM requests "
                              "WHERE ts >= $since AND ts < $until", period)
    if t0 is None:
        raise QueryError("plot: no requests in the period")
    width = max((t1 - t0) / buckets, 1.0)
    args = {**period, "t0": t0, "w": width}
    _, req = run_query(data_dir, """
        SELECT floor((epoch(ts) - $t0) / $w) AS b, sum(prompt_tokens), sum(cached_tokens),
               sum(completion_tokens)
        FROM requests WHERE status = 'OK' AND ts >= $since AND ts < $until
        GROUP BY 1 ORDER BY 1""", args)
    _, wk = run_query(data_dir, """
        SELECT b, role, avg(busy) FROM (
            SELECT floor((epoch(ts) - $t0) / $w) AS b, ts, role,
                   count(*) FILTER (in_rotation AND (running > 0 OR queued_tokens > 0)) AS busy
            FROM workers WHERE ts >= $since AND ts < $until GROUP BY 1, 2, 3)
        GROUP BY 1, 2 ORDER BY 1""", args)
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    xs = [b * width for b, *_ in req]
    axes[0].plot(xs, [c / pt if pt else 0 for _, pt, c, _ in req], marker=".")
    axes[0].set_ylabel("KV-cache hit share")
    axes[0].set_ylim(0, 1)
    axes[1].plot(xs, [pt / width for _, pt, _, _ in req], label="input")
    axes[1].plot(xs, [o / width for *_, o in req], label="output")
    axes[1].set_ylabel("tokens/s")
    axes[1].legend()
    for role in ("prefill", "decode"):
        pts = [(b * width, n) for b, r, n in wk if r == role]
        if pts:
            axes[2].step([x for x, _ in pts], [n for _, n in pts], where="post", label=role)
    axes[2].set_ylabel("busy workers")
    axes[2].set_xlabel(f"seconds since {dt.datetime.fromtimestamp(t0, dt.timezone.utc):%F %T} UTC")
    if axes[2].lines:
        axes[2].legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
