"""What an EP group sends, behind one small interface, over torch.distributed: gloo on CPU
(whose `all_to_all_single` takes uneven and empty splits and `async_op`); nccl on CUDA tensors
is the same calls, not yet run (the step agreement's small tensors would have to be CUDA's).

Each exchange has a start and a wait (`Pending`), so that a step can do other work, or run the
other micro-batch, while rows travel. Two-batch overlap gives each micro-batch its own
communicator (its own process group), so that two exchanges can be in flight at once; they
count into one `CommStats`. A tensor gloo refuses (float8) travels as its bytes.

`DelayedLoopback` is a one-rank group whose every transfer takes a set time: the timing model
the overlap tests and benchmark measure against (the ideal saving is known)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """What a rank's communicators did (shared by the micro-batches' communicators)."""

    sent_rows: int = 0       # (token, expert) rows this rank dispatched
    received_rows: int = 0   # rows this rank's experts computed
    dispatch_bytes: int = 0  # the dispatched rows' bytes: values and scales (not slot ids)
    exchanges: int = 0       # MoE exchanges started (counts, dispatch, combine)
    agreements: int = 0      # step agreements (one small all-gather each)
    wait_s: float = 0.0      # time spent waiting for dispatches and combines


@dataclass
class Pending:
    """Exchanges under way; `wait()` returns their results, in the order they were started."""

    works: list[dist.Work]
    results: list[torch.Tensor]
    stats: CommStats | None = None
    ready_at: float = 0.0  # DelayedLoopback: when the transfer lands (perf_counter)

    def wait(self) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()
        if self.ready_at > t0:
            time.sleep(self.ready_at - t0)
        if self.stats is not None:
            self.stats.wait_s += time.perf_counter() - t0
        return self.results


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


class EPComm:
    """The collectives of one EP group (`group`: a torch.distributed process group, None for
    the default one)."""

    def __init__(self, group: dist.ProcessGroup | None = None,
                 stats: CommStats | None = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.stats = stats if stats is not None else CommStats()

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        """Each rank's row counts [N] for every rank -> the counts every rank sends it [N]."""
        recv = torch.empty_like(send)
        self.stats.exchanges += 1
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def _a2a(self, tensors: Sequence[torch.Tensor], send: list[int], recv: list[int]) -> Pending:
        self.stats.exchanges += 1
        works, results = [], []
        for t in tensors:
            data = _as_bytes(t.contiguous())
            out = torch.empty((sum(recv), *data.shape[1:]), dtype=data.dtype, device=data.device)
            w = dist.all_to_all_single(out, data, recv, send, group=self.group, async_op=True)
            assert w is not None
            works.append(w)
            results.append(out.view(t.dtype) if t.dtype != data.dtype else out)
        return Pending(works, results, self.stats)

    def dispatch(self, rows: Sequence[torch.Tensor], slots: torch.Tensor, send: list[int],
                 recv: list[int]) -> Pending:
        """Starts sending `rows` (the rows [M, D], and their scales [M, D/128] when they travel
        in FP8; grouped by destination rank, send[r] of them to rank r) and their slot ids
        [M]; wait() -> the rows received (and scales), then their slots."""
        self.stats.sent_rows += slots.shape[0]
        self.stats.dispatch_bytes += sum(t.numel() * t.element_size() for t in rows)
        self.stats.received_rows += sum(recv)
        return self._a2a((*rows, slots), send, recv)

    def combine(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> Pending:
        """Starts sending the expert outputs back: the reverse of a dispatch with (send, recv)
        of that dispatch; wait() -> [rows in the order this rank dispatched them]."""
        return self._a2a((rows,), recv, send)

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's `values` (the same length everywhere): the step agreement."""
        self.stats.agreements += 1
        mine = torch.tensor(list(values), dtype=torch.long)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(out, mine, group=self.group)
        return [o.tolist() for o in out]


class DelayedLoopback(EPComm):
    """A group of one rank whose every transfer (counts exchanges aside) lands `delay_s` after
    it starts: what an exchange costs on a network, with nothing computed meanwhile. For timing
    models (the overlap tests and bench/bench_tbo.py), never for serving."""

    def __init__(self, delay_s: float = 0.0, stats: CommStats | None = None) -> None:
        self.group = None
        self.size, self.rank = 1, 0
        self.stats = stats if stats is not None else CommStats()
        self.delay_s = delay_s

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        self.stats.exchanges += 1
        return send.clone()

    def _a2a(self, tensors: Sequence[torch.Tensor], send: list[int], recv: list[int]) -> Pending:
        self.stats.exchanges += 1
        return Pending([], [t.clone() for t in tensors], self.stats,
                       ready_at=time.perf_counter() + self.delay_s)

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        self.stats.agreements += 1
        return [list(values)]
