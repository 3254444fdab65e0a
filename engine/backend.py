"""The execution backend: how a model's products, attention and decode steps run, chosen once at
load, by name, from the settings (`--backend`), and never again per call.

| name          | packed weights | block products | C attention | C layers | CUDA graphs |
|---------------|----------------|----------------|-------------|----------|-------------|
| `torch`       |                |                |             |          |             |
| `onednn`      | x              |                |             |          |             |
| `cpu-kernels` | x              | x              | x           |          |             |
| `cpu-fused`   | x              | x              | x           | x        |             |
| `cuda-graphs` |                |                |             |          | x           |

(packed weights: float32 weights pre-packed once for oneDNN; block products: decode steps'
products read a GGUF file's Q4_1/Q8_0 blocks, or FP8 weights with their block scales; C
attention: decode attention over the pages in place; C layers: one C call per Llama layer per
decode step; CUDA graphs: decode steps replayed from graphs.)

`auto` (the default) takes the fastest one the device, dtype and model allow: on CPU in float32
`cpu-fused` (DeepSeek: `cpu-kernels`) when the C kernels can be had (engine/cpu_kernels.py),
else `onednn`; on CUDA
`cuda-graphs` for the Llama family, `torch` for DeepSeek (its MoE routes on the host). What it
gave up, and why, is logged once. A name that cannot be had (the kernels on a GPU, CUDA graphs
on a CPU, kernels without a compiler) is refused at start-up with a message naming the setting.
What a model lacks is narrowed at load, once: a product without GGUF blocks runs its float32
weights, and a Llama model whose products are not all from blocks runs `cpu-kernels` instead of
`cpu-fused`. DeepSeek's C path is its FP8 products (block products of DeepSeek's FP8 format,
engine/fp8.py); its attention (MLA) stays in torch, and a DeepSeek model without FP8 weights
runs `onednn`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from pdserve.engine import cpu_kernels
from pdserve.engine.errors import EngineError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onednn", "cpu-kernels", "cpu-fused", "cuda-graphs")


class BackendError(EngineError):
    """A backend that cannot run here; the message names the setting."""


@dataclass(frozen=True)
class Backend:
    name: str
    pack_weights: bool = False    # float32 weights pre-packed for oneDNN (CPU)
    block_products: bool = False  # decode steps' products read GGUF Q4_1/Q8_0 blocks (CPU)
    c_attention: bool = False     # decode attention over the pages in place (CPU)
    fused_layers: bool = False    # a Llama decode step runs each layer as one C call (CPU)
    cuda_graphs: bool = False     # decode steps replayed from CUDA graphs
    # every product in fixed row tiles and attention in fixed key tiles (engine/invariant.py)
    batch_invariant: bool = False
    # a step's prefill chunks attend in one flex attention call, not one call per sequence
    # (engine/flex.py; --prefill-attention flex, Llama models)
    varlen_prefill: bool = False
    # decode attention reads the pool's pages in place, a Triton kernel (engine/paged_decode.py;
    # --decode-attention paged, CUDA, Llama models)
    paged_decode: bool = False
    # the model runs decode steps only (a decode worker): a product that reads blocks there
    # packs its float32 weights for oneDNN only if a prefill ever comes (start time, memory)
    decode_only: bool = False

    @property
    def uses_kernels(self) -> bool:
        return self.block_products or self.c_attention or self.fused_layers

    def narrowed(self, name: str, why: str) -> Backend:
        """The backend a model actually runs when it cannot use all of this one."""
        log.info("execution backend narrowed", extra={"requested": self.name, "backend": name,
                                                      "reason": why})
        # what the settings asked beside the backend's name stays
        return replace(_TABLE[name], decode_only=self.decode_only,
                       varlen_prefill=self.varlen_prefill, paged_decode=self.paged_decode)


_TABLE = {
    "torch": Backend("torch"),
    "onednn": Backend("onednn", pack_weights=True),
    "cpu-kernels": Backend("cpu-kernels", pack_weights=True, block_products=True,
                           c_attention=True),
    "cpu-fused": Backend("cpu-fused", pack_weights=True, block_products=True, c_attention=True,
                         fused_layers=True),
    "cuda-graphs": Backend("cuda-graphs", cuda_graphs=True),
}


def _onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


def choose_backend(name: str, device: str | torch.device, dtype: torch.dtype,
                   family: str) -> Backend:
    """The backend `name` on this device and dtype for a model of `family` ("llama" or
    "deepseek"); raises BackendError for a name that cannot run here."""
    if name not in BACKENDS:
        raise BackendError(f"--backend: {name!r}, must be one of {', '.join(BACKENDS)}")
    dev = torch.device(device).type
    cpu32 = dev == "cpu" and dtype == torch.float32
    if name == "auto":
        return _auto(dev, cpu32, family)
    b = _TABLE[name]
    if b.cuda_graphs and dev != "cuda":
        raise BackendError(f"--backend cuda-graphs: needs --device cuda, not {dev}")
    if b.cuda_graphs and family != "llama":
        raise BackendError("--backend cuda-graphs: the DeepSeek MoE routes on the host and "
                           "cannot be captured; use torch")
    if (b.pack_weights or b.uses_kernels) and not cpu32:
        raise BackendError(f"--backend {name}: runs float32 on CPU only (--device cpu "
                           f"--dtype float32), not {dev} {str(dtype).removeprefix('torch.')}")
    if b.pack_weights and not _onednn_available():
        raise BackendError(f"--backend {name}: this torch build has no oneDNN (mkldnn)")
    if b.uses_kernels and cpu_kernels.kernel() is None:
        raise BackendError(f"--backend {name}: the CPU kernels cannot be had: "
                           f"{cpu_kernels.why_not()}")
    if b.fused_layers and family != "llama":
        return b.narrowed("cpu-kernels", "DeepSeek has no fused C decoder layer")
    return b


def _auto(dev: str, cpu32: bool, family: str) -> Backend:
    if dev == "cuda":
        return _TABLE["cuda-graphs" if family == "llama" else "torch"]
    if not cpu32 or not _onednn_available():
        return _TABLE["torch"]
    if cpu_kernels.kernel() is None:
        log.warning("CPU kernels unavailable; running float32 weights and torch layers",
                    extra={"reason": cpu_kernels.why_not()})
        return _TABLE["onednn"]
    return _TABLE["cpu-fused" if family == "llama" else "cpu-kernels"]


def batch_invariant(name: str, device: str | torch.device, family: str) -> Backend:
    """The backend of `--batch-invariant` (engine/invariant.py): plain torch, whose products
    it tiles (the packed and C products would bypass them), on CPU, for DeepSeek models (whose
    attention it has); BackendError naming the setting otherwise."""
    if family != "deepseek":
        raise BackendError("--batch-invariant: DeepSeek models only (their attention has a "
                           "batch-invariant form)")
    if torch.device(device).type != "cpu":
        raise BackendError("--batch-invariant: CPU only (its products replace torch's CPU ones)")
    if name not in ("auto", "torch"):
        log.info("execution backend narrowed", extra={
            "requested": name, "backend": "torch",
            "reason": "--batch-invariant tiles torch's own products"})
    return Backend("torch", batch_invariant=True)


PREFILL_ATTENTION = ("auto", "sdpa", "flex")
DECODE_ATTENTION = ("auto", "gather", "paged")


def _asks_kernel(flag: str, name: str, choices: tuple[str, ...], kernel: str,
                 family: str) -> bool:
    """Whether `flag` set to `name` asks for its kernel `kernel`; BackendError naming the
    setting for a name not in `choices` or the kernel under a model it does not serve."""
    if name not in choices:
        raise BackendError(f"{flag}: {name!r}, must be one of {', '.join(choices)}")
    if name != kernel:
        return False
    if family != "llama":
        raise BackendError(f"{flag} {kernel}: Llama-family models only (DeepSeek's MLA attends "
                           "in its own path)")
    return True


def with_prefill_attention(b: Backend, name: str, family: str) -> Backend:
    """`b` with the prefill attention `name` (--prefill-attention): "sdpa" one call per
    sequence, "flex" one flex attention call for all of a step's chunks (engine/flex.py);
    "auto" is "sdpa" until a GPU run measures flex against it (issue #23, bench/gpu.sh)."""
    if not _asks_kernel("--prefill-attention", name, PREFILL_ATTENTION, "flex", family):
        return b
    return replace(b, varlen_prefill=True)


def with_decode_attention(b: Backend, name: str, device: str | torch.device,
                          family: str) -> Backend:
    """`b` with the decode attention `name` (--decode-attention): "gather" copies each
    group's pages and runs SDPA (or, on CPU, the C kernel), "paged" reads them in place
    (engine/paged_decode.py: Triton, CUDA); "auto" is "gather" until a GPU run measures the
    kernel (issue #23, bench/gpu.sh)."""
    if not _asks_kernel("--decode-attention", name, DECODE_ATTENTION, "paged", family):
        return b
    if torch.device(device).type != "cuda":
        raise BackendError(f"--decode-attention paged: a Triton kernel, needs --device cuda, "
                           f"not {torch.device(device).type}")
    try:
        import triton  # noqa: F401  (CUDA builds of torch bring it)
    except ImportError as e:
        raise BackendError(f"--decode-attention paged: needs Triton ({e})") from e
    return replace(b, paged_decode=True)


def without_fusion(b: Backend, why: str) -> Backend:
    """`b` for a model whose products are not all from GGUF blocks."""
    if not b.fused_layers:
        return b
    return b.narrowed("cpu-kernels", why)
