"""Pipelined prefill of a long prompt over several prefill workers (Mooncake's chunked pipeline
parallelism): what the head (head.py) and the stages (stage.py) share.

One prompt's prefill is too much for one worker when it alone would keep that worker busy far
longer than the others (a 190k-token prompt is most of a minute). The gateway's balancer
(scheduler/balancers.py, plan_prefill_index) then picks G workers; each runs 1/G of the layers
over the whole prompt, chunk by chunk, so each does 1/G of the work and the stages overlap:

    stage 0 (layers 0..a)   | chunk 0 | chunk 1 | chunk 2 |
    stage 1 (layers a..b)             | chunk 0 | chunk 1 | chunk 2 |
    head    (layers b..L)                       | chunk 0 | chunk 1 | chunk 2 | READ KV |

The head is the worker the gateway sent `Prefill` to, with the others in
`PrefillRequest.pipeline`. It calls the last of them with `PrefillStage`, which calls the one
before it, and so on; hidden states flow back down the chain as protobuf messages, one per
chunk. Each stage keeps the KV of its own layers in its own pages. After the last chunk every
stage sends a `StageKV` (its NIXL agent and, per page, the byte range of its layers: pages are
page-major, so a layer range of a page is one range), forwarded down the chain; the head READs
those ranges into its pages, so it ends with every layer of every page, as if it had computed
the prompt alone, and carries on as usual (checksum, WRITE to decode, blocks to the kvstore).
Closing its side of the stream releases the stages, which free their pages.

Every stage's chunks are steps of its worker's engine (a `Sequence` with a `StageWork`),
batched with nothing else but scheduled among the worker's other prompts.

Cached blocks: the head loads them as usual and tells the stages how many; each stage loads the
same blocks (its layers are in them). A stage that cannot, or any other failure of the
pipeline, costs only time: the head computes the prompt alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import torch

from pdserve.cache.block_hash import cacheable_blocks
from pdserve.engine.kv_pool import KVPool, PageId
from pdserve.services.errors import InvalidArgument
from pdserve.services.limits import MAX_CHUNK_TOKENS
from pdserve.services.server import EOF, Stubs
from pdserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc


class PipelineError(Exception):
    """The pipeline did not deliver; the head computes the prompt alone."""


def layer_split(num_layers: int, stages: int) -> list[int]:
    """layer_end of each of `stages` stages, as even as whole layers allow (the first stages
    take the extra layers: the head also samples, READs and sends)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"{stages} pipeline stages for {num_layers} layers")
    base, extra = divmod(num_layers, stages)
    ends, end = [], 0
    for g in range(stages):
        end += base + (1 if g < extra else 0)
        ends.append(end)
    return ends


def head_share(num_layers: int, upstream: int) -> float:
    """The share of a prompt's work a pipeline's head does (its share of the layers)."""
    stages = min(upstream, num_layers - 1) + 1
    if stages == 1:
        return 1.0
    return (num_layers - layer_split(num_layers, stages)[-2]) / num_layers


def hidden_message(begin: int, h: torch.Tensor) -> prefill_pb2.PipelineStageOutput:
    h = h.contiguous()
    return prefill_pb2.PipelineStageOutput(hidden=prefill_pb2.HiddenChunk(
        begin=begin, num_tokens=h.shape[0], dtype=str(h.dtype).removeprefix("torch."),
        data=h.view(torch.uint8).cpu().numpy().tobytes()))


def hidden_tensor(msg: prefill_pb2.HiddenChunk, dtype: torch.dtype, hidden_size: int,
                  device: torch.device) -> torch.Tensor:
    want = str(dtype).removeprefix("torch.")
    if msg.dtype != want:
        raise PipelineError(f"hidden states in {msg.dtype!r}, this worker computes in {want!r}")
    row = hidden_size * torch.finfo(dtype).bits // 8
    if msg.num_tokens <= 0 or len(msg.data) != msg.num_tokens * row:
        raise PipelineError(f"hidden chunk of {len(msg.data)} bytes for {msg.num_tokens} tokens "
                            f"of {row} bytes")
    h = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype)
    return h.view(msg.num_tokens, hidden_size).to(device)


