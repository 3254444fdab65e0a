"""Co-located workers take turns on the cores (services/cpu_turns.py): real processes, real
file locks. The test drives each process step by step (events, never a timed start) and reads
the order of turns from the timestamps each process writes."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import pytest

from pdserve.services.cpu_turns import CpuTurns
from tests.helpers import wait_until

pytestmark = pytest.mark.integration  # starts processes

def _turn(path: str, role: str, ev: dict[str, Any], out: str) -> None:
    turns = CpuTurns(Path(path))
    ev["ready"].set()
    ev["go"].wait(60)
    asked = time.time()
    ev["asked"].set()
    with getattr(turns, role)():
        got = time.time()
        ev["got"].set()
        ev["release"].wait(60)
        released = time.time()
    Path(out).write_text(f"{asked} {got} {released}")


class Turns:
    """One process per name, each asking for its turn when told to and holding it until told
    to let go."""

    def __init__(self, tmp_path: Path, roles: dict[str, str]) -> None:
        ctx = mp.get_context("spawn")
        self.tmp = tmp_path
        self.ev = {n: {k: ctx.Event() for k in ("ready", "go", "asked", "got", "release")}
                   for n in roles}
        self.procs = {n: ctx.Process(target=_turn, args=(str(tmp_path / "turns"), role,
                                                          self.ev[n], str(tmp_path / n)))
                      for n, role in roles.items()}
        for p in self.procs.values():
            p.start()
        for n in roles:
            assert self.ev[n]["ready"].wait(120), f"{n} did not start"

    def go(self, name: str) -> None:
        self.ev[name]["go"].set()
        assert self.ev[name]["asked"].wait(30)

    def got(self, name: str) -> bool:
        return self.ev[name]["got"].is_set()

    def release(self, name: str) -> None:
        self.ev[name]["release"].set()

    def times(self) -> dict[str, tuple[float, float, float]]:
        """name -> (asked, got, released), after every process ended."""
        for p in self.procs.values():
            p.join(60)
            assert p.exitcode == 0
        out = {}
        for n in self.procs:
            asked, got, released = map(float, (self.tmp / n).read_text().split())
            out[n] = (asked, got, released)
        return out


def intent_held(tmp_path: Path) -> bool:
    """Whether a prefill step is waiting for its turn (it holds the intent lock)."""
    import fcntl
    import os

    fd = os.open(f"{tmp_path / 'turns'}.intent", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_waiting_prefill_step_goes_before_the_next_decode_step(tmp_path):
    t = Turns(tmp_path, {"d1": "decode", "p": "prefill", "d2": "decode"})
    t.go("d1")
    wait_until(lambda: t.got("d1"), 30)
    t.go("p")
    wait_until(lambda: intent_held(tmp_path), 30, what="prefill waiting for its turn")
    t.go("d2")  # asks while p waits
    t.release("d1")
    wait_until(lambda: t.got("p"), 30)
    t.release("p")
    wait_until(lambda: t.got("d2"), 30)
    t.release("d2")
    d1, p, d2 = (t.times()[n] for n in ("d1", "p", "d2"))
    # d2 asked before p got its turn, and still went after p: the lock was free for a moment
    # when d1 let go, but a waiting prefill step goes first.
    assert d2[0] < p[1]
    assert p[1] >= d1[2] and d2[1] >= p[2]


def test_prefill_steps_share_and_decode_steps_exclude(tmp_path):
    t = Turns(tmp_path, {"p1": "prefill", "d": "decode", "p2": "prefill"})
    t.go("p1")
    wait_until(lambda: t.got("p1"), 30)
    t.go("d")
    t.go("p2")
    wait_until(lambda: t.got("p2"), 30)  # while p1 still holds its turn
    assert not t.got("d")
    t.release("p1")
    t.release("p2")
    wait_until(lambda: t.got("d"), 30)
    t.release("d")
    p1, d, p2 = (t.times()[n] for n in ("p1", "d", "p2"))
    assert p2[1] < p1[2]  # two prefill workers (pipeline stages) compute together
    # ... and decode, which asked before p2, waits for both.
    assert d[0] < p2[0] and d[1] >= max(p1[2], p2[2])


def test_off_without_a_path():
    turns = CpuTurns(None)
    with turns.prefill(), turns.decode():  # no locks: nested turns do not block
        pass
