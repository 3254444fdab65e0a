"""Typed settings, one object per service, validated once at start-up.

Every field has a default, an environment variable (`PDSERVE_<FIELD>`) and a CLI flag
(`--field-name`); precedence is flag > environment > default. The field description is the
flag's help text.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Address = str  # "host:port"


def parse_addresses(value: str) -> list[tuple[str, int]]:
    """(host, port) of each entry of a comma-separated list of host:port (IPv6 hosts in
    brackets, returned without them); ValueError naming a bad entry, or an empty list."""
    out = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r} is not host:port")
        out.append((host.removeprefix("[").removesuffix("]"), int(port)))
    if not out:
        raise ValueError("empty, expected host:port (comma-separated)")
    return out


def check_addresses(value: str) -> str:
    """The settings' check of an address list: the list, normalised (ValueError otherwise)."""
    parse_addresses(value)
    return ",".join(x.strip() for x in value.split(",") if x.strip())


# Settings that the workers and `pdserve up` (which passes them on) both take.
BackendName = Literal["auto", "torch", "onednn", "cpu-kernels", "cpu-fused", "cuda-graphs"]
KvDtype = Literal["auto", "float32", "bfloat16", "float16"]
PrefillAttention = Literal["auto", "sdpa", "flex"]  # engine/backend.py, PREFILL_ATTENTION
DecodeAttention = Literal["auto", "gather", "paged"]  # engine/backend.py, DECODE_ATTENTION


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PDSERVE_", extra="forbid")

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "warning", description="log level (structured logs on stderr)")
    ready_file: Path | None = Field(
        None, description="write {port, pid} as JSON here once serving (used by `pdserve up`)")


class _Secured(_Base):
    tls_cert_file: Path | None = Field(None, description="PEM certificate: serve TLS (and, with "
                                       "--tls-ca-file, present it to peers)")
    tls_key_file: Path | None = Field(None, description="PEM private key of --tls-cert-file")
    tls_ca_file: Path | None = Field(None, description="PEM cluster CA: mutual TLS; internal "
                                     "ports accept only peers with a certificate it signed")
    tls_server_name: str = Field("pdserve-internal", min_length=1, max_length=253,
                                 description="name internal certificates are issued for "
                                 "(verified instead of host names and pod IPs)")


class _Served(_Secured):
    metrics_port: int = Field(-1, ge=-1, le=65535, description="Prometheus /metrics HTTP port "
                              "(0 = any free port, -1 = off)")


