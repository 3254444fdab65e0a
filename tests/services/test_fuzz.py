"""Fuzzing every public and internal RPC of a running cluster with random messages (built from
the protobuf descriptors, extremes included) and with random bytes that are not protobuf at
all: every call ends with a status, every service keeps serving, and no process grows without
bound."""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.client import Client
from pdserve.v1 import (
    decode_pb2,
    gateway_pb2,
    kvstore_pb2,
    prefill_pb2,
    registry_pb2,
)

pytestmark = pytest.mark.integration  # starts processes

SCALARS = {
    F.TYPE_INT32: st.integers(-(2**31), 2**31 - 1), F.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1), F.TYPE_UINT32: st.integers(0, 2**32 - 1),
    F.TYPE_FIXED32: st.integers(0, 2**32 - 1), F.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1), F.TYPE_SFIXED64: st.integers(-(2**63),
                                                                                  2**63 - 1),
    F.TYPE_UINT64: st.integers(0, 2**64 - 1), F.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    F.TYPE_BOOL: st.booleans(), F.TYPE_FLOAT: st.floats(width=32), F.TYPE_DOUBLE: st.floats(),
    F.TYPE_STRING: st.text(max_size=40), F.TYPE_BYTES: st.binary(max_size=80),
    F.TYPE_ENUM: st.integers(0, 3),
}


