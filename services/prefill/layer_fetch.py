"""Layer-wise loading of a prompt's cached blocks, overlapped with the compute of the rest.

A prompt's uncached tokens attend to its cached prefix at every layer, so its compute cannot
start on a block until that block is loaded — but layer l's attention needs only layer l of
the prefix. Pages are page-major (kv[page, layer, token, dim]), so a layer range of a block is
one byte range: the kvstore streams every block of the chain in parts cut at layer-group
boundaries (all blocks' first layers, then the next group, ...; kvstore.proto, part_cuts), the
parts go straight into the request's pages, and the forward waits before each layer only until
that layer's part of every block is in (`LayerLoad.wait`, called through
`AttnBatch.before_layer`). Fetching layers g+1.. runs while layers ..g compute.

Transport: by default one-sided NIXL READs from the kvstore's staging buffer (kvstore
`Stage`, services/staging.py), one READ per layer group straight into the pages; the gRPC part
stream where a store cannot stage (no buffer, full, unreachable over NIXL).

Verification: a part cannot be checked on its own; the block's checksum covers its assembled
payload and is checked when its last part arrives, before the last layers are released to the
forward (for a staged block this is the only check of its payload; one that does not match is
reported to the store, which verifies it: services/kvstore/staging.py). A block that fails (or
never completes) holds the forward at its layer until the fetch settles; the request then
recomputes from that block (the engine discards the step's output for it: engine/hooks.py,
`settle`), so an unverified byte never reaches a token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from functools import partial

import xxhash

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.codec import CHECKSUM_MISMATCH, HEADER_SIZE, check_header
from pdserve.cache.errors import CorruptBlock
from pdserve.engine.kv_pool import KVPool, PageId
from pdserve.services.kvstore_client import KVStoreClient
from pdserve.services.transfer import NixlEndpoint, ReadGroup
from pdserve.v1 import kvstore_pb2

log = logging.getLogger(__name__)


def layer_groups(num_layers: int, groups: int) -> list[int]:
    """Layer count complete after each part: `groups` near-equal groups (at most one per
    layer)."""
    g = max(1, min(groups, num_layers))
    return [-(-(p + 1) * num_layers // g) for p in range(g)]


class LayerLoad:
    """One request's cached blocks arriving in layer-group parts into its pages.

    `on_part` runs on the event loop as parts arrive; `wait(layer)` on the engine thread;
    `finish()` once the fetch ended, however it ended. `good` is None until settled, then the
    number of leading blocks fetched whole and verified."""

    def __init__(self, pool: KVPool, fingerprint: str, keys: Sequence[BlockHash],
                 pages: Sequence[PageId], groups: int) -> None:
        layout = pool.layout
        self.pool = pool
        self.fingerprint = fingerprint
        self.keys = list(keys)
        self.pages = list(pages[:len(keys)])
        self.n = len(self.keys)
        self.layer_ends = layer_groups(layout.num_layers, groups)
        per_layer = layout.block_tokens * layout.kv_dim * layout.torch_dtype.itemsize
        self.bounds = [0, *(e * per_layer for e in self.layer_ends)]  # payload byte offsets
        self.cuts = self.bounds[1:-1]
        self._parts = [0] * self.n                      # parts received, per block
        self._complete = [0] * len(self.layer_ends)      # blocks holding part p
        self._hash = [xxhash.xxh3_64() for _ in range(self.n)]
        self._checksum = [0] * self.n
        self._bad = self.n                               # first block that failed
        self.mismatched: set[int] = set()                # payloads not matching their header
        self._ready_parts = 0
        self.ready_layers = 0
        self.good: int | None = None
        self.started = time.perf_counter()
        self.settled_at: float | None = None
        self._cond = threading.Condition()

    @property
    def settled(self) -> bool:
        return self.good is not None

    @property
    def good_tokens(self) -> int:
        """Leading prompt tokens fetched whole and verified (0 until settled)."""
        return (self.good or 0) * self.pool.layout.block_tokens

    def digests(self) -> list[int]:
        """The payload checksums of the blocks fetched whole and verified, from their headers:
        each is the digest of the page holding that block (services/transfer.py,
        page_digest)."""
        return self._checksum[:self.good or 0]

    def on_part(self, i: int, part: int, value: bytes) -> None:
        """A part that came as bytes (the gRPC stream): checked, written into the page."""
        if self.good is not None or i >= self._bad:
            return
        try:
            if self._parts[i] != part:
                raise CorruptBlock(f"part {part} arrived, part {self._parts[i]} expected")
            if part == 0:
                self._checksum[i] = self._header(i, value)
                payload = memoryview(value)[HEADER_SIZE:]
            else:
                payload = memoryview(value)
            lo, hi = self.bounds[part], self.bounds[part + 1]
            if len(payload) != hi - lo:
                raise CorruptBlock(f"part {part} is {len(payload)} bytes, expected {hi - lo}")
            self.pool.write_range(self.pages[i], lo, payload)
        except CorruptBlock as e:
            self.reject(i, e)
            return
        self._accept(i, part, payload)

    def expect(self, i: int, header: bytes) -> bool:
        """The header of a block whose parts will land in its page directly (NIXL READ)."""
        try:
            self._checksum[i] = self._header(i, header)
            return True
        except CorruptBlock as e:
            self.reject(i, e)
            return False

    def hash_landed(self, blocks: Sequence[int], part: int) -> None:
        """Hashes part `part` of these blocks where a NIXL READ put it (on a read lane's
        thread or a helper thread, while the next READ runs: a block by one thread at a time,
        its parts in order); `count_landed` then checks and counts them."""
        lo, hi = self.bounds[part], self.bounds[part + 1]
        for i in blocks:
            if self.good is None and i < self._bad and self._parts[i] == part:
                self._hash[i].update(self.pool.page_bytes(self.pages[i])[lo:hi].cpu().numpy().data)

    def count_landed(self, blocks: Sequence[int], part: int) -> None:
        """Part `part` of these blocks is in their pages and hashed (`hash_landed`)."""
        for i in blocks:
            if self.good is not None or i >= self._bad:
                continue
            if self._parts[i] != part:
                self.reject(i, CorruptBlock(f"part {part} landed, part {self._parts[i]} expected"))
                continue
            self._count(i, part)

    def _header(self, i: int, header: bytes | memoryview) -> int:
        return check_header(self.keys[i], header, HEADER_SIZE + self.bounds[-1],
                            self.fingerprint).checksum

    def reject(self, i: int, e: CorruptBlock) -> None:
        log.warning("fetched block rejected", extra={"index": i, "why": str(e)})
        self._bad = min(self._bad, i)

    def _accept(self, i: int, part: int, payload: memoryview) -> None:
        self._hash[i].update(payload)
        self._count(i, part)

    def _count(self, i: int, part: int) -> None:
        """Part `part` of block i is in its page and in its hash."""
        self._parts[i] += 1
        if part == len(self.layer_ends) - 1 and self._hash[i].intdigest() != self._checksum[i]:
            self.mismatched.add(i)
            self.reject(i, CorruptBlock(CHECKSUM_MISMATCH))
            return
        self._complete[part] += 1
        advanced = False
        while (self._ready_parts < len(self.layer_ends)
               and self._complete[self._ready_parts] == self.n):
            self._ready_parts += 1
            advanced = True
        if advanced:
            with self._cond:
                self.ready_layers = self.layer_ends[self._ready_parts - 1]
                if self._ready_parts == len(self.layer_ends):
                    self._settle(self.n)
                self._cond.notify_all()

    def finish(self) -> None:
        """The fetch ended (done, failed or cancelled): settles what is whole and verified."""
        with self._cond:
            if self.good is None:
                good = 0
                last = len(self.layer_ends)
                while good < min(self.n, self._bad) and self._parts[good] == last:
                    good += 1
                self._settle(good)
            self._cond.notify_all()

    def _settle(self, good: int) -> None:
        self.good = good
        self.settled_at = time.perf_counter()

    def wait(self, layer: int) -> None:
        """Engine thread, before layer `layer` runs: returns once that layer of every block is
        in place, or once the fetch settled (whole or not)."""
        if self.ready_layers > layer or self.good is not None:
            return
        with self._cond:
            self._cond.wait_for(lambda: self.ready_layers > layer or self.good is not None)


async def fetch(load: LayerLoad, client: KVStoreClient, endpoint: NixlEndpoint | None,
                timeout_s: float) -> None:
    """Fills `load` from the kvstore shards: by NIXL READ from each shard's staging buffer when
    `endpoint` is given and the shard stages the blocks, through the gRPC part stream
    otherwise (and for blocks a shard could not stage). Never raises for a store problem: what
    did not arrive is recomputed."""

    async def from_shard(shard: int, idx: list[int]) -> None:
        if endpoint is not None:
            idx = await _read_staged(load, client, shard, idx, endpoint, timeout_s)
        if idx:
            await client.get_parts_from(shard, [load.keys[i] for i in idx], load.cuts,
                                        lambda j, p, v: load.on_part(idx[j], p, v))

    await asyncio.gather(*(from_shard(s, idx) for s, idx in client.group(load.keys).items()))


# Blocks per Stage call. Whole blocks: small chunks, each released once READ and checked, so a
# long chain needs little staging space. In layer groups: the forward waits for group 0 of
# every block, which comes soonest from one Stage (measured on a 31-block prefix: 24-30 ms
# from one call, 31-38 ms from chunks of 8 staged one after the other).
STAGE_CHUNK_BLOCKS = 8
STAGE_CHUNK_BLOCKS_LAYERED = 64
# Stage calls in flight ahead of the chunk being READ where the store stages in place (its
# blocks READ where they lie, no staging space taken): a Stage answers in 2-4 ms on two busy
# cores, about a chunk's READ, so with one ahead every READ waited for its Stage (64 blocks of
# 2.95 MB: 67-73 ms with one ahead, 47-54 ms with three or four; 50-56 ms with eight). A store
# that copies into its staging buffer gets one call ahead, as its space is shared.
STAGE_AHEAD_IN_PLACE = 3


class _Staged:
    """One chunk of blocks staged by a shard: what to READ of it, and its release."""

    def __init__(self, load: LayerLoad, resp: kvstore_pb2.StageResponse, blocks: list[int],
                 endpoint: NixlEndpoint, remote: str) -> None:
        self.load, self.resp, self.blocks, self.endpoint = load, resp, blocks, endpoint
        self.remote = remote
        self.released = False
        for i, b in zip(blocks, resp.blocks):
            if b.length == load.bounds[-1]:
                load.expect(i, b.header)
            else:
                load.reject(i, CorruptBlock(f"staged payload of {b.length} bytes"))

    @classmethod
    async def open(cls, load: LayerLoad, resp: kvstore_pb2.StageResponse, blocks: list[int],
                   endpoint: NixlEndpoint) -> _Staged:
        """Knows the store's agent (and the regions its blocks lie in, staged in place, unless
        the endpoint's lanes READ them: each lane loads them); raises when NIXL cannot load
        them."""
        remote = endpoint.remote(resp.agent_name, resp.agent_metadata)
        if not endpoint.lanes:
            await endpoint.load_regions(remote, resp.region_metadata, resp.regions_closed)
        return cls(load, resp, blocks, endpoint, remote)

    def group(self, g: int) -> ReadGroup:
        lo, hi = self.load.bounds[g], self.load.bounds[g + 1]
        return ([(self.endpoint.pool.page_addr(self.load.pages[i]) + lo, hi - lo)
                 for i in self.blocks], [(b.addr + lo, hi - lo, 0) for b in self.resp.blocks])

    async def take(self, g: int, timeout_s: float, spread: bool) -> bool:
        """READs layer group g of this chunk into its pages and hashes it there
        (LayerLoad.hash_landed); True when it landed (LayerLoad.count_landed then takes it in).

        With read lanes (services/transfer.py, ReadLane), on the first lane, or (`spread`)
        the chunk's blocks shared out among them all, each lane READing its share and hashing
        it on its own thread, side by side. Without, the endpoint READs on the event loop and
        a helper thread hashes."""
        blocks, (local, remote) = self.blocks, self.group(g)
        lanes = self.endpoint.lanes if spread else self.endpoint.lanes[:1]
        if lanes:
            cut = [len(blocks) * k // len(lanes) for k in range(len(lanes) + 1)]
            return all(await asyncio.gather(*(
                lane.read(self.resp, (local[a:b], remote[a:b]), timeout_s,
                          then=partial(self.load.hash_landed, blocks[a:b], g))
                for lane, a, b in zip(lanes, cut, cut[1:]) if b > a)))
        try:  # loaded again if the store's regions were forgotten since (load_regions)
            await self.endpoint.load_regions(self.remote, self.resp.region_metadata,
                                             self.resp.regions_closed)
        except Exception as e:  # noqa: BLE001 - NIXL raises its own types
            log.warning("kvstore regions cannot be loaded", extra={"error": str(e)})
            return False
        if not await self.endpoint.read(self.remote, (local, remote),
                                        self.resp.mem_type or "DRAM", timeout_s):
            return False
        await asyncio.get_running_loop().run_in_executor(None, self.load.hash_landed, blocks, g)
        return True

    def release(self) -> None:
        """Frees the staged space; blocks that did not match their checksum are named, and
        the store verifies them."""
        if not self.released:
            self.released = True
            _release(self.endpoint, self.resp, [
                j for j, i in enumerate(self.blocks) if i in self.load.mismatched])


def _release(endpoint: NixlEndpoint, resp: kvstore_pb2.StageResponse,
             mismatched: list[int]) -> None:
    """Tells the store a staged chunk is READ: from the first read lane, after its READs, if
    there are lanes (the endpoint's own agent, having READ nothing from the store, may hold no
    connection to it); else from the endpoint. Raises when the store's agent is unusable."""
    message = kvstore_pb2.StageRelease(stage_id=resp.stage_id,
                                       mismatched=mismatched).SerializeToString()
    if endpoint.lanes:
        endpoint.lanes[0].notify(resp, message)
    else:
        endpoint.notify(endpoint.remote(resp.agent_name, resp.agent_metadata), message)