class _ModelSettings(_Served):
    model: Path | None = Field(
        None, description="model to serve: a GGUF file (default: SmolLM2-135M-Instruct)")
    device: str = Field("cpu", description="torch device: cpu or cuda[:N]")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype (and the KV cache's, see --kv-dtype)")
    kv_dtype: KvDtype = Field(
        "auto", description="KV cache dtype (auto = --dtype); float16 halves the KV pool, the "
        "store's blocks and the transfers, attention computing in float32 over the rounded "
        "values (llama.cpp's default cache type); the workers of a cluster must agree")
    prefill_attention: PrefillAttention = Field(
        "auto", description="how a step's prefill chunks attend (Llama models): sdpa = one "
        "call per sequence; flex = all chunks in one flex attention call (compiled on CUDA; "
        "eager, for checking, on CPU); auto = sdpa")
    decode_attention: DecodeAttention = Field(
        "auto", description="how decode rows attend (Llama models): gather = each group's "
        "pages copied, then SDPA (on CPU the C kernel reads them in place anyway); paged = a "
        "Triton kernel reads the pages in place (CUDA); auto = gather")
    block_tokens: int = Field(64, ge=1, le=4096, description="tokens per KV page / store block")
    threads: int = Field(0, ge=0, le=1024, description="torch CPU threads (0 = torch default)")
    backend: BackendName = Field(
        "auto", description="how the model runs, chosen once at load (engine/backend.py): auto "
        "takes the fastest the device allows; torch = plain torch; onednn = packed float32 "
        "weights; cpu-kernels = + decode products from GGUF blocks and decode attention in C; "
        "cpu-fused = + one C call per layer per decode step; cuda-graphs = decode steps "
        "replayed from CUDA graphs")
    cpu_turns_path: Path | None = Field(None, description="workers sharing one machine's cores: "
                                   "lock-file path (the same for all of them) through which "
                                   "they take turns computing, prefill first "
                                   "(services/cpu_turns.py; pdserve up sets it)")
    ep_size: int = Field(1, ge=1, le=1024, description="ranks of this worker's expert-parallel "
                         "group (1 = none); every rank holds the attention and shared weights "
                         "and its share of the expert slots (the model must be MoE)")
    ep_rank: int = Field(0, ge=0, description="this worker's rank in its EP group")
    ep_group: str = Field("", description="the EP group's name, the same on all its ranks")
    dist_init: str = Field("", description="the EP group's rendezvous: tcp://HOST:PORT or "
                           "file://PATH (torch.distributed init_method)")
    redundant_experts: int = Field(0, ge=0, le=65536, description="EP: expert slots beyond one "
                                   "per expert, for copies of hot experts")
    eplb_interval_steps: int = Field(0, ge=0, description="EP: rebalance the experts over the "
                                     "slots every this many group steps (0 = never)")
    collective_timeout_s: float = Field(30.0, gt=0, le=3600, description="EP: a collective that "
                                        "does not complete in this long ends the worker")
    tbo: Literal["off", "on", "auto"] = Field(
        "auto", description="EP: two-batch overlap, each step's tokens in two micro-batches, "
        "one's dispatch or combine in flight while the other computes (engine/ep/tbo.py); "
        "auto: when every working rank has --tbo-min-tokens or more")
    tbo_min_tokens: int = Field(1024, ge=2, description="EP, --tbo auto: the fewest tokens a "
                                "rank's step has for the group to overlap it (on CPU over "
                                "gloo it paid from about 1024, bench/results/tbo-cpu.md)")
    ep_dispatch_dtype: Literal["model", "fp8", "bf16", "fp32"] = Field(
        "model", description="EP: how dispatched rows travel: the model's dtype (exact against "
        "one process), fp8 (e4m3, one scale per token per 128 channels, DeepSeek's format; "
        "combine in bf16, fp32 for a float32 model), bf16, fp32")
    batch_invariant: bool = Field(False, description="every token's result the same bits "
                                  "whatever else shares its step (fixed-tile products and "
                                  "attention, engine/invariant.py; slower; DeepSeek on CPU)")

    @model_validator(mode="after")
    def _ep_group(self) -> _ModelSettings:
        if self.ep_size == 1:
            return self
        if self.ep_rank >= self.ep_size:
            raise ValueError(f"ep_rank {self.ep_rank} must be below ep_size {self.ep_size}")
        if not self.dist_init.startswith(("tcp://", "file://")):
            raise ValueError("dist_init: an EP group needs its rendezvous, tcp://HOST:PORT or "
                             f"file://PATH (got {self.dist_init!r})")
        if not self.ep_group:
            raise ValueError("ep_group: an EP group needs a name")
        return self


class KVStoreSettings(_Served):
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(50060, ge=0, le=65535, description="gRPC port (0 = any free port)")
    data_dir: Path = Field(Path("data"), description="directory holding all state")
    sync: Literal["every_write", "interval", "off"] = Field(
        "every_write", description="WAL sync policy for block writes")
    sync_interval_ms: int = Field(100, ge=1, le=60000, description="WAL sync period for 'interval'")
    capacity_bytes: int = Field(0, ge=0, description="block byte budget (0 = unbounded)")
    high_watermark: float = Field(0.95, gt=0, le=1,
                                  description="evict above this share of capacity")
    low_watermark: float = Field(0.85, gt=0, le=1, description="evict down to this share")
    max_age_s: float = Field(0.0, ge=0, description="expire blocks unused this long (0 = never)")
    nixl_staging_mb: int = Field(
        256, ge=0, le=1 << 20, description="NIXL staging buffer for bulk block reads by "
        "one-sided READ (0 = off: blocks go through gRPC only)")
    stage_lease_s: float = Field(10.0, gt=0, le=3600, description="staged blocks not released "
                                 "by their reader are dropped after this long")
    stage_in_place: bool = Field(True, description="staged blocks are READ where they lie "
                                 "(segment files mapped and registered with NIXL), not "
                                 "copied into the staging buffer first")


class _Worker(_ModelSettings):
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 = any free port)")
    gateway: str = Field("127.0.0.1:50051", description="gateways to register with: "
                         "host:port, comma-separated, where a host name that resolves to "
                         "several addresses (a headless Service) is one gateway per address, "
                         "re-resolved every --gateway-resolve-s")
    gateway_resolve_s: float = Field(5.0, gt=0, le=3600, description="look up the "
                                     "--gateway names again this often (gateways that appear "
                                     "get this worker's registration at once)")
    advertise_host: str = Field("", description="host the gateway and peers use to reach this "
                                "worker (default: --host, or the hostname when --host is "
                                "0.0.0.0); on Kubernetes, the pod IP")

    @field_validator("gateway")
    @classmethod
    def _gateways(cls, v: str) -> str:
        return check_addresses(v)


