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


def make_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                      rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.15)
    return cfg, LlamaForCausalLM(cfg)


def make_qwen2(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=320, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, initializer_range=0.15)
    m = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-zero q/k/v biases, so that they are exercised
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
    return cfg, m


def make_deepseek(path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=320, hidden_size=96, intermediate_size=160, moe_intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=16, n_group=4, topk_group=2,
        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=1024,
        initializer_range=0.15, tie_word_embeddings=False)
    m = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # a non-zero selection bias, so that it is exercised
        for layer in m.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return cfg, m


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
    logits = runner.prefill(seq, pages)
    for step in range(8):
        with torch.no_grad():
            expect = ref(torch.tensor([seq])).logits[0, -1].float()
        torch.testing.assert_close(logits, expect, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"step {step}: {m}")
        nxt = int(torch.argmax(expect))
        seq.append(nxt)
        logits = runner.decode([nxt], [len(seq)], [pages])[0]


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
