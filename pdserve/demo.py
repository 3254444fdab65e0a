"""The main job: start the local cluster, send chat prompts that share a system prompt, print
each answer, then a summary, then stop the cluster."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from pdserve.client import Client, Result
from pdserve.cluster import LocalCluster
from pdserve.config import UpSettings

SYSTEM_PROMPT = (
    "You are the help desk assistant of Northwind Rail, a regional railway company. "
    "Answer in one or two short sentences. Facts you may use: trains run every thirty minutes "
    "between six in the morning and midnight; a single ticket costs four euros and a day pass "
    "costs ten euros; children under six travel free; bicycles are allowed outside rush hours "
    "for a two euro supplement; tickets can be bought at station machines, in the mobile app, "
    "or from the conductor with a one euro surcharge; monthly passes cost sixty euros and are "
    "personal; lost items are kept at the central station for thirty days; dogs travel free "
    "when they are on a leash; the quiet carriage is the last carriage of every train; "
    "delays over thirty minutes are refunded at half the ticket price through the website. "
    "If a question is not about Northwind Rail, say politely that you can only help with "
    "travel on Northwind Rail."
)

QUESTIONS = [
    "How much does a day pass cost?",
    "Can I bring my bicycle on the train?",
    "My train was 45 minutes late. What can I do?",
    "Do children need a ticket?",
    "Where can I buy a ticket?",
    "I lost my umbrella on the train yesterday. What should I do?",
    "Can my dog come with me?",
    "Which carriage is the quiet one?",
]


def _ask(address: str, q: str, max_tokens: int) -> Result:
    with Client(address) as c:
        return c.generate(messages=[("system", SYSTEM_PROMPT), ("user", q)],
                          max_tokens=max_tokens)


def run_workload(address: str, max_tokens: int = 48, concurrency: int = 4,
                 out: TextIO = sys.stdout) -> dict[str, Any]:
    t0 = time.perf_counter()
    # The first request is alone: it computes the shared system prompt, which every later
    # request then finds in the KV store.
    results = [_ask(address, QUESTIONS[0], max_tokens)]
    with ThreadPoolExecutor(concurrency) as pool:
        results += list(pool.map(lambda q: _ask(address, q, max_tokens), QUESTIONS[1:]))
    wall = time.perf_counter() - t0
    for q, r in zip(QUESTIONS, results):
        print(f"\nQ: {q}\nA: {r.text.strip()}\n   [{r.prompt_tokens} prompt tokens, "
              f"{r.cached_tokens} from the KV store, {r.completion_tokens} generated, "
              f"TTFT {r.ttft_s * 1000:.0f} ms, {r.finish_reason}]", file=out)
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    summary = {
        "requests": len(results),
        "ttft_first_s": results[0].ttft_s,
        "ttft_median_rest_s": statistics.median(r.ttft_s for r in results[1:]),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_share": cached / prompt if prompt else 0.0,
        "completion_tokens": completion,
        "wall_s": wall,
        "tokens_per_s": completion / wall,
    }
    print("\nSummary", file=out)
    print(f"  requests                      {summary['requests']}", file=out)
    print(f"  time to first token, cold     {summary['ttft_first_s'] * 1000:.0f} ms", file=out)
    print(f"  time to first token, median   {summary['ttft_median_rest_s'] * 1000:.0f} ms "
          f"(the other {len(results) - 1}, {concurrency} at a time)", file=out)
    print(f"  generated tokens              {completion} in {wall:.1f} s = "
          f"{summary['tokens_per_s']:.1f} tokens/s", file=out)
    print(f"  prompt tokens from KV store   {cached} of {prompt} "
          f"({100 * summary['cached_share']:.1f} %)", file=out)
    return summary


def main(settings: UpSettings, max_tokens: int, keep_data: bool) -> int:
    tmp = None
    if not keep_data:
        tmp = tempfile.TemporaryDirectory(prefix="pdserve-demo-")
        settings = settings.model_copy(update={"data_dir": Path(tmp.name), "port": 0,
                                               "http_port": 0})
    try:
        with LocalCluster(settings) as cluster:
            run_workload(",".join(cluster.gateway_addresses), max_tokens=max_tokens)
            print("\nstopping the cluster ...", file=sys.stderr, flush=True)
        # The gateway wrote one ledger row per request; what `pdserve report` makes of them:
        from pdserve.cache.analytics import format_report, report, run_named

        _, reasons = run_named(settings.data_dir, "miss_reasons")
        print("\nFrom the request ledger (pdserve report, pdserve analytics miss_reasons)")
        print(format_report(report(settings.data_dir)))
        print("  uncached tokens by reason " + ", ".join(
            f"{why} {n:,} ({k} requests)" for why, k, n in reasons))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0
