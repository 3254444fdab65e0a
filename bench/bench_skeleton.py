"""Walking-skeleton figures, ratios measured in one run:

1. time to first token for a ~1,000-token prompt, cold (nothing cached) vs warm (the same
   prompt again: its full blocks come from the KV store);
2. end-to-end tokens/s of the main-job workload through the disaggregated cluster vs the
   single-process engine on the same requests (same machine, same run).

Usage: python bench/bench_skeleton.py [--repeats 3] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table

from pdserve.client import Client
from pdserve.cluster import LocalCluster
from pdserve.config import UpSettings
from pdserve.demo import QUESTIONS, SYSTEM_PROMPT, run_workload


def long_prompt(tokenizer, n_target: int = 1000) -> list[int]:
    text = (SYSTEM_PROMPT + " ") * 8
    ids = tokenizer.apply_chat_template(
        [{"role": "system", "content": text}, {"role": "user", "content": "Summarise."}])
    return ids[-n_target:] if len(ids) > n_target else ids


def single_process_workload(max_tokens: int) -> float:
    """tokens/s of the single-process engine on the demo's requests (same batching: first alone,
    then the rest together)."""
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.kv_pool import KVPool
    from pdserve.engine.loader import load_model
    from pdserve.engine.runner import ModelRunner
    from pdserve.engine.sampling import SamplingParams

    m = load_model()
    eng = LLMEngine(ModelRunner(m.model, KVPool(m.layout, 256)), max_batch=4)
    tok = m.tokenizer
    prompts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=tok.stop_token_ids)
    t0 = time.perf_counter()
    outs = eng.generate(prompts[:1], params) + eng.generate(prompts[1:], params)
    return sum(len(o) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"settings: 1 prefill + 1 decode worker, SmolLM2-135M-Instruct float32 on CPU, "
          f"64-token blocks, repeats={args.repeats}, max_tokens={args.max_tokens}\n")
    from pdserve.engine.loader import load_tokenizer

    tok = load_tokenizer()
    prompt = long_prompt(tok)
    with tempfile.TemporaryDirectory() as d:
        with LocalCluster(UpSettings(data_dir=Path(d), port=0)) as cluster:
            cold, warm, cached = [], [], []
            with Client(cluster.gateway_address) as c:
                c.generate(prompt="warm up", max_tokens=2)
                for i in range(args.repeats):
                    salt = f"bench-{i}-{time.time_ns()}"
                    a = c.generate(token_ids=prompt, max_tokens=1, cache_salt=salt)
                    time.sleep(0.5)  # let the background block write land
                    b = c.generate(token_ids=prompt, max_tokens=1, cache_salt=salt)
                    cold.append(a.ttft_s)
                    warm.append(b.ttft_s)
                    cached.append(b.cached_tokens)
            with open("/dev/null", "w") as null:
                summary = run_workload(cluster.gateway_address, max_tokens=args.max_tokens,
                                       out=null)
    base = single_process_workload(args.max_tokens)
    c_med, w_med = statistics.median(cold), statistics.median(warm)
    rows = [
        (f"TTFT cold, {len(prompt)}-token prompt", f"{c_med * 1000:.0f} ms", ""),
        (f"TTFT warm, same prompt ({cached[0]} tokens cached)", f"{w_med * 1000:.0f} ms",
         f"{w_med / c_med:.2f}x cold"),
        ("main-job workload, disaggregated", f"{summary['tokens_per_s']:.1f} tok/s",
         f"{summary['tokens_per_s'] / base:.2f}x single-process"),
        ("same requests, single-process engine", f"{base:.1f} tok/s", "1.00x"),
        ("main-job share of prompt tokens from the store",
         f"{100 * summary['cached_share']:.1f} %", ""),
    ]
    print(table(rows, ("figure", "value", "ratio")))


if __name__ == "__main__":
    main()
