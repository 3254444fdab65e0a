"""The gateway's OpenAI-compatible HTTP edge against a real `pdserve up`, through the real
openai client: the same answers, usage and ledger rows as the gRPC API, errors as the SDK's
exceptions naming the field, a client that goes away cancelling its request, and a graceful
stop."""

from __future__ import annotations

import signal
import threading
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.cache.ledger import run_query
from pdserve.client import Client
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.helpers import local_cluster, wait_until

pytestmark = pytest.mark.integration  # starts processes

QUESTION = "What is the capital of France?"
# A prompt of more than two 64-token blocks, for cache hits.
LONG = ("You are a careful assistant who answers in one short sentence. " * 12
        + "Which river runs through Paris?")


@pytest.fixture(scope="module")
def api(cluster):
    return openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(api):
    (card,) = api.models.list().data
    return card.id


def ledger(cluster, rid: str) -> dict:
    with grpc.insecure_channel(cluster.gateway_address) as ch:  # writes queued ledger rows
        gateway_pb2_grpc.GatewayStub(ch).QueryAnalytics(
            gateway_pb2.AnalyticsRequest(query="status_counts"))
    cols = ("status", "prompt_tokens", "cached_tokens", "completion_tokens")
    _, rows = run_query(cluster.data_dir, f"SELECT {', '.join(cols)} FROM requests "
                                          f"WHERE request_id = '{rid}'")
    assert len(rows) == 1, rows
    return dict(zip(cols, rows[0]))


def test_models_and_health(cluster, api, model):
    assert model.startswith("SmolLM2-135M-Instruct")
    with urllib.request.urlopen(cluster.http_url + "/health", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(cluster.http_url + "/metrics", timeout=10) as r:
        assert b"pdserve_requests_total" in r.read()


def test_chat_and_completions_answer_as_grpc_does(cluster, api, model):
    with Client(cluster.gateway_address) as c:
        want = c.generate(prompt=QUESTION, max_tokens=16)
        ids = c.generate(token_ids=[1, 504, 3458, 282], max_tokens=8)
    messages = [{"role": "user", "content": QUESTION}]
    whole = api.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                        temperature=0)
    assert whole.choices[0].message.content == want.text
    assert whole.choices[0].finish_reason == want.finish_reason
    assert whole.usage.prompt_tokens == want.prompt_tokens
    assert whole.usage.completion_tokens == len(want.token_ids)
    chunks = list(api.chat.completions.create(
        model=model.split("@")[0], messages=messages, max_completion_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    done = api.completions.create(model=model, prompt=[1, 504, 3458, 282], max_tokens=8,
                                  temperature=0)
    assert done.choices[0].text == ids.text and done.usage.completion_tokens == 8
    streamed = "".join(ch.choices[0].text for ch in api.completions.create(
        model=model, prompt=[1, 504, 3458, 282], max_tokens=8, temperature=0, stream=True)
        if ch.choices)
    assert streamed == ids.text


def test_cached_tokens_equal_grpc_and_the_ledger(cluster, api, model):
    messages = [{"role": "user", "content": LONG}]
    first = api.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=4, temperature=0,
        extra_headers={"X-Request-Id": "edge-cold"})
    assert first.headers["x-request-id"] == "edge-cold"
    cold = first.parse()
    assert cold.id == "chatcmpl-edge-cold"
    assert cold.usage.prompt_tokens_details.cached_tokens == 0  # present, 0 included
    warm = api.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                       temperature=0, extra_headers={"X-Request-Id": "edge-warm"})
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached >= 128 and cached % 64 == 0 and cached <= warm.usage.prompt_tokens
    extra = warm.usage.model_extra or {}  # DeepSeek's names
    assert extra["prompt_cache_hit_tokens"] == cached
    assert extra["prompt_cache_miss_tokens"] == warm.usage.prompt_tokens - cached
    row = ledger(cluster, "edge-warm")
    assert (row["status"], row["prompt_tokens"], row["cached_tokens"],
            row["completion_tokens"]) == ("OK", warm.usage.prompt_tokens, cached,
                                          warm.usage.completion_tokens)
    with Client(cluster.gateway_address) as c:
        again = c.generate(prompt=LONG, max_tokens=4)
    assert again.cached_tokens == cached and again.text == warm.choices[0].message.content


@pytest.mark.parametrize("kw, param", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=2), "n"),
    (dict(top_logprobs=3, logprobs=True), "top_logprobs"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0].type"),
    (dict(messages=[]), "messages"),
    (dict(max_tokens=100000), "max_tokens"),
    (dict(temperature=-1), "temperature"),
])
def test_bad_requests_raise_bad_request_naming_the_field(api, model, kw, param):
    args = {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(**args)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body


def test_unknown_model_is_not_found(api):
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="gpt-nothing", messages=[{"role": "user",
                                                                     "content": "hi"}])
    assert e.value.param == "model"


