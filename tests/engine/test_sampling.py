from __future__ import annotations

import math

import torch

from pdserve.engine.sampling import SamplingParams, _filter, finish_reason, logprob_of, sample

LOGITS = torch.tensor([0.0, 3.0, 2.0, 1.0, -1.0])


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(), 0) == 1


def test_top_k_keeps_exactly_k():
    kept = torch.isfinite(_filter(LOGITS, 2, 1.0))
    assert kept.tolist() == [False, True, True, False, False]


def test_top_p_keeps_the_smallest_nucleus():
    p = torch.softmax(LOGITS, -1)  # sorted: 1 (0.64), 2 (0.24), 3 (0.09), ...
    assert p[1] < 0.7 < p[1] + p[2]
    kept = torch.isfinite(_filter(LOGITS, 0, 0.7))
    assert kept.tolist() == [False, True, True, False, False]
    assert torch.isfinite(_filter(LOGITS, 0, 0.01)).sum() == 1  # always at least one


def test_sampling_respects_filters_and_seeds():
    params = SamplingParams(temperature=5.0, top_k=2, seed=3)
    draws = {sample(LOGITS, params, i) for i in range(200)}
    assert draws == {1, 2}
    assert [sample(LOGITS, params, i) for i in range(20)] == [sample(LOGITS, params,
                                                                     i) for i in range(20)]


def test_logprob_is_the_raw_log_softmax():
    assert math.isclose(logprob_of(LOGITS, 1), float(torch.log_softmax(LOGITS, -1)[1]),
                        rel_tol=1e-6)


def test_finish_reasons():
    p = SamplingParams(max_tokens=3, stop_token_ids=frozenset({7}))
    assert finish_reason(7, 1, p) == "stop"
    assert finish_reason(5, 3, p) == "length"
    assert finish_reason(5, 2, p) is None


def test_argmax_rows_is_torch_s_argmax():
    """The engine's batched argmax (numpy on CPU) against torch.argmax: ties go to the first
    index, a NaN counts as the maximum, a row of -inf gives 0."""
    from pdserve.engine.engine import argmax_rows

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        x = torch.randn(7, 50, generator=g)
        x[torch.rand(7, 50, generator=g) < 0.3] = float("-inf")
        x[:, 10] = x[:, 3]
        if trial % 3 == 0:
            x[2, 5] = float("nan")
        if trial % 5 == 0:
            x[4] = float("-inf")
        assert argmax_rows(x) == x.argmax(-1).tolist()
