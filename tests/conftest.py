"""Shared fixtures: the real default model, the Hugging Face reference, a local cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("UCX_LOG_LEVEL", "error")
# The test clusters' kvstores register a smaller NIXL staging buffer than the 256 MiB default
# (registration makes it resident): several clusters run at once on a 24 GiB machine.
os.environ.setdefault("PDSERVE_NIXL_STAGING_MB", "64")
# Several gateways run at once: their HTTP edges take any free port (the default is 8000).
os.environ.setdefault("PDSERVE_HTTP_PORT", "0")
# Without a GPU, Triton kernels (engine/paged_decode.py) run under Triton's interpreter, which
# must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdserve.engine.loader import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    model.eval()
    return model, tok


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
