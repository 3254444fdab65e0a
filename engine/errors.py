"""Engine errors; services map them to gRPC status codes."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of engine errors."""


class OutOfPages(EngineError):
    """The KV pool has too few free pages for the request."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"needs {needed} KV pages, {free} free")
        self.needed = needed
        self.free = free


class EPError(EngineError):
    """An expert-parallel group that cannot be formed as set up; the message names the
    setting."""
