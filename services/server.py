"""Shared gRPC server bootstrap: health, reflection, message limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
from grpc_health.v1 import _async as health_aio  # the asyncio servicer (absent from the stubs)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.services import security

if TYPE_CHECKING:
    # A servicer method's context (grpc-stubs makes it generic in the messages; the methods'
    # own signatures name the messages).
    Context = grpc.aio.ServicerContext[Any, Any]
# grpc_health ships no type stubs: its asyncio HealthServicer, untyped.
HealthServicer = Any
# The end of a streaming call's reads (grpc.aio.EOF).
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs 1.53 lacks aio.EOF

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # one KV block of a large model must fit in a message
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A peer that comes back (a restarted kvstore or worker) is used again within a second,
    # instead of after gRPC's default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
SERVING = health_pb2.HealthCheckResponse.SERVING
LIVENESS = "liveness"  # health service name for liveness probes: SERVING while the loop runs
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ListenError(OSError):
    """A service cannot listen where it was told to; the message names the flag."""


class _Malformed:
    def __init__(self, why: str) -> None:
        self.why = why


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]  # generic in the stubs only
else:
    _Interceptor = grpc.aio.ServerInterceptor


class MalformedRequests(_Interceptor):
    """Bytes that do not parse as the method's request message get INVALID_ARGUMENT naming the
    message type (gRPC would answer UNKNOWN with an internal exception text)."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        found = await continuation(handler_call_details)
        deser = getattr(found, "request_deserializer", None)
        if found is None or deser is None:
            return found
        handler: Any = found  # its unary_unary & co are not in grpc-stubs' RpcMethodHandler
        cls = getattr(deser, "__self__", None)
        what = getattr(getattr(cls, "DESCRIPTOR", None), "full_name", "request message")

        def lenient(data: bytes) -> Any:
            try:
                return deser(data)
            except Exception as e:  # noqa: BLE001 - DecodeError and friends
                return _Malformed(str(e)[:200])

        async def refuse(context: Context, bad: _Malformed) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: not a valid {what} ({bad.why})")

        async def checked(it: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for r in it:
                if isinstance(r, _Malformed):
                    await refuse(context, r)
                yield r

        out = handler.response_serializer
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def uu(request: Any, context: Context) -> Any:
                if isinstance(request, _Malformed):
                    await refuse(context, request)
                return await inner_uu(request, context)
            return grpc.unary_unary_rpc_method_handler(uu, lenient, out)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def us(request: Any, context: Context) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    await refuse(context, request)
                async for r in inner_us(request, context):
                    yield r
            return grpc.unary_stream_rpc_method_handler(us, lenient, out)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def su(it: AsyncIterator[Any], context: Context) -> Any:
                return await inner_su(checked(it, context), context)
            return grpc.stream_unary_rpc_method_handler(su, lenient, out)
        inner_ss = handler.stream_stream

        async def ss(it: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for r in inner_ss(checked(it, context), context):
                yield r
        return grpc.stream_stream_rpc_method_handler(ss, lenient, out)


async def create_server(
    register: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: Iterable[str],
    host: str,
    port: int,
    internal: bool = True,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    interceptors: Iterable[grpc.aio.ServerInterceptor[Any, Any]] = (),
    flag: str = "--port",
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """Builds and starts a server; returns (server, bound port, health servicer). With TLS
    configured (services/security.py) the port is TLS, and an internal one requires the
    cluster credential (a client certificate signed by the cluster CA). The port is this
    server's alone (SO_REUSEPORT off: gRPC's default would let a second service bind it and
    split the connections); one in use is an OSError naming `flag`."""
    options = [o for o in CHANNEL_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    server = grpc.aio.server(options=options + [
        ("grpc.max_receive_message_length", max_message_bytes), ("grpc.so_reuseport", 0)],
        interceptors=[MalformedRequests(), *interceptors])
    for add in register:
        add(server)
    health_servicer = health_aio.HealthServicer()
    await health_servicer.set("", NOT_SERVING)  # each service says SERVING once it is ready
    await health_servicer.set(LIVENESS, SERVING)  # the event loop answers: the process is alive
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(
        names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME], server)
    creds = security.server_credentials(internal)
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, creds) if creds is not None
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpc's "Failed to bind to address"
        bound = 0
    if bound == 0:
        raise ListenError(f"{flag} {port}: cannot listen on {host}:{port} (in use by another "
                      "process, or not an address of this machine)")
    await server.start()
    return server, bound, health_servicer


def channel(address: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """A channel to another pdserve service (TLS with the cluster credential when configured);
    `options` replace CHANNEL_OPTIONS."""
    opts = CHANNEL_OPTIONS if options is None else options
    creds, extra = security.channel_credentials()
    if creds is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, creds, options=opts + extra)


S = TypeVar("S")


class Stubs(Generic[S]):
    """Stubs to other pdserve services, one kept channel per address (`make` builds a stub
    on a channel)."""

    def __init__(self, make: Callable[[grpc.aio.Channel], S]) -> None:
        self._make = make
        self._stubs: dict[str, S] = {}

    def get(self, address: str) -> S:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = self._make(channel(address))
        return stub


def write_ready_file(path: Path | None, port: int, **extra: Any) -> None:
    if path is None:
        return
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid(), **extra}))
    tmp.replace(path)  # atomic: readers never see half a file


async def wait_until_idle(busy: Callable[[], bool], timeout_s: float,
                          settle_s: float = 0.0) -> bool:
    """Draining: after `settle_s` (for a worker, the time for its load report to take it out
    of rotation), waits until nothing accepted is left, or `timeout_s`; returns whether
    nothing is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    await asyncio.sleep(settle_s)
    while busy() and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return not busy()


async def serve_until_signal(
    server: grpc.aio.Server,
    health_servicer: HealthServicer,
    cleanup: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = 5.0,
    drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Runs until SIGINT/SIGTERM, then: drain (leave rotation, finish accepted work), NOT_SERVING,
    stop accepting, finish in-flight RPCs, cleanup."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    wait = asyncio.ensure_future(server.wait_for_termination())
    await asyncio.wait([asyncio.ensure_future(stop.wait()), wait],
                       return_when=asyncio.FIRST_COMPLETED)
    if drain is not None:
        await drain()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)
    if cleanup is not None:
        await cleanup()
    log.info("stopped")
