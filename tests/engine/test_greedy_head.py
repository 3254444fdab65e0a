"""The greedy head (engine/greedy_head.py, engine/csrc/greedy_head.c): for every row, the argmax
of what it returns is the full product's, and every entry it computes is the full product's
logit bit for bit; exact ties, zero rows, outliers and non-finite input included; and greedy
generation through the engine gives the same tokens with it and without it."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine import cpu_kernels, greedy_head
from pdserve.engine.cpu_kernels import QuantWeight
from pdserve.engine.engine import LLMEngine
from pdserve.engine.greedy_head import GreedyHead
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams

KERNEL = cpu_kernels.kernel()
pytestmark = pytest.mark.skipif(
    KERNEL is None or not KERNEL.greedy_head_usable,
    reason="the greedy head needs the CPU kernels and AVX-512 VNNI")


def q8_head(w: np.ndarray) -> QuantWeight:
    return QuantWeight.from_gguf("Q8_0", gguf.quants.quantize(w.astype(np.float32), QT.Q8_0),
                                 w.shape)


def check(head: GreedyHead, x: torch.Tensor) -> torch.Tensor:
    """Asserts the greedy head's contract on x; returns how many tokens each row kept."""
    full = cpu_kernels.qlinear(x, head.weight)
    got = head(x)
    assert got is not None
    y, kept = got
    assert torch.equal(y.argmax(-1), full.argmax(-1))
    computed = torch.isfinite(y)
    assert torch.equal(y[computed].view(torch.int32), full[computed].view(torch.int32))
    assert torch.equal(computed.sum(-1).to(torch.int32), kept)
    assert not torch.isnan(y).any()
    return kept