class PrefillSettings(_Worker):
    kvstore: str = Field("127.0.0.1:50060", description="kvstore shard addresses, comma-separated "
                         "('' = no store)")
    num_pages: int = Field(256, ge=1, description="KV pages in this worker's pool")
    prefill_chunk_tokens: int = Field(
        2048, ge=16, description="token budget of one prefill step, over all its requests")
    prefill_batch_wait_ms: float = Field(
        20.0, ge=0, le=1000, description="an idle worker given a prompt waits up to this long "
        "for more to batch with it (a burst is then prefilled in one step, not one alone "
        "first); it stops waiting once a step's token budget is queued")
    prefill_slack: float = Field(
        3.0, ge=0, le=1000, description="prompts (and pipeline stages) are computed earliest "
        "deadline first, a prompt's deadline being its arrival plus this many times its own "
        "prefill time: short prompts pass long ones, each long one only for so long (0 = "
        "first come first served)")
    prefill_defer_share: float = Field(
        0.02, ge=0, le=1, description="overloaded (the earliest-due prompt would end more than "
        "--prefill-defer-lateness-s after its deadline), a worker defers its longest prompt "
        "not yet begun that takes that long or more itself, at most this share of the prompts "
        "it admits (0 = never): it goes after the others until it has waited "
        "--prefill-defer-wait-s since its arrival, then first")
    prefill_defer_lateness_s: float = Field(
        5.0, ge=0, le=86400, description="how late the earliest-due prompt would end before a "
        "worker defers its longest prompt (see --prefill-defer-share)")
    prefill_defer_wait_s: float = Field(
        100.0, gt=0, le=86400, description="a deferred prompt goes first once it has waited "
        "this long since its arrival (see --prefill-defer-share)")
    kvstore_timeout_s: float = Field(2.0, gt=0, description="deadline of kvstore calls")
    kv_fetch_layer_groups: int = Field(
        4, ge=1, le=1024, description="cached blocks are fetched in this many layer groups "
        "while the uncached part computes, each layer waiting only for its own group "
        "(1 = whole blocks, all loaded before computing)")
    kv_fetch: Literal["nixl", "grpc"] = Field(
        "nixl", description="how cached blocks come from the kvstore: one-sided NIXL READs "
        "from its staging buffer (the gRPC stream where a store cannot stage), or the gRPC "
        "stream only")
    kv_read_lanes: int = Field(
        2, ge=0, le=16, description="NIXL agents of their own, each on a thread of its own, "
        "that READ cached blocks from the kvstore and hash them, side by side where the "
        "forward waits (whole blocks, layer group 0), one where it computes meanwhile (0 = "
        "the worker's own agent READs, on its event loop)")
    transfer_timeout_s: float = Field(30.0, gt=0, description="deadline of one KV transfer")
    worker_id: str = Field("", description="worker id (default: prefill-<pid>)")
    drain_timeout_s: float = Field(60.0, ge=0, description="on SIGTERM, wait this long for "
                                   "queued prefills to finish before stopping")