async def _read_staged(load: LayerLoad, client: KVStoreClient, shard: int, idx: list[int],
                       endpoint: NixlEndpoint, timeout_s: float) -> list[int]:
    """READs what the shard stages into the blocks' pages; returns the blocks not staged (for
    the gRPC stream). A READ that fails ends the reading: blocks left incomplete are
    recomputed.

    The blocks are staged in chunks, a `Stage` call each (sent ahead of the READs: below),
    and READ one group of a chunk at a time (sent or posted all at once, the copies progressed
    together, and the first, which the forward waits for, was done only about when the last
    was). The READs go in layer-group order: group 0 of each chunk as soon as it is staged,
    then group 1 of every chunk, and so on (what the forward waits for first comes first).
    Each READ's pages are hashed where they landed (`_Staged.take`) and counted in
    (LayerLoad.count_landed) in READ order.

    Whole blocks, loaded before the forward starts: each chunk's READ is shared out among the
    read lanes, and the next chunk's is sent while this one's is READ and hashed (the lanes
    take it up as soon as they are free; without lanes, the READ on the event loop goes side
    by side with the hash on a helper thread). Layer groups: group 0, which the forward waits
    for, is shared out among the lanes too; the later groups, READ while the forward
    computes on the same cores, go to one lane, each READ and hashed and counted in before
    the next READ (side by side, they slowed the forward: warm TTFT 298 against 286 ms with
    the hash beside the next READ; 1.66x against 1.57x its floor, the medians of four
    alternating rounds, with every group on two lanes).

    A chunk is released once its last group is counted. Whole blocks staged in place (no
    staging space taken) have STAGE_AHEAD_IN_PLACE Stage calls ahead of the READ. From a store
    that copies them into its shared staging buffer, one call goes ahead, and only once the
    chunk before is released: a reader holds at most two chunks of that space (one READ, the
    next staging), so a chain longer than the buffer is READ whole, in turns.

    A READ sent is always waited for, even when the fetch is cancelled: a lane may still be
    writing into the pages, which must not be given back before it ends."""
    size = STAGE_CHUNK_BLOCKS if len(load.layer_ends) == 1 else STAGE_CHUNK_BLOCKS_LAYERED
    chunks = [idx[i:i + size] for i in range(0, len(idx), size)]

    def stage(k: int) -> asyncio.Future[kvstore_pb2.StageResponse | None]:
        return asyncio.ensure_future(client.stage(shard, [load.keys[i] for i in chunks[k]]))

    calls = [stage(0)]
    staged: list[_Staged] = []
    last = len(load.layer_ends) - 1
    taking: deque[tuple[asyncio.Task[bool], _Staged, int]] = deque()  # sent, in READ order

    async def settle(ahead: int) -> bool:
        """Counts in the READs sent until at most `ahead` are left; False at one that failed."""
        while len(taking) > ahead:
            task, s, g = taking[0]
            if not await asyncio.shield(task):
                return False
            taking.popleft()
            load.count_landed(s.blocks, g)
            if g == last:
                s.release()
        return True

    async def read(s: _Staged, g: int) -> bool:
        taking.append((asyncio.create_task(s.take(g, timeout_s, spread=g == 0)), s, g))
        return await settle(0 if last else 1)

    try:
        for k, chunk in enumerate(chunks):  # the leading chunks, while staged whole
            resp = await calls[k]
            in_place = resp is not None and bool(resp.region_metadata)
            if not in_place and not await settle(0):  # the chunk before released first: the
                return []                              # buffer's space is shared
            while len(calls) < min(k + 1 + (STAGE_AHEAD_IN_PLACE if in_place else 1),
                                   len(chunks)):  # staged while this one is READ
                calls.append(stage(len(calls)))
            if resp is None or not resp.blocks:
                break
            try:
                staged.append(await _Staged.open(load, resp, chunk[:len(resp.blocks)],
                                                 endpoint))
            except Exception as e:  # noqa: BLE001 - unusable metadata: the stream instead
                log.warning("kvstore NIXL agent unusable", extra={"error": str(e)})
                break
            if not await read(staged[-1], 0):  # while the next chunks stage
                return []
            if len(resp.blocks) < len(chunk):
                break
        for g in range(1, last + 1):
            for s in staged:
                if not await read(s, g):
                    return []
        if not await settle(0):
            return []
        return idx[sum(len(s.blocks) for s in staged):]
    finally:
        if taking:  # READs still running (a failed one, or the fetch cancelled)
            await asyncio.wait([t for t, _, _ in taking])
        for s in staged:
            s.release()
        for call in calls:  # staged but not READ (after a chunk fell short): free it now
            if not call.done():
                call.cancel()  # staged meanwhile: freed when its lease ends
            elif (not call.cancelled() and call.exception() is None
                  and (r := call.result()) is not None and r.blocks
                  and not any(s.resp is r for s in staged)):
                try:
                    _release(endpoint, r, [])
                except Exception:  # noqa: BLE001 - unusable metadata: the lease frees it
                    log.warning("staged blocks left to their lease", extra={"shard": shard})

