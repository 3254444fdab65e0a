"""What prefill and decode workers share: model loading from settings, their identity, the
checks of a prompt, and serving (registration, metrics, ready file, draining)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

import grpc
import torch
from prometheus_client import CollectorRegistry

from pdserve.cache.block_hash import hash_namespace
from pdserve.config import DecodeSettings, PrefillSettings
from pdserve.engine.ep.moe import ExpertParallel
from pdserve.engine.errors import EPError
from pdserve.engine.hooks import EngineHooks
from pdserve.engine.layout import parse_dtype
from pdserve.engine.loader import LoadedModel, load_model
from pdserve.engine.sampling import SamplingParams
from pdserve.metrics import serve_metrics
from pdserve.services.cpu_share import cgroup_cpu_limit
from pdserve.services.errors import InvalidArgument
from pdserve.services.registration import Registrations
from pdserve.services.server import (
    SERVING,
    create_server,
    serve_until_signal,
    wait_until_idle,
    write_ready_file,
)
from pdserve.startup import PHASES, phase
from pdserve.v1 import common_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")
WorkerSettings = PrefillSettings | DecodeSettings
DRAIN_SETTLE_S = 0.3  # after leaving rotation, the time for the load report to reach the gateway


def sampling_from_proto(sp: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(max_tokens=sp.max_tokens, temperature=sp.temperature, seed=sp.seed,
                          stop_token_ids=frozenset(sp.stop_token_ids), top_k=sp.top_k,
                          top_p=sp.top_p if 0.0 < sp.top_p < 1.0 else 1.0, logprobs=sp.logprobs,
                          position_offset=sp.position_offset, min_tokens=sp.min_tokens)


def check_prompt(ids: Iterable[int], vocab_size: int, field: str = "prompt_token_ids") -> None:
    """InvalidArgument naming the field: an empty prompt, or a token outside the vocabulary."""
    ids = list(ids)
    if not ids:
        raise InvalidArgument(f"{field}: empty")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument(f"{field}: token id {bad} outside the vocabulary [0, {vocab_size})")


def threads_within_cpu_limit() -> int:
    """With no --threads: torch's default (the cores it sees), or the cgroup's CPU limit where
    that is fewer (services/cpu_share.py); 0 = leave torch's default."""
    limit = cgroup_cpu_limit()
    if limit is None or limit >= torch.get_num_threads():
        return 0
    log.info("threads from the CPU limit", extra={"threads": limit,
                                                  "cores": torch.get_num_threads()})
    return max(1, limit)


def load_for(settings: WorkerSettings, decode_only: bool = False) -> LoadedModel:
    """The worker's model; `decode_only` for a decode worker (engine/loader.py)."""
    threads = settings.threads or threads_within_cpu_limit()
    if threads:
        torch.set_num_threads(threads)
    ep = join_ep_group(settings) if settings.ep_size > 1 else None
    return load_model(settings.model, device=settings.device, dtype=parse_dtype(settings.dtype),
                      block_tokens=settings.block_tokens, progress=sys.stderr.isatty(),
                      backend=settings.backend, ep=ep, batch_invariant=settings.batch_invariant,
                      decode_only=decode_only, kv_dtype=None if settings.kv_dtype == "auto"
                      else parse_dtype(settings.kv_dtype),
                      prefill_attention=settings.prefill_attention,
                      decode_attention=settings.decode_attention)


