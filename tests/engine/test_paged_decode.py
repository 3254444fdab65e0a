"""Decode attention reading the pool's pages in place (engine/paged_decode.py, a Triton kernel;
--decode-attention paged), here under Triton's interpreter (tests/conftest.py), against the
gather-and-SDPA path: the same outputs within float32 rounding over shuffled pages, partial
and single-token pages, GQA, float16 pools, the padded static step CUDA graphs replay, and the
real model's decode logits and greedy tokens; the setting refused where it cannot run."""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.engine.attention import AttnBatch, paged_attention
from pdserve.engine.backend import Backend, BackendError, with_decode_attention
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.runner import ModelRunner

# The interpreter runs these with CPU tensors; tests/conftest.py chooses it where there is no
# GPU. With one, test_gpu.py runs the kernel compiled, inside CUDA graphs.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="a GPU is here: tests/engine/test_gpu.py runs the kernel")

H, KVH, HD, BLOCK, LAYERS = 9, 3, 64, 16, 3

CONTEXTS = [1, 5, 16, 17, 37, 64, 100]  # one token, partial pages, exact pages, several pages


def _step(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    pages = sum(-(-c // BLOCK) for c in CONTEXTS)
    kv = torch.randn(pages + 3, LAYERS, BLOCK, 2 * KVH * HD, generator=g).to(dtype)
    free = torch.randperm(kv.shape[0], generator=g).tolist()
    tables = []
    for c in CONTEXTS:
        n = -(-c // BLOCK)
        tables.append(free[:n])
        free = free[n:]
    batch = AttnBatch.build([1] * len(CONTEXTS), CONTEXTS, tables, BLOCK)
    q, k, v = (torch.randn(len(CONTEXTS), h, HD, generator=g) for h in (H, KVH, KVH))
    return kv, batch, q, k, v


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layer", [0, 2])
def test_the_kernel_reads_what_the_gather_path_reads(dtype, layer):
    kv, batch, q, k, v = _step(layer, dtype)
    assert len(batch.decode_groups) >= 2  # groups of different page counts, padded tables
    pools = [kv.clone(), kv.clone()]
    want, got = (paged_attention(q, k, v, pool, layer, batch, HD ** -0.5, paged=paged)
                 for pool, paged in zip(pools, (False, True)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(pools[0], pools[1])


@pytest.fixture(scope="module")
def loaded():
    """The default model on plain torch layers (the CPU backends' C kernels would take its
    decode steps), its attention switched to the kernel by `_paged`."""
    from pdserve.engine.loader import load_model

    return load_model(backend="onednn")


def _paged(model: torch.nn.Module, on: bool) -> None:
    for m in model.modules():
        if hasattr(m, "paged"):
            m.paged = on


@interpreted
def test_decode_steps_give_the_logits_and_tokens_of_the_gather_path(loaded):
    """Prefill five prompts, then two decode steps as the padded static step CUDA graphs
    replay (batch bucket 8, padding rows on the scratch page, padded page tables): logits
    within 1e-4, the same tokens."""
    g = torch.Generator().manual_seed(8)
    lengths = [5, 64, 65, 130, 200]
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in lengths]
    runs = []
    for paged in (False, True):
        _paged(loaded.model, paged)
        try:
            pool = KVPool(loaded.layout, 32)
            runner = ModelRunner(loaded.model, pool, cuda_graphs="eager")
            tables = [pool.reserve(4) for _ in lengths]
            logits = [runner.forward_chunks([(p, 0, t) for p, t in zip(prompts, tables)])]
            for step in range(2):
                toks = logits[-1].argmax(-1).tolist()
                logits.append(runner.decode(toks, [n + 1 + step for n in lengths], tables))
            runs.append(logits)
        finally:
            _paged(loaded.model, False)
    for want, got in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_the_setting_is_refused_where_it_cannot_run():
    with pytest.raises(BackendError, match="--decode-attention paged: a Triton kernel, needs "
                                           "--device cuda, not cpu"):
        with_decode_attention(Backend("torch"), "paged", "cpu", "llama")
    with pytest.raises(BackendError, match="--decode-attention paged: Llama"):
        with_decode_attention(Backend("torch"), "paged", "cuda", "deepseek")
    with pytest.raises(BackendError, match="--decode-attention: 'fast'"):
        with_decode_attention(Backend("torch"), "fast", "cpu", "llama")
    assert not with_decode_attention(Backend("torch"), "auto", "cpu", "llama").paged_decode
    from pdserve.engine.paged_decode import supported

    assert supported(64, 64) is None
    assert supported(96, 64) == "head dim 96 is not a power of two >= 16"
    assert supported(64, 8) == "--block-tokens 8 is not a power of two >= 16"
