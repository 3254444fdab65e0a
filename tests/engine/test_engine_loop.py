"""The engine loop (engine/engine.py, scheduler.py, hooks.py) on a tiny random Llama model: the
scheduler's plans, and every hook a worker plugs in (the step agreement, fetched KV that fails
verification, a step that raises, prefill-only prompts, pipeline stages)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch

from pdserve.engine.backend import Backend
from pdserve.engine.engine import LLMEngine
from pdserve.engine.hooks import EngineHooks
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.llama import LlamaForCausalLM
from pdserve.engine.model_config import LlamaConfig
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import FinishReason, SamplingParams
from pdserve.engine.scheduler import (
    BatchKind,
    Deferral,
    PrefillRate,
    ScheduledBatch,
    Scheduler,
    plan_chunks,
)
from pdserve.engine.sequence import (
    FailedEvent,
    FinishEvent,
    HiddenEvent,
    Sequence,
    StageWork,
    TokenEvent,
)
from pdserve.scheduler.balancers import DUE_HORIZONS_S, prefill_work

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=512, tie_word_embeddings=False)
BT = 4  # tokens per page


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(3)
    m = LlamaForCausalLM(CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    m.reset_buffers("cpu")
    m.eval()
    m.prepare(Backend("torch"))
    return m


def engine(model: LlamaForCausalLM, hooks: EngineHooks | None = None, pages: int = 64,
           max_batch: int = 8, budget: int = 64) -> LLMEngine:
    pool = KVPool(CFG.kv_layout("float32", BT), pages)
    return LLMEngine(ModelRunner(model, pool, budget), max_batch=max_batch,
                     max_prefill_tokens=budget, hooks=hooks)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, CFG.vocab_size, (n,), generator=g).tolist()


def run(eng: LLMEngine) -> list:
    events = []
    while eng.has_work:
        events += eng.step()
    return events


# -- the scheduler, pure ---------------------------------------------------------------------
def seq(rid: str, n: int, done: int = 0, **kw: object) -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams(max_tokens=4), num_computed=done, **kw)


def test_chunks_fill_the_budget_first_come_first_served():
    a, b, c = seq("a", 10), seq("b", 30, done=5), seq("c", 8)
    plan = plan_chunks([a, b, c], 32)
    assert [(ch.seq.request_id, ch.start, ch.num_tokens) for ch in plan] == [
        ("a", 0, 10), ("b", 5, 22)]


def test_a_prompt_still_fetching_runs_only_when_nothing_else_is_ready():
    fetching = {"a"}
    s = Scheduler(max_batch=4, max_prefill_tokens=100, ready=lambda q: q.request_id not in fetching)
    s.add(seq("a", 10))
    s.add(seq("b", 10))
    batch = s.schedule()
    assert batch is not None and [c.seq.request_id for c in batch.chunks] == ["b"]
    s.waiting.remove(batch.chunks[0].seq)
    batch = s.schedule()  # only the fetching one is left: it runs (its layers wait)
    assert batch is not None and [c.seq.request_id for c in batch.chunks] == ["a"]


def test_the_queue_is_reported_as_seconds_due_within_each_horizon():
    """What a prefill worker tells the gateway (balancers.due_profile): its queued prefill by
    when it is due in its order, at its measured rate; a stage counts its layers' share."""
    now = [10.0]
    s = Scheduler(prefill_slack=3.0, clock=lambda: now[0], num_layers=4)
    assert s.due() == [0.0] * len(DUE_HORIZONS_S)
    s.add(seq("unmeasured", 50))  # before any step: no estimate, no seconds
    assert s.due()[-1] == 0.0
    s.waiting.clear()
    s.rate.observe(100.0, 1.0)  # 100 tokens' worth a second
    short, long_ = seq("short", 10), seq("long", 1000)
    s.add(short)  # 0.1 s of work, due in 0.3 s
    s.add(long_)  # about 10 s, due in about 30 s
    # A stage of half of the layers: about 5 s here, due in about 15 s (its own share).
    s.add(seq("stage", 1000, stage=StageWork(2, 4, chunk_tokens=8)))
    own = prefill_work(0, 1000) / 100
    due = s.due()
    at = dict(zip(DUE_HORIZONS_S, due))
    assert at[0.0] == 0.0
    assert at[0.5] == pytest.approx(prefill_work(0, 10) / 100)
    assert at[8.0] == at[0.5] and at[16.0] == pytest.approx(at[0.5] + own / 2)
    assert at[32.0] == pytest.approx(at[0.5] + own / 2 + own)
    assert due == sorted(due)  # cumulative
    now[0] = 10.25  # a started prompt is due when it started
    short.started_at = 10.0
    assert s.due()[0] == pytest.approx(prefill_work(0, 10) / 100)


