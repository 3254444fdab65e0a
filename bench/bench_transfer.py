"""The prefill -> decode page transfer: NIXL WRITE of a long prompt's KV pages into another
process's pool, against a memcpy of the same pages in the same run.

Two processes, as deployed: this one is the prefill side (its pool, its NIXL agent), a child
is the decode side (its pool registered with its own agent; it hands over a reservation's
page descriptors as the protobuf a decode worker answers `Reserve` with, and counts the
notices). Each WRITE is what `PrefillWorker` does for one prompt (`NixlEndpoint.write`: one
transfer of every page, its notice, completion polled). The baseline copies the same pages
into a second pool in this process (numpy, one copy per page). Both pools are backed before
timing (`KVPool.prefault`, as a serving worker's are).

Usage: python bench/bench_transfer.py [--tokens 2048] [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of, machine, table

from pdserve.engine.kv_pool import KVPool
from pdserve.engine.layout import KVLayout

LAYOUT = KVLayout(num_layers=30, kv_dim=384, dtype="float32", block_tokens=64)  # SmolLM2


def receiver(pages: int) -> None:
    """The decode side: a pool, its agent, one reservation of `pages` pages sent to stdout;
    polls notices until stdin closes."""
    import select

    out = os.fdopen(os.dup(1), "wb")  # the reservation goes here; NIXL's log to stderr
    os.dup2(2, 1)
    from pdserve.services.transfer import NixlEndpoint
    from pdserve.v1 import common_pb2

    pool = KVPool(LAYOUT, pages)
    pool.prefault()
    ep = NixlEndpoint("bench-decode", pool)
    ids = pool.reserve(pages)
    res = common_pb2.Reservation(request_id="bench", agent_name=ep.name,
                                 agent_metadata=ep.metadata, mem_type=ep.mem_type,
                                 page_ids=ids, pages=ep.descriptors(ids))
    data = res.SerializeToString()
    out.write(len(data).to_bytes(8, "little") + data)
    out.flush()
    while not select.select([sys.stdin], [], [], 0.0005)[0]:
        ep.poll_notices()
    sys.stderr.write(f"receiver: {ep.num_notices} notices\n")


def memcpy_rate(src: KVPool, dst: KVPool, n: int, repeats: int) -> float:
    """Seconds per copy of `n` pages from one pool to the other (best of `repeats`)."""
    def copy() -> None:
        for p in range(n):
            dst.page_bytes(p).numpy()[:] = src.page_bytes(p).numpy()
    return best_of(repeats, copy)


def start_receiver(n: int) -> tuple[subprocess.Popen[bytes], bytes]:
    """The decode side's process and its reservation (serialized)."""
    child = subprocess.Popen([sys.executable, __file__, "--receiver", str(n)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None
    size = int.from_bytes(child.stdout.read(8), "little")
    return child, child.stdout.read(size)


async def nixl_writes(src: KVPool, n: int, repeats: int, reservation: bytes
                      ) -> tuple[list[float], int]:
    from pdserve.services.transfer import NixlEndpoint, pages_checksum
    from pdserve.v1 import common_pb2

    res = common_pb2.Reservation.FromString(reservation)
    ep = NixlEndpoint("bench-prefill", src)
    pages = list(range(n))
    notice = common_pb2.TransferNotice(request_id="bench",
                                       kv_checksum=pages_checksum(src, pages))
    await ep.write(pages, res, notice, 30)  # connect, warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        nbytes = await ep.write(pages, res, notice, 30)
        times.append(time.perf_counter() - t0)
    return times, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--receiver", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        receiver(args.receiver)
        return
    n = LAYOUT.pages_for(args.tokens)
    print(f"machine: {machine()}")
    print(f"settings: {args.tokens}-token prompt = {n} pages of {LAYOUT.bytes_per_block / 1e6:.2f}"
          f" MB ({LAYOUT.fingerprint()}); UCX_TLS={os.environ.get('UCX_TLS', '(default)')}; "
          f"{args.repeats} transfers, best and median\n", flush=True)
    src, dst = KVPool(LAYOUT, n), KVPool(LAYOUT, n)
    src.prefault()
    dst.prefault()
    src.kv.uniform_()
    copy = memcpy_rate(src, dst, n, args.repeats)
    child, reservation = start_receiver(n)
    try:
        times, nbytes = asyncio.run(nixl_writes(src, n, args.repeats, reservation))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
    best, med = min(times), statistics.median(times)
    gbps = lambda t: f"{nbytes / t / 1e9:.2f} GB/s"  # noqa: E731
    print(table([
        ("memcpy of the pages, one process (best)", f"{copy * 1e3:.1f} ms", gbps(copy), "1.00x"),
        ("NIXL WRITE into the decode process (best)", f"{best * 1e3:.1f} ms", gbps(best),
         f"{copy / best:.2f}x memcpy"),
        ("NIXL WRITE into the decode process (median)", f"{med * 1e3:.1f} ms", gbps(med),
         f"{copy / med:.2f}x memcpy"),
    ], ("figure", "time", "rate", "ratio")))


if __name__ == "__main__":
    main()
