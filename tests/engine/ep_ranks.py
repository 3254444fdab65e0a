"""What each rank process of the EP tests runs (spawned: importable by the child processes).

Every rank loads the same checkpoint holding only its slots' experts, joins a gloo group, and
runs the engine loop with the EP step agreement over the requests given to it (a request may
join at a given group step); it reports, per request, the tokens and every step's logits."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def spawn(target: Callable[..., None], world: int, args_of: Callable[[int], tuple],
          **kwargs: Any) -> tuple[list[Any], Any]:
    """Starts `world` rank processes (spawned) running target(*args_of(rank), queue, **kwargs);
    returns them and the queue they report on."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(r), q), kwargs=kwargs)
             for r in range(world)]
    for p in procs:
        p.start()
    return procs, q


def collect(procs: list[Any], q: Any, timeout_s: float) -> list[Any]:
    """Each rank's report (read before joining: a report may not fit in the pipe), then the
    processes joined (killed after a minute)."""
    try:
        return [q.get(timeout=timeout_s) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.exitcode is None:
                p.kill()


REQUESTS = dict[str, tuple[list[int], int]]  # request id -> (prompt, the group step it joins)


def run_rank(rank: int, world: int, init: str, model_dir: str, redundant: int,
             requests: dict[int, REQUESTS], max_tokens: int, out: Any,
             eplb_interval: int = 0, phy2log: list[list[int]] | None = None,
             exit_at: tuple[int, int] | None = None, idle_rounds: int = 0,
             local_first: bool = True, tbo: str = "off", dispatch: str | None = None,
             batch_invariant: bool = False) -> None:
    """`phy2log`: the MoE layers' placement (default: SlotMap.default); `exit_at`: (rank,
    step): that rank dies (os._exit) when the group reaches that step; `idle_rounds`: after
    the work, that many agreement rounds with nothing anywhere (to count what they issue);
    `tbo`, `dispatch`, `batch_invariant`: as --tbo, --ep-dispatch-dtype, --batch-invariant."""
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.ep.comm import EPComm
    from pdserve.engine.ep.hooks import EPHooks
    from pdserve.engine.ep.moe import ExpertParallel
    from pdserve.engine.ep.placement import SlotMap
    from pdserve.engine.hf_loader import load_hf_config
    from pdserve.engine.kv_pool import KVPool
    from pdserve.engine.loader import load_model
    from pdserve.engine.model_config import DeepseekV3Config
    from pdserve.engine.runner import ModelRunner
    from pdserve.engine.sampling import SamplingParams
    from pdserve.engine.scheduler import BatchKind

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        cfg = load_hf_config(Path(model_dir))
        assert isinstance(cfg, DeepseekV3Config)
        moe = cfg.moe_layers
        slots = (SlotMap.from_phy2log(phy2log, moe, cfg.num_hidden_layers, cfg.n_routed_experts,
                                      world, local_first) if phy2log is not None else
                 SlotMap.default(moe, cfg.num_hidden_layers, cfg.n_routed_experts, world,
                                 redundant, local_first))
        comm = EPComm()
        second = EPComm(dist.new_group(list(range(world))), comm.stats) if tbo != "off" else None
        ep = ExpertParallel(comm, slots, second, dispatch)
        loaded = load_model(model_dir, block_tokens=16, ep=ep, batch_invariant=batch_invariant)
        model = loaded.model
        held = sorted({int(e) for m in model.moe_layers() for e in m.experts})
        logits: dict[str, list[torch.Tensor]] = {}

        class Recording(LLMEngine):
            def postprocess(self, batch, result):  # type: ignore[no-untyped-def]
                for i, c in enumerate(batch.chunks):
                    if batch.kind is BatchKind.DECODE or c.completes_prompt:
                        logits.setdefault(c.seq.request_id, []).append(result[i].clone())
                return super().postprocess(batch, result)

        eplb = None
        if eplb_interval:
            from pdserve.engine.ep.eplb import ExpertReader, LiveEPLB

            eplb = LiveEPLB(ep, model, eplb_interval,
                            ExpertReader(Path(model_dir), torch.float32, loaded.backend))
        hooks = EPHooks(ep, model, eplb, tbo=tbo)
        mine = requests.get(rank, {})
        pages = sum(loaded.layout.pages_for(len(p) + max_tokens) for p, _ in mine.values())
        eng = Recording(ModelRunner(model, KVPool(loaded.layout, pages + 1),
                                    prefill_chunk_tokens=19), hooks=hooks)
        seqs = {}
        last_join = max((step for _, step in mine.values()), default=0)
        last_join = max(v[0] for v in ep.comm.gather_ints([last_join]))
        t0 = time.perf_counter()
        while True:
            for rid, (prompt, step) in mine.items():
                if step == hooks.steps and rid not in seqs:
                    seqs[rid] = eng.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens))
            if exit_at is not None and (rank, hooks.steps) == exit_at:
                os._exit(3)  # a rank dies mid-run
            before = hooks.steps
            eng.step()
            if hooks.steps == before:  # no rank had work
                assert hooks.steps >= last_join, "the group went idle before a request joined"
                break
        seconds = time.perf_counter() - t0
        exchanges = ep.stats.exchanges
        for _ in range(idle_rounds):
            eng.step()
        out.put((rank, {rid: (s.output, [t.numpy() for t in logits.get(rid, [])])
                        for rid, s in seqs.items()},
                 {"steps": hooks.steps, "idle_steps": hooks.idle_steps, "held": held,
                  "received": ep.stats.received_rows, "sent": ep.stats.sent_rows,
                  "rebalances": 0 if eplb is None else eplb.rebalances,
                  "balance": None if eplb is None else eplb.balance,
                  "received_at": [] if eplb is None else eplb.received_at,
                  "seconds": seconds, "wait_s": ep.stats.wait_s,
                  "sent_bytes": ep.stats.dispatch_bytes,
                  "phy2log": [list(r) for r in ep.slots.phy2log],
                  "idle_exchanges": ep.stats.exchanges - exchanges,
                  "agreements": ep.stats.agreements,
                  "overlapped": hooks.overlapped_steps,
                  "kv": eng.pool.kv.numpy().copy() if batch_invariant else None,
                  "canary": _canary(model, model_dir)}))
    finally:
        dist.destroy_process_group()


def _canary(model: Any, model_dir: str) -> bool:
    """Every expert module a rank holds has the checkpoint's weights of the expert it is named
    for (after a rebalance moved some)."""
    from safetensors import safe_open

    want = {}
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            want.update({k: st.get_tensor(k) for k in st.keys() if ".mlp.experts." in k})
    for moe in model.moe_layers():
        for e, mlp in moe.experts.items():
            key = f"model.layers.{moe.layer}.mlp.experts.{e}.down_proj.weight"
            if not torch.equal(mlp.down_proj.weight, want[key].float()):
                return False
    return True


def join_rank(rank: int, world: int, init: str, model_dir: str, flags: dict[str, Any],
              out: Any) -> None:
    """A worker's start-up as a rank of an EP group (services/worker.join_ep_group) with its
    own settings `flags`: reports ("ok", "") or ("EPError", its message)."""
    from pdserve.config import PrefillSettings
    from pdserve.engine.errors import EPError
    from pdserve.services.worker import join_ep_group

    settings = PrefillSettings(model=Path(model_dir), ep_size=world, ep_rank=rank,
                               ep_group="g", dist_init=init, collective_timeout_s=30, **flags)
    try:
        join_ep_group(settings)
        out.put((rank, "ok", ""))
    except EPError as e:
        out.put((rank, "EPError", str(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