class DecodeSettings(_Worker):
    num_pages: int = Field(512, ge=1, description="KV pages in this worker's pool")
    max_batch: int = Field(64, ge=1, description="most requests decoded in one step")
    lease_s: float = Field(60.0, gt=0, description="free reserved pages if no KV lands by then")
    quarantine_s: float = Field(60.0, ge=0, description="pages of a reservation that ended "
                                "before its KV landed are reused only this long after the lease "
                                "(keep it above the prefill's --transfer-timeout-s)")
    worker_id: str = Field("", description="worker id (default: decode-<pid>)")
    drain_timeout_s: float = Field(60.0, ge=0, description="on SIGTERM, wait this long for "
                                   "running requests to finish before stopping")
    adapt_threads: bool = Field(True, description="step with fewer OpenMP threads while other "
                                "work holds the cores: when the team waits for cores, a trial "
                                "with fewer, kept if the steps get faster; probes back up; "
                                "off with --batch-invariant (services/cpu_share.py)")


class GatewaySettings(_Served):
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(50051, ge=0, le=65535, description="public gRPC port (0 = any free port)")
    gateway_id: str = Field("", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                            description="this gateway's name in the ledger (its `gateway` "
                            "column, and its segment directory DATA_DIR/ledger/<table>/<id>); "
                            "'' = the host name (on Kubernetes, the pod name)")
    peers: str = Field("", description="the other gateways (host:port, comma-separated, or a "
                       "name resolving to every gateway; this one may be among them): an Abort "
                       "for a request this gateway does not hold is forwarded to them")

    http_port: int = Field(8000, ge=-1, le=65535, description="OpenAI-compatible HTTP API port "
                           "(/v1/chat/completions, /v1/completions, /v1/models, /health, "
                           "/metrics; 0 = any free port, -1 = off); TLS with the same files")
    kvstore: str = Field("127.0.0.1:50060", description="kvstore shard addresses, comma-separated "
                         "('' = no store)")
    model: Path | None = Field(None, description="model whose tokenizer serves text prompts")
    lookup_timeout_s: float = Field(1.0, gt=0, description="deadline of a kvstore Lookup")
    worker_timeout_s: float = Field(3.0, gt=0, description="drop a worker silent this long")
    rpc_timeout_s: float = Field(120.0, gt=0, description="deadline of internal calls")
    drain_timeout_s: float = Field(25.0, ge=0, description="on SIGTERM, out of readiness on "
                                   "both ports, wait this long for the requests in flight "
                                   "(gRPC and HTTP) to finish before stopping")
    data_dir: Path = Field(Path("data"), description="directory holding the request ledger "
                           "(DATA_DIR/ledger)")
    ledger: bool = Field(True, description="write one ledger row per request")
    ledger_flush_records: int = Field(256, ge=1, le=1_000_000, description="write a ledger "
                                      "segment once this many rows wait (at most this many, or "
                                      "--ledger-flush-s of rows, are lost on SIGKILL)")
    ledger_flush_s: float = Field(1.0, gt=0, le=3600, description="write waiting ledger rows at "
                                  "least this often")
    ledger_max_pending: int = Field(100_000, ge=1, description="rows held in memory at most; "
                                    "beyond, rows are dropped and counted")
    worker_sample_s: float = Field(10.0, gt=0, description="record every worker's load in the "
                                   "ledger this often (worker-hours, busy workers)")
    internal_port: int = Field(50052, ge=0, le=65535, description="with mutual TLS: port of the "
                               "internal server workers join (needs the cluster credential); "
                               "0 = any free port")
    auth_tokens_file: Path | None = Field(None, description="JSON bearer-token table "
                                          "(token -> tenant); requests without a known token "
                                          "are UNAUTHENTICATED")
    auth_tokens: str = Field("", description="the token table as JSON (environment only)",
                             json_schema_extra={"env_only": True})
    max_prompt_tokens: int = Field(0, ge=0, description="longest prompt accepted, in tokens "
                                   "(0 = the model's context)")
    max_tokens_limit: int = Field(0, ge=0, description="largest max_tokens accepted "
                                  "(0 = the model's context)")
    max_message_bytes: int = Field(4 << 20, ge=1024, le=1 << 30, description="largest request "
                                   "message on the public port")
    max_streams_per_client: int = Field(64, ge=0, description="concurrent Generate streams per "
                                        "client (tenant, or peer address without auth; 0 = no "
                                        "limit)")
    rate_limit_rps: float = Field(0.0, ge=0, description="requests per second per client "
                                  "(token bucket; 0 = no limit)")
    rate_limit_burst: int = Field(20, ge=1, description="requests a client may send at once "
                                  "above --rate-limit-rps")
    pipeline_min_tokens: int = Field(16_384, ge=0, description="prefill a prompt with at "
                                     "least this many uncached tokens as a pipeline over "
                                     "several prefill workers, each running some of the layers, "
                                     "when that evens out their load (0 = never)")
    pipeline_idle_tokens: int = Field(512, ge=0, description="prefill a prompt with at "
                                      "least this many (and fewer than --pipeline-min-tokens) "
                                      "uncached tokens as a pipeline over the prefill workers "
                                      "where its first token comes soonest, by their queues, "
                                      "when that beats one worker (0 = never)")
    pipeline_max_stages: int = Field(8, ge=2, le=64, description="prefill workers in one "
                                     "pipeline at most (each stage adds a chunk of latency; a "
                                     "model of L layers uses at most L)")
    prefix_wait_tokens: int = Field(512, ge=0, description="a request whose next prompt "
                                    "blocks past the KV store's another request is computing "
                                    "now, at least this many tokens of them, waits for that "
                                    "request's prefill and uses its blocks instead of computing "
                                    "them again (0 = never)")
    prefix_wait_s: float = Field(30.0, gt=0, description="the longest such a wait lasts")
    prefill_retries: int = Field(1, ge=0, le=8, description="when a prefill worker fails or "
                                 "dies, retry the request on another one this many times")
    migrate: bool = Field(False, description="when a decode worker dies mid-stream, resume on "
                          "another one (re-prefill prompt + tokens sent) instead of failing "
                          "with UNAVAILABLE")
    migrate_retries: int = Field(2, ge=1, le=8, description="migrations per request at most")

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: str) -> str:
        return check_addresses(v) if v.strip() else ""

    @model_validator(mode="after")
    def _ledger_bounds(self) -> GatewaySettings:
        if self.ledger_max_pending < self.ledger_flush_records:
            raise ValueError(f"--ledger-max-pending (PDSERVE_LEDGER_MAX_PENDING) "
                             f"{self.ledger_max_pending} must be >= --ledger-flush-records "
                             f"(PDSERVE_LEDGER_FLUSH_RECORDS) {self.ledger_flush_records}")
        return self


