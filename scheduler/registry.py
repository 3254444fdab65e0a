"""The gateway's view of its workers: who is in rotation and how loaded each one is.

Pure state; the caller passes the clock. A worker is keyed by its id; a re-join with a newer
epoch replaces the old entry (a restarted process: anything held for the old epoch is void).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import numpy as np

from pdserve.scheduler.balancers import (
    DUE_HORIZONS_S,
    due_profile,
    pick_decode_index,
    pick_prefill_index,
    plan_prefill_index,
    prefill_work,
    work_ahead,
)
from pdserve.scheduler.errors import NoRoom, NoWorker, RegistryError


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    role: Role
    address: str
    epoch: int
    hash_namespace: str
    layout_fingerprint: str
    block_tokens: int
    total_pages: int
    max_context: int
    vocab_size: int
    model_id: str = ""
    ep_group: str = ""  # a rank of this expert-parallel group (with ep_size > 1)
    ep_rank: int = 0
    ep_size: int = 1
    ep_epoch: int = 0   # the group's start: ranks of an older start do not count


@dataclass(frozen=True)
class Load:
    free_pages: int = 0
    total_pages: int = 0
    running: int = 0
    waiting: int = 0
    queued_tokens: int = 0
    queued_attention: float = 0.0
    draining: bool = False
    num_finished: int = 0
    # A prefill worker's queue by deadline (balancers.due_profile; empty: not reported) and
    # how it sets deadlines: its measured rate (0: none yet) and slack.
    due_s: tuple[float, ...] = ()
    prefill_rate: float = 0.0
    prefill_slack: float = 0.0
    defer_wait_s: float = 0.0  # a deferred prompt may wait this long (0: it defers none)

    def due_in(self, work: float) -> float:
        """When a prompt of `work` (balancers.prefill_work) placed now is due on it."""
        return self.prefill_slack * work / self.prefill_rate if self.prefill_rate > 0 else 0.0

    def may_hold(self, work: float) -> float:
        """How long a prompt of `work` placed now may wait there beyond its own time before
        the worker's order computes it: until it is due, or a deferral's wait. The gateway
        waits that much longer for its answer."""
        return max(self.due_in(work), self.defer_wait_s)

    def charged(self, work: float, share: float = 1.0) -> Load:
        """This load with `share` of a prompt of `work` placed on it (a pipeline stage's share
        is due as slack x that share's own time), until its next report says so."""
        if not self.due_s or self.prefill_rate <= 0:
            return self
        added = due_profile([(self.due_in(share * work), share * work / self.prefill_rate)])
        return replace(self, due_s=tuple(v + a for v, a in zip(self.due_s, added)))


@dataclass
class WorkerState:
    spec: WorkerSpec
    load: Load
    last_report: float
    in_rotation: bool = True


@dataclass
class LoadTable:
    """Struct-of-arrays view of one role's workers in rotation, in worker-id order: what the
    balancers read. Rebuilt when membership changes, updated in place by reports."""

    ids: list[str]
    attention: np.ndarray
    tokens: np.ndarray
    used_pages: np.ndarray
    free_pages: np.ndarray
    running: np.ndarray
    due: np.ndarray = field(default_factory=lambda: np.zeros((0, len(DUE_HORIZONS_S))))
    due_per_work: np.ndarray = field(default_factory=lambda: np.zeros(0))  # slack / rate
    seconds_per_work: np.ndarray = field(default_factory=lambda: np.zeros(0))  # 1 / rate
    row: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, states: list[WorkerState]) -> LoadTable:
        n = len(states)
        t = cls([w.spec.worker_id for w in states], np.zeros(n), np.zeros(n), np.zeros(n),
                np.zeros(n), np.zeros(n))
        t.row = {wid: i for i, wid in enumerate(t.ids)}
        t.due, t.due_per_work = np.zeros((n, len(DUE_HORIZONS_S))), np.zeros(n)
        t.seconds_per_work = np.zeros(n)
        for i, w in enumerate(states):
            t.set(i, w.load)
        return t

    def ahead(self, cached: int, new: int) -> np.ndarray:
        """Per row, the seconds a prompt placed there now would wait for prefill due before
        it (balancers.work_ahead over the worker's reported queue)."""
        return work_ahead(self.due, self.due_per_work * prefill_work(cached, new))

    def own_seconds(self, cached: int, new: int) -> np.ndarray:
        """Per row, the seconds the worker takes for the whole prompt at its measured rate
        (0 where it has measured none yet)."""
        result: np.ndarray = self.seconds_per_work * prefill_work(cached, new)
        return result

    def set(self, i: int, load: Load) -> None:
        self.due[i] = load.due_s or 0.0  # not reported: nothing ahead
        self.due_per_work[i] = load.due_in(1.0)
        self.seconds_per_work[i] = 1.0 / load.prefill_rate if load.prefill_rate > 0 else 0.0
        self.attention[i] = load.queued_attention
        self.tokens[i] = load.queued_tokens
        self.used_pages[i] = load.total_pages - load.free_pages
        self.free_pages[i] = load.free_pages
        self.running[i] = load.running


