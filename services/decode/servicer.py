"""The decode service's gRPC methods: validate, convert, delegate to the worker; errors become
statuses in services/errors.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pdserve.engine.sequence import FailedEvent, FinishEvent, TokenEvent
from pdserve.services.decode.worker import DecodeWorker
from pdserve.services.errors import Internal, InvalidArgument, NotFound, answers_errors
from pdserve.services.limits import MAX_INTERNAL_REQUEST_ID
from pdserve.services.outbox import RequestFailed
from pdserve.services.worker import check_prompt, sampling_from_proto
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

if TYPE_CHECKING:
    from pdserve.services.server import Context

class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    def _check(self, request: decode_pb2.ReserveRequest) -> None:
        w = self.worker
        if not request.request_id:
            raise InvalidArgument("request_id: empty")
        if len(request.request_id) > MAX_INTERNAL_REQUEST_ID:
            raise InvalidArgument(f"request_id: {len(request.request_id)} characters, limit "
                                  f"{MAX_INTERNAL_REQUEST_ID}")
        check_prompt(request.prompt_token_ids, w.loaded.config.vocab_size)
        sp = request.sampling
        if sp.max_tokens <= 0:
            raise InvalidArgument(f"sampling.max_tokens: {sp.max_tokens}, must be > 0")
        total = len(request.prompt_token_ids) + sp.max_tokens
        if total > w.loaded.max_context:
            raise InvalidArgument(f"prompt + max_tokens = {total}, context limit "
                                  f"{w.loaded.max_context}")

    @answers_errors
    async def Reserve(self, request: decode_pb2.ReserveRequest,
                      context: Context) -> common_pb2.Reservation:
        self._check(request)
        return self.worker.reserve(request.request_id, list(request.prompt_token_ids),
                                   sampling_from_proto(request.sampling),
                                   asyncio.get_running_loop())

    @answers_errors
    async def Stream(self, request: decode_pb2.StreamRequest,
                     context: Context) -> AsyncIterator[decode_pb2.TokenChunk]:
        outbox = self.worker.outbox(request.request_id)
        if outbox is None:
            raise NotFound(f"request_id: {request.request_id!r} has no reservation here")
        ended = False
        try:
            while True:
                msg = await outbox.get()
                if isinstance(msg, TokenEvent):
                    reason = msg.finish_reason
                    ended = reason is not None
                    yield decode_pb2.TokenChunk(
                        token_ids=[msg.token], finish_reason=reason.value if reason else "",
                        logprobs=[] if msg.logprob is None else [msg.logprob])
                    if ended:
                        return
                    continue
                ended = True  # every other message ends the request
                if isinstance(msg, FinishEvent):
                    yield decode_pb2.TokenChunk(finish_reason=msg.reason.value)
                    return
                if isinstance(msg, FailedEvent):
                    raise Internal(f"decode step failed: {msg.error}")
                if isinstance(msg, RequestFailed):
                    raise msg.error
                raise AssertionError(f"a decode worker runs no pipeline stages: {msg!r}")
        finally:
            if not ended:  # the caller went away: free everything the request holds
                self.worker.release(request.request_id)

    @answers_errors
    async def Release(self, request: decode_pb2.ReleaseRequest,
                      context: Context) -> decode_pb2.ReleaseResponse:
        return decode_pb2.ReleaseResponse(
            found=self.worker.release(request.request_id, unwritten=request.unwritten))

    @answers_errors
    async def Renew(self, request: decode_pb2.RenewRequest,
                    context: Context) -> decode_pb2.RenewResponse:
        w = self.worker
        renewed = w.renew(request.request_id, request.epoch)
        return decode_pb2.RenewResponse(renewed=renewed, lease_s=w.lease_s if renewed else 0.0)
