"""The model's side of two-batch overlap (tbo.py): a DeepSeek decoder layer's work as
operations on one micro-batch (the same arithmetic as `DecoderLayer.forward`, in pieces), and a
step of the whole model over two micro-batches interleaved by the step's schedule."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from pdserve.engine.attention import AttnBatch
from pdserve.engine.deepseek import DecoderLayer, DeepseekV3ForCausalLM, MoE
from pdserve.engine.ep import tbo
from pdserve.engine.ep.moe import ExpertParallel, Routed


@dataclass
class MicroBatch:
    """One micro-batch of an overlapped step, from operation to operation."""

    index: int                 # 0 leads, 1 follows (tbo.py)
    h: torch.Tensor            # hidden states [t, D]
    batch: AttnBatch | None    # None: an idle rank's empty half
    q: tuple[torch.Tensor, torch.Tensor] | None = None  # ATTN-0's queries
    x: torch.Tensor | None = None                       # the MoE's input
    idx: torch.Tensor | None = None                     # the gate's experts [t, K]
    w: torch.Tensor | None = None                       # and their weights
    routed: Routed | None = None
    shared: torch.Tensor | None = None


def forward(model: DeepseekV3ForCausalLM, h: torch.Tensor, kv: torch.Tensor, batch: AttnBatch,
            ep: ExpertParallel) -> torch.Tensor:
    """Every layer over `batch` (embedded: h [T, D]) in two micro-batches cut where the
    attention work halves; the hidden states after the last layer [T, D]."""
    at = tbo.cut(batch.positions)
    first, second = tbo.split(batch, at)
    mbs = [MicroBatch(0, h[:at], first), MicroBatch(1, h[at:], second)]
    run(model, mbs, ep, kv)
    return torch.cat([mbs[0].h, mbs[1].h])


def idle(model: DeepseekV3ForCausalLM, empty: torch.Tensor, ep: ExpertParallel) -> None:
    """An idle rank's overlapped step: two empty halves, joining every exchange."""
    run(model, [MicroBatch(0, empty, None), MicroBatch(1, empty, None)], ep,
        torch.empty(0, device=empty.device))


def run(model: DeepseekV3ForCausalLM, mbs: list[MicroBatch], ep: ExpertParallel,
        kv: torch.Tensor) -> None:
    """Every layer over two micro-batches, interleaved by the step's schedule (a decode
    step's when the whole group decodes)."""
    layers = cast(list[DecoderLayer], list(model.model.layers))
    schedule = tbo.DECODE if ep.decode_products else tbo.PREFILL
    ops = tbo.program(schedule, [d.layer for d in layers if not isinstance(d.mlp, MoE)],
                      [d.layer for d in layers if isinstance(d.mlp, MoE)])
    trace = ep.trace

    def runner(mb: MicroBatch) -> Callable[[str, int], None]:
        def one(op: str, layer: int) -> None:
            if trace is None:
                run_op(layers[layer], op, mb, model.inv_freq, kv, model.expert_counts)
                return
            t0 = time.perf_counter()
            run_op(layers[layer], op, mb, model.inv_freq, kv, model.expert_counts)
            trace.append((op, mb.index, time.perf_counter() - t0))
        return one

    tbo.interleave(tbo.stages(ops, runner(mbs[0])), tbo.stages(ops, runner(mbs[1])),
                   schedule.delta)


def run_op(layer: DecoderLayer, op: str, mb: MicroBatch, inv_freq: torch.Tensor,
           kv: torch.Tensor, counts: torch.Tensor) -> None:
    """One operation of `layer` for micro-batch `mb`. An idle rank's empty half (no batch)
    joins the exchanges only."""
    batch = mb.batch
    if op == "dense":
        if batch is not None:
            if batch.before_layer is not None:
                batch.before_layer(layer.layer)
            mb.h = layer(mb.h, inv_freq, kv, batch, counts)
        return
    if op in ("attn", "attn0") and batch is not None:
        if batch.before_layer is not None:
            batch.before_layer(layer.layer)
        mb.q = layer.self_attn.project_in(layer.input_layernorm(mb.h), inv_freq, kv, batch)
    moe = cast(MoE, layer.mlp)
    if op in ("attn", "attn1"):
        if batch is not None:
            assert mb.q is not None
            mb.h = mb.h + layer.self_attn.attend(*mb.q, kv, batch)
            mb.x = layer.post_attention_layernorm(mb.h)
            mb.idx, mb.w = moe.route(mb.x, counts[layer.layer])
        else:
            mb.x = mb.h
            mb.idx = torch.empty(0, moe.gate.cfg.num_experts_per_tok, dtype=torch.long,
                                 device=mb.h.device)
            mb.w = torch.empty(mb.idx.shape, device=mb.h.device)
        return
    if op == "attn0":
        return
    ep = moe.ep
    assert ep is not None, "micro-batch MoE operations are for ranks of an EP group"
    if op == "dispatch_a":
        assert mb.x is not None and mb.idx is not None and mb.w is not None
        mb.routed = ep.dispatch_start(layer.layer, mb.x, mb.idx, mb.w, mb.index)
        return
    if op == "shared":
        mb.shared = None
        if moe.shared_experts is not None and batch is not None:
            assert mb.x is not None
            mb.shared = moe.shared_experts(mb.x, batch.decode_step)
        return
    r = mb.routed
    assert r is not None, f"{op} before dispatch_a"
    if op == "dispatch_b":
        ep.dispatch_wait(r)
    elif op == "experts":
        ep.compute(r, moe.expert)
    elif op == "combine_a":
        ep.combine_start(r)
    elif op == "combine_b":
        out = ep.combine_wait(r)
        if mb.shared is not None:  # as MoE.forward: routed + shared, then the residual
            out = out + mb.shared
        mb.h = mb.h + out
        mb.routed = mb.q = mb.x = mb.shared = None
    else:
        raise ValueError(f"unknown micro-batch operation {op!r}")
