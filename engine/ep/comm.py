"""What an EP group sends, behind one small interface, over torch.distributed: gloo on CPU
(whose `all_to_all_single` takes uneven and empty splits and `async_op`); nccl on CUDA tensors
is the same calls, not yet run (the step agreement's small tensors would have to be CUDA's).

Each exchange has a start and a wait (`Pending`), so that a step can do other work, or run the
other micro-batch, while rows travel. A tensor gloo refuses (float8) travels as its bytes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Pending:
    """Exchanges under way; `wait()` returns their results, in the order they were started."""

    works: list[dist.Work]
    results: list[torch.Tensor]
    comm: EPComm | None = None

    def wait(self) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()
        if self.comm is not None:
            self.comm.wait_s += time.perf_counter() - t0
        return self.results


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


class EPComm:
    """The collectives of one EP group (`group`: a torch.distributed process group, None for
    the default one)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sent_rows = 0      # rows this rank dispatched (for its metrics)
        self.received_rows = 0  # rows this rank's experts computed
        self.sent_bytes = 0
        self.exchanges = 0      # MoE exchanges started (counts, dispatch, combine)
        self.agreements = 0     # step agreements (one small all-gather each)
        self.wait_s = 0.0       # time spent waiting for dispatches and combines

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        """Each rank's row counts [N] for every rank -> the counts every rank sends it [N]."""
        recv = torch.empty_like(send)
        self.exchanges += 1
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def _a2a(self, tensors: Sequence[torch.Tensor], send: list[int], recv: list[int]) -> Pending:
        self.exchanges += 1
        works, results = [], []
        for t in tensors:
            data = _as_bytes(t.contiguous())
            out = torch.empty((sum(recv), *data.shape[1:]), dtype=data.dtype, device=data.device)
            w = dist.all_to_all_single(out, data, recv, send, group=self.group, async_op=True)
            assert w is not None
            works.append(w)
            results.append(out.view(t.dtype) if t.dtype != data.dtype else out)
        return Pending(works, results, self)

    def dispatch(self, rows: torch.Tensor, slots: torch.Tensor, send: list[int],
                 recv: list[int]) -> Pending:
        """Starts sending `rows` [M, D] and their slot ids [M] (grouped by destination rank,
        send[r] of them to rank r); wait() -> (rows received, their slots)."""
        self.sent_rows += rows.shape[0]
        self.sent_bytes += rows.numel() * rows.element_size() + slots.numel() * 8
        self.received_rows += sum(recv)
        return self._a2a((rows, slots), send, recv)

    def combine(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> Pending:
        """Starts sending the expert outputs back: the reverse of a dispatch with (send, recv)
        of that dispatch; wait() -> [rows in the order this rank dispatched them]."""
        return self._a2a((rows,), recv, send)

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's `values` (the same length everywhere): the step agreement."""
        self.agreements += 1
        mine = torch.tensor(list(values), dtype=torch.long)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(out, mine, group=self.group)
        return [o.tolist() for o in out]
