"""Llama-family decoder (GQA, RoPE, RMSNorm, SwiGLU) over the paged KV pool.

Parameter names mirror Hugging Face's `LlamaForCausalLM`, so a Hugging Face state dict loads as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine import cpu_kernels, greedy_head
from pdserve.engine.attention import AttnBatch, paged_attention
from pdserve.engine.backend import Backend, without_fusion
from pdserve.engine.cpu_kernels import QuantWeight
from pdserve.engine.fp8 import FP8Linear, FP8Product, project
from pdserve.engine.linear import FastLinear, fuse_rows
from pdserve.engine.model_config import LlamaConfig
from pdserve.engine.rope import RopeScaling, cos_sin, inv_freq

Quantized = Callable[[str], "QuantWeight | None"]  # a parameter's GGUF blocks, by its name


def _no_blocks(name: str) -> QuantWeight | None:
    return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused op, the same arithmetic
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotate-half RoPE, as in Hugging Face Llama (YaRN's frequencies and cos/sin factor when
    the config scales it: engine/rope.py)."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.factor = scaling.cos_sin_factor
        self.register_buffer("inv_freq", inv_freq(head_dim, theta, scaling), persistent=False)

    def reset(self, device: str | torch.device) -> None:
        self.inv_freq = inv_freq(self.head_dim, self.theta, self.scaling).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
        """cos and sin [T, 1, hd] for the positions [T]: computed once per forward."""
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [T, hd/2]
        cos, sin = cos_sin(torch.cat([freqs, freqs], dim=-1), self.factor, dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    @staticmethod
    def rotate(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: [T, heads, hd]
        cos, sin = cos_sin
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv_product: FastLinear | None = None
        self.o_product: FastLinear | None = None
        self.c_attention = False  # decode attention by the C kernel (backend.c_attention)
        self.varlen = False  # a step's prefill chunks in one call (backend.varlen_prefill)
        self.paged = False  # decode rows read pages in place (backend.paged_decode)

    def prepare(self, backend: Backend, blocks: Quantized = _no_blocks) -> None:
        """After the weights are loaded: one q|k|v product, packed weights on CPU."""
        self.qkv_product = fuse_rows(self.q_proj, self.k_proj, self.v_proj,
                              quant=[blocks(f"{p}_proj.weight") for p in "qkv"],
                              pack=backend.pack_weights, defer_pack=backend.decode_only)
        self.o_product = FastLinear(self.o_proj.weight, self.o_proj.bias, blocks("o_proj.weight"),
                             pack=backend.pack_weights, defer_pack=backend.decode_only)
        self.c_attention = backend.c_attention and self.hd % 8 == 0
        self.varlen = backend.varlen_prefill
        self.paged = backend.paged_decode

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor,
        batch: AttnBatch,
    ) -> torch.Tensor:
        t = x.shape[0]
        nq, nk = self.n_heads * self.hd, self.n_kv * self.hd
        if self.qkv_product is not None:
            q, k, v = torch.split(self.qkv_product(x, batch.decode_step), [nq, nk, nk], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = Rotary.rotate(q.view(t, self.n_heads, self.hd), cos_sin)
        k = Rotary.rotate(k.view(t, self.n_kv, self.hd), cos_sin)
        o = paged_attention(q, k, v.reshape(t, self.n_kv, self.hd), kv, self.layer, batch,
                            self.hd ** -0.5, self.c_attention, self.varlen,
                            self.paged).reshape(t, nq)
        if self.o_product is not None:
            return self.o_product(o, batch.decode_step)
        out: torch.Tensor = self.o_proj(o)
        return out


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        # nn.Linear, or FP8Linear once engine/fp8.py installed FP8 weights
        self.gate_proj: nn.Linear | FP8Linear = nn.Linear(hidden_size, intermediate_size,
                                                          bias=False)
        self.up_proj: nn.Linear | FP8Linear = nn.Linear(hidden_size, intermediate_size,
                                                        bias=False)
        self.down_proj: nn.Linear | FP8Linear = nn.Linear(intermediate_size, hidden_size,
                                                          bias=False)
        self.gate_up_product: FastLinear | None = None
        self.down_product: FastLinear | None = None
        self.gate_up_fp8: FP8Product | None = None  # gate|up fused, FP8 weights

    def prepare(self, backend: Backend, blocks: Quantized = _no_blocks) -> None:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if (isinstance(gate, FP8Linear) or isinstance(up, FP8Linear)
                or isinstance(down, FP8Linear)):
            for m in (gate, up, down):  # FP8 weights: each dequantizes inside its product
                if isinstance(m, FP8Linear):
                    m.prepare(kernel=backend.block_products)
            if isinstance(gate, FP8Linear) and isinstance(up, FP8Linear):  # one product
                self.gate_up_fp8 = FP8Product.fused([gate, up], backend.block_products)
            return
        self.gate_up_product = fuse_rows(gate, up,
                                  quant=[blocks("gate_proj.weight"), blocks("up_proj.weight")],
                                  pack=backend.pack_weights, defer_pack=backend.decode_only)
        self.down_product = FastLinear(down.weight, quant=blocks("down_proj.weight"),
                                pack=backend.pack_weights, defer_pack=backend.decode_only)

    def forward(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        if self.gate_up_fp8 is not None:
            gate, up = self.gate_up_fp8(x, decode).chunk(2, dim=-1)
            return project(self.down_proj, F.silu(gate) * up, decode)
        if self.gate_up_product is None or self.down_product is None:
            h = F.silu(project(self.gate_proj, x, decode)) * project(self.up_proj, x, decode)
            return project(self.down_proj, h, decode)
        gate, up = self.gate_up_product(x, decode).chunk(2, dim=-1)
        return self.down_product(F.silu(gate) * up, decode)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                kv: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos_sin, kv, batch)
        out: torch.Tensor = h + self.mlp(self.post_attention_layernorm(h), batch.decode_step)
        return out


class LlamaBody(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.rope = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.head_product: FastLinear | None = None
        self.fused_decode: cpu_kernels.LlamaDecode | None = None
        self.greedy_head: greedy_head.LazyGreedyHead | None = None
        self.backend = Backend("torch")

    def prepare(self, backend: Backend,
                quantized: Mapping[str, QuantWeight] | None = None) -> Backend:
        """Called once the weights are in place on their device (see linear.py). `quantized`:
        the GGUF blocks of weights, by state-dict name (a GGUF file's Q4_1/Q8_0 tensors), when
        the backend reads blocks. Returns the backend the model runs (narrowed when it lacks
        blocks for some products)."""
        q: Mapping[str, QuantWeight] = quantized if backend.block_products and quantized else {}

        def blocks_of(prefix: str) -> Quantized:
            return lambda name: q.get(f"{prefix}.{name}")

        for i, layer in enumerate(self.decoder_layers()):
            layer.self_attn.prepare(backend, blocks_of(f"model.layers.{i}.self_attn"))
            layer.mlp.prepare(backend, blocks_of(f"model.layers.{i}.mlp"))
        head = q.get("lm_head.weight")
        if head is None and self.config.tie_word_embeddings:
            head = q.get("model.embed_tokens.weight")
        # The head reads its blocks for prefill's logits too (forward): with blocks it packs
        # float32 weights only if asked for a prefill product.
        self.head_product = FastLinear(self.lm_head.weight, quant=head, pack=backend.pack_weights,
                                       defer_pack=True)
        self.greedy_head = (greedy_head.LazyGreedyHead(head)
                            if head is not None and greedy_head.usable(head) else None)
        layers = self._fusable_layers() if backend.fused_layers else None
        if backend.fused_layers and layers is None:
            backend = without_fusion(backend, "not every product has GGUF blocks")
        self.fused_decode = self._make_fused_decode(layers) if layers is not None else None
        self.backend = backend
        return backend

    def _fusable_layers(self) -> list[cpu_kernels.LlamaLayerWeights] | None:
        """What the one-call-per-layer decode step reads, when every product of every layer
        has GGUF blocks; None otherwise."""
        layers = []
        for layer in self.decoder_layers():
            a, m = layer.self_attn, layer.mlp
            qkv, o, gate_up, down = a.qkv_product, a.o_product, m.gate_up_product, m.down_product
            if (qkv is None or o is None or gate_up is None or down is None or qkv.quant is None
                    or o.quant is None or gate_up.quant is None or down.quant is None):
                return None
            layers.append(cpu_kernels.LlamaLayerWeights(
                layer.input_layernorm.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
                qkv.quant, qkv.bias, o.quant, o.bias, gate_up.quant, down.quant))
        return layers

    def _make_fused_decode(self, layers: list[cpu_kernels.LlamaLayerWeights]
                      ) -> cpu_kernels.LlamaDecode:
        """The one-call-per-layer decode step (cpu_kernels.py)."""
        c = self.config
        return cpu_kernels.LlamaDecode(
            layers, hidden=c.hidden_size, heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
            intermediate=c.intermediate_size, eps=c.rms_norm_eps)

    def decoder_layers(self) -> list[DecoderLayer]:
        return cast(list[DecoderLayer], list(self.model.layers))

    def reset_buffers(self, device: str | torch.device) -> None:
        """Recomputes non-persistent buffers (after building on the meta device)."""
        self.rope.reset(device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, kv: torch.Tensor, batch: AttnBatch,
                layers: tuple[int, int] | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [T] new tokens of all sequences; returns logits [B, vocab] (float32)
        of each sequence's last new token. A pipeline stage runs only `layers` [lo, hi): it
        starts from `hidden` [T, D] (the previous stage's output) unless lo is 0, and returns
        the hidden states [T, D] unless hi is the last layer."""
        lo, hi = layers or (0, len(self.model.layers))
        h = self.model.embed_tokens(input_ids) if lo == 0 else hidden  # [T, D]
        assert h is not None, "a stage after the first needs the previous stage's hidden states"
        cos_sin = self.rope.cos_sin(batch.positions, h.dtype)
        fused = self.fused_decode
        if fused is not None and batch.decode_step:  # one C call per layer (cpu_kernels.py)
            h = fused.run(h, cos_sin[0], cos_sin[1], kv, batch.slot_pages, batch.slot_offsets,
                          batch.decode_plan(), self.config.head_dim ** -0.5, range(lo, hi))
        else:
            for i in range(lo, hi):
                if batch.before_layer is not None:
                    batch.before_layer(i)
                h = self.model.layers[i](h, cos_sin, kv, batch)
        if hi < len(self.model.layers):
            return h
        h = self.model.norm(h[batch.last_indices])
        return self._logits(h, batch)

    def _logits(self, h: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        """The head over h [B, D]; a decode step's argmax-only rows through the greedy head
        (engine/greedy_head.py) when the model has one and they are every row or enough of
        them (MIN_SPLIT_ROWS) to pay for a pass of their own."""
        full = self._full_logits
        rows = batch.argmax_only
        if self.greedy_head is None or not batch.decode_step or rows is None:
            return full(h)
        pick = [i for i, only in enumerate(rows) if only]
        every = len(pick) == h.shape[0]
        if not pick or (not every and len(pick) < greedy_head.MIN_SPLIT_ROWS):
            return full(h)
        got = self.greedy_head.logits(h if every else h[pick])
        if got is None:
            return full(h)
        if every:
            return got
        rest = [i for i, only in enumerate(rows) if not only]
        out = torch.empty(h.shape[0], got.shape[1], dtype=torch.float32)
        out[pick] = got
        out[rest] = full(h[rest])
        return out

    def _full_logits(self, h: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = (self.head_product(h, True) if self.head_product is not None
                                else self.lm_head(h))
        return logits.float()
