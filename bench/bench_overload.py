"""Overload without losses: a burst of the synthetic trace's first requests, far more prompt
than the prefill worker computes in a decode lease, against `pdserve up` (1 prefill + 1
decode worker, the default model).

    python bench/bench_overload.py [--requests 40] [--time-scale 0.01] [--lease-s 4]
                                   [--defer SHARE,LATENESS_S,WAIT_S]

The requests arrive within a fraction of a second (the trace's arrival times x
`--time-scale`), so most wait in the prefill worker's queue far longer than the decode
reservation's lease (4 s here, the default 60 s scaled down with the burst) and need more KV
pages than its pool holds. Every
request must succeed: the prefill worker renews each reservation's lease while its prompt
waits (`pdserve_prefill_lease_renewals_total`) and a prompt that finds no free pages waits for
them (`pdserve_prefill_page_waits_total`); nothing is retried. Exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, table

from pdserve.cluster import LocalCluster
from pdserve.config import UpSettings
from pdserve.metrics import parse_metrics
from pdserve.replay_live import run_live
from pdserve.scheduler.traces import load_trace

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
COUNTERS = ("pdserve_request_retries_total", "pdserve_prefill_lease_renewals_total",
            "pdserve_prefill_page_waits_total", "pdserve_decode_failed_total",
            "pdserve_prefill_deferred_prompts_total", "pdserve_prefill_deferred_prompts")


def counters(cluster: LocalCluster) -> dict[str, float]:
    out: dict[str, float] = {}
    for svc in cluster.services:
        if not svc.metrics_port:
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5) as r:
            for key, value in parse_metrics(r.read().decode()).items():
                name = key.split("{", 1)[0]
                if name in COUNTERS:
                    out[name] = out.get(name, 0.0) + value
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--time-scale", type=float, default=0.01)
    ap.add_argument("--lease-s", type=float, default=4.0)
    ap.add_argument("--defer", default="", metavar="SHARE,LATENESS_S,WAIT_S",
                    help="the prefill worker's deferral settings (default: its own)")
    args = ap.parse_args()
    env = {"PDSERVE_LEASE_S": str(args.lease_s)}
    if args.defer:
        share, lateness, wait = args.defer.split(",")
        env.update(PDSERVE_PREFILL_DEFER_SHARE=share, PDSERVE_PREFILL_DEFER_LATENESS_S=lateness,
                   PDSERVE_PREFILL_DEFER_WAIT_S=wait)
    trace = load_trace(args.trace, args.requests, time_scale=args.time_scale)
    print(f"machine: {machine()}\nsettings: pdserve up (1 prefill + 1 decode, default model and "
          f"pools), decode lease {args.lease_s:g} s, deferrals {args.defer or 'default'}; "
          f"the trace's first {len(trace)} requests within {trace[-1].arrival_s:.2f} s, all "
          "at once (64 tokens per trace block, at most 16 blocks, 4 output tokens)\n")
    with tempfile.TemporaryDirectory() as d:
        cluster = LocalCluster(UpSettings(data_dir=Path(d), port=0, http_port=-1),
                               progress=False, extra_env=env)
        cluster.start()
        try:
            r = run_live(trace, cluster.gateway_address, max_tokens=4, concurrency=len(trace))
            c = counters(cluster)
        finally:
            cluster.stop()
    print(table([("requests", r["requests"]), ("succeeded", r["succeeded"]),
                 ("failed (by status)", r["failed"] or "none"),
                 ("TTFT p50 / p99 s", f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f}"),
                 ("attempts retried (gateway)", int(c.get(COUNTERS[0], 0))),
                 ("decode leases renewed (prefill)", int(c.get(COUNTERS[1], 0))),
                 ("prompts that waited for KV pages (prefill)", int(c.get(COUNTERS[2], 0))),
                 ("requests failed on the decode worker", int(c.get(COUNTERS[3], 0))),
                 ("prompts deferred (prefill)", int(c.get(COUNTERS[4], c.get(COUNTERS[5], 0))))],
                ("overload", "value")))
    return 0 if r["succeeded"] == r["requests"] and not c.get(COUNTERS[0]) else 1


if __name__ == "__main__":
    sys.exit(main())