def test_prompts_and_stage_chunks_go_earliest_deadline_first_and_a_full_batch_decodes():
    now = [100.0]
    s = Scheduler(max_batch=2, max_prefill_tokens=100, prefill_slack=3.0, clock=lambda: now[0])
    s.rate.observe(100.0, 1.0)  # this worker prefills 100 tokens' worth a second
    # A pipelined 1,000-token prompt, on a scheduler not told the model's layers (so a stage
    # counts as the whole prompt): 100 + 3 x (1,000 + its attention) / 100 s.
    later = seq("later", 1000, stage=StageWork(2, 4, chunk_tokens=8))
    first = seq("first", 1000, stage=StageWork(0, 2, chunk_tokens=8))
    s.add(later)
    s.add(first)
    assert first.deadline == pytest.approx(100 + 3 * prefill_work(0, 1000) / 100)
    now[0] = 105.0
    waiting = seq("w", 10)  # deadline 105.3: before the stage's
    s.add(waiting)
    batch = s.schedule()
    assert batch is not None and batch.kind is BatchKind.PREFILL
    assert [c.seq.request_id for c in batch.chunks] == ["w"]
    assert waiting.started_at == 105.0 and waiting.order == 105.0  # started: it keeps its place
    assert waiting.deadline == pytest.approx(105 + 3 * prefill_work(0, 10) / 100)
    s.remove_prefilled(waiting)
    assert s.num_late == 0  # done at 105 s, due at 105.3 s
    # One that reached the worker before (it waited for KV pages there) is due as from then.
    came = seq("came", 10)
    came.arrival = 104.0
    s.add(came)
    assert came.deadline == pytest.approx(104 + s.allowance(prefill_work(0, 10)))
    assert s.allowance(prefill_work(0, 10)) == pytest.approx(3 * prefill_work(0, 10) / 100)
    s.waiting.remove(came)
    now[0] = 106.0
    big = seq("big", 5000)  # a longer prompt after it: its deadline is later
    s.add(big)
    batch = s.schedule()  # `later` has no input yet; `first` cuts its own chunks
    assert batch is not None and batch.kind is BatchKind.STAGE
    assert (batch.chunks[0].seq.request_id, batch.chunks[0].num_tokens) == ("first", 8)
    s.waiting.remove(big)
    fifo = Scheduler(max_prefill_tokens=100, prefill_slack=0.0, clock=lambda: now[0])
    fifo.rate.observe(100.0, 1.0)
    fifo.add(first)  # slack 0: arrival order, whatever the lengths
    now[0] = 107.0
    fifo.add(seq("short", 10))
    batch = fifo.schedule()
    assert batch is not None and batch.kind is BatchKind.STAGE
    fetching = seq("f", 10)
    s2 = Scheduler(max_prefill_tokens=100, ready=lambda q: q is not fetching,
                   clock=lambda: now[0])
    s2.add(fetching)
    s2.add(first)
    batch = s2.schedule()  # a stage chunk before a prompt whose KV is still arriving
    assert batch is not None and batch.kind is BatchKind.STAGE
    s2.stages.clear()
    batch = s2.schedule()
    assert batch is not None and [c.seq.request_id for c in batch.chunks] == ["f"]
    s.stages.clear()
    s.add_running(seq("r1", 4, done=4))
    s.add_running(seq("r2", 4, done=4))
    s.add(waiting)
    batch = s.schedule()  # the batch is full: decode, the waiting prompt waits
    assert batch is not None and batch.kind is BatchKind.DECODE and len(batch.chunks) == 2
    s.running.clear()
    s.waiting.clear()
    now[0] = 131.0
    s.add(waiting)  # due at 131.3 s
    now[0] = 132.0
    s.remove_prefilled(waiting)  # done after it
    assert s.num_late == 1
    fifo.add(waiting)  # arrival order: no deadline to be late for
    now[0] = 140.0
    fifo.remove_prefilled(waiting)
    assert fifo.num_late == 0
    with pytest.raises(ValueError, match="prefill_slack"):
        Scheduler(prefill_slack=-1.0)


