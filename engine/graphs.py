"""The decode step as CUDA graphs: one per (batch bucket, page bucket), captured on first use.

A decode step of a 135M-parameter model launches about 400 small kernels; on a GPU the launch
cost, not the arithmetic, sets the step time. A captured graph replays all of them with one
launch. Shapes must be fixed for a graph, so a batch is padded up to its bucket (powers of two)
of sequences and of pages per sequence:

- padding sequences read and write one scratch page reserved from the pool for this purpose
  (their outputs are dropped), with a context of one token so no softmax row is empty;
- padding pages of a real sequence repeat its first page and are masked out.

Every per-step input lives in one int64 device buffer (token ids, positions, slots, lengths,
page tables), refreshed by one host-to-device copy before replay; the attention mask is computed
inside the graph from the lengths. The same padded step runs eagerly with `capture=False`, on
any device: that is how the CPU tests check the padding logic the GPU replays.

Only for models whose decode step has no host synchronisation (the Llama family); the
DeepSeek MoE picks its experts on the host and runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttnBatch
from pdserve.engine.kv_pool import KVPool

log = logging.getLogger(__name__)


class GraphCaptureError(RuntimeError):
    """Capturing a decode graph failed; the runner falls back to eager decode."""


def bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class _Step:
    batch_size: int
    pages: int
    ints: torch.Tensor        # [B * (5 + P)] int64 on the device: every input of the step
    host: torch.Tensor        # the same layout on the host (pinned on CUDA)
    batch: AttnBatch
    arange: torch.Tensor      # [P * block_tokens]
    lens: torch.Tensor        # view of ints: context lengths
    valid: torch.Tensor       # [B, P * block_tokens] mask, written inside the graph
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class GraphedDecode:
    def __init__(self, model: torch.nn.Module, pool: KVPool, *, capture: bool,
                 max_batch: int = 256, max_pages: int = 1 << 16) -> None:
        backend = getattr(model, "backend", None)
        if backend is not None and backend.uses_kernels:
            raise ValueError(f"a padded static decode step runs torch layers; this model runs "
                             f"on the {backend.name} backend")
        self.model = model
        self.pool = pool
        self.capture = capture
        self.max_batch = max_batch
        self.max_pages = max_pages
        self.device = pool.kv.device
        self.scratch = pool.reserve(1)[0]
        self.steps: dict[tuple[int, int], _Step] = {}
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0
        self._copied: torch.cuda.Event | None = None  # the last host-to-device copy

    def fits(self, batch_size: int, pages: int) -> bool:
        return batch_size <= self.max_batch and pages <= self.max_pages

    def close(self) -> None:
        self.steps.clear()
        self.pool.release([self.scratch])

    # -- one step ------------------------------------------------------------------------
    def run(self, last_tokens: Sequence[int], ctx_lens: Sequence[int],
            page_tables: Sequence[Sequence[int]]) -> torch.Tensor:
        bt = self.pool.layout.block_tokens
        n = len(last_tokens)
        need = [-(-c // bt) for c in ctx_lens]
        step = self._step(bucket(n), bucket(max(need)))
        b, p = step.batch_size, step.pages
        host = step.host
        if self._copied is not None:
            self._copied.synchronize()  # the pinned buffer may still be in flight
        host.zero_()
        ids, pos, slot_p, slot_o, lens = (host[i * b:(i + 1) * b] for i in range(5))
        tables = host[5 * b:].view(b, p)
        ids[:n] = torch.as_tensor(list(last_tokens))
        c = torch.as_tensor(list(ctx_lens))
        pos[:n] = c - 1
        lens[:n] = c
        lens[n:] = 1
        slot_o[:n] = (c - 1) % bt
        slot_p[n:] = self.scratch
        tables[n:] = self.scratch
        for i, (table, k) in enumerate(zip(page_tables, need)):
            row = list(table[:k])
            tables[i, :k] = torch.as_tensor(row)
            tables[i, k:] = row[0]
            slot_p[i] = row[(ctx_lens[i] - 1) // bt]
        step.ints.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        if step.graph is not None:
            step.graph.replay()
            self.replays += 1
        else:
            step.logits = self._forward(step)
        assert step.logits is not None
        # The graph's output buffer is overwritten by the next replay: hand out a copy.
        return step.logits[:n].clone()

    def _forward(self, step: _Step) -> torch.Tensor:
        torch.lt(step.arange.unsqueeze(0), step.lens.unsqueeze(1), out=step.valid)
        out: torch.Tensor = self.model(step.ints[:step.batch_size], self.pool.kv, step.batch)
        return out

    def _step(self, b: int, p: int) -> _Step:
        step = self.steps.get((b, p))
        if step is None:
            step = self._make(b, p)  # raises GraphCaptureError before it is kept
            self.steps[(b, p)] = step
        return step

    def _make(self, b: int, p: int) -> _Step:
        bt = self.pool.layout.block_tokens
        dev = self.device
        ints = torch.zeros(b * (5 + p), dtype=torch.long, device=dev)
        host = torch.zeros_like(ints, device="cpu")
        if dev.type == "cuda":
            host = host.pin_memory()
        ids, pos, slot_p, slot_o, lens = (ints[i * b:(i + 1) * b] for i in range(5))
        tables = ints[5 * b:].view(b, p)
        valid = torch.zeros(b, p * bt, dtype=torch.bool, device=dev)
        rows = torch.arange(b, device=dev)
        batch = AttnBatch([1] * b, [1] * b, slot_p, slot_o, pos, rows, [None] * b,
                          [(rows, tables, valid)], [], bt, exact_tables=False,
                          decode_step=True)
        step = _Step(b, p, ints, host, batch, torch.arange(p * bt, device=dev), lens, valid)
        # All-padding inputs: warm-up and capture touch only the scratch page.
        host.zero_()
        host[2 * b:3 * b] = self.scratch
        host[4 * b:5 * b] = 1
        host[5 * b:] = self.scratch
        ints.copy_(host)
        if self.capture:
            self._capture(step)
        return step

    def _capture(self, step: _Step) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up: lazy initialisation must not happen during capture
                self._forward(step)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(graph, pool=self.mempool):
                step.logits = self._forward(step)
        except RuntimeError as e:
            raise GraphCaptureError(f"batch {step.batch_size}, pages {step.pages}: {e}") from e
        step.graph = graph
        log.info("decode graph captured", extra={"batch": step.batch_size, "pages": step.pages})
