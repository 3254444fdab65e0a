"""Two-batch overlap (engine/ep/tbo.py) and FP8 dispatch on this machine:

1. EP 2 over gloo (one process per rank, one thread each): one step's time with overlap and
   without, prefill steps of several tokens per rank and decode steps of several sequences per
   rank, with the share of the one-batch step spent waiting for dispatch and combine beside it
   (gloo on 2 cores copies through the same cores that compute: it hides only part of an
   exchange, shared/research/ep-tbo.md §1).
2. One rank whose transfers take d ms each (comm.DelayedLoopback), where the best is known:
   the one-batch step takes C + n·d (n transfers); overlapped, each micro-batch's own
   transfers stay on its own path (its half of the compute and all n of them), so the best is
   max(C', C'/2 + n·d), C' the split step's compute. Goal: >= 0.8 of that saving.
3. Dispatch bytes per step, FP8 against bf16 (goal <= 0.53), and how far FP8 dispatch moves
   the logits from the exact run.

The model: a random DeepSeek-V3 of 7 layers (6 MoE, 16 experts, top 4, hidden 256).

Usage: python bench/bench_tbo.py [--reps 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, table

from pdserve.engine.ep import tbo
from tests.engine.ep_ranks import collect, spawn
from tests.engine.random_models import make_deepseek
from tests.engine.test_tbo import WIDE, OneRank

LAYERS, EXPERTS = 7, 16
PREFILL_TOKENS = (128, 512, 1024)
DECODE_SEQS = (16, 64, 256)
DECODE_CTX = 128


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def gloo_rank(rank: int, init: str, model_dir: str, reps: int, out: Any) -> None:
    import torch.distributed as dist

    from pdserve.engine.ep.comm import EPComm
    from pdserve.engine.ep.moe import ExpertParallel
    from pdserve.engine.ep.placement import SlotMap
    from pdserve.engine.kv_pool import KVPool
    from pdserve.engine.loader import load_model
    from pdserve.engine.runner import ModelRunner

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        comm = EPComm()
        ep = ExpertParallel(comm, SlotMap.default(list(range(1, LAYERS)), LAYERS, EXPERTS, 2, 0),
                            EPComm(dist.new_group([0, 1]), comm.stats))
        loaded = load_model(model_dir, block_tokens=16, ep=ep)
        pages = max(PREFILL_TOKENS) // 16 + 1
        pool = KVPool(loaded.layout, max(pages, max(DECODE_SEQS) * DECODE_CTX // 16))
        runner = ModelRunner(loaded.model, pool, prefill_chunk_tokens=max(PREFILL_TOKENS))
        g = torch.Generator().manual_seed(rank)
        results = []

        def timed(kind: str, size: int, overlap: bool, step: Any) -> None:
            ep.overlap, ep.decode_products = overlap, kind == "decode"
            times, waits = [], []
            for i in range(reps + 1):
                dist.barrier()
                w0, t0 = ep.stats.wait_s, time.perf_counter()
                step()
                dist.barrier()
                if i:  # the first is a warm-up
                    times.append(time.perf_counter() - t0)
                    waits.append(ep.stats.wait_s - w0)
            results.append((kind, size, overlap, _median(times), _median(waits)))

        for tokens in PREFILL_TOKENS:
            ids = torch.randint(0, 320, (tokens,), generator=g).tolist()
            for overlap in (False, True):
                timed("prefill", tokens, overlap, lambda ids=ids: runner.forward_chunks(
                    [(ids, 0, list(range(len(ids) // 16 + 1)))]))
        per_seq = DECODE_CTX // 16
        for seqs in DECODE_SEQS:
            last = torch.randint(0, 320, (seqs,), generator=g).tolist()
            tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
            for overlap in (False, True):
                timed("decode", seqs, overlap, lambda last=last, tables=tables: runner.decode(
                    last, [DECODE_CTX] * len(last), tables))
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


def gloo_part(model_dir: Path, tmp: Path, reps: int) -> None:
    init = f"file://{tmp / 'rendezvous'}"
    got = dict(collect(*spawn(gloo_rank, 2, lambda r: (r, init, str(model_dir), reps)), 1800))
    res: dict[tuple[str, int, bool], tuple[float, float]] = {}
    for kind, size, overlap, step, wait in got[0]:
        other = next(r for r in got[1] if r[:3] == (kind, size, overlap))
        res[(kind, size, overlap)] = (max(step, other[3]), (wait + other[4]) / 2)
    rows = []
    for kind, sizes, unit in (("prefill", PREFILL_TOKENS, "tokens"),
                              ("decode", DECODE_SEQS, "sequences")):
        for size in sizes:
            off, off_wait = res[(kind, size, False)]
            on, on_wait = res[(kind, size, True)]
            rows.append((f"{kind}, {size} {unit} per rank", f"{off * 1e3:.1f}",
                         f"{on * 1e3:.1f}", f"{on / off:.2f}", f"{off_wait / off:.0%}",
                         f"{on_wait / on:.0%}"))
    print("## EP 2 over gloo: one step, overlap against one batch (max over the ranks, "
          f"median of {reps})\n")
    print(table(rows, ("step", "one batch ms", "overlapped ms", "overlapped / one batch",
                       "waiting, one batch", "waiting, overlapped")))
    print("\n(waiting: the share of the step spent in dispatch and combine waits; decode "
          f"steps at {DECODE_CTX} tokens of context each.)\n")


def op_durations(rank: OneRank, reps: int) -> list[list[float]]:
    """Each operation's compute time per micro-batch, in program order (median of `reps`
    overlapped steps with instant transfers)."""
    runs = []
    for _ in range(reps):
        rank.ep.trace = []
        rank.step_s(True, 0.0)
        runs.append(rank.ep.trace)
    rank.ep.trace = None
    per_mb: list[list[float]] = [[], []]
    for i, (_, mb, _) in enumerate(runs[0]):
        per_mb[mb].append(_median([run[i][2] for run in runs]))
    return per_mb


def delayed_part(model_dir: Path, reps: int) -> None:
    n = 2 * (LAYERS - 1)
    ops = tbo.program(tbo.PREFILL, [0], list(range(1, LAYERS)))
    rows = []
    fractions = []
    for tokens in PREFILL_TOKENS:
        rank = OneRank(model_dir, tokens, LAYERS, EXPERTS)
        c, c_split = rank.medians([(False, 0.0), (True, 0.0)], reps)
        durations = op_durations(rank, reps)
        for share in (0.5, 1.0):  # the transfers: half the compute, or as much
            d = share * c / n
            off, on = rank.medians([(False, d), (True, d)], reps)
            best = tbo.simulate(durations, ops, tbo.PREFILL.delta, d)
            frac = (off - on) / (off - best) if off > best else float("nan")
            fractions.append(frac)
            rows.append((tokens, f"{c * 1e3:.1f} / {c_split * 1e3:.1f}", f"{d * 1e3:.2f}",
                         f"{off * 1e3:.1f}", f"{on * 1e3:.1f}", f"{best * 1e3:.1f}",
                         f"{max(c_split, c_split / 2 + n * d) * 1e3:.1f}", f"{frac:.2f}"))
    print(f"## One rank, {n} transfers per step each taking d ms (DelayedLoopback), prefill "
          f"steps, median of {reps} in interleaved rounds\n")
    print(table(rows, ("tokens", "compute C / split C' ms", "d ms", "one batch ms",
                       "overlapped ms", "schedule's best ms", "bound ms",
                       "share of the best saving")))
    print("\n(schedule's best: the prefill schedule's timing model (tbo.simulate) over each "
          "operation's measured compute, transfers landing d after they start; bound: "
          "max(C', C'/2 + n·d), each micro-batch's own transfers on its own path.)")
    print(f"share of the best saving: min {min(fractions):.2f}, mean "
          f"{sum(fractions) / len(fractions):.2f} (goal >= 0.8)\n")


def bytes_part(model_dir: Path) -> None:
    from pdserve.engine.ep.comm import DelayedLoopback
    from pdserve.engine.ep.moe import ExpertParallel
    from pdserve.engine.ep.placement import SlotMap
    from pdserve.engine.kv_pool import KVPool
    from pdserve.engine.loader import load_model
    from pdserve.engine.runner import ModelRunner

    ids = torch.randint(0, 320, (256,), generator=torch.Generator().manual_seed(3)).tolist()
    got = {}
    for dtype in (None, "bf16", "fp8"):
        ep = ExpertParallel(DelayedLoopback(), SlotMap.default(list(range(1, LAYERS)), LAYERS,
                                                               EXPERTS, 1, 0),
                            dispatch_dtype=dtype)
        loaded = load_model(model_dir, block_tokens=16, ep=ep)
        runner = ModelRunner(loaded.model, KVPool(loaded.layout, 17), prefill_chunk_tokens=256)
        logits = runner.forward_chunks([(ids, 0, list(range(17)))])
        got[dtype] = (ep.stats.dispatch_bytes, ep.stats.sent_rows, logits)
    exact = got[None][2]
    rows = []
    for dtype in (None, "bf16", "fp8"):
        sent, nrows, logits = got[dtype]
        rel = ((logits - exact).norm() / exact.norm()).item()
        rows.append((dtype or "model (fp32)", f"{sent / 1024:.0f}", f"{sent / nrows:.0f}",
                     f"{sent / got['bf16'][0]:.3f}", f"{rel:.2%}"))
    print("## Dispatch bytes, one prefill step of 256 tokens (hidden 256)\n")
    print(table(rows, ("dispatch dtype", "KiB dispatched", "bytes per row", "/ bf16",
                       "logits relative error vs exact")))
    print()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# Two-batch overlap and FP8 dispatch\n{machine()}\n")
    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d) / "wide"
        torch.manual_seed(8)
        _, model = make_deepseek(model_dir, **WIDE)
        model.save_pretrained(model_dir)
        delayed_part(model_dir, args.reps)
        bytes_part(model_dir)
        gloo_part(model_dir, Path(d), args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