@dataclass
class WorkerRegistry:
    workers: dict[str, WorkerState] = field(default_factory=dict)
    _tables: dict[str, LoadTable] = field(default_factory=dict)
    # Pipelined prefill (balancers.plan_prefill_index): prompts with this many uncached tokens
    # (0: none) over at most this many prefill workers (0: all in rotation), and prompts with
    # this many (0: none) over the workers where their first token comes soonest (before the
    # workers report a rate: over those with nothing queued).
    pipeline_min_tokens: int = 0
    pipeline_max_stages: int = 0
    pipeline_idle_tokens: int = 0
    # Ties between equally loaded workers are broken at random (balancers._pick_min_max).
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def table(self, role: str) -> LoadTable:
        t = self._tables.get(role)
        if t is None:
            t = self._tables[role] = LoadTable.of(self.active(role))
        return t

    def _changed(self, role: str) -> None:
        self._tables.pop(role, None)

    def _refresh(self, w: WorkerState) -> None:
        t = self._tables.get(w.spec.role)
        if t is None:
            return
        i = t.row.get(w.spec.worker_id)
        if i is None:
            self._changed(w.spec.role)
        else:
            t.set(i, w.load)

    def join(self, spec: WorkerSpec, now: float) -> WorkerState:
        for w in self.workers.values():
            if w.spec.worker_id != spec.worker_id and w.spec.hash_namespace != spec.hash_namespace:
                raise RegistryError(
                    f"worker {spec.worker_id} serves {spec.hash_namespace!r}, the cluster "
                    f"serves {w.spec.hash_namespace!r}")
        old = self.workers.get(spec.worker_id)
        if old is not None and old.spec.epoch > spec.epoch:
            raise RegistryError(f"worker {spec.worker_id} epoch {spec.epoch} is older than "
                                f"the registered {old.spec.epoch}")
        state = WorkerState(spec, Load(free_pages=spec.total_pages, total_pages=spec.total_pages),
                            now)
        self.workers[spec.worker_id] = state
        self._changed(spec.role)
        return state

    def report(self, worker_id: str, epoch: int, load: Load, now: float) -> bool:
        w = self.workers.get(worker_id)
        if w is None or w.spec.epoch != epoch:
            return False
        was = w.in_rotation
        w.load, w.last_report = load, now
        w.in_rotation = not load.draining
        if was != w.in_rotation:
            self._changed(w.spec.role)
        else:
            self._refresh(w)
        return True

    def leave(self, state: WorkerState) -> bool:
        """Removes the worker `state` registered, unless a later registration (a newer epoch,
        or the same process again over a new stream) replaced it."""
        wid = state.spec.worker_id
        if self.workers.get(wid) is not state:
            return False
        del self.workers[wid]
        self._changed(state.spec.role)
        return True

    def expire(self, now: float, timeout_s: float) -> list[str]:
        """Takes workers silent for longer than timeout_s out of rotation; returns their ids."""
        out = []
        for w in self.workers.values():
            if w.in_rotation and now - w.last_report > timeout_s:
                w.in_rotation = False
                self._changed(w.spec.role)
                out.append(w.spec.worker_id)
        return out

    def pick(self, cached_blocks: int, n_prompt: int, pages: int,
             excluded: frozenset[str] | set[str] = frozenset()
             ) -> tuple[WorkerState, WorkerState, list[WorkerState]]:
        """(prefill, decode, pipeline) for a request, by the balancers over the load tables:
        `pipeline` lists the prefill workers that run the first layers before `prefill` runs
        the last ones (empty unless the prompt has at least `pipeline_min_tokens` uncached
        tokens and spreading it lowers the load of its slowest stage, or at least
        `pipeline_idle_tokens` and spreading it gives its first token sooner, by the workers'
        reported queues and rates: plan_prefill_index).
        Workers in `excluded` (they failed
        this request) are no candidates. NoWorker: no worker in rotation; NoRoom: no decode
        worker can hold `pages`."""
        pt, dt = self.table("prefill"), self.table("decode")
        p_ok = np.array([w not in excluded for w in pt.ids], dtype=bool)
        d_ok = np.array([w not in excluded for w in dt.ids], dtype=bool)
        if not p_ok.any() or not d_ok.any():
            raise NoWorker("no prefill or decode worker in rotation"
                           + (" (besides the ones that failed this request)" if excluded else ""))
        cached = cached_blocks * self.workers[pt.ids[0]].spec.block_tokens
        decode = self.pick_decode(pages, excluded)
        ahead = pt.ahead(cached, n_prompt - cached)
        plan = plan_prefill_index(pt.attention, pt.tokens, cached, n_prompt - cached, p_ok,
                                  self.pipeline_min_tokens, self.pipeline_max_stages, self.rng,
                                  ahead, self.pipeline_idle_tokens,
                                  pt.own_seconds(cached, n_prompt - cached))
        head, *upstream = [self.workers[pt.ids[p]] for p in plan]
        if upstream and any(w.spec.ep_size > 1 for w in (head, *upstream)):
            # a rank of an EP group steps with its group, not as a stage: the balancer's
            # pick alone (a pipeline's head may be the stage that waits longest)
            single = pick_prefill_index(pt.attention, pt.tokens, cached, n_prompt - cached,
                                        p_ok, self.rng, ahead)
            assert single is not None  # the plan had rows
            head, upstream = self.workers[pt.ids[single]], []
        return head, decode, upstream

    def pick_decode(self, pages: int, excluded: frozenset[str] | set[str] = frozenset()
                    ) -> WorkerState:
        """The decode worker for a request of `pages` pages, by the decode balancer; NoRoom
        when no worker outside `excluded` can hold it (NoWorker when none is in rotation)."""
        dt = self.table("decode")
        d_ok = np.array([w not in excluded for w in dt.ids], dtype=bool)
        if not d_ok.any():
            raise NoWorker("no decode worker in rotation"
                           + (" (besides the ones that failed this request)" if excluded else ""))
        d = pick_decode_index(dt.used_pages, dt.free_pages, dt.running, pages, d_ok, self.rng)
        if d is None:
            raise NoRoom(pages)
        return self.workers[dt.ids[d]]

    def active(self, role: str) -> list[WorkerState]:
        """The role's workers in rotation; a rank of an EP group only while every rank of its
        group (same group and epoch) is (a group with a rank missing cannot step)."""
        ws = [w for w in self.workers.values() if w.spec.role == role and w.in_rotation]
        ranks: dict[tuple[str, int], set[int]] = {}
        for w in ws:
            if w.spec.ep_size > 1:
                ranks.setdefault((w.spec.ep_group, w.spec.ep_epoch), set()).add(w.spec.ep_rank)
        return sorted((w for w in ws if w.spec.ep_size <= 1
                       or len(ranks[(w.spec.ep_group, w.spec.ep_epoch)]) == w.spec.ep_size),
                      key=lambda w: w.spec.worker_id)

    def group_of(self, worker_id: str) -> list[str]:
        """The workers of `worker_id`'s EP group (itself alone when it has none)."""
        w = self.workers.get(worker_id)
        if w is None or w.spec.ep_size <= 1:
            return [worker_id]
        key = (w.spec.role, w.spec.ep_group, w.spec.ep_epoch)
        return sorted(o.spec.worker_id for o in self.workers.values()
                      if (o.spec.role, o.spec.ep_group, o.spec.ep_epoch) == key)

    def bump(self, worker_id: str, prompt_work: float = 0.0, share: float = 1.0,
             **delta: float) -> None:
        """Optimistic update between reports, so a burst does not all land on one worker
        (`prompt_work`: a prompt's prefill_work, `share` of it placed on the worker's queue
        by deadline)."""
        w = self.workers.get(worker_id)
        if w is None:
            return
        load = replace(w.load, **{k: getattr(w.load, k) + v for k, v in delta.items()})
        w.load = load.charged(prompt_work, share) if prompt_work else load
        self._refresh(w)
