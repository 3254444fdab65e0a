"""The pure parts of a request's way through the services: admission, the retry policy, miss
reasons, the outboxes, and the one mapping of errors to gRPC statuses (with blame carried in
metadata, over a real gRPC server on port 0)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
import pytest

from pdserve.cache.block_hash import block_hashes, hash_namespace
from pdserve.cache.ledger import MissReason
from pdserve.engine.files import load_tokenizer
from pdserve.engine.sampling import FinishReason
from pdserve.engine.sequence import TokenEvent
from pdserve.scheduler.errors import NoRoom, NoWorker
from pdserve.scheduler.registry import Role, WorkerRegistry, WorkerSpec
from pdserve.services.errors import (
    Fault,
    InvalidArgument,
    TransferError,
    answers_errors,
    fault_of,
    status_of,
)
from pdserve.services.gateway.accounting import Accounting
from pdserve.services.gateway.admission import admit
from pdserve.services.gateway.policy import Next, RetryBudget
from pdserve.services.kvstore_client import LookupResult
from pdserve.services.limits import MAX_REQUEST_ID
from pdserve.services.outbox import Outboxes
from pdserve.services.server import create_server
from pdserve.v1 import decode_pb2_grpc, gateway_pb2

VOCAB, CONTEXT = 1000, 100


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def req(**kw: object) -> gateway_pb2.GenerateRequest:
    fields: dict[str, object] = dict(prompt_token_ids=[1, 2, 3], max_tokens=4)
    fields.update(kw)
    return gateway_pb2.GenerateRequest(**fields)


# -- admission --------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(prompt_token_ids=[]), "prompt: empty"),
    (dict(prompt="hi"), "send exactly one"),
    (dict(request_id="x" * (MAX_REQUEST_ID + 1)), f"limit {MAX_REQUEST_ID}"),
    (dict(temperature=-1), "temperature: -1"),
    (dict(max_tokens=0), "max_tokens: 0"),
    (dict(top_k=VOCAB + 1), "top_k: 1001"),
    (dict(top_p=1.5), "top_p: 1.5"),
    (dict(stop_token_ids=[VOCAB]), "stop_token_ids: token id 1000"),
    (dict(stop=[""]), "stop[0]: 0 characters"),
    (dict(prompt_token_ids=[5, VOCAB + 3]), "token id 1003 outside the vocabulary"),
    (dict(max_tokens=98), "context limit 100"),
])
def test_admission_refuses_naming_the_field_and_the_limit(fields, message):
    with pytest.raises(InvalidArgument) as e:
        admit(req(**fields), None, VOCAB, CONTEXT)
    assert message in e.value.message and e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_admission_applies_the_gateway_limits_and_the_chat_template(tok):
    with pytest.raises(InvalidArgument, match="--max-prompt-tokens 2"):
        admit(req(), None, VOCAB, CONTEXT, max_prompt_tokens=2)
    with pytest.raises(InvalidArgument, match="--max-tokens-limit 3"):
        admit(req(), None, VOCAB, CONTEXT, max_tokens_limit=3)
    with pytest.raises(InvalidArgument, match="no tokenizer"):
        admit(req(prompt_token_ids=[], prompt="hi"), None, VOCAB, CONTEXT)
    a = admit(req(prompt_token_ids=[], prompt="Hello", top_p=0.0), tok, tok.vocab_size, 8192)
    assert a.prompt == tok.apply_chat_template([{"role": "user", "content": "Hello"}],
                                               add_generation_prompt=True)
    assert a.top_p == 1.0 and a.max_tokens == 4  # 0 = no limit


# -- the retry policy -------------------------------------------------------------------------
def test_retries_before_the_first_token_migrations_after_it():
    b = RetryBudget.of(prefill_retries=1, migrate=True, migrate_retries=2)
    assert b.after(0) is Next.RETRY
    assert b.after(0) is Next.FAIL  # the one retry is spent
    assert b.after(3) is Next.MIGRATE
    assert b.after(3) is Next.MIGRATE  # a migration's prefill failed
    assert b.after(3) is Next.FAIL  # both migrations spent
    assert RetryBudget.of(2, migrate=False, migrate_retries=2).after(1) is Next.FAIL


# -- miss reasons ---------------------------------------------------------------------------------
def test_the_gateway_names_each_miss_reason():
    ns = hash_namespace("m", "fp")
    spec = WorkerSpec("p", Role.PREFILL, "x:1", 1, ns, "fp", 64, 10, 8192, 1000)
    acct = Accounting(WorkerRegistry(), None, None, None)
    prompt = list(range(300))  # 4 cacheable blocks

    def why(found: LookupResult, cached: int, salt: str = "", tenant: str = "") -> MissReason:
        keys = block_hashes(ns, salt, prompt, 64)
        return acct.miss_reason(spec, salt, prompt, keys, 4, found, cached, tenant)

    assert why(LookupResult(None), 0) is MissReason.STORE_UNAVAILABLE
    assert why(LookupResult(0), 0) is MissReason.NEVER_SEEN  # and now the gateway saw it
    assert why(LookupResult(4), 4) is MissReason.PARTIAL_BLOCK
    assert why(LookupResult(3), 1) is MissReason.FETCH_FAILED
    assert why(LookupResult(2, True), 2) is MissReason.EVICTED
    assert why(LookupResult(0), 0, salt="s2", tenant="t2") is MissReason.DIFFERENT_SALT


# -- outboxes ---------------------------------------------------------------------------------
async def test_outboxes_deliver_from_another_thread_in_order_and_drop_closed_ones():
    boxes = Outboxes()
    loop = asyncio.get_running_loop()
    a = boxes.open("a", loop)
    boxes.open("b", loop)
    with pytest.raises(KeyError):
        boxes.open("a", loop)
    events = [TokenEvent("a", t, None) for t in range(5)] + [TokenEvent("b", 9, None)]
    boxes.close("b")
    t = threading.Thread(target=boxes.deliver, args=([(e.request_id, e) for e in events],))
    t.start()
    t.join()
    got = [await asyncio.wait_for(a.get(), 10) for _ in range(5)]
    assert [g.token for g in got if isinstance(g, TokenEvent)] == [0, 1, 2, 3, 4]
    assert a.queue.empty() and len(boxes) == 1
    a.put(TokenEvent("a", 5, FinishReason.STOP))
    last = await asyncio.wait_for(a.get(), 10)
    assert isinstance(last, TokenEvent) and last.finish_reason is FinishReason.STOP


async def test_a_box_that_ended_before_its_reader_came_is_still_read_whole():
    """A decode request of one token ends when its KV lands, maybe before the gateway's Stream
    reaches the worker: the late reader gets every message (and then it is gone)."""
    boxes = Outboxes(linger_s=60.0, max_ended=2)
    loop = asyncio.get_running_loop()
    box = boxes.open("late", loop, claimed=False)
    boxes.deliver([("late", TokenEvent("late", 7, FinishReason.LENGTH))])
    boxes.close("late")  # the request ended: nobody claimed it yet
    assert boxes.get("late") is None
    got = boxes.claim("late")
    assert got is box
    msg = await asyncio.wait_for(got.get(), 10)
    assert isinstance(msg, TokenEvent) and msg.finish_reason is FinishReason.LENGTH
    assert boxes.claim("late") is None  # claimed once
    # A claimed box is not kept after it closes; unclaimed ones only up to max_ended.
    boxes.open("read", loop, claimed=False)
    assert boxes.claim("read") is not None
    boxes.close("read")
    assert boxes.claim("read") is None
    for rid in ("x", "y", "z"):
        boxes.open(rid, loop, claimed=False)
        boxes.close(rid)
    assert boxes.claim("x") is None and boxes.claim("z") is not None
    # Boxes a reader owns from the start (the default) are never kept.
    boxes.open("owned", loop)
    boxes.close("owned")
    assert boxes.claim("owned") is None


# -- errors to statuses -------------------------------------------------------------------------
def test_domain_errors_map_to_statuses_in_one_place():
    room = status_of(NoRoom(7))
    assert room is not None and room.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "7 free KV pages" in room.message and ("retry-after-ms", "500") in room.metadata
    worker = status_of(NoWorker("none"))
    assert worker is not None and worker.code == grpc.StatusCode.UNAVAILABLE
    transfer = status_of(TransferError("lease ended"))
    assert transfer is not None and (transfer.code, transfer.metadata) == (
        grpc.StatusCode.UNAVAILABLE, (("pdserve-fault", "decode"),))
    assert status_of(KeyError("a bug")) is None


class _Echo:
    """A unary and a streaming method that raise what they are asked to."""

    @answers_errors
    async def unary(self, request: bytes, context: object) -> bytes:
        raise self.errors[request]

    @answers_errors
    async def stream(self, request: bytes, context: object) -> AsyncIterator[bytes]:
        yield b"first"
        raise self.errors[request]

    errors = {b"transfer": TransferError("KV transfer failed"), b"bad": InvalidArgument("x: 3"),
              b"bug": ZeroDivisionError("a bug")}


async def test_a_status_carries_the_fault_over_grpc_and_a_bug_stays_unknown():
    echo = _Echo()
    handlers = grpc.method_handlers_generic_handler("t.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
        "Stream": grpc.unary_stream_rpc_method_handler(echo.stream)})
    server, port, _ = await create_server([lambda s: s.add_generic_rpc_handlers((handlers,))],
                                          [], "127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary = ch.unary_unary("/t.Echo/Unary")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await unary(b"transfer")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and fault_of(e.value) is Fault.DECODE
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await unary(b"bad")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fault_of(e.value) is None
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await unary(b"bug")
        assert e.value.code() == grpc.StatusCode.UNKNOWN  # a bug is not dressed up as a status
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for m in ch.unary_stream("/t.Echo/Stream")(b"bad"):
                got.append(m)
        assert got == [b"first"] and e.value.details() == "x: 3"
    await server.stop(0)


@pytest.mark.integration
def test_the_gateway_never_imports_torch():
    """The gateway serves the API and the balancers: a process of its own without torch."""
    import subprocess
    import sys

    code = ("import sys, pdserve.services.gateway.main, pdserve.cli\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


class _Decode(decode_pb2_grpc.DecodeServicer):
    """A decode worker's Reserve only (the other methods: UNIMPLEMENTED): refuses for room
    (as a worker whose pages went to requests another gateway placed) or grants; counts the
    calls. For the flow's state machine (RESERVE -> next candidate), over real gRPC."""

    def __init__(self, full: bool) -> None:
        self.full, self.calls = full, 0

    async def Reserve(self, request, context):
        self.calls += 1
        if self.full:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV pages: 0 free")
        from pdserve.v1 import common_pb2

        return common_pb2.Reservation(request_id=request.request_id)


