from __future__ import annotations

import pytest
from pdserve.scheduler.balancers import (
    DecodeCandidate,
    PrefillCandidate,
    attention_work,
    pick_decode,
    pick_prefill,
)
from pdserve.scheduler.registry import Load, RegistryError, WorkerRegistry, WorkerSpec


def test_attention_work_is_quadratic_in_context():
    assert attention_work(0, 100) == 100 * 50
    assert attention_work(1000, 100) == 100 * 1050


def test_prefill_prefers_the_worker_that_keeps_the_max_lowest():
    cands = [PrefillCandidate("a", 1e6, 1000), PrefillCandidate("b", 1e3, 10),
             PrefillCandidate("c", 5e5, 900)]
    assert pick_prefill(cands, cached=0, new=100) == "b"


def test_prefill_balances_attention_not_just_tokens():
    # Same queued tokens, but a's queue holds long-context work: the request goes to b.
    cands = [PrefillCandidate("a", 4e6, 1000), PrefillCandidate("b", 1e5, 1000)]
    assert pick_prefill(cands, cached=2000, new=200) == "b"


def test_prefill_tie_goes_to_first_in_order():
    cands = [PrefillCandidate("a", 0, 0), PrefillCandidate("b", 0, 0)]
    assert pick_prefill(cands, 0, 10) == "a"
    assert pick_prefill([], 0, 10) is None


def test_decode_never_picks_a_worker_that_cannot_hold_the_request():
    cands = [DecodeCandidate("a", used_pages=0, free_pages=3, running=0),
             DecodeCandidate("b", used_pages=50, free_pages=60, running=9)]
    assert pick_decode(cands, pages_needed=4) == "b"
    assert pick_decode(cands, pages_needed=61) is None


def test_decode_balances_pages_and_requests():
    cands = [DecodeCandidate("a", used_pages=10, free_pages=90, running=1),
             DecodeCandidate("b", used_pages=10, free_pages=90, running=8)]
    assert pick_decode(cands, pages_needed=2) == "a"


def spec(wid: str, role: str = "decode", epoch: int = 1, ns: str = "ns") -> WorkerSpec:
    return WorkerSpec(wid, role, "127.0.0.1:1", epoch, ns, "fp", 64, 100, 8192, 1000)


def test_registry_rotation_expiry_and_epochs():
    r = WorkerRegistry()
    r.join(spec("d0"), now=0.0)
    r.join(spec("p0", role="prefill"), now=0.0)
    assert [w.spec.worker_id for w in r.active("decode")] == ["d0"]
    assert r.report("d0", 1, Load(free_pages=10, total_pages=100), now=1.0)
    assert not r.report("d0", 2, Load(), now=1.0)  # wrong epoch ignored
    assert r.expire(now=2.5, timeout_s=2.0) == ["p0"]
    assert r.active("prefill") == []
    r.join(spec("d0", epoch=5), now=3.0)  # restarted: new epoch replaces the old entry
    assert r.workers["d0"].spec.epoch == 5 and r.workers["d0"].load.free_pages == 100
    assert not r.leave("d0", 1)  # the old epoch's stream closing does not remove the new one
    with pytest.raises(RegistryError):
        r.join(spec("d0", epoch=4), now=3.0)
    with pytest.raises(RegistryError, match="serves"):
        r.join(spec("d1", ns="other-model"), now=3.0)
    r.report("d0", 5, Load(free_pages=10, total_pages=100, draining=True), now=4.0)
    assert r.active("decode") == []  # draining: out of rotation


def test_load_table_follows_reports_bumps_and_membership():
    r = WorkerRegistry()
    r.join(spec("d1"), now=0.0)
    r.join(spec("d0"), now=0.0)
    t = r.table("decode")
    assert t.ids == ["d0", "d1"] and t.free_pages.tolist() == [100, 100]
    r.report("d1", 1, Load(free_pages=40, total_pages=100, running=3), now=1.0)
    assert r.table("decode") is t  # updated in place, no rebuild
    assert t.used_pages.tolist() == [0, 60] and t.running.tolist() == [0, 3]
    r.bump("d0", free_pages=-10, running=1)
    assert t.free_pages.tolist() == [90, 40] and t.running.tolist() == [1, 3]
    r.report("d1", 1, Load(free_pages=40, total_pages=100, draining=True), now=2.0)
    assert r.table("decode").ids == ["d0"]  # membership changed: rebuilt
    r.leave("d0", 1)
    assert r.table("decode").ids == []


def test_excluded_workers_are_never_picked():
    """A worker that failed a request is no candidate for its retry, even the least loaded;
    with every worker excluded there is no pick (the gateway answers UNAVAILABLE)."""
    import numpy as np
    from pdserve.scheduler.balancers import pick_decode_index, pick_prefill_index

    att, tok = np.array([0.0, 5.0, 9.0]), np.array([0.0, 10.0, 20.0])
    assert pick_prefill_index(att, tok, 0, 100) == 0
    assert pick_prefill_index(att, tok, 0, 100, np.array([False, True, True])) == 1
    assert pick_prefill_index(att, tok, 0, 100, np.array([False, False, False])) is None
    used, free, running = np.array([0, 50, 10]), np.array([100, 50, 90]), np.array([0, 5, 1])
    assert pick_decode_index(used, free, running, 20) == 0
    assert pick_decode_index(used, free, running, 20, np.array([False, True, True])) == 2
    assert pick_decode_index(used, free, running, 60, np.array([False, True, True])) == 2
    assert pick_decode_index(used, free, running, 95, np.array([False, True, True])) is None