def join_ep_group(settings: WorkerSettings) -> ExpertParallel:
    """Joins the worker's EP group (torch.distributed, gloo; the collective timeout bounded)
    and lays out its expert slots: every rank computes the same default placement."""
    from datetime import timedelta

    import torch.distributed as dist

    from pdserve.engine.ep.comm import EPComm
    from pdserve.engine.ep.placement import SlotMap
    from pdserve.engine.hf_loader import load_hf_config
    from pdserve.engine.model_config import DeepseekV3Config

    model = settings.model
    cfg = load_hf_config(model) if model is not None and model.is_dir() else None
    if not isinstance(cfg, DeepseekV3Config) or not cfg.n_routed_experts:
        raise EPError(f"--ep-size {settings.ep_size}: expert parallelism needs a "
                      f"mixture-of-experts model (DeepSeek-V2/V3 directory), not {model}")
    slots = cfg.n_routed_experts + settings.redundant_experts
    if slots % settings.ep_size:
        raise EPError(f"--redundant-experts {settings.redundant_experts}: the "
                      f"{cfg.n_routed_experts} experts + redundant ones ({slots} slots) must "
                      f"split evenly over --ep-size {settings.ep_size}")
    log.info("joining EP group", extra={"group": settings.ep_group, "rank": settings.ep_rank,
                                        "size": settings.ep_size})
    try:
        dist.init_process_group("gloo", init_method=settings.dist_init, rank=settings.ep_rank,
                                world_size=settings.ep_size,
                                timeout=timedelta(seconds=settings.collective_timeout_s))
    except (RuntimeError, ValueError) as e:  # includes torch's DistStoreError
        raise EPError(f"--dist-init {settings.dist_init}: the group of {settings.ep_size} did "
                      f"not form: {e}") from None
    from pdserve.engine.ep.hooks import check_same_flags

    comm = EPComm()
    dispatch = settings.ep_dispatch_dtype
    cfg_name = model.name if model is not None else ""
    check_same_flags(comm, {  # settings whose collectives or arithmetic must match
        "--tbo": settings.tbo, "--tbo-min-tokens": str(settings.tbo_min_tokens),
        "--ep-dispatch-dtype": dispatch, "--redundant-experts": str(settings.redundant_experts),
        "--batch-invariant": str(settings.batch_invariant), "--model": cfg_name,
        "--eplb-interval-steps": str(settings.eplb_interval_steps)})
    # Two-batch overlap: the second micro-batch's exchanges on a group of their own.
    second = (EPComm(dist.new_group(list(range(settings.ep_size))), stats=comm.stats)
              if settings.tbo != "off" else None)
    ep = ExpertParallel(comm, SlotMap.default(cfg.moe_layers, cfg.num_hidden_layers,
                                              cfg.n_routed_experts, settings.ep_size,
                                              settings.redundant_experts),
                        second, None if dispatch == "model" else dispatch)
    epoch = torch.tensor([time.time_ns()], dtype=torch.long)  # rank 0's: this start's
    dist.broadcast(epoch, src=0)
    ep.group_epoch = int(epoch.item())
    return ep


def ep_hooks(settings: WorkerSettings, loaded: LoadedModel, inner: EngineHooks) -> EngineHooks:
    """The engine hooks of a worker: `inner`, under the EP step agreement for a rank of a group
    (whose collective failing ends the process: its group cannot go on without it)."""
    if loaded.ep is None:
        return inner
    from pdserve.engine.deepseek import DeepseekV3ForCausalLM
    from pdserve.engine.ep.eplb import ExpertReader, LiveEPLB
    from pdserve.engine.ep.hooks import EPHooks

    model = loaded.model
    assert isinstance(model, DeepseekV3ForCausalLM) and settings.model is not None
    eplb = (LiveEPLB(loaded.ep, model, settings.eplb_interval_steps,
                     ExpertReader(settings.model, parse_dtype(settings.dtype), loaded.backend))
            if settings.eplb_interval_steps else None)
    return EPHooks(loaded.ep, model, eplb, inner=inner, on_failure=_group_failed,
                   tbo=settings.tbo, tbo_min_tokens=settings.tbo_min_tokens)


def _group_failed(e: BaseException) -> None:
    log.critical("EP group collective failed; exiting", extra={"error": repr(e)})
    logging.shutdown()
    os._exit(70)


