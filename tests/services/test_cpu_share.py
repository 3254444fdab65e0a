"""The thread governor (services/cpu_share.py): its rule on a scripted clock and run-queue
waits, which threads it counts, and, in a process with the cores really taken, that it steps
down to one thread and back once they are free."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pdserve.services.cpu_share import (
    GovernorSettings,
    ThreadGovernor,
    cgroup_cpu_limit,
    team_run_delay_ns,
)


class Script:
    """A fake clock and run-queue counter. Each step lasts `step_s(threads)` and the team
    waits `waiting(threads)` threads' worth of it."""

    def __init__(self, threads: int = 4) -> None:
        self.now = 0.0
        self.delay_ns = 0
        self.threads = threads
        self.set_calls: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.set_calls.append(n)

    def governor(self, **kw: float) -> ThreadGovernor:
        s = GovernorSettings(**{"window_s": 1.0, "high": 0.25, "keep": 0.9, "probe_s": 5.0,
                                "max_probe_s": 20.0, "cores": self.threads, **kw})
        return ThreadGovernor(s, read_delay=lambda tid: self.delay_ns, clock=lambda: self.now,
                              get_threads=lambda: self.threads, set_threads=self.set_threads)

    def steps(self, gov: ThreadGovernor, seconds: float, waiting: Callable[[int], float],
              step_s: Callable[[int], float] = lambda n: 0.4 / n, idle_s: float = 0.0) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            with gov.step():
                took = step_s(self.threads)
                self.now += took
                self.delay_ns += int(waiting(self.threads) * took * 1e9)
            self.now += idle_s


def idle(n: int) -> float:
    return 0.02


def light_load(n: int) -> float:  # a gateway and a client beside the team: waits, but no cliff
    return 0.3


def one_core_taken(n: int) -> float:  # of two cores
    return 0.6 if n == 2 else 0.0


def cliff(n: int) -> float:  # steps on two cores with one taken: two threads 30x slower
    return 0.6 if n == 2 else 0.02


def test_an_idle_machine_keeps_every_thread():
    s = Script(threads=4)
    gov = s.governor()
    s.steps(gov, 60, idle)
    assert gov.cap == 4 and gov.threads == 4 and s.set_calls == []


def test_cores_taken_one_thread_fewer_is_kept_and_probes_back_off():
    s = Script(threads=2)
    gov = s.governor()
    s.steps(gov, 2.0, one_core_taken, cliff)
    assert s.set_calls == [1] and gov.threads == 1  # tried at once, and kept
    # Still taken: probes with two threads lose, 5 s after the trial, then 10 s, then 20 s
    # (the most) after each loss.
    probes_at = []
    for _ in range(800):
        before = len(s.set_calls)
        s.steps(gov, 0.1, one_core_taken, cliff)
        if len(s.set_calls) > before and s.set_calls[-1] == 2:
            probes_at.append(s.now)
    # between probes: the probe's window, the interval, and up to a window to notice it
    gaps = [b - a for a, b in zip(probes_at, probes_at[1:])]
    assert len(gaps) >= 3
    assert 10.6 <= gaps[0] <= 12.7 and 20.6 <= gaps[1] <= 22.7 and 20.6 <= gaps[2] <= 22.7, gaps
    assert s.set_calls == [1] + [2, 1] * len(probes_at)
    # The cores come back: the next probe is kept.
    s.steps(gov, 25, idle)
    assert gov.threads == 2 and s.set_calls[-2:] == [1, 2]


def test_waiting_without_a_cliff_keeps_the_threads_after_a_lost_trial():
    """Beside light load the team waits, but one thread fewer steps slower: each trial is
    undone, and they come 5, 10, 20, 20 s apart."""
    s = Script(threads=2)
    gov = s.governor()
    s.steps(gov, 60, light_load)
    assert gov.threads == 2
    assert s.set_calls == [1, 2] * 4  # at about 1, 7, 18 and 39 s; 60 s would need 61 s


def test_many_cores_the_trial_takes_off_the_threads_beyond_the_free_cores():
    """8 cores, 3 taken: of 11 runnable threads 3 wait, the team's share of them 8/11; one
    trial goes down to the 5 free cores, the cliff's edge."""
    s = Script(threads=8)
    gov = s.governor()

    def three_taken(n: int) -> float:
        return max(0, n + 3 - 8) * n / (n + 3)

    def steps(n: int) -> float:
        return 0.4 / n if n <= 5 else 2.0

    s.steps(gov, 4.5, three_taken, steps)
    assert s.set_calls == [5] and gov.threads == 5


def test_a_mostly_idle_window_decides_nothing():
    s = Script(threads=2)
    gov = s.governor()
    # 0.1 s steps 0.3 s apart: a quarter of each window steps, and it waits all along.
    s.steps(gov, 20, lambda n: 2.0, lambda n: 0.1, idle_s=0.3)
    assert s.set_calls == []


def test_one_thread_configured_or_no_schedstat_turns_it_off():
    s = Script(threads=1)
    gov = s.governor()
    s.steps(gov, 5, lambda n: 1.0)
    assert gov.off and s.set_calls == []
    s = Script(threads=2)
    gov = ThreadGovernor(read_delay=lambda tid: None, clock=lambda: s.now,
                         get_threads=lambda: 2, set_threads=s.set_threads)
    s.steps(gov, 5, lambda n: 1.0)
    assert gov.off and s.set_calls == []


