"""FP8 block-scaled weights (DeepSeek's checkpoint format) against the same weights in float32,
same model, same run: decode tokens/s at batch 1 and 16 and prefill tokens/s, on the CPU.

The model is a random DeepSeek-V3 of a mid size (MLA + 32 routed experts, ~190 M FP8 weights),
written once in both forms by tests/engine/random_models.py: `DIR/fp8` (FP8 e4m3 + 128x128
scales, YaRN) and `DIR/fp8-float32` (the same weights dequantized by DeepSeek's formula).
Each figure is the best of `--repeats` runs after a warm-up. On a CUDA device (`--device
cuda`) the float32 side runs in bfloat16.

Usage: python bench/bench_fp8.py [--dir DIR] [--batches 1,16] [--new-tokens 16]
       [--prompt-tokens 512] [--repeats 2] [--device cpu]
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

from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import LoadedModel, load_model
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from tests.engine.random_models import make_deepseek_fp8

SHAPE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
             num_hidden_layers=6, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
             topk_group=2, num_attention_heads=8, q_lora_rank=512, kv_lora_rank=256,
             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
             max_position_embeddings=4096)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_tps(loaded: LoadedModel, batch: int, prompt: int, new: int) -> float:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, SHAPE["vocab_size"], (batch, prompt), generator=g).tolist()
    pages = batch * loaded.layout.pages_for(prompt + new + 2) + 2
    pool = KVPool(loaded.layout, pages, device=next(loaded.model.parameters()).device)
    eng = LLMEngine(ModelRunner(loaded.model, pool), max_batch=batch, max_prefill_tokens=8192)
    seqs = [eng.add_request(f"b{i}", p, SamplingParams(max_tokens=new + 1))
            for i, p in enumerate(prompts)]
    while any(not s.output for s in seqs):
        eng.step()
    sync()
    t0 = time.perf_counter()
    while eng.has_work:
        eng.step()
    sync()
    return batch * new / (time.perf_counter() - t0)


def prefill_tps(loaded: LoadedModel, prompt: int) -> float:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, SHAPE["vocab_size"], (prompt,), generator=g).tolist()
    pool = KVPool(loaded.layout, loaded.layout.pages_for(prompt + 1) + 1,
                  device=next(loaded.model.parameters()).device)
    runner = ModelRunner(loaded.model, pool, prefill_chunk_tokens=prompt)
    pages = pool.reserve(pool.layout.pages_for(prompt + 1))
    sync()
    t0 = time.perf_counter()
    runner.prefill(ids, pages)
    sync()
    return prompt / (time.perf_counter() - t0)


def best(f, repeats: int) -> float:
    f()  # warm-up
    return max(f() for _ in range(repeats))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, help="where the two checkpoints are (made if missing)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="pdserve-fp8-"))
    fp8_dir, f32_dir = root / "fp8", root / "fp8-float32"
    if not (fp8_dir / "config.json").exists():
        print(f"writing the checkpoints to {root} ...", file=sys.stderr)
        _, written = make_deepseek_fp8(fp8_dir, reference=False, **SHAPE)
        n = sum(v.numel() for v in written.values() if v.dtype == torch.float8_e4m3fn)
        print(f"{n / 1e6:.0f} M FP8 weights (MTP layer included)", file=sys.stderr)
    f32_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    models = {"fp8": load_model(fp8_dir, device=args.device, dtype=f32_dtype),
              str(f32_dtype).removeprefix("torch."): load_model(f32_dir, device=args.device,
                                                                dtype=f32_dtype)}
    print(f"# FP8 weights vs the same weights unquantized\n{machine()}; device {args.device}; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new, best of {args.repeats}\n")
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for what in [f"decode b{b}" for b in batches] + [f"prefill {args.prompt_tokens}"]:
        got = {}
        for name, m in models.items():
            if what.startswith("decode"):
                b = int(what.removeprefix("decode b"))
                got[name] = best(lambda m=m, b=b: decode_tps(m, b, 128, args.new_tokens),
                                 args.repeats)
            else:
                got[name] = best(lambda m=m: prefill_tps(m, args.prompt_tokens), args.repeats)
        names = list(got)
        rows.append((what, *(f"{got[n]:.1f}" for n in names),
                     f"{got[names[0]] / got[names[1]]:.2f}x"))
    print(table(rows, ("tokens/s", *models, "fp8 / unquantized")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
