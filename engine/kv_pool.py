"""Page-major paged KV pool and its page allocator (DESIGN §3).

One page = `block_tokens` tokens of every layer = one contiguous region = one NIXL descriptor
= one store block, byte for byte.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable
from typing import NewType

import numpy as np
import torch

from pdserve.cache.memory import AnonymousBuffer
from pdserve.engine.errors import OutOfPages
from pdserve.engine.layout import KVLayout

PageId = NewType("PageId", int)


class KVPool:
    """kv[num_pages, num_layers, block_tokens, kv_dim] plus a free list of pages. Reserving and
    releasing are thread-safe (a decode worker reserves on its event loop, its engine thread
    releases what finished)."""

    def __init__(self, layout: KVLayout, num_pages: int,
                 device: str | torch.device = "cpu") -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.layout = layout
        self.num_pages = num_pages
        shape = (num_pages, layout.num_layers, layout.block_tokens, layout.kv_dim)
        self._buffer: AnonymousBuffer | None = None
        if torch.device(device).type == "cpu":
            itemsize = torch.empty((), dtype=layout.torch_dtype).element_size()
            self._buffer = AnonymousBuffer(math.prod(shape) * itemsize)
            self.kv = torch.frombuffer(self._buffer.mmap, dtype=layout.torch_dtype,
                                       count=math.prod(shape)).view(shape)
        else:
            self.kv = torch.zeros(shape, dtype=layout.torch_dtype, device=device)
        self._free: deque[PageId] = deque(PageId(i) for i in range(num_pages))
        self._used: set[PageId] = set()
        self._lock = threading.Lock()

    def prefault(self, stop: threading.Event | None = None) -> int:
        """Backs the whole pool with memory now, contents unchanged (cache/memory.py,
        AnonymousBuffer); 0 for a GPU pool."""
        return 0 if self._buffer is None else self._buffer.prefault(stop)

    # -- allocation ---------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def reserve(self, n: int) -> list[PageId]:
        with self._lock:
            if n > len(self._free):
                raise OutOfPages(n, len(self._free))
            pages = [self._free.popleft() for _ in range(n)]
            self._used.update(pages)
        return pages

    def release(self, pages: Iterable[PageId]) -> None:
        pages = list(pages)
        with self._lock:
            for p in pages:
                if p not in self._used:
                    raise ValueError(f"page {p} released but not reserved")
                self._used.remove(p)
            # Most recently freed first: those pages are backed by memory and warm in the
            # cache; a page never used is faulted in by its first write, inside a transfer
            # or a fetch (a WRITE into 94 MB of fresh pages took 6x as long). A late WRITE
            # into a reused page is what decode's quarantine of abandoned reservations
            # prevents, not the order of reuse.
            self._free.extendleft(reversed(pages))

    def check_integrity(self) -> None:
        with self._lock:
            free = set(self._free)
            assert len(free) == len(self._free), "page on the free list twice"
            assert not (free & self._used), "page both free and used"
            assert len(free) + len(self._used) == self.num_pages, "pages lost"

    # -- bytes ----------------------------------------------------------------------
    def page_bytes(self, page: int) -> torch.Tensor:
        """A uint8 view of one page (contiguous)."""
        return self.kv[page].view(-1).view(torch.uint8)

    def page_addr(self, page: int) -> int:
        return self.kv[page].data_ptr()

    @property
    def page_nbytes(self) -> int:
        return self.layout.bytes_per_block

    def read_pages(self, pages: Iterable[int]) -> bytes:
        return b"".join(self.page_bytes(p).cpu().numpy().tobytes() for p in pages)

    def write_page(self, page: int, data: bytes | memoryview) -> None:
        if len(data) != self.page_nbytes:
            raise ValueError(f"page payload is {len(data)} bytes, expected {self.page_nbytes}")
        self.write_range(page, 0, data)

    def write_range(self, page: int, start: int, data: bytes | memoryview) -> None:
        """Writes bytes [start, start + len(data)) of a page (page-major: a layer range of a
        page is one contiguous byte range)."""
        if start < 0 or start + len(data) > self.page_nbytes:
            raise ValueError(f"bytes [{start}, {start + len(data)}) outside a page of "
                             f"{self.page_nbytes}")
        dst = self.page_bytes(page)[start:start + len(data)]
        if dst.device.type == "cpu":  # one memcpy, no copy of the source, no OpenMP team
            dst.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        else:
            dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
