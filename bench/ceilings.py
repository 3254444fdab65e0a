"""What this machine allows a decode step, measured in the same run as the engine
(bench/bench_engine.py): the weight bytes a step reads against a streaming read's rate, and the
products' fused multiply-adds against the FMA peak bench/fma_peak.c sustains."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def _products(loaded) -> list:
    """Every FastLinear of the model (engine/linear.py), each once."""
    from pdserve.engine.linear import FastLinear

    found: dict[int, FastLinear] = {}
    for m in loaded.model.modules():
        for v in vars(m).values():
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, FastLinear):
                    found.setdefault(id(x), x)
    return list(found.values())


def decode_bytes(loaded) -> int:
    """Bytes of weights one decode step reads at batch 1: every product's GGUF blocks where it
    reads blocks, else its float32 (or packed) weight."""
    total = 0
    for fl in _products(loaded):
        w = fl.quant.blocks if fl.quant is not None else (
            fl.packed if fl.packed is not None else fl.weight)
        total += w.numel() * w.element_size()
    return total


def streaming_read_rate(nbytes: int, threads: int, runs: int = 10) -> float:
    """Bytes/s of a plain read of `nbytes` (a sum over them) on `threads` threads, the engine's,
    repeated as a decode step re-reads its weights (so it has whatever share of the caches a
    step's weights have), the best of `runs` after one: the rate one decode step can read its
    weights at, at best. (Until 2026-12-07 this was numpy's sum over 512 MB, which runs on one
    thread: 13.7 GB/s on that day's Intel machine, where two threads read 28 GB/s over 512 MB
    and 46.5 GB/s over a step's 111 MB; so the ceiling it gave was too low.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.ones(max(nbytes // 8, 1), dtype=torch.float64)
        float(a.sum())
        best = 0.0
        for _ in range(runs):
            t0 = time.perf_counter()
            float(a.sum())
            best = max(best, a.numel() * 8 / (time.perf_counter() - t0))
        return best
    finally:
        torch.set_num_threads(before)


def fma_rate(threads: int, runs: int = 3) -> float:
    """Float32 FMA lanes/s the cores sustain (bench/fma_peak.c: 8-lane FMAs in registers on
    `threads` threads), the best of `runs`; 0.0 when it cannot be built here."""
    import shutil
    import subprocess

    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return 0.0
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "fma_peak"
        built = subprocess.run([cc, "-O3", "-funroll-loops", "-mavx2", "-mfma", "-fopenmp",
                                str(Path(__file__).with_name("fma_peak.c")), "-o", str(exe)],
                               capture_output=True)
        if built.returncode:
            return 0.0
        return max(float(subprocess.run([str(exe), str(threads)], capture_output=True,
                                        text=True, check=True).stdout.split()[0])
                   for _ in range(runs))


def decode_fma_lanes(loaded) -> int:
    """Fused multiply-adds one token costs in the decode step's products (every product's
    weights, the head's included; attention not counted)."""
    return sum(fl.weight.shape[0] * fl.weight.shape[1] for fl in _products(loaded))