def test_the_team_is_the_engine_thread_and_the_threads_python_did_not_start(tmp_path: Path):
    """Python's own threads (event loop, helpers) are left out, the engine thread counted."""
    started = threading.Event()
    stop = threading.Event()

    def helper() -> None:
        started.set()
        stop.wait()

    t = threading.Thread(target=helper)
    t.start()
    started.wait()
    try:
        assert t.native_id is not None
        engine, helper_tid, omp = threading.get_native_id(), t.native_id, 999_999_991
        for tid, waited in ((engine, 10), (helper_tid, 1_000), (omp, 200)):
            (tmp_path / str(tid)).mkdir()
            (tmp_path / str(tid) / "schedstat").write_text(f"5 {waited} 3\n")
        (tmp_path / "999999992").mkdir()  # a thread that exited: no schedstat left
        assert team_run_delay_ns(engine, str(tmp_path)) == 210
        assert team_run_delay_ns(helper_tid, str(tmp_path)) == 1_200  # the engine's view
    finally:
        stop.set()
        t.join()
    assert team_run_delay_ns(threading.get_native_id(), str(tmp_path / "none")) is None


def test_this_kernel_has_schedstat():
    """What the workers' governor reads; without it the governor is off, so say so here."""
    assert team_run_delay_ns(threading.get_native_id()) is not None


GOVERNED = r"""
import os, subprocess, sys, threading, time, torch
from pdserve.services.cpu_share import GovernorSettings, ThreadGovernor
torch.set_num_threads(2)
gov = ThreadGovernor(GovernorSettings(window_s=0.2, probe_s=0.5, max_probe_s=0.5))
x = torch.randn(16, 576)
w = torch.randn(576, 576)

def run(seconds):
    end = time.monotonic() + seconds
    seen = set()
    while time.monotonic() < end:
        with gov.step():
            for _ in range(50):  # many small parallel regions, as a decode step
                x @ w
        seen.add(gov.threads)
    return seen

def main():
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(len(os.sched_getaffinity(0)))]
    try:
        deadline = time.monotonic() + 60
        while gov.threads != 1 and time.monotonic() < deadline:
            run(0.1)
        down = gov.threads
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    deadline = time.monotonic() + 60
    while gov.threads != 2 and time.monotonic() < deadline:
        run(0.1)
    print(gov.cap, down, gov.threads, torch.get_num_threads())

t = threading.Thread(target=main)  # an engine thread, as in a worker
t.start()
t.join()
"""


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_decode_steps_give_the_same_bits_at_any_thread_count(loaded, rows):
    """The governor's premise: changing the thread count between two decode steps changes no
    bit of their results (the C products split outputs, never a sum, over threads; decode
    attention splits sequences or KV heads), full logits and greedy rows alike."""
    import torch

    from pdserve.engine.kv_pool import KVPool
    from pdserve.engine.runner import ModelRunner

    pool = KVPool(loaded.layout, 96)
    runner = ModelRunner(loaded.model, pool)
    prompts = [[1 + (i * 37 + j * 11) % 40000 for j in range(40 + 13 * i)] for i in range(rows)]
    tables = [pool.reserve(pool.layout.pages_for(len(p) + 1)) for p in prompts]
    before = torch.get_num_threads()
    try:
        for p, t in zip(prompts, tables):
            runner.prefill(p, t)
        last, ctx = [p[-1] for p in prompts], [len(p) + 1 for p in prompts]
        out: dict[tuple[int, bool], torch.Tensor] = {}
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for greedy in (False, True):
                out[threads, greedy] = runner.decode(last, ctx, tables, [greedy] * rows).clone()
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[1, False], out[2, False])
    assert torch.equal(out[1, True], out[2, True])
    assert torch.equal(out[1, True].argmax(-1), out[1, False].argmax(-1))


@pytest.mark.integration
def test_the_cores_taken_then_freed_steps_down_to_one_thread_and_back():
    """One spinning process per core: the team waits for cores and goes down to one thread;
    the spinners killed, a probe finds the cores free and keeps two."""
    r = subprocess.run([sys.executable, "-c", GOVERNED], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    cap, down, up, torch_threads = map(int, r.stdout.split())
    assert (cap, down, up, torch_threads) == (2, 1, 2, 2)


def cgroup_tree(tmp_path: Path, files: dict[str, str], self_cgroup: str) -> tuple[str, str]:
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text)
    (tmp_path / "fs").mkdir(exist_ok=True)
    (tmp_path / "cgroup").write_text(self_cgroup)
    return str(tmp_path / "fs"), str(tmp_path / "cgroup")


@pytest.mark.parametrize("files, self_cgroup, cores", [
    # a container's own cgroup (v2, namespaced): 2.5 CPUs is 3 threads
    ({"cpu.max": "250000 100000\n"}, "0::/\n", 3),
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),
    # v2 on the host: the smallest limit from the process's cgroup up
    ({"kubepods/cpu.max": "800000 100000\n", "kubepods/pod1/cpu.max": "max 100000\n",
      "kubepods/pod1/c1/cpu.max": "200000 100000\n"}, "0::/kubepods/pod1/c1\n", 2),
    ({"kubepods/cpu.max": "100000 100000\n", "kubepods/pod1/cpu.max": "400000 100000\n"},
     "0::/kubepods/pod1\n", 1),
    # v1 (this machine's kind): cpu controller, -1 = no quota
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
     "4:memory:/x\n1:cpu:/\n0::/\n", None),
    ({"cpu,cpuacct/docker/c/cpu.cfs_quota_us": "150000\n",
      "cpu,cpuacct/docker/c/cpu.cfs_period_us": "100000\n"},
     "3:cpu,cpuacct:/docker/c\n", 2),
    ({}, "", None),  # no cgroup files at all
])
def test_the_cgroup_cpu_limit_in_cores(tmp_path: Path, files, self_cgroup, cores):
    root, self_file = cgroup_tree(tmp_path, files, self_cgroup)
    assert cgroup_cpu_limit(root, self_file) == cores
