"""Traces for the replay (scheduler/replay.py) in the Mooncake trace format: arrival time,
prompt and output lengths, and the 512-token block ids a prompt shares with others. Read from
a JSONL file (`load_trace`), or generated in shapes that stress a balancer (`stress_trace`;
seeded: the same shape and seed give the same trace):

- `bursts`: groups of requests arriving within 50 ms, every few seconds, each group behind one
  of a few shared system prompts; prompts of 1k-24k tokens.
- `huge`: a steady stream of short and medium prompts, and one prompt of ~190k tokens in the
  middle (the Mooncake trace's longest) that no single instance can absorb quietly.
- `tenants`: many tenants, each with its own long system prompt (4k-16k tokens) and short
  questions after it, tenants Zipf-popular, Poisson arrivals.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

BLOCK = 512  # tokens per trace block


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: str, limit: int = 0, time_scale: float = 1.0) -> list[TraceRequest]:
    """Reads a Mooncake-format JSONL trace; arrival times count from its first request, so a
    slice cut from the middle of a trace replays from time 0."""
    out = []
    t0 = None
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            t0 = d["timestamp"] if t0 is None else t0
            out.append(TraceRequest((d["timestamp"] - t0) / 1000 * time_scale,
                                    int(d["input_length"]),
                                    max(1, int(d["output_length"])), tuple(d["hash_ids"])))
            if limit and len(out) >= limit:
                break
    return out


SHAPES = ("bursts", "huge", "tenants")


def _blocks(prefix: tuple[int, ...], length: int, fresh: list[int]) -> tuple[int, ...]:
    """`prefix`'s blocks, then new ones (ids from `fresh`) up to `length` tokens."""
    n = -(-length // BLOCK)
    out = list(prefix[:n])
    while len(out) < n:
        fresh[0] += 1
        out.append(fresh[0])
    return tuple(out)


def stress_trace(shape: str, seed: int = 0, n: int = 1200) -> list[TraceRequest]:
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}")
    rng = random.Random(seed)
    fresh = [10_000_000]
    out: list[TraceRequest] = []
    if shape == "bursts":
        systems = [_blocks((), rng.randint(1024, 6144), fresh) for _ in range(4)]
        t = 0.0
        while len(out) < n:
            system = rng.choice(systems)
            for _ in range(min(40, n - len(out))):
                length = int(min(24_576, max(1024, rng.lognormvariate(8.3, 0.7))))
                length = max(length, len(system) * BLOCK + rng.randint(64, 2048))
                out.append(TraceRequest(t + rng.random() * 0.05, length, rng.randint(50, 400),
                                        _blocks(system, length, fresh)))
            t += rng.uniform(4.0, 8.0)
    elif shape == "huge":
        t = 0.0
        for i in range(n):
            if i == n // 2:
                length = 190_000
            else:
                length = int(min(16_384, max(256, rng.lognormvariate(7.8, 0.8))))
            out.append(TraceRequest(t, length, rng.randint(50, 400), _blocks((), length, fresh)))
            t += rng.expovariate(6.0)
    else:
        tenants = [_blocks((), rng.randint(4096, 16_384), fresh) for _ in range(60)]
        weights = [1.0 / (k + 1) ** 1.1 for k in range(len(tenants))]
        t = 0.0
        for _ in range(n):
            system = rng.choices(tenants, weights)[0]
            length = len(system) * BLOCK + rng.randint(32, 1024)
            out.append(TraceRequest(t, length, rng.randint(50, 300),
                                    _blocks(system, length, fresh)))
            t += rng.expovariate(3.0)
    out.sort(key=lambda r: r.arrival_s)
    return out