def test_extensions_ignore_eos_min_tokens_and_an_explicit_zero_seed(cluster, api, model):
    messages = [{"role": "user", "content": QUESTION}]
    short = api.chat.completions.create(model=model, messages=messages, max_tokens=40,
                                        temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20
    longer = api.chat.completions.create(model=model, messages=messages, max_tokens=40,
                                         temperature=0, extra_body={"min_tokens": 20})
    assert longer.usage.completion_tokens >= 20
    fixed = api.chat.completions.create(model=model, messages=messages, max_tokens=30,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert fixed.usage.completion_tokens == 30 and fixed.choices[0].finish_reason == "length"
    # temperature absent = OpenAI's 1.0 (sampled); seed 0 is a seed, not "unset".
    a, b = (api.chat.completions.create(model=model, messages=messages, max_tokens=12, seed=0)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    with Client(cluster.gateway_address) as c:
        seeded = c.generate(prompt=QUESTION, max_tokens=12, temperature=1.0, seed=0)
    assert seeded.text == a.choices[0].message.content


def test_a_client_that_goes_away_cancels_its_request(cluster, api, model):
    stream = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=400,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": "edge-gone"})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()

    def decode_pages_free() -> bool:
        with grpc.insecure_channel(cluster.gateway_address) as ch:
            st = gateway_pb2_grpc.GatewayStub(ch).Stats(gateway_pb2.ClusterStatsRequest())
        return all(w.free_pages == w.total_pages for w in st.workers if w.role == "decode")

    wait_until(decode_pages_free, 30, what="the decode pages freed")
    wait_until(lambda: ledger(cluster, "edge-gone")["status"] == "CANCELLED", 30,
               what="a CANCELLED ledger row")
    assert ledger(cluster, "edge-gone")["completion_tokens"] < 400


def test_sigterm_drains_http_and_grpc_gracefully(tmp_path):
    """Streams in flight when the gateway gets SIGTERM, one by HTTP and one by gRPC, finish
    whole; meanwhile /health says 503; then both ports close and the gateway exits 0. (HTTP
    requests run on the gateway's servicer, not on its gRPC server: on a slow machine the
    channels to the workers once closed under a stream the gRPC server's stop did not wait
    for.) The drain may take long here: a slow machine streams a few tokens a second."""
    with local_cluster(tmp_path, extra_env={"PDSERVE_DRAIN_TIMEOUT_S": "120"}) as c:
        api = openai.OpenAI(base_url=c.http_url + "/v1", api_key="unused", max_retries=0)
        model = api.models.list().data[0].id
        got: dict = {}

        def stream() -> None:
            chunks = list(api.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTION}],
                max_tokens=60, temperature=0, stream=True, extra_body={"ignore_eos": True},
                stream_options={"include_usage": True}))
            got["finish"] = [ch.choices[0].finish_reason for ch in chunks
                             if ch.choices and ch.choices[0].finish_reason]
            got["tokens"] = chunks[-1].usage.completion_tokens

        def grpc_stream() -> None:
            with Client(c.gateway_address) as g:
                got["grpc"] = g.generate(prompt=QUESTION, max_tokens=60, ignore_eos=True)

        threads = [threading.Thread(target=stream), threading.Thread(target=grpc_stream)]
        for t in threads:
            t.start()
        wait_until(lambda: busy(c, 2), 30, interval_s=0.02, what="both streams running")
        gw = c.service("gateway").proc
        gw.send_signal(signal.SIGTERM)
        codes = []

        def health() -> int:
            try:
                with urllib.request.urlopen(c.http_url + "/health", timeout=2) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code
            except OSError:
                return -1

        def grpc_health() -> int:
            try:
                with grpc.insecure_channel(c.gateway_address) as ch:
                    return health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=2).status
            except grpc.RpcError:
                return -1

        wait_until(lambda: codes.append(health()) or codes[-1] != 200, 10, interval_s=0.02,
                   what="/health leaving 200")
        # Out of readiness on the gRPC port too (the server stops only once the streams
        # have ended).
        wait_until(lambda: grpc_health() == health_pb2.HealthCheckResponse.NOT_SERVING, 10,
                   interval_s=0.02, what="gRPC health NOT_SERVING")
        for t in threads:
            t.join(60)
        assert 503 in codes, codes
        assert got.get("finish") == ["length"] and got.get("tokens") == 60, got  # whole
        assert got["grpc"].completion_tokens == 60 and got["grpc"].finish_reason == "length"
        assert wait_until(lambda: gw.poll() is not None, 30, what="the gateway exits") \
            is not None
        assert gw.returncode == 0
        assert health() == -1  # the HTTP port is closed


def busy(c, n: int = 1) -> bool:
    with grpc.insecure_channel(c.gateway_address) as ch:
        st = gateway_pb2_grpc.GatewayStub(ch).Stats(gateway_pb2.ClusterStatsRequest())
    return st.requests_in_flight >= n


def test_an_error_after_the_stream_started_is_an_error_event(tmp_path):
    """The only decode worker dies mid-stream (no other to migrate to): the stream ends with a
    `data: {"error": …}` event and [DONE], which the SDK raises as APIError; the ledger row
    says why."""
    with local_cluster(tmp_path) as c:
        api = openai.OpenAI(base_url=c.http_url + "/v1", api_key="unused", max_retries=0)
        model = api.models.list().data[0].id
        stream = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=300,
            temperature=0, stream=True, extra_body={"ignore_eos": True},
            extra_headers={"X-Request-Id": "edge-broken"})
        seen = 0
        with pytest.raises(openai.APIError) as e:
            for _ in stream:
                seen += 1
                if seen == 3:
                    c.kill("decode-0")
        assert seen >= 3 and e.value.message  # the error event's message, raised
        row = ledger(c, "edge-broken")
        assert row["status"] not in ("OK", "CANCELLED") and row["completion_tokens"] < 300
