"""Scheduler errors: why a request could not be placed, why a worker could not join. The
gateway maps them to gRPC statuses (services/errors.py)."""

from __future__ import annotations


class SchedulerError(Exception):
    """Base class of scheduler errors."""


class NoWorker(SchedulerError):
    """No prefill or decode worker is in rotation (besides those excluded)."""


class NoRoom(SchedulerError):
    """No decode worker has the free KV pages a request needs."""

    def __init__(self, pages: int) -> None:
        super().__init__(f"no decode worker has {pages} free KV pages")
        self.pages = pages


class RegistryError(SchedulerError):
    """A worker cannot join (its model or layout differs from the cluster's)."""