def test_an_overloaded_worker_defers_its_longest_prompt_until_its_wait_is_over():
    now = [0.0]
    d = Deferral(share=0.5, lateness_s=2.0, max_wait_s=60.0, burst=1.0)
    s = Scheduler(max_batch=8, max_prefill_tokens=100, clock=lambda: now[0], deferral=d)
    s.rate.observe(100.0, 1.0)  # 100 tokens' worth a second: 1,000 tokens take 10.12 s
    small, mid, big = seq("small", 10), seq("mid", 600), seq("big", 1000)
    for q in (small, mid, big):
        s.add(q)  # 1.5 deferrals banked, at most 1 (burst)
    assert big.deadline == pytest.approx(3 * prefill_work(0, 1000) / 100)  # about 30 s
    # The worker got to none of them for 20 s: `small` (due at 0.3 s) would end 19.8 s late.
    # Its longest prompt not begun is deferred until 60 s after its arrival; the bucket has
    # room for one.
    now[0] = 20.0
    batch = s.schedule()
    assert batch is not None and [c.seq.request_id for c in batch.chunks] == ["small", "mid"]
    assert big.deferred_until == 60.0 and mid.deferred_until is None and s.num_deferred == 1
    # The gateway hears it is due then, not at its deadline.
    at = dict(zip(DUE_HORIZONS_S, s.due()))
    assert at[32.0] == pytest.approx(s.seconds_left(small) + s.seconds_left(mid))
    assert at[64.0] == pytest.approx(at[32.0] + s.seconds_left(big))
    for q in (small, mid):
        s.remove_prefilled(q)
    # Until then it goes after later prompts, even those due after its deadline...
    now[0] = 59.0
    early = seq("early", 100)
    s.add(early)
    assert early.deadline > big.deadline
    batch = s.schedule()
    assert batch is not None and [c.seq.request_id for c in batch.chunks] == ["early"]
    s.remove_prefilled(early)
    # ...and from then on before all of them.
    now[0] = 61.0
    later = seq("later", 10)
    s.add(later)
    batch = s.schedule()
    assert batch is not None and [c.seq.request_id for c in batch.chunks] == ["big"]
    assert s.num_deferred == 1
    # While it still waits (its wait over), the overload has outlasted a deferral's wait: no
    # more deferrals, though `later` is late, the bucket refilled (0.5 a prompt) and `long2`
    # could be deferred; once it is done, the next one is.
    long2 = seq("long2", 1000)
    s.add(long2)
    now[0] = 80.0
    s.schedule()
    assert s.num_deferred == 1 and long2.deferred_until is None
    s.remove_prefilled(big)
    s.schedule()
    assert s.num_deferred == 2 and long2.deferred_until == 61.0 + 60.0
    # Not deferred: a prompt shorter than the lateness (it would wait long for little), one
    # begun (it keeps its place), a stage whose chunks began; nor anything in arrival order.
    now[0] = 0.0
    s2 = Scheduler(max_batch=8, max_prefill_tokens=100, clock=lambda: now[0],
                   deferral=Deferral(share=1.0, lateness_s=2.0, burst=5.0), num_layers=4)
    s2.rate.observe(100.0, 1.0)
    begun, stage = seq("begun", 1000), seq("stage", 1000, stage=StageWork(0, 2, chunk_tokens=8))
    s2.add(stage)
    batch = s2.schedule()  # on time: the stage's first chunk
    assert batch is not None and batch.kind is BatchKind.STAGE and stage.stage is not None
    assert stage.stage.begun
    s2.stages.clear()
    s2.add(begun)
    now[0] = 1.0
    batch = s2.schedule()  # the long prompt's first chunk
    assert batch is not None and batch.seqs == [begun] and begun.started_at == 1.0
    s2.stages.append(stage)
    for q in [seq(f"s{k}", 100) for k in range(3)]:  # 1 s each
        s2.add(q)
    now[0] = 40.0  # every one late: shorts due at 3 s, the others at about 30 s
    s2.schedule()
    assert s2.num_deferred == 0
    assert s2.seconds_left(stage) == pytest.approx(s2.seconds_left(seq("x", 1000)) / 2)
    fifo = Scheduler(prefill_slack=0.0, clock=lambda: now[0], deferral=Deferral(share=1.0))
    fifo.rate.observe(100.0, 1.0)
    for q in (seq("a", 10), seq("b", 5000)):
        fifo.add(q)
    now[0] = 100.0
    fifo.schedule()
    assert fifo.num_deferred == 0
    for bad in ({"share": 1.5}, {"lateness_s": -1.0}, {"max_wait_s": 0.0}, {"burst": 0.5}):
        with pytest.raises(ValueError, match="deferral"):
            Deferral(**bad)


