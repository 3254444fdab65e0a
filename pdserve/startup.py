"""Where a service's start-up time goes: named phases, each the time since the previous mark
(the first since the process started), written into the service's ready file and printed by
`pdserve up`.

Phases a worker marks: interpreter start, imports, model load (reading the weights file),
weight packing (the backend's layouts), kernel build (compiling the C kernels; cached after the
first start), KV pool allocation, NIXL registration, serving (gRPC server, metrics).
"""

from __future__ import annotations

import os
import time

PHASES: dict[str, float] = {}
_last: float | None = None


def _process_start() -> float:
    """This process's start on the monotonic clock (Linux: /proc/self/stat), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started_ago = uptime - ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(0.0, started_ago)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def phase(name: str) -> None:
    """Ends the phase `name` now: the time since the previous mark is added to it."""
    global _last
    now = time.monotonic()
    if _last is None:
        _last = _process_start()
    PHASES[name] = round(PHASES.get(name, 0.0) + now - _last, 3)
    _last = now


def summary(phases: dict[str, float]) -> str:
    """'9.8 s: model load 3.9, weight packing 2.0, …' (the total, then the phases; those under
    0.05 s left out)."""
    total = sum(phases.values())
    parts = [f"{k} {v:.1f}" for k, v in phases.items() if v >= 0.05]
    return f"{total:.1f} s: " + ", ".join(parts)
