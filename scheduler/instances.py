"""The replay's simulated cluster: its cost model, its KV store, and the state of its prefill
and decode instances (scheduler/replay.py runs them on a simulated clock; scheduler/anchors.py
places requests on them as the anchors' routers do)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pdserve.scheduler.balancers import attention_work, due_profile


@dataclass(frozen=True)
class CostModel:
    """What prefill and decode cost on the simulated instances, and pdserve's settings (the
    workers' and the gateway's defaults; tests/scheduler/test_replay.py checks they agree)."""

    prefill_tps: float = 12_000.0      # new tokens / s of one prefill instance (linear part)
    attention_s: float = 2e-9          # seconds per unit of n * (c + n/2)
    step_s: float = 0.015              # decode step, fixed part
    per_req_s: float = 0.0002          # decode step, per running request
    per_kv_s: float = 2e-8             # decode step, per KV token held
    decode_kv_tokens: int = 1_500_000  # KV capacity of one decode instance
    pipeline_min_tokens: int = 16_384  # pdserve pipelines prefills of this many new tokens (0: off)
    pipeline_max_stages: int = 0       # over at most this many instances (0: all)
    pipeline_idle_tokens: int = 512    # and prompts of this many where they finish soonest
    pipeline_chunk_tokens: int = 2_048  # largest chunk handed from stage to stage: the workers'
    # --prefill-chunk-tokens default (see
    # balancers.pipeline_chunk: at least 4 chunks per stage when the prompt allows)
    pipeline_hop_s: float = 0.002      # one chunk's hidden states from a stage to the next
    prefill_slack: float = 3.0         # pdserve: deadline = arrival + this x own prefill time
    due_ties: bool = True              # pdserve: balance ties go to the instance where the prompt
    # waits least for work due before it (its reported queue), else to the lower load
    prefix_wait_tokens: int = 512      # pdserve: a prompt whose next blocks an earlier prompt is
    # computing now, this many tokens or more, waits for them instead of computing them again
    defer_share: float = 0.02          # pdserve: an instance whose earliest-due prompt would end
    defer_lateness_s: float = 5.0      # more than this late defers its longest prompt not yet
    defer_wait_s: float = 100.0        # begun until it waited this long since its arrival,
    defer_burst: float = 5.0           # then runs it first; at most share of its prompts, a
    # bucket of at most burst deferrals (engine/scheduler.py's Deferral; 0 share: never)

    def prefill_s(self, cached: int, new: int) -> float:
        return new / self.prefill_tps + self.attention_s * attention_work(cached, new)


class LRUStore:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def prefix(self, ids: Sequence[int]) -> int:
        n = 0
        for b in ids:
            if b not in self._blocks:
                break
            n += 1
        for b in ids[:n]:
            self._blocks.move_to_end(b)
        return n

    def add(self, ids: Iterable[int]) -> None:
        for b in ids:
            self._blocks[b] = None
            self._blocks.move_to_end(b)
        while self.capacity and len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


@dataclass
class Stage:
    """A request's share of one prefill instance: the whole prefill (one piece), or one
    pipeline stage (`chunks` pieces, chunk k computable once the stage before finished its
    chunk k and handed it over)."""
    i: int                 # request index
    w: int                 # instance
    stage: int
    stages: list[Stage]   # all stages of the request, in pipeline order
    duration: float
    work: float
    tokens: float
    chunks: int
    deadline: float        # pdserve's order: earliest first
    ends: list[float] = field(default_factory=list)  # when each of its chunks finished
    left: float = -1.0     # seconds still to compute (set from `duration`)
    after: frozenset[int] = frozenset()  # requests computing its prefix, which it waits for
    arrival: float = 0.0
    deferred_until: float | None = None  # deferred (pdserve, overloaded): first from then on

    def __post_init__(self) -> None:
        self.left = self.duration

    @property
    def piece_s(self) -> float:
        return self.duration / self.chunks

    @property
    def due_at(self) -> float:
        """When it is due in the instance's order (deferred: when it goes first)."""
        return self.deadline if self.deferred_until is None else self.deferred_until

    def rank(self, t: float) -> tuple[int, float, int]:
        """Its place in pdserve's order (engine/scheduler.py, Scheduler._rank)."""
        if self.deferred_until is None:
            return (0, self.deadline, self.i)
        if t >= self.deferred_until:
            return (-1, self.deferred_until, self.i)
        return (1, self.deadline, self.i)

    def ready(self, t: float, hop_s: float, done: set[int]) -> bool:
        """Its next piece can start at `t` (`done`: the requests whose prefill is over)."""
        k = len(self.ends)
        if k >= self.chunks or not self.after <= done:
            return False
        if self.stage == 0:
            return True
        prev = self.stages[self.stage - 1].ends
        return len(prev) > k and prev[k] + hop_s <= t + 1e-12


