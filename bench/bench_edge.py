"""The OpenAI-compatible HTTP edge against the gRPC API, on one `pdserve up` (default model).

1. The same load through both: prompts that share a system prompt, a fixed output length
   (`ignore_eos`), greedy, at concurrency 1, 4 and 16; the HTTP side through the openai client
   (streamed, `include_usage`), the gRPC side through pdserve's client, in alternating rounds.
   TTFT and inter-token latency (p50), output tokens/s, and the share of prompt tokens served
   from the KV store, as each client measured them. Goals: HTTP throughput >= 0.95x gRPC, TTFT
   overhead < 5 ms at p50.
2. With `--guidellm PATH` (`pip install -c <(echo torch==2.13.0) guidellm` in a venv of its
   own), the vLLM project's load tool against the edge at the same concurrencies; the share of
   prompt tokens from the store from the gateway's counters.
3. With `--aiperf PATH` (an aiperf executable; `pip install aiperf` in a venv of its own), NVIDIA's
   load tool against the edge at the same concurrencies, with the model's tokenizer exported
   to a local directory (no hub access), run at the lowest CPU priority (its timing loop
   spins a core).

Usage: python bench/bench_edge.py [--requests 32] [--guidellm PATH] [--aiperf PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, table

from pdserve.client import Client
from pdserve.cluster import LocalCluster
from pdserve.config import UpSettings

SYSTEM = ("You are a concise assistant for a travel agency. Answer in one or two sentences, "
          "name the city, and never invent prices. ") * 4
TOPICS = ["museums", "rivers", "markets", "bridges", "parks", "food", "trains", "beaches",
          "castles", "festivals", "gardens", "churches", "harbours", "mountains", "lakes",
          "islands"]
OUTPUT_TOKENS = 32


def prompts(n: int) -> list[str]:
    return [f"Tell me about the {TOPICS[i % len(TOPICS)]} of city number {i}." for i in range(n)]


Sample = tuple[float, float, int, int, int]  # ttft, e2e, output tokens, prompt, cached


def via_http(url: str, model: str) -> Callable[[str], Sample]:
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def send(user: str) -> Sample:
        t0 = time.perf_counter()
        ttft, usage = 0.0, None
        for ch in api.chat.completions.create(
                model=model, messages=[{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": user}],
                max_tokens=OUTPUT_TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            if ch.choices and not ttft:  # the first chunk leaves with the first token, as
                ttft = time.perf_counter() - t0  # the gRPC answer's first message does
            if ch.usage is not None:
                usage = ch.usage
        assert usage is not None
        return (ttft, time.perf_counter() - t0, usage.completion_tokens, usage.prompt_tokens,
                usage.prompt_tokens_details.cached_tokens)
    return send


def via_grpc(address: str) -> Callable[[str], Sample]:
    local = threading.local()

    def send(user: str) -> Sample:
        if not hasattr(local, "client"):
            local.client = Client(address)
        r = local.client.generate(messages=[("system", SYSTEM), ("user", user)],
                                  max_tokens=OUTPUT_TOKENS, ignore_eos=True)
        return r.ttft_s, r.e2e_s, r.completion_tokens, r.prompt_tokens, r.cached_tokens
    return send


def load(send: Callable[[str], Sample], users: list[str], concurrency: int) -> dict[str, float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(send, users))
    wall = time.perf_counter() - t0
    ttft = statistics.median(s[0] for s in samples)
    itl = statistics.median((s[1] - s[0]) / max(1, s[2] - 1) for s in samples)
    return {"ttft": ttft, "itl": itl, "tok_s": sum(s[2] for s in samples) / wall,
            "hit": sum(s[4] for s in samples) / max(1, sum(s[3] for s in samples))}


def export_tokenizer(out: Path) -> Path:
    """The default model's tokenizer as a Hugging Face directory (for aiperf)."""
    from transformers import AutoTokenizer

    from pdserve.engine.files import default_model_path

    gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out)
    return out


