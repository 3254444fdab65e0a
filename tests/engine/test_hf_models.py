"""Our implementations against transformers on the same random weights, saved with
`save_pretrained` (sharded safetensors) and loaded through our loader."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import load_model
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from tests.engine.random_models import make_deepseek, make_llama, make_qwen2
from tests.helpers import assert_logits_follow

MAKERS = {"llama": make_llama, "qwen2": make_qwen2, "deepseek_v3": make_deepseek}


@pytest.fixture(scope="module", params=list(MAKERS))
def pair(request, tmp_path_factory):
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp(request.param)
    _, ref = MAKERS[request.param](path)
    ref.eval()
    ref.save_pretrained(path, max_shard_size="300KB")  # several shards
    assert len(list(path.glob("*.safetensors"))) > 1
    ours = load_model(path, block_tokens=16)
    return request.param, ref, ours


def test_kv_bytes_per_token_follow_the_layout(pair):
    name, ref, ours = pair
    c = ref.config
    if name == "deepseek_v3":
        kv_dim = c.kv_lora_rank + c.qk_rope_head_dim  # latent + RoPE key only
    else:
        kv_dim = 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    assert ours.layout.kv_dim == kv_dim
    assert ours.layout.bytes_per_token == c.num_hidden_layers * kv_dim * 4


def test_logits_match_for_prefill_and_every_decode_step(pair):
    _, ref, ours = pair
    pool = KVPool(ours.layout, 16)
    runner = ModelRunner(ours.model, pool, prefill_chunk_tokens=19)  # odd chunks on purpose
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 320, (41,), generator=g).tolist()
    pages = pool.reserve(pool.layout.pages_for(len(seq) + 8))
    assert_logits_follow(ref, runner, seq, pages, 8)


def test_greedy_tokens_identical_for_32_steps(pair):
    _, ref, ours = pair
    prompt = torch.randint(0, 320, (23,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    expect = out[0, len(prompt):].tolist()
    eng = LLMEngine(ModelRunner(ours.model, KVPool(ours.layout, 16)))
    assert eng.generate([prompt], SamplingParams(max_tokens=32))[0] == expect


def test_expert_counts_are_recorded(pair):
    name, _, ours = pair
    m = ours.model
    if name != "deepseek_v3":
        assert not hasattr(m, "expert_counts")  # dense model: nothing to count
        return
    m.expert_counts.zero_()
    pool = KVPool(ours.layout, 8)
    ModelRunner(m, pool).prefill(list(range(30)), pool.reserve(2))
    counts = m.expert_counts
    assert counts[0].sum() == 0  # first_k_dense_replace = 1: layer 0 is dense
    assert counts[1].sum() == counts[2].sum() == 30 * 2  # 30 tokens x top-2
