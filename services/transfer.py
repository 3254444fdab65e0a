"""KV page transfer over NIXL (UCX backend): the decode side exposes pages, the prefill side
WRITEs into them and notifies.

Descriptors travel as protobuf fields (`PageDescriptor`); the notification is a serialized
`TransferNotice`. NIXL's own `get_serialized_descs` pickles, so it is never used, and nothing
received here is ever unpickled.

A transfer that cannot complete is a `TransferError` (services/errors.py): the decode side's
fault, which the gateway learns from the status's `pdserve-fault` metadata.

A sender's transfer is a small state machine polled without blocking:
    POSTED -> DONE | FAILED (NIXL error) | TIMED_OUT (deadline passed; handle released)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import xxhash
from google.protobuf.message import DecodeError

from pdserve.engine.kv_pool import KVPool
from pdserve.services.errors import TransferError
from pdserve.services.nixl_agent import new_agent
from pdserve.v1 import common_pb2

log = logging.getLogger(__name__)


class TransferState(enum.Enum):
    POSTED = "posted"
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


def pages_checksum(pool: KVPool, pages: Sequence[int]) -> int:
    h = xxhash.xxh3_64()
    for p in pages:
        h.update(pool.page_bytes(p).cpu().numpy().data)
    return h.intdigest()


# One READ: (local (addr, length) ranges, remote (addr, length, device) ranges).
ReadGroup = tuple[list[tuple[int, int]], list[tuple[int, int, int]]]


class NixlEndpoint:
    """One NIXL agent with the whole KV pool registered."""

    def __init__(self, name: str, pool: KVPool) -> None:
        self.name = name
        self.pool = pool
        self.mem_type = "VRAM" if pool.kv.is_cuda else "DRAM"
        self.agent = new_agent(name)
        self._reg = self.agent.register_memory(self.agent.get_reg_descs(pool.kv))
        self._remote_md: dict[str, bytes] = {}
        self.num_notices = 0  # transfer notices received (a receiver's)

    @property
    def metadata(self) -> bytes:
        md: bytes = self.agent.get_agent_metadata()
        return md

    def descriptors(self, pages: Sequence[int]) -> list[common_pb2.PageDescriptor]:
        dev = max(self.pool.kv.get_device(), 0)
        n = self.pool.page_nbytes
        return [common_pb2.PageDescriptor(addr=self.pool.page_addr(p), length=n, device_id=dev)
                for p in pages]

    # -- sender --------------------------------------------------------------------------
    def _remote(self, res: common_pb2.Reservation) -> str:
        return self.remote(res.agent_name, res.agent_metadata)

    def remote(self, agent_name: str, metadata: bytes) -> str:
        """Knows the peer agent (its metadata carried in a protobuf field); returns its name."""
        known = self._remote_md.get(agent_name)
        if known != metadata:
            if known is not None:  # the peer restarted: forget its old memory
                self.agent.remove_remote_agent(agent_name)
            name = self.agent.add_remote_agent(metadata)
            name = name.decode() if isinstance(name, bytes) else name
            if name != agent_name:
                raise TransferError(f"peer named {agent_name!r}, its metadata is for {name!r}")
            self._remote_md[agent_name] = metadata
        return agent_name

    async def read_groups(self, remote: str, groups: Sequence[ReadGroup], remote_mem: str,
                          on_group: Callable[[int], None], timeout_s: float) -> int:
        """Posts one READ per group of (local ranges <- remote ranges): local ranges are
        (addr, length) in this pool, remote ones (addr, length, device); calls on_group(g) in
        group order as each group and those before it complete. Returns how many groups were
        delivered (fewer on a NIXL error or at the deadline)."""
        dev = max(self.pool.kv.get_device(), 0)
        handles = []
        delivered = 0
        try:
            for local, rem in groups:
                h = self.agent.initialize_xfer(
                    "READ", self.agent.get_xfer_descs([(a, n, dev) for a, n in local],
                                                      self.mem_type),
                    self.agent.get_xfer_descs(rem, remote_mem), remote, b"")
                handles.append(h)
                if self._post(h) is TransferState.FAILED:
                    return delivered
            deadline = time.monotonic() + timeout_s
            while delivered < len(handles):
                state = self._state(self.agent.check_xfer_state(handles[delivered]))
                if state is TransferState.DONE:
                    on_group(delivered)
                    delivered += 1
                    continue
                if state is TransferState.FAILED or time.monotonic() > deadline:
                    return delivered
                await asyncio.sleep(0.0005)
            return delivered
        except Exception as e:  # noqa: BLE001 - NIXL raises its own types (remote disconnect...)
            log.warning("NIXL read failed", extra={"peer": remote,
                                                   "error": f"{type(e).__name__}: {e}"})
            return delivered
        finally:
            for h in handles:
                try:
                    self.agent.release_xfer_handle(h)
                except Exception:  # noqa: BLE001 - a still-running handle may refuse release
                    log.warning("read handle not released", extra={"peer": remote})

    def notify(self, remote: str, message: bytes) -> None:
        try:
            self.agent.send_notif(remote, message)
        except Exception as e:  # noqa: BLE001 - the peer is gone: nothing to tell it
            log.warning("NIXL notification failed", extra={"peer": remote, "error": str(e)})

    async def write(
        self,
        local_pages: Sequence[int],
        res: common_pb2.Reservation,
        notice: common_pb2.TransferNotice,
        timeout_s: float,
    ) -> int:
        """WRITEs local pages into the reservation's first pages, then notifies. Returns bytes."""
        n = len(local_pages)
        if n > len(res.pages):
            raise TransferError(f"{n} pages to send, reservation holds {len(res.pages)}")
        size = self.pool.page_nbytes
        for i, d in enumerate(res.pages[:n]):
            if d.length != size:
                raise TransferError(f"reservation page {i} is {d.length} bytes, pages are {size}")
        try:
            return await self._write(local_pages, res, notice, timeout_s, n, size)
        except TransferError:
            raise
        except Exception as e:
            raise TransferError(f"KV transfer failed for request {notice.request_id}: "
                                f"{type(e).__name__}: {e}") from e

    async def _write(self, local_pages: Sequence[int], res: common_pb2.Reservation,
                     notice: common_pb2.TransferNotice, timeout_s: float, n: int,
                     size: int) -> int:
        remote = self._remote(res)
        local = self.agent.get_xfer_descs(
            [(self.pool.page_addr(p), size, max(self.pool.kv.get_device(),
                                                0)) for p in local_pages],
            self.mem_type)
        remote_descs = self.agent.get_xfer_descs(
            [(d.addr, d.length, d.device_id) for d in res.pages[:n]], res.mem_type or "DRAM")
        handle = self.agent.initialize_xfer("WRITE", local, remote_descs, remote,
                                            notice.SerializeToString())
        try:
            state = self._post(handle)
            deadline = time.monotonic() + timeout_s
            while state is TransferState.POSTED:
                if time.monotonic() > deadline:
                    state = TransferState.TIMED_OUT
                    break
                await asyncio.sleep(0.0005)
                state = self._state(self.agent.check_xfer_state(handle))
        finally:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception:  # noqa: BLE001 - a still-running handle may refuse release
                log.warning("transfer handle not released", extra={"request_id": notice.request_id})
        if state is not TransferState.DONE:
            raise TransferError(f"KV transfer {state.value} for request {notice.request_id}")
        return n * size

    def _post(self, handle: Any) -> TransferState:  # a NIXL transfer handle
        return self._state(self.agent.transfer(handle))

    @staticmethod
    def _state(s: str) -> TransferState:
        return {"DONE": TransferState.DONE, "PROC": TransferState.POSTED}.get(s,
                                                                              TransferState.FAILED)

    # -- receiver --------------------------------------------------------------------------
    def poll_notices(self) -> list[common_pb2.TransferNotice]:
        out: list[common_pb2.TransferNotice] = []
        for _agent, msgs in self.agent.get_new_notifs().items():
            for raw in msgs:
                notice = common_pb2.TransferNotice()
                try:
                    notice.ParseFromString(bytes(raw))
                except DecodeError:
                    log.warning("malformed transfer notice dropped", extra={"bytes": len(raw)})
                    continue
                out.append(notice)
        self.num_notices += len(out)
        return out
