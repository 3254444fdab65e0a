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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import xxhash
from google.protobuf.message import DecodeError

from pdserve.engine.kv_pool import KVPool
from pdserve.services.errors import TransferError
from pdserve.services.nixl_agent import new_agent
from pdserve.v1 import common_pb2, kvstore_pb2

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class TransferState(enum.Enum):
    POSTED = "posted"
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


def page_digest(pool: KVPool, page: int) -> int:
    """xxh3_64 of one page's bytes: the same number as the checksum in the header of the
    store block holding that page (cache/codec.py), so a page fetched verified from the store
    needs no hashing again."""
    return xxhash.xxh3_64_intdigest(pool.page_bytes(page).cpu().numpy().data)


def combine_digests(digests: Sequence[int]) -> int:
    """A transfer's checksum (TransferNotice.kv_checksum): xxh3_64 over its pages' digests,
    8 bytes little-endian each, in page order."""
    return xxhash.xxh3_64_intdigest(b"".join(d.to_bytes(8, "little") for d in digests))


def page_digests(pool: KVPool, pages: Sequence[int]) -> list[int]:
    return [page_digest(pool, p) for p in pages]


def pages_checksum(pool: KVPool, pages: Sequence[int]) -> int:
    return combine_digests(page_digests(pool, pages))


# One READ: (local (addr, length) ranges, remote (addr, length, device) ranges).
ReadGroup = tuple[list[tuple[int, int]], list[tuple[int, int, int]]]


