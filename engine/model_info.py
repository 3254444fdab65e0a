"""What a deployment is sized with: a model's parameter counts (total, activated per token, the
multi-token-prediction module), its weight bytes as the checkpoint stores them, its KV bytes per
token, and what one rank of an expert-parallel group holds (`pdserve model-info DIR`).

The counts come from pdserve's own model built on the meta device from config.json (no weights
read, no memory used), so they are the parameters pdserve would load. Expert parallelism as
DeepSeek deploys it: every rank holds the whole attention, the dense and shared MLPs, the
embeddings and the LM head (data-parallel attention), and `ceil((routed + redundant) / EP)`
routed experts of each MoE layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pdserve.engine.model_config import DeepseekV3Config, LlamaConfig

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    layers: int
    params_total: int           # the served model (embeddings and LM head included)
    params_activated: int       # what one token passes through
    params_mtp: int             # the multi-token-prediction module(s) in the checkpoint, not served
    routed_experts: int
    experts_per_token: int
    moe_layers: int
    params_per_expert: int
    weights_format: str         # "fp8 e4m3, 128x128 block scales" or the checkpoint's dtype
    weight_bytes: int           # the served model's weights as stored (FP8 + scales, bf16 rest)
    expert_bytes: int           # one routed expert's weights as stored
    kv_dtype: str
    kv_bytes_per_token: int

    def rank(self, ep_size: int, redundant_experts: int = 0) -> RankMemory:
        """What one rank of an EP group of `ep_size` ranks holds."""
        if ep_size < 1:
            raise ValueError(f"ep_size must be >= 1 (got {ep_size})")
        if redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0 (got {redundant_experts})")
        replicated = self.weight_bytes - self.routed_experts * self.moe_layers * self.expert_bytes
        slots = math.ceil((self.routed_experts + redundant_experts) / ep_size) \
            if self.routed_experts else 0
        experts = slots * self.moe_layers * self.expert_bytes
        return RankMemory(ep_size, redundant_experts, slots, replicated, experts,
                          replicated + experts)


@dataclass(frozen=True)
class RankMemory:
    ep_size: int
    redundant_experts: int
    experts_per_rank: int    # expert slots of each MoE layer on one rank
    replicated_bytes: int    # attention, dense and shared MLPs, embeddings, head, norms, routers
    expert_bytes: int        # its routed experts, all MoE layers
    weight_bytes: int


def _linear_bytes(out: int, inp: int, block: tuple[int, int] | None, dtype_bytes: int) -> int:
    if block is None:
        return out * inp * dtype_bytes
    return out * inp + math.ceil(out / block[0]) * math.ceil(inp / block[1]) * 4


def model_info(cfg: LlamaConfig | DeepseekV3Config, raw: dict[str, Any],
               kv_dtype: str = "bfloat16") -> ModelInfo:
    """`raw`: the config.json dict (its torch_dtype: how the unquantized weights are stored)."""
    from pdserve.engine.deepseek import DeepseekV3ForCausalLM
    from pdserve.engine.llama import LlamaForCausalLM

    if kv_dtype not in _DTYPE_BYTES:
        raise ValueError(f"kv dtype {kv_dtype!r}: one of {', '.join(_DTYPE_BYTES)}")
    stored = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16")
    dtype_bytes = _DTYPE_BYTES.get(stored, 2)
    block = cfg.fp8_block if isinstance(cfg, DeepseekV3Config) else None
    model: torch.nn.Module
    # Every routed expert of a layer has the same shape: the model is built with one of them
    # per MoE layer (held=[0], as a rank of an EP group is built with its own), and the other
    # experts are counted as copies of it (V3 in full would be 44,544 expert modules).
    with torch.device("meta"):
        if isinstance(cfg, DeepseekV3Config):
            model = DeepseekV3ForCausalLM(cfg, {i: [0] for i in range(cfg.num_hidden_layers)})
        else:
            model = LlamaForCausalLM(cfg)
    linears = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
               and not n.endswith(".mlp.gate")}
    first_expert = (f"model.layers.{cfg.first_k_dense_replace}.mlp.experts.0."
                    if isinstance(cfg, DeepseekV3Config) else "")
    total = weight_bytes = per_expert = expert_bytes = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if name in linears:
            b = _linear_bytes(p.shape[0], p.shape[1], block, dtype_bytes)
        elif name.endswith("e_score_correction_bias"):
            b = 4 * n
        else:
            b = dtype_bytes * n
        weight_bytes += b
        if first_expert and name.startswith(first_expert):
            per_expert += n
            expert_bytes += b
    routed = cfg.n_routed_experts if isinstance(cfg, DeepseekV3Config) else 0
    moe_layers = len(cfg.moe_layers) if isinstance(cfg, DeepseekV3Config) else 0
    total += moe_layers * (routed - 1) * per_expert  # the experts not built
    weight_bytes += moe_layers * (routed - 1) * expert_bytes
    k = cfg.num_experts_per_tok if isinstance(cfg, DeepseekV3Config) else 0
    activated = total - moe_layers * (routed - k) * per_expert
    mtp = 0
    if isinstance(cfg, DeepseekV3Config) and cfg.num_nextn_predict_layers:
        # Each MTP module: a MoE decoder layer, enorm + hnorm, eh_proj [h, 2h], and (as V3's
        # checkpoint stores them) its own embedding, head norm and LM head.
        layer = (sum(p.numel() for p in model.model.layers[-1].parameters())
                 + (routed - 1) * per_expert)
        h = cfg.hidden_size
        own = 3 * h + 2 * h * h + 2 * cfg.vocab_size * h
        mtp = cfg.num_nextn_predict_layers * (layer + own)
    kv = cfg.kv_layout(kv_dtype, 64)
    fmt = (f"fp8 e4m3, {block[0]}x{block[1]} block scales ({stored} elsewhere)" if block
           else stored)
    return ModelInfo(
        model_type="deepseek_v3" if isinstance(cfg, DeepseekV3Config) else "llama",
        layers=cfg.num_hidden_layers, params_total=total, params_activated=activated,
        params_mtp=mtp, routed_experts=routed, experts_per_token=k, moe_layers=moe_layers,
        params_per_expert=per_expert, weights_format=fmt, weight_bytes=weight_bytes,
        expert_bytes=expert_bytes, kv_dtype=kv_dtype,
        kv_bytes_per_token=kv.num_layers * kv.kv_dim * _DTYPE_BYTES[kv_dtype])


def as_dict(info: ModelInfo, ranks: list[RankMemory]) -> dict[str, Any]:
    return {**asdict(info), "ranks": [asdict(r) for r in ranks]}


def render(info: ModelInfo, ranks: list[RankMemory]) -> str:
    gib = 1 << 30
    lines = [
        f"model            {info.model_type}, {info.layers} layers",
        f"parameters       {info.params_total / 1e9:,.2f} B total, "
        f"{info.params_activated / 1e9:,.2f} B activated per token"
        + (f" (+ {info.params_mtp / 1e9:,.2f} B MTP, not served)" if info.params_mtp else ""),
    ]
    if info.routed_experts:
        lines.append(f"experts          {info.routed_experts} routed, {info.experts_per_token} "
                     f"per token, {info.moe_layers} MoE layers, "
                     f"{info.params_per_expert / 1e6:,.1f} M parameters each")
    lines += [
        f"weights          {info.weights_format}: {info.weight_bytes / gib:,.1f} GiB",
        f"KV cache         {info.kv_bytes_per_token:,} bytes per token ({info.kv_dtype})",
    ]
    if ranks:
        lines.append("per rank         EP  redundant  experts/rank  replicated GiB  experts GiB"
                     "  weights GiB")
        for r in ranks:
            lines.append(f"                 {r.ep_size:>3}  {r.redundant_experts:>9}  "
                         f"{r.experts_per_rank:>12}  {r.replicated_bytes / gib:>14,.1f}  "
                         f"{r.expert_bytes / gib:>11,.1f}  {r.weight_bytes / gib:>11,.1f}")
    return "\n".join(lines)
