"""Worker threading: set-up torch work runs in a thread that exits (so the engine thread's
OpenMP team is the process's only one), and an idle prefill worker gathers a burst."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from pdserve.services.prefill import PrefillJob, PrefillWorker
from pdserve.services.worker import in_passing_thread


def test_in_passing_thread_returns_raises_and_leaves_no_thread():
    main = threading.get_ident()
    assert in_passing_thread(lambda: threading.get_ident()) != main
    with pytest.raises(KeyError, match="x"):
        in_passing_thread(lambda: {}["x"])
    assert not [t for t in threading.enumerate() if t.name == "setup"]


def test_openmp_workers_of_a_passing_thread_go_with_it():
    """The mechanism the workers rely on, in a fresh process: a parallel torch op run in a
    passing thread leaves no OpenMP worker threads behind; run in the main thread, it does."""
    code = r"""
import os, time, torch
from pdserve.services.worker import in_passing_thread
torch.set_num_threads(2)
def threads():
    return len(os.listdir("/proc/self/task"))
def work():
    x = torch.randn(4_000_000)
    return float((x * 2).sum())
base = threads()
in_passing_thread(work)
deadline = time.monotonic() + 5
while threads() > base and time.monotonic() < deadline:
    time.sleep(0.05)
after_passing = threads()
work()
print(base, after_passing, threads())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    base, after_passing, after_main = map(int, r.stdout.split())
    assert after_passing == base
    assert after_main > base  # the main thread's team stays: what the passing thread avoids


def _gatherer(step_tokens: int, wait_s: float) -> SimpleNamespace:
    """The state `PrefillWorker._gather` reads; its logic is tested without a model."""
    return SimpleNamespace(_queue=[], step_tokens=step_tokens, batch_wait_s=wait_s,
                           _wake=asyncio.Event())


def test_idle_prefill_waits_for_a_burst_and_stops_once_a_step_is_full():
    async def main():
        w = _gatherer(step_tokens=300, wait_s=60.0)
        w._queue.append(PrefillJob(list(range(100)), [], 0))

        async def arrive():
            for _ in range(2):
                await asyncio.sleep(0.01)
                w._queue.append(PrefillJob(list(range(100)), [], 0))
                w._wake.set()

        t0 = time.monotonic()
        await asyncio.gather(PrefillWorker._gather(w), arrive())
        # Returned once 300 tokens were queued, long before the 60 s deadline.
        return len(w._queue), time.monotonic() - t0

    n, elapsed = asyncio.run(main())
    assert n == 3 and elapsed < 30


def test_idle_prefill_wait_ends_at_its_deadline_and_zero_means_no_wait():
    async def main():
        w = _gatherer(step_tokens=2048, wait_s=0.05)
        w._queue.append(PrefillJob(list(range(10)), [], 0))
        await asyncio.wait_for(PrefillWorker._gather(w), 30)  # nobody else comes: it returns
        w0 = _gatherer(step_tokens=2048, wait_s=0.0)
        w0._queue.append(PrefillJob(list(range(10)), [], 0))
        await asyncio.wait_for(PrefillWorker._gather(w0), 1)
        return len(w._queue), len(w0._queue)

    assert asyncio.run(main()) == (1, 1)