class UpSettings(_Secured):
    host: str = Field("127.0.0.1", description="gateway listen address")
    port: int = Field(50051, ge=0, le=65535, description="gateway port, the first of "
                      "--gateways consecutive ones (0 = any free ports)")
    http_port: int = Field(8000, ge=-1, le=65535, description="the gateways' OpenAI-compatible "
                           "HTTP port, the first of consecutive ones (0 = any free port, "
                           "-1 = off)")
    gateways: int = Field(1, ge=1, le=16, description="gateways, each routing on its own view "
                          "of every worker (every worker registers with all of them)")
    data_dir: Path = Field(Path("data"), description="directory holding all state")
    model: Path | None = Field(None, description="model to serve (default: SmolLM2-135M-Instruct)")
    num_prefill: int = Field(1, ge=1, le=64, description="prefill workers")
    num_decode: int = Field(1, ge=1, le=64, description="decode workers")
    decode_pages: int = Field(512, ge=1, description="KV pages per decode worker")
    prefill_pages: int = Field(256, ge=1, description="KV pages per prefill worker")
    threads: int = Field(0, ge=0, le=1024, description="torch threads per worker (0 = default)")
    backend: BackendName = Field(
        "auto", description="the workers' execution backend (see `pdserve prefill --help`)")
    kv_dtype: KvDtype = Field(
        "auto", description="the workers' KV cache dtype (see `pdserve prefill --help`)")
    prefill_attention: PrefillAttention = Field(
        "auto", description="the workers' prefill attention (see `pdserve prefill --help`)")
    decode_attention: DecodeAttention = Field(
        "auto", description="the workers' decode attention (see `pdserve decode --help`)")
    startup_timeout_s: float = Field(300.0, gt=0, description="give up starting after this")
    metrics: bool = Field(True, description="serve Prometheus /metrics from every service, "
                          "each on a free port (listed at start-up)")
    prefill_ep: int = Field(1, ge=1, le=64, description="prefill workers form one expert-"
                            "parallel group of this many ranks (MoE models; replaces "
                            "--num-prefill)")
    decode_ep: int = Field(1, ge=1, le=64, description="decode workers form one expert-parallel "
                           "group of this many ranks (MoE models; replaces --num-decode)")
    redundant_experts: int = Field(0, ge=0, le=65536, description="EP groups: redundant expert "
                                   "slots")
    eplb_interval_steps: int = Field(0, ge=0, description="EP groups: rebalance the experts "
                                     "every this many steps (0 = never)")
    tbo: Literal["off", "on", "auto"] = Field("auto", description="EP groups: two-batch "
                                              "overlap (see `pdserve prefill --help`)")
    tbo_min_tokens: int = Field(1024, ge=2, description="EP groups, --tbo auto: the fewest "
                                "tokens per rank to overlap a step")
    ep_dispatch_dtype: Literal["model", "fp8", "bf16", "fp32"] = Field(
        "model", description="EP groups: how dispatched rows travel")
    batch_invariant: bool = Field(False, description="the workers compute every token the "
                                  "same bits whatever shares its step (DeepSeek on CPU)")
    cpu_turns: bool = Field(True, description="the workers, all on this machine, take turns "
                            "computing (one step at a time, prefill first, as one engine "
                            "would) instead of oversubscribing its cores")


ServiceSettings = GatewaySettings | PrefillSettings | DecodeSettings | KVStoreSettings
AnySettings = ServiceSettings | UpSettings


def add_flags(parser: argparse.ArgumentParser, cls: type[BaseSettings]) -> None:
    for name, field in cls.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("env_only"):  # secrets: never on a command line
            continue
        flag = "--" + name.replace("_", "-")
        help_ = f"{field.description} [env PDSERVE_{name.upper()}, default {field.default!r}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_)


class SettingsError(Exception):
    """A bad setting; the message names it."""


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], args: argparse.Namespace | None = None,
                  **overrides: Any) -> S:
    values = {k: v for k, v in vars(args or argparse.Namespace()).items()
              if k in cls.model_fields and v is not None}
    values.update(overrides)
    try:
        return cls(**values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            if not err["loc"]:  # a check across settings; its message names them
                lines.append(err["msg"].removeprefix("Value error, "))
                continue
            name = str(err["loc"][0])
            lines.append(f"--{name.replace('_', '-')} (PDSERVE_{name.upper()}): {err['msg']}"
                         f" (got {err.get('input')!r})")
        raise SettingsError("invalid setting: " + "; ".join(lines)) from None
