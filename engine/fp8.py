"""DeepSeek's FP8 weights: `float8_e4m3fn` with one float32 scale per block of the weight
(`weight_scale_inv`, `[ceil(out/bn), ceil(in/bk)]`, blocks [bn, bk] = `weight_block_size`).

A weight's value is its FP8 number times its block's scale: w[i, j] · s[i // bn, j // bk], in
float32 (DeepSeek's `weight_dequant`); edge blocks are partial. `FP8Linear` keeps the FP8 bytes
and the scales (about one byte a weight) and dequantizes inside the product, a tile of rows at
a time, so no float copy of the whole weight is ever held. The tile is the same float32 numbers
as `dequantize`'s, so the product is an ordinary float32 product of the checkpoint's weights.
Decode steps' products can instead run in C (cpu_kernels.fp8_linear), which rebuilds each row
in cache, bit for bit the same numbers, reading one byte a weight: small-batch decode is bound
by reading the weights.
"""


from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine import cpu_kernels

FP8 = torch.float8_e4m3fn
_TILE_ELEMENTS = 1 << 21  # weights dequantized at once (8 MiB of float32)


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's block formula, float32: w[i, j] · scale_inv[i // bn, j // bk]."""
    bn, bk = block
    r, c = w.shape
    s = scale_inv.float().repeat_interleave(bn, 0)[:r].repeat_interleave(bk, 1)[:, :c]
    return w.float() * s


def check_pair(name: str, w: torch.Tensor, scale_inv: torch.Tensor | None,
               block: tuple[int, int]) -> None:
    """ValueError naming the tensor when an FP8 weight and its scales do not fit together."""
    if scale_inv is None:
        raise ValueError(f"{name}: an FP8 weight without its {name}_scale_inv")
    if w.dim() != 2:
        raise ValueError(f"{name}: FP8 weights are matrices (got shape {tuple(w.shape)})")
    want = scale_shape((w.shape[0], w.shape[1]), block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}_scale_inv: shape {tuple(scale_inv.shape)}, but a "
                         f"{tuple(w.shape)} weight in {block[0]}x{block[1]} blocks needs {want}")


