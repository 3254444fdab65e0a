"""Linear layers for inference: one matrix product for several projections (q|k|v, gate|up),
and on CPU float32 weights pre-packed once into oneDNN's blocked layout.

Small-batch decode on CPU spends most of its time in matrix products whose left side has only a
few rows; the plain row-major weight makes oneDNN re-layout it on every call. Packing it once at
load time roughly halves those products (bench/bench_engine.py). The numbers are the same
products: only the summation order differs, within float32 rounding.

A weight that came from a GGUF file as Q4_1/Q8_0 blocks can also keep those blocks: decode
steps' products (and the LM head's) then read them instead of the float32 copy
(cpu_kernels.py). Prefill chunks keep the float32 products: they are compute-bound, where
oneDNN's blocked kernel is the faster one, and a prompt's KV stays the same bits whatever the
chunking.

Which product runs is decided once, when the layer is made, from the execution backend
(engine/backend.py): a call only says whether it is a decode step's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pdserve.engine import cpu_kernels
from pdserve.engine.cpu_kernels import QuantWeight

log = logging.getLogger(__name__)

_PACK_BATCH_HINT = 16  # oneDNN chooses its blocking for this many rows; any row count works

Product = Callable[[torch.Tensor], torch.Tensor]


class FastLinear:
    """y = x @ weight.T + bias, for 2-D x. Holds references to the model's own weight (and a
    packed copy when `pack`, and the GGUF blocks it was made from when `quant` is given); not a
    module: the weights stay registered where they were."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 quant: QuantWeight | None = None, *, pack: bool = False,
                 defer_pack: bool = False) -> None:
        """`defer_pack` (a decode-only model): with blocks, whose decode products never read
        the float32 weights, the packing waits for the first prefill product, if any."""
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.packed: torch.Tensor | None = None
        if pack and (self.weight.device.type != "cpu" or self.weight.dtype != torch.float32):
            raise ValueError("packed weights are float32 on CPU")
        self.quant: QuantWeight | None = None
        if quant is not None:
            if quant.shape != tuple(self.weight.shape):
                raise ValueError(f"quantized weight {quant.shape} does not match the weight "
                                 f"{tuple(self.weight.shape)}")
            self.quant = quant
        self._prefill: Product = self._plain
        if pack and defer_pack and quant is not None:
            self._prefill = self._pack_first
        elif pack:
            self.packed = self._pack()
            self._prefill = self._onednn if self.packed is not None else self._plain
        self._decode: Product = self._blocks if self.quant is not None else self._prefill

    def _pack_first(self, x: torch.Tensor) -> torch.Tensor:
        self.packed = self._pack()
        self._prefill = self._onednn if self.packed is not None else self._plain
        return self._prefill(x)

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
        out: torch.Tensor = packed
        return out

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none",
                                                             [], "")
        return y

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        assert self.quant is not None
        return cpu_kernels.qlinear(x, self.quant, self.bias)

    def __call__(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """`decode`: a decode step's product (from the GGUF blocks when there are any)."""
        return self._decode(x) if decode else self._prefill(x)


def fuse_rows(*linears: torch.nn.Linear, quant: Sequence[QuantWeight | None] = (),
              pack: bool = False, defer_pack: bool = False) -> FastLinear:
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
    return FastLinear(weight, bias, QuantWeight.cat(quant) if quant else None, pack=pack,
                      defer_pack=defer_pack)
