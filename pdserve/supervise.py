"""What keeps one machine's services from outliving, or colliding with, the `pdserve up` that
started them: the parent-death signal, and exclusive directory locks.

- `die_with_parent()`: a service started by `pdserve up` asks the kernel (Linux
  `PR_SET_PDEATHSIG`) for a signal when its parent dies, however it dies (SIGKILL, the OOM
  killer): SIGTERM for services that hold durable state and shut down cleanly on it (the
  kvstore syncs RocksDB, the gateway writes its queued ledger rows), SIGKILL for workers (their
  state dies with them anyway, and a drain would wait for requests nobody will read). If the
  parent died before the request was made, the service exits at once.
- `DirLock`: `flock` on a file in a directory, holding the owner's pid and command; a second
  holder fails at once with a message naming the directory and the process holding it. The
  kernel drops the lock when its process dies, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from pathlib import Path

SUPERVISOR_ENV = "PDSERVE_SUPERVISOR_PID"  # set by `pdserve up` for the services it starts
_PR_SET_PDEATHSIG = 1


def supervised_env(death_signal: signal.Signals) -> dict[str, str]:
    """The environment entry that makes a child started now die with this process."""
    return {SUPERVISOR_ENV: f"{os.getpid()}:{int(death_signal)}"}


def die_with_parent() -> bool:
    """Arms the parent-death signal when this process was started by `pdserve up` (the
    environment says which parent and which signal); True when armed."""
    value = os.environ.get(SUPERVISOR_ENV, "")
    pid, _, sig = value.partition(":")
    if not pid.isdigit() or not sig.isdigit() or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != int(pid):  # the parent died before the request: nobody supervises us
        os.kill(os.getpid(), int(sig))
    return True


class DirectoryInUse(RuntimeError):
    """Another process holds the directory; the message names both."""


class DirLock:
    """An exclusive lock on `directory` (the file `directory/name`), held until `release()` or
    the process's end. `flag`, `what` and `value` (default: the directory) word the error."""

    def __init__(self, directory: Path, name: str, flag: str, what: str,
                 value: str | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DirectoryInUse(f"{flag} {value or directory}: {directory} is already in use "
                                 f"by {what} ({holder}); stop it first, or choose another "
                                 f"{flag}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
