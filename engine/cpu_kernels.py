"""CPU kernels for the float32 decode step, in C (engine/csrc/cpu_kernels.c), loaded with ctypes.

1. `qlinear`: GGUF block-quantized weights used as such: products that read 4-bit (Q4_1) and
8-bit (Q8_0) blocks and rebuild each weight in float32 in cache (for one row of x, a batch-1
decode step, in registers and used at once, with AVX-512 where the CPU has it; the same
accumulation chains, so the same bits, as rebuilding into a buffer); `fp8_linear` the same for
DeepSeek's FP8 e4m3 weights with 128x128 block scales (engine/fp8.py).
2. `decode_attention`: attention of one new token per sequence over its pages of the KV pool,
read in place (the torch path copies every page of every layer first).
3. `LlamaDecode`: a whole Llama decoder layer of a decode step in one call (RMSNorm, q|k|v,
RoPE, K/V into the pool, attention, o, RMSNorm, gate|up, SiLU, down, residuals) when every
product of the layer has GGUF blocks: the twenty-odd torch calls per layer it replaces cost a
fifth of a batch-16 step on two cores.

Why 1: small-batch decode on a CPU is bound by reading the weights, and a float32 copy of a Q4_1
file is 6.4x the bytes of the file. The kernel rebuilds every weight with the roundings of
gguf-py's `dequantize` (the path transformers takes for GGUF files), so the weights are the
same float32 numbers as the reference's; only the summation order differs, as between any two
matmul kernels. Each output element is one fixed accumulation chain, independent of the batch
(batch invariance holds bit for bit). Why 2: at batch 16 the page copies and the small attention
calls took 40 of a step's 160 ms. All of it computes in float32 (exp by a vectorised
Cephes-style polynomial within 2 ulp); a sequence's result never depends on the other
sequences in the batch.

The C source is compiled on first use with the system C compiler (`CC`, default `cc`) into a
cache directory (`PDSERVE_KERNEL_DIR`, default `~/.cache/pdserve/kernels`), named by a digest of
the source and flags, and loaded with ctypes. Whether a model uses them is its execution backend's
choice, made once at load (engine/backend.py): without a compiler, or on a CPU without
AVX2/FMA/F16C, `--backend auto` runs the float32 weights and torch layers (one log line says
why); `--backend cpu-kernels` keeps 1 and 2 but runs the torch layers.
`python -m pdserve.engine.cpu_kernels` builds and loads them ahead of time and prints where.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pdserve.engine.kernel_lib import (
    DecodeStepStruct,
    LlamaLayerStruct,
    QWeightStruct,
    kernel,
    kernel_dir,
    library_path,
    main,
    why_not,
)

__all__ = ["BLOCK", "KINDS", "LAYER_PARTS", "DecodePlan", "LlamaDecode", "LlamaLayerWeights",
           "QuantWeight", "decode_attention", "dequantize", "fp8_dequantize", "fp8_linear",
           "fp8_usable", "kernel", "kernel_dir", "layer_timers", "library_path", "main",
           "qlinear", "why_not"]

# GGUF quantization type -> (kernel kind, bytes per block of 32 weights as the kernels take it:
# GGUF's block with its half-float scales widened to float32, which is exact)
KINDS: dict[str, tuple[int, int]] = {"Q4_1": (0, 24), "Q8_0": (1, 36)}
_GGUF_BLOCK = {"Q4_1": (20, 2), "Q8_0": (34, 1)}  # GGUF's bytes per block, half-float scales
BLOCK = 32

@dataclass(frozen=True)
class QuantWeight:
    """A weight [N, K] as blocks of 32 weights: `blocks` is uint8 [N, K / 32 * block bytes], each
    block GGUF's with its scales as float32 (`from_gguf` repacks)."""

    kind: str
    blocks: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unsupported quantization {self.kind!r}; have {sorted(KINDS)}")
        n, k = self.shape
        if k % BLOCK:
            raise ValueError(f"row length {k} is not a multiple of {BLOCK}")
        want = (n, k // BLOCK * KINDS[self.kind][1])
        if self.blocks.dtype != torch.uint8 or tuple(self.blocks.shape) != want:
            raise ValueError(f"{self.kind} blocks for {self.shape} must be uint8 {want}, "
                             f"got {self.blocks.dtype} {tuple(self.blocks.shape)}")

    @classmethod
    def from_gguf(cls, kind: str, data: np.ndarray, shape: tuple[int, int]) -> QuantWeight:
        """`data`: the tensor's bytes as GGUFReader gives them; `shape`: (rows, row length).
        Each block's half-float scales (Q4_1: d, m; Q8_0: d) become float32 ahead of its
        quants: a batch-1 product then loads them as they are instead of converting two halves
        per 32 weights."""
        n, k = shape
        if kind not in KINDS:
            raise ValueError(f"unsupported quantization {kind!r}; have {sorted(KINDS)}")
        if k % BLOCK:
            raise ValueError(f"row length {k} is not a multiple of {BLOCK}")
        size, n_scales = _GGUF_BLOCK[kind]
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1, size)
        if raw.shape[0] != n * (k // BLOCK):
            raise ValueError(f"{kind} data for {shape} must hold {n * (k // BLOCK)} blocks, "
                             f"got {raw.shape[0]}")
        scales = np.ascontiguousarray(raw[:, :2 * n_scales]).view(np.float16).astype(np.float32)
        packed = np.concatenate([scales.view(np.uint8), raw[:, 2 * n_scales:]], axis=1)
        return cls(kind, torch.from_numpy(packed.reshape(n, -1)), (n, k))

    @staticmethod
    def cat(parts: Sequence[QuantWeight | None]) -> QuantWeight | None:
        """The rows of several weights stacked (fused q|k|v, gate|up); None unless all are
        quantized alike with the same row length."""
        whole = [p for p in parts if p is not None]
        if not whole or len(whole) < len(parts):
            return None
        first = whole[0]
        if any(p.kind != first.kind or p.shape[1] != first.shape[1] for p in whole):
            return None
        blocks = torch.cat([p.blocks for p in whole])
        return QuantWeight(first.kind, blocks, (blocks.shape[0], first.shape[1]))


def _check(rc: int, what: str) -> None:
    if rc == -2:
        raise MemoryError(f"{what}: a thread's scratch buffer could not be allocated")
    if rc != 0:
        raise ValueError(f"{what}: the kernel refused the arguments (rc {rc})")


def _lib() -> Any:
    k = kernel()
    if k is None:
        raise RuntimeError(f"CPU kernels unavailable: {why_not()}")
    return k


def _operands(x: torch.Tensor, n: int, kk: int, bias: torch.Tensor | None,
              what: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(x, bias, y) as the kernels take them: x float32 CPU [M, kk] and bias [n] contiguous,
    y the [M, n] output; ValueError naming what does not fit."""
    if x.dim() != 2 or x.shape[1] != kk or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"{what} takes float32 CPU [M, {kk}], got {x.dtype} {x.device.type} "
                         f"{tuple(x.shape)}")
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
        if bias.shape != (n,):
            raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    return x.contiguous(), bias, torch.empty(x.shape[0], n, dtype=torch.float32)


def qlinear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 (CPU) @ W^T (+ bias) -> [M, N] float32."""
    k = _lib()
    n, kk = w.shape
    x, bias, y = _operands(x, n, kk, bias, "qlinear")
    _check(k.qlinear(KINDS[w.kind][0], x.data_ptr(), x.shape[0], kk, w.blocks.data_ptr(), n,
                     None if bias is None else bias.data_ptr(), y.data_ptr(),
                     torch.get_num_threads()), "qlinear")
    return y


def dequantize(w: QuantWeight) -> torch.Tensor:
    """W as float32 [N, K], by the kernel's own rebuild of each weight."""
    k = _lib()
    out = torch.empty(w.shape, dtype=torch.float32)
    _check(k.dequant(KINDS[w.kind][0], w.blocks.data_ptr(), w.shape[0], w.shape[1],
                     out.data_ptr()), "dequantize")
    return out


def fp8_usable(weight: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether `fp8_linear` takes this FP8 weight (K and the block's columns multiples of 8)."""
    return weight.shape[1] % 8 == 0 and block[1] % 8 == 0 and kernel() is not None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
               block: tuple[int, int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 (CPU) @ W^T (+ bias) for W in FP8 e4m3 with block scales (engine/fp8.py):
    each weight rebuilt in float32, bit for bit DeepSeek's dequantization, inside the product."""
    k = _lib()
    n, kk = weight.shape
    if not (weight.is_contiguous() and scale_inv.is_contiguous()
            and scale_inv.dtype == torch.float32):
        raise ValueError("fp8_linear takes a contiguous weight and float32 scales")
    x, bias, y = _operands(x, n, kk, bias, "fp8_linear")
    _check(k.fp8_linear(x.data_ptr(), x.shape[0], kk, weight.data_ptr(), n,
                        scale_inv.data_ptr(), block[0], block[1],
                        None if bias is None else bias.data_ptr(), y.data_ptr(),
                        torch.get_num_threads()), "fp8_linear")
    return y


def fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int]) -> torch.Tensor:
    """The float32 weight, by the kernel's own rebuild (what fp8_linear multiplies by)."""
    k = _lib()
    out = torch.empty(tuple(weight.shape), dtype=torch.float32)
    _check(k.fp8_dequant(weight.data_ptr(), weight.shape[0], weight.shape[1],
                         scale_inv.data_ptr(), block[0], block[1], out.data_ptr()),
           "fp8_dequantize")
    return out


@dataclass(frozen=True)
class DecodePlan:
    """The decode sequences of a batch as the attention kernel reads them (built once per step,
    used by every layer): int32 query rows, context lengths, table offsets and page tables."""

    q_rows: torch.Tensor
    ctx_lens: torch.Tensor
    table_off: torch.Tensor
    tables: torch.Tensor

    @classmethod
    def build(cls, q_rows: Sequence[int], ctx_lens: Sequence[int],
              tables: Sequence[torch.Tensor]) -> DecodePlan:
        off = [0]
        for t in tables:
            off.append(off[-1] + t.numel())
        flat = torch.cat([t.to(torch.int32) for t in tables]) if tables else \
            torch.zeros(0, dtype=torch.int32)
        def i32(xs: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(xs), dtype=torch.int32)
        return cls(i32(q_rows), i32(ctx_lens), i32(off), flat.contiguous())

    def __len__(self) -> int:
        return self.q_rows.numel()


def decode_attention(q: torch.Tensor, kv: torch.Tensor, layer: int, n_kv: int,
                     plan: DecodePlan, scale: float, out: torch.Tensor) -> None:
    """out[plan.q_rows] = attention of q's rows (q: [T, H, hd] float32) over their context in
    the pool kv [P, L, Bt, 2 * n_kv * hd] (float32 or float16) at `layer`; other rows of out are
    left alone."""
    k = kernel()
    if k is None:
        raise RuntimeError(f"CPU kernels unavailable: {why_not()}")
    t, h, hd = q.shape
    pages, layers, bt, row = kv.shape
    if row != 2 * n_kv * hd or not 0 <= layer < layers or out.shape != q.shape \
            or not out.is_contiguous():
        raise ValueError(f"decode_attention: pool {tuple(kv.shape)} does not fit q "
                         f"{tuple(q.shape)} with {n_kv} KV heads at layer {layer}")
    q = q.contiguous()
    _check(k.attention(q.data_ptr(), kv.data_ptr(), _kv_f16(kv), layers * bt * row,
                       layer * bt * row, bt, h,
                       n_kv, hd, len(plan), plan.q_rows.data_ptr(), plan.ctx_lens.data_ptr(),
                       plan.table_off.data_ptr(), plan.tables.data_ptr(), scale,
                       out.data_ptr(), torch.get_num_threads()), "decode_attention")


def _kv_f16(kv: torch.Tensor) -> int:
    """The kernels' flag for a pool's element type: float32 (0) or float16 (1)."""
    if kv.dtype not in (torch.float32, torch.float16) or not kv.is_contiguous():
        raise ValueError(f"the CPU kernels read a contiguous float32 or float16 KV pool, "
                         f"not {kv.dtype}")
    return int(kv.dtype == torch.float16)


def _qweight(w: QuantWeight, bias: torch.Tensor | None) -> QWeightStruct:
    return QWeightStruct(KINDS[w.kind][0], w.shape[0], w.shape[1], w.blocks.data_ptr(),
                    None if bias is None else bias.data_ptr())


@dataclass
class LlamaLayerWeights:
    """What one decoder layer's fused decode call reads (all on CPU, float32 and contiguous)."""

    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: QuantWeight
    qkv_bias: torch.Tensor | None
    o: QuantWeight
    o_bias: torch.Tensor | None
    gate_up: QuantWeight
    down: QuantWeight


# The parts of a fused decode layer (pdserve_llama_decode_layer), in its order.
LAYER_PARTS = ("norm", "q/k/v product", "RoPE, K/V write", "attention", "output product",
               "residual, norm", "gate/up product", "SiLU", "down product", "residual")


def layer_timers(on: bool) -> dict[str, float]:
    """Seconds each part of the fused decode layers took since the last call, summed over
    layers and steps (then zeroed); timing on from now if `on`, off otherwise (off, a part
    costs one test of a flag). For bench/step_profile.py; one engine in the process."""
    k = kernel()
    if k is None:
        raise RuntimeError(f"CPU kernels unavailable: {why_not()}")
    out = (ctypes.c_ulonglong * len(LAYER_PARTS))()
    if k.layer_timers(int(on), ctypes.addressof(out)) != len(LAYER_PARTS):
        raise RuntimeError("the kernel times other parts than LAYER_PARTS")
    return {name: ns / 1e9 for name, ns in zip(LAYER_PARTS, out)}


class LlamaDecode:
    """Decode steps of a Llama-family model through `pdserve_llama_decode_layer`, one call per
    layer. Holds the layers' weights (the tensors stay referenced here, their addresses in the
    C structs)."""

    def __init__(self, layers: Sequence[LlamaLayerWeights], *, hidden: int, heads: int,
                 kv_heads: int, head_dim: int, intermediate: int, eps: float) -> None:
        k = kernel()
        if k is None:
            raise RuntimeError(f"CPU kernels unavailable: {why_not()}")
        self._k = k
        self.keep = list(layers)
        for w in self.keep:
            for t in (w.in_norm, w.post_norm, w.qkv_bias, w.o_bias):
                if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
                    raise ValueError("norm weights and biases must be contiguous float32")
        self.structs = [LlamaLayerStruct(w.in_norm.data_ptr(), w.post_norm.data_ptr(),
                                    _qweight(w.qkv, w.qkv_bias), _qweight(w.o, w.o_bias),
                                    _qweight(w.gate_up, None), _qweight(w.down, None))
                        for w in self.keep]
        self.D, self.H, self.KVH, self.hd, self.I = hidden, heads, kv_heads, head_dim, intermediate
        self.eps = eps

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
            slot_pages: torch.Tensor, slot_offsets: torch.Tensor, plan: DecodePlan,
            scale: float, layers: range) -> torch.Tensor:
        """h [T, D]: one new token per sequence (row t is plan's sequence t); cos/sin [T, hd].
        Runs `layers` and returns h (updated in place)."""
        t = h.shape[0]
        if len(plan) != t or plan.q_rows.tolist() != list(range(t)):
            raise ValueError("the fused decode step takes one new token per sequence, in order")
        h = h.contiguous()
        cos, sin = cos.reshape(t, self.hd).contiguous(), sin.reshape(t, self.hd).contiguous()
        pages = slot_pages.to(torch.int32).contiguous()
        offsets = slot_offsets.to(torch.int32).contiguous()
        nq, nk = self.H * self.hd, self.KVH * self.hd
        scratch = torch.empty(t * (self.D + nq + 2 * nk + 2 * nq + 2 * self.I))
        _, n_layers, bt, row = kv.shape
        step = DecodeStepStruct(h.data_ptr(), cos.data_ptr(), sin.data_ptr(), kv.data_ptr(),
                           pages.data_ptr(), offsets.data_ptr(), plan.q_rows.data_ptr(),
                           plan.ctx_lens.data_ptr(), plan.table_off.data_ptr(),
                           plan.tables.data_ptr(), scratch.data_ptr(), n_layers * bt * row,
                           self.eps, scale, t, self.D, self.H, self.KVH, self.hd, self.I,
                           n_layers, bt, torch.get_num_threads(), _kv_f16(kv))
        ref = ctypes.byref(step)
        for i in layers:
            _check(self._k.layer(ctypes.byref(self.structs[i]), ref, i), f"decode layer {i}")
        return h


if __name__ == "__main__":
    import sys

    sys.exit(main())
