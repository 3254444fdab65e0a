"""The gateway's OpenAI-compatible HTTP edge: `POST /v1/chat/completions`, `POST
/v1/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`.

It runs on the gateway's own event loop, beside its gRPC server (uvicorn's `Server.serve` as a
task, its signal capture off, so the gateway's shutdown stays in charge), and every request
goes through the servicer's transport-neutral `generate`: the same auth (Bearer tokens),
client limits, admission, flow, and one ledger row. Errors are OpenAI's body with the gRPC
status mapped once (openai_api.error_body). Streams are server-sent events; a client that goes
away cancels its request (pages freed, ledger row CANCELLED)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pdserve.scheduler.registry import Role
from pdserve.services.errors import InvalidArgument, NotFound, Status, status_of
from pdserve.services.gateway.openai_api import (
    ChatRequest,
    CompletionRequest,
    Reply,
    error_body,
    generate_request,
)
from pdserve.services.gateway.servicer import GatewayServicer, RequestFailed
from pdserve.services.limits import MAX_REQUEST_ID
from pdserve.services.server import ListenError
from pdserve.v1 import gateway_pb2

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
GONE = object()  # the client disconnected


def _error(status: Status, request_id: str | None = None) -> JSONResponse:
    http, body, headers = error_body(status)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(body, status_code=http, headers=headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Edge:
    """The HTTP routes over a gateway servicer. `serving()`: whether the gateway is ready and
    not draining (GET /health)."""

    def __init__(self, gateway: GatewayServicer, serving: Callable[[], bool],
                 metrics: CollectorRegistry | None, max_body_bytes: int) -> None:
        self.gateway = gateway
        self.serving = serving
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        self._routes()

    def served_models(self) -> list[str]:
        ids = {w.spec.model_id for role in Role for w in self.gateway.registry.active(role)
               if w.spec.model_id}
        return sorted(ids)

    def serves(self, model: str) -> bool:
        """A served model's id, or its name without the checkpoint's digest (`name@digest`)."""
        return any(model in (m, m.split("@")[0]) for m in self.served_models())

    def _routes(self) -> None:
        app = self.app

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            err = exc.errors()[0] if exc.errors() else {}
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            param = ".".join(loc) or "body"
            return _error(Status(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"{param}: {err.get('msg', 'invalid')}"))

        @app.get("/health")
        async def health() -> Response:
            ok = self.serving()
            return JSONResponse({"status": "ok" if ok else "unavailable"},
                                status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            data = generate_latest(self.metrics) if self.metrics is not None else b""
            return Response(data, media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            try:
                self.gateway.tenant_of(list(request.headers.items()))
            except Exception as e:  # noqa: BLE001  # mapped like every other error
                return _error(self._status(e))
            return JSONResponse({"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "pdserve"}
                for m in self.served_models()]})

        @app.post("/v1/chat/completions")
        async def chat(body: ChatRequest, request: Request) -> Response:
            return await self._complete("chat", body, request)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            return await self._complete("completion", body, request)

        @app.middleware("http")
        async def limit_body(request: Request, call_next: Any) -> Response:
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
                http, body, _ = error_body(Status(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"body: {size} bytes, limit --max-message-bytes {self.max_body_bytes}"))
                return JSONResponse(body, status_code=413)
            response: Response = await call_next(request)
            return response

    @staticmethod
    def _status(e: BaseException) -> Status:
        if isinstance(e, RequestFailed):
            return e.status
        status = status_of(e)
        if status is None:
            log.exception("http edge: unexpected error")
            status = Status(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})")
        return status

    async def _complete(self, kind: str, body: ChatRequest | CompletionRequest,
                        request: Request) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            if len(rid) > MAX_REQUEST_ID:
                raise InvalidArgument(f"x-request-id: {len(rid)} characters, limit "
                                      f"{MAX_REQUEST_ID}")
            if body.model and not self.serves(body.model):
                raise NotFound(f"model: {body.model!r} is not served here (GET /v1/models)")
            req = generate_request(body, self.gateway.tokenizer, rid)
        except Exception as e:  # noqa: BLE001  # mapped like every other error
            return _error(self._status(e), rid[:MAX_REQUEST_ID])
        model = body.model or next(iter(self.served_models()), "")
        reply = Reply("chat" if kind == "chat" else "completion", rid, model,
                      self.gateway.tokenizer)
        headers = {"x-request-id": rid}
        peer = f"ipv4:{request.client.host}:{request.client.port}" if request.client else ""
        stream = self.gateway.generate(req, list(request.headers.items()), peer)
        if body.stream:
            first = await self._until_disconnect(request, self._first(stream))
            if first is GONE:
                return Response(status_code=499)
            if isinstance(first, Status):
                return _error(first, rid)
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._events(reply, first, stream, include),
                                     media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **headers})
        result = await self._until_disconnect(request, self._collect(reply, stream))
        if result is GONE:
            return Response(status_code=499)
        if isinstance(result, Status):
            return _error(result, rid)
        return JSONResponse(result, headers=headers)

    async def _first(self, stream: AsyncIterator[gateway_pb2.GenerateResponse]
                     ) -> gateway_pb2.GenerateResponse | Status | None:
        """The stream's first message, or its error before anything was sent (answered as an
        ordinary error response, not a stream)."""
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None
        except Exception as e:  # noqa: BLE001  # mapped like every other error
            return self._status(e)

    async def _events(self, reply: Reply, first: gateway_pb2.GenerateResponse | None,
                      stream: AsyncIterator[gateway_pb2.GenerateResponse],
                      include_usage: bool) -> AsyncIterator[str]:
        usage = None
        try:
            yield _sse(reply.chunk("" if reply.kind == "chat" else None, None, role=True))
            msgs = _chain(first, stream)
            async for msg in msgs:
                if msg.HasField("usage"):
                    usage = msg.usage
                if msg.text or msg.finish_reason or msg.token_ids:
                    yield _sse(reply.chunk(msg.text, msg.finish_reason or None,
                                           logprobs=reply.logprobs(list(msg.token_ids),
                                                                   list(msg.logprobs))))
            if include_usage and usage is not None:
                yield _sse(reply.usage_chunk(usage))
        except Exception as e:  # noqa: BLE001  # an error after the 200: an error event
            _, body, _ = error_body(self._status(e))
            yield _sse(body)
        yield "data: [DONE]\n\n"

    async def _collect(self, reply: Reply, stream: AsyncIterator[gateway_pb2.GenerateResponse]
                       ) -> dict[str, Any] | Status:
        text: list[str] = []
        ids: list[int] = []
        lps: list[float] = []
        usage, finish = gateway_pb2.Usage(), "stop"
        try:
            async for msg in stream:
                text.append(msg.text)
                ids += msg.token_ids
                lps += msg.logprobs
                if msg.HasField("usage"):
                    usage = msg.usage
                if msg.finish_reason:
                    finish = msg.finish_reason
        except Exception as e:  # noqa: BLE001  # mapped like every other error
            return self._status(e)
        return reply.whole("".join(text), finish, usage, reply.logprobs(ids, lps))

    @staticmethod
    async def _until_disconnect(request: Request, work: Any) -> Any:
        """`work`'s result, or GONE when the client went away first (then `work` is
        cancelled: the request ends, its pages freed, its ledger row CANCELLED)."""
        task = asyncio.ensure_future(work)

        async def gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(gone())
        done, _ = await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            watch.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return GONE


async def _chain(first: gateway_pb2.GenerateResponse | None,
                 rest: AsyncIterator[gateway_pb2.GenerateResponse]
                 ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
    if first is not None:
        yield first
    async for msg in rest:
        yield msg


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway's own shutdown stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """The edge's listening socket, bound now (a port in use stops the gateway at start-up,
    naming the flag)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ListenError(f"--http-port {port}: cannot listen on {host}:{port}: {e}") from None
    sock.listen(128)
    return sock


class HTTPEdge:
    """The edge's server on the running loop: `start()`, `stop()`."""

    def __init__(self, edge: Edge, sock: socket.socket, ssl_files: tuple[str, str] | None,
                 grace_s: float = 5.0) -> None:
        kw: dict[str, Any] = {}
        if ssl_files is not None:
            kw = {"ssl_certfile": ssl_files[0], "ssl_keyfile": ssl_files[1],
                  "ssl_cert_reqs": ssl.CERT_NONE}
        config = uvicorn.Config(edge.app, lifespan="off", access_log=False, log_config=None,
                                timeout_graceful_shutdown=int(grace_s), **kw)
        self.server = _Server(config)
        self.sock = sock
        self.port = sock.getsockname()[1]
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
