"""Expert parallelism on this machine (torch.distributed, gloo, one process per rank):

1. Live EPLB on a skewed router: EP 4, a small random V3 with 32 routed experts and 8
   redundant slots, the selection bias of four experts per layer raised so that they take
   most tokens; rows each rank's experts received per window
   of `--interval` steps, max/mean over the ranks, in the window before the first rebalance and
   in the ones after (goal: <= 1.15 after), with each replica choice (every replica in turn,
   the split EPLB's placement assumes; or the own rank's replica first, which saves transfers
   but loads the ranks holding hot replicas more). Drawn as a PNG (`--plot`, the first).
2. EP 2 against one process on the same model and requests, prefill-heavy and decode-heavy:
   tokens/s, and what dispatch/combine cost (seconds waiting for them, bytes sent) per step.
   Each rank runs one thread; the single process runs two (the machine's two cores).

Usage: python bench/bench_ep.py [--plot ep_balance.png] [--interval 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, table

from tests.engine.random_models import make_skewed_deepseek
from tests.engine.test_ep import run_group, single_process

VOCAB = 320
EXPERTS, REDUNDANT, HOT = 32, 8, (0, 5, 9, 20)  # 40 slots, 10 a rank


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fresh(tmp: Path) -> Path:
    """A new directory for a group's rendezvous file (never reused)."""
    return Path(tempfile.mkdtemp(dir=tmp))


def windows(received_at: list[int], total: int) -> list[int]:
    marks = [0, *received_at, total]
    return [b - a for a, b in zip(marks, marks[1:])]


def eplb_part(tmp: Path, interval: int, plot: Path | None, local_first: bool) -> None:
    ckpt = make_skewed_deepseek(tmp / f"skewed-{local_first}", hot=HOT,
                                n_routed_experts=EXPERTS)
    requests = {r: {f"r{r}-{i}": (prompt(100 * r + i, 24 + 8 * i), i) for i in range(8)}
                for r in range(4)}
    got = run_group(fresh(tmp), ckpt, world=4, redundant=REDUNDANT, requests=requests,
                    eplb_interval=interval, max_tokens=64, local_first=local_first)
    per_rank = [windows(got[r][1]["received_at"], got[r][1]["received"]) for r in range(4)]
    n = min(len(w) for w in per_rank)
    rows = []
    ratios = []
    for i in range(n - 1):  # the last window is a partial one
        loads = [per_rank[r][i] for r in range(4)]
        mean = sum(loads) / 4
        ratio = max(loads) / mean if mean else 1.0
        ratios.append(ratio)
        rows.append((f"steps {i * interval}-{(i + 1) * interval}",
                     "before" if i == 0 else "after", " / ".join(map(str, loads)),
                     f"{ratio:.2f}"))
    rule = "own rank's replica first" if local_first else "replicas in turn"
    print(f"## Live EPLB, EP 4, {EXPERTS} experts + {REDUNDANT} redundant slots, router skewed "
          f"towards experts {HOT}; replica choice: {rule}\n")
    print(table(rows, ("window", "placement", "rows received per rank", "max / mean")))
    after = ratios[1:]
    if after:
        print(f"\nbefore: {ratios[0]:.2f}; after (mean of {len(after)} windows): "
              f"{sum(after) / len(after):.2f}; rebalances: {got[0][1]['rebalances']}\n")
    if plot and n > 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.38
        for j, (label, i) in enumerate((("before (default placement)", 0),
                                        ("after the first rebalance", 1))):
            loads = [per_rank[r][i] for r in range(4)]
            mean = sum(loads) / 4 or 1
            ax.bar([r + (j - 0.5) * width for r in range(4)], [x / mean for x in loads],
                   width, label=f"{label}: max/mean {ratios[i]:.2f}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(4), [f"rank {r}" for r in range(4)])
        ax.set_ylabel(f"rows received / mean, {interval} steps")
        ax.set_title("Expert-parallel load per rank, live EPLB")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"plot written to {plot}\n")


def throughput_part(tmp: Path) -> None:
    shape = dict(hidden_size=512, moe_intermediate_size=256, intermediate_size=1024,
                 n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                 kv_lora_rank=128, q_lora_rank=256, qk_nope_head_dim=32, qk_rope_head_dim=16,
                 v_head_dim=32, num_attention_heads=8)
    ckpt = make_skewed_deepseek(tmp / "mid", **shape)
    rows = []
    for name, n_prompt, new in (("prefill-heavy", 256, 2), ("decode-heavy", 16, 32)):
        requests = {r: {f"{name}-{r}-{i}": (prompt(10 * r + i, n_prompt), 0) for i in range(4)}
                    for r in range(2)}
        t0 = time.perf_counter()
        single_process(ckpt, requests, new)
        one = time.perf_counter() - t0
        got = run_group(fresh(tmp), ckpt, world=2, redundant=0, requests=requests,
                        max_tokens=new)
        ep = max(got[r][1]["seconds"] for r in range(2))
        steps = got[0][1]["steps"]
        tokens = sum(n_prompt + new for per in requests.values() for _ in per)
        wait = sum(got[r][1]["wait_s"] for r in range(2)) / 2
        sent = sum(got[r][1]["sent_bytes"] for r in range(2)) / 2
        rows.append((name, f"{tokens / ep:.0f}", f"{tokens / one:.0f}", f"{one / ep:.2f}x",
                     f"{wait / steps * 1e3:.1f} ms ({wait / ep:.0%})",
                     f"{sent / steps / 1024:.0f} KiB"))
    print("## EP 2 against one process (prompt + generated tokens per second)\n")
    print(table(rows, ("load", "EP 2", "one process", "ratio",
                       "dispatch/combine wait per step", "sent per rank per step")))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", type=int, default=8, help="EPLB interval in steps")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the per-rank load")
    args = ap.parse_args()
    print(f"# Expert parallelism over gloo\n{machine()}\n")
    with tempfile.TemporaryDirectory() as d:
        for local_first in (False, True):
            eplb_part(Path(d), args.interval, None if local_first else args.plot, local_first)
        throughput_part(Path(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
