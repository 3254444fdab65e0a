"""Linear layers for inference: one matrix product for several projections (q|k|v, gate|up),
and on CPU float32 weights pre-packed once into oneDNN's blocked layout.

Small-batch decode on CPU spends most of its time in matrix products whose left side has only a
few rows; the plain row-major weight makes oneDNN re-layout it on every call. Packing it once at
load time roughly halves those products (bench/bench_engine.py). The numbers are the same
products: only the summation order differs, within float32 rounding.

`PDSERVE_ONEDNN_PACK=0` turns packing off (plain `F.linear`).

A weight that came from a GGUF file as Q4_1/Q8_0 blocks also keeps those blocks: a product asked
to (`from_blocks`: decode steps and the LM head) reads them instead of the float32 copy
(cpu_kernels.py). Prefill chunks keep the float32 products: they are compute-bound, where
oneDNN's blocked kernel is the faster one, and a prompt's KV stays the same bits whatever the
chunking.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pdserve.engine import cpu_kernels
from pdserve.engine.cpu_kernels import QuantWeight

log = logging.getLogger(__name__)

_PACK_BATCH_HINT = 16  # oneDNN chooses its blocking for this many rows; any row count works


def _packing_wanted(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and os.environ.get("PDSERVE_ONEDNN_PACK", "1") != "0")


class FastLinear:
    """y = x @ weight.T + bias, for 2-D x. Holds references to the model's own weight (and a
    packed copy on CPU float32, and the GGUF blocks it was made from when `quant` is given and
    the quantized-weight kernel is available); not a module: the weights stay registered where
    they were."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 quant: QuantWeight | None = None) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.packed: torch.Tensor | None = None
        if _packing_wanted(self.weight):
            self.packed = self._pack()
        self.quant: QuantWeight | None = None
        if quant is not None and self.weight.device.type == "cpu" \
                and self.weight.dtype == torch.float32 and cpu_kernels.kernel() is not None:
            if quant.shape != tuple(self.weight.shape):
                raise ValueError(f"quantized weight {quant.shape} does not match the weight "
                                 f"{tuple(self.weight.shape)}")
            self.quant = quant

    def _pack(self) -> torch.Tensor | None:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, _PACK_BATCH_HINT)
            probe = torch.linspace(-1, 1, 3 * self.weight.shape[1]).view(3, -1)
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
        except (RuntimeError, AttributeError) as e:  # an op missing from this torch build
            log.info("oneDNN weight packing unavailable", extra={"error": str(e)})
            return None
        want = F.linear(probe, self.weight, self.bias)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            log.warning("oneDNN packed linear disagrees with F.linear; not using it")
            return None
        return packed

    def __call__(self, x: torch.Tensor, from_blocks: bool = False) -> torch.Tensor:
        if from_blocks and self.quant is not None and x.dtype == torch.float32 \
                and x.device.type == "cpu":
            return cpu_kernels.qlinear(x, self.quant, self.bias)
        if self.packed is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def fuse_rows(*linears: torch.nn.Linear,
              quant: Sequence[QuantWeight | None] = ()) -> FastLinear:
    """One product for several linears on the same input: their weights (and biases) are
    concatenated into one tensor and each module's parameter becomes a view of its rows, so the
    fused weight costs no extra memory and a state dict still reads the same. `quant`: each
    linear's GGUF blocks (or None), stacked alike when all are there."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else
                          torch.zeros(m.weight.shape[0], dtype=weight.dtype, device=weight.device)
                          for m, b in zip(linears, biases)])
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[row:row + n]
        if m.bias is not None:
            assert bias is not None
            m.bias.data = bias[row:row + n]
        row += n
    return FastLinear(weight, bias, QuantWeight.cat(quant) if quant else None)
