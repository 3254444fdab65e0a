"""A step's prefill chunks in one flex attention call (engine/flex.py, --prefill-attention flex)
against paged_attention's call per sequence: the same outputs within float32 rounding, over
shuffled pages, chunks that continue a cached prefix, decode rows mixed in, and more queries
than one 128-row tile (tiles that span several sequences); the real model's logits and greedy
tokens; the setting refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine import flex
from pdserve.engine.attention import AttnBatch, paged_attention
from pdserve.engine.backend import Backend, BackendError, with_prefill_attention
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import load_model
from pdserve.engine.runner import ModelRunner

H, KVH, HD, BLOCK, LAYERS = 9, 3, 64, 16, 2

# (new tokens, context): fresh prompts, continued chunks, decode rows
STEP = [(40, 40), (1, 37), (100, 230), (7, 19), (1, 5), (150, 150), (2, 3)]


def _step(seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    pages_needed = sum(-(-c // BLOCK) for _, c in STEP)
    kv = torch.randn(pages_needed + 5, LAYERS, BLOCK, 2 * KVH * HD, generator=g).to(dtype)
    free = torch.randperm(kv.shape[0], generator=g).tolist()
    tables = []
    for _, c in STEP:
        n = -(-c // BLOCK)
        tables.append(free[:n])
        free = free[n:]
    batch = AttnBatch.build([q for q, _ in STEP], [c for _, c in STEP], tables, BLOCK)
    t = sum(q for q, _ in STEP)
    q, k, v = (torch.randn(t, h, HD, generator=g) for h in (H, KVH, KVH))
    return kv, batch, q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_call_equals_a_call_per_sequence(seed, dtype):
    kv, batch, q, k, v = _step(seed, dtype)
    assert q.shape[0] > flex.TILE  # query tiles span sequences
    pools = [kv.clone(), kv.clone()]
    want, got = (paged_attention(q, k, v, pool, 1, batch, HD ** -0.5, varlen=varlen)
                 for pool, varlen in zip(pools, (False, True)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(pools[0], pools[1])  # the new tokens' K/V written the same way


def test_a_step_without_prefill_chunks_leaves_the_decode_rows_alone():
    kv, _, q, k, v = _step(2)
    batch = AttnBatch.build([1, 1], [9, 40], [[0], [1, 2, 3]], BLOCK)
    want = paged_attention(q[:2], k[:2], v[:2], kv.clone(), 0, batch, HD ** -0.5)
    got = paged_attention(q[:2], k[:2], v[:2], kv.clone(), 0, batch, HD ** -0.5, varlen=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tile_map_is_the_mask_at_tile_granularity():
    g = torch.Generator().manual_seed(3)
    n = 700
    start = torch.randint(0, n, (300,), generator=g)
    limit = torch.minimum(start + torch.randint(0, 200, (300,), generator=g), torch.tensor(n - 1))
    rows = torch.arange(n)
    dense = (rows[None] >= start[:, None]) & (rows[None] <= limit[:, None])  # [T, n]
    pad = -(-300 // flex.TILE) * flex.TILE - 300
    cols = -(-n // flex.TILE) * flex.TILE - n
    dense = torch.nn.functional.pad(dense, (0, cols, 0, pad))
    want = dense.view(-1, flex.TILE, dense.shape[1] // flex.TILE, flex.TILE).any(3).any(1)
    assert torch.equal(flex._tile_map(start, limit, n), want)


@pytest.fixture(scope="module")
def models():
    return load_model(), load_model(prefill_attention="flex")


def test_the_model_gives_the_same_logits_and_tokens_with_flex(models):
    plain, varlen = models
    assert varlen.backend.varlen_prefill and not plain.backend.varlen_prefill
    vocab = plain.config.vocab_size
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (90, 200, 33)]
    logits = []
    for loaded in (plain, varlen):
        pool = KVPool(loaded.layout, 16)
        runner = ModelRunner(loaded.model, pool, cuda_graphs=False)
        tables = [pool.reserve(-(-len(p) // loaded.layout.block_tokens)) for p in prompts]
        # the second prompt's first 128 tokens first, then the rest beside the other prompts
        runner.forward_chunks([(prompts[1][:128], 0, tables[1])])
        logits.append(runner.forward_chunks([(prompts[0], 0, tables[0]),
                                             (prompts[1][128:], 128, tables[1]),
                                             (prompts[2], 0, tables[2])]))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[1].argmax(-1), logits[0].argmax(-1))


def test_the_setting_is_refused_where_it_cannot_run():
    with pytest.raises(BackendError, match="--prefill-attention flex: Llama"):
        with_prefill_attention(Backend("torch"), "flex", "deepseek")
    with pytest.raises(BackendError, match="--prefill-attention: 'fast'"):
        with_prefill_attention(Backend("torch"), "fast", "llama")
    assert not with_prefill_attention(Backend("torch"), "auto", "llama").varlen_prefill
    # the setting survives a backend narrowed at load
    b = with_prefill_attention(Backend("cpu-fused"), "flex", "llama")
    assert b.narrowed("cpu-kernels", "test").varlen_prefill


def test_compiled_kernel_takes_the_same_block_mask(monkeypatch):
    """The path CUDA runs, compiled (here by inductor for the CPU): the block mask built for
    the eager reference is accepted as it is and gives the same outputs."""
    compiled = torch.compile(flex.flex_attention, dynamic=True)
    monkeypatch.setattr(flex, "_kernel", lambda device: compiled)
    kv, batch, q, k, v = _step(6)
    want = paged_attention(q, k, v, kv.clone(), 0, batch, HD ** -0.5)
    got = paged_attention(q, k, v, kv.clone(), 0, batch, HD ** -0.5, varlen=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
