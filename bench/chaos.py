"""Load + chaos: N clients for T seconds against `pdserve up` (2 prefill, 2 decode, migration on)
while a chaos loop SIGKILLs and restarts one prefill, one decode or the kvstore at random.

    python bench/chaos.py [--clients 6] [--seconds 180] [--kill-every 10]

Every request must either succeed with exactly the tokens of a fault-free run of the same prompt
(measured first, on the same cluster) or fail with a retryable status (UNAVAILABLE,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED). At the end every KV page is free again (the
workers' own counters), and the gateway (never killed) has as many file descriptors as before
and no runaway memory. Exit status 1 when any of that fails.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import grpc
from common import machine, table

from pdserve.client import Client
from pdserve.cluster import LocalCluster
from pdserve.config import UpSettings
from pdserve.metrics import parse_metrics

RETRYABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ABORTED"}
LEASE_S, QUARANTINE_S = 15, 2


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(100, 40000) for _ in range(192)]  # a shared prefix of 3 blocks
    out = []
    for i in range(n):
        tail = [rng.randrange(100, 40000) for _ in range(rng.randrange(20, 400))]
        out.append((system if i % 2 == 0 else []) + tail)
    return out


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS"))


def scrape(cluster, name: str) -> dict[str, float]:
    svc = cluster.service(name)
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5) as r:
        return parse_metrics(r.read().decode())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--kill-every", type=float, default=10, help="seconds between kills")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    print(f"machine: {machine()}", file=sys.stderr)
    print(f"settings: {a.clients} clients, {a.seconds:g} s, a kill every {a.kill_every:g} s, "
          f"{a.prompts} prompts, {a.max_tokens} tokens each, 2 prefill + 2 decode, migration "
          f"on, prefill retries 2, lease {LEASE_S} s, quarantine {QUARANTINE_S} s",
          file=sys.stderr)
    data = Path(tempfile.mkdtemp(prefix="pdserve-chaos-"))
    cluster = LocalCluster(
        UpSettings(data_dir=data, port=0, num_prefill=2, num_decode=2, threads=1),
        extra_env={"PDSERVE_MIGRATE": "true", "PDSERVE_PREFILL_RETRIES": "2",
                   "PDSERVE_LEASE_S": str(LEASE_S), "PDSERVE_QUARANTINE_S": str(QUARANTINE_S),
                   "PDSERVE_WORKER_TIMEOUT_S": "2", "PDSERVE_MAX_STREAMS_PER_CLIENT": "0"})
    cluster.start()
    try:
        ps = prompts(a.prompts)
        print("fault-free reference run ...", file=sys.stderr)
        with Client(cluster.gateway_address) as c:
            ref = [c.generate(token_ids=p, max_tokens=a.max_tokens, cache_salt=f"p{i}").token_ids
                   for i, p in enumerate(ps)]
        gw = cluster.service("gateway")
        fd0, rss0 = fds(gw.proc.pid), rss_mib(gw.proc.pid)
        results: list[tuple] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(k: int) -> None:
            r = random.Random(a.seed * 1000 + k)
            with Client(cluster.gateway_address) as c:
                n = 0
                while not stop.is_set():
                    i = r.randrange(len(ps))
                    rid = f"c{k}-{n}"
                    n += 1
                    try:
                        res = c.generate(token_ids=ps[i], max_tokens=a.max_tokens,
                                         cache_salt=f"p{i}", request_id=rid, timeout=300)
                        out = ("OK", res.token_ids == ref[i], rid)
                    except grpc.RpcError as e:
                        out = (e.code().name, None, rid)
                        time.sleep(0.2)  # what a well-behaved client does before retrying
                    with lock:
                        results.append(out)

        kills: Counter = Counter()

        def chaos() -> None:
            victims = ["prefill-0", "prefill-1", "decode-0", "decode-1", "kvstore"]
            while not stop.wait(a.kill_every):
                v = rng.choice(victims)
                print(f"  t={time.monotonic() - t0:5.1f}s kill -9 {v}", file=sys.stderr)
                cluster.kill(v)
                kills[v] += 1
                time.sleep(rng.uniform(0.5, 2.0))
                cluster.restart(v)

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
        threads.append(threading.Thread(target=chaos))
        for t in threads:
            t.start()
        while time.monotonic() - t0 < a.seconds:
            time.sleep(5)
            with lock:
                print(f"  t={time.monotonic() - t0:5.1f}s {len(results)} requests done",
                      file=sys.stderr)
        stop.set()
        for t in threads:
            t.join()
        # Quiet: every page back once leases and quarantines have passed.
        deadline = time.monotonic() + LEASE_S + QUARANTINE_S + 60
        used = {}
        while time.monotonic() < deadline:
            used = {s.name: scrape(cluster, s.name)["pdserve_kv_pages_used"]
                    for s in cluster.services if s.name.startswith(("prefill", "decode"))}
            if not any(used.values()):
                break
            time.sleep(1)
        from pdserve.cache.ledger import run_query
        with grpc.insecure_channel(cluster.gateway_address) as ch:
            from pdserve.v1 import gateway_pb2, gateway_pb2_grpc
            gateway_pb2_grpc.GatewayStub(ch).QueryAnalytics(
                gateway_pb2.AnalyticsRequest(query="status_counts"))
        _, [(retried,)] = run_query(data, "SELECT count(*) FROM requests WHERE attempts > 1 "
                                    "AND request_id LIKE 'c%'")
        fd1, rss1 = fds(gw.proc.pid), rss_mib(gw.proc.pid)
    finally:
        cluster.stop()
    ok = [r for r in results if r[0] == "OK"]
    mismatches = [r[2] for r in ok if not r[1]]
    failed = Counter(r[0] for r in results if r[0] != "OK")
    bad = {k: v for k, v in failed.items() if k not in RETRYABLE}
    rows = [
        ("requests", len(results)),
        ("succeeded", len(ok)),
        ("  of which retried or migrated by the gateway", retried),
        ("failed, retryable status", ", ".join(f"{k} {v}" for k, v in sorted(failed.items())
                                               if k in RETRYABLE) or "0"),
        ("failed, other status", ", ".join(f"{k} {v}" for k, v in bad.items()) or "0"),
        ("token mismatches vs fault-free run", len(mismatches)),
        ("kills", ", ".join(f"{k} {v}" for k, v in sorted(kills.items()))),
        ("KV pages in use at the end", ", ".join(f"{k} {int(v)}" for k, v in sorted(used.items()))),
        ("gateway file descriptors, before / after", f"{fd0} / {fd1}"),
        ("gateway RSS MiB, before / after", f"{rss0:.0f} / {rss1:.0f}"),
    ]
    print(table(rows, ("chaos run", "value")))
    good = (not mismatches and not bad and not any(used.values()) and fd1 <= fd0 + 8
            and ok and rss1 < rss0 + 512)
    print("PASS" if good else "FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
