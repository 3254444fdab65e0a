"""DeepSeek-V2/V3 decoder in plain torch: multi-head latent attention (MLA) over the paged pool,
and a mixture of experts with group-limited routing and shared experts.

Parameter names mirror Hugging Face's `DeepseekV3ForCausalLM` (per-expert checkpoint format).

The pool caches, per token and layer, only [c_kv (kv_lora_rank) | k_rope (qk_rope_head_dim)]:
the RMS-normed compressed latent and the shared, already rotated RoPE key.

- Prefill (several new tokens): keys and values are expanded from the latents through
  kv_b_proj, then ordinary attention runs per sequence.
- Decode (one new token), batched over the sequences of a decode group: the "absorbed" form.
  kv_b_proj = [W_UK | W_UV] per head; the query's
  no-RoPE part is folded into latent space (q_lat = q_nope · W_UK), attention scores are
  q_lat · c_kv + q_rope · k_rope, and the latent output goes through W_UV: attention runs against
  the cached latent, never against expanded keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine import invariant
from pdserve.engine.attention import AttnBatch, layer_pages
from pdserve.engine.backend import Backend
from pdserve.engine.ep.moe import ExpertParallel
from pdserve.engine.fp8 import FP8Linear, project
from pdserve.engine.linear import FastLinear
from pdserve.engine.llama import MLP, RMSNorm
from pdserve.engine.model_config import DeepseekV3Config
from pdserve.engine.rope import cos_sin
from pdserve.engine.rope import inv_freq as rope_inv_freq


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               interleave: bool, factor: float = 1.0) -> torch.Tensor:
    """x [T, heads, d] rotated by its positions; cos and sin times `factor` (YaRN's)."""
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [T, d/2]
    if interleave:
        cos, sin = (t.unsqueeze(1) for t in cos_sin(freqs, factor, x.dtype))
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    cos, sin = (t.unsqueeze(1) for t in cos_sin(torch.cat([freqs, freqs], dim=-1), factor,
                                                x.dtype))
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        h, d = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads = h
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        # nn.Linear, or FP8Linear until prepare() dequantizes it
        self.kv_b_proj: nn.Linear | FP8Linear = nn.Linear(
            cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=cfg.attention_bias)
        self.batch_invariant = False  # engine/invariant.py (set by the model's prepare)
        # YaRN scales every dimension's softmax temperature too (engine/rope.py).
        self.scale = cfg.qk_head_dim ** -0.5 * cfg.rope_scaling.softmax_mscale
        self.rope_factor = cfg.rope_scaling.cos_sin_factor

    def prepare(self, kernel: bool = False) -> None:
        """After the weights are loaded. With FP8 weights, kv_b_proj is dequantized once (the
        absorbed decode splits it into W_UK and W_UV per head, as vLLM and SGLang do); the
        others dequantize inside their products."""
        if isinstance(self.kv_b_proj, FP8Linear):
            fp8 = self.kv_b_proj
            plain = nn.Linear(fp8.in_features, fp8.out_features, bias=fp8.bias is not None,
                              device=fp8.weight.device)
            plain.weight = nn.Parameter(fp8.dequantized(), requires_grad=False)
            if fp8.bias is not None:
                plain.bias = nn.Parameter(fp8.bias.detach().float(), requires_grad=False)
            self.kv_b_proj = plain
        for m in self.modules():
            if isinstance(m, FP8Linear):
                m.prepare(kernel)

    def forward(self, x: torch.Tensor, inv_freq: torch.Tensor, kv: torch.Tensor,
                batch: AttnBatch) -> torch.Tensor:
        q_nope, q_rope = self.project_in(x, inv_freq, kv, batch)
        return self.attend(q_nope, q_rope, kv, batch)

    def project_in(self, x: torch.Tensor, inv_freq: torch.Tensor, kv: torch.Tensor,
                   batch: AttnBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections (DeepSeek's decode stage ATTN-0): the queries' no-RoPE and rotated
        parts [T, H, dn|dr]; the new tokens' [latent | k_rope] written to the pool."""
        c = self.cfg
        t, h = x.shape[0], self.n_heads
        dn, dr, r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
        dec = batch.decode_step
        if c.q_lora_rank is None:
            q = project(self.q_proj, x, dec)
        else:
            q = project(self.q_b_proj, self.q_a_layernorm(project(self.q_a_proj, x, dec)), dec)
        q = q.view(t, h, dn + dr)
        q_nope, q_rope = q[..., :dn], q[..., dn:]
        ckv = project(self.kv_a_proj_with_mqa, x, dec)
        latent = self.kv_a_layernorm(ckv[:, :r])                                  # [T, r]
        k_rope = ckv[:, r:].view(t, 1, dr)
        q_rope = apply_rope(q_rope, batch.positions, inv_freq, c.rope_interleave,
                            self.rope_factor)
        k_rope = apply_rope(k_rope, batch.positions, inv_freq, c.rope_interleave,
                            self.rope_factor)
        batch.write(kv, self.layer, torch.cat([latent, k_rope.view(t, dr)], dim=-1))
        return q_nope, q_rope

    def attend(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor,
               batch: AttnBatch) -> torch.Tensor:
        """Core attention over the pool and o_proj (ATTN-1 without the gate): [T, D]."""
        c = self.cfg
        t, h = q_nope.shape[0], self.n_heads
        dn, dr, dv, r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        dec = batch.decode_step
        dtype = q_nope.dtype
        w = self.kv_b_proj.weight.view(h, dn + dv, r)
        w_uk, w_uv = w[:, :dn], w[:, dn:]                                         # [H, dn|dv, r]
        out = torch.empty(t, h, dv, dtype=dtype, device=q_nope.device)
        if self.batch_invariant:  # every sequence alone, absorbed, in fixed tiles
            for i, (qs, _, _, ctx, _) in enumerate(batch.sequences()):
                cached = layer_pages(kv, self.layer, batch.page_tables[i]).view(-1, r + dr)
                q_lat = torch.einsum("thd,hdr->thr", q_nope[qs], w_uk)
                o_lat = invariant.attention(q_lat, q_rope[qs], cached[:ctx].to(dtype), r,
                                            batch.positions[qs], self.scale)
                out[qs] = torch.einsum("thr,hvr->thv", o_lat, w_uv)
            return self._project_out(out, t, dec)
        # Step 2: decode groups, batched, in the absorbed form over the gathered latents.
        for q_idx, tables, valid in batch.decode_groups:
            g = q_idx.numel()
            cached = layer_pages(kv, self.layer, tables.flatten()).view(g, -1, r + dr)
            cached = cached.to(dtype)
            c_ctx, kr_ctx = cached[..., :r], cached[..., r:]                      # [G, S, r|dr]
            q_lat = torch.einsum("ghd,hdr->ghr", q_nope[q_idx], w_uk)             # [G, H, r]
            scores = (q_lat @ c_ctx.transpose(1, 2)
                      + q_rope[q_idx] @ kr_ctx.transpose(1, 2)) * self.scale      # [G, H, S]
            scores = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
            o_lat = torch.softmax(scores, dim=-1).to(dtype) @ c_ctx            # [G, H, r]
            out[q_idx] = torch.einsum("ghr,hvr->ghv", o_lat, w_uv)
        if all(m is None for m in batch.masks):
            return self._project_out(out, t, dec)
        # Step 3: prefill chunks, per sequence: keys and values expanded from the latents.
        cached_all = batch.gather(kv, self.layer).to(dtype)                     # [N, r+dr]
        for qs, cs, q_len, ctx, mask in batch.sequences():
            if q_len == 1:
                continue
            c_ctx, kr_ctx = cached_all[cs, :r], cached_all[cs, r:]
            kvb = self.kv_b_proj(c_ctx).view(ctx, h, dn + dv)
            k = torch.cat([kvb[..., :dn], kr_ctx.unsqueeze(1).expand(ctx, h, dr)], dim=-1)
            v = kvb[..., dn:]
            qq = torch.cat([q_nope[qs], q_rope[qs]], dim=-1)
            o = F.scaled_dot_product_attention(
                qq.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=self.scale)
            out[qs] = o[0].transpose(0, 1)
        return self._project_out(out, t, dec)

    def _project_out(self, out: torch.Tensor, t: int, decode: bool) -> torch.Tensor:
        """[T, H, dv] -> [T, D]."""
        return project(self.o_proj, out.reshape(t, -1), decode)


class Gate(nn.Module):
    def __init__(self, cfg: DeepseekV3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts),
                                                    requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, k], weights [T, k])."""
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = scores + self.e_score_correction_bias.float() if c.topk_method == "noaux_tc" \
            else scores
        if c.n_group > 1:
            # Group-limited routing: keep the topk_group best groups (V3 ranks a group by the
            # sum of its two best experts; V2 by its best), choose experts only inside them.
            grouped = choice.view(-1, c.n_group, c.n_routed_experts // c.n_group)
            group_scores = (grouped.topk(2, dim=-1)[0].sum(-1) if c.topk_method == "noaux_tc"
                            else grouped.max(-1).values)
            keep = torch.zeros_like(group_scores).scatter_(
                1, torch.topk(group_scores, c.topk_group, dim=-1, sorted=False)[1], 1)
            mask = keep.unsqueeze(-1).expand_as(grouped).reshape(choice.shape).bool()
            choice = choice.masked_fill(~mask, float("-inf"))
        idx = torch.topk(choice, c.num_experts_per_tok, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if c.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * c.routed_scaling_factor


class MoE(nn.Module):
    """Routed experts (a dict by logical expert id, as checkpoints name them: all of them in one
    process, the ones its slots hold on a rank of an EP group) and the shared experts."""

    def __init__(self, cfg: DeepseekV3Config, layer: int,
                 held: Sequence[int] | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.gate = Gate(cfg)
        ids = range(cfg.n_routed_experts) if held is None else held
        self.experts = nn.ModuleDict({str(e): MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                      for e in ids})
        self.shared_experts = (MLP(cfg.hidden_size,
                                   cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.ep: ExpertParallel | None = None  # set on a rank of an EP group

    def expert(self, e: int) -> MLP:
        return cast(MLP, self.experts[str(e)])

    def route(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's experts and weights for x [T, D]; counts the choices per expert."""
        idx, w = self.gate(x)
        counts += torch.bincount(idx.flatten(), minlength=counts.numel())
        return idx, w

    def forward(self, x: torch.Tensor, counts: torch.Tensor, decode: bool) -> torch.Tensor:
        idx, w = self.route(x, counts)
        if self.ep is not None:  # across the group: every rank calls this, tokens or not
            out = self.ep.routed(self.layer, self.expert, x, idx, w)
        else:
            out = torch.zeros_like(x)
            for e in torch.unique(idx).tolist():
                tok, pos = torch.where(idx == e)
                y = self.expert(e)(x[tok], decode) * w[tok, pos, None].to(x.dtype)
                out.index_add_(0, tok, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, decode)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, layer: int,
                 held: Sequence[int] | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MoE | MLP = (MoE(cfg, layer, held) if layer >= cfg.first_k_dense_replace
                               else MLP(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, h: torch.Tensor, inv_freq: torch.Tensor, kv: torch.Tensor,
                batch: AttnBatch, counts: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), inv_freq, kv, batch)
        x = self.post_attention_layernorm(h)
        mlp = self.mlp
        dec = batch.decode_step
        out: torch.Tensor = h + (mlp(x, counts[self.layer], dec) if isinstance(mlp, MoE)
                                 else mlp(x, dec))
        return out


class DeepseekBody(nn.Module):
    def __init__(self, cfg: DeepseekV3Config,
                 held: Mapping[int, Sequence[int]] | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, None if held is None else held.get(i))
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, cfg: DeepseekV3Config,
                 held: Mapping[int, Sequence[int]] | None = None) -> None:
        """`held`: on a rank of an EP group, the logical experts each layer holds (its slots';
        engine/ep), None for all of them."""
        super().__init__()
        self.config = cfg
        self.model = DeepseekBody(cfg, held)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta,
                                                       cfg.rope_scaling), persistent=False)
        # Tokens routed to each expert, per layer: the expert-parallel balancer's input.
        self.register_buffer("expert_counts", torch.zeros(
            cfg.num_hidden_layers, cfg.n_routed_experts, dtype=torch.int64), persistent=False)
        self.head_product: FastLinear | None = None
        self.backend = Backend("torch")

    def prepare(self, backend: Backend) -> Backend:
        """Called once the weights are in place on their device (see linear.py); returns the
        backend the model runs (its C path: the FP8 products of decode steps)."""
        has_fp8 = any(isinstance(m, FP8Linear) for m in self.modules())
        if backend.block_products and not has_fp8:
            backend = backend.narrowed("onednn", "no FP8 weights: DeepSeek's C path is its FP8 "
                                       "products")
        for layer in cast(list[DecoderLayer], list(self.model.layers)):
            layer.self_attn.prepare(kernel=backend.block_products)
            layer.self_attn.batch_invariant = backend.batch_invariant
            mlp = layer.mlp
            parts = ([*cast(list[MLP], list(mlp.experts.values())), mlp.shared_experts]
                     if isinstance(mlp, MoE) else [mlp])
            for m in parts:
                if m is not None:
                    m.prepare(backend)
        self.head_product = FastLinear(self.lm_head.weight, pack=backend.pack_weights)
        self.backend = backend
        return backend

    def reset_buffers(self, device: str | torch.device) -> None:
        c = self.config
        self.inv_freq = rope_inv_freq(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling).to(device)
        self.expert_counts = torch.zeros(c.num_hidden_layers, c.n_routed_experts,
                                         dtype=torch.int64, device=device)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in cast(list[DecoderLayer], list(self.model.layers))
                if isinstance(layer.mlp, MoE)]

    def join_group(self, ep: ExpertParallel) -> None:
        """Runs every MoE layer across an EP group (engine/ep): this rank holds only its
        slots' experts (built with `held`)."""
        for moe in self.moe_layers():
            need = set(ep.slots.held_at(moe.layer, ep.rank))
            have = {int(e) for e in moe.experts}
            if not need <= have:
                raise ValueError(f"layer {moe.layer}: rank {ep.rank}'s slots need experts "
                                 f"{sorted(need - have)} it does not hold")
            moe.ep = ep

    @property
    def ep(self) -> ExpertParallel | None:
        moe = self.moe_layers()
        return moe[0].ep if moe else None

    @torch.inference_mode()
    def idle_step(self) -> None:
        """A step of an EP group with no tokens on this rank: every MoE layer's exchanges, in
        layer order, with nothing of its own (its experts compute the others' rows); two empty
        micro-batches when the group overlaps this step."""
        c = self.config
        ep = self.ep
        assert ep is not None, "idle steps are for ranks of an EP group"
        empty = torch.empty(0, c.hidden_size, dtype=self.lm_head.weight.dtype,
                            device=self.lm_head.weight.device)
        if ep.overlap:
            from pdserve.engine.ep import overlap  # (it imports this module)

            overlap.idle(self, empty, ep)
            return
        no_idx = torch.empty(0, c.num_experts_per_tok, dtype=torch.long, device=empty.device)
        for moe in self.moe_layers():
            ep.routed(moe.layer, moe.expert, empty, no_idx,
                      torch.empty(0, c.num_experts_per_tok, device=empty.device))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, kv: torch.Tensor, batch: AttnBatch,
                layers: tuple[int, int] | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """As LlamaForCausalLM.forward, pipeline stages (`layers`, `hidden`) included."""
        lo, hi = layers or (0, len(self.model.layers))
        h = self.model.embed_tokens(input_ids) if lo == 0 else hidden
        assert h is not None, "a stage after the first needs the previous stage's hidden states"
        ep = self.ep
        if ep is not None and ep.overlap:  # two micro-batches (engine/ep/tbo.py)
            assert (lo, hi) == (0, len(self.model.layers)), "EP ranks are never pipeline stages"
            from pdserve.engine.ep import overlap  # (it imports this module)

            h = overlap.forward(self, h, kv, batch, ep)
        else:
            for i in range(lo, hi):
                if batch.before_layer is not None:
                    batch.before_layer(i)
                h = self.model.layers[i](h, self.inv_freq, kv, batch, self.expert_counts)
        if hi < len(self.model.layers):
            return h
        h = self.model.norm(h[batch.last_indices])
        logits: torch.Tensor = (self.head_product(h) if self.head_product is not None
                                else self.lm_head(h))
        return logits.float()