@dataclass
class PrefillInstance:
    queue: list[Stage] = field(default_factory=list)
    running: Stage | None = None
    busy_until: float = 0.0
    work: float = 0.0      # outstanding attention work (queued + running)
    tokens: float = 0.0    # outstanding new tokens
    active: float = 0.0    # outstanding prompt tokens, cached ones included (its KV in use)
    served: set[int] = field(default_factory=set)    # block ids this instance computed (affinity)
    credit: float = 0.0    # deferrals allowed now (pdserve)
    deferred: int = 0      # prompts (stages) it deferred

    def wait(self, t: float) -> float:
        """Time until this instance could start a new prefill: the running piece's rest and
        everything queued (Mooncake's queueing estimate)."""
        return (max(0.0, self.busy_until - t)
                + sum(s.left for s in self.queue if s is not self.running))

    def due(self, t: float) -> list[float]:
        """Its queue as a worker reports it (balancers.due_profile): the running piece's rest
        due now, each stage's other pieces at its deadline."""
        items = [(0.0, max(0.0, self.busy_until - t))]
        for s in self.queue:
            items.append((s.due_at - t, s.left - (s.piece_s if s is self.running else 0.0)))
        return due_profile(items)

    def defer(self, t: float, cost: CostModel) -> None:
        """Overloaded (its earliest-due stage not deferred would end more than
        `defer_lateness_s` late), it defers its longest stage not yet begun whose prompt takes
        that long or more itself, while its bucket allows and no deferred stage's wait is over
        (engine/scheduler.py)."""
        while self.credit >= 1:
            if any(s.deferred_until is not None and s.deferred_until <= t for s in self.queue):
                return  # the overload outlasted a deferral's wait: more would come back later
            pending = [s for s in self.queue if s.deferred_until is None]
            if not pending:
                return
            head = min(pending, key=lambda s: (s.deadline, s.i))
            if t + head.left - head.deadline <= cost.defer_lateness_s:
                return
            idle = [s for s in pending if not s.ends and s is not self.running
                    and s.duration * len(s.stages) >= cost.defer_lateness_s]
            if not idle:
                return
            longest = max(idle, key=lambda s: (s.deadline - s.arrival, -s.i))
            longest.deferred_until = longest.arrival + cost.defer_wait_s
            self.credit -= 1
            self.deferred += 1


@dataclass
class DecodeInstance:
    # request index -> tokens still to generate
    running: dict[int, int] = field(default_factory=dict)
    kv: int = 0
    reserved: int = 0
    stepping: bool = False


class Meter:
    """Time-weighted per-instance values; max/mean per 1-second window; windows averaged with
    the window's total load as weight, so that bursts count and idle windows (where no policy
    can balance anything) do not."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.window = 0
        self.acc = [0.0] * n
        self.last_t = 0.0
        self.ratios: list[tuple[float, float]] = []  # (max/mean, weight)

    def advance(self, t: float, values: Sequence[float]) -> None:
        while self.last_t < t:
            edge = min(t, self.window + 1.0)
            for i, v in enumerate(values):
                self.acc[i] += v * (edge - self.last_t)
            self.last_t = edge
            if edge >= self.window + 1.0:
                mean = sum(self.acc) / self.n
                if mean > 0:
                    self.ratios.append((max(self.acc) / mean, mean))
                self.acc = [0.0] * self.n
                self.window += 1

    def result(self) -> float:
        total = sum(w for _, w in self.ratios)
        return sum(r * w for r, w in self.ratios) / total if total else 1.0
