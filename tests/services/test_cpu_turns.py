"""Co-located workers take turns on the cores (services/cpu_turns.py): real processes, real
file locks; the order of turns is read from the timestamps each process writes."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from pdserve.services.cpu_turns import CpuTurns


def _turn(path: str, role: str, start_at: float, hold_s: float, out: str) -> None:
    turns = CpuTurns(Path(path))
    time.sleep(max(0.0, start_at - time.time()))
    with getattr(turns, role)():
        got = time.time()
        time.sleep(hold_s)
    Path(out).write_text(f"{got} {time.time()}")


def run(tmp_path, plan):  # type: ignore[no-untyped-def]
    """plan: (name, role, start offset s, hold s); returns name -> (got, released) offsets."""
    ctx = mp.get_context("spawn")
    t0 = time.time() + 1.5  # after the children have started
    procs = []
    for name, role, at, hold in plan:
        p = ctx.Process(target=_turn, args=(str(tmp_path / "turns"), role, t0 + at, hold,
                                            str(tmp_path / name)))
        p.start()
        procs.append(p)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    out = {}
    for name, *_ in plan:
        got, rel = map(float, (tmp_path / name).read_text().split())
        out[name] = (got - t0, rel - t0)
    return out


def test_a_waiting_prefill_step_goes_before_the_next_decode_step(tmp_path):
    t = run(tmp_path, [("d1", "decode", 0.0, 0.6), ("p", "prefill", 0.2, 0.6),
                       ("d2", "decode", 0.4, 0.1)])
    # d1 holds the cores; p waits for it; d2, asking later than p but while p waits, goes
    # after p although the lock was free for a moment when d1 let go.
    assert t["p"][0] >= t["d1"][1] - 0.01
    assert t["d2"][0] >= t["p"][1] - 0.01


def test_prefill_steps_share_and_decode_steps_exclude(tmp_path):
    t = run(tmp_path, [("p1", "prefill", 0.0, 0.6), ("p2", "prefill", 0.2, 0.2),
                       ("d", "decode", 0.1, 0.1)])
    assert t["p2"][0] < t["p1"][1]  # two prefill workers (pipeline stages) compute together
    # ... and decode waits for both: p2 asked after d, but d was still waiting for p1.
    assert t["d"][0] >= max(t["p1"][1], t["p2"][1]) - 0.01


def test_off_without_a_path():
    turns = CpuTurns(None)
    with turns.prefill(), turns.decode():  # no locks: nested turns do not block
        pass