class NixlEndpoint:
    """One NIXL agent with the whole KV pool registered (and, for a reader of staged blocks,
    `lanes`: more agents on the same pool, each READing on a thread of its own)."""

    def __init__(self, name: str, pool: KVPool, read_lanes: int = 0) -> None:
        self.name = name
        self.pool = pool
        self.mem_type = "VRAM" if pool.kv.is_cuda else "DRAM"
        self.agent = new_agent(name)
        self._reg = self.agent.register_memory(self.agent.get_reg_descs(pool.kv))
        # Agents of their own that READ staged blocks (ReadLane); none: this one READs them.
        self.lanes = [ReadLane(f"{name}-read{i}", pool) for i in range(read_lanes)]
        self._remote_md: dict[str, bytes] = {}
        self._regions: dict[str, set[bytes]] = {}  # partial metadata loaded, per peer
        self._closed: dict[str, int] = {}  # regions each peer had closed when last seen
        self._reading: dict[str, int] = {}  # READs in flight, per peer
        self._idle: dict[str, asyncio.Event] = {}  # set while no READ from the peer is in flight
        self.regions_forgotten = 0  # times a peer's regions were forgotten (see load_regions)
        self.reads = 0  # READs that landed
        self.read_failures = 0  # READs that failed or timed out
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
            self._regions.pop(agent_name, None)
            self._closed.pop(agent_name, None)
            if known is not None:  # the peer restarted: forget its old memory
                self.agent.remove_remote_agent(agent_name)
            name = self.agent.add_remote_agent(metadata)
            name = name.decode() if isinstance(name, bytes) else name
            if name != agent_name:
                raise TransferError(f"peer named {agent_name!r}, its metadata is for {name!r}")
            self._remote_md[agent_name] = metadata
        return agent_name

    async def load_regions(self, remote: str, metadata: Sequence[bytes], closed: int = 0,
                           drain_s: float = 1.0) -> None:
        """Loads partial metadata of memory a known peer registered since (each once).

        `closed` counts the regions the peer has unregistered so far. Once it grows, an
        address range this agent loaded may lie inside a new region, and NIXL would then not
        find the new one (it checks only the entry at or just before an address: an
        overlapping old entry hides it, NIXL_ERR_NOT_FOUND). So the peer's regions are
        forgotten first (its full metadata loaded again), once this endpoint's READs from it
        have ended (waiting up to `drain_s`); readers call this before every READ, which
        loads their regions again.

        A partial metadata that fails to load makes NIXL drop all it knew of the peer, so
        the peer is then forgotten here too (known anew by the next `remote` call) and the
        error raised."""
        if (closed > self._closed.get(remote, 0) and self._regions.get(remote)
                and self._reading.get(remote, 0)):
            try:
                await asyncio.wait_for(self._idle[remote].wait(), drain_s)
            except TimeoutError:
                pass  # those READs may fail: their blocks are then computed
        self.load_regions_now(remote, metadata, closed)

    def load_regions_now(self, remote: str, metadata: Sequence[bytes], closed: int = 0) -> None:
        """`load_regions` without waiting for this endpoint's READs from the peer to end: for
        a caller that READs one at a time (ReadLane)."""
        if closed > self._closed.get(remote, 0) and self._regions.get(remote):
            try:
                self.agent.remove_remote_agent(remote)
                self.agent.add_remote_agent(self._remote_md[remote])
            except Exception:
                self.forget(remote)
                raise
            self._regions[remote] = set()
            self.regions_forgotten += 1
            log.info("peer's regions forgotten: it closed some since they were loaded",
                     extra={"peer": remote, "closed": closed})
        self._closed[remote] = max(closed, self._closed.get(remote, 0))
        loaded = self._regions.setdefault(remote, set())
        for md in metadata:
            if md not in loaded:
                try:
                    self.agent.add_remote_agent(md)
                except Exception:
                    self.forget(remote)
                    raise
                loaded.add(md)

    def forget(self, remote: str) -> None:
        """Drops all this agent knows of a peer; the next `remote` call loads it anew."""
        self._remote_md.pop(remote, None)
        self._regions.pop(remote, None)
        self._closed.pop(remote, None)
        try:
            self.agent.remove_remote_agent(remote)
        except Exception:  # noqa: BLE001 - NIXL may have dropped it already
            pass

    async def read(self, remote: str, group: ReadGroup, remote_mem: str,
                   timeout_s: float) -> bool:
        """One READ of (local ranges <- remote ranges): local ranges are (addr, length) in this
        pool, remote ones (addr, length, device). True when it landed; False on a NIXL error or
        at the deadline."""
        handle = None
        self._reading[remote] = self._reading.get(remote, 0) + 1
        self._idle.setdefault(remote, asyncio.Event()).clear()
        try:
            handle = self._read_handle(remote, group, remote_mem)
            return self._read_ended(remote, await self._complete(handle, timeout_s))
        except Exception as e:  # noqa: BLE001 - NIXL raises its own types (remote disconnect...)
            return self._read_ended(remote, e)
        finally:
            self._reading[remote] -= 1
            if not self._reading[remote]:
                self._idle[remote].set()
            if handle is not None:
                self._release(handle, {"peer": remote})

    def read_now(self, remote: str, group: ReadGroup, remote_mem: str, timeout_s: float) -> bool:
        """`read`, blocking the calling thread until the READ ends: for an endpoint used by one
        thread of its own (ReadLane)."""
        handle = None
        try:
            handle = self._read_handle(remote, group, remote_mem)
            deadline = time.monotonic() + timeout_s
            state = self._step(handle, None)  # over shared memory, the copy is made here
            while state is TransferState.POSTED:
                time.sleep(0.0002)
                state = self._step(handle, deadline)
            return self._read_ended(remote, state)
        except Exception as e:  # noqa: BLE001 - NIXL raises its own types (remote disconnect...)
            return self._read_ended(remote, e)
        finally:
            if handle is not None:
                self._release(handle, {"peer": remote})

    def _read_handle(self, remote: str, group: ReadGroup, remote_mem: str) -> Any:
        local, rem = group
        dev = max(self.pool.kv.get_device(), 0)
        return self.agent.initialize_xfer(
            "READ", self.agent.get_xfer_descs([(a, n, dev) for a, n in local], self.mem_type),
            self.agent.get_xfer_descs(rem, remote_mem), remote, b"")

    def _read_ended(self, remote: str, outcome: TransferState | Exception) -> bool:
        if isinstance(outcome, Exception):
            self.read_failures += 1
            log.warning("NIXL read failed", extra={
                "peer": remote, "error": f"{type(outcome).__name__}: {outcome}"})
            return False
        if outcome is not TransferState.DONE:
            self.read_failures += 1
            log.warning("NIXL read did not complete", extra={"peer": remote,
                                                             "state": outcome.value})
            return False
        self.reads += 1
        return True

    def notify(self, remote: str, message: bytes) -> None:
        try:
            self.agent.send_notif(remote, message)
        except Exception as e:  # noqa: BLE001 - the peer is gone: nothing to tell it
            log.warning("NIXL notification failed", extra={"peer": remote, "error": str(e)})

    async def write(
        self,
        local_pages: Sequence[int],
        res: common_pb2.Reservation,
        notice: common_pb2.TransferNotice | None,
        timeout_s: float,
        first: int = 0,
    ) -> int:
        """WRITEs local pages into the reservation's pages from `first` on, then notifies
        (no notice: a part written ahead of the rest, which the last WRITE's notice covers).
        Returns bytes."""
        n = len(local_pages)
        rid = res.request_id if notice is None else notice.request_id
        if first < 0 or first + n > len(res.pages):
            raise TransferError(f"pages [{first}, {first + n}) to send, reservation holds "
                                f"{len(res.pages)}")
        size = self.pool.page_nbytes
        for i, d in enumerate(res.pages[first:first + n], first):
            if d.length != size:
                raise TransferError(f"reservation page {i} is {d.length} bytes, pages are {size}")
        try:
            return await self._write(local_pages, res, notice, timeout_s, first, size, rid)
        except TransferError:
            raise
        except Exception as e:
            raise TransferError(f"KV transfer failed for request {rid}: "
                                f"{type(e).__name__}: {e}") from e

    async def _write(self, local_pages: Sequence[int], res: common_pb2.Reservation,
                     notice: common_pb2.TransferNotice | None, timeout_s: float, first: int,
                     size: int, rid: str) -> int:
        remote = self._remote(res)
        n = len(local_pages)
        local = self.agent.get_xfer_descs(
            [(self.pool.page_addr(p), size, max(self.pool.kv.get_device(),
                                                0)) for p in local_pages],
            self.mem_type)
        remote_descs = self.agent.get_xfer_descs(
            [(d.addr, d.length, d.device_id) for d in res.pages[first:first + n]],
            res.mem_type or "DRAM")
        handle = self.agent.initialize_xfer("WRITE", local, remote_descs, remote,
                                            b"" if notice is None else notice.SerializeToString())
        try:
            state = await self._complete(handle, timeout_s)
        finally:
            self._release(handle, {"request_id": rid})
        if state is not TransferState.DONE:
            raise TransferError(f"KV transfer {state.value} for request {rid}")
        return n * size

    async def _complete(self, handle: Any, timeout_s: float) -> TransferState:
        """Posts a transfer (a NIXL handle) and polls it to its end: DONE, FAILED, or
        TIMED_OUT at the deadline."""
        deadline = time.monotonic() + timeout_s
        state = self._step(handle, None)
        while state is TransferState.POSTED:
            await asyncio.sleep(0.0005)
            state = self._step(handle, deadline)
        return state

    def _step(self, handle: Any, deadline: float | None) -> TransferState:
        """Posts a transfer (no deadline yet) or polls it once; TIMED_OUT past the deadline."""
        if deadline is None:
            return self._state(self.agent.transfer(handle))
        if time.monotonic() > deadline:
            return TransferState.TIMED_OUT
        return self._state(self.agent.check_xfer_state(handle))

    def _release(self, handle: Any, context: dict[str, str]) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception:  # noqa: BLE001 - a still-running handle may refuse release
            log.warning("transfer handle not released", extra=context)

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


