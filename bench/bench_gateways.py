"""Several gateways over the same workers, on one `pdserve up --gateways 2` (2 prefill + 2
decode workers serving a tiny random Llama, 3 layers of width 96, so that the gateways and
not the model bound the rate; `--smollm2` serves the default model instead), the two setups
in alternating rounds of the same run:

1. Requests per second the gateways sustain: many concurrent clients (asyncio gRPC, one
   process), each request a 16-token prompt and max_tokens 1, all through gateway 0 ("1
   gateway") or spread over both ("2 gateways"); p50 / p99 latency per request.
2. The cost of several gateways placing on the same stale loads: a burst of B requests sent at
   once (300-token prompts, 48 tokens each, no cache hits), through one gateway or spread over
   both; from the ledger, how many requests the busiest worker of each role got beyond an even
   share (B / workers), per burst, and the reservations refused for room (the gateways'
   `pdserve_reserve_refused_total`).
3. The routing decision at 1,000 workers per role on one gateway's own registry (the same
   figure as bench_scheduler.py).

Usage: python bench/bench_gateways.py [--seconds 10] [--clients 32] [--burst 32] [--rounds 2]
                                     [--smollm2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_scheduler import decision_latency
from common import machine, table

from pdserve.cache.ledger import run_query
from pdserve.cluster import LocalCluster
from pdserve.config import UpSettings
from pdserve.services.server import channel
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc


async def one(stub: gateway_pb2_grpc.GatewayAsyncStub, req: gateway_pb2.GenerateRequest
              ) -> bool:
    async for msg in stub.Generate(req, timeout=120):
        if msg.finish_reason:
            return True
    return False


async def rps(addresses: list[str], clients: int, seconds: float, tag: str
              ) -> tuple[float, float, float, int]:
    """(requests/s, p50 s, p99 s, errors) of `clients` loops for `seconds`."""
    chans = [channel(a) for a in addresses]
    stubs = [gateway_pb2_grpc.GatewayStub(c) for c in chans]
    lat: list[float] = []
    seen: set[str] = set()
    errors = 0
    stop = time.monotonic() + seconds

    async def loop(k: int) -> None:
        nonlocal errors
        i = 0
        while time.monotonic() < stop:
            stub = stubs[(k + i) % len(stubs)]
            req = gateway_pb2.GenerateRequest(
                prompt_token_ids=[10 + (k * 131 + i * 7 + j) % 300 for j in range(16)],
                max_tokens=1, cache_salt=f"{tag}-{k}-{i}")
            t = time.perf_counter()
            try:
                ok = await one(stub, req)
            except grpc.aio.AioRpcError as e:  # counted, the first of each kind shown
                ok = False
                why = f"{e.code().name}: {(e.details() or '')[:120]}"
                if why not in seen:
                    seen.add(why)
                    print(f"  {tag}: {why}", file=sys.stderr, flush=True)
            if ok:
                lat.append(time.perf_counter() - t)
            else:
                errors += 1
            i += 1

    t0 = time.monotonic()
    await asyncio.gather(*(loop(k) for k in range(clients)))
    wall = time.monotonic() - t0
    for c in chans:
        await c.close()
    lat.sort()
    return (len(lat) / wall, statistics.median(lat), lat[int(0.99 * (len(lat) - 1))], errors)


async def burst(addresses: list[str], n: int, tag: str) -> None:
    chans = [channel(a) for a in addresses]
    stubs = [gateway_pb2_grpc.GatewayStub(c) for c in chans]
    reqs = [gateway_pb2.GenerateRequest(
        prompt_token_ids=[10 + (i * 7919 + j * 104729) % 300 for j in range(300)],
        max_tokens=48, ignore_eos=True, request_id=f"{tag}-{i}", cache_salt=f"{tag}-{i}")
        for i in range(n)]
    await asyncio.gather(*(one(stubs[i % len(stubs)], r) for i, r in enumerate(reqs)))
    for c in chans:
        await c.close()


def cpu_s(cluster: LocalCluster) -> dict[str, float]:
    """CPU seconds (user + system) each gateway process has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for svc in cluster.services:
        if svc.name.startswith("gateway"):
            fields = Path(f"/proc/{svc.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[svc.name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def refused(cluster: LocalCluster) -> float:
    total = 0.0
    for name, url in cluster.metrics_urls().items():
        if name.startswith("gateway"):
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            total += sum(float(ln.split()[-1]) for ln in text.splitlines()
                         if ln.startswith("pdserve_reserve_refused_total"))
    return total


def extra_on_busiest(data: Path, tag: str, n: int, workers: int) -> tuple[float, float]:
    """Requests beyond an even share on the busiest decode and prefill worker of a burst."""
    deadline = time.monotonic() + 30
    while True:
        _, rows = run_query(data, "SELECT decode_worker, prefill_worker FROM requests "
                            f"WHERE request_id LIKE '{tag}-%'")
        if len(rows) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out = []
    for col in (0, 1):
        counts: dict[str, int] = {}
        for r in rows:
            counts[r[col]] = counts.get(r[col], 0) + 1
        out.append(max(counts.values()) - n / workers)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smollm2", action="store_true", help="serve the default model")
    a = ap.parse_args()
    model = "SmolLM2-135M Q4_1" if a.smollm2 else "tiny random Llama (3 x 96)"
    print(f"machine: {machine()}\nsettings: pdserve up --gateways 2, 2 prefill + 2 decode "
          f"workers ({model}, CPU turns), {a.clients} clients x {a.seconds:g} s per "
          f"throughput round, bursts of {a.burst}, {a.rounds} rounds of each setup "
          "alternating\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gateways-") as d:
        path = None
        if not a.smollm2:
            from tests.engine.random_models import make_llama

            path = Path(d) / "tiny-llama"
            make_llama(path)[1].save_pretrained(path)
        s = UpSettings(data_dir=Path(d) / "data", port=0, http_port=-1, gateways=2,
                       num_prefill=2, num_decode=2, model=path)
        with LocalCluster(s, extra_env={"PDSERVE_LEDGER_FLUSH_S": "0.2"}) as c:
            both = c.gateway_addresses
            setups = {"1 gateway": both[:1], "2 gateways": both}
            tput: dict[str, list[tuple[float, float, float, int]]] = {k: [] for k in setups}
            stale: dict[str, list[tuple[float, float]]] = {k: [] for k in setups}
            ref: dict[str, float] = dict.fromkeys(setups, 0.0)
            busy: dict[str, list[str]] = {k: [] for k in setups}
            asyncio.run(rps(both, 4, 2.0, "warm"))  # connections, first steps
            for rnd in range(a.rounds):
                for name, addrs in setups.items():
                    print(f"round {rnd + 1}: {name} throughput ...", file=sys.stderr,
                          flush=True)
                    cpu0, t0 = cpu_s(c), time.monotonic()
                    tput[name].append(asyncio.run(rps(addrs, a.clients, a.seconds,
                                                      f"t{rnd}{len(addrs)}")))
                    wall, cpu1 = time.monotonic() - t0, cpu_s(c)
                    busy[name].append(" ".join(f"{(cpu1[g] - cpu0[g]) / wall:.2f}"
                                               for g in sorted(cpu1)))
                    print(f"round {rnd + 1}: {name} burst ...", file=sys.stderr, flush=True)
                    before = refused(c)
                    tag = f"b{rnd}-{len(addrs)}"
                    asyncio.run(burst(addrs, a.burst, tag))
                    stale[name].append(extra_on_busiest(c.data_dir, tag, a.burst, 2))
                    ref[name] += refused(c) - before
    rows = []
    for name in setups:
        r = tput[name]
        rows.append((name, f"{statistics.mean(x[0] for x in r):.1f}",
                     f"{statistics.mean(x[1] for x in r) * 1e3:.0f}",
                     f"{statistics.mean(x[2] for x in r) * 1e3:.0f}", sum(x[3] for x in r),
                     " / ".join(busy[name])))
    print(table(rows, ("setup", "requests/s", "p50 ms", "p99 ms", "errors",
                       "gateway-0 gateway-1 CPU (cores), per round")))
    one_, two = (statistics.mean(x[0] for x in tput[k]) for k in setups)
    print(f"\n2 gateways / 1 gateway requests/s: {two / one_:.2f}\n")
    rows = [(name, " ".join(f"{d:+.0f}" for d, _ in stale[name]),
             " ".join(f"{p:+.0f}" for _, p in stale[name]), f"{ref[name]:.0f}")
            for name in setups]
    print(table(rows, ("setup", f"decode: busiest - {a.burst}/2, per burst",
                       f"prefill: busiest - {a.burst}/2, per burst",
                       "reservations refused")))
    p50, p99 = decision_latency()
    print(f"\nrouting decision on one gateway's registry, 1,000 workers per role: "
          f"p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
