"""The padded static decode step that CUDA graphs replay (engine/graphs.py), run eagerly on CPU:
padding sequences and padding pages must not change any real sequence's logits."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import decode_groups
from pdserve.engine.engine import LLMEngine
from pdserve.engine.graphs import bucket
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams


def test_bucket_is_the_next_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 16, 17, 64, 65)] == [1, 2, 4, 4, 8, 16, 32, 64, 128]


def test_decode_groups_merge_similar_lengths_and_split_far_ones():
    # Pages per sequence 3,3,3,2: one group padded to 3 (12 rows for 11 needed).
    assert decode_groups([3, 3, 3, 2], [10, 11, 12, 13]) == [([10, 11, 12, 13], 3)]
    # A 40-page sequence with three 1-page ones: padding would cost 160 rows for 43.
    assert decode_groups([1, 40, 1, 1], [0, 1, 2, 3]) == [([1], 40), ([0, 2, 3], 1)]
    assert decode_groups([], []) == []


@pytest.fixture(scope="module")
def loaded():
    """The default model on the backend CUDA graphs replay on a GPU: plain torch layers (the
    C paths of the CPU backends never take a padded step)."""
    from pdserve.engine.loader import load_model

    return load_model(backend="onednn")


def test_the_padded_step_refuses_a_model_on_the_c_kernels():
    from pdserve.engine.loader import load_model

    m = load_model(backend="cpu-kernels")
    with pytest.raises(ValueError, match="cpu-kernels"):
        _ = ModelRunner(m.model, KVPool(m.layout, 4), cuda_graphs="eager").graphs


def _prompts(lengths):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(100, 40000, (n,), generator=g).tolist() for n in lengths]


def test_padded_step_gives_the_logits_of_the_plain_step(loaded):
    """Five sequences of different lengths (batch bucket 8, page bucket 4): every real row's
    logits equal the unpadded step's within float32 rounding, and the padding wrote only the
    scratch page."""
    lengths = [5, 64, 65, 130, 200]
    prompts = _prompts(lengths)
    pool = KVPool(loaded.layout, 32)
    plain = ModelRunner(loaded.model, pool, cuda_graphs=False)
    padded = ModelRunner(loaded.model, pool, cuda_graphs="eager")
    tables = [pool.reserve(4) for _ in lengths]
    first = plain.forward_chunks([(p, 0, t) for p, t in zip(prompts, tables)]).argmax(-1).tolist()
    before = pool.kv.clone()
    want = plain.decode(first, [n + 1 for n in lengths], tables)
    after_plain = pool.kv.clone()
    pool.kv.copy_(before)
    got = padded.decode(first, [n + 1 for n in lengths], tables)
    graphs = padded.graphs
    assert graphs is not None and list(graphs.steps) == [(8, 4)]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Same KV written for the real tokens; only the scratch page differs elsewhere.
    others = [p for p in range(pool.num_pages) if p != graphs.scratch]
    torch.testing.assert_close(pool.kv[others], after_plain[others], rtol=1e-5, atol=1e-5)
    assert graphs.scratch not in {p for t in tables for p in t}


def test_engine_with_padded_steps_generates_what_the_plain_engine_does(loaded):
    """Continuous batching over the padded step (requests join and leave, buckets change):
    the same greedy tokens as the plain engine, and the scratch page goes back with close()."""
    lengths = [3, 20, 70, 9, 140, 33]
    prompts = _prompts(lengths)
    params = SamplingParams(max_tokens=12)
    outs = {}
    for mode in (False, "eager"):
        pool = KVPool(loaded.layout, 64)
        runner = ModelRunner(loaded.model, pool, cuda_graphs=mode)
        eng = LLMEngine(runner, max_batch=4)  # 6 requests through 4 slots: joins and leaves
        outs[mode] = eng.generate(prompts, params)
        if mode:
            graphs = runner.graphs
            assert graphs is not None and len(graphs.steps) >= 2
            assert pool.num_used == 1
            graphs.close()
        assert pool.num_used == 0
        pool.check_integrity()
    assert outs["eager"] == outs[False]


@pytest.mark.parametrize("mode", [None, False])
def test_cpu_runner_does_not_use_graphs_by_default(loaded, mode):
    pool = KVPool(loaded.layout, 4)
    runner = ModelRunner(loaded.model, pool, cuda_graphs=mode)
    assert runner.graphs is None and pool.num_used == 0


def test_a_failed_capture_falls_back_to_eager_decode(loaded, monkeypatch, caplog):
    """A graph that cannot be captured is logged once; decode goes on eagerly, and the scratch
    page goes back to the pool."""
    from pdserve.engine import graphs as graphs_mod

    def refuse(self, b, p):
        raise graphs_mod.GraphCaptureError(f"batch {b}, pages {p}: refused by the test")

    monkeypatch.setattr(graphs_mod.GraphedDecode, "_make", refuse)
    pool = KVPool(loaded.layout, 8)
    runner = ModelRunner(loaded.model, pool, cuda_graphs="eager")
    plain = ModelRunner(loaded.model, pool, cuda_graphs=False)
    table = pool.reserve(2)
    first = int(plain.prefill(list(range(100, 140)), table).argmax())
    want = plain.decode([first], [41], [table])
    with caplog.at_level("WARNING"):
        got = runner.decode([first], [41], [table])
    torch.testing.assert_close(got, want)
    assert runner.graphs is None and pool.num_used == 2
    assert any("capture failed" in r.getMessage() for r in caplog.records)


def test_a_full_pool_decodes_eagerly_until_a_scratch_page_is_free(loaded):
    pool = KVPool(loaded.layout, 2)
    runner = ModelRunner(loaded.model, pool, cuda_graphs="eager")
    plain = ModelRunner(loaded.model, pool, cuda_graphs=False)
    table = pool.reserve(2)  # the whole pool
    first = int(plain.prefill(list(range(100, 140)), table).argmax())
    want = plain.decode([first], [41], [table])
    torch.testing.assert_close(runner.decode([first], [41], [table]), want)
    assert runner.graphs is None and pool.num_free == 0
    pool.release(table[1:])  # the context fits in the first page
    got = runner.decode([first], [41], [table[:1]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert runner.graphs is not None and runner.graphs.scratch == table[1]
