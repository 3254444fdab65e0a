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
from tests.engine.random_models import make_deepseek_fp8, saved_deepseek
from tests.helpers import service_metrics, wait_until

pytestmark = pytest.mark.integration  # starts processes

@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return saved_deepseek(tmp_path_factory, "dsv3", 99)


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


def test_deepseek_served_by_expert_parallel_groups(deepseek_dir, tmp_path_factory):
    """`pdserve up --prefill-ep 2 --decode-ep 2 --redundant-experts 4`: each role one EP group
    of two ranks (each holding 6 of the 12 expert slots); the single-process engine's tokens
    (which equal transformers', test_hf_models.py), hits on the repeat, requests on both ranks
    of each group, and a dead rank taking its group out."""
    from pdserve.v1 import gateway_pb2, gateway_pb2_grpc

    data = tmp_path_factory.mktemp("ep-data")
    settings = UpSettings(data_dir=Path(data), port=0, model=deepseek_dir, prefill_ep=2,
                          decode_ep=2, redundant_experts=4, eplb_interval_steps=8)
    with LocalCluster(settings, progress=False) as c:
        served_like_one_process(c, deepseek_dir)
        loaded = load_model(deepseek_dir)
        eng = LLMEngine(ModelRunner(loaded.model, KVPool(loaded.layout, 64)))
        prompts = [torch.randint(0, 320, (40 + 9 * i,), generator=torch.Generator().manual_seed(
            50 + i)).tolist() for i in range(6)]
        expect = eng.generate(prompts, SamplingParams(max_tokens=12))
        import concurrent.futures

        with Client(c.gateway_address) as cl, concurrent.futures.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda p: cl.generate(token_ids=p, max_tokens=12).token_ids,
                                prompts))
        assert got == expect

        def stats_now() -> gateway_pb2.ClusterStatsResponse:
            with grpc.insecure_channel(c.gateway_address) as ch:
                return gateway_pb2_grpc.GatewayStub(ch).Stats(gateway_pb2.ClusterStatsRequest())

        def finished() -> dict[str, int]:
            return {w.worker_id: w.num_finished for w in stats_now().workers}

        # Finished counts arrive with the workers' periodic load reports: poll until both
        # decode ranks' reports say they decoded requests.
        wait_until(lambda: finished()["decode-0"] > 0 and finished()["decode-1"] > 0, 15,
                   interval_s=0.2, what="both decode ranks reporting finished requests")
        stats = stats_now()
        assert len(stats.workers) == 4 and all(w.in_rotation for w in stats.workers)
        for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):  # real EP ranks
            m = service_metrics(c, name)
            assert m["pdserve_moe_received_tokens_total"] > 0, name
            assert m["pdserve_moe_dispatched_tokens_total"] > 0, name
        ranks = {service_metrics(c, f"decode-{i}")['pdserve_ep_rank{size="2"}'] for i in (0, 1)}
        assert ranks == {0.0, 1.0}
        assert {(w.worker_id, w.ep_group, w.ep_rank, w.ep_size) for w in stats.workers} == {
            ("prefill-0", "prefill", 0, 2), ("prefill-1", "prefill", 1, 2),
            ("decode-0", "decode", 0, 2), ("decode-1", "decode", 1, 2)}
        # One rank dies: its group leaves rotation whole, and the other rank exits on its own
        # (its next collective fails) instead of hanging.
        c.kill("decode-1")
        survivor = c.service("decode-0").proc
        code = wait_until(lambda: survivor.poll(), 60, interval_s=0.1,
                          what="the surviving rank exits")
        assert code == 70

        def decode_in_rotation() -> list[str]:
            with grpc.insecure_channel(c.gateway_address) as ch:
                st = gateway_pb2_grpc.GatewayStub(ch).Stats(gateway_pb2.ClusterStatsRequest())
            return [w.worker_id for w in st.workers if w.role == "decode" and w.in_rotation]

        wait_until(lambda: decode_in_rotation() == [], 30, interval_s=0.2,
                   what="the decode group out of rotation")


def test_two_batch_overlap_through_the_whole_system(deepseek_dir, tmp_path_factory):
    """`pdserve up --prefill-ep 2 --decode-ep 2 --batch-invariant` with `--tbo on` and with
    `--tbo off`: the same greedy tokens for concurrent requests (however they are batched),
    and the ranks of both roles did overlap steps."""
    import concurrent.futures

    prompts = [torch.randint(0, 320, (30 + 11 * i,), generator=torch.Generator().manual_seed(
        70 + i)).tolist() for i in range(6)]
    got = {}
    for mode in ("off", "on"):
        data = tmp_path_factory.mktemp(f"tbo-{mode}")
        settings = UpSettings(data_dir=Path(data), port=0, model=deepseek_dir, prefill_ep=2,
                              decode_ep=2, redundant_experts=4, tbo=mode,
                              batch_invariant=True)
        with LocalCluster(settings, progress=False) as c:
            with Client(c.gateway_address) as cl, \
                    concurrent.futures.ThreadPoolExecutor(6) as pool:
                got[mode] = list(pool.map(
                    lambda p, cl=cl: cl.generate(token_ids=p, max_tokens=10).token_ids, prompts))
            overlapped = {name: service_metrics(c, name)["pdserve_tbo_steps_total"]
                          for name in ("prefill-0", "prefill-1", "decode-0", "decode-1")}
        if mode == "off":
            assert not any(overlapped.values()), overlapped
        else:
            assert all(overlapped[f"prefill-{i}"] > 0 for i in (0, 1)), overlapped
            assert overlapped["decode-0"] > 0 and overlapped["decode-1"] > 0, overlapped
    assert got["on"] == got["off"]
    assert all(len(t) == 10 for t in got["on"])
