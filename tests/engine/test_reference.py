"""The engine against Hugging Face transformers on the same GGUF weights."""

from __future__ import annotations

import torch

from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from tests.helpers import CHAT_PROMPTS, agree_until_near_tie, hf_greedy

N_TOKENS = 24


def chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}])


def make_engine(loaded, num_pages=64, chunk=2048, max_batch=64):
    pool = KVPool(loaded.layout, num_pages)
    return LLMEngine(ModelRunner(loaded.model, pool, chunk), max_batch=max_batch), pool


def test_prefill_and_decode_logits_match_transformers(loaded, tokenizer, hf):
    model, _ = hf
    ids = chat_ids(tokenizer, CHAT_PROMPTS[0])
    eng, pool = make_engine(loaded)
    pages = pool.reserve(pool.layout.pages_for(len(ids) + 3))
    ours = eng.runner.prefill(ids, pages)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].float()
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)
    # Three decode steps, each against a full forward of the reference.
    seq = list(ids)
    for _ in range(3):
        nxt = int(torch.argmax(ours))
        seq.append(nxt)
        ours = eng.runner.decode([nxt], [len(seq)], [pages])[0]
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0, -1].float()
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)


def test_greedy_tokens_match_transformers(loaded, tokenizer, hf):
    eng, pool = make_engine(loaded)
    params = SamplingParams(max_tokens=N_TOKENS)  # no stop tokens: compare all 24
    prompts = [chat_ids(tokenizer, p) for p in CHAT_PROMPTS]
    outs = eng.generate(prompts, params)
    for ids, ours in zip(prompts, outs):
        ref, gaps = hf_greedy(hf, ids, N_TOKENS)
        n = agree_until_near_tie(ours, ref, gaps)
        assert ours[:n] == ref[:n]
        assert n >= 8, f"near-tie at step {n}: too early to mean anything"
    assert pool.num_free == pool.num_pages
    pool.check_integrity()


def test_chunked_prefill_and_cached_prefix_give_the_same_logits(loaded, tokenizer):
    ids = chat_ids(tokenizer, "Tell me about trains. " * 20)
    eng, pool = make_engine(loaded, chunk=2048)
    pages = pool.reserve(pool.layout.pages_for(len(ids)))
    whole = eng.runner.prefill(ids, pages)
    chunked_eng, pool2 = make_engine(loaded, chunk=50)
    pages2 = pool2.reserve(pool2.layout.pages_for(len(ids)))
    chunked = chunked_eng.runner.prefill(ids, pages2)
    torch.testing.assert_close(chunked, whole, atol=1e-3, rtol=1e-4)
    # Resume from the first two pages' KV (as if loaded from the store).
    resumed = chunked_eng.runner.prefill(ids, pages2, start=128)
    torch.testing.assert_close(resumed, whole, atol=1e-3, rtol=1e-4)


def test_batching_does_not_change_greedy_tokens(loaded, tokenizer):
    """16 concurrent greedy requests of different lengths, prefilled in shared chunked steps and
    decoded in one continuous batch, each get the tokens they get alone."""
    prompts = [chat_ids(tokenizer, f"Count from {i} to {i + 5}." + " Slowly." * (3 * i))
               for i in range(16)]
    assert len({len(p) for p in prompts}) == 16
    params = SamplingParams(max_tokens=10)
    alone = []
    eng, _ = make_engine(loaded, num_pages=8)
    for p in prompts:
        alone.append(eng.generate([p], params)[0])
    eng, pool = make_engine(loaded, num_pages=96)
    eng.max_prefill_tokens = 300  # several requests per prefill step, some split across steps
    together = eng.generate(prompts, params)
    assert together == alone
    assert pool.num_free == pool.num_pages
    pool.check_integrity()


def test_sampling_is_reproducible_per_seed(loaded, tokenizer):
    ids = chat_ids(tokenizer, "Name three animals.")
    eng, _ = make_engine(loaded)
    a = eng.generate([ids], SamplingParams(max_tokens=10, temperature=1.0, seed=7))[0]
    b = eng.generate([ids], SamplingParams(max_tokens=10, temperature=1.0, seed=7))[0]
    c = eng.generate([ids], SamplingParams(max_tokens=10, temperature=1.0, seed=8))[0]
    assert a == b
    assert a != c


def test_stop_token_ends_generation(loaded, tokenizer):
    ids = chat_ids(tokenizer, CHAT_PROMPTS[0])
    eng, pool = make_engine(loaded)
    out = eng.generate([ids], SamplingParams(max_tokens=40,
                                             stop_token_ids=tokenizer.stop_token_ids))[0]
    assert out[-1] in tokenizer.stop_token_ids
    assert tokenizer.decode(out) == "The capital of France is Paris."
    assert pool.num_free == pool.num_pages
