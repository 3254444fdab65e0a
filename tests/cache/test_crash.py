"""Crash safety: SIGKILL a real kvstore process at random moments while a client writes; after
each restart every acknowledged (synced) block reads back byte-identical, and no read returns
bytes that differ from what was written."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import grpc
import pytest

from pdserve.cache.codec import encode_block
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from tests.helpers import start_store_process

pytestmark = pytest.mark.integration  # starts processes

KILLS = 20




def test_acknowledged_blocks_survive_sigkill(tmp_path):
    rng = random.Random(7)
    written: dict[bytes, bytes] = {}  # every value ever sent, acknowledged or not
    acked: set[bytes] = set()
    ready = tmp_path / "ready.json"
    counter = 0
    for _ in range(KILLS):
        proc, port = start_store_process(tmp_path, ready)
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        # Step 1: everything acknowledged before reads back exactly.
        keys = sorted(written)
        for i in range(0, len(keys), 32):
            group = keys[i:i + 32]
            got = {b.key: b.value for b in stub.Get(kvstore_pb2.GetRequest(keys=group))}
            present = stub.Lookup(kvstore_pb2.LookupRequest(keys=group, per_key=True)).present
            for k, p in zip(group, present):
                if k in acked:
                    assert p, "acknowledged block lost"
                if p:  # present: fetch it alone (Get stops at the first miss) and compare
                    v = got.get(k) or next(iter(stub.Get(kvstore_pb2.GetRequest(keys=[k])))).value
                    assert v == written[k], "a read returned bytes that were never written"
        # Step 2: write until killed at a random moment.
        stop = threading.Event()

        def writer(stop: threading.Event = stop, stub=stub) -> None:  # this round's
            nonlocal counter
            while not stop.is_set():
                counter += 1
                key = counter.to_bytes(32, "little")
                value = encode_block(key, "fp", 64, os.urandom(rng.randint(1, 64) * 1024))
                written[key] = value
                try:
                    stub.Put(iter([kvstore_pb2.Block(key=key, value=value, depth=0)]), timeout=5)
                except grpc.RpcError:
                    return
                acked.add(key)

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        t.join(10)
        ch.close()
    assert len(acked) > KILLS  # the loop really wrote
    proc, port = start_store_process(tmp_path, ready)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        present = stub.Lookup(kvstore_pb2.LookupRequest(keys=sorted(acked), per_key=True)).present
        assert all(present)
    proc.terminate()
    assert proc.wait(30) == 0
