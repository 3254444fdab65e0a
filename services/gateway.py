"""The gateway: the public API, the worker registry and the global scheduler.

Lifecycle of one `Generate`:
1. Validate (INVALID_ARGUMENT naming the field); tokenize text with the chat template.
2. Hash the prompt's full blocks (namespace from the workers, the request's cache_salt) and ask
   the kvstore how many leading blocks it holds; no answer = no hits.
3. Pick a decode worker (decode balancer; RESOURCE_EXHAUSTED when none can hold the request)
   and a prefill worker (prefill balancer); reserve pages on the decode worker.
4. Open the decode stream, then ask the prefill worker to compute and push the KV; its answer
   carries the first token, which is streamed at once (time to first token).
5. Relay the decode worker's tokens as text deltas; close with finish_reason, usage and timing.
6. On any failure or client cancellation the decode reservation is released.
7. One ledger row (and the Prometheus counters) records the outcome, whatever it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc
from pdserve.cache.analytics import NAMED_QUERIES
from pdserve.cache.block_hash import block_hashes, cacheable_blocks
from pdserve.cache.ledger import Ledger, QueryError
from pdserve.engine.engine import request_pages
from pdserve.engine.loader import load_tokenizer
from pdserve.engine.tokenizer import Tokenizer
from pdserve.scheduler.balancers import attention_work
from pdserve.scheduler.registry import WorkerRegistry
from pdserve.services import security
from pdserve.services.accounting import (
    Accounting,
    Outcome,
    analytics_value,
    kv_usage,
    tenant_of,
)
from pdserve.services.admission import InvalidRequest, admit
from pdserve.services.auth import ClientLimits, Tenant, TokenTable, peer_host
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.membership import RegistryServicer, watch_readiness
from pdserve.services.output import OutputText
from pdserve.services.server import (
    SERVING,
    channel,
    create_server,
    serve_until_signal,
    write_ready_file,
)
from pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from prometheus_client import CollectorRegistry

from pdserve.config import GatewaySettings
from pdserve.metrics import GatewayMetrics, serve_metrics

log = logging.getLogger(__name__)

RETRY_AFTER_MS = 500


async def _empty():
    return
    yield


@dataclass
class InFlight:
    decode: decode_pb2_grpc.DecodeStub | None = None
    iid: str = ""                 # the request's id on its current decode worker
    tenant: str | None = None
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Request:
    """One Generate across its attempts (a retry or a migration is another attempt)."""

    rid: str
    prompt: list[int]
    max_tokens: int
    salt: str
    sampling: common_pb2.SamplingParams
    text: OutputText
    logprobs: bool
    flight: InFlight
    out: list[int] = field(default_factory=list)   # tokens sent to the client
    attempt: int = 0
    excluded: set[str] = field(default_factory=set)  # workers that failed this request
    reason: str = ""


class _Retry(Exception):
    """A worker failed this attempt; another one may finish the request."""

    def __init__(self, stage: str, worker: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.stage, self.worker, self.code, self.message = stage, worker, code, message


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, registry: WorkerRegistry, kvstore: KVStoreClient,
                 tokenizer: Tokenizer | None, rpc_timeout_s: float,
                 ledger: Ledger | None = None, metrics: GatewayMetrics | None = None,
                 data_dir=None, settings: GatewaySettings | None = None,  # type: ignore[no-untyped-def]
                 tokens: TokenTable | None = None) -> None:
        s = settings or GatewaySettings()
        self.tokens = tokens
        self.limits = ClientLimits(s.max_streams_per_client, s.rate_limit_rps, s.rate_limit_burst)
        self.max_prompt_tokens, self.max_tokens_limit = s.max_prompt_tokens, s.max_tokens_limit
        self.prefill_retries, self.migrate = s.prefill_retries, s.migrate
        self.migrate_retries = s.migrate_retries
        self.registry = registry
        self.kvstore = kvstore
        self.tokenizer = tokenizer
        self.rpc_timeout_s = rpc_timeout_s
        self.metrics = metrics
        self.acct = Accounting(registry, ledger, metrics, data_dir)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._inflight: dict[str, InFlight] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address)
        return ch

    async def _tenant(self, context) -> Tenant | None:  # type: ignore[no-untyped-def]
        """The caller's tenant (UNAUTHENTICATED without a known token), None when auth is off."""
        if self.tokens is None:
            return None
        try:
            return self.tokens.check(context.invocation_metadata())
        except PermissionError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    async def Generate(self, request, context):
        rec = Outcome(time.time(), time.monotonic(), request.request_id or uuid.uuid4().hex,
                      tenant_of(request.cache_salt))
        client = None
        if self.metrics:
            self.metrics.in_flight.inc()
        try:
            try:
                tenant = self.tokens.check(context.invocation_metadata()) if self.tokens else None
            except PermissionError as e:
                await self._abort(context, rec, grpc.StatusCode.UNAUTHENTICATED, str(e))
            if tenant is not None:
                rec.tenant = tenant.tenant
            who = tenant.tenant if tenant else peer_host(context.peer())
            refusal = self.limits.acquire(who)
            if refusal is not None:
                context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
                await self._abort(context, rec, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            client = who
            async for msg in self._generate(request, context, rec, tenant):
                yield msg
            rec.status = rec.status or "OK"
        except asyncio.CancelledError:
            rec.status = rec.status or "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # a bug: fail closed with a status, never UNKNOWN
            log.exception("generate failed", extra={"request_id": rec.request_id})
            await self._abort(context, rec, grpc.StatusCode.INTERNAL,
                              f"internal error ({type(e).__name__}); the request was not served")
        finally:
            if client is not None:
                self.limits.release(client)
            if self.metrics:
                self.metrics.in_flight.dec()
            self.acct.record(rec)

    async def _abort(self, context, rec: Outcome, code: grpc.StatusCode, message: str):  # type: ignore[no-untyped-def]
        rec.status, rec.error = code.name, message[:200]
        await context.abort(code, message)

    async def _generate(self, request, context, rec: Outcome, tenant: Tenant | None):  # type: ignore[no-untyped-def]
        prefills = self.registry.active("prefill")
        if not prefills or not self.registry.active("decode"):
            await self._abort(context, rec, grpc.StatusCode.UNAVAILABLE,
                              "no prefill or decode worker is ready; retry shortly")
        spec = prefills[0].spec
        try:
            adm = admit(request, self.tokenizer, spec.vocab_size, spec.max_context)
            if self.max_prompt_tokens and len(adm.prompt) > self.max_prompt_tokens:
                raise InvalidRequest(f"prompt: {len(adm.prompt)} tokens, limit "
                                     f"--max-prompt-tokens {self.max_prompt_tokens}")
            if self.max_tokens_limit and adm.max_tokens > self.max_tokens_limit:
                raise InvalidRequest(f"max_tokens: {adm.max_tokens}, limit --max-tokens-limit "
                                     f"{self.max_tokens_limit}")
        except InvalidRequest as e:
            await self._abort(context, rec, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = rec.request_id
        if rid in self._inflight:
            await self._abort(context, rec, grpc.StatusCode.ALREADY_EXISTS,
                              f"request_id: {rid!r} is running")
        seed = request.seed or int.from_bytes(hashlib.sha256(rid.encode()).digest()[:8], "little")
        stops = set(self.tokenizer.stop_token_ids) if self.tokenizer else set()
        st = _Request(
            rid=rid, prompt=adm.prompt, max_tokens=adm.max_tokens,
            salt=tenant.salt(request.cache_salt) if tenant else request.cache_salt,
            sampling=common_pb2.SamplingParams(
                max_tokens=adm.max_tokens, temperature=adm.temperature, seed=seed,
                stop_token_ids=sorted(stops | set(adm.stop_token_ids)), top_k=adm.top_k,
                top_p=adm.top_p, logprobs=request.logprobs),
            text=OutputText(self.tokenizer, adm.stop), logprobs=request.logprobs,
            flight=InFlight(tenant=tenant.tenant if tenant else None))
        rec.prompt_tokens = len(st.prompt)
        self._inflight[rid] = st.flight
        retries, migrations = self.prefill_retries, self.migrate_retries if self.migrate else 0
        try:
            while True:
                try:
                    async for msg in self._attempt(st, spec, rec, context):
                        yield msg
                    break
                except _Retry as e:
                    st.excluded.add(e.worker)
                    if not st.out and retries > 0:  # nothing sent yet: start over elsewhere
                        retries -= 1
                    elif st.out and e.stage == "decode" and migrations > 0:
                        migrations -= 1  # resume elsewhere from prompt + tokens sent
                    else:
                        await self._abort(context, rec, e.code, e.message)
                    log.warning("retrying elsewhere", extra={
                        "request_id": rid, "stage": e.stage, "worker": e.worker,
                        "tokens_sent": len(st.out), "why": e.message})
                    rec.attempts += 1
                    if self.metrics:
                        self.metrics.retries.labels(e.stage).inc()
        finally:
            self._inflight.pop(rid, None)
        rec.finish_reason = st.reason
        if st.reason == "abort":
            rec.status = "CANCELLED"
        yield gateway_pb2.GenerateResponse(
            request_id=rid, finish_reason=st.reason, text=st.text.flush(),
            usage=gateway_pb2.Usage(prompt_tokens=len(st.prompt), cached_tokens=rec.cached_tokens,
                                    completion_tokens=len(st.out)),
            timing=gateway_pb2.Timing(ttft_s=rec.ttft_s, e2e_s=time.monotonic() - rec.t0))

    async def _attempt(self, st: _Request, spec, rec: Outcome, context):  # type: ignore[no-untyped-def]
        """One try on one prefill and one decode worker. Yields token messages; sets st.reason
        when the request is done; raises _Retry when a worker failed and another may finish."""
        remaining = st.max_tokens - len(st.out)
        if remaining <= 0:  # a decode worker died just after the last token
            st.reason = "length"
            return
        first_try = st.attempt == 0
        iid = st.rid if first_try else f"{st.rid}#{st.attempt}"  # stale notices never match
        st.attempt += 1
        ctx = st.prompt + st.out
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(st.sampling)
        sampling.max_tokens, sampling.position_offset = remaining, len(st.out)
        bt = spec.block_tokens
        # Step 2: how much of the prompt the store holds.
        keys = block_hashes(spec.hash_namespace, st.salt, ctx, bt)
        cacheable = cacheable_blocks(len(ctx), bt)
        found = await self.kvstore.lookup_detail(keys[:cacheable])
        hint = found.prefix or 0
        # Step 3: choose workers, reserve decode pages.
        pages = request_pages(bt, len(ctx), remaining)
        try:
            pw, dw, upstream = self.registry.pick(hint, len(ctx), pages, st.excluded)
        except LookupError as e:
            await self._abort(context, rec, grpc.StatusCode.UNAVAILABLE, str(e))
        except MemoryError as e:
            # Back-pressure instead of an unbounded queue, with a hint for well-behaved clients.
            context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
            await self._abort(context, rec, grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"KV pages: {e}; retry in {RETRY_AFTER_MS} ms or lower max_tokens")
        rec.prefill_worker, rec.decode_worker = pw.spec.worker_id, dw.spec.worker_id
        self.registry.bump(dw.spec.worker_id, free_pages=-pages, running=1)
        new = len(ctx) - hint * bt
        for w in (pw, *upstream):  # a pipeline's stages share the work
            self.registry.bump(w.spec.worker_id, queued_tokens=new // (1 + len(upstream)),
                               queued_attention=attention_work(hint * bt, new) / (1 + len(upstream)))
        if upstream:
            log.info("pipelined prefill", extra={"request_id": iid, "head": pw.spec.worker_id,
                                                 "stages": [w.spec.worker_id for w in upstream]})
        decode = decode_pb2_grpc.DecodeStub(self._channel(dw.spec.address))
        prefill = prefill_pb2_grpc.PrefillStub(self._channel(pw.spec.address))
        flight = st.flight
        flight.decode, flight.iid = decode, iid
        stream = None
        finished = False
        try:
            try:
                res = await decode.Reserve(decode_pb2.ReserveRequest(
                    request_id=iid, prompt_token_ids=ctx, sampling=sampling),
                    timeout=self.rpc_timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                grpc.StatusCode.INVALID_ARGUMENT):
                    await self._abort(context, rec, e.code(), f"decode reserve: {e.details()}")
                raise _Retry("decode", dw.spec.worker_id, grpc.StatusCode.UNAVAILABLE,
                             f"decode reserve: {e.details()}") from None
            # Step 4: open the decode stream first, so no token can be missed.
            stream = decode.Stream(decode_pb2.StreamRequest(request_id=iid),
                                   timeout=self.rpc_timeout_s * 10)
            try:
                pre = await prefill.Prefill(prefill_pb2.PrefillRequest(
                    request_id=iid, prompt_token_ids=ctx, cache_salt=st.salt,
                    cached_blocks_hint=hint, sampling=sampling, reservation=res,
                    pipeline=[prefill_pb2.PipelinePeer(worker_id=w.spec.worker_id,
                                                       address=w.spec.address)
                              for w in upstream]),
                    timeout=self.rpc_timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    await self._abort(context, rec, e.code(), f"prefill: {e.details()}")
                # A failed transfer is the decode side's fault; anything else the prefill's.
                blame = ("decode", dw.spec.worker_id) if "transfer" in (e.details() or "") \
                    else ("prefill", pw.spec.worker_id)
                raise _Retry(*blame, grpc.StatusCode.UNAVAILABLE,
                             f"prefill: {e.details()}") from None
            if first_try:
                rec.ttft_s = time.monotonic() - rec.t0
                rec.cached_tokens, rec.kv_bytes = pre.cached_tokens, pre.bytes_transferred
                rec.fetch_s, rec.compute_s = pre.fetch_s, pre.compute_s
                rec.miss_reason = self.acct.miss_reason(spec, st.salt, ctx, keys, cacheable, found,
                                                    pre.cached_tokens // bt, rec.tenant)
            else:
                rec.kv_bytes += pre.bytes_transferred
            text = st.text
            st.out.append(pre.first_token)
            rec.completion_tokens = len(st.out)
            last = time.monotonic()
            yield gateway_pb2.GenerateResponse(
                request_id=st.rid, token_ids=[pre.first_token], text=text.push([pre.first_token]),
                logprobs=[pre.first_logprob] if st.logprobs else [])
            # Step 5: relay the rest.
            reason = ""
            try:
                async for chunk in (_empty() if text.stopped else stream):
                    if chunk.token_ids:
                        st.out.extend(chunk.token_ids)
                        rec.completion_tokens = len(st.out)
                        if self.metrics:
                            now = time.monotonic()
                            for _ in chunk.token_ids:
                                self.metrics.itl.observe((now - last) / len(chunk.token_ids))
                            last = now
                        yield gateway_pb2.GenerateResponse(
                            request_id=st.rid, token_ids=list(chunk.token_ids),
                            text=text.push(chunk.token_ids), logprobs=list(chunk.logprobs))
                    if text.stopped:
                        break
                    if chunk.finish_reason:
                        reason = chunk.finish_reason
                        break
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and flight.aborted.is_set():
                    reason = "abort"
                else:
                    code = e.code()
                    if code not in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED):
                        code = grpc.StatusCode.UNAVAILABLE
                    raise _Retry("decode", dw.spec.worker_id, code,
                                 f"decode: {e.details()}") from None
            if text.stopped:  # a stop string ended the text: the decode side stops too
                reason = "stop"
                stream.cancel()
                await self._release(decode, iid)
            elif not reason:
                if not flight.aborted.is_set():
                    raise _Retry("decode", dw.spec.worker_id, grpc.StatusCode.UNAVAILABLE,
                                 "decode: stream ended without a finish reason")
                reason = "abort"
            finished = True
            st.reason = reason
        finally:
            if not finished:
                if stream is not None:
                    stream.cancel()
                await self._release(decode, iid)

    async def QueryAnalytics(self, request, context):
        tenant = await self._tenant(context)
        params = dict(request.params)
        if tenant is not None and not tenant.admin:
            if params.get("tenant", tenant.tenant) != tenant.tenant:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"params.tenant: {params['tenant']!r}; this token may only "
                                    f"query its own tenant {tenant.tenant!r}")
            params["tenant"] = tenant.tenant
        if not request.query:
            return gateway_pb2.AnalyticsResponse(
                queries={k: v[0] for k, v in NAMED_QUERIES.items()})
        if self.acct.ledger is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the ledger is off on this gateway (--ledger)")

        try:
            columns, rows = await asyncio.to_thread(self.acct.query, request.query, params)
        except QueryError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return gateway_pb2.AnalyticsResponse(
            columns=columns, rows=[gateway_pb2.AnalyticsRow(values=[analytics_value(v) for v in r])
                                   for r in rows])

    async def _release(self, decode: decode_pb2_grpc.DecodeStub, rid: str) -> None:
        try:
            await decode.Release(decode_pb2.ReleaseRequest(request_id=rid), timeout=5)
        except grpc.aio.AioRpcError:
            pass  # the worker is gone or the request already ended; its lease frees the pages

    async def Abort(self, request, context):
        tenant = await self._tenant(context)
        flight = self._inflight.get(request.request_id)
        if flight is None or flight.decode is None or (
                tenant is not None and flight.tenant != tenant.tenant):
            return gateway_pb2.AbortResponse(found=False)  # another tenant's id is not found
        flight.aborted.set()
        await self._release(flight.decode, flight.iid or request.request_id)
        return gateway_pb2.AbortResponse(found=True)

    async def Stats(self, request, context):
        await self._tenant(context)
        return gateway_pb2.ClusterStatsResponse(
            requests_in_flight=len(self._inflight),
            workers=[gateway_pb2.WorkerStats(
                worker_id=w.spec.worker_id, role=w.spec.role, address=w.spec.address,
                epoch=w.spec.epoch, in_rotation=w.in_rotation, free_pages=w.load.free_pages,
                total_pages=w.load.total_pages, running=w.load.running,
                queued_tokens=w.load.queued_tokens, num_finished=w.load.num_finished)
                for w in sorted(self.registry.workers.values(), key=lambda w: w.spec.worker_id)])

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


async def run(settings: GatewaySettings) -> None:
    security.configure(settings)  # before any server or channel exists
    tokenizer = load_tokenizer(settings.model)
    registry = WorkerRegistry(pipeline_min_tokens=settings.pipeline_min_tokens,
                              pipeline_max_stages=settings.pipeline_max_stages)
    kvstore = KVStoreClient(settings.kvstore, settings.lookup_timeout_s)
    ledger = (Ledger(settings.data_dir, settings.ledger_flush_records, settings.ledger_flush_s,
                     settings.ledger_max_pending) if settings.ledger else None)
    prom = CollectorRegistry()
    metrics = GatewayMetrics(prom)
    for role in ("prefill", "decode"):
        metrics.workers.labels(role).set_function(lambda r=role: len(registry.active(r)))
    metrics.queued_tokens.set_function(
        lambda: sum(w.load.queued_tokens for w in registry.active("prefill")))
    metrics.kv_usage.set_function(lambda: kv_usage(registry))
    tokens = TokenTable.load(settings.auth_tokens_file, settings.auth_tokens or None)
    gateway = GatewayServicer(registry, kvstore, tokenizer, settings.rpc_timeout_s, ledger,
                              metrics, settings.data_dir, settings, tokens)
    reg = RegistryServicer(registry)
    add_gateway = [lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, s)]
    add_registry = [lambda s: registry_pb2_grpc.add_RegistryServicer_to_server(reg, s)]
    names = [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]
    reg_names = [registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name]
    tls = security.current()
    internal = internal_port = None
    if tls is not None and tls.mutual:
        # The registry moves to its own port, which only peers with the cluster credential
        # reach; the public port serves TLS to clients without certificates.
        internal, internal_port, ihealth = await create_server(
            add_registry, reg_names, settings.host, settings.internal_port, internal=True)
        await ihealth.set("", SERVING)
        add_registry, reg_names = [], []
    server, port, health = await create_server(
        add_gateway + add_registry, names + reg_names, settings.host, settings.port,
        internal=False, max_message_bytes=settings.max_message_bytes)
    stop = asyncio.Event()
    watcher = asyncio.create_task(
        watch_readiness(registry, health, kvstore, settings.worker_timeout_s, stop))
    sampler = (asyncio.create_task(gateway.acct.sample_workers(settings.worker_sample_s, stop))
               if ledger is not None else None)
    metrics_port = serve_metrics(prom, settings.host, settings.metrics_port)
    write_ready_file(settings.ready_file, port, metrics_port=metrics_port,
                     internal_port=internal_port)
    log.info("gateway listening", extra={"port": port, "internal_port": internal_port})

    async def cleanup() -> None:
        stop.set()
        await watcher
        if sampler is not None:
            await sampler
        await gateway.close()
        await kvstore.close()
        if ledger is not None:
            await asyncio.to_thread(ledger.close)  # every queued row is written
        if internal is not None:
            await internal.stop(2)

    await serve_until_signal(server, health, cleanup)
