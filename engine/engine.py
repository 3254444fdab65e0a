"""The engine loop: schedule -> run -> postprocess, with continuous batching.

Used whole as the single-process engine (the reference every disaggregated result must equal),
and in parts by the workers: a prefill worker calls `ModelRunner.prefill`; a decode worker adds
sequences whose KV arrived over NIXL with `add_prefilled` and calls `step`.

Lifecycle of a sequence:
1. `add_request` reserves pages for prompt + max_tokens (or raises OutOfPages) and queues it.
2. A prefill step runs prompt chunks of several waiting sequences within a token budget
   (chunked prefill); a sequence whose prompt is done samples its first token and runs.
3. Otherwise a decode step advances every running sequence by one token, in one batch.
4. A sequence that hits a stop token or max_tokens leaves the batch; its pages are released.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.engine.kv_pool import KVPool
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sampling import SamplingParams, finish_reason, logprob_of, sample
from pdserve.engine.sequence import Sequence


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int
    finish_reason: str | None
    logprob: float | None = None


def schedule_chunks(seqs, budget: int) -> list[tuple[object, int]]:  # type: ignore[no-untyped-def]
    """FIFO chunked-prefill plan: (sequence, tokens this step) within `budget` tokens."""
    plan = []
    for seq in seqs:
        if budget <= 0:
            break
        n = min(len(seq.prompt) - seq.num_computed, budget)
        if n > 0:
            plan.append((seq, n))
            budget -= n
    return plan


def request_pages(block_tokens: int, prompt_tokens: int, max_tokens: int) -> int:
    """Pages a request reserves up front: KV is stored for every token but the last generated
    one. The gateway and the decode worker both size reservations with this."""
    return -(-(prompt_tokens + max_tokens - 1) // block_tokens)


def pages_needed(pool: KVPool, prompt_tokens: int, max_tokens: int) -> int:
    return request_pages(pool.layout.block_tokens, prompt_tokens, max_tokens)


class LLMEngine:
    def __init__(self, runner: ModelRunner, max_batch: int = 64,
                 max_prefill_tokens: int = 2048) -> None:
        self.runner = runner
        self.pool = runner.pool
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- admission ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(request_id, list(prompt), params)
        seq.pages = self.pool.reserve(pages_needed(self.pool, len(prompt), params.max_tokens))
        self.waiting.append(seq)
        return seq

    def add_prefilled(self, seq: Sequence) -> TokenEvent | None:
        """Joins a sequence whose prompt KV is already in its pages and whose first token
        (seq.output[0]) was sampled elsewhere. Returns a finish event if it is already done."""
        reason = finish_reason(seq.output[-1], len(seq.output), seq.params)
        if reason is not None:
            seq.finish_reason = reason
            self._free(seq)
            return TokenEvent(seq.request_id, -1, reason)
        self.running.append(seq)
        return None

    def abort(self, request_id: str) -> bool:
        for q in (self.waiting, self.running):
            for seq in q:
                if seq.request_id == request_id:
                    q.remove(seq)
                    seq.finish_reason = "abort"
                    self._free(seq)
                    return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the loop ---------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        room = self.max_batch - len(self.running)
        if self.waiting and room > 0:
            events.extend(self._prefill(list(self.waiting)[:room]))
        elif self.running:
            events.extend(self._decode(self.running[: self.max_batch]))
        self.running = [s for s in self.running if not s.finished]
        return events

    def _prefill(self, seqs: list[Sequence]) -> list[TokenEvent]:
        plan = schedule_chunks(seqs, self.max_prefill_tokens)
        logits = self.runner.forward_chunks(
            [(s.prompt[s.num_computed:s.num_computed + n], s.num_computed, s.pages)
             for s, n in plan])
        events = []
        greedy = logits.argmax(-1).tolist()  # one device sync for every greedy sequence
        for i, (seq, n) in enumerate(plan):
            seq.num_computed += n
            if seq.num_computed == len(seq.prompt):
                self.waiting.remove(seq)
                events.append(self._append(seq, logits[i], new=True, greedy=greedy[i]))
        return events

    def _decode(self, seqs: list[Sequence]) -> list[TokenEvent]:
        logits = self.runner.decode(
            [s.last_token for s in seqs], [s.num_tokens for s in seqs], [s.pages for s in seqs]
        )
        greedy = logits.argmax(-1).tolist()
        return [self._append(s, logits[i], new=False, greedy=greedy[i])
                for i, s in enumerate(seqs)]

    def _append(self, seq: Sequence, logits, new: bool,  # type: ignore[no-untyped-def]
                greedy: int) -> TokenEvent:
        """`greedy`: the argmax of `logits`, computed for the whole batch at once."""
        token = (greedy if seq.params.temperature <= 0.0
                 else sample(logits, seq.params, len(seq.output)))
        lp = logprob_of(logits, token) if seq.params.logprobs else None
        seq.output.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
        seq.finish_reason = finish_reason(token, len(seq.output), seq.params)
        if seq.finished:
            self._free(seq)
        elif new:
            self.running.append(seq)
        return TokenEvent(seq.request_id, token, seq.finish_reason, lp)

    def _free(self, seq: Sequence) -> None:
        if seq.pages:
            self.pool.release(seq.pages)
            seq.pages = []

    # -- convenience ------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        seqs = [self.add_request(f"req-{i}", p, params) for i, p in enumerate(prompts)]
        while self.has_work:
            self.step()
        return [s.output for s in seqs]