def test_the_real_head_on_real_hidden_states(loaded):
    """Hidden states of real decode steps (random-token prompts, whose next tokens are
    uncertain): the argmax is the full product's and the head computes few tokens exactly."""
    model = loaded.model
    assert model.greedy_head is not None, "the default model's head is Q8_0: it has one"
    head = GreedyHead.from_blocks(model.greedy_head.weight)
    seen: list[torch.Tensor] = []
    product = model.head_product
    original = product._decode

    def capture(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return original(x)

    product._decode = capture
    saved, model.greedy_head = model.greedy_head, None
    try:
        pool = KVPool(loaded.layout, 8 * loaded.layout.pages_for(48) + 4)
        eng = LLMEngine(ModelRunner(model, pool), max_batch=8)
        g = torch.Generator().manual_seed(3)
        prompts = torch.randint(100, 40000, (8, 40), generator=g).tolist()
        eng.generate(prompts, SamplingParams(max_tokens=5))
    finally:
        product._decode = original
        model.greedy_head = saved
    decode_steps = [x for x in seen if x.shape[0] == 8]
    assert len(decode_steps) >= 4
    vocab = head.weight.shape[0]
    for x in decode_steps:
        kept = check(head, x)
        assert int(kept.max()) < vocab // 50  # a screen that screens


def test_exact_ties_go_to_the_first_token_as_torch_argmax():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((100, 64)) * 0.05
    w[37] = w[81] = w[5] * 3  # rows 37 and 81 tie and lead wherever row 5 is positive
    head = GreedyHead.from_blocks(q8_head(w))
    x = torch.from_numpy(np.sign(w[5]) * 2.0).float().view(1, 64).repeat(9, 1)
    check(head, x)
    y, _ = head(x)
    assert (y.argmax(-1) == 37).all()


def test_a_zero_row_keeps_every_token_and_picks_the_first():
    head = GreedyHead.from_blocks(q8_head(np.random.default_rng(1).standard_normal((50, 32))))
    x = torch.zeros(5, 32)
    kept = check(head, x)
    assert (kept == 50).all()
    assert (head(x)[0].argmax(-1) == 0).all()


def test_outliers_and_odd_shapes():
    """A row count that is not a multiple of the 16-row tile, rows of x that are not a
    multiple of 8, one huge activation among small ones, blocks of zeros."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((1001, 96)) * 0.05
    head = GreedyHead.from_blocks(q8_head(w))
    x = torch.from_numpy(rng.standard_normal((13, 96))).float()
    x[0, 7] = 300.0
    x[1, 32:64] = 0.0
    x[2] *= 1e-30
    check(head, x)


def test_non_finite_input_asks_for_the_full_product():
    head = GreedyHead.from_blocks(q8_head(np.random.default_rng(3).standard_normal((40, 32))))
    for bad in (float("nan"), float("inf")):
        x = torch.ones(4, 32)
        x[2, 3] = bad
        assert head(x) is None


def test_a_head_that_cannot_be_packed_falls_back_to_the_full_product(monkeypatch, caplog):
    calls = []

    def no_memory(weight: QuantWeight) -> GreedyHead:
        calls.append(weight)
        raise MemoryError("no room for the packed head")

    monkeypatch.setattr(GreedyHead, "from_blocks", staticmethod(no_memory))
    lazy = greedy_head.LazyGreedyHead(q8_head(np.ones((40, 32))))
    with caplog.at_level("WARNING", logger="pdserve.engine.greedy_head"):
        assert lazy.logits(torch.ones(4, 32)) is None
        assert lazy.logits(torch.ones(4, 32)) is None
    assert len(calls) == 1, "tried once, not at every step"
    assert sum("greedy head not packed" in r.getMessage() for r in caplog.records) == 1


def test_bad_arguments_are_refused():
    head = GreedyHead.from_blocks(q8_head(np.random.default_rng(4).standard_normal((40, 64))))
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        head(torch.ones(4, 32))
    with pytest.raises(ValueError, match="float32"):
        head(torch.ones(4, 64, dtype=torch.float64))
    q41 = QuantWeight.from_gguf("Q4_1", gguf.quants.quantize(
        np.ones((16, 32), np.float32), QT.Q4_1), (16, 32))
    assert not greedy_head.usable(q41)
    with pytest.raises(ValueError, match="Q8_0"):
        GreedyHead.from_blocks(q41)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), blocks=st.integers(1, 4), m=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 50.0]),
       dup=st.booleans(), crowd=st.booleans())
def test_the_argmax_is_always_the_full_product_s(n, blocks, m, seed, scale, dup, crowd):
    rng = np.random.default_rng(seed)
    k = 32 * blocks
    w = rng.standard_normal((n, k)) * rng.choice([0.01, 0.1, 1.0], size=(n, 1))
    x = rng.standard_normal((m, k)) * scale
    if crowd:  # half the rows give x[0] the same top logit but for their quantization error:
        # near-ties that the screen's estimates cannot order
        lead = rng.standard_normal(k) * 0.1
        v = x[0] / max(np.linalg.norm(x[0]), 1e-30)
        half = w[: max(1, n // 2)]
        half[:] = lead + 0.1 * (half - np.outer(half @ v, v))
        half += np.outer(2.0 - half @ v, v)
    if dup and n > 2:  # exact ties between rows
        w[n // 2] = w[n - 1]
    head = GreedyHead.from_blocks(q8_head(w))
    check(head, torch.from_numpy(x).float())


def _generate(model, loaded, params: list[SamplingParams]
              ) -> tuple[list[tuple[list[int], list[float]]], list[int]]:
    """Prefills and decodes one request per entry of `params` in one batch: each request's
    tokens and log-probabilities, and the rows of every call to the greedy head."""
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(100, 40000, (len(params), 24), generator=g).tolist()
    calls: list[int] = []
    head = model.greedy_head
    if head is not None:
        real = head.logits
        head.logits = lambda x: (calls.append(x.shape[0]), real(x))[1]
    try:
        pool = KVPool(loaded.layout, len(params) * loaded.layout.pages_for(32) + 4)
        eng = LLMEngine(ModelRunner(model, pool), max_batch=len(params))
        seqs = [eng.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        while eng.has_work:
            eng.step()
    finally:
        if head is not None:
            del head.logits
    return [(s.output, s.logprobs) for s in seqs], calls


@pytest.mark.parametrize("greedy, others, split", [(8, 2, True), (4, 2, False), (1, 0, True)])
def test_greedy_generation_is_the_same_with_and_without_it(loaded, greedy, others, split):
    """Through the engine: a batch of greedy requests, with one asking for log-probabilities
    and one sampling when `others` (those rows take the full product), decoded with the greedy
    head and without it: the same tokens and log-probabilities. The greedy rows go through the
    greedy head when they are every row (a lone one included) or at least MIN_SPLIT_ROWS of
    them; fewer among other rows stay in the full product, which costs less than a pass of
    their own."""
    model = loaded.model
    assert model.greedy_head is not None
    assert (greedy >= greedy_head.MIN_SPLIT_ROWS or others == 0) == split
    params = [SamplingParams(max_tokens=6)] * greedy + [
        SamplingParams(max_tokens=6, logprobs=True),
        SamplingParams(max_tokens=6, temperature=0.8, seed=11)][:others]
    with_head, calls = _generate(model, loaded, params)
    # 5 decode steps after the prefill's first token; the prefill step never uses it
    assert calls == ([greedy] * 5 if split else []), calls
    saved, model.greedy_head = model.greedy_head, None
    try:
        without, _ = _generate(model, loaded, params)
    finally:
        model.greedy_head = saved
    assert with_head == without
