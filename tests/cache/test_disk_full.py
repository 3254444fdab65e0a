"""Disk full: puts answer RESOURCE_EXHAUSTED, reads go on, health says writes are refused.
Runs the real kvstore on a small tmpfs (as root), or else under a file-size limit."""

from __future__ import annotations

import os
import resource
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.cache.codec import encode_block
from pdserve.services.kvstore.main import WRITE_HEALTH
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from tests.helpers import start_store_process, wait_until

pytestmark = pytest.mark.integration  # starts processes

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB filesystem, or None when mounting is not allowed here."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                       capture_output=True)
    yield mnt if r.returncode == 0 else None
    if r.returncode == 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_refuses_puts_and_keeps_serving_reads(small_disk, tmp_path, monkeypatch):
    data = small_disk or tmp_path
    if small_disk is None:  # fallback: a file-size limit makes large writes fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = 24 << 20
        monkeypatch.setattr(subprocess, "Popen", _limited_popen(limit))
    proc, port = start_store_process(data, tmp_path / "ready.json")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = kvstore_pb2_grpc.KVStoreStub(ch)
            stored = []
            refused = None
            for i in range(200):  # 200 x 1 MiB > 24 MiB
                key = (i + 1).to_bytes(32, "little")
                value = encode_block(key, "fp", 64, os.urandom(1 << 20))
                try:
                    stub.Put(iter([kvstore_pb2.Block(key=key, value=value)]), timeout=10)
                    stored.append((key, value))
                except grpc.RpcError as e:
                    refused = e
                    break
            assert refused is not None, "the small disk never filled"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(stored) >= 3
            # Reads go on, byte for byte.
            got = list(stub.Get(kvstore_pb2.GetRequest(keys=[k for k, _ in stored[:3]])))
            assert [b.value for b in got] == [v for _, v in stored[:3]]
            # Health: the store serves, writes are refused.
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.SERVING
            wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(
                service=WRITE_HEALTH)).status == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
                interval_s=0.1, what="write health NOT_SERVING")
            stats = stub.Stats(kvstore_pb2.StatsRequest())
            assert not stats.accepting_writes and stats.write_errors >= 1
            with pytest.raises(grpc.RpcError) as e:
                key = b"\x01" * 32
                stub.Put(iter([kvstore_pb2.Block(key=key, value=encode_block(key, "fp", 1, b"x"))]))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        proc.kill()
        proc.wait()


def _limited_popen(limit):
    real = subprocess.Popen

    def popen(*a, **kw):
        kw["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return real(*a, **kw)

    return popen
