from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.scheduler.balancers import (
    DUE_HORIZONS_S,
    DecodeCandidate,
    PrefillCandidate,
    attention_work,
    due_profile,
    pick_decode,
    pick_prefill,
    prefill_work,
    work_ahead,
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


def test_ties_are_broken_at_random_with_a_generator():
    """Several gateways place on the same stale loads: with random tie breaks they spread
    over the tied workers instead of all taking the lowest index."""
    import numpy as np

    from pdserve.scheduler.balancers import pick_decode_index, pick_prefill_index

    zeros, free = np.zeros(4), np.full(4, 100.0)
    rng = np.random.default_rng(0)
    picks = {pick_prefill_index(zeros, zeros, 0, 10, rng=rng) for _ in range(64)}
    assert picks == {0, 1, 2, 3}
    picks = {pick_decode_index(zeros, free, zeros, 1, rng=rng) for _ in range(64)}
    assert picks == {0, 1, 2, 3}
    # Only exact ties are random: a less loaded worker still wins every time.
    busy = np.array([5.0, 0.0, 5.0, 5.0])
    assert {pick_decode_index(busy, free, busy, 1, rng=rng) for _ in range(16)} == {1}
    # Two registries (two gateways) with the same view do not herd one burst onto one worker.
    regs = [WorkerRegistry(rng=np.random.default_rng(seed)) for seed in (1, 2)]
    for r in regs:
        for i in range(4):
            r.join(spec(f"d{i}"), now=0.0)
            r.join(spec(f"p{i}", role="prefill"), now=0.0)
    firsts = {r.pick(0, 100, 1)[1].spec.worker_id for r in regs for _ in range(8)}
    assert len(firsts) > 1


def test_due_profile_sums_work_by_horizon_and_work_ahead_reads_it_between_them():
    assert DUE_HORIZONS_S[:4] == (0.0, 0.5, 1.0, 2.0) and DUE_HORIZONS_S[-1] == float("inf")
    # overdue (-1 s) and due now count at 0; 0.3 s by 0.5; 10 s by 16; a day only at inf
    profile = due_profile([(-1.0, 2.0), (0.3, 1.0), (10.0, 4.0), (86_400.0, 8.0)])
    assert profile == [2, 3, 3, 3, 3, 3, 7, 7, 7, 7, 7, 15]
    rows = np.array([profile] * 5, dtype=float)
    ahead = work_ahead(rows, np.array([0.0, 0.25, 12.0, 300.0, 1e9]))
    # linear between horizons (0.25 s: halfway from 2 to 3); past the last finite horizon
    # the work due "some day" does not count: it is due after any deadline
    assert ahead.tolist() == [2.0, 2.5, 5.0, 7.0, 7.0]
    assert work_ahead(np.zeros((2, len(DUE_HORIZONS_S))), np.array([1.0, 5.0])).tolist() == [0, 0]


@given(st.lists(st.tuples(st.floats(-10, 1000), st.floats(0, 100)), max_size=30),
       st.lists(st.floats(-5, 2000), min_size=1, max_size=10))
@settings(max_examples=200, deadline=None)
def test_work_ahead_lies_between_the_work_due_at_the_horizons_around_it(items, dues):
    """Read between two horizons, the wait ahead is at least the work due by the earlier one
    and at most the work due by the later one, and it never falls as the deadline grows."""
    profile = np.array([due_profile(items)])
    last = -1.0
    for due in sorted(dues):
        got = float(work_ahead(profile, np.array([due]))[0])
        lo = max((h for h in DUE_HORIZONS_S if h <= due), default=0.0)
        above = [h for h in DUE_HORIZONS_S if h > due]
        hi = above[0] if above and not math.isinf(above[0]) else lo
        exact_lo = sum(w for d, w in items if d <= lo)
        exact_hi = sum(w for d, w in items if d <= hi)
        assert exact_lo - 1e-6 <= got <= exact_hi + 1e-6
        assert got >= last - 1e-9
        last = got


def test_a_tie_goes_to_the_worker_where_the_prompt_would_wait_least():
    """p2 holds the most work; p0 a long prompt due in two minutes, p1 a short one due now. A
    short prompt on p0 or p1 leaves the highest load where it is (a tie on the balance), and
    the lower load would send it behind p1's; by deadline it goes first on p0, so it goes
    there."""
    r = WorkerRegistry(rng=np.random.default_rng(0))
    r.join(spec("d0"), now=0.0)
    for w in ("p0", "p1", "p2"):
        r.join(spec(w, role="prefill"), now=0.0)
    rate = {"prefill_rate": 1000.0, "prefill_slack": 3.0}
    queues = {"p0": (60_000, 120.0), "p1": (1000, 0.0), "p2": (100_000, 240.0)}
    for w, (tokens, due) in queues.items():
        r.report(w, 1, Load(queued_tokens=tokens, queued_attention=attention_work(0, tokens),
                            due_s=tuple(due_profile([(due, tokens / 1000)])), **rate), now=0.0)
    t = r.table("prefill")
    assert t.ahead(0, 100).tolist() == [0.0, 1.0, 0.0]
    assert {r.pick(0, 100, 1)[0].spec.worker_id for _ in range(8)} == {"p0"}
    # Unreported profiles (all zero) leave the old tie break: the lower load.
    for w, (tokens, _) in queues.items():
        r.report(w, 1, Load(queued_tokens=tokens, queued_attention=attention_work(0, tokens)),
                 now=1.0)
    assert {r.pick(0, 100, 1)[0].spec.worker_id for _ in range(8)} == {"p1"}
    # A placement charges its worker's profile until the next report: 100 tokens' worth at
    # 1,000 a second, due in 0.3 s (slack 3), a third of it for a three-stage share.
    r.report("p1", 1, Load(due_s=tuple(due_profile([])), **rate), now=2.0)
    r.bump("p1", prefill_work(0, 100), 1 / 3, queued_tokens=33)
    at = dict(zip(DUE_HORIZONS_S, r.table("prefill").due[1]))
    assert at[0.0] == 0.0 and at[0.5] == pytest.approx(prefill_work(0, 100) / 1000 / 3)
    assert r.workers["p1"].load.queued_tokens == 33


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
    first = r.join(spec("d0"), now=0.0)
    r.join(spec("p0", role="prefill"), now=0.0)
    assert [w.spec.worker_id for w in r.active("decode")] == ["d0"]
    assert r.report("d0", 1, Load(free_pages=10, total_pages=100), now=1.0)
    assert not r.report("d0", 2, Load(), now=1.0)  # wrong epoch ignored
    assert r.expire(now=2.5, timeout_s=2.0) == ["p0"]
    assert r.active("prefill") == []
    restarted = r.join(spec("d0", epoch=5), now=3.0)  # new epoch replaces the old entry
    assert r.workers["d0"].spec.epoch == 5 and r.workers["d0"].load.free_pages == 100
    assert not r.leave(first)  # the old epoch's stream closing does not remove the new one
    again = r.join(spec("d0", epoch=5), now=3.0)  # the same process over a new stream
    assert not r.leave(restarted)  # ... whose older stream ends after the new one began
    assert r.workers["d0"] is again
    with pytest.raises(RegistryError):
        r.join(spec("d0", epoch=4), now=3.0)
    with pytest.raises(RegistryError, match="serves"):
        r.join(spec("d1", ns="other-model"), now=3.0)
    r.report("d0", 5, Load(free_pages=10, total_pages=100, draining=True), now=4.0)
    assert r.active("decode") == []  # draining: out of rotation


def test_an_ep_group_is_in_rotation_only_while_all_its_ranks_are():
    from dataclasses import replace

    r = WorkerRegistry()

    def rank(i: int, epoch: int = 7) -> WorkerSpec:
        return replace(spec(f"d{i}"), ep_group="decode", ep_rank=i, ep_size=2, ep_epoch=epoch)

    r.join(spec("solo"), now=0.0)
    r.join(rank(0), now=0.0)
    assert [w.spec.worker_id for w in r.active("decode")] == ["solo"]  # rank 1 not there yet
    d1 = r.join(rank(1), now=0.0)
    assert [w.spec.worker_id for w in r.active("decode")] == ["d0", "d1", "solo"]
    assert r.group_of("d1") == ["d0", "d1"] and r.group_of("solo") == ["solo"]
    assert r.leave(d1)  # one rank gone: the whole group is out
    assert [w.spec.worker_id for w in r.active("decode")] == ["solo"]
    r.join(rank(1, epoch=8), now=1.0)  # a rank of another start of the group: still not whole
    assert [w.spec.worker_id for w in r.active("decode")] == ["solo"]
    r.join(rank(0, epoch=8), now=1.0)
    assert [w.spec.worker_id for w in r.active("decode")] == ["d0", "d1", "solo"]
    assert sorted(r.expire(now=5.0, timeout_s=2.0)) == ["d0", "d1", "solo"]
    assert r.active("decode") == []


def test_ranks_of_an_ep_group_are_never_pipeline_stages():
    from dataclasses import replace

    for ep in (False, True):
        r = WorkerRegistry(pipeline_min_tokens=1000, pipeline_max_stages=2)
        r.join(spec("d0"), now=0.0)
        for i in range(2):
            s = spec(f"p{i}", role="prefill")
            if ep:
                s = replace(s, ep_group="prefill", ep_rank=i, ep_size=2, ep_epoch=1)
            r.join(s, now=0.0)
        _, _, stages = r.pick(cached_blocks=0, n_prompt=50_000, pages=1)
        assert len(stages) == (0 if ep else 1)
    # A shorter prompt sent where it comes soonest: p1 has 1 s due before it, p0 none. The
    # pipeline's head would be p1 (the stage that waits longest); a group's rank goes alone
    # to the balancer's pick, p0, where nothing waits.
    due = tuple([0.0] * len(DUE_HORIZONS_S))
    for wid, queued in (("p0", 0.0), ("p1", 1.0)):
        r.report(wid, 1, Load(free_pages=100, total_pages=100, prefill_rate=1000.0,
                              prefill_slack=3.0, due_s=tuple(v + queued for v in due)),
                 now=0.0)
    r.pipeline_min_tokens, r.pipeline_idle_tokens = 100_000, 512
    for _ in range(5):
        head, _, stages = r.pick(cached_blocks=0, n_prompt=4000, pages=1)
        assert (head.spec.worker_id, stages) == ("p0", [])


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
    r.leave(r.workers["d0"])
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


def test_plan_prefill_pipelines_only_long_prompts_over_the_least_loaded():
    import numpy as np

    from pdserve.scheduler.balancers import plan_prefill_index

    att = np.array([4e6, 0.0, 1e6, 0.0])
    tok = np.array([2000.0, 0.0, 1000.0, 0.0])
    # Short prompt (below the threshold): one worker, the single-worker balancer's pick.
    assert plan_prefill_index(att, tok, 0, 1000, min_pipeline_tokens=4096) == [1]
    # Off: the same.
    assert plan_prefill_index(att, tok, 0, 8000) == [1]
    # Long prompt, work 8000 * 4000 = 3.2e7 (mean after it 9.25e6; tokens mean 2,750): the
    # slowest stage's normalised load is 3.46 alone, 1.73 over two, 1.33 over three (worker 2
    # at 1e6 + 3.2e7/3, 1,000 + 8,000/3 tokens) and 1.45 over four (worker 0's tokens).
    assert plan_prefill_index(att, tok, 0, 8000, min_pipeline_tokens=4096) == [1, 3, 2]
    # At most two stages: the two idle workers.
    assert plan_prefill_index(att, tok, 0, 8000, min_pipeline_tokens=4096,
                              max_stages=2) == [1, 3]
    # A worker far behind the others is no stage; a long prompt small next to every queue
    # still spreads over those that are level.
    heavy = np.array([1e12, 1e6, 1e6, 1e6])
    assert plan_prefill_index(heavy, np.array([1e6, 10, 10, 10]), 0, 5000,
                              min_pipeline_tokens=4096) == [1, 2, 3]
    # Workers excluded from this request are never stages.
    ok = np.array([True, False, True, True])
    # (without worker 1: 1.84 over two, 1.70 over three)
    assert plan_prefill_index(att, tok, 0, 8000, ok, min_pipeline_tokens=4096) == [3, 2, 0]
    assert plan_prefill_index(att, tok, 0, 8000, np.zeros(4, dtype=bool), 4096) == []


def test_a_shorter_prompt_goes_over_the_idle_workers_only():
    import numpy as np

    from pdserve.scheduler.balancers import plan_prefill_index

    att = np.array([4e6, 0.0, 1e6, 0.0, 0.0])
    tok = np.array([2000.0, 0.0, 1000.0, 0.0, 0.0])
    kw = dict(min_pipeline_tokens=16_384, idle_pipeline_tokens=4096)
    # 5,000 new tokens (below 16,384, at least 4,096): the head is the balancer's pick, the
    # other stages are the workers with nothing queued, in row order; a busy one never is.
    plan = plan_prefill_index(att, tok, 0, 5000, **kw)
    assert plan[0] in (1, 3, 4) and sorted(plan) == [1, 3, 4]
    assert len(plan_prefill_index(att, tok, 0, 5000, max_stages=2, **kw)) == 2
    # Below the idle threshold, or with it off, or with pipelining off: one worker.
    assert len(plan_prefill_index(att, tok, 0, 4000, **kw)) == 1
    assert len(plan_prefill_index(att, tok, 0, 5000, min_pipeline_tokens=16_384)) == 1
    assert len(plan_prefill_index(att, tok, 0, 5000, idle_pipeline_tokens=4096)) == 1
    # One idle worker: no pipeline; none: the balancer's pick alone.
    one = np.array([4e6, 0.0, 1e6, 2e6, 3e6])
    assert len(plan_prefill_index(one, one / 1000, 0, 5000, **kw)) == 1
    assert plan_prefill_index(one + 1, one / 1000 + 1, 0, 5000, **kw) == [1]
    # Excluded idle workers are no stages.
    ok = np.array([True, True, True, False, True])
    assert sorted(plan_prefill_index(att, tok, 0, 5000, ok, **kw)) == [1, 4]


def test_a_shorter_prompt_goes_where_its_first_token_comes_soonest():
    import numpy as np

    from pdserve.scheduler.balancers import pipeline_seconds, plan_prefill_index

    kw = dict(min_pipeline_tokens=16_384, idle_pipeline_tokens=512)
    att, tok = np.zeros(4), np.zeros(4)
    own = np.full(4, 4.0)  # 4 s on any worker alone
    # 8,000 tokens over G stages: chunks of 500 (G=4), 667 (3), 1,000 (2); (k + G - 1) / k.
    assert pipeline_seconds(np.array([4.0]), 8000, np.array([4]))[0] == 1.0 * 19 / 16
    assert pipeline_seconds(np.array([4.0]), 8000, np.array([1]))[0] == 4.0
    # Waits (seconds due before it) 0, 0.2, 3, 0.5: with all four the longest wait is 3 s;
    # over the first three (in order of wait) 0.5 + 4/3 * 14/12 = 2.06 s; over two,
    # 0.2 + 2 * 9/8 = 2.45 s; alone 4 s. Stages in order of wait, the head (last stage) the
    # one that waits longest.
    ahead = np.array([0.0, 0.2, 3.0, 0.5])
    assert plan_prefill_index(att, tok, 0, 8000, ahead=ahead, own_s=own, **kw) == [3, 0, 1]
    assert plan_prefill_index(att, tok, 0, 8000, ahead=ahead, own_s=own, max_stages=2,
                              **kw) == [1, 0]
    # The slowest stage sets every stage's time: worker 1 at 40 s alone makes each pipeline
    # through it (the first two in order of wait) slower than 4 s on worker 0 alone.
    slow = np.array([4.0, 40.0, 4.0, 4.0])
    assert plan_prefill_index(att, tok, 0, 8000, ahead=ahead, own_s=slow, **kw) == [0]
    # Waits too long everywhere else: one worker (the balancer's pick).
    far = np.array([0.0, 9.0, 9.0, 9.0])
    assert plan_prefill_index(att, tok, 0, 8000, ahead=far, own_s=own, **kw) == [0]
    # Below the threshold, or no rate measured on a worker: not by this rule.
    assert len(plan_prefill_index(att, tok, 0, 500, ahead=ahead, own_s=own, **kw)) == 1
    unknown = np.array([4.0, 0.0, 4.0, 4.0])
    assert plan_prefill_index(att + 1, tok + 1, 0, 8000, ahead=ahead, own_s=unknown,
                              **kw) == [plan_prefill_index(att + 1, tok + 1, 0, 8000)[0]]
    # Excluded workers are no stages.
    ok = np.array([True, True, True, False])
    assert plan_prefill_index(att, tok, 0, 8000, ok, ahead=ahead, own_s=own, **kw) == [1, 0]


def test_registry_pick_returns_the_pipeline_stages_and_the_head():
    r = WorkerRegistry(pipeline_min_tokens=1000)
    for i in range(3):
        r.join(spec(f"p{i}", role="prefill"), now=0.0)
    r.join(spec("d0"), now=0.0)

    def pick(n, **kw):
        head, dec, upstream = r.pick(0, n, 10, **kw)
        assert dec.spec.worker_id == "d0"
        return head.spec.worker_id, [w.spec.worker_id for w in upstream]

    head, upstream = pick(500)  # short: one worker (any of the idle ones: a random tie)
    assert head in ("p0", "p1", "p2") and upstream == []
    assert pick(4000) == ("p0", ["p1", "p2"])  # long, all idle: all three
    assert pick(4000, excluded={"p0"}) == ("p1", ["p2"])
    r.report("p0", 1, Load(free_pages=100, total_pages=100, queued_attention=1e9,
                           queued_tokens=5000), now=0.0)
    assert pick(4000) == ("p1", ["p2"])  # p0 far behind: no stage
    # Idle pipelining: a prompt below pipeline_min_tokens goes over the idle workers only.
    r.pipeline_min_tokens, r.pipeline_idle_tokens = 10_000, 600
    head, upstream = pick(700)
    assert sorted([head, *upstream]) == ["p1", "p2"]
    head, upstream = pick(500)
    assert upstream == []
    # Once the workers report their rates and queues, a prompt goes where its first token
    # comes soonest: p0 has 5 s due before it; 700 tokens take 0.7 s alone, over p1 and p2
    # 0.35 s x 4/3 (3 chunks of 256). The head, last in order of wait, runs the last layers.
    due = tuple([0.0] * len(DUE_HORIZONS_S))
    for wid, queued in (("p0", 5.0), ("p1", 0.0), ("p2", 0.0)):
        r.report(wid, 1, Load(free_pages=100, total_pages=100, prefill_rate=1000.0,
                              prefill_slack=3.0, due_s=tuple(v + queued for v in due)),
                 now=0.0)
    r.pipeline_idle_tokens = 512
    assert pick(700) == ("p2", ["p1"])
    assert pick(700, excluded={"p1"})[1] == []  # p2 alone beats waiting 5 s for p0