async def test_a_refused_reservation_goes_to_the_next_decode_candidate():
    import time

    from pdserve.services.gateway.accounting import Outcome
    from pdserve.services.gateway.flow import Cluster, FlowSettings, GenerateFlow, InFlight
    from pdserve.services.gateway.flow import _Placement as Placement
    from pdserve.services.gateway.output import OutputText
    from pdserve.services.gateway.workers import WorkerClients
    from pdserve.v1 import common_pb2

    decoders, servers, registry = {}, [], WorkerRegistry()
    for wid, full in (("d-full-a", True), ("d-full-b", True), ("d-ok", False)):
        dec = decoders[wid] = _Decode(full)
        server, port, _ = await create_server(
            [lambda s, d=dec: decode_pb2_grpc.add_DecodeServicer_to_server(d, s)], [],
            "127.0.0.1", 0)
        servers.append(server)
        registry.join(WorkerSpec(wid, Role.DECODE, f"127.0.0.1:{port}", 1, "ns", "fp", 16, 100,
                                 CONTEXT, VOCAB), 0.0)
    p = registry.join(WorkerSpec("p0", Role.PREFILL, "127.0.0.1:1", 1, "ns", "fp", 16, 100,
                                 CONTEXT, VOCAB), 0.0)
    # The stale view: d-ok looks busiest, so both full workers are tried first.
    from pdserve.scheduler.registry import Load

    registry.report("d-ok", 1, Load(free_pages=50, total_pages=100, running=5), 0.0)
    clients = WorkerClients()
    cluster = Cluster(registry, None, clients, None, None,  # type: ignore[arg-type]
                      FlowSettings(5.0, 0, False, 1, 0, 1.0))
    spec = registry.workers["d-ok"].spec

    def flow() -> GenerateFlow:
        return GenerateFlow(cluster, Outcome(time.time(), time.monotonic(), "r", ""), spec,
                            [1, 2, 3], 4, "", common_pb2.SamplingParams(), OutputText(None, []),
                            False, InFlight())

    try:
        f = flow()
        first = registry.pick_decode(1)
        place = Placement([], 0, LookupResult(0), p, first, [], 0.0)
        _, res = await f._reserve_somewhere(place, "r", [1, 2, 3], common_pb2.SamplingParams(), 4)
        assert res.request_id == "r" and place.decode.spec.worker_id == "d-ok"
        assert f.rec.decode_worker == "d-ok"
        assert decoders["d-full-a"].calls == decoders["d-full-b"].calls == 1
        # Every candidate refuses: RESOURCE_EXHAUSTED for the client (NoRoom), each asked once.
        decoders["d-ok"].full = True
        f = flow()
        place = Placement([], 0, LookupResult(0), p, registry.pick_decode(1), [], 0.0)
        with pytest.raises(NoRoom):
            await f._reserve_somewhere(place, "r", [1, 2, 3], common_pb2.SamplingParams(), 4)
        assert [d.calls for d in decoders.values()] == [2, 2, 2]
    finally:
        await clients.close()
        for s in servers:
            await s.stop(0)