class FP8Product:
    """y = x · dequantize(weight, scale_inv)ᵀ + bias for weights that stay FP8. Not a module:
    it holds references to parameters registered elsewhere (an FP8Linear's, or gate|up's
    concatenated, see `fused`), as linear.FastLinear does for float weights."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                 bias: torch.Tensor | None = None, kernel: bool = False) -> None:
        self.weight, self.scale_inv, self.block = weight.detach(), scale_inv.detach(), block
        self.bias = None if bias is None else bias.detach()
        self.out_features, self.in_features = self.weight.shape
        # Decode steps' products in C (and tiles rebuilt by C), reading the FP8 bytes.
        self.kernel = (kernel and self.weight.device.type == "cpu"
                       and cpu_kernels.fp8_usable(self.weight, block))
        # Without C: each block row's scales spread over the columns ([ceil(out/bn), in], 1/bn
        # of the weight count), so a tile is one multiply.
        self._col_scales = None if self.kernel else (
            self.scale_inv.float().repeat_interleave(block[1], 1)[:, :self.in_features]
            .contiguous())

    @classmethod
    def fused(cls, parts: list[FP8Linear], kernel: bool) -> FP8Product | None:
        """One product for several layers on the same input (gate|up): weights and scales
        concatenated by rows, each layer's parameters becoming views of them (nothing is held
        twice). None when a layer's rows are not whole blocks (its scale rows would straddle)."""
        first = parts[0]
        if any(p.in_features != first.in_features or p.block != first.block
               or p.bias is not None or p.out_features % first.block[0] for p in parts):
            return None
        weight = torch.cat([p.weight.detach() for p in parts])
        scales = torch.cat([p.weight_scale_inv.detach() for p in parts])
        row, bn = 0, first.block[0]
        for p in parts:
            n = p.out_features
            p.weight.data = weight[row:row + n]
            p.weight_scale_inv.data = scales[row // bn:(row + n) // bn]
            p.product = FP8Product(p.weight, p.weight_scale_inv, p.block, kernel=kernel)
            row += n
        return cls(weight, scales, first.block, kernel=kernel)

    def dequantized(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 (r0 a multiple of the block's rows) of the float32 weight."""
        r1 = self.out_features if r1 is None else min(r1, self.out_features)
        bn, c = self.block[0], self.in_features
        assert r0 % bn == 0
        if self.kernel:  # the same numbers, rebuilt by the C kernel (about 10x faster)
            return cpu_kernels.fp8_dequantize(self.weight[r0:r1], self.scale_inv[r0 // bn:],
                                              self.block)
        assert self._col_scales is not None
        w = self.weight[r0:r1].float()
        s = self._col_scales[r0 // bn:-(-r1 // bn)]
        full = (r1 - r0) // bn * bn
        if full:
            w[:full].view(-1, bn, c).mul_(s[:full // bn].unsqueeze(1))
        if full < r1 - r0:
            w[full:].mul_(s[-1])
        return w

    def __call__(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if decode and self.kernel and x.dtype == torch.float32:
            y = cpu_kernels.fp8_linear(x2, self.weight, self.scale_inv, self.block,
                                       None if bias is None else bias.contiguous())
            return y.view(*shape[:-1], self.out_features)
        rows = max(self.block[0],
                   _TILE_ELEMENTS // max(self.in_features, 1) // self.block[0] * self.block[0])
        if rows >= self.out_features:
            y = F.linear(x2, self.dequantized().to(x.dtype), bias)
        else:
            y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            for r0 in range(0, self.out_features, rows):
                r1 = min(r0 + rows, self.out_features)
                y[:, r0:r1] = F.linear(x2, self.dequantized(r0, r1).to(x.dtype),
                                       None if bias is None else bias[r0:r1])
        return y.view(*shape[:-1], self.out_features)


class FP8Linear(nn.Module):
    """y = x · dequantize(weight, weight_scale_inv)ᵀ + bias, the weight kept in FP8 (the
    parameters, as a checkpoint names them; the product is an FP8Product)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int],
                 bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(*scale_shape((out_features, in_features), block)), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features), requires_grad=False) if bias
                     else None)
        self.product: FP8Product | None = None  # made by prepare(), once the weights are in

    @classmethod
    def like(cls, linear: nn.Linear, block: tuple[int, int]) -> FP8Linear:
        """An FP8Linear of `linear`'s shape, on `linear`'s device (meta while a model is built)."""
        with torch.device(linear.weight.device):
            return cls(linear.in_features, linear.out_features, block, linear.bias is not None)

    def prepare(self, kernel: bool = False) -> None:
        """After the weights are loaded; with `kernel` (the backend's block products) decode
        steps' products run in C (prefill chunks keep float32 products of rebuilt tiles: a
        prompt's KV is the same bits whatever the chunking)."""
        self.product = FP8Product(self.weight, self.weight_scale_inv, self.block, self.bias,
                                  kernel)

    def _product(self) -> FP8Product:
        if self.product is None:
            self.prepare()
        assert self.product is not None
        return self.product

    @property
    def uses_kernel(self) -> bool:
        """Whether decode steps' products run in C."""
        return self._product().kernel

    def dequantized(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 (r0 a multiple of the block's rows) of the float32 weight."""
        return self._product().dequantized(r0, r1)

    def forward(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        return self._product()(x, decode)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.block[0]}x{self.block[1]}, fp8=e4m3")


def project(layer: nn.Module, x: torch.Tensor, decode: bool) -> torch.Tensor:
    """layer(x), telling an FP8Linear whether this is a decode step's product."""
    y: torch.Tensor = layer(x, decode) if isinstance(layer, FP8Linear) else layer(x)
    return y


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's rule (as their conversion scripts do it): each block's scale is its largest
    magnitude / 448 (e4m3's largest), the block divided by it and rounded to e4m3. Returns
    (weight, weight_scale_inv). Edge blocks are padded with zeros for the amax only."""
    bn, bk = block
    r, c = w.shape
    rb, cb = scale_shape((r, c), block)
    padded = torch.zeros(rb * bn, cb * bk)
    padded[:r, :c] = w.float()
    blocks = padded.view(rb, bn, cb, bk)
    s = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / s[:, None, :, None]).to(FP8).view(rb * bn, cb * bk)[:r, :c].contiguous()
    return q, s


def install(model: nn.Module, state: dict[str, torch.Tensor], block: tuple[int, int]) -> int:
    """Replaces each `nn.Linear` of `model` whose weight `state` holds in FP8 by an FP8Linear of
    its shape (before the weights are loaded; on the meta device is fine). Returns how many;
    ValueError naming the tensor where an FP8 weight has no linear layer of its shape."""
    n = 0
    for key, t in state.items():
        if t.dtype != FP8:
            continue
        name = key.removesuffix(".weight")
        if (not key.endswith(".weight") or not name.startswith("model.layers.")
                or name.endswith(".mlp.gate")):
            raise ValueError(f"{key}: FP8 weights are read for the decoder layers' linear "
                             "layers only (not embeddings, the LM head or the router)")
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            raise ValueError(f"{key}: the model has no such layer") from None
        linear = getattr(parent, child, None)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{key}: the model has no linear layer there")
        if (linear.out_features, linear.in_features) != tuple(t.shape):
            raise ValueError(f"{key}: shape {tuple(t.shape)}, the model's layer is "
                             f"{(linear.out_features, linear.in_features)}")
        setattr(parent, child, FP8Linear.like(linear, block))
        n += 1
    return n
