"""Worker threading: set-up torch work runs in a thread that exits (so the engine thread's
OpenMP team is the process's only one), every change to an engine runs on its engine thread,
and an idle prefill engine gathers a burst (services/engine_thread.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass

import pytest

from pdserve.services.engine_thread import EngineStopped, EngineThread, GatherPolicy
from pdserve.services.outbox import Outboxes
from pdserve.services.worker import in_passing_thread
from tests.helpers import wait_until


def test_in_passing_thread_returns_raises_and_leaves_no_thread():
    main = threading.get_ident()
    assert in_passing_thread(lambda: threading.get_ident()) != main
    with pytest.raises(KeyError, match="x"):
        in_passing_thread(lambda: {}["x"])
    assert not [t for t in threading.enumerate() if t.name == "setup"]


@pytest.mark.integration
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


@dataclass
class Prompt:
    tokens: int
    ready: bool = True  # False: its cached KV is still arriving


class Steps:
    """An engine stand-in for the engine thread's timing: queued prompts, and the steps it was
    asked to run with what was queued at each (a fake for a timing test only)."""

    def __init__(self, budget: int = 300) -> None:
        self.queued: list[Prompt] = []
        self.steps: list[list[int]] = []
        self.threads: set[str] = set()
        self.scheduler = self
        self.hooks = self
        self.budget = budget

    @property
    def queued_tokens(self) -> int:
        return sum(p.tokens for p in self.queued)

    @property
    def waiting(self) -> list[Prompt]:
        return list(self.queued)

    def ready(self, p: Prompt) -> bool:
        return p.ready

    @property
    def has_work(self) -> bool:
        return bool(self.queued)

    def add(self, n: int, ready: bool = True) -> None:
        self.threads.add(threading.current_thread().name)
        self.queued.append(Prompt(n, ready))

    def step(self) -> list:
        self.steps.append([p.tokens for p in self.queued])
        self.queued.clear()
        return []


def test_gather_policy_waits_until_a_step_is_full_or_the_deadline():
    g = GatherPolicy(wait_s=0.02, budget_tokens=300)
    assert g.wait_left(woke_at=10.0, now=10.0, queued_tokens=100) == pytest.approx(0.02)
    assert g.wait_left(10.0, 10.015, 100) == pytest.approx(0.005)
    assert g.wait_left(10.0, 10.03, 100) == 0.0          # the deadline passed
    assert g.wait_left(10.0, 10.0, 300) == 0.0           # a whole step is queued
    assert GatherPolicy(0.0, 300).wait_left(10.0, 10.0, 1) == 0.0


def test_an_idle_engine_gathers_a_burst_into_one_step():
    """Three prompts of 100 tokens arriving one after the other, with a 60 s gather: one step
    of all three, as soon as the third arrives (not the first alone, not after 60 s)."""
    eng = Steps()
    t = EngineThread(eng, Outboxes(), name="steps", gather=GatherPolicy(60.0, 300))
    t.start()
    try:
        for _ in range(3):
            t.post(lambda: eng.add(100))
        wait_until(lambda: eng.steps, 30, what="one step")
        assert eng.steps == [[100, 100, 100]]
        assert eng.threads == {"steps"}  # the changes ran on the engine thread
    finally:
        t.stop()


def test_gathering_ends_at_its_deadline_and_a_call_gets_its_result():
    eng = Steps()
    t = EngineThread(eng, Outboxes(), name="steps", gather=GatherPolicy(0.05, 2048))
    t.start()
    try:
        assert t.call(lambda: eng.add(10) or "added").result(timeout=30) == "added"
        wait_until(lambda: eng.steps == [[10]], 30, what="a step after the deadline")
        with pytest.raises(KeyError):
            t.call(lambda: {}["missing"]).result(timeout=30)
    finally:
        t.stop()
    with pytest.raises(EngineStopped):
        t.call(lambda: None).result(timeout=1)


def test_a_prompt_still_fetching_its_cached_kv_is_not_held_for_more():
    """Gathering holds a step for more prompts; a prompt whose cached KV is still arriving
    waits for it in its first layer anyway, so alone it steps at once, not after 60 s."""
    eng = Steps()
    t = EngineThread(eng, Outboxes(), name="steps", gather=GatherPolicy(60.0, 300))
    t.start()
    try:
        t.post(lambda: eng.add(64, ready=False))
        wait_until(lambda: eng.steps, 30, what="a step")
        assert eng.steps == [[64]]
    finally:
        t.stop()