def test_a_started_prompt_is_not_passed_by_a_shorter_one():
    now = [0.0]
    s = Scheduler(max_batch=4, max_prefill_tokens=100, clock=lambda: now[0])
    s.rate.observe(100.0, 1.0)
    long = seq("long", 1000)  # deadline 0 + 3 x 10 s
    s.add(long)
    batch = s.schedule()
    assert batch is not None and [c.seq.request_id for c in batch.chunks] == ["long"]
    long.num_computed = 100
    now[0] = 1.0
    s.add(seq("short", 10))  # deadline 1.3 s: before the long one's 30 s, but it started
    batch = s.schedule()
    assert batch is not None and [(c.seq.request_id, c.num_tokens) for c in batch.chunks] == [
        ("long", 100)]
    s2 = Scheduler(max_batch=4, max_prefill_tokens=100, clock=lambda: now[0])
    s2.rate.observe(100.0, 1.0)
    s2.add(seq("long", 1000))
    now[0] = 1.0
    s2.add(seq("short", 10))  # neither started: the earlier deadline first, then the long one
    batch = s2.schedule()
    assert batch is not None and [(c.seq.request_id, c.num_tokens) for c in batch.chunks] == [
        ("short", 10), ("long", 90)]


def test_a_parked_prompt_is_called_a_step_before_its_turn_and_runs_once_unparked():
    now = [0.0]
    called: list[str] = []
    s = Scheduler(max_batch=8, max_prefill_tokens=100, clock=lambda: now[0])

    def parked(rid: str, n: int) -> Sequence:
        return seq(rid, n, parked=True, on_call=lambda: called.append(rid))

    s.add(parked("alone", 40))  # nothing ahead: called at once, but holds no pages yet
    assert called == ["alone"] and not s.has_work() and s.schedule() is None
    assert s.remove("alone") is not None
    called.clear()
    a = seq("a", 250)
    s.add(a)
    now[0] = 1.0
    s.add(parked("b", 50))
    s.add(parked("c", 50))
    assert called == []  # 250 tokens ahead of them: more than a step's 100
    batch = s.schedule()
    assert batch is not None and [ch.seq.request_id for ch in batch.chunks] == ["a"]
    a.num_computed = 200  # 50 left: b's turn is within a step, c's (100 ahead) is not
    batch = s.schedule()
    assert called == ["b"]
    assert batch is not None and [ch.seq.request_id for ch in batch.chunks] == ["a"]
    assert s.unpark("b", 10) and not s.unpark("c-gone", 0)
    batch = s.schedule()
    assert batch is not None and [(ch.seq.request_id, ch.start, ch.num_tokens)
                                  for ch in batch.chunks] == [("a", 200, 50), ("b", 10, 40)]
    s.remove_prefilled(a)  # b is left with 40 of its tokens: c's turn is near
    assert called == ["b", "c"]
    assert len(s) == 2 and s.queued_tokens == 90  # parked prompts count in the queue