class ReadLane:
    """A NIXL agent of its own, on the same KV pool as an endpoint's, that READs on a thread of
    its own.

    Over shared memory (UCX's CMA transport) a READ copies inside the call that posts it, on
    the calling thread: one agent reads a chain of blocks at one core's copy rate (5.1-5.3
    GB/s here, against a plain read() into the same buffer's 5.6-6.1), and an event loop that
    posts it stands still for each copy. An agent cannot be driven from two threads (sync mode
    NONE), and one agent in STRICT or RW mode with two UCX workers, posting from two threads,
    gained nothing (3.9-5.2 GB/s). Each lane is therefore an agent used only by its own thread
    (made there too, as the worker starts, beside the model load); a READ split across two
    lanes copied at 8.1-8.7 GB/s, and the event loop never waits on a copy.

    A lane knows the peer and its regions as an endpoint does (`remote`, `load_regions_now`:
    loaded in its thread before each READ; a lane READs one at a time, so it forgets regions
    with none of its READs in flight). A stage's release goes from the first lane too
    (`notify`), after that lane's READs. A lane whose agent could not be made fails its READs
    (their blocks are computed) and logs why."""

    def __init__(self, name: str, pool: KVPool) -> None:
        self.name = name
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._endpoint = self._thread.submit(NixlEndpoint, name, pool)
        self.busy = 0  # READs under way on the lane's thread (writing into pages)

    def _run(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def connect(self, agent_name: str, metadata: bytes) -> None:
        """Connects to a peer ahead of the first READ (which would connect otherwise)."""
        await self._run(self._connect, agent_name, metadata)

    def _connect(self, agent_name: str, metadata: bytes) -> None:
        ep = self._endpoint.result()
        ep.agent.make_connection(ep.remote(agent_name, metadata))

    def notify(self, peer: kvstore_pb2.StageResponse, message: bytes) -> None:
        """Sends a notification to the store that staged `peer`'s blocks, from the lane's
        thread once its READs sent before have ended (the endpoint's own agent, which READ
        nothing from the store, may hold no connection to it)."""
        self._thread.submit(self._notify, peer, message)

    def _made(self) -> NixlEndpoint | None:
        """The lane's endpoint, on its thread; None (logged) if it could not be made."""
        try:
            return self._endpoint.result()
        except Exception as e:  # noqa: BLE001 - NIXL raises its own types
            log.warning("read lane has no NIXL agent", extra={"lane": self.name,
                                                              "error": str(e)})
            return None

    def _notify(self, peer: kvstore_pb2.StageResponse, message: bytes) -> None:
        if (ep := self._made()) is None:
            return
        try:
            remote = ep.remote(peer.agent_name, peer.agent_metadata)
        except Exception as e:  # noqa: BLE001 - unusable metadata: the lease frees it
            log.warning("NIXL notification not sent", extra={"lane": self.name, "error": str(e)})
            return
        ep.notify(remote, message)

    async def read(self, peer: kvstore_pb2.StageResponse, group: ReadGroup, timeout_s: float,
                   then: Callable[[], None] | None = None) -> bool:
        """READs `group` from the store that staged `peer`'s blocks, then runs `then` on the
        lane's thread if it landed (the bytes are then still in this core's caches); True when
        it landed."""
        return await self._run(self._read, peer, group, timeout_s, then)

    def _read(self, peer: kvstore_pb2.StageResponse, group: ReadGroup, timeout_s: float,
              then: Callable[[], None] | None) -> bool:
        self.busy += 1
        try:
            if not self._read_now(peer, group, timeout_s):
                return False
            if then is not None:
                then()
            return True
        finally:
            self.busy -= 1

    def _read_now(self, peer: kvstore_pb2.StageResponse, group: ReadGroup,
                  timeout_s: float) -> bool:
        if (ep := self._made()) is None:
            return False
        try:
            remote = ep.remote(peer.agent_name, peer.agent_metadata)
            ep.load_regions_now(remote, peer.region_metadata, peer.regions_closed)
        except Exception as e:  # noqa: BLE001 - NIXL raises its own types
            ep.read_failures += 1
            log.warning("kvstore regions cannot be loaded", extra={"lane": self.name,
                                                                   "error": str(e)})
            return False
        return ep.read_now(remote, group, peer.mem_type or "DRAM", timeout_s)

    @property
    def endpoint(self) -> NixlEndpoint | None:
        """The lane's endpoint once made (its counters; used by the lane's thread only)."""
        done = self._endpoint.done() and self._endpoint.exception() is None
        return self._endpoint.result() if done else None
