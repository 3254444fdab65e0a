"""Errors the services answer with, and the one place where every domain error becomes a gRPC
status.

A servicer method validates, converts, delegates, and lets errors rise; `@answers_errors` turns
them into `context.abort(code, message)` here. Library errors (engine, cache, scheduler) keep
their own types and are mapped by `status_of`; service errors carry their code.

Blame: a prefill worker that fails because of the decode worker it was sending to (a KV
transfer that could not complete) says so in the trailing metadata `pdserve-fault: decode`,
so the gateway retries on another decode worker without reading error texts (`fault_of`).
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc

from pdserve.cache.errors import QueryError, StoreFull
from pdserve.engine.errors import OutOfPages
from pdserve.scheduler.errors import NoRoom, NoWorker, RegistryError

if TYPE_CHECKING:
    from pdserve.services.server import Context

RETRY_AFTER_MS = 500  # the back-pressure hint sent with RESOURCE_EXHAUSTED
FAULT_KEY = "pdserve-fault"
RETRY_AFTER_KEY = "retry-after-ms"


class Fault(enum.Enum):
    """Which side of a prefill -> decode hand-off failed a request."""

    PREFILL = "prefill"
    DECODE = "decode"


class ServiceError(Exception):
    """An error answered with `code`; the message names the field or the limit."""

    code = grpc.StatusCode.INTERNAL
    fault: Fault | None = None
    retry_after_ms: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def error_for(code: grpc.StatusCode, message: str) -> ServiceError:
    """A ServiceError answered with `code` (a worker's status passed on to the client)."""
    e = ServiceError(message)
    e.code = code
    return e


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Backpressure(ResourceExhausted):
    """No room now; the client may retry after `retry_after_ms`."""

    retry_after_ms = RETRY_AFTER_MS


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(ServiceError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


class TransferError(Unavailable):
    """A KV transfer to a decode worker could not be posted or did not complete: the decode
    side's fault."""

    fault = Fault.DECODE


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    message: str
    metadata: tuple[tuple[str, str], ...] = ()


def status_of(e: BaseException) -> Status | None:
    """The status a domain error is answered with; None for an error that is a bug."""
    if isinstance(e, ServiceError):
        md = []
        if e.fault is not None:
            md.append((FAULT_KEY, e.fault.value))
        if e.retry_after_ms is not None:
            md.append((RETRY_AFTER_KEY, str(e.retry_after_ms)))
        return Status(e.code, e.message, tuple(md))
    if isinstance(e, OutOfPages):
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"KV pages: {e}")
    if isinstance(e, NoRoom):
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"KV pages: {e}; retry in {RETRY_AFTER_MS} ms or lower max_tokens",
                      ((RETRY_AFTER_KEY, str(RETRY_AFTER_MS)),))
    if isinstance(e, NoWorker):
        return Status(grpc.StatusCode.UNAVAILABLE, str(e))
    if isinstance(e, StoreFull):
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"kvstore: {e}")
    if isinstance(e, QueryError):
        return Status(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, RegistryError):
        return Status(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    return None


def fault_of(e: grpc.aio.AioRpcError) -> Fault | None:
    """The fault a failed internal call's trailing metadata names."""
    # grpc.aio's trailing metadata holds (key, value) pairs (grpc-stubs types the sync ones).
    metadata = cast(Iterable[tuple[str, "str | bytes"]], e.trailing_metadata() or ())
    for key, value in metadata:
        if key == FAULT_KEY:
            try:
                return Fault(value if isinstance(value, str) else value.decode())
            except ValueError:
                return None
    return None


async def abort(context: Context, status: Status) -> None:
    if status.metadata:
        context.set_trailing_metadata(status.metadata)
    await context.abort(status.code, status.message)


F = TypeVar("F", bound=Callable[..., Any])


def answers_errors(method: F) -> F:
    """Servicer method decorator (unary or streaming): a domain error becomes its status; an
    abort or a cancellation passes through; anything else is a bug and rises (gRPC answers
    UNKNOWN, the server logs it)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Context
                         ) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as e:
                status = status_of(e)
                if status is None:
                    raise
                await abort(context, status)
        return cast(F, stream)  # the wrapper has the method's signature

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Context) -> Any:
        try:
            return await method(self, request, context)
        except Exception as e:
            status = status_of(e)
            if status is None:
                raise
            await abort(context, status)
    return cast(F, unary)  # the wrapper has the method's signature