def test_a_deferred_parked_prompt_is_not_called_while_others_are_due():
    now = [0.0]
    called: list[str] = []
    d = Deferral(share=1.0, lateness_s=1.0, max_wait_s=50.0, burst=5.0)
    s = Scheduler(max_batch=8, max_prefill_tokens=100, clock=lambda: now[0], deferral=d)
    s.rate.observe(100.0, 1.0)  # 100 tokens a second
    s.add(seq("first", 400))  # due at 12 s; takes 4 s
    s.add(seq("long", 600, parked=True, on_call=lambda: called.append("long")))
    for i in range(3):
        s.add(seq(f"s{i}", 90))
    now[0] = 11.0  # "first" would end 3 s late: the longest one not begun is deferred
    s.schedule()
    long = next(q for q in s.waiting if q.request_id == "long")
    assert long.deferred_until == 50.0 and called == []
    for q in list(s.waiting):
        if q.request_id != "long":
            s.remove_prefilled(q)
    assert called == ["long"]  # nothing else left: its turn


def test_the_prefill_rate_weighs_steps_by_their_work_and_follows_the_recent_ones():
    r = PrefillRate(decay=0.9)
    assert r.seconds_for(100.0) == 0.0  # nothing measured: deadlines are arrival times
    r.observe(100.0, 1.0)
    r.observe(0.0, 5.0)  # a step that computed nothing says nothing about the rate
    assert r.seconds_for(50.0) == pytest.approx(0.5)
    r.observe(300.0, 1.0)  # (0.9 x 100 + 300) tokens' worth over (0.9 x 1 + 1) s
    assert r.seconds_for(390.0) == pytest.approx(1.9)
    assert r.per_second == pytest.approx(390.0 / 1.9)


def test_the_engine_measures_its_prefill_rate(model):
    eng = engine(model)
    eng.generate([prompt(40, 1), prompt(30, 2)], SamplingParams(max_tokens=2))
    # Its two prefill steps (a budget of 64: 40 + 24 tokens, then the last 6 after 24), the
    # first decayed once; decode steps' tokens are not a prompt's.
    first = prefill_work(0, 40) + prefill_work(0, 24)
    assert eng.scheduler.rate.work == pytest.approx(0.9 * first + prefill_work(24, 6))
    assert eng.scheduler.rate.seconds_for(1000.0) > 0