def aiperf(exe: str, url: str, model: str, tokenizer: Path, concurrency: int, requests: int,
           out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    # At the lowest priority: aiperf's timing loop spins a core, which on a 2-core machine
    # would otherwise take half the server's CPU (requests took ~40 s instead of ~1 s).
    subprocess.run(["nice", "-n", "19", exe, "profile", "--model", model, "--url", url,
                    "--endpoint-type", "chat",
                    "--streaming", "--tokenizer", str(tokenizer), "--request-count",
                    str(requests), "--concurrency", str(concurrency),
                    "--prompt-input-tokens-mean", "64", "--shared-system-prompt-length", "128",
                    "--prompt-output-tokens-mean", str(OUTPUT_TOKENS),
                    "--extra-inputs", "ignore_eos:true", "--no-server-metrics",
                    "--no-gpu-telemetry", "--ui", "none", "--artifact-dir", str(out)],
                   check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    found = sorted(out.rglob("*aiperf*.json"))
    data = json.loads(found[-1].read_text())
    records = data.get("records", data)

    def p50(name: str) -> float:
        rec = records[name]
        return float(rec.get("p50", rec.get("avg", 0.0)))
    return {"ttft": p50("time_to_first_token") / 1e3, "itl": p50("inter_token_latency") / 1e3,
            "tok_s": float(records["output_token_throughput"]["avg"])}


def guidellm(exe: str, url: str, model: str, tokenizer: Path, concurrency: int,
             requests: int, out: Path) -> dict[str, float]:
    """guidellm (the vLLM project's load tool) against the edge: a shared 128-token prefix +
    64 tokens, 32 out (it always sends ignore_eos), medians of its own measurements."""
    subprocess.run([exe, "run", "--backend", f"kind=openai_http,target={url},model={model}",
                    "--profile", f"kind=concurrent,streams={concurrency}", "--data",
                    "kind=synthetic_text,prompt_tokens=64,output_tokens="
                    f"{OUTPUT_TOKENS},prefix_tokens=128",
                    "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
                    "--constraint", f"kind=max_requests,count={requests}",
                    "--output", f"kind=json,path={out}", "--disable-console-interactive",
                    "--disable-progress"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.STDOUT)
    m = json.loads(out.read_text())["benchmarks"][0]["metrics"]

    def ok(name: str, stat: str) -> float:
        return float(m[name]["successful"][stat])
    return {"ttft": ok("time_to_first_token_ms", "median") / 1e3,
            "itl": ok("inter_token_latency_ms", "median") / 1e3,
            "tok_s": ok("output_tokens_per_second", "mean")}


def store_share(metrics_url: str) -> tuple[float, float]:
    """(cached, prompt) tokens the gateway has counted so far."""
    from tests.helpers import read_metrics

    m = read_metrics(metrics_url)
    cached = sum(v for k, v in m.items() if k.startswith("pdserve_cached_tokens_total"))
    return cached, m.get("pdserve_prompt_tokens_total", 0.0)  # cached: over its sources


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--aiperf", default="", help="an aiperf executable")
    ap.add_argument("--guidellm", default="", help="a guidellm executable")
    ap.add_argument("--tools-only", action="store_true", help="only the outside load tools")
    args = ap.parse_args()
    print(f"# The HTTP edge against gRPC\n{machine()}\n")
    rows = []
    with tempfile.TemporaryDirectory() as d, LocalCluster(
            UpSettings(data_dir=Path(d), port=0, http_port=0), progress=False) as c:
        assert c.http_url is not None
        import openai

        model = openai.OpenAI(base_url=c.http_url + "/v1", api_key="-").models.list().data[0].id
        http, grpc_ = via_http(c.http_url, model), via_grpc(c.gateway_address)
        for send in (http, grpc_):  # warm: the shared system prompt's blocks in the store
            send("warm up")
        for conc in () if args.tools_only else (1, 4, 16):
            users = prompts(args.requests)
            got: dict[str, list[dict[str, float]]] = {"http": [], "grpc": []}
            for rnd in range(2):  # alternating rounds
                for name, send in (("http", http), ("grpc", grpc_)) if rnd == 0 else \
                        (("grpc", grpc_), ("http", http)):
                    # Unique from the user's first word on: the two APIs share only the
                    # system prompt, never a prefix of each other's questions.
                    got[name].append(load(send, [f"[{name} {rnd} {conc}] {u}" for u in users],
                                          conc))
            h = {k: statistics.mean(r[k] for r in got["http"]) for k in got["http"][0]}
            g = {k: statistics.mean(r[k] for r in got["grpc"]) for k in got["grpc"][0]}
            rows.append((conc, f"{h['tok_s']:.1f} / {g['tok_s']:.1f}",
                         f"{h['tok_s'] / g['tok_s']:.2f}",
                         f"{h['ttft'] * 1e3:.1f} / {g['ttft'] * 1e3:.1f}",
                         f"{(h['ttft'] - g['ttft']) * 1e3:+.1f}",
                         f"{h['itl'] * 1e3:.1f} / {g['itl'] * 1e3:.1f}",
                         f"{h['hit']:.0%} / {g['hit']:.0%}"))
        if rows:
            print(f"## The same load, HTTP (openai client) / gRPC (pdserve client), "
                  f"{args.requests} requests x 2 rounds per level, {OUTPUT_TOKENS} output "
                  "tokens (ignore_eos)\n")
            print(table(rows, ("concurrency", "output tok/s", "HTTP / gRPC", "TTFT p50 ms",
                               "TTFT overhead ms", "ITL p50 ms",
                               "prompt tokens from the store")))
            print("\n(goals: HTTP / gRPC >= 0.95; TTFT overhead < 5 ms)\n")
        if args.guidellm:
            tok = export_tokenizer(Path(d) / "tokenizer-gl")
            grows = []
            gw_metrics = c.metrics_urls()["gateway"]
            for conc in (1, 4, 16):
                c0, p0 = store_share(gw_metrics)
                r = guidellm(args.guidellm, c.http_url, model, tok, conc, args.requests,
                             Path(d) / f"guidellm-{conc}.json")
                c1, p1 = store_share(gw_metrics)
                grows.append((conc, f"{r['tok_s']:.1f}", f"{r['ttft'] * 1e3:.1f}",
                              f"{r['itl'] * 1e3:.1f}", f"{(c1 - c0) / max(1.0, p1 - p0):.0%}"))
            print(f"## guidellm against the edge (a shared 128-token prefix + 64 tokens, "
                  f"{OUTPUT_TOKENS} out, {args.requests} requests per level)\n")
            print(table(grows, ("concurrency", "output tok/s", "TTFT p50 ms", "ITL p50 ms",
                                "prompt tokens from the store (gateway's counters)")))
            print()
        if args.aiperf:
            tok = export_tokenizer(Path(d) / "tokenizer")
            arows = []
            for conc in (1, 4, 16):
                r = aiperf(args.aiperf, c.http_url, model, tok, conc, args.requests,
                           Path(d) / f"aiperf-{conc}")
                arows.append((conc, f"{r['tok_s']:.1f}", f"{r['ttft'] * 1e3:.1f}",
                              f"{r['itl'] * 1e3:.1f}"))
            print(f"## aiperf against the edge (a shared 128-token system prompt + 64 tokens, "
                  f"{OUTPUT_TOKENS} out, {args.requests} requests per level)\n")
            print(table(arows, ("concurrency", "output tok/s", "TTFT p50 ms", "ITL p50 ms")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
