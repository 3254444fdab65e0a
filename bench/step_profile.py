"""Where a decode step's time goes, on the CPU (the fused decode layers: engine/cpu_kernels.py).

For each batch size: `--rounds` decodes of `--new-tokens` tokens after a warm-up (the prompts
prefilled first, untimed, as bench/bench_engine.py's decode rows), then per step, in
milliseconds:
- the whole step (LLMEngine.step);
- the 30 (or however many) fused layers, and within them each part of a layer, from the
  kernel's own timers (cpu_kernels.layer_timers: wall time per part, summed over the layers);
- the head (the logits, or the greedy head's screen and exact rows);
- everything else: the batch's tables, the embedding, RoPE's angles, the final norm, sampling,
  the engine's bookkeeping.

Usage: python bench/step_profile.py [--batches 1,16] [--new-tokens 32] [--rounds 5]
                                    [--kv-dtype float32|float16]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_engine import ours_decode, prompts
from common import machine, table

from pdserve.engine import cpu_kernels
from pdserve.engine.loader import default_model_path, load_model


class _Timed:
    """Wall time of calls to obj.name, summed, while installed."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name, self.seconds = obj, name, 0.0
        self.inner: Callable[..., Any] = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return self.inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(obj, name, timed)

    def remove(self) -> None:
        setattr(self.obj, self.name, self.inner)


def profile(loaded: Any, batch: int, new: int, rounds: int, prompt_tokens: int) -> dict[str, float]:
    """Milliseconds per decode step of each part, over `rounds` decodes of `new` tokens."""
    model = loaded.model
    if model.fused_decode is None:
        raise SystemExit("the model has no fused decode layers here (backend cpu-fused needed)")
    ps = prompts(batch, prompt_tokens)
    ours_decode(loaded, ps, new)  # warm-up: the engine, its pool, the kernels
    cpu_kernels.layer_timers(True)
    layers = _Timed(model.fused_decode, "run")
    head = _Timed(model, "_logits")
    try:
        total = sum(ours_decode(loaded, ps, new) for _ in range(rounds))
    finally:
        layers.remove()
        head.remove()
        parts = cpu_kernels.layer_timers(False)
    steps = rounds * new
    out = {"whole step": total, "fused layers": layers.seconds}
    out.update({f"  {name}": s for name, s in parts.items()})
    out["head"] = head.seconds
    out["everything else"] = total - layers.seconds - head.seconds
    return {k: v / steps * 1e3 for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kv-dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args()
    loaded = load_model(default_model_path(), kv_dtype=getattr(torch, args.kv_dtype))
    batches = [int(b) for b in args.batches.split(",")]
    print(f"machine: {machine()}")
    print(f"settings: {default_model_path().name}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens x {args.rounds} rounds, greedy, KV cache "
          f"{args.kv_dtype}, backend {loaded.backend.name}", flush=True)
    per = {b: profile(loaded, b, args.new_tokens, args.rounds, args.prompt_tokens)
           for b in batches}
    rows = [(part, *(f"{per[b][part]:.3f}" for b in batches)) for part in per[batches[0]]]
    print(table(rows, ("ms per decode step", *(f"batch {b}" for b in batches))))


if __name__ == "__main__":
    main()
