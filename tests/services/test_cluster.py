"""The whole disaggregated system as real processes (`pdserve up`): kvstore, gateway, prefill
and decode on loopback, the real model, NIXL over UCX."""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.client import Client
from pdserve.demo import SYSTEM_PROMPT
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.helpers import (
    CHAT_PROMPTS,
    agree_until_near_tie,
    hf_greedy,
    service_metrics,
    wait_until,
)

pytestmark = pytest.mark.integration  # starts processes

N_TOKENS = 24


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.gateway_address) as c:
        yield c


def single_process(loaded, prompt, max_tokens, stops=frozenset()):
    eng = LLMEngine(ModelRunner(loaded.model, KVPool(loaded.layout, 64)))
    return eng.generate([prompt], SamplingParams(max_tokens=max_tokens, stop_token_ids=stops))[0]


def chat(tokenizer, text, system=None):
    msgs = ([{"role": "system", "content": system}] if system else [])
    return tokenizer.apply_chat_template(msgs + [{"role": "user", "content": text}])


def test_every_service_is_serving_and_reflection_lists_the_gateway(cluster):
    for svc in cluster.services:
        with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert r.status == health_pb2.HealthCheckResponse.SERVING, svc.name
    with grpc.insecure_channel(cluster.gateway_address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert "pdserve.v1.Gateway" in names
        r = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="pdserve.v1.Gateway"))
        assert r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("text", CHAT_PROMPTS)
def test_greedy_tokens_equal_transformers_and_single_process(client, loaded, tokenizer, hf, text):
    ids = chat(tokenizer, text)
    r = client.generate(token_ids=ids, max_tokens=N_TOKENS, cache_salt=f"ref-{text}")
    ref, gaps = hf_greedy(hf, ids, N_TOKENS)
    ours = r.token_ids
    # The gateway stops at end-of-turn; the reference may go on past it.
    n = agree_until_near_tie(ours, ref, gaps)
    assert ours[:n] == ref[:n]
    assert n >= min(len(ours), 8)
    assert ours == single_process(loaded, ids, N_TOKENS, tokenizer.stop_token_ids)
    assert r.completion_tokens == len(ours)
    assert r.finish_reason == ("stop" if ours[-1] in tokenizer.stop_token_ids else "length")


def test_text_prompt_is_templated_and_streamed_as_text(client):
    r = client.generate(prompt="What is the capital of France?", max_tokens=20)
    assert r.text == "The capital of France is Paris."
    assert r.finish_reason == "stop"


def test_same_prompt_twice_hits_the_store(client, tokenizer):
    ids = chat(tokenizer, "Summarise the rules in one sentence.", system=SYSTEM_PROMPT)
    full = len(ids) // 64
    first = client.generate(token_ids=ids, max_tokens=12, cache_salt="twice")
    second = client.generate(token_ids=ids, max_tokens=12, cache_salt="twice")
    assert first.cached_tokens == 0
    assert second.cached_tokens >= 64 * (full - 1) and second.cached_tokens % 64 == 0
    assert second.token_ids == first.token_ids
    assert second.prompt_tokens == first.prompt_tokens == len(ids)