def stage_kv(pool: KVPool, agent_name: str, agent_metadata: bytes, mem_type: str,
             pages: Sequence[PageId], lo: int, hi: int) -> prefill_pb2.StageKV:
    """Where a stage's layers [lo, hi) of its pages are, for the head's NIXL READ."""
    lb = pool.page_nbytes // pool.layout.num_layers
    dev = max(pool.kv.get_device(), 0)
    return prefill_pb2.StageKV(
        agent_name=agent_name, agent_metadata=agent_metadata, layer_begin=lo, layer_end=hi,
        mem_type=mem_type,
        ranges=[common_pb2.PageDescriptor(addr=pool.page_addr(p) + lo * lb,
                                          length=(hi - lo) * lb, device_id=dev)
                for p in pages])


def check_stage(req: prefill_pb2.PipelineStageRequest, num_layers: int, block_tokens: int,
                max_context: int, vocab_size: int) -> None:
    """InvalidArgument naming the field of a stage request that cannot be served."""
    n = len(req.prompt_token_ids)
    if not req.request_id:
        raise InvalidArgument("request_id: empty")
    if not 0 < n <= max_context:
        raise InvalidArgument(f"prompt_token_ids: {n} tokens, must be 1..{max_context}")
    if any(not 0 <= t < vocab_size for t in req.prompt_token_ids):
        raise InvalidArgument(f"prompt_token_ids: a token id outside [0, {vocab_size})")
    if not 0 <= req.layer_begin < req.layer_end < num_layers:
        raise InvalidArgument(f"layer_begin, layer_end: [{req.layer_begin}, {req.layer_end}) "
                              f"must lie in [0, {num_layers - 1}) (the last layers are the "
                              f"head's)")
    if not 0 <= req.cached_blocks <= cacheable_blocks(n, block_tokens):
        raise InvalidArgument(f"cached_blocks: {req.cached_blocks} for a prompt of {n} tokens")
    if not 0 < req.chunk_tokens <= MAX_CHUNK_TOKENS:
        raise InvalidArgument(f"chunk_tokens: {req.chunk_tokens}, must be 1..{MAX_CHUNK_TOKENS}")
    ul = list(req.upstream_layers)
    chain = (len(ul) == len(req.upstream)
             and (ul[-1] == req.layer_begin and all(a < b for a, b in zip([0, *ul], ul))
                  if ul else req.layer_begin == 0))
    if not chain:
        raise InvalidArgument("upstream_layers: one increasing layer_end per upstream stage, "
                              "the last equal to layer_begin")


if TYPE_CHECKING:
    # A PrefillStage call to the stage before this one.
    StageCall = grpc.aio.StreamStreamCall[prefill_pb2.PipelineStageRequest,
                                          prefill_pb2.PipelineStageOutput]


async def release(call: StageCall, timeout_s: float) -> None:
    """Closes our side of a stage's stream and waits for its end: the stage (and the stages
    before it) have freed their pages when this returns."""
    await call.done_writing()
    while await asyncio.wait_for(call.read(), timeout_s) is not EOF:
        pass


class Peers:
    """Stubs for the other prefill workers of pipelines, one channel per peer, kept."""

    def __init__(self) -> None:
        self._stubs: Stubs[prefill_pb2_grpc.PrefillAsyncStub] = Stubs(
            lambda ch: prefill_pb2_grpc.PrefillStub(ch))

    def stage_call(self, address: str) -> StageCall:
        stub = self._stubs.get(address)
        # The call's requests are written one by one (call.write); grpc-stubs 1.53 wants an
        # iterator here, which grpc.aio does not.
        return stub.PrefillStage()  # type: ignore[call-arg]
