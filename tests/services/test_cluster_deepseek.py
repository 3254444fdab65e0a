"""The disaggregated system serving a DeepSeek-V3-architecture model (MLA + MoE, a small random
checkpoint in a Hugging Face directory without tokenizer): cache hits, and tokens identical to
the single-process engine; the same for a checkpoint in the format DeepSeek ships (FP8 weights
with block scales, YaRN, an MTP layer)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from pdserve.client import Client
from pdserve.cluster import LocalCluster
from pdserve.config import UpSettings
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.loader import load_model
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from tests.engine.random_models import make_deepseek, make_deepseek_fp8

pytestmark = pytest.mark.integration  # starts processes

@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    torch.manual_seed(99)
    path = tmp_path_factory.mktemp("dsv3")
    _, model = make_deepseek(path)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ds_cluster(deepseek_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("ds-data")
    c = LocalCluster(UpSettings(data_dir=Path(data), port=0, model=deepseek_dir), progress=False)
    c.start()
    yield c
    c.stop()


def served_like_one_process(cluster: LocalCluster, model_dir: Path) -> None:
    """A prompt longer than two blocks, twice: the tokens of the single-process engine both
    times, the second time with the two full blocks from the store."""
    loaded = load_model(model_dir)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 320, (150,), generator=g).tolist()
    eng = LLMEngine(ModelRunner(loaded.model, KVPool(loaded.layout, 16)))
    expect = eng.generate([prompt], SamplingParams(max_tokens=16))[0]
    with Client(cluster.gateway_address) as c:
        first = c.generate(token_ids=prompt, max_tokens=16)
        second = c.generate(token_ids=prompt, max_tokens=16)
    assert first.token_ids == expect and first.cached_tokens == 0
    assert second.cached_tokens == 128  # two full 64-token blocks of the 150
    assert second.token_ids == expect


def test_deepseek_fp8_yarn_checkpoint_served_disaggregated_with_hits(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv3-fp8") / "fp8"
    make_deepseek_fp8(path, reference=False)
    data = tmp_path_factory.mktemp("fp8-data")
    with LocalCluster(UpSettings(data_dir=Path(data), port=0, model=path),
                      progress=False) as c:
        served_like_one_process(c, path)


def test_deepseek_served_disaggregated_with_hits(ds_cluster, deepseek_dir):
    served_like_one_process(ds_cluster, deepseek_dir)
    with Client(ds_cluster.gateway_address) as c:
        # No tokenizer in the directory: text is refused, naming why.
        with pytest.raises(grpc.RpcError) as e:
            c.generate(prompt="hello", max_tokens=4)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no tokenizer" in e.value.details()
