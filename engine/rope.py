"""Rotary position embeddings: the plain frequencies, and YaRN's (arXiv 2309.00071) as Hugging
Face configs give them (DeepSeek-V3/R1, and Llama/Qwen checkpoints with a long context).

YaRN keeps the high frequencies (which see many rotations within the original context), divides
the low ones by `factor` (interpolation), and ramps linearly between the two over the dimensions
whose rotation counts lie between `beta_slow` and `beta_fast` within
`original_max_position_embeddings`. It then scales attention two ways:

- `cos_sin_factor`: cos and sin are multiplied by it (so the rotary part of q·k by its square);
  by default mscale(factor, mscale) / mscale(factor, mscale_all_dim), or mscale(factor) when
  either is missing, where mscale(s, m) = 0.1·m·ln(s) + 1.
- `softmax_mscale` (MLA only, DeepSeek): the softmax scale of every dimension is multiplied by
  mscale(factor, mscale_all_dim)²; for V3 (factor 40, mscale_all_dim 1) 192^-0.5 · 1.8739 =
  0.13523.

Both follow transformers' `_compute_yarn_parameters` and `yarn_apply_mscale`, which equal
DeepSeek's own `precompute_freqs_cis`. A rope variant or a YaRN field pdserve does not implement
is refused with the field's name (ValueError), never approximated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# What a `rope_scaling` / `rope_parameters` dict may hold, per rope type.
_COMMON = {"rope_type", "type", "rope_theta"}
_YARN = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
         "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor"}


@dataclass(frozen=True)
class RopeScaling:
    """A rope's scaling: kind "default" (none) or "yarn" with YaRN's parameters."""

    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @property
    def cos_sin_factor(self) -> float:
        """What cos and sin are multiplied by."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor,
                                                                       self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        """What an MLA model's softmax scale is multiplied by (1 without YaRN)."""
        if self.kind != "yarn" or not self.mscale_all_dim:
            return 1.0
        m = yarn_mscale(self.factor, self.mscale_all_dim)
        return m * m


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, Eq. 21: 0.1·mscale·ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def scaling_from_hf(d: dict[str, Any]) -> RopeScaling:
    """The rope scaling of a Hugging Face config.json dict (`rope_scaling`, or transformers 5's
    `rope_parameters`); ValueError naming the field for what is not implemented."""
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    params: dict[str, Any] = d.get(key) or {}
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        extra = sorted(set(params) - _COMMON - {"partial_rotary_factor"})
        if extra:
            raise ValueError(f"config.json: {key}.{extra[0]} is not used by rope type 'default'")
        return RopeScaling()
    if kind != "yarn":
        raise ValueError(f"config.json: {key}.rope_type {kind!r} is not supported "
                         "(default, yarn)")
    unknown = sorted(set(params) - _COMMON - _YARN)
    if unknown:
        raise ValueError(f"config.json: {key}.{unknown[0]} is not part of the YaRN variant "
                         "pdserve implements")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"config.json: {key}.partial_rotary_factor must be 1 (got "
                         f"{params['partial_rotary_factor']})")
    original = params.get("original_max_position_embeddings")
    if not original or int(original) <= 0:
        raise ValueError(f"config.json: {key}.original_max_position_embeddings is required for "
                         "YaRN (a positive integer)")
    factor = params.get("factor")
    if factor is None:  # transformers' rule: the context extension the config states
        factor = d.get("max_position_embeddings", int(original)) / int(original)
    if float(factor) < 1.0:
        raise ValueError(f"config.json: {key}.factor must be >= 1 (got {factor})")

    def opt(name: str) -> float | None:
        v = params.get(name)
        return None if v is None else float(v)

    return RopeScaling(
        kind="yarn", factor=float(factor), original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"), truncate=bool(params.get("truncate", True)))


def cos_sin(angles: torch.Tensor, factor: float,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles [T, d], times the cos/sin factor, in `dtype`."""
    cos, sin = angles.cos(), angles.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


def inv_freq(dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> torch.Tensor:
    """The rotary inverse frequencies [dim / 2], float32."""
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling.kind != "yarn":
        return plain
    s = scaling

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate (divided)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (s.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