def in_passing_thread(fn: Callable[[], T]) -> T:
    """Runs fn in a thread that then exits, and returns its result.

    For torch work done once before an engine thread takes over (model load, pool allocation):
    OpenMP keeps a team of worker threads for every thread that ran a parallel region, and once
    a process has more OpenMP threads than cores, libgomp stops spinning between parallel
    regions and puts its workers to sleep after every one. Decode steps are thousands of small
    parallel regions, and waking the workers for each made them about 1.5x slower. A thread
    that exits takes its team with it, so the engine thread's team is the only one left.
    """
    box: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    t = threading.Thread(target=target, name="setup")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return box[0]


def new_epoch() -> int:
    """A restarted worker gets a new epoch; anything held for its old one is void."""
    return time.time_ns()


def advertised_address(settings: WorkerSettings, port: int) -> str:
    """host:port others use to reach this worker: --advertise-host, else --host, else (listening
    on every interface) this machine's hostname."""
    host = settings.advertise_host or settings.host
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def worker_info(role: str, settings: WorkerSettings, loaded: LoadedModel, address: str,
                epoch: int, total_pages: int) -> common_pb2.WorkerInfo:
    wid = settings.worker_id or f"{role}-{os.getpid()}"
    fp = loaded.layout.fingerprint()
    return common_pb2.WorkerInfo(
        worker_id=wid, role=role, address=address, epoch=epoch, model_id=loaded.model_id,
        layout_fingerprint=fp, hash_namespace=hash_namespace(loaded.model_id, fp),
        block_tokens=loaded.layout.block_tokens, total_pages=total_pages,
        max_context=loaded.max_context, vocab_size=loaded.config.vocab_size,
        ep_group=settings.ep_group if loaded.ep else "",
        ep_rank=loaded.ep.rank if loaded.ep else 0,
        ep_size=loaded.ep.comm.size if loaded.ep else 1,
        ep_epoch=loaded.ep.group_epoch if loaded.ep else 0,
    )


class ServedWorker(Protocol):
    """What `serve_worker` needs of a prefill or decode worker."""

    loaded: LoadedModel
    epoch: int
    draining: bool

    @property
    def num_pages(self) -> int: ...

    def report(self) -> common_pb2.LoadReport: ...


async def serve_worker(role: str, settings: WorkerSettings, worker: ServedWorker,
                       register: Callable[[grpc.aio.Server], None], service: str,
                       prom: CollectorRegistry, busy: Callable[[], bool],
                       cleanup: Callable[[], Awaitable[None]],
                       changed: asyncio.Event | None = None) -> None:
    """Serves a started worker until SIGTERM/SIGINT: its gRPC service on --port (health SERVING
    for "" and `service`), its load reports to the gateway (every interval, and at once when
    `changed` is set), its metrics, its ready file. On a signal: report draining, wait while
    `busy` (at most --drain-timeout-s), stop the server, then `cleanup`."""
    server, port, health = await create_server([register], [service], settings.host,
                                               settings.port)
    await health.set("", SERVING)
    await health.set(service, SERVING)
    info = worker_info(role, settings, worker.loaded, advertised_address(settings, port),
                       worker.epoch, worker.num_pages)
    stop = asyncio.Event()
    joins = Registrations(settings.gateway, settings.gateway_resolve_s, info, worker.report,
                          stop, changed)
    joiner = asyncio.create_task(joins.run())
    metrics_port = serve_metrics(prom, settings.host, settings.metrics_port)
    phase("serving")
    write_ready_file(settings.ready_file, port, worker_id=info.worker_id,
                     metrics_port=metrics_port, phases=PHASES)
    log.info(f"{role} serving", extra={"port": port, "worker_id": info.worker_id})

    async def drain() -> None:
        # Leave rotation first (the next report says so), then let accepted requests finish.
        worker.draining = True
        if changed is not None:
            changed.set()
        await wait_until_idle(busy, settings.drain_timeout_s, settle_s=DRAIN_SETTLE_S)

    async def stop_all() -> None:
        stop.set()
        joiner.cancel()
        await cleanup()

    await serve_until_signal(server, health, stop_all, drain=drain)
