"""Pipelined prefill over two prefill workers against one worker computing the prompt alone,
in one run on this machine: the whole system (`pdserve up`, 2 prefill + 1 decode workers, one
torch thread each), the same long prompts, time to first token as the client sees it.

Two clusters, one after the other: the gateway pipelines prompts of at least
--pipeline-min-tokens uncached tokens in the first and never in the second. Each prompt is new
(its own cache salt), so every token is computed. On a machine with fewer cores than workers
the stages share cores, and the gain shrinks accordingly (the machine line says how many).

Usage: python bench/bench_pipeline.py [--tokens 4096] [--prompts 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table


def run(tokens: int, n: int, pipelined: bool) -> tuple[list[float], list[list[int]]]:
    from pdserve.client import Client
    from pdserve.cluster import LocalCluster
    from pdserve.config import UpSettings

    env = {"PDSERVE_PIPELINE_MIN_TOKENS": str(min(1024, tokens)) if pipelined else "0"}
    ttft, outs = [], []
    with tempfile.TemporaryDirectory() as d:
        settings = UpSettings(data_dir=Path(d), port=0, num_prefill=2, num_decode=1, threads=1,
                              prefill_pages=tokens // 64 + 8, metrics=False)
        with LocalCluster(settings, progress=False, extra_env=env) as cluster:
            with Client(cluster.gateway_address) as c:
                c.generate(token_ids=[1, 2, 3], max_tokens=2)  # warm up
                for i in range(n):
                    prompt = [1 + (j * 7919 + i * 104729) % 40000 for j in range(tokens)]
                    print(f"  {'pipelined' if pipelined else 'alone'}: prompt {i + 1}/{n} "
                          f"({tokens} tokens) ...", file=sys.stderr, flush=True)
                    r = c.generate(token_ids=prompt, max_tokens=4,
                                   cache_salt=f"bench-{pipelined}-{i}")
                    ttft.append(r.ttft_s)
                    outs.append(r.token_ids)
    return ttft, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}\nsettings: pdserve up, 2 prefill + 1 decode workers, 1 torch "
          f"thread each; {args.prompts} prompts of {args.tokens} new tokens, one at a time\n")
    alone, out_a = run(args.tokens, args.prompts, pipelined=False)
    piped, out_p = run(args.tokens, args.prompts, pipelined=True)
    ma, mp = statistics.median(alone), statistics.median(piped)
    print(table([("one worker computes the prompt", f"{ma:.2f}",
                  ", ".join(f"{t:.2f}" for t in alone), "1.00"),
                 ("pipelined over both workers", f"{mp:.2f}", ", ".join(f"{t:.2f}" for t in piped),
                  f"{mp / ma:.2f}")],
                ("prefill", "TTFT median s", "each s", "ratio")))
    print(f"\nsame tokens both ways: {out_a == out_p}")


if __name__ == "__main__":
    main()
