"""`pdserve up` on a machine whose cores other work also uses: two concurrent 60-token
streams (ignore_eos) through a local cluster, with the machine idle and with one process
spinning on a core, for the workers' defaults (decode's thread governor on:
services/cpu_share.py), the governor off (PDSERVE_ADAPT_THREADS=0), and the settings that
trade idle speed for a busy machine (PDSERVE_THREADS=1, OMP_WAIT_POLICY=PASSIVE,
GOMP_SPINCOUNT=10000; `--all`). Each setting in its own cluster: one untimed round, then the
median of `--rounds`.

Usage: python bench/bench_shared_cores.py [--rounds 3] [--all]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table

SPIN = "import time\nwhile True:\n    time.time()\n"
OFF = {"PDSERVE_ADAPT_THREADS": "0"}
SETTINGS = [("idle", {}), ("idle", OFF), ("one core busy", {}), ("one core busy", OFF),
            ("one core busy", {"PDSERVE_THREADS": "1"})]
MORE = [("idle", {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("one core busy", {**OFF, "OMP_WAIT_POLICY": "PASSIVE"}),
        ("one core busy", {**OFF, "GOMP_SPINCOUNT": "10000"})]


def two_streams_s(env: dict[str, str], rounds: int) -> float:
    """Median seconds for two concurrent 60-token streams, in a cluster started with `env`."""
    from pdserve.client import Client
    from pdserve.cluster import LocalCluster
    from pdserve.config import UpSettings

    times: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        with LocalCluster(UpSettings(data_dir=Path(d), port=0), progress=False,
                          extra_env=env) as cluster:
            for r in range(rounds + 1):  # the first warms up
                def one(i: int, r: int = r) -> None:
                    with Client(cluster.gateway_address) as c:
                        res = c.generate(prompt="What is the capital of France?",
                                         max_tokens=60, ignore_eos=True,
                                         cache_salt=f"{r}-{i}")
                    assert res.completion_tokens == 60

                threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if r:
                    times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--all", action="store_true", help="the OpenMP settings too")
    args = ap.parse_args()
    print(machine())
    rows = []
    for load, env in SETTINGS + (MORE if args.all else []):
        spin = (subprocess.Popen([sys.executable, "-c", SPIN]) if load != "idle" else None)
        try:
            s = two_streams_s(env, args.rounds)
        finally:
            if spin is not None:
                spin.kill()
                spin.wait()
        what = " ".join(f"{k}={v}" for k, v in env.items()) or "defaults"
        rows.append((load, what, f"{s:.2f} s"))
        print(rows[-1], flush=True)
    print(table(rows, ("machine", "worker settings", "two 60-token streams, median")))


if __name__ == "__main__":
    main()