def test_shared_system_prompt_hits_only_the_shared_blocks(client, tokenizer):
    a = chat(tokenizer, "When does the first train leave?", system=SYSTEM_PROMPT)
    b = chat(tokenizer, "Can I take my cat?", system=SYSTEM_PROMPT)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    client.generate(token_ids=a, max_tokens=4, cache_salt="shared")
    r = client.generate(token_ids=b, max_tokens=4, cache_salt="shared")
    assert r.cached_tokens == 64 * (shared // 64)
    assert r.cached_tokens > 0


def test_other_salt_gets_no_hits(client, tokenizer):
    ids = chat(tokenizer, "What does a monthly pass cost?", system=SYSTEM_PROMPT)
    client.generate(token_ids=ids, max_tokens=4, cache_salt="tenant-a")
    assert client.generate(token_ids=ids, max_tokens=4, cache_salt="tenant-a").cached_tokens > 0
    assert client.generate(token_ids=ids, max_tokens=4, cache_salt="tenant-b").cached_tokens == 0


BAD = [
    (dict(max_tokens=4), "prompt: empty"),
    (dict(prompt="hi", prompt_token_ids=[1, 2], max_tokens=4), "exactly one"),
    (dict(prompt_token_ids=[1, 49152], max_tokens=4), "token id 49152 outside the vocabulary"),
    (dict(prompt_token_ids=[1, -3], max_tokens=4), "token id -3 outside the vocabulary"),
    (dict(prompt="hi", max_tokens=0), "max_tokens: 0, must be > 0"),
    (dict(prompt="hi", max_tokens=-5), "max_tokens: -5"),
    (dict(prompt="hi", max_tokens=9000), "context limit 8192"),
    (dict(prompt="hi", max_tokens=4, temperature=-0.5), "temperature: -0.5"),
    (dict(prompt="hi", max_tokens=4, top_p=1.5), "top_p: 1.5"),
    (dict(prompt="hi", max_tokens=4, top_k=-1), "top_k: -1"),
    (dict(prompt="hi", max_tokens=4, stop=[""]), "stop[0]: 0 characters"),
    (dict(prompt="hi", max_tokens=4, stop_token_ids=[60000]), "stop_token_ids: token id 60000"),
    (dict(messages=[gateway_pb2.ChatMessage(role="robot", content="x")], max_tokens=4),
     "messages[0].role: 'robot'"),
]


@pytest.mark.parametrize("fields,message", BAD)
def test_bad_requests_are_invalid_argument_naming_the_problem(cluster, fields, message):
    with grpc.insecure_channel(cluster.gateway_address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(gateway_pb2.GenerateRequest(**fields)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_stop_strings_and_logprobs(cluster, loaded, tokenizer):
    ids = chat(tokenizer, "What is the capital of France?")
    with grpc.insecure_channel(cluster.gateway_address) as ch:
        msgs = list(gateway_pb2_grpc.GatewayStub(ch).Generate(gateway_pb2.GenerateRequest(
            prompt_token_ids=ids, max_tokens=20, stop=[" Paris"], logprobs=True)))
    text = "".join(m.text for m in msgs)
    tokens = [t for m in msgs for t in m.token_ids]
    logprobs = [lp for m in msgs for lp in m.logprobs]
    assert text == "The capital of France is"
    assert msgs[-1].finish_reason == "stop"
    assert len(logprobs) == len(tokens) and all(lp <= 0 for lp in logprobs)
    eng = LLMEngine(ModelRunner(loaded.model, KVPool(loaded.layout, 64)))
    seq = eng.add_request("ref", ids, SamplingParams(max_tokens=len(tokens), logprobs=True))
    while eng.has_work:
        eng.step()
    assert seq.output == tokens
    assert logprobs == pytest.approx(seq.logprobs, abs=1e-4)


def test_top_k_one_is_greedy(cluster, client, tokenizer):
    ids = chat(tokenizer, "Name a colour.")
    greedy = client.generate(token_ids=ids, max_tokens=8)
    with grpc.insecure_channel(cluster.gateway_address) as ch:
        msgs = list(gateway_pb2_grpc.GatewayStub(ch).Generate(gateway_pb2.GenerateRequest(
            prompt_token_ids=ids, max_tokens=8, temperature=1.5, top_k=1, seed=9)))
    assert [t for m in msgs for t in m.token_ids] == greedy.token_ids


def test_temperature_sampling_is_reproducible_with_a_seed(client, tokenizer):
    ids = chat(tokenizer, "Invent a name for a train.")
    a = client.generate(token_ids=ids, max_tokens=12, temperature=1.0, seed=42)
    b = client.generate(token_ids=ids, max_tokens=12, temperature=1.0, seed=42)
    assert a.token_ids == b.token_ids


def _generate_stream(cluster, ids, rid, max_tokens):
    ch = grpc.insecure_channel(cluster.gateway_address)
    return ch, gateway_pb2_grpc.GatewayStub(ch).Generate(gateway_pb2.GenerateRequest(
        prompt_token_ids=ids, max_tokens=max_tokens, request_id=rid), timeout=300)


def _pages_used(cluster) -> dict[str, float]:
    return {s.name: service_metrics(cluster, s.name)["pdserve_kv_pages_used"]
            for s in cluster.services if s.name.startswith(("prefill", "decode"))}


def test_abort_mid_stream_ends_it_with_the_tokens_sent(cluster, tokenizer, client):
    ids = chat(tokenizer, "Write a long story about a railway.")
    ch, call = _generate_stream(cluster, ids, "abort-mid", 400)
    with ch:
        tokens, reason, aborted = [], "", False
        for msg in call:
            tokens.extend(msg.token_ids)
            reason = msg.finish_reason or reason
            if len(tokens) >= 5 and not reason and not aborted:
                # once: tokens already on their way may still come before the end, and a
                # second abort finds the request gone
                assert client.abort("abort-mid")
                aborted = True
    assert reason == "abort" and 5 <= len(tokens) < 400
    assert not client.abort("abort-mid")  # gone once it ended
    wait_until(lambda: not any(_pages_used(cluster).values()), 30, interval_s=0.2,
               what=lambda: f"every worker's pages free: {_pages_used(cluster)}")


def test_generate_cli_streams_text_and_prints_usage(cluster):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--address",
                        cluster.gateway_address, "What is the capital of France?"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."
    assert "[stop; prompt 37 tokens" in r.stderr and "8 generated" in r.stderr


def test_store_down_means_misses_not_failures(cluster, client, tokenizer):
    """Stops the kvstore process, then starts a new one on the same data directory."""
    ids = chat(tokenizer, "Is the quiet carriage at the front?", system=SYSTEM_PROMPT)
    warm = client.generate(token_ids=ids, max_tokens=8, cache_salt="down")
    assert client.generate(token_ids=ids, max_tokens=8, cache_salt="down").cached_tokens > 0
    kv = cluster.service("kvstore")
    kv.terminate()
    kv.wait(15)
    assert kv.proc.returncode == 0  # graceful stop
    r = client.generate(token_ids=ids, max_tokens=8, cache_salt="down")
    assert r.cached_tokens == 0
    assert r.token_ids == warm.token_ids
    assert r.finish_reason in ("stop", "length")
    # A new store process on the same directory serves the blocks written before.
    cluster.restart_kvstore()
    # The gateway and prefill clients reconnect within a second (backoff capped at 1 s); until
    # then a request is a miss, with the same tokens.
    want = 64 * ((len(ids) - 1) // 64)
    again = wait_until(lambda: (r := client.generate(token_ids=ids, max_tokens=8,
                                                     cache_salt="down")).cached_tokens == want
                       and r, 30, interval_s=0.2, what="hits from the restarted store")
    assert again.token_ids == warm.token_ids


def test_live_replay_of_a_trace_slice_hits_the_ideal_share(cluster, tmp_path):
    import json as _json
    import subprocess
    import sys

    # Three conversations of growing prefixes, arrivals spaced so each prefill lands first.
    lines = []
    for turn in range(3):
        for conv in range(2):
            ids = list(range(1000 * (conv + 1), 1000 * (conv + 1) + 2 + turn))
            lines.append({"timestamp": (turn * 2 + conv) * 1500,
                          "input_length": 512 * len(ids) - 100,
                          "output_length": 4, "hash_ids": ids})
    trace = tmp_path / "slice.jsonl"
    trace.write_text("\n".join(_json.dumps(x) for x in lines))
    r = subprocess.run([sys.executable, "-m", "pdserve", "replay", str(trace), "--live",
                        "--address", cluster.gateway_address, "--concurrency", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = _json.loads(r.stdout)
    assert out["succeeded"] == 6 and out["failed"] == {}
    assert out["ideal_hit_share"] > 0.3
    assert out["hit_share"] == out["ideal_hit_share"]


def test_prefill_workers_spin_briefly_and_decode_workers_keep_the_default(cluster):
    """`pdserve up` shares one machine's cores between workers: prefill's OpenMP threads spin
    briefly between parallel regions, then sleep (PREFILL_OMP_ENV); decode's keep libgomp's
    default (a long spin, then sleep); a setting of the user's own wins."""
    from pdserve.cluster import PREFILL_OMP_ENV

    def env_of(name):
        raw = open(f"/proc/{cluster.service(name).proc.pid}/environ", "rb").read()
        return dict(kv.split("=", 1) for kv in raw.decode().split("\0") if "=" in kv)

    assert PREFILL_OMP_ENV == {"GOMP_SPINCOUNT": "10000"}
    want = os.environ.get("GOMP_SPINCOUNT",
                          None if "OMP_WAIT_POLICY" in os.environ else "10000")
    assert env_of("prefill-0").get("GOMP_SPINCOUNT") == want
    assert env_of("prefill-0").get("OMP_WAIT_POLICY") == os.environ.get("OMP_WAIT_POLICY")
    assert env_of("decode-0").get("GOMP_SPINCOUNT") == os.environ.get("GOMP_SPINCOUNT")
