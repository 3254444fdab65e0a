"""KV cache errors."""

from __future__ import annotations


class CacheError(Exception):
    """Base class of cache errors."""


class CorruptBlock(CacheError):
    """A stored block failed verification (bad header, wrong key, layout or checksum)."""


class StoreFull(CacheError):
    """The disk refused a write; puts are refused for a while, reads go on."""


class QueryError(CacheError, ValueError):
    """A ledger query refused or failed; the message says why."""