def message(desc, depth: int = 0) -> st.SearchStrategy:
    """Any message of this type: each field unset or random, repeated fields up to 300 long."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(desc)
    fields = {}
    for fd in desc.fields:
        if fd.type == F.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                fields[fd.name] = st.dictionaries(st.text(max_size=10), st.text(max_size=20),
                                                  max_size=4)
                continue
            if depth >= 3:
                continue
            base = message(fd.message_type, depth + 1)
        else:
            base = SCALARS[fd.type]
        repeated = fd.is_repeated
        fields[fd.name] = st.lists(base, max_size=300 if fd.type != F.TYPE_MESSAGE else 4) \
            if repeated else base
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: cls(**kw))


UNARY = [
    ("gateway", "/pdserve.v1.Gateway/Abort", gateway_pb2.AbortRequest),
    ("gateway", "/pdserve.v1.Gateway/Stats", gateway_pb2.ClusterStatsRequest),
    ("gateway", "/pdserve.v1.Gateway/QueryAnalytics", gateway_pb2.AnalyticsRequest),
    ("prefill-0", "/pdserve.v1.Prefill/Prefill", prefill_pb2.PrefillRequest),
    ("decode-0", "/pdserve.v1.Decode/Reserve", decode_pb2.ReserveRequest),
    ("decode-0", "/pdserve.v1.Decode/Release", decode_pb2.ReleaseRequest),
    ("decode-0", "/pdserve.v1.Decode/Renew", decode_pb2.RenewRequest),
    ("kvstore", "/pdserve.v1.KVStore/Lookup", kvstore_pb2.LookupRequest),
    ("kvstore", "/pdserve.v1.KVStore/Stats", kvstore_pb2.StatsRequest),
    ("kvstore", "/pdserve.v1.KVStore/Stage", kvstore_pb2.StageRequest),
]
SERVER_STREAM = [
    ("gateway", "/pdserve.v1.Gateway/Generate", gateway_pb2.GenerateRequest),
    ("decode-0", "/pdserve.v1.Decode/Stream", decode_pb2.StreamRequest),
    ("kvstore", "/pdserve.v1.KVStore/Get", kvstore_pb2.GetRequest),
]
CLIENT_STREAM = [
    ("kvstore", "/pdserve.v1.KVStore/Put", kvstore_pb2.Block),
    ("gateway", "/pdserve.v1.Registry/Join", registry_pb2.WorkerMessage),
]
BIDI = [
    ("prefill-0", "/pdserve.v1.Prefill/PrefillStage", prefill_pb2.PipelineStageRequest),
]
ALL = UNARY + SERVER_STREAM + CLIENT_STREAM + BIDI


def test_every_rpc_of_every_service_is_fuzzed():
    """A method added to a .proto joins the fuzzing, or this fails."""
    served = {f"/{svc.full_name}/{m.name}"
              for mod in (gateway_pb2, prefill_pb2, decode_pb2, kvstore_pb2, registry_pb2)
              for svc in mod.DESCRIPTOR.services_by_name.values() for m in svc.methods}
    assert {m for _, m, _ in ALL} == served
FUZZ = settings(max_examples=int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "25")), deadline=None,
                suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def channels(cluster):
    chans = {s.name: grpc.insecure_channel(f"127.0.0.1:{s.port}") for s in cluster.services}
    yield chans
    for ch in chans.values():
        ch.close()


@pytest.fixture(scope="module")
def rss_before(cluster):
    return {s.name: rss(s.proc.pid) for s in cluster.services}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def call(chans, service: str, method: str, payload, kind: str, raw: bool = False) -> None:
    ch = chans[service]
    ser = (lambda b: b) if raw else (lambda m: m.SerializeToString())
    try:
        if kind == "unary":
            ch.unary_unary(method, request_serializer=ser)(payload, timeout=20)
        elif kind == "server":
            for _ in zip(range(50), ch.unary_stream(method, request_serializer=ser)(
                    payload, timeout=20)):
                pass
        elif kind == "client":
            ch.stream_unary(method, request_serializer=ser)(iter(payload), timeout=20)
        else:
            for _ in zip(range(50), ch.stream_stream(method, request_serializer=ser)(
                    iter(payload), timeout=20)):
                pass
    except grpc.RpcError as e:
        # A status, not a crash: the call was refused, failed cleanly or ran out of time.
        assert e.code() != grpc.StatusCode.UNKNOWN, (method, e.details())


def assert_all_serving(cluster, chans) -> None:
    for s in cluster.services:
        assert s.proc.poll() is None, f"{s.name} died: {s.log_tail()}"
        r = health_pb2_grpc.HealthStub(chans[s.name]).Check(
            health_pb2.HealthCheckRequest(), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING, s.name


@pytest.mark.parametrize("service,method,cls", UNARY + SERVER_STREAM,
                         ids=[m for _, m, _ in UNARY + SERVER_STREAM])
def test_random_messages(cluster, channels, rss_before, service, method, cls):
    kind = "unary" if (service, method, cls) in UNARY else "server"

    @FUZZ
    @given(message(cls.DESCRIPTOR))
    def run(msg):
        call(channels, service, method, msg, kind)

    run()
    assert_all_serving(cluster, channels)


@pytest.mark.parametrize("service,method,cls", CLIENT_STREAM + BIDI,
                         ids=[m for _, m, _ in CLIENT_STREAM + BIDI])
def test_random_message_streams(cluster, channels, service, method, cls):
    kind = "client" if (service, method, cls) in CLIENT_STREAM else "bidi"

    @FUZZ
    @given(st.lists(message(cls.DESCRIPTOR), max_size=6))
    def run(msgs):
        call(channels, service, method, msgs, kind)

    run()
    assert_all_serving(cluster, channels)


@pytest.mark.parametrize("service,method,cls", ALL, ids=[m for _, m, _ in ALL])
def test_bytes_that_are_not_protobuf(cluster, channels, service, method, cls):
    kind = ("unary" if (service, method, cls) in UNARY else
            "server" if (service, method, cls) in SERVER_STREAM else
            "client" if (service, method, cls) in CLIENT_STREAM else "bidi")

    @FUZZ
    @given(st.binary(min_size=1, max_size=2000))
    def run(data):
        call(channels, service, method, [data] if kind in ("client", "bidi") else data, kind,
             raw=True)

    run()
    assert_all_serving(cluster, channels)


def test_after_the_fuzzing_the_cluster_still_answers_and_did_not_balloon(cluster, channels,
                                                                          rss_before):
    assert_all_serving(cluster, channels)
    with Client(cluster.gateway_address) as c:
        r = c.generate(prompt="What is the capital of France?", max_tokens=8)
    assert "Paris" in r.text
    for s in cluster.services:
        grown = rss(s.proc.pid) - rss_before[s.name]
        assert grown < 1 << 30, f"{s.name} grew by {grown >> 20} MiB"
