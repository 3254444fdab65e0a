"""`pdserve replay TRACE --live`: a scaled-down trace against a running cluster.

Each trace block (hash id) becomes `tokens_per_block` token ids drawn deterministically from
the hash id (the same id always gives the same tokens, so shared prefixes really are shared);
the last block is cut to the request's scaled input length. Arrivals keep their order and
(scaled) spacing. Prints per-request outcomes in a summary, with the hit share the cluster
reported next to the ideal share computed from the hash ids alone.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grpc

from pdserve.client import Client
from pdserve.scheduler.traces import BLOCK, TraceRequest


def block_tokens(hash_id: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(hash_id * 2654435761 % (1 << 61))
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def scaled_prompt(r: TraceRequest, tokens_per_block: int, max_blocks: int, vocab: int) -> list[int]:
    scale = tokens_per_block / BLOCK
    length = max(1, int(r.input_length * scale))
    blocks = r.hash_ids[:max_blocks] if max_blocks else r.hash_ids
    length = min(length, len(blocks) * tokens_per_block) if blocks else min(length,
                                                                            tokens_per_block)
    out: list[int] = []
    for b in blocks:
        out.extend(block_tokens(b, tokens_per_block, vocab))
        if len(out) >= length:
            break
    if not out:
        out = block_tokens(-1, tokens_per_block, vocab)
    return out[:length]


def ideal_hit_share(prompts: Sequence[tuple[list[int], Sequence[int]]], block: int) -> float:
    """Share of prompt tokens in whole blocks whose whole prefix came before (never the last
    token), counted from the hash ids alone."""
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for tokens, ids in prompts:
        usable = (len(tokens) - 1) // block
        n = 0
        while n < usable and tuple(ids[: n + 1]) in seen:
            n += 1
        hit += n * block
        total += len(tokens)
        for k in range(len(tokens) // block):
            seen.add(tuple(ids[: k + 1]))
    return hit / total if total else 0.0


def run_live(trace: Sequence[TraceRequest], address: str, tokens_per_block: int = 64,
             max_blocks: int = 16, max_tokens: int = 8, vocab: int = 49152,
             concurrency: int = 4) -> dict[str, Any]:
    prompts = [(scaled_prompt(r, tokens_per_block, max_blocks, vocab), r.hash_ids) for r in trace]
    results: list[dict[str, Any]] = [{} for _ in trace]
    sem = threading.Semaphore(concurrency)
    t0 = time.monotonic()
    threads = []

    def one(i: int) -> None:
        with sem, Client(address) as c:
            try:
                r = c.generate(token_ids=prompts[i][0], max_tokens=max_tokens,
                               cache_salt="replay")
                results[i] = {"status": "OK", "prompt": r.prompt_tokens,
                              "cached": r.cached_tokens, "ttft": r.ttft_s}
            except grpc.RpcError as e:
                results[i] = {"status": e.code().name}
            except Exception as e:  # noqa: BLE001 - counted as this request's outcome
                results[i] = {"status": f"client {type(e).__name__}: {e}"}

    for i, r in enumerate(trace):
        delay = r.arrival_s - (time.monotonic() - t0)
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(i,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    ok = [x for x in results if x.get("status") == "OK"]
    prompt = sum(x["prompt"] for x in ok)
    ttfts = sorted(x["ttft"] for x in ok)
    return {
        "requests": len(trace),
        "succeeded": len(ok),
        "failed": dict(Counter(x["status"] for x in results if x.get("status") != "OK")),
        "hit_share": round(sum(x["cached"] for x in ok) / prompt, 4) if prompt else 0.0,
        "ideal_hit_share": round(ideal_hit_share(
            [(p, ids[: -(-len(p) // tokens_per_block)]) for p,
             ids in prompts], tokens_per_block), 4),
        "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else 0.0,
        "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
                            4) if ttfts else 0.0,
        "tokens_per_block": tokens_per_block,
    }
