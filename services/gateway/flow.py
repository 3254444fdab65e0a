"""One `Generate` through the gateway: an explicit state machine over its attempts.

    LOOKUP ──> PLACE ──> RESERVE ──> PREFILL ──> RELAY ──> DONE
      how much    prefill +   decode pages   prompt's KV     decode's tokens
      is cached   decode      set aside      computed,       streamed to the
      (kvstore)   workers     (NIXL descs)   WRITten, 1st    client as text
                  (balancers)                token streamed

In LOOKUP, a request whose next blocks past the store's an earlier request is computing now
(at least `prefix_wait_tokens` of them) waits for that request's prefill and looks again
(prefixes.py), so one burst of one new system prompt computes it once.

A step that fails because of a worker raises `WorkerFailed` (which worker, which role, the
status); the retry policy (policy.py) then starts another attempt on other workers, migrates
the request, or fails it with that status. What the client did wrong, or a cluster with no
room, ends the request at once (a ServiceError, answered by the servicer). Blame for a failed
prefill call comes from its status's metadata (`pdserve-fault`, services/errors.py), never from
its text. Each attempt runs under its own internal id (`<request_id>#<n>`), so a notice or a
WRITE of an abandoned attempt matches nothing; whatever happens, an attempt that did not finish
releases its decode reservation.

`Abort` may come in any phase: before PREFILL the flow stops at the next step; a PREFILL call
in progress is cancelled (the prefill worker drops a cancelled job); in RELAY the
decode worker's reservation is released, which ends its stream. Either way the request ends with
finish reason "abort", never with a retry.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import grpc

from pdserve.cache.block_hash import BlockHash, block_hashes, cacheable_blocks
from pdserve.metrics import GatewayMetrics
from pdserve.scheduler.balancers import attention_work, prefill_work, request_pages
from pdserve.scheduler.errors import NoRoom, NoWorker
from pdserve.scheduler.registry import Role, WorkerRegistry, WorkerSpec, WorkerState
from pdserve.services.errors import Fault, error_for, fault_of
from pdserve.services.gateway.accounting import Accounting, Outcome
from pdserve.services.gateway.output import OutputText
from pdserve.services.gateway.policy import Next, RetryBudget
from pdserve.services.gateway.prefixes import PrefixFlights
from pdserve.services.gateway.workers import WorkerClients, release
from pdserve.services.kvstore_client import KVStoreClient, LookupResult
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, prefill_pb2

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    DecodeStream = grpc.aio.UnaryStreamCall[decode_pb2.StreamRequest, decode_pb2.TokenChunk]

T = TypeVar("T")

STREAM_TIMEOUT_FACTOR = 10  # a decode stream may last this many internal-call deadlines


PUT_LAND_S = 1.0   # how long a waiter looks for blocks whose request answered (put in flight)
PUT_POLL_S = 0.01


class Phase(enum.Enum):
    LOOKUP = "lookup"
    PLACE = "place"
    RESERVE = "reserve"
    PREFILL = "prefill"
    RELAY = "relay"
    DONE = "done"


class Aborted(Exception):
    """The client aborted the request while a call for it was in progress."""


class DecodeFull(Exception):
    """A decode worker refused a reservation: it has no room for it now."""


class WorkerFailed(Exception):
    """A worker failed this attempt; another one may finish the request."""

    def __init__(self, role: Role, worker_id: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.role, self.worker_id, self.code, self.message = role, worker_id, code, message


@dataclass
class InFlight:
    """What `Abort` needs of a running request: where its tokens come from now."""

    tenant: str | None = None
    decode: decode_pb2_grpc.DecodeAsyncStub | None = None
    iid: str = ""  # the request's id on its current decode worker
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class FlowSettings:
    rpc_timeout_s: float
    prefill_retries: int
    migrate: bool
    migrate_retries: int
    prefix_wait_tokens: int  # see prefixes.py; 0: never wait
    prefix_wait_s: float     # the longest wait for another request's prefill


@dataclass
class Cluster:
    """What every request flow uses of the gateway."""

    registry: WorkerRegistry
    kvstore: KVStoreClient
    clients: WorkerClients
    acct: Accounting
    metrics: GatewayMetrics | None
    settings: FlowSettings
    flights: PrefixFlights = field(default_factory=PrefixFlights)


@dataclass
class _Placement:
    keys: list[BlockHash]
    cacheable: int
    found: LookupResult
    prefill: WorkerState
    decode: WorkerState
    stages: list[WorkerState]
    hold_s: float  # how long the prefill workers' order may hold the prompt (Load.may_hold)


class GenerateFlow:
    """One Generate across its attempts (a retry or a migration is another attempt)."""

    def __init__(self, cluster: Cluster, rec: Outcome, spec: WorkerSpec, prompt: list[int],
                 max_tokens: int, salt: str, sampling: common_pb2.SamplingParams,
                 text: OutputText, logprobs: bool, flight: InFlight) -> None:
        self.c = cluster
        self.rec = rec
        self.spec = spec  # the cluster's model: block size, hash namespace
        self.rid = rec.request_id
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.salt = salt
        self.sampling = sampling
        self.text = text
        self.logprobs = logprobs
        self.flight = flight
        self.out: list[int] = []            # tokens sent to the client
        self.attempt = 0
        self.excluded: set[str] = set()     # workers that failed this request
        self.reason = ""
        self.phase = Phase.LOOKUP
        self.computing: asyncio.Event | None = None  # this attempt's claim on its new blocks

    def _computed(self) -> None:
        """This attempt's prefill is over (or never comes): requests waiting for its blocks
        look again."""
        if self.computing is not None:
            self.c.flights.release(self.computing)
            self.computing = None

    async def run(self) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        s = self.c.settings
        budget = RetryBudget.of(s.prefill_retries, s.migrate, s.migrate_retries)
        while True:
            try:
                try:
                    async for msg in self._attempt():
                        yield msg
                finally:
                    self._computed()
                break
            except WorkerFailed as e:
                if self.flight.aborted.is_set():  # the abort broke the call: not a fault
                    self.reason = "abort"
                    break
                self.excluded.add(e.worker_id)
                if budget.after(len(self.out)) is Next.FAIL:
                    raise error_for(e.code, e.message) from None
                log.warning("retrying elsewhere", extra={
                    "request_id": self.rid, "stage": e.role.value, "worker": e.worker_id,
                    "tokens_sent": len(self.out), "why": e.message})
                self.rec.attempts += 1
                if self.c.metrics:
                    self.c.metrics.retries.labels(e.role.value).inc()
        self.phase = Phase.DONE
        rec = self.rec
        rec.finish_reason = self.reason
        if self.reason == "abort":
            rec.status = "CANCELLED"
        yield gateway_pb2.GenerateResponse(
            request_id=self.rid, finish_reason=self.reason, text=self.text.flush(),
            usage=gateway_pb2.Usage(prompt_tokens=len(self.prompt),
                                    cached_tokens=rec.cached_tokens,
                                    completion_tokens=len(self.out)),
            timing=gateway_pb2.Timing(ttft_s=rec.ttft_s, e2e_s=time.monotonic() - rec.t0))

    # -- one attempt ---------------------------------------------------------------------------
    async def _attempt(self) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """One try on one prefill and one decode worker: yields token messages; sets
        self.reason when the request is done; raises WorkerFailed when a worker failed and
        another may finish it."""
        remaining = self.max_tokens - len(self.out)
        if remaining <= 0:  # a decode worker died just after the last token
            self.reason = "length"
            return
        if self.flight.aborted.is_set():
            self.reason = "abort"
            return
        first_try = self.attempt == 0
        iid = self.rid if first_try else f"{self.rid}#{self.attempt}"  # stale notices never match
        self.attempt += 1
        ctx = self.prompt + self.out
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(self.sampling)
        sampling.max_tokens, sampling.position_offset = remaining, len(self.out)
        place = await self._place(ctx, remaining)
        # A RESERVE is never cancelled: one the worker still carried out would hold its
        # pages until its lease ran out. It is short; the abort is seen after it.
        decode, res = await self._reserve_somewhere(place, iid, ctx, sampling, remaining)
        stream: DecodeStream | None = None
        finished = prefill_sent = False
        try:
            if self.flight.aborted.is_set():
                raise Aborted
            # Open the decode stream before the prefill, so no token can be missed.
            stream = decode.Stream(decode_pb2.StreamRequest(request_id=iid),
                                   timeout=self.c.settings.rpc_timeout_s * STREAM_TIMEOUT_FACTOR)
            prefill_sent = True
            pre = await self._unless_aborted(self._prefill(place, iid, ctx, sampling, res))
            self._computed()  # its blocks are on their way to the store
            self.flight.decode, self.flight.iid = decode, iid  # Abort now releases it there
            if self.flight.aborted.is_set():
                raise Aborted
            self._account(first_try, place, ctx, pre)
            self.out.append(pre.first_token)
            self.rec.completion_tokens = len(self.out)
            yield gateway_pb2.GenerateResponse(
                request_id=self.rid, token_ids=[pre.first_token],
                text=self.text.push([pre.first_token]),
                logprobs=[pre.first_logprob] if self.logprobs else [])
            async for msg in self._relay(stream, place.decode, decode, iid):
                yield msg
            finished = True
        except Aborted:
            self.reason = "abort"  # the reservation is released below
        finally:
            self.flight.decode = None
            if not finished:
                if stream is not None:
                    stream.cancel()
                await release(decode, iid, unwritten=not prefill_sent)

    async def _unless_aborted(self, call: Awaitable[T]) -> T:
        """`call`'s result, or Aborted (with `call` cancelled) if the client aborts first."""
        task = asyncio.ensure_future(call)
        stop = asyncio.ensure_future(self.flight.aborted.wait())
        try:
            await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this request was cancelled: so is its call
            task.cancel()
            raise
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, grpc.aio.AioRpcError, WorkerFailed):
            pass  # what a cancelled call raises
        raise Aborted

    async def _place(self, ctx: list[int], remaining: int) -> _Placement:
        """LOOKUP how much of the context the store holds, then PLACE it on workers."""
        self.phase = Phase.LOOKUP
        bt = self.spec.block_tokens
        keys = block_hashes(self.spec.hash_namespace, self.salt, ctx, bt)
        cacheable = cacheable_blocks(len(ctx), bt)
        found = await self._after_flights(keys[:cacheable],
                                          await self.c.kvstore.lookup_detail(keys[:cacheable]))
        hint = found.prefix or 0
        self.computing = self.c.flights.claim(keys[hint:cacheable])
        self.phase = Phase.PLACE
        pages = request_pages(bt, len(ctx), remaining)
        reg = self.c.registry
        pw, dw, stages = reg.pick(hint, len(ctx), pages, self.excluded)  # NoWorker, NoRoom
        self.rec.prefill_worker, self.rec.decode_worker = pw.spec.worker_id, dw.spec.worker_id
        # Optimistic load updates until the workers' next reports, so a burst spreads.
        reg.bump(dw.spec.worker_id, free_pages=-pages, running=1)
        new = len(ctx) - hint * bt
        work = prefill_work(hint * bt, new)
        hold_s = max(w.load.may_hold(work) for w in (pw, *stages))
        for w in (pw, *stages):  # a pipeline's stages share the work
            reg.bump(w.spec.worker_id, work, 1 / (1 + len(stages)),
                     queued_tokens=new // (1 + len(stages)),
                     queued_attention=attention_work(hint * bt, new) / (1 + len(stages)))
        if stages:
            log.info("pipelined prefill", extra={
                "request_id": self.rid, "head": pw.spec.worker_id,
                "stages": [w.spec.worker_id for w in stages]})
        return _Placement(keys, cacheable, found, pw, dw, stages, hold_s)

    async def _after_flights(self, keys: list[BlockHash], found: LookupResult) -> LookupResult:
        """`found`, or, when earlier requests are computing at least prefix_wait_tokens of the
        blocks that follow it, what the store holds once their prefills are over (each
        request's blocks land in the store just after its answer: looked for until
        PUT_LAND_S after it)."""
        s, bt = self.c.settings, self.spec.block_tokens
        have = found.prefix or 0
        more, events = self.c.flights.pending(keys, have)
        if not s.prefix_wait_tokens or not events or more * bt < s.prefix_wait_tokens:
            return found
        async def over() -> None:
            for e in events:
                await e.wait()

        t0 = time.monotonic()
        waits = (asyncio.ensure_future(over()), asyncio.ensure_future(self.flight.aborted.wait()))
        try:
            await asyncio.wait(waits, timeout=s.prefix_wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        deadline = time.monotonic() + PUT_LAND_S
        again = found
        while not self.flight.aborted.is_set():
            again = await self.c.kvstore.lookup_detail(keys)
            if (again.prefix or 0) >= have + more or time.monotonic() >= deadline:
                break
            await asyncio.sleep(PUT_POLL_S)
        log.debug("waited for a prefix in flight", extra={
            "request_id": self.rid, "blocks": more, "found": again.prefix,
            "waited_s": round(time.monotonic() - t0, 4)})
        if self.c.metrics:
            self.c.metrics.prefix_waits.inc()
        return again if (again.prefix or 0) > have else found

    async def _reserve_somewhere(self, place: _Placement, iid: str, ctx: list[int],
                                 sampling: common_pb2.SamplingParams, remaining: int
                                 ) -> tuple[decode_pb2_grpc.DecodeAsyncStub,
                                            common_pb2.Reservation]:
        """RESERVE on the placed decode worker; one that refuses for room (its pages went to
        requests another gateway placed on the same stale loads) is no candidate for this
        request, and the next one the balancer picks is tried, until none is left (NoRoom:
        RESOURCE_EXHAUSTED to the client). Sets `place.decode` to the worker that took it."""
        full: set[str] = set()
        pages = request_pages(self.spec.block_tokens, len(ctx), remaining)
        while True:
            decode = self.c.clients.decode(place.decode.spec.address)
            try:
                return decode, await self._reserve(decode, place, iid, ctx, sampling)
            except asyncio.CancelledError:  # the client went away: the pages go back now
                await release(decode, iid, unwritten=True)
                raise
            except DecodeFull as e:
                full.add(place.decode.spec.worker_id)
                log.info("decode worker refused the reservation, trying the next", extra={
                    "request_id": self.rid, "worker": place.decode.spec.worker_id,
                    "why": str(e)})
                if self.c.metrics:
                    self.c.metrics.reserve_refused.inc()
                try:
                    dw = self.c.registry.pick_decode(pages, self.excluded | full)
                except NoWorker:  # every one refused: no room in the cluster now
                    raise NoRoom(pages) from None
                self.c.registry.bump(dw.spec.worker_id, free_pages=-pages, running=1)
                place.decode = dw
                self.rec.decode_worker = dw.spec.worker_id

    async def _reserve(self, decode: decode_pb2_grpc.DecodeAsyncStub, place: _Placement, iid: str,
                       ctx: list[int], sampling: common_pb2.SamplingParams
                       ) -> common_pb2.Reservation:
        """RESERVE pages on the decode worker for the context + the tokens still to come."""
        self.phase = Phase.RESERVE
        try:
            return await decode.Reserve(decode_pb2.ReserveRequest(
                request_id=iid, prompt_token_ids=ctx, sampling=sampling),
                timeout=self.c.settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise DecodeFull(e.details()) from None
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise error_for(e.code(), f"decode reserve: {e.details()}") from None
            raise WorkerFailed(Role.DECODE, place.decode.spec.worker_id,
                               grpc.StatusCode.UNAVAILABLE,
                               f"decode reserve: {e.details()}") from None

    async def _prefill(self, place: _Placement, iid: str, ctx: list[int],
                       sampling: common_pb2.SamplingParams, res: common_pb2.Reservation
                       ) -> prefill_pb2.PrefillResponse:
        """PREFILL: the prefill worker computes the context's KV, WRITEs it into the
        reservation (renewing its lease there while the prompt waits), and answers the first
        token; its deadline is `rpc_timeout_s` beyond the wait its workers' order allows."""
        self.phase = Phase.PREFILL
        prefill = self.c.clients.prefill(place.prefill.spec.address)
        try:
            return await prefill.Prefill(prefill_pb2.PrefillRequest(
                request_id=iid, prompt_token_ids=ctx, cache_salt=self.salt,
                cached_blocks_hint=place.found.prefix or 0, sampling=sampling, reservation=res,
                pipeline=[prefill_pb2.PipelinePeer(worker_id=w.spec.worker_id,
                                                   address=w.spec.address)
                          for w in place.stages],
                decode_address=place.decode.spec.address),
                timeout=self.c.settings.rpc_timeout_s + place.hold_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise error_for(e.code(), f"prefill: {e.details()}") from None
            failed = place.decode if fault_of(e) is Fault.DECODE else place.prefill
            raise WorkerFailed(failed.spec.role, failed.spec.worker_id,
                               grpc.StatusCode.UNAVAILABLE, f"prefill: {e.details()}") from None

    def _account(self, first_try: bool, place: _Placement, ctx: list[int],
                 pre: prefill_pb2.PrefillResponse) -> None:
        rec = self.rec
        if not first_try:
            rec.kv_bytes += pre.bytes_transferred
            return
        rec.ttft_s = time.monotonic() - rec.t0
        rec.cached_tokens, rec.kv_bytes = pre.cached_tokens, pre.bytes_transferred
        rec.fetch_s, rec.compute_s = pre.fetch_s, pre.compute_s
        rec.miss_reason = self.c.acct.miss_reason(
            self.spec, self.salt, ctx, place.keys, place.cacheable, place.found,
            pre.cached_tokens // self.spec.block_tokens, rec.tenant)

    async def _relay(self, stream: DecodeStream, dw: WorkerState,
                     decode: decode_pb2_grpc.DecodeAsyncStub, iid: str
                     ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """RELAY the decode worker's tokens as text deltas until a finish reason."""
        self.phase = Phase.RELAY
        text, metrics = self.text, self.c.metrics
        reason = ""
        last = time.monotonic()
        try:
            async for chunk in (_nothing() if text.stopped else stream):
                if chunk.token_ids:
                    self.out.extend(chunk.token_ids)
                    self.rec.completion_tokens = len(self.out)
                    if metrics:
                        now = time.monotonic()
                        for _ in chunk.token_ids:
                            metrics.itl.observe((now - last) / len(chunk.token_ids))
                        last = now
                    yield gateway_pb2.GenerateResponse(
                        request_id=self.rid, token_ids=list(chunk.token_ids),
                        text=text.push(chunk.token_ids), logprobs=list(chunk.logprobs))
                if text.stopped:
                    break
                if chunk.finish_reason:
                    reason = chunk.finish_reason
                    break
        except grpc.aio.AioRpcError as e:
            if self.flight.aborted.is_set():  # the abort released the reservation
                reason = "abort"
            else:
                code = e.code()
                if code not in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED):
                    code = grpc.StatusCode.UNAVAILABLE
                raise WorkerFailed(Role.DECODE, dw.spec.worker_id, code,
                                   f"decode: {e.details()}") from None
        if text.stopped:  # a stop string ended the text: the decode side stops too
            reason = "stop"
            stream.cancel()
            await release(decode, iid)
        elif not reason:
            if not self.flight.aborted.is_set():
                raise WorkerFailed(Role.DECODE, dw.spec.worker_id, grpc.StatusCode.UNAVAILABLE,
                                   "decode: stream ended without a finish reason")
            reason = "abort"
        self.reason = reason


async def _nothing() -> AsyncIterator[decode_pb2.TokenChunk]:
    return
    yield  # an async generator that yields nothing
