"""Layer-wise loading of a prompt's cached blocks, overlapped with the compute of the rest.

A prompt's uncached tokens attend to its cached prefix at every layer, so its compute cannot
start on a block until that block is loaded — but layer l's attention needs only layer l of
the prefix. Pages are page-major (kv[page, layer, token, dim]), so a layer range of a block is
one byte range: the kvstore streams every block of the chain in parts cut at layer-group
boundaries (all blocks' first layers, then the next group, ...; kvstore.proto, part_cuts), the
parts go straight into the request's pages, and the forward waits before each layer only until
that layer's part of every block is in (`LayerLoad.wait`, called through
`AttnBatch.before_layer`). Fetching layers g+1.. runs while layers ..g compute.

Verification: a part cannot be checked on its own; the block's checksum covers its assembled
payload and is checked when its last part arrives, before the last layers are released to the
forward. A block that fails (or never completes) holds the forward at its layer until the fetch
settles; the request then recomputes from that block (PrefillWorker._compute_loop discards the
step's output for it), so an unverified byte never reaches a token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import xxhash
from pdserve.cache.codec import CHECKSUM_MISMATCH, HEADER_SIZE, check_header
from pdserve.cache.errors import CorruptBlock
from pdserve.engine.kv_pool import KVPool, PageId

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

    def __init__(self, pool: KVPool, fingerprint: str, keys: Sequence[bytes],
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
        self._ready_parts = 0
        self.ready_layers = 0
        self.good: int | None = None
        self.started = time.perf_counter()
        self.settled_at: float | None = None
        self.waited_s = 0.0                              # engine time spent in wait()
        self._cond = threading.Condition()

    @property
    def settled(self) -> bool:
        return self.good is not None

    def on_part(self, i: int, part: int, value: bytes) -> None:
        if self.good is not None or i >= self._bad:
            return
        try:
            if self._parts[i] != part:
                raise CorruptBlock(f"part {part} arrived, part {self._parts[i]} expected")
            if part == 0:
                h = check_header(self.keys[i], value, HEADER_SIZE + self.bounds[-1],
                                 self.fingerprint)
                self._checksum[i] = h.checksum
                payload = memoryview(value)[HEADER_SIZE:]
            else:
                payload = memoryview(value)
            lo, hi = self.bounds[part], self.bounds[part + 1]
            if len(payload) != hi - lo:
                raise CorruptBlock(f"part {part} is {len(payload)} bytes, expected {hi - lo}")
            self.pool.write_range(self.pages[i], lo, payload)
            self._hash[i].update(payload)
            self._parts[i] += 1
            if part == len(self.layer_ends) - 1 and self._hash[i].intdigest() != self._checksum[i]:
                raise CorruptBlock(CHECKSUM_MISMATCH)
        except CorruptBlock as e:
            log.warning("fetched block rejected", extra={"index": i, "why": str(e)})
            self._bad = min(self._bad, i)
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
        t = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self.ready_layers > layer or self.good is not None)
        self.waited_s += time.perf_counter() - t
