"""A decode worker's requests, each a small state machine, and the pages of requests that
ended before their KV landed.

    RESERVED ──notice, checksum ok──> RUNNING ──finish / release──> DONE
       │  └──notice wrong (tokens, checksum)──> FAILED           (pages freed: the writer is done)
       ├──no notice within the lease──> EXPIRED ──┐
       ├──released by its caller──────> DONE ─────┴─> pages QUARANTINED until the lease's end
       │                                                 + quarantine_s, then freed
       └──released, never given to a prefill worker──> DONE (pages freed at once)

A prefill worker starts a WRITE only within the lease and gives up after its transfer
timeout, so pages of a reservation that ended early are reused only once no writer may still
be writing into them (the failure behind vLLM #52234's wrong answers). Only RESERVED and
RUNNING requests are kept by id; an id is free again once its request ended.

Pure state with an injected clock (no threads, no RPC): the worker calls it from its event loop
(reserve, release) and its engine thread (land, expire, finish), under the table's lock.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.engine.kv_pool import KVPool, PageId
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import Sequence
from pdserve.scheduler.balancers import request_pages
from pdserve.services.errors import AlreadyExists, DataLoss, DeadlineExceeded, ServiceError
from pdserve.v1 import common_pb2


class DecodeState(enum.Enum):
    RESERVED = "reserved"  # pages set aside; waiting for the KV transfer's notice
    RUNNING = "running"    # KV landed and verified; the engine decodes it
    DONE = "done"          # finished, or released by its caller
    FAILED = "failed"      # the transfer's notice did not match what landed
    EXPIRED = "expired"    # no notice within the lease


@dataclass
class DecodeRequest:
    seq: Sequence
    state: DecodeState
    reserved_at: float
    lease_end: float
    error: ServiceError | None = None  # why it FAILED or EXPIRED

    @property
    def request_id(self) -> str:
        return self.seq.request_id


@dataclass(order=True)
class _Held:
    until: float
    pages: list[PageId] = field(compare=False)


class DecodeRequests:
    def __init__(self, pool: KVPool, lease_s: float, quarantine_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.lease_s = lease_s
        self.quarantine_s = quarantine_s
        self.clock = clock
        self.lock = threading.Lock()
        self._active: dict[str, DecodeRequest] = {}
        self._held: list[_Held] = []  # by `until`
        self.num_finished = 0
        self.num_failed = 0

    # -- queries ----------------------------------------------------------------------------
    def get(self, request_id: str) -> DecodeRequest | None:
        return self._active.get(request_id)

    def count(self, state: DecodeState) -> int:
        return sum(1 for r in self._active.values() if r.state is state)

    @property
    def quarantined_pages(self) -> int:
        return sum(len(h.pages) for h in self._held)

    @property
    def busy(self) -> bool:
        """Requests accepted and not ended."""
        return bool(self._active)

    @property
    def waiting_for_kv(self) -> bool:
        """Something may land or expire soon: the engine thread polls often."""
        return bool(self._held) or any(r.state is DecodeState.RESERVED
                                       for r in self._active.values())

    # -- transitions --------------------------------------------------------------------------
    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams
                ) -> DecodeRequest:
        """Pages for prompt + max_tokens: RESERVED. OutOfPages when they do not fit."""
        with self.lock:
            if request_id in self._active:
                raise AlreadyExists(f"request_id {request_id!r} is already reserved here")
            seq = Sequence(request_id, prompt, params)
            seq.pages = self.pool.reserve(request_pages(self.pool.layout.block_tokens,
                                                        len(prompt), params.max_tokens))
            now = self.clock()
            req = self._active[request_id] = DecodeRequest(seq, DecodeState.RESERVED, now,
                                                           now + self.lease_s)
        return req

    def land(self, notice: common_pb2.TransferNotice, epoch: int,
             checksum: Callable[[list[PageId]], int]) -> DecodeRequest | None:
        """A transfer's notice arrived: RESERVED -> RUNNING (the first token appended) when it
        covers the whole prompt and `checksum` of the pages matches; FAILED (pages freed)
        otherwise. None when it matches no reserved request (late, stale epoch): dropped."""
        with self.lock:
            req = self._active.get(notice.request_id)
            if req is None or req.state is not DecodeState.RESERVED or notice.epoch != epoch:
                return None
            seq = req.seq
            n = self.pool.layout.pages_for(len(seq.prompt))
            if notice.num_prompt_tokens != len(seq.prompt):
                return self._fail(req, DataLoss(
                    f"KV transfer covers {notice.num_prompt_tokens} tokens, prompt has "
                    f"{len(seq.prompt)}"))
            if checksum(seq.pages[:n]) != notice.kv_checksum:
                return self._fail(req, DataLoss("KV transfer checksum mismatch"))
            seq.output.append(notice.first_token)
            req.state = DecodeState.RUNNING
        return req

    def _fail(self, req: DecodeRequest, error: ServiceError) -> DecodeRequest:
        req.state, req.error = DecodeState.FAILED, error
        self.pool.release(req.seq.pages)
        req.seq.pages = []
        del self._active[req.request_id]
        self.num_failed += 1
        return req

    def expire(self) -> tuple[list[DecodeRequest], bool]:
        """Reservations past their lease -> EXPIRED (their pages quarantined); quarantined pages
        past their time are freed. Returns the expired requests and whether pages were freed."""
        now = self.clock()
        expired = []
        with self.lock:
            for req in [r for r in self._active.values()
                        if r.state is DecodeState.RESERVED and now > r.lease_end]:
                req.state = DecodeState.EXPIRED
                req.error = DeadlineExceeded(
                    f"KV transfer did not arrive within the {self.lease_s:g} s lease")
                self._hold(req)
                self.num_failed += 1
                expired.append(req)
            freed = False
            while self._held and self._held[0].until <= now:
                self.pool.release(self._held.pop(0).pages)
                freed = True
        return expired, freed

    def renew(self, request_id: str) -> bool:
        """A RESERVED request's lease, not over yet, runs from now again (the prefill worker
        holding it asks while the prompt waits or computes). False when no such reservation
        waits: expired, released, landed, unknown."""
        with self.lock:
            req = self._active.get(request_id)
            now = self.clock()
            if req is None or req.state is not DecodeState.RESERVED or now > req.lease_end:
                return False
            req.lease_end = now + self.lease_s
        return True

    def release(self, request_id: str, unwritten: bool = False) -> DecodeState | None:
        """The caller is done with the request: RESERVED -> DONE with its pages quarantined
        (freed at once if `unwritten`: the caller never gave them to a prefill worker);
        RUNNING -> DONE (the caller aborts it in the engine, which frees its pages). Returns its
        state before, or None when no such request is reserved or running."""
        with self.lock:
            req = self._active.get(request_id)
            if req is None:
                return None
            was = req.state
            if was is DecodeState.RESERVED and unwritten:
                del self._active[request_id]
                self.pool.release(req.seq.pages)
                req.seq.pages = []
            elif was is DecodeState.RESERVED:
                self._hold(req)
            else:
                del self._active[request_id]
            req.state = DecodeState.DONE
        return was

    def finish(self, request_id: str) -> DecodeRequest | None:
        """The engine finished it (or failed it): RUNNING -> DONE."""
        with self.lock:
            req = self._active.get(request_id)
            if req is None or req.state is not DecodeState.RUNNING:
                return None
            del self._active[request_id]
            req.state = DecodeState.DONE
            self.num_finished += 1
        return req

    def _hold(self, req: DecodeRequest) -> None:
        """Quarantines a reservation's pages until no prefill may write them any more."""
        del self._active[req.request_id]
        if req.seq.pages:
            self._held.append(_Held(req.lease_end + self.quarantine_s, req.seq.pages))
            self._held.sort()
            req.seq.pages = []
