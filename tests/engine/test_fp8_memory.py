"""FP8 weights stay about one byte a weight in memory: the resident memory a process gains by
loading an FP8 checkpoint, measured (VmRSS), against the same weights in float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pdserve.engine.fp8 import FP8
from tests.engine.random_models import make_deepseek_fp8

pytestmark = pytest.mark.integration  # starts processes

# A model whose FP8 weights (~94 M) dwarf the rest, so the measure is of them.
SHAPE = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
             num_hidden_layers=4, n_routed_experts=16, num_attention_heads=8, q_lora_rank=512,
             kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)

MEASURE = """
import gc, json, sys
import torch
from pdserve.engine.loader import load_model

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

torch.set_num_threads(1)
gc.collect()
before = rss()
m = load_model(sys.argv[1])
gc.collect()
print(json.dumps({"grew": rss() - before,
                  "held": sum(t.numel() * t.element_size()
                              for t in list(m.model.parameters()) + list(m.model.buffers()))}))
"""


def _load_in_process(path) -> dict:
    # A fixed mmap threshold: glibc then returns every large freed block (the state dict read
    # from the file) to the system, so what the process still holds is what it uses.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True,
                         text=True, timeout=300, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_fp8_weights_take_about_one_byte_each_in_memory(tmp_path):
    path = tmp_path / "fp8"
    _, written = make_deepseek_fp8(path, reference=False, **SHAPE)
    served = {k: v for k, v in written.items() if not k.startswith("model.layers.4.")}  # MTP
    kv_b = {k for k in served if "kv_b_proj.weight" in k}  # dequantized at load (float32)
    fp8_weights = sum(v.numel() for k, v in served.items() if v.dtype == FP8 and k not in kv_b)
    # Held besides the FP8 bytes: scales, bf16 tensors read as float32, kv_b_proj in float32.
    other = sum(4 * v.numel() for k, v in served.items()
                if v.dtype != FP8 and k.removesuffix("_scale_inv") not in kv_b or k in kv_b)
    fp8 = _load_in_process(path)
    f32 = _load_in_process(tmp_path / "fp8-float32")
    per_weight = (fp8["grew"] - other) / fp8_weights
    held = (fp8["held"] - other) / fp8_weights  # the model's own tensors, counted
    print(f"FP8 load grew RSS by {fp8['grew'] / 1e6:.1f} MB for {fp8_weights / 1e6:.1f} M FP8 "
          f"weights ({per_weight:.3f} bytes each after the rest; tensors held "
          f"{held:.4f}); float32 copy: {f32['grew'] / 1e6:.1f} MB")
    assert 1.0 <= held < 1.001  # one byte each (the few buffers: less than 0.1 %)
    assert 0.8 < per_weight < 1.5, (fp8, f32, fp8_weights, other)
    assert fp8["grew"] < 0.4 * f32["grew"], (fp8, f32)
