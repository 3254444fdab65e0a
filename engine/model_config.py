"""Model hyper-parameters, named as in Hugging Face's configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.layout import KVLayout
from pdserve.engine.rope import RopeScaling, scaling_from_hf


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    rope_scaling: RopeScaling = RopeScaling()

    def kv_layout(self, dtype: str, block_tokens: int) -> KVLayout:
        # GQA: K and V of every KV head side by side (DESIGN §3).
        kv_dim = 2 * self.num_key_value_heads * self.head_dim
        return KVLayout(self.num_hidden_layers, kv_dim, dtype, block_tokens)


@dataclass(frozen=True)
class DeepseekV3Config:
    """DeepSeek-V2/V3: multi-head latent attention (MLA) and a mixture of experts."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    scoring_func: str = "sigmoid"  # V3; V2 uses softmax
    topk_method: str = "noaux_tc"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    rope_scaling: RopeScaling = RopeScaling()
    num_nextn_predict_layers: int = 0  # multi-token prediction layers after the last (skipped)
    fp8_block: tuple[int, int] | None = None  # FP8 weights with block scales of this shape

    @property
    def moe_layers(self) -> list[int]:
        """The layers whose MLP is a mixture of experts (after the first dense ones)."""
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def kv_layout(self, dtype: str, block_tokens: int) -> KVLayout:
        # MLA caches one compressed latent plus the shared RoPE key per token (DESIGN §3).
        return KVLayout(self.num_hidden_layers, self.kv_lora_rank + self.qk_rope_head_dim,
                        dtype, block_tokens)


def _rope_theta(d: dict[str, Any]) -> float:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


FP8_FIELDS = {"quant_method", "fmt", "activation_scheme", "weight_block_size"}


def fp8_block_of(d: dict[str, Any]) -> tuple[int, int] | None:
    """The weight block shape of a config's `quantization_config` (DeepSeek's FP8 format), None
    without one; ValueError naming the field for any other quantization."""
    q = d.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ValueError(f"config.json: quantization_config.quant_method {method!r} is not "
                         "supported (only 'fp8', DeepSeek's block-scaled format)")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"config.json: quantization_config.fmt {q['fmt']!r} is not supported "
                         "(only 'e4m3')")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError("config.json: quantization_config.activation_scheme "
                         f"{q['activation_scheme']!r} is not supported (only 'dynamic')")
    block = q.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError("config.json: quantization_config.weight_block_size must be two "
                         f"positive integers (got {block!r})")
    unknown = sorted(set(q) - FP8_FIELDS)
    if unknown:
        raise ValueError(f"config.json: quantization_config.{unknown[0]} is not supported")
    return block[0], block[1]


def _first_id(v: Any) -> int | None:  # eos may be a list in generation configs
    first = v[0] if isinstance(v, list) and v else v
    return None if first is None else int(first)


def config_from_hf(d: dict[str, Any]) -> LlamaConfig | DeepseekV3Config:
    """Our config from a Hugging Face `config.json` dict."""
    mt = d.get("model_type")
    theta = _rope_theta(d)
    common = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                  rope_scaling=scaling_from_hf(d), intermediate_size=d["intermediate_size"],
                  num_hidden_layers=d["num_hidden_layers"],
                  num_attention_heads=d["num_attention_heads"],
                  rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                  max_position_embeddings=d.get("max_position_embeddings", 4096),
                  tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                  bos_token_id=_first_id(d.get("bos_token_id")),
                  eos_token_id=_first_id(d.get("eos_token_id")))
    if mt in ("llama", "mistral", "qwen2"):
        if d.get("quantization_config"):
            raise ValueError("config.json: quantization_config: quantized weights are read for "
                             "DeepSeek-V2/V3 models only")
        heads = d["num_attention_heads"]
        return LlamaConfig(
            **common, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            qkv_bias=mt == "qwen2" or bool(d.get("attention_bias", False)),
            o_bias=mt != "qwen2" and bool(d.get("attention_bias", False)))
    if mt in ("deepseek_v3", "deepseek_v2"):
        return DeepseekV3Config(
            **common, moe_intermediate_size=d["moe_intermediate_size"],
            n_routed_experts=d["n_routed_experts"], n_shared_experts=d.get("n_shared_experts") or 0,
            num_experts_per_tok=d["num_experts_per_tok"], kv_lora_rank=d["kv_lora_rank"],
            qk_rope_head_dim=d["qk_rope_head_dim"], qk_nope_head_dim=d["qk_nope_head_dim"],
            v_head_dim=d["v_head_dim"], q_lora_rank=d.get("q_lora_rank"),
            n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(d.get("norm_topk_prob", mt == "deepseek_v3")),
            first_k_dense_replace=d.get("first_k_dense_replace", 0),
            scoring_func=d.get("scoring_func", "sigmoid" if mt == "deepseek_v3" else "softmax"),
            topk_method=d.get("topk_method", "noaux_tc" if mt == "deepseek_v3" else "greedy"),
            rope_interleave=bool(d.get("rope_interleave", True)),
            attention_bias=bool(d.get("attention_bias", False)),
            num_nextn_predict_layers=int(d.get("num_nextn_predict_layers") or 0),
            fp8_block=fp8_block_of(d))
    raise ValueError(f"config.json: model_type {mt!r} is not supported "
                     "(llama, mistral, qwen2, deepseek_v2, deepseek_v3)")
