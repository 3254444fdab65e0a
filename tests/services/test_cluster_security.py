"""Authentication, transport security and input limits on the real system: mutual TLS inside
the cluster, TLS + bearer tokens at the gateway, tenants isolated, every limit named."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.client import Client
from pdserve.v1 import gateway_pb2
from tests.certs import make_certs
from tests.helpers import wait_until

pytestmark = pytest.mark.integration  # starts processes

TOKEN_A = "token-of-tenant-a-0123456789"
TOKEN_B = "token-of-tenant-b-0123456789"
TOKEN_ADMIN = "token-of-the-operator-012345"


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    from pdserve.cluster import LocalCluster
    from pdserve.config import UpSettings

    d = tmp_path_factory.mktemp("secure")
    certs = make_certs(d / "certs")
    tokens = d / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [
        {"token": TOKEN_A, "tenant": "a"}, {"token": TOKEN_B, "tenant": "b"},
        {"token": TOKEN_ADMIN, "tenant": "ops", "admin": True}]}))
    c = LocalCluster(
        UpSettings(data_dir=d / "data", port=0, tls_cert_file=certs / "cluster.pem",
                   tls_key_file=certs / "cluster.key", tls_ca_file=certs / "ca.pem"),
        progress=False,
        extra_env={"PDSERVE_AUTH_TOKENS_FILE": str(tokens), "PDSERVE_MAX_PROMPT_TOKENS": "1000",
                   "PDSERVE_MAX_TOKENS_LIMIT": "256", "PDSERVE_MAX_MESSAGE_BYTES": "65536",
                   "PDSERVE_MAX_STREAMS_PER_CLIENT": "2", "PDSERVE_RATE_LIMIT_RPS": "2",
                   "PDSERVE_RATE_LIMIT_BURST": "40"})
    c.start()
    c.certs = certs
    yield c
    c.stop()


def client(c, token=None) -> Client:
    return Client(c.gateway_address, tls_ca=c.certs / "ca.pem", token=token)


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details() or ""


def test_no_token_or_a_wrong_token_is_unauthenticated(secure):
    with client(secure) as c:
        code, msg = code_of(lambda: c.generate(prompt="hi", max_tokens=2))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: missing" in msg
    with client(secure, token="not-a-known-token-at-all") as c:
        code, msg = code_of(lambda: c.generate(prompt="hi", max_tokens=2))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown token" in msg
        code, _ = code_of(lambda: c.stub.Stats(gateway_pb2.ClusterStatsRequest(),
                                               metadata=c.metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with client(secure, token=TOKEN_A) as c:
        r = c.generate(prompt="What is the capital of France?", max_tokens=4)
    assert r.completion_tokens > 0


def store_blocks(c) -> int:
    from pdserve.services.security import sync_channel
    from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc

    with sync_channel(c.kvstore_address, c.tls) as ch:
        return kvstore_pb2_grpc.KVStoreStub(ch).Stats(kvstore_pb2.StatsRequest()).num_blocks


def in_flight(c) -> int:
    """The gateway's requests in flight, asked with the client's own token."""
    return c.stub.Stats(gateway_pb2.ClusterStatsRequest(), metadata=c.metadata).requests_in_flight


def wait_blocks(c, n: int) -> None:
    # blocks reach the store in the background
    wait_until(lambda: store_blocks(c) >= n, 30, what=f"the store holding {n} blocks")


def test_tenants_never_hit_each_others_cache(secure):
    prompt = [1000 + (i * 7919) % 30000 for i in range(300)]
    n0 = store_blocks(secure)
    with client(secure, token=TOKEN_A) as a, client(secure, token=TOKEN_B) as b:
        assert a.generate(token_ids=prompt, max_tokens=2).cached_tokens == 0
        wait_blocks(secure, n0 + 4)
        assert a.generate(token_ids=prompt, max_tokens=2).cached_tokens == 256
        # Same prompt, same (empty) cache_salt, another tenant: no hit, and its own blocks.
        assert b.generate(token_ids=prompt, max_tokens=2).cached_tokens == 0
        wait_blocks(secure, n0 + 8)
        assert b.generate(token_ids=prompt, max_tokens=2).cached_tokens == 256


def health(address: str, creds: grpc.ChannelCredentials | None) -> int:
    opts = [("grpc.ssl_target_name_override", "pdserve-internal")]
    ch = (grpc.secure_channel(address, creds, options=opts) if creds
          else grpc.insecure_channel(address))
    with ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
        return r.status


def test_internal_ports_refuse_peers_without_the_cluster_credential(secure):
    certs = secure.certs
    ca = (certs / "ca.pem").read_bytes()
    member = grpc.ssl_channel_credentials(ca, (certs / "cluster.key").read_bytes(),
                                          (certs / "cluster.pem").read_bytes())
    no_cert = grpc.ssl_channel_credentials(ca)
    rogue = grpc.ssl_channel_credentials(ca, (certs / "rogue.key").read_bytes(),
                                         (certs / "rogue.pem").read_bytes())
    internal = [f"127.0.0.1:{s.port}" for s in secure.services if s.name != "gateway"]
    internal.append(secure.gateway_internal_address)
    assert secure.gateway_internal_address != secure.gateway_address
    for addr in internal:
        assert health(addr, member) == health_pb2.HealthCheckResponse.SERVING, addr
        for creds in (None, no_cert, rogue):  # plaintext, TLS without a cert, a foreign cert
            with pytest.raises(grpc.RpcError) as e:
                health(addr, creds)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, addr
    # The public port speaks TLS only, without client certificates.
    with pytest.raises(grpc.RpcError):
        health(secure.gateway_address, None)
    assert health(secure.gateway_address, no_cert) == health_pb2.HealthCheckResponse.SERVING


def test_analytics_and_abort_stay_within_the_tenant(secure):
    with client(secure, token=TOKEN_A) as a:
        stub = a.stub
        code, msg = code_of(lambda: stub.QueryAnalytics(
            gateway_pb2.AnalyticsRequest(query="hit_share_by_tenant", params={"tenant": "b"}),
            metadata=a.metadata))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "params.tenant" in msg
        rows = stub.QueryAnalytics(gateway_pb2.AnalyticsRequest(query="hit_share_by_tenant"),
                                   metadata=a.metadata).rows
        assert [r.values[0].s for r in rows] == ["a"]
    with client(secure, token=TOKEN_ADMIN) as ops:
        rows = ops.stub.QueryAnalytics(gateway_pb2.AnalyticsRequest(query="hit_share_by_tenant"),
                                       metadata=ops.metadata).rows
        assert {"a", "b"} <= {r.values[0].s for r in rows}
    # b cannot abort a's request
    with client(secure, token=TOKEN_A) as a, client(secure, token=TOKEN_B) as b:
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("r", a.generate(
            token_ids=[500] * 20, max_tokens=200, request_id="a-long")))
        t.start()
        wait_until(lambda: in_flight(a) == 1, 30, what="a's request running")
        assert b.abort("a-long") is False
        assert a.abort("a-long") is True
        t.join(60)
        assert done["r"].finish_reason == "abort"


@pytest.mark.parametrize("kwargs,code,names", [
    ({"token_ids": [7] * 1001, "max_tokens": 4}, grpc.StatusCode.INVALID_ARGUMENT,
     "--max-prompt-tokens 1000"),
    ({"token_ids": [7] * 10, "max_tokens": 300}, grpc.StatusCode.INVALID_ARGUMENT,
     "--max-tokens-limit 256"),
    ({"token_ids": [40000] * 30000, "max_tokens": 4}, grpc.StatusCode.RESOURCE_EXHAUSTED,
     "65536"),
])
def test_input_limits_are_named(secure, kwargs, code, names):
    with client(secure, token=TOKEN_B) as c:
        got, msg = code_of(lambda: c.generate(**kwargs))
    assert got == code and names in msg


def test_concurrent_streams_per_client(secure):
    results = {}
    with client(secure, token=TOKEN_B) as c:
        threads = [threading.Thread(target=lambda i=i: results.setdefault(i, c.generate(
            token_ids=[600 + i] * 20, max_tokens=200, request_id=f"b-{i}"))) for i in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: in_flight(c) == 2, 30, what="both streams running")
        code, msg = code_of(lambda: c.generate(token_ids=[9] * 10, max_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams-per-client 2" in msg and "'b'" in msg
        for i in range(2):
            c.abort(f"b-{i}")
        for t in threads:
            t.join(60)
    # another tenant was never limited by b's streams
    with client(secure, token=TOKEN_A) as a:
        assert a.generate(token_ids=[9] * 10, max_tokens=2).completion_tokens > 0


def test_request_rate_per_client(secure):
    """Runs last: it spends tenant ops's burst. Refused calls count as the limit says."""
    with client(secure, token=TOKEN_ADMIN) as c:
        outcomes = []
        for _ in range(60):
            try:
                c.generate(token_ids=[5], max_tokens=-1)
            except grpc.RpcError as e:
                outcomes.append((e.code(), e.details()))
    invalid = [m for code, m in outcomes if code == grpc.StatusCode.INVALID_ARGUMENT]
    limited = [m for code, m in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert 40 <= len(invalid) <= 45 and len(invalid) + len(limited) == 60
    assert "--rate-limit-rps 2" in limited[0] and "retry in" in limited[0]


def test_the_http_edge_takes_the_same_tokens_over_tls(secure):
    """The OpenAI-compatible edge serves TLS with the gateway's certificate and the same bearer
    tokens: an unknown token is the SDK's AuthenticationError, a tenant's token is answered."""
    import ssl

    import openai

    ctx = ssl.create_default_context(cafile=str(secure.certs / "ca.pem"))
    ctx.check_hostname = False  # the certificate names the cluster, not 127.0.0.1
    assert secure.http_url.startswith("https://")

    def api(token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=secure.http_url + "/v1", api_key=token, max_retries=0,
                             http_client=openai.DefaultHttpxClient(verify=ctx))

    with pytest.raises(openai.AuthenticationError) as e:
        api("not-a-known-token-at-all").chat.completions.create(
            model="", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        api("not-a-known-token-at-all").models.list()
    good = api(TOKEN_A)
    model = good.models.list().data[0].id
    r = good.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_the_http_edge_answers_a_full_client_with_429_and_a_retry_hint(secure):
    """Two streams per client (PDSERVE_MAX_STREAMS_PER_CLIENT): a third is a 429 carrying
    retry-after-ms, which the openai client reads."""
    import ssl

    import openai

    ctx = ssl.create_default_context(cafile=str(secure.certs / "ca.pem"))
    ctx.check_hostname = False
    api = openai.OpenAI(base_url=secure.http_url + "/v1", api_key=TOKEN_B, max_retries=0,
                        http_client=openai.DefaultHttpxClient(verify=ctx))
    model = api.models.list().data[0].id
    streams = [api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "count"}], max_tokens=200,
        temperature=0, stream=True, extra_body={"ignore_eos": True}) for _ in range(2)]
    try:
        for s in streams:  # both hold their slot: the first chunk is out
            next(iter(s))
        with pytest.raises(openai.RateLimitError) as e:
            api.chat.completions.create(model=model, max_tokens=2,
                                        messages=[{"role": "user", "content": "hi"}])
        assert int(e.value.response.headers["retry-after-ms"]) > 0
        assert e.value.response.headers["retry-after"]
    finally:
        for s in streams:
            s.close()