# -- the loop and its hooks -------------------------------------------------------------------
class Hooks(EngineHooks):
    def __init__(self) -> None:
        self.plans: list[BatchKind] = []
        self.veto = False
        self.turns: list[BatchKind] = []
        self.verified: dict[str, int] = {}
        self.layers: list[int] = []

    def agree(self, batch: ScheduledBatch | None) -> ScheduledBatch | None:
        if batch is not None:
            self.plans.append(batch.kind)
        return None if self.veto else batch

    def turn(self, kind: BatchKind) -> contextlib.AbstractContextManager[None]:
        self.turns.append(kind)
        return contextlib.nullcontext()

    def before_layer(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        return self.layers.append if self.verified else None

    def settle(self, s: Sequence) -> int | None:
        return self.verified.pop(s.request_id, None)


def test_the_step_agreement_sees_every_plan_and_can_hold_a_step(model):
    hooks = Hooks()
    eng = engine(model, hooks)
    eng.add_request("a", prompt(9, 1), SamplingParams(max_tokens=3))
    hooks.veto = True
    assert eng.step() == [] and eng.num_steps == 0 and hooks.plans == [BatchKind.PREFILL]
    hooks.veto = False
    events = run(eng)
    assert [type(e) for e in events] == [TokenEvent] * 3
    assert hooks.plans == [BatchKind.PREFILL, BatchKind.PREFILL, BatchKind.DECODE,
                           BatchKind.DECODE]
    assert hooks.turns == hooks.plans[1:]  # a turn around every step that ran
    eng.pool.check_integrity()
    assert eng.pool.num_free == eng.pool.num_pages


def test_kv_that_fails_verification_is_recomputed_and_the_token_is_unchanged(model):
    """A prompt whose first 8 tokens' KV 'arrived' in its pages: the step runs on it, then the
    hook says only 4 were verified. The output is discarded and the prompt recomputed from
    token 4: the same first token as computing it whole, which a corrupted prefix would not
    give."""
    p = prompt(13, 2)
    ref = engine(model)
    want = ref.generate([p], SamplingParams(max_tokens=1))[0]
    hooks = Hooks()
    eng = engine(model, hooks)
    s = Sequence("a", p, SamplingParams(max_tokens=1), eng.pool.reserve(4), num_computed=8,
                 stop_after_prefill=True)
    # The whole prompt's KV computed by the reference, the second page then damaged.
    eng.pool.kv.copy_(ref.pool.kv[:64])
    s.pages = [0, 1, 2, 3]
    eng.pool.kv[1] += 1.0
    hooks.verified["a"] = 4
    eng.add(s)
    first = eng.step()
    assert first == [] and s.num_computed == 4  # discarded, back to the last good token
    assert hooks.layers == list(range(CFG.num_hidden_layers))  # it waited at every layer
    (ev,) = run(eng)
    assert isinstance(ev, TokenEvent) and [ev.token] == want
    assert s.pages == [0, 1, 2, 3]  # a prefill-only prompt's pages stay with the caller


def test_a_step_that_raises_fails_its_sequences_and_the_engine_goes_on(model, monkeypatch):
    eng = engine(model)
    eng.add_request("a", prompt(5, 3), SamplingParams(max_tokens=2))
    real = eng.runner.forward_chunks

    def broken(*a: object, **kw: object) -> torch.Tensor:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(eng.runner, "forward_chunks", broken)
    (ev,) = eng.step()
    assert isinstance(ev, FailedEvent) and "out of memory" in ev.error
    assert not eng.has_work and eng.pool.num_free == eng.pool.num_pages
    monkeypatch.setattr(eng.runner, "forward_chunks", real)
    eng.add_request("b", prompt(5, 3), SamplingParams(max_tokens=2))
    assert [type(e) for e in run(eng)] == [TokenEvent, TokenEvent]


def test_abort_and_a_sequence_that_joins_finished(model):
    eng = engine(model)
    eng.add_request("a", prompt(5, 4), SamplingParams(max_tokens=5))
    eng.step()
    assert eng.abort("a") and not eng.abort("a")
    assert eng.pool.num_free == eng.pool.num_pages
    s = Sequence("b", prompt(5, 4), SamplingParams(max_tokens=1), eng.pool.reserve(2),
                 output=[7])
    assert eng.add_prefilled(s) == FinishEvent("b", FinishReason.LENGTH)
    assert eng.pool.num_free == eng.pool.num_pages


def test_two_stages_in_one_engine_give_the_first_token_of_the_whole_prompt(model):
    """Layers [0, 2) then [2, 4) of a prompt, chunk by chunk, the second stage fed the first's
    hidden states: the first token and the KV of every layer equal one whole prefill."""
    p = prompt(22, 5)
    ref = engine(model)
    want = ref.generate([p], SamplingParams(max_tokens=1))[0]
    eng = engine(model)
    pages = eng.pool.reserve(6)
    head = StageWork(2, 4, chunk_tokens=0)
    low = Sequence("low", p, SamplingParams(), pages, stage=StageWork(0, 2, chunk_tokens=8))
    high = Sequence("high", p, SamplingParams(max_tokens=1), pages, stage=head)
    eng.add(low)
    eng.add(high)
    tokens = []
    while eng.has_work:
        for ev in eng.step():
            if isinstance(ev, HiddenEvent):
                head.inputs.append((ev.begin, ev.hidden))
            else:
                tokens.append(ev)
    assert [(e.request_id, e.token) for e in tokens] == [("high", want[0])]
    assert torch.equal(eng.pool.kv[:6], ref.pool.kv[:6]) or torch.allclose(
        eng.pool.kv[:6], ref.pool.kv[:6], atol=1e-6)
