"""A decode worker steps with fewer OpenMP threads while other work holds the machine's cores
(`--adapt-threads`, on by default for decode workers).

Why: a decode step is thousands of short OpenMP parallel regions, each ending at a barrier
where the team's threads spin until the last one arrives. When another process runs on one of
the cores, a thread of the team waits for that core while its partners spin, region after
region: two concurrent 60-token streams took 77 s with one core busy against 1.28 s idle, and
2.25 s with one thread (`bench/bench_shared_cores.py`, two cores). One thread fewer than the
cores the team cannot have avoids the cliff; but on an idle machine every thread counts.

The trigger: the team's threads are runnable and wait on the kernel's run queue for a core —
the second field of `/proc/self/task/<tid>/schedstat` (nanoseconds spent waiting to run). On
an idle machine they wait next to nothing; with one of two cores taken, about 0.6 threads'
worth of the time. Only the team is counted: the engine thread and the threads Python did not
start (libgomp's workers); the worker's Python threads (its event loop, transfer helpers) are
left out, as their own waits are not the team's. Waiting alone does not decide: beside a
gateway and a client on two cores the team waited 0.25–0.46 threads' worth and still stepped
1.4× faster with two threads than with one. So every change is a trial of one window (at
least `window_s` of stepping; a window mostly idle decides nothing), kept only if its steps
took at most `keep` of the window's before:

- the team waited ≥ `high` threads on average: as many threads fewer as there are runnable
  threads beyond the cores, at least one (n threads of the team on C cores waiting w
  threads' worth means about x = w·C / (n − w) more runnable threads than cores, other work's
  included);
- below the configured count: a probe with one thread more.

After a trial that lost, the next of its kind waits `probe_s`, doubled after each further
loss up to `max_probe_s`; after one that won, `probe_s`.

Where there is no schedstat (not Linux, or a kernel without CONFIG_SCHED_INFO) the governor
does nothing and says so once in the log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TASKS = "/proc/self/task"


def team_run_delay_ns(engine_tid: int, tasks: str = TASKS) -> int | None:
    """Nanoseconds the OpenMP team has waited on the run queue so far: the engine thread's and
    every thread Python did not start; None without schedstat. A thread that exited takes its
    count with it (the caller clamps a window's difference at zero)."""
    python = {t.native_id for t in threading.enumerate()} - {engine_tid}
    try:
        tids = [int(t) for t in os.listdir(tasks)]
    except OSError:
        return None
    total, seen = 0, False
    for tid in tids:
        if tid in python:
            continue
        try:
            with open(f"{tasks}/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
            seen = True
        except (OSError, IndexError, ValueError):
            continue  # the thread exited, or no schedstat
    return total if seen else None


@dataclass
class GovernorSettings:
    window_s: float = 0.25  # the least stepping time a decision is made on
    high: float = 0.4  # threads waiting on average that start a trial with fewer
    keep: float = 0.9  # a trial's steps must take at most this much of the window's before
    probe_s: float = 5.0  # how soon a trial is tried again after one that lost
    max_probe_s: float = 60.0
    cores: int = 0  # the cores the team may run on (0: this process's CPU affinity)


@dataclass
class _Window:
    at: float = 0.0
    delay_ns: int = 0
    busy_s: float = 0.0
    steps: int = 0


class ThreadGovernor:
    """On the engine thread: `with governor.step(): <one step>`. Changes the thread count only
    there, between steps (torch's count is per thread: libgomp keeps it per calling thread)."""

    def __init__(self, settings: GovernorSettings | None = None,
                 read_delay: Callable[[int], int | None] = team_run_delay_ns,
                 clock: Callable[[], float] = time.monotonic,
                 get_threads: Callable[[], int] = torch.get_num_threads,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.s = settings or GovernorSettings()
        self.cores = self.s.cores or len(os.sched_getaffinity(0))
        self._read_delay = read_delay
        self._clock = clock
        self._get_threads = get_threads
        self._set_threads = set_threads
        self.cap = 0  # the configured count, read on the first step
        self.threads = 0
        self.off = False
        self._tid = 0
        self._w = _Window()
        self._trial: tuple[int, float] | None = None  # (threads before, their mean step)
        self._fewer = _Backoff(self.s)  # trials with a thread fewer
        self._more = _Backoff(self.s)  # probes with a thread more

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if self.off:
            yield
            return
        started = self._clock()
        if not self.cap:
            self._start(started)
        try:
            yield
        finally:
            now = self._clock()
            self._w.busy_s += now - started
            self._w.steps += 1
            if not self.off and now - self._w.at >= self.s.window_s:
                self._decide(now)

    def _start(self, now: float) -> None:
        self.cap = self.threads = self._get_threads()
        self._tid = threading.get_native_id()
        delay = self._read_delay(self._tid)
        if delay is None or self.cap <= 1:
            self.off = True
            if delay is None:
                log.info("thread governor off: no per-thread schedstat in /proc")
            return
        self._w = _Window(now, delay)

    def _decide(self, now: float) -> None:
        delay = self._read_delay(self._tid)
        if delay is None:
            self.off = True
            return
        w, self._w = self._w, _Window(now, delay)
        wall = now - w.at
        if w.busy_s < wall / 2:
            return  # mostly idle: nothing to judge by
        waiting = max(0, delay - w.delay_ns) / 1e9 / wall
        mean_step = w.busy_s / w.steps
        if self._trial is not None:
            before, base = self._trial
            self._trial = None
            won = mean_step <= self.s.keep * base
            this, other = ((self._fewer, self._more) if self.threads < before
                           else (self._more, self._fewer))
            this.result(won, now)
            if won:
                other.at = max(other.at, now + other.interval)
                log.info("thread governor: kept", extra={
                    "threads": self.threads, "step_ms": round(1e3 * mean_step, 2),
                    "before_ms": round(1e3 * base, 2)})
            else:
                self._set(before, "trial lost", waiting, mean_step)
            return
        n = self.threads
        if waiting >= self.s.high and n > 1 and self._fewer.due(now):
            excess = waiting * self.cores / (n - waiting) if waiting < n else n
            self._try(max(1, n - max(1, round(excess))), mean_step, "team waited for cores",
                      waiting)
        elif self.threads < self.cap and self._more.due(now):
            self._try(self.threads + 1, mean_step, "probe", waiting)

    def _try(self, threads: int, mean_step: float, why: str, waiting: float) -> None:
        self._trial = (self.threads, mean_step)
        self._set(threads, why, waiting, mean_step)

    def _set(self, threads: int, why: str, waiting: float, mean_step: float) -> None:
        log.info("thread governor: %s", why, extra={
            "threads": threads, "was": self.threads, "waiting_threads": round(waiting, 2),
            "step_ms": round(1e3 * mean_step, 2)})
        self._set_threads(threads)
        self.threads = threads


class _Backoff:
    """When a kind of trial may run next: `probe_s` after one that lost, doubled after each
    further loss up to `max_probe_s`; after a win, `probe_s` again. A win also puts off the
    other kind by its interval (a thread fewer just kept is not probed back at once)."""

    def __init__(self, s: GovernorSettings) -> None:
        self.s = s
        self.interval = s.probe_s
        self.at = 0.0

    def due(self, now: float) -> bool:
        return now >= self.at

    def result(self, won: bool, now: float) -> None:
        self.interval = self.s.probe_s if won else min(2 * self.interval, self.s.max_probe_s)
        self.at = now + self.interval


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup"
                     ) -> int | None:
    """The cores this process's cgroup may use: its CPU quota ÷ period, rounded up, the
    smallest over the cgroup and its parents (a Kubernetes `limits.cpu`); None without one.
    cgroup v2 (`cpu.max`), else v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`). torch takes
    its default thread count from the cores it sees, not from the quota: 2 CPUs of a 64-core
    node would get 64 threads, throttled most of every period."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    v2 = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
    v1 = next((ln.split(":", 2)[2] for ln in lines
               if "cpu" in ln.split(":", 2)[1].split(",") and ln.count(":") >= 2), None)
    if (Path(root) / "cpu.max").exists() or (v2 is not None and v1 is None):
        return _smallest(Path(root), v2 or "/", _v2_limit)
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (Path(root) / sub).is_dir():
            return _smallest(Path(root) / sub, v1 or "/", _v1_limit)
    return None


def _smallest(mount: Path, cgroup: str, limit: Callable[[Path], float | None]) -> int | None:
    """The smallest limit from the cgroup's directory up to the mount (a container sees its
    own cgroup as the mount, so its path there may not exist: then the mount alone)."""
    found: list[float] = []
    d = mount / cgroup.strip("/")
    while True:
        if (got := limit(d)) is not None:
            found.append(got)
        if d == mount or mount not in d.parents:
            break
        d = d.parent
    return math.ceil(min(found)) if found else None


def _v2_limit(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 else quota / period
