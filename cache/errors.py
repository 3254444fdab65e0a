"""KV cache errors."""

from __future__ import annotations


class CacheError(Exception):
    """Base class of cache errors."""


class CorruptBlock(CacheError):
    """A stored block failed verification (bad header, wrong key, layout or checksum)."""
