"""Two-batch overlap (TBO): a step's tokens in two micro-batches, one's dispatch or combine in
flight while the other computes (DeepSeek's inference system, Day 6; SGLang's operation lists
with yield points; research notes in shared/research/ep-tbo.md §2, §6.4).

- `split`: the cut between the micro-batches balances attention work (a token at position p
  attends p + 1 keys), between the tokens of one flat batch: a prompt's chunk may be cut, its
  earlier tokens in the first micro-batch, which runs each layer's attention first, so the
  second reads the KV the first just wrote. A decode batch's tokens are one per sequence, so
  the cut falls between sequences, halving the summed KV length.
- A MoE layer is a list of operations; `|` marks where a micro-batch yields to the other
  (`PREFILL_OPS`, `DECODE_OPS`). `interleave` runs two such lists, the second `delta` stages
  behind the first: stage k of the second runs right after stage k + delta of the first.
  `_a` operations start a transfer on the micro-batch's own communicator, `_b` wait for it.

Prefill (delta 0), per layer, three stages, the last merging with the next layer's first:
  [attn dispatch_a] | [dispatch_b experts combine_a] | [shared combine_b]
In steady state the compute runs ATTN(1st) SHARED(2nd) ATTN(2nd) MLP(1st) MLP(2nd) SHARED(1st)
while COMBINE(2nd) DISPATCH(1st) DISPATCH(2nd) COMBINE(1st) fly: DeepSeek's prefill figure,
whose B1 is the micro-batch that leads (our first).

Decode (delta 2), DeepSeek's five stages, attention split into its projections (ATTN-0) and
the core attention with o_proj and the gate (ATTN-1):
  [attn0] | [attn1 dispatch_a] | [shared] | [dispatch_b experts combine_a] | [combine_b]
In steady state: SHARED(1st) ATTN-0(2nd) MLP(1st) ATTN-1(2nd) ATTN-0(1st) SHARED(2nd)
ATTN-1(1st) MLP(2nd); every transfer flies over at least one stage of the other micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttnBatch

YIELD = "|"
PREFILL_OPS = ("attn", "dispatch_a", YIELD, "dispatch_b", "experts", "combine_a", YIELD,
               "shared", "combine_b")
DECODE_OPS = ("attn0", YIELD, "attn1", "dispatch_a", YIELD, "shared", YIELD, "dispatch_b",
              "experts", "combine_a", YIELD, "combine_b")
PREFILL_DELTA, DECODE_DELTA = 0, 2

Op = tuple[str, int]  # (operation, layer)


@dataclass(frozen=True)
class Schedule:
    ops: tuple[str, ...]
    delta: int


PREFILL = Schedule(PREFILL_OPS, PREFILL_DELTA)
DECODE = Schedule(DECODE_OPS, DECODE_DELTA)


def program(schedule: Schedule, dense_layers: Sequence[int],
            moe_layers: Sequence[int]) -> list[Op]:
    """A step's operations for one micro-batch: the dense layers whole ("dense", no yield: no
    exchange to hide), then each MoE layer's list."""
    ops: list[Op] = [("dense", layer) for layer in dense_layers]
    for layer in moe_layers:
        ops += [(op, -1 if op == YIELD else layer) for op in schedule.ops]
    return ops


def stages(ops: Sequence[Op], run: Callable[[str, int], None]) -> Iterator[None]:
    """Runs `ops` in order, pausing at each yield point."""
    for op, layer in ops:
        if op == YIELD:
            yield
        else:
            run(op, layer)


def interleave(first: Iterator[None], second: Iterator[None], delta: int) -> None:
    """Runs two micro-batches' stages: `delta` stages of the first, then one of each in turn,
    the first before the second, until both are done."""
    done = [False, False]

    def step(i: int, it: Iterator[None]) -> None:
        if not done[i]:
            done[i] = next(it, StopIteration) is StopIteration

    for _ in range(delta):
        step(0, first)
    while not all(done):
        step(0, first)
        step(1, second)


def simulate(durations: Sequence[Sequence[float]], ops: Sequence[Op], delta: int,
             delay_s: float) -> float:
    """The timing model of `interleave`: how long two micro-batches take on one compute thread
    when every transfer lands `delay_s` after its `_a` operation ends and nothing else is
    slow. `durations[mb]`: the compute time of each non-yield operation of `ops`, in order
    (measured with instant transfers). Transfers fly on their own, so the result is what the
    schedule would take with perfect communication: the best an overlapped step can do."""
    clock = 0.0
    lands: dict[tuple[int, str, int], float] = {}
    cursor = [0, 0]

    def run(mb: int, op: str, layer: int) -> None:
        nonlocal clock
        if op.endswith("_b"):
            clock = max(clock, lands.pop((mb, op[:-2], layer)))
        clock += durations[mb][cursor[mb]]
        cursor[mb] += 1
        if op.endswith("_a"):
            lands[(mb, op[:-2], layer)] = clock + delay_s

    def executor(mb: int) -> Iterator[None]:
        return stages(ops, lambda op, layer: run(mb, op, layer))

    interleave(executor(0), executor(1), delta)
    return clock


def cut(positions: torch.Tensor) -> int:
    """Where the flat tokens split: the cut that leaves the attention work (position + 1 per
    token) on its two sides closest to equal, with at least one token on each (len >= 2)."""
    work = torch.cumsum(positions.to(torch.float64) + 1, 0).tolist()
    half = work[-1] / 2
    i = int(torch.searchsorted(torch.tensor(work, dtype=torch.float64), half))
    before = work[i - 1] if i else 0.0  # the work of tokens [:i]; tokens [:i + 1] have work[i]
    at = i + 1 if work[i] - half <= half - before else i
    return min(max(at, 1), len(work) - 1)


def split(batch: AttnBatch, at: int) -> tuple[AttnBatch, AttnBatch]:
    """The two micro-batches of `batch` cut before flat token `at`: the first keeps the
    sequences (and the head of a chunk) before it, the second the rest. Their hidden states,
    concatenated, are the batch's."""
    parts: tuple[tuple[list[int], list[int], list[list[int]]], ...] = (([], [], []), ([], [], []))
    flat = 0
    for q, ctx, table in zip(batch.q_lens, batch.ctx_lens, batch.page_tables):
        pages = table.tolist()
        head = min(max(at - flat, 0), q)  # this sequence's tokens before the cut
        if head:
            parts[0][0].append(head)
            parts[0][1].append(ctx - q + head)
            parts[0][2].append(pages)
        if q - head:
            parts[1][0].append(q - head)
            parts[1][1].append(ctx)
            parts[1][2].append(pages)
        flat += q
    a, b = (AttnBatch.build(q_lens, ctx_lens, tables, batch.block_tokens,
                            batch.positions.device, decode_step=batch.decode_step)
            for q_lens, ctx_lens, tables in parts)
    a.before_layer = b.before_layer = batch.before_layer
    return a, b
