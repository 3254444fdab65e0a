"""How long `pdserve up` takes to be ready (the default model, 1 prefill + 1 decode worker),
with the page cache warm and cold, and where each service's time goes (the phases it writes
into its ready file, pdserve/startup.py).

Cold: before each cold run every file under the Python environment (interpreter, torch, NIXL,
the model wheel) and the model file are dropped from the page cache (`posix_fadvise(DONTNEED)`,
which needs no privileges; /proc/sys/vm/drop_caches is used instead when writable).

Usage: python bench/bench_start.py [--runs 3] [--decode-pages 512]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table


def drop_page_cache(paths: list[Path]) -> str:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    n = 0
    for root in paths:
        files = [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return f"posix_fadvise DONTNEED on {n} files"


def start_once(decode_pages: int) -> tuple[float, dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="bench-start-") as d:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve", "up", "--port", "0", "--http-port", "-1",
             "--data-dir", d, "--decode-pages", str(decode_pages)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving on"):
                break
        wall = time.monotonic() - t0
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    text = "".join(lines)
    ready = re.search(r"ready in ([0-9.]+) s", text)
    if ready is None:
        raise RuntimeError("pdserve up did not start:\n" + text[-2000:])
    phases = dict(re.findall(r"^  (\S+)\s+([0-9.]+ s: .*)$", text, re.M))
    return wall, phases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-pages", type=int, default=512)
    a = ap.parse_args()
    from pdserve.engine.files import default_model_path

    print(f"machine: {machine()}\nsettings: pdserve up, default model, 1 prefill + 1 decode "
          f"worker, --decode-pages {a.decode_pages}, {a.runs} runs each, cold and warm "
          "alternating\n", flush=True)
    cold_paths = [Path(sys.prefix), default_model_path()]
    rows, how = [], ""
    results: dict[str, list[float]] = {"cold": [], "warm": []}
    for run in range(a.runs):
        for kind in ("cold", "warm"):
            if kind == "cold":
                how = drop_page_cache(cold_paths)
            wall, phases = start_once(a.decode_pages)
            results[kind].append(wall)
            print(f"run {run + 1} {kind}: ready after {wall:.1f} s", file=sys.stderr, flush=True)
            for svc, summary in phases.items():
                rows.append((f"{run + 1} {kind}", svc, summary))
    print(f"cold: {how}\n")
    print(table([(k, f"{statistics.median(v):.1f}", " ".join(f"{x:.1f}" for x in v))
                 for k, v in results.items()],
                ("page cache", "ready, median s", "runs s")))
    print()
    print(table(rows, ("run", "service", "start-up: total and phases, s")))


if __name__ == "__main__":
    main()
