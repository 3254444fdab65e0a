"""GPU path (device=cuda, bfloat16 weights and KV). Skipped without CUDA; the same code runs on
CPU in every other test."""

from __future__ import annotations

import pytest
import torch
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import load_model
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_bfloat16_logits_track_cpu_float32(loaded, tokenizer):
    gpu = load_model(device="cuda", dtype=torch.bfloat16)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    cpu_pool, gpu_pool = KVPool(loaded.layout, 8), KVPool(gpu.layout, 8, device="cuda")
    ref = ModelRunner(loaded.model, cpu_pool).prefill(ids, cpu_pool.reserve(1))
    got = ModelRunner(gpu.model, gpu_pool).prefill(ids, gpu_pool.reserve(1)).cpu()
    assert gpu.layout.bytes_per_token == loaded.layout.bytes_per_token // 2
    assert torch.argmax(got) == torch.argmax(ref)
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.99


def test_cuda_engine_answers(tokenizer):
    gpu = load_model(device="cuda", dtype=torch.bfloat16)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    eng = LLMEngine(ModelRunner(gpu.model, KVPool(gpu.layout, 16, device="cuda")))
    out = eng.generate([ids], SamplingParams(max_tokens=12, stop_token_ids=tokenizer.stop_token_ids))
    assert "Paris" in tokenizer.decode(out[0])
