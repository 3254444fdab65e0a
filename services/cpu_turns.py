"""Workers that share one machine's CPU cores take turns computing (`--cpu-turns-path PATH`).

Disaggregated prefill and decode workers are meant for separate machines. `pdserve up` runs
them all on one, where each process's OpenMP team wants every core: a prefill step and a decode
step running at once oversubscribe the cores, and each is slowed far more than it would take to
run them one after the other (measured: a prefill step of a 16-prompt burst took twice as long
while a decode worker stepped beside it). One engine in one process never has that problem: it
runs its prefill steps and decode steps one at a time, new prompts first.

Workers given the same PATH do the same across processes, with two advisory file locks
(flock: the kernel drops a dead process's locks, so a crash never wedges the others):

- a prefill step holds `PATH.lock` shared (prefill workers compute together: they are the
  stages of a pipeline, or run their own thread counts), a decode step holds it exclusive;
- prefill first, as in one engine: a prefill worker waiting for its turn holds `PATH.intent`,
  and a decode worker passes through `PATH.intent` before it asks for the lock, so it cannot
  slip in ahead of a waiting prefill step; decode steps are short, so prefill waits at most
  one.

Turns are taken on the engine thread around each step; the event loop never blocks on them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from pdserve.engine.hooks import EngineHooks
from pdserve.engine.scheduler import BatchKind
from pdserve.services.cpu_share import ThreadGovernor


class CpuTurns:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fds: tuple[int, int] | None = None
        self._mutex = threading.Lock()  # flock is per open file: one turn per process at once
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fds = (os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600),
                         os.open(f"{path}.intent", os.O_RDWR | os.O_CREAT, 0o600))

    @contextlib.contextmanager
    def prefill(self) -> Iterator[None]:
        if self._fds is None:
            yield
            return
        lock, intent = self._fds
        with self._mutex:
            fcntl.flock(intent, fcntl.LOCK_EX)
            try:
                fcntl.flock(lock, fcntl.LOCK_SH)
            finally:
                fcntl.flock(intent, fcntl.LOCK_UN)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def decode(self) -> Iterator[None]:
        if self._fds is None:
            yield
            return
        lock, intent = self._fds
        with self._mutex:
            fcntl.flock(intent, fcntl.LOCK_EX)  # not ahead of a prefill step waiting for its turn
            fcntl.flock(intent, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


class TakeTurns(EngineHooks):
    """Engine hooks of a worker that takes turns: prefill and stage steps as prefill, decode
    steps as decode; a `governor` (services/cpu_share.py) times each step once its turn has
    come and may change the thread count after it."""

    def __init__(self, turns: CpuTurns, governor: ThreadGovernor | None = None) -> None:
        self.turns = turns
        self.governor = governor

    @contextlib.contextmanager
    def turn(self, kind: BatchKind) -> Iterator[None]:
        with self.turns.decode() if kind is BatchKind.DECODE else self.turns.prefill():
            if self.governor is None:
                yield
            else:
                with self.governor.step():
                    yield
