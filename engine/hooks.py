"""What a worker plugs into the engine loop (engine/engine.py). Every hook has a do-nothing
default, so the single-process engine runs with `EngineHooks()` as it is.

- `ready` / `before_layer` / `settle`: a prefill worker's sequence may start computing while the
  KV of its cached prefix is still arriving (services/prefill/layer_fetch.py). `ready` tells the
  scheduler whether that KV has settled; `before_layer` returns what the forward calls before
  each layer (it waits for that layer's KV); `settle`, after the step, says how many leading
  tokens of it arrived verified, and the engine recomputes from there if that is fewer than it
  assumed (the step's output for that sequence is discarded).
- `agree`: every step's plan goes through it before it runs. An expert-parallel group uses it
  so that all ranks step together (each rank's plan is exchanged; a rank with nothing to do
  still joins with an empty step); returning None skips the step.
- `turn`: a context around each step's forward: co-located workers take turns on the CPU
  cores (services/cpu_turns.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from pdserve.engine.scheduler import BatchKind, ScheduledBatch
from pdserve.engine.sequence import Sequence


class EngineHooks:
    def ready(self, seq: Sequence) -> bool:
        return True

    def before_layer(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        return None

    def settle(self, seq: Sequence) -> int | None:
        """After a step that computed `seq`: leading prompt tokens whose arriving KV is in
        place and verified, or None when nothing was arriving for it."""
        return None

    def agree(self, batch: ScheduledBatch | None) -> ScheduledBatch | None:
        return batch

    def turn(self, kind: BatchKind) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
