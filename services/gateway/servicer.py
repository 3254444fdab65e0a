"""The gateway's public gRPC methods: validate, convert, delegate; errors become statuses in
services/errors.py. A Generate's way through the cluster is flow.py; every Generate, whatever its
outcome, leaves one ledger row and its Prometheus counts (accounting.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from pdserve.cache.analytics import NAMED_QUERIES
from pdserve.cache.ledger import Ledger
from pdserve.config import GatewaySettings, parse_addresses
from pdserve.engine.tokenizer import Tokenizer
from pdserve.metrics import GatewayMetrics
from pdserve.scheduler.registry import Role, WorkerRegistry
from pdserve.services.errors import (
    AlreadyExists,
    Backpressure,
    FailedPrecondition,
    PermissionDenied,
    Status,
    Unavailable,
    abort,
    answers_errors,
    status_of,
)
from pdserve.services.gateway.accounting import Accounting, Outcome, analytics_value, tenant_of
from pdserve.services.gateway.admission import admit
from pdserve.services.gateway.auth import ClientLimits, Tenant, TokenTable, peer_host
from pdserve.services.gateway.flow import Cluster, FlowSettings, GenerateFlow, InFlight
from pdserve.services.gateway.output import OutputText
from pdserve.services.gateway.workers import WorkerClients, release
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.registration import resolve
from pdserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

if TYPE_CHECKING:
    from pdserve.services.server import Context

log = logging.getLogger(__name__)
FORWARDED_KEY = "pdserve-forwarded"  # an Abort from a peer gateway: not forwarded again
PEER_TIMEOUT_S = 2.0


class RequestFailed(Exception):
    """A request ended with `status` (already recorded in its ledger row); each edge answers
    with it in its own terms."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.message)
        self.status = status


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, registry: WorkerRegistry, kvstore: KVStoreClient,
                 tokenizer: Tokenizer | None, ledger: Ledger | None = None,
                 metrics: GatewayMetrics | None = None, data_dir: Path | None = None,
                 settings: GatewaySettings | None = None,
                 tokens: TokenTable | None = None) -> None:
        s = settings or GatewaySettings()
        self.settings = s
        self.tokens = tokens
        self.limits = ClientLimits(s.max_streams_per_client, s.rate_limit_rps, s.rate_limit_burst)
        self.registry = registry
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.acct = Accounting(registry, ledger, metrics, data_dir)
        self.clients = WorkerClients()
        self.cluster = Cluster(registry, kvstore, self.clients, self.acct, metrics, FlowSettings(
            s.rpc_timeout_s, s.prefill_retries, s.migrate, s.migrate_retries,
            s.prefix_wait_tokens, s.prefix_wait_s))
        self._inflight: dict[str, InFlight] = {}

    def tenant_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Tenant | None:
        """The tenant of a call's headers (Unauthenticated without a known token), None when
        auth is off: for either edge."""
        return self.tokens.check(metadata) if self.tokens is not None else None

    def _tenant(self, context: Context) -> Tenant | None:
        return self.tenant_of(context.invocation_metadata())

    async def Generate(self, request: gateway_pb2.GenerateRequest,
                       context: Context
                       ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        try:
            async for msg in self.generate(request, context.invocation_metadata(),
                                           context.peer()):
                yield msg
        except RequestFailed as e:
            await abort(context, e.status)

    async def generate(self, request: gateway_pb2.GenerateRequest,
                       metadata: Iterable[tuple[str, str | bytes]] | None, peer: str,
                       ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """One request through the cluster, whichever edge it came by (gRPC, HTTP): auth
        (`metadata`: its headers), the client's limits (by tenant, else `peer`), admission,
        the flow, and one ledger row and its counts whatever the outcome. An error ends it
        with RequestFailed carrying the status (recorded); a cancellation (the client went
        away) is recorded as CANCELLED and passes through."""
        rec = Outcome(time.time(), time.monotonic(), request.request_id or uuid.uuid4().hex,
                      tenant_of(request.cache_salt))
        client = None
        if self.metrics:
            self.metrics.in_flight.inc()
        try:
            tenant = self.tenant_of(metadata)
            if tenant is not None:
                rec.tenant = tenant.tenant
            who = tenant.tenant if tenant else peer_host(peer)
            refusal = self.limits.acquire(who)
            if refusal is not None:
                raise Backpressure(refusal)
            client = who
            flow = self._flow(request, rec, tenant)
            try:
                async for msg in flow.run():
                    yield msg
            finally:
                self._inflight.pop(rec.request_id, None)
            rec.status = rec.status or "OK"
        except (asyncio.CancelledError, GeneratorExit):
            rec.status = rec.status or "CANCELLED"
            raise
        except Exception as e:
            status = status_of(e)
            if status is None:  # a bug: fail closed with a status, never UNKNOWN
                log.exception("generate failed", extra={"request_id": rec.request_id})
                status = Status(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); "
                                                          "the request was not served")
            rec.status, rec.error = status.code.name, status.message[:200]
            raise RequestFailed(status) from e
        finally:
            if client is not None:
                self.limits.release(client)
            if self.metrics:
                self.metrics.in_flight.dec()
            self.acct.record(rec)

    def _flow(self, request: gateway_pb2.GenerateRequest, rec: Outcome,
              tenant: Tenant | None) -> GenerateFlow:
        """Admits the request (INVALID_ARGUMENT naming the field) into a flow."""
        prefills = self.registry.active(Role.PREFILL)
        if not prefills or not self.registry.active(Role.DECODE):
            raise Unavailable("no prefill or decode worker is ready; retry shortly")
        spec = prefills[0].spec
        s = self.settings
        adm = admit(request, self.tokenizer, spec.vocab_size, spec.max_context,
                    s.max_prompt_tokens, s.max_tokens_limit)
        rid = rec.request_id
        if rid in self._inflight:
            raise AlreadyExists(f"request_id: {rid!r} is running")
        seed = (request.seed if request.HasField("seed") else
                int.from_bytes(hashlib.sha256(rid.encode()).digest()[:8], "little"))
        stops = (set(self.tokenizer.stop_token_ids) if self.tokenizer and not request.ignore_eos
                 else set())
        sampling = common_pb2.SamplingParams(
            max_tokens=adm.max_tokens, temperature=adm.temperature, seed=seed,
            stop_token_ids=sorted(stops | set(adm.stop_token_ids)), top_k=adm.top_k,
            top_p=adm.top_p, logprobs=request.logprobs, min_tokens=adm.min_tokens)
        flight = self._inflight[rid] = InFlight(tenant=tenant.tenant if tenant else None)
        rec.prompt_tokens = len(adm.prompt)
        return GenerateFlow(
            self.cluster, rec, spec, adm.prompt, adm.max_tokens,
            tenant.salt(request.cache_salt) if tenant else request.cache_salt, sampling,
            OutputText(self.tokenizer, adm.stop), request.logprobs, flight)

    @answers_errors
    async def QueryAnalytics(self, request: gateway_pb2.AnalyticsRequest,
                             context: Context) -> gateway_pb2.AnalyticsResponse:
        tenant = self._tenant(context)
        params = dict(request.params)
        if tenant is not None and not tenant.admin:
            if params.get("tenant", tenant.tenant) != tenant.tenant:
                raise PermissionDenied(f"params.tenant: {params['tenant']!r}; this token may "
                                       f"only query its own tenant {tenant.tenant!r}")
            params["tenant"] = tenant.tenant
        if not request.query:
            return gateway_pb2.AnalyticsResponse(
                queries={k: v[0] for k, v in NAMED_QUERIES.items()})
        if self.acct.ledger is None:
            raise FailedPrecondition("the ledger is off on this gateway (--ledger)")
        columns, rows = await asyncio.to_thread(self.acct.query, request.query, params)
        return gateway_pb2.AnalyticsResponse(
            columns=columns, rows=[gateway_pb2.AnalyticsRow(values=[analytics_value(v) for v in r])
                                   for r in rows])

    @answers_errors
    async def Abort(self, request: gateway_pb2.AbortRequest,
                    context: Context) -> gateway_pb2.AbortResponse:
        tenant = self._tenant(context)
        flight = self._inflight.get(request.request_id)
        if flight is None:  # maybe another gateway holds it (a client's calls may spread)
            metadata = tuple(context.invocation_metadata() or ())
            if any(k == FORWARDED_KEY for k, _ in metadata):
                return gateway_pb2.AbortResponse(found=False)  # asked by a peer: ours only
            auth = tuple((k, v) for k, v in metadata if k == "authorization")
            return gateway_pb2.AbortResponse(found=await self._abort_at_peers(request, auth))
        if tenant is not None and flight.tenant != tenant.tenant:
            return gateway_pb2.AbortResponse(found=False)  # another tenant's id is not found
        flight.aborted.set()  # the flow stops at its next step, or its call is cancelled
        if flight.decode is not None:  # a relay ends when its reservation goes; before it,
            # the flow sees the abort itself and releases (at once if nothing was written)
            await release(flight.decode, flight.iid or request.request_id)
        return gateway_pb2.AbortResponse(found=True)

    async def _abort_at_peers(self, request: gateway_pb2.AbortRequest,
                              auth: tuple[tuple[str, str | bytes], ...]) -> bool:
        """Forwards an Abort to every --peers gateway (with the caller's token: each checks
        the tenant itself); True when one of them held the request."""
        if not self.settings.peers:
            return False
        resolved = await resolve(parse_addresses(self.settings.peers))
        peers = sorted({a for addrs in resolved.values() for a in addrs})
        metadata = (*auth, (FORWARDED_KEY, "1"))

        async def ask(address: str) -> bool:
            try:
                r = await self.clients.gateway(address).Abort(
                    request, metadata=metadata, timeout=PEER_TIMEOUT_S)
                return r.found
            except grpc.aio.AioRpcError as e:
                log.info("abort not forwarded", extra={"peer": address, "code": e.code().name})
                return False

        return any(await asyncio.gather(*(ask(a) for a in peers)))

    @answers_errors
    async def Stats(self, request: gateway_pb2.ClusterStatsRequest,
                    context: Context) -> gateway_pb2.ClusterStatsResponse:
        self._tenant(context)
        active = [w for role in Role for w in self.registry.active(role.value)]
        return gateway_pb2.ClusterStatsResponse(
            requests_in_flight=self.requests_in_flight,
            workers=[gateway_pb2.WorkerStats(
                worker_id=w.spec.worker_id, role=w.spec.role.value, address=w.spec.address,
                epoch=w.spec.epoch, in_rotation=w.in_rotation and w in active,
                free_pages=w.load.free_pages,
                total_pages=w.load.total_pages, running=w.load.running,
                queued_tokens=w.load.queued_tokens, num_finished=w.load.num_finished,
                ep_group=w.spec.ep_group, ep_rank=w.spec.ep_rank, ep_size=w.spec.ep_size,
                prefill_rate=w.load.prefill_rate, prefill_slack=w.load.prefill_slack,
                due_s=w.load.due_s, defer_wait_s=w.load.defer_wait_s)
                for w in sorted(self.registry.workers.values(), key=lambda w: w.spec.worker_id)])

    @property
    def requests_in_flight(self) -> int:
        """Requests running through the cluster from either edge (admitted, not yet ended)."""
        return len(self._inflight)

    async def close(self) -> None:
        await self.clients.close()
