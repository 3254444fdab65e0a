"""Shared fixtures: the real default model, the Hugging Face reference, a local cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("UCX_LOG_LEVEL", "error")
# The test clusters' kvstores register a smaller NIXL staging buffer than the 256 MiB default
# (registration makes it resident): several clusters run at once on a 24 GiB machine.
os.environ.setdefault("PDSERVE_NIXL_STAGING_MB", "64")

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a hash chain is.",
]


@pytest.fixture(scope="session")
def loaded():
    from pdserve.engine.loader import load_model

    return load_model()


@pytest.fixture(scope="session")
def tokenizer(loaded):
    return loaded.tokenizer


@pytest.fixture(scope="session")
def hf():
    """transformers running the same GGUF: the reference (test-only dependency)."""
    import torch
    from pdserve.engine.loader import default_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    model.eval()
    return model, tok


def hf_greedy(hf, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Reference greedy tokens and, per step, the gap between the top-2 logits."""
    import torch

    model, tok = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tok.eos_token_id)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    gaps = []
    for s in out.scores:
        top = torch.topk(s[0].float(), 2).values
        gaps.append(float(top[0] - top[1]))
    return tokens, gaps


def agree_until_near_tie(ours: list[int], ref: list[int], gaps: list[float],
                         tie: float = 1e-3) -> int:
    """Number of leading tokens that must agree: up to (and including) the first step whose
    reference top-2 gap is below `tie`, where two faithful implementations may part."""
    n = min(len(ours), len(ref))
    for i in range(n):
        if gaps[i] < tie:
            return i  # tokens before the near-tie must agree; the tie itself may differ
    return n


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fresh `pdserve up` per test module (a module may stop parts of it)."""
    from pdserve.cluster import LocalCluster
    from pdserve.config import UpSettings

    data = tmp_path_factory.mktemp("cluster")
    c = LocalCluster(UpSettings(data_dir=Path(data), port=0), progress=False)
    c.start()
    yield c
    c.stop()
