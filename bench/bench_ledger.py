"""Request ledger costs: what the request path pays per row, how fast rows reach disk, and how
long the named queries take over a large ledger.

    python bench/bench_ledger.py [--rows 1000000]

Baselines in the same run: appending the same tuple to a Python list (the least a queue can
cost), and writing the same rows as JSON lines with one fsync per batch (a plain log file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, table

from pdserve.cache.analytics import NAMED_QUERIES, report, run_named
from pdserve.cache.ledger import REQUEST_COLUMNS, Ledger, SegmentLog


def row(i: int) -> dict:
    return dict(ts=1_767_225_600.0 + i * 0.01, request_id=f"req-{i:012d}", tenant=f"{i % 97:016x}",
                model="SmolLM2-135M", status="OK" if i % 50 else "UNAVAILABLE",
                finish_reason="stop", prompt_tokens=200 + i % 4000, cached_tokens=(i % 3) * 64,
                completion_tokens=1 + i % 300, ttft_s=0.1, tpot_s=0.02, e2e_s=3.0,
                prefill_worker=f"prefill-{i % 4}", decode_worker=f"decode-{i % 18}",
                kv_bytes=1 << 20, fetch_s=0.001, compute_s=0.05,
                miss_reason=("never_seen", "partial_block", "evicted")[i % 3], error="", attempts=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    print(f"machine: {machine()}", file=sys.stderr)
    rows = [row(i) for i in range(a.rows)]
    tuples = [tuple(r[n] for n, _, _ in REQUEST_COLUMNS) for r in rows]
    out = []
    with tempfile.TemporaryDirectory() as d:
        # 1. The request path: one call per request, I/O in the background.
        led = Ledger(Path(d), flush_records=a.batch, flush_s=1.0, max_pending=a.rows)
        n = min(a.rows, 200_000)
        t = time.perf_counter()
        for r in rows[:n]:
            led.record_request(**r)
        per_row = (time.perf_counter() - t) / n
        led.close()
        sink: list = []
        t = time.perf_counter()
        for tup in tuples[:n]:
            sink.append(tup)
        base = (time.perf_counter() - t) / n
        out.append(("record_request (request path)", f"{per_row * 1e6:.2f} µs/row",
                    f"{per_row / base:.1f}× list.append"))
        # 2. Rows to disk: Parquet segments (fsync + rename per batch) vs JSON lines + fsync.
        log = SegmentLog(Path(d) / "w", REQUEST_COLUMNS, flush_records=a.batch, flush_s=3600,
                         max_pending=a.rows, compact_after=1 << 30)
        m = min(a.rows, 100_000)
        t = time.perf_counter()
        for i in range(0, m, a.batch):
            for tup in tuples[i:i + a.batch]:
                log.append(tup)
            log.flush()
        seg = m / (time.perf_counter() - t)
        log.close()
        t = time.perf_counter()
        with open(Path(d) / "plain.jsonl", "w") as f:
            for i in range(0, m, a.batch):
                f.write("".join(json.dumps(r) + "\n" for r in rows[i:i + a.batch]))
                f.flush()
                os.fsync(f.fileno())
        plain = m / (time.perf_counter() - t)
        out.append((f"write, batches of {a.batch}, fsync each", f"{seg:,.0f} rows/s",
                    f"{seg / plain:.2f}× JSON lines + fsync ({plain:,.0f} rows/s)"))
        # 3. Queries over the whole ledger (compacted as the writer would).
        big = Path(d) / "big"
        led = Ledger(big, flush_records=65536, flush_s=3600, max_pending=a.rows + 1)
        for r in rows:
            led.record_request(**r)
        led.close()
        for name in NAMED_QUERIES:
            t = time.perf_counter()
            run_named(big, name, {"limit": "20"})
            out.append((f"query {name}, {a.rows:,} rows",
                        f"{(time.perf_counter() - t) * 1e3:.0f} ms",
                        ""))
        t = time.perf_counter()
        report(big)
        out.append((f"report, {a.rows:,} rows", f"{(time.perf_counter() - t) * 1e3:.0f} ms", ""))
    print(table(out, ("figure", "value", "ratio")))


if __name__ == "__main__":
    main()
