"""Model execution over the paged pool: prefill (chunked) and batched decode steps."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from pdserve.engine.attention import AttnBatch
from pdserve.engine.deepseek import DeepseekV3ForCausalLM
from pdserve.engine.errors import OutOfPages
from pdserve.engine.graphs import GraphCaptureError, GraphedDecode
from pdserve.engine.kv_pool import KVPool
from pdserve.engine.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


Model = LlamaForCausalLM | DeepseekV3ForCausalLM


class ModelRunner:
    """`cuda_graphs`: replay the decode step as CUDA graphs (engine/graphs.py). None: as the
    model's execution backend says (engine/backend.py); "eager": the same padded static step
    without capture (how the CPU tests exercise it)."""

    def __init__(self, model: Model, pool: KVPool, prefill_chunk_tokens: int = 2048,
                 cuda_graphs: bool | Literal["eager"] | None = None) -> None:
        self.model = model
        self.pool = pool
        self.chunk = prefill_chunk_tokens
        self.device = pool.kv.device
        if cuda_graphs is None:
            cuda_graphs = model.backend.cuda_graphs
        self._graphs_mode: bool | Literal["eager"] = cuda_graphs
        self._graphs: GraphedDecode | None = None

    @property
    def graphs(self) -> GraphedDecode | None:
        """Made on the first decode step (a prefill-only runner never reserves its scratch
        page); None while no page is free for it."""
        if self._graphs is None and self._graphs_mode:
            try:
                self._graphs = GraphedDecode(self.model, self.pool,
                                             capture=self._graphs_mode is True)
            except OutOfPages:  # every page is reserved: eager until one is free
                return None
        return self._graphs

    def _model(self, ids: torch.Tensor, batch: AttnBatch, layers: tuple[int, int] | None = None,
               hidden: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = self.model(ids, self.pool.kv, batch, layers=layers, hidden=hidden)
        return out

    @property
    def block_tokens(self) -> int:
        return self.pool.layout.block_tokens

    def prefill(self, tokens: Sequence[int], pages: Sequence[int], start: int = 0) -> torch.Tensor:
        """Computes KV of tokens[start:] into `pages` (KV of tokens[:start] must already be
        there) and returns the logits [vocab] after the last token."""
        n = len(tokens)
        if not 0 <= start < n:
            raise ValueError(f"prefill start {start} outside a prompt of {n} tokens")
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        logits = None
        for s in range(start, n, self.chunk):
            e = min(s + self.chunk, n)
            batch = AttnBatch.build([e - s], [e], [list(pages)], self.block_tokens, self.device)
            logits = self._model(ids[s:e], batch)
        assert logits is not None
        return logits[0]

    def forward_chunks(self, chunks: Sequence[tuple[Sequence[int], int, Sequence[int]]],
                       before_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """One forward over prompt chunks of several sequences: each chunk is (token ids, start
        position, page table); KV of positions < start must already be in the pages, or, for
        layer l, once `before_layer(l)` returns. Returns the logits [B, vocab] after each
        chunk's last token."""
        ids = torch.tensor([t for toks, _, _ in chunks for t in toks], dtype=torch.long,
                           device=self.device)
        batch = AttnBatch.build([len(t) for t, _, _ in chunks], [s + len(t) for t, s, _ in chunks],
                                [list(p) for _, _, p in chunks], self.block_tokens, self.device)
        batch.before_layer = before_layer
        return self._model(ids, batch)

    def forward_stage(self, tokens: Sequence[int], start: int, pages: Sequence[int],
                      layers: tuple[int, int], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk of one prompt through the layers [lo, hi) only (a pipeline stage, see
        services/pipeline.py): `tokens` sit at positions start.., KV of earlier positions in
        these layers is in `pages`. Returns the hidden states [len(tokens), D] after layer
        hi - 1, or the logits [vocab] after the last token when hi is the model's last layer."""
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        batch = AttnBatch.build([len(tokens)], [start + len(tokens)], [list(pages)],
                                self.block_tokens, self.device)
        out = self._model(ids, batch, layers=layers, hidden=hidden)
        return out[0] if layers[1] == self.pool.layout.num_layers else out

    def decode(
        self, last_tokens: Sequence[int], ctx_lens: Sequence[int],
        page_tables: Sequence[Sequence[int]], argmax_only: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """One token for each sequence: last_tokens[i] sits at position ctx_lens[i] - 1.
        Returns logits [B, vocab]. `argmax_only[i]`: the caller reads only row i's argmax
        (see AttnBatch.argmax_only): the row may be -inf away from the tokens that can be it."""
        graphs = self.graphs
        if graphs is not None and graphs.fits(
                len(last_tokens), max(-(-c // self.block_tokens) for c in ctx_lens)):
            try:
                return graphs.run(last_tokens, ctx_lens, page_tables)
            except GraphCaptureError as e:
                log.warning("CUDA graph capture failed; decoding eagerly from now on",
                            extra={"error": str(e)})
                graphs.close()
                self._graphs, self._graphs_mode = None, False
        batch = AttnBatch.build([1] * len(last_tokens), list(ctx_lens),
                                [list(t) for t in page_tables], self.block_tokens, self.device,
                                decode_step=True)
        if argmax_only is not None:
            batch.argmax_only = list(argmax_only)
        ids = torch.tensor(list(last_tokens), dtype=torch.long, device=self.device)
        return self._model(ids, batch)
