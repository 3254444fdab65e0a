"""The prefill service's gRPC methods: validate, convert, delegate to the worker; errors become
statuses in services/errors.py (a failed KV transfer carries `pdserve-fault: decode`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pdserve.services.errors import InvalidArgument, answers_errors
from pdserve.services.limits import MAX_INTERNAL_REQUEST_ID, MAX_STAGES
from pdserve.services.prefill.worker import PrefillWorker
from pdserve.services.worker import check_prompt
from pdserve.v1 import prefill_pb2, prefill_pb2_grpc

if TYPE_CHECKING:
    from pdserve.services.server import Context

class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    def _check(self, req: prefill_pb2.PrefillRequest) -> None:
        w = self.worker
        n = len(req.prompt_token_ids)
        if not req.request_id:
            raise InvalidArgument("request_id: empty")
        if len(req.request_id) > MAX_INTERNAL_REQUEST_ID:
            raise InvalidArgument(f"request_id: {len(req.request_id)} characters, limit "
                                  f"{MAX_INTERNAL_REQUEST_ID}")
        check_prompt(req.prompt_token_ids, w.loaded.config.vocab_size)
        if n > w.loaded.max_context:
            raise InvalidArgument(f"prompt_token_ids: {n} tokens, context limit "
                                  f"{w.loaded.max_context}")
        res = req.reservation
        if res.layout_fingerprint != w.fingerprint:
            raise InvalidArgument(f"reservation.layout_fingerprint: {res.layout_fingerprint!r}, "
                                  f"this worker's is {w.fingerprint!r}")
        if len(res.pages) < w.layout.pages_for(n):
            raise InvalidArgument(f"reservation.pages: {len(res.pages)}, the prompt needs "
                                  f"{w.layout.pages_for(n)}")
        if len(req.pipeline) > MAX_STAGES:
            raise InvalidArgument(f"pipeline: {len(req.pipeline)} stages before this one, at "
                                  f"most {MAX_STAGES}")
        if any(not p.address for p in req.pipeline):
            raise InvalidArgument("pipeline: a stage without an address")

    @answers_errors
    async def Prefill(self, request: prefill_pb2.PrefillRequest,
                      context: Context) -> prefill_pb2.PrefillResponse:
        self._check(request)
        return await self.worker.prefill(request)

    @answers_errors
    async def PrefillStage(self, request_iterator: AsyncIterator[prefill_pb2.PipelineStageRequest],
                           context: Context
                           ) -> AsyncIterator[prefill_pb2.PipelineStageOutput]:
        requests = request_iterator.__aiter__()
        first = await anext(requests, None)
        if first is None:
            return
        async for out in self.worker.stage.run(first, requests):
            yield out
