"""Exact greedy decoding without the whole LM head (engine/csrc/greedy_head.c).

A greedy sequence with no log-probabilities needs only the argmax of its logits, and the
head's product is a fifth of a batch-16 decode step on two cores. For a head in Q8_0 blocks,
the kernel estimates every logit in integer arithmetic (x quantized per block of 32 to int8,
GGUF's own int8 weights, AVX-512 VNNI) with a rigorous bound on the estimate's distance from
the float32 product, then computes exactly, by the full product's own accumulation chain, only
the tokens whose bound reaches the best lower bound: a handful to a few hundred of 49,152.
The rest of the row is -inf. So the row's argmax is the full product's, bit for bit, always;
the other entries are not logits and nothing reads them (the engine asks for this only for
rows it samples greedily without log-probabilities).

The packed copy (`from_blocks`) holds the weights as unsigned bytes (q + 128) in tiles of 16
rows, the layout VNNI multiplies by a broadcast of four int8 activations, with each tile's
block scales and block absolute sums as float32: 1.25 bytes per weight beside the Q8_0 blocks
the exact logits read.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.cpu_kernels import KINDS, QuantWeight, kernel

log = logging.getLogger(__name__)

TILE = 16  # rows of the head per VNNI register
# When the screen is used. SmolLM2's head on two cores (random x): full product 1.16 / 1.90 /
# 2.43 / 5.92 ms at 1 / 2 / 3 / 16 rows, screen 1.11 / 1.13 / 1.18 / 2.95 ms. So for every row of
# a step that asks only for the argmax, even one: a lone row 1.07-1.16 ms against 1.28-1.44
# (the twelfth stop, alternating), the batch-1 decode step about 3 % faster (24 alternating
# rounds). In a step that also has other rows, taking k rows out of the full product saves
# about a third of a millisecond each and costs a screen pass: at 16 rows 7.6 ms against 7.2
# for k = 6, 6.4 against 7.3 for k = 8. So from this many:
MIN_SPLIT_ROWS = 8


def usable(weight: QuantWeight) -> bool:
    """Whether `GreedyHead` takes this head on this machine: Q8_0 blocks and a CPU with
    AVX-512 VNNI (the kernels built)."""
    k = kernel()
    return weight.kind == "Q8_0" and k is not None and k.greedy_head_usable


@dataclass(frozen=True)
class GreedyHead:
    """The head's blocks repacked for the screen, and the blocks themselves for exact logits."""

    weight: QuantWeight
    tiles: torch.Tensor      # uint8 [T, nb, 8, 16, 4]: q + 128
    scales: torch.Tensor     # float32 [T, nb, 16]: d
    abs_sums: torch.Tensor   # float32 [T, nb, 16]: d * sum |q|, each block's |W_b|_1
    row_max: torch.Tensor    # float32 [T * 16]: max |W| per row

    @classmethod
    def from_blocks(cls, weight: QuantWeight) -> GreedyHead:
        if weight.kind != "Q8_0":
            raise ValueError(f"the greedy head takes Q8_0 blocks, not {weight.kind}")
        n, k = weight.shape
        nb, t = k // 32, -(-n // TILE)
        raw = weight.blocks.numpy().reshape(n, nb, KINDS["Q8_0"][1])
        d = np.ascontiguousarray(raw[:, :, :4]).view(np.float32)[:, :, 0]  # [n, nb]
        q = np.ascontiguousarray(raw[:, :, 4:]).view(np.int8)              # [n, nb, 32]
        pad = t * TILE - n
        if pad:  # rows past the head: zero weights, never candidates (the kernel stores n < N)
            d = np.concatenate([d, np.zeros((pad, nb), np.float32)])
            q = np.concatenate([q, np.zeros((pad, nb, 32), np.int8)])
        biased = (q.astype(np.int16) + 128).astype(np.uint8)
        tiles = biased.reshape(t, TILE, nb, 8, 4).transpose(0, 2, 3, 1, 4)
        abs_q = np.abs(q.astype(np.int32)).sum(-1).astype(np.float64)
        # |W_b|_1 rounded up to float32: the bound may only grow
        abs_sums = np.nextafter((d.astype(np.float64) * abs_q).astype(np.float32), np.inf)
        row_max = (np.abs(d)[:, :, None] * np.abs(q.astype(np.float32))).max(axis=(1, 2))
        def tiled(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(
                a.reshape(t, TILE, nb).transpose(0, 2, 1), dtype=np.float32))
        return cls(weight, torch.from_numpy(np.ascontiguousarray(tiles)), tiled(d),
                   tiled(abs_sums), torch.from_numpy(row_max.astype(np.float32)))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x [M, K] float32 -> (y [M, N], kept [M]): y holds the exact logit of every token
        that can be its row's argmax and -inf elsewhere; kept counts those tokens per row.
        None when x holds a value that is not finite (take the full product)."""
        k = kernel()
        assert k is not None and k.greedy_head_usable, "check usable() first"
        n, kk = self.weight.shape
        if x.dim() != 2 or x.shape[1] != kk or x.dtype != torch.float32:
            raise ValueError(f"the greedy head takes float32 [M, {kk}], got {x.dtype} "
                             f"{tuple(x.shape)}")
        x = x.contiguous()
        m = x.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        kept = torch.zeros(m, dtype=torch.int32)
        rc = k.greedy_head(x.data_ptr(), m, kk, self.tiles.data_ptr(), self.scales.data_ptr(),
                           self.abs_sums.data_ptr(), self.row_max.data_ptr(),
                           self.weight.blocks.data_ptr(), n, y.data_ptr(), kept.data_ptr(),
                           torch.get_num_threads())
        if rc == 1:
            return None
        if rc == -2:
            raise MemoryError("greedy head: scratch memory could not be allocated")
        if rc != 0:
            raise ValueError(f"greedy head: the kernel refused the arguments (rc {rc})")
        return y, kept


class LazyGreedyHead:
    """A model's greedy head, packed on first use: a prefill worker never decodes, and the
    packing (about 0.3 s for SmolLM2's head) stays out of start-up."""

    def __init__(self, weight: QuantWeight) -> None:
        self.weight = weight
        self._head: GreedyHead | None = None
        self._failed = False
        self._lock = threading.Lock()
        self.kept = torch.zeros(0, dtype=torch.int32)  # the last call's tokens computed per row

    def logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """As GreedyHead.__call__, the logits only; None (take the full product) also when the
        packing failed, which is logged once and never tried again."""
        if self._head is None:
            with self._lock:
                if self._head is None and not self._failed:
                    started = time.perf_counter()
                    try:
                        self._head = GreedyHead.from_blocks(self.weight)
                    except MemoryError as e:
                        self._failed = True
                        log.warning("greedy head not packed; full products from now on",
                                    extra={"error": repr(e)})
                    else:
                        log.info("greedy head packed", extra={
                            "rows": self.weight.shape[0],
                            "seconds": round(time.perf_counter() - started, 3)})
        if self._head is None:
            return None
        got = self._head(x)
        if got is None:
            return None
        y, self.kept = got
        return y
