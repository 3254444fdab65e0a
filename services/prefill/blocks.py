"""A prefill worker's KV blocks: cached blocks fetched whole into its pages (verified), and the
new full blocks of a prompt encoded and written to the kvstore in the background.

(Fetching by layer group while computing is layer_fetch.py; this is the whole-block path, used
with `--kv-fetch-layer-groups 1` and by pipeline stages, which load before they compute.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence

from pdserve.cache.block_hash import BlockHash
from pdserve.cache.codec import encode_block, verify_block
from pdserve.cache.errors import CorruptBlock
from pdserve.engine.kv_pool import KVPool, PageId
from pdserve.services.kvstore_client import KVStoreClient, StoreBlock
from pdserve.services.prefill.guard import PageGuard

log = logging.getLogger(__name__)

PUT_DRAIN_S = 10.0  # at shutdown, pending block writes get this long
# Keys of this worker's finished writes it remembers (32 bytes each, about 3 MiB at most): a
# request whose gateway looked while one of them was in flight may come after it finished.
RECENT_WRITES = 1 << 16


def load_blocks(pool: KVPool, fingerprint: str, pages: Sequence[PageId],
                keys: Sequence[BlockHash], blocks: Sequence[bytes]) -> int:
    """Copies verified blocks into the leading pages; returns how many were usable (the first
    that fails verification and those after it are not)."""
    for i, value in enumerate(blocks):
        try:
            payload = verify_block(keys[i], value, fingerprint)
        except CorruptBlock as e:
            log.warning("fetched block rejected", extra={"index": i, "why": str(e)})
            return i
        pool.write_page(pages[i], payload)
    return len(blocks)


def encode_blocks(pool: KVPool, fingerprint: str, pages: Sequence[PageId],
                  keys: Sequence[BlockHash], start: int,
                  digests: Sequence[int] | None = None) -> list[StoreBlock]:
    """The store's form of the full blocks from `start` on (key, encoded block, depth): one
    copy of each page. `digests[i]`, where given, is page i's xxh3-64 (transfer.page_digest,
    taken for the transfer's checksum): the block's checksum, not computed again."""
    bt = pool.layout.block_tokens
    return [StoreBlock(keys[i], encode_block(
                keys[i], fingerprint, bt, pool.page_bytes(pages[i]).cpu().numpy().data,
                None if digests is None else digests[i]), i)
            for i in range(start, len(keys))]


class BlockIO:
    def __init__(self, pool: KVPool, fingerprint: str, kvstore: KVStoreClient,
                 guard: PageGuard) -> None:
        self.pool = pool
        self.fingerprint = fingerprint
        self.kvstore = kvstore
        self.guard = guard
        self._puts: set[asyncio.Task[int]] = set()
        self._writing: dict[BlockHash, asyncio.Task[int]] = {}  # keys of writes in flight
        self._recent: OrderedDict[BlockHash, None] = OrderedDict()  # keys of finished writes

    async def load(self, keys: Sequence[BlockHash], pages: Sequence[PageId]) -> int:
        """Fetches the keys' blocks and loads the verified leading ones into the pages; returns
        how many were usable (a store that is down or slow: fewer, or none)."""
        if not keys:
            return 0
        blocks = await self.kvstore.get(keys)
        return await self.guard.run(load_blocks, self.pool, self.fingerprint, pages, keys,
                                    blocks, pages=pages)

    async def encode(self, keys: Sequence[BlockHash], pages: Sequence[PageId],
                     start: int, digests: Sequence[int] | None = None) -> list[StoreBlock]:
        return await self.guard.run(encode_blocks, self.pool, self.fingerprint, pages, keys,
                                    start, digests, pages=pages)

    def put_later(self, blocks: list[StoreBlock]) -> None:
        """Writes the blocks to the kvstore in the background (best effort)."""
        if not blocks or not self.kvstore.enabled:
            return
        task = asyncio.create_task(self.kvstore.put(blocks))
        self._puts.add(task)
        for b in blocks:
            self._writing[b.key] = task

        def done(t: asyncio.Task[int]) -> None:
            self._puts.discard(t)
            for b in blocks:
                if self._writing.get(b.key) is t:
                    del self._writing[b.key]
                self._recent[b.key] = None
                self._recent.move_to_end(b.key)
            while len(self._recent) > RECENT_WRITES:
                self._recent.popitem(last=False)

        task.add_done_callback(done)

    async def written(self, keys: Sequence[BlockHash], timeout_s: float) -> bool:
        """Whether this worker wrote any of the keys lately or is writing them now, waiting
        (up to timeout_s) for the writes still in flight: a request that came right after the
        one that wrote its blocks (the gateway looked while the write was in flight, so found
        them missing) finds them in the store once they land. A write that finished between
        the gateway's look and this one counts too."""
        pending = {t for k in keys if (t := self._writing.get(k)) is not None}
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
            return True
        return any(k in self._recent for k in keys)

    async def drain(self) -> None:
        if self._puts:
            await asyncio.wait(list(self._puts), timeout=PUT_DRAIN_S)
