"""`pdserve up`: the whole cluster on one machine, one process per service on loopback.

Start order: kvstore -> gateways -> prefill and decode workers (which join every gateway).
Ready when every gateway's overall health says SERVING. Stop order is the reverse, each with
SIGTERM (graceful: drain, then exit) and SIGKILL only after a grace period.

Supervision: every service dies with `pdserve up`, however `pdserve up` dies (the kernel's
parent-death signal, pdserve/supervise.py); a second `pdserve up` on the same data directory
fails at once naming it and the process holding it, and one on a port in use fails at the
gateway's start with the port's flag (no gRPC port is shared: SO_REUSEPORT is off).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.config import UpSettings
from pdserve.startup import summary
from pdserve.supervise import DirLock, supervised_env

# What `pdserve up` gives prefill workers' OpenMP threads (LocalCluster.start says why).
PREFILL_OMP_ENV = {"GOMP_SPINCOUNT": "10000"}


class ClusterError(RuntimeError):
    """A service failed to start; the message carries the tail of its log."""


class Service:
    def __init__(self, name: str, args: list[str], run_dir: Path, env: dict[str, str],
                 extra_args: Sequence[str] = ()) -> None:
        self.name = name
        self.base_args = list(args)  # what `restart` starts again; extra_args are one-off
        self.args = list(args) + list(extra_args)
        self.env = env
        self.ready_file = run_dir / f"{name}.ready.json"
        self.log_path = run_dir / f"{name}.log"
        self.ready_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        # Services with durable state shut down cleanly (SIGTERM) when `pdserve up` dies;
        # workers have none, and a drain would wait for requests nobody reads (SIGKILL).
        death = signal.SIGTERM if args[0] in ("gateway", "kvstore") else signal.SIGKILL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve", *self.args, "--ready-file", str(self.ready_file)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**env, **supervised_env(death)},
            start_new_session=True)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.phases: dict[str, float] = {}  # its start-up, from its ready file

    def poll_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise ClusterError(f"{self.name} exited with code {self.proc.returncode}:\n"
                               + self.log_tail())
        if self.ready_file.exists():
            ready = json.loads(self.ready_file.read_text())
            self.port, self.metrics_port = ready["port"], ready.get("metrics_port")
            self.phases = ready.get("phases") or {}
            return True
        return False

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class LocalCluster:
    def __init__(self, settings: UpSettings, progress: bool = True,
                 extra_env: dict[str, str] | None = None) -> None:
        self.s = settings
        self.progress = progress
        self.data_dir = settings.data_dir.resolve()
        self.run_dir = self.data_dir / "run"
        self.services: list[Service] = []
        self.gateway_address = ""  # the first gateway
        self.gateway_addresses: list[str] = []  # every gateway, once started
        self.http_url: str | None = None  # the first gateway's OpenAI-compatible API
        self.http_urls: list[str] = []
        self._lock: DirLock | None = None
        self.kvstore_address = ""
        self.env = {**os.environ, **(extra_env or {})}
        from pdserve.services.security import load_tls

        self.tls = load_tls(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file,
                            settings.tls_server_name)
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"):  # every service gets them
            if getattr(settings, name) is not None:
                self.env[f"PDSERVE_{name.upper()}"] = str(Path(getattr(settings, name)).resolve())
        self.env["PDSERVE_TLS_SERVER_NAME"] = settings.tls_server_name
        self.gateway_internal_address = ""

    def _say(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def _spawn(self, name: str, args: list[str], extra_args: Sequence[str] = (),
               env: dict[str, str] | None = None) -> Service:
        svc = Service(name, args, self.run_dir, env or self.env, extra_args)
        self.services.append(svc)
        return svc

    def _wait_ready(self, svcs: list[Service], deadline: float) -> None:
        pending = list(svcs)
        while pending:
            pending = [s for s in pending if not s.poll_ready()]
            if time.monotonic() > deadline:
                raise ClusterError("timed out starting " + ", ".join(s.name for s in pending))
            time.sleep(0.05)

    @property
    def gateway_names(self) -> list[str]:
        n = self.s.gateways
        return ["gateway"] if n == 1 else [f"gateway-{i}" for i in range(n)]

    def _gateway_ports(self) -> list[int]:
        """Consecutive ports from --port; with --port 0, free ones picked now (every gateway
        needs its peers' addresses before it starts)."""
        n = self.s.gateways
        if self.s.port:
            return [self.s.port + i for i in range(n)]
        return free_ports(n, self.s.host)

    def start(self) -> LocalCluster:
        # Before anything in the directory is touched: one `pdserve up` per data directory.
        self._lock = DirLock(self.data_dir, ".pdserve-up.lock", "--data-dir", "pdserve up")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        deadline = t0 + self.s.startup_timeout_s
        common = ["--log-level", self.s.log_level]
        if self.s.metrics:
            common += ["--metrics-port", "0"]
        model = ["--model", str(self.s.model)] if self.s.model else []
        threads = ["--threads", str(self.s.threads)] if self.s.threads else []
        threads += ["--backend", self.s.backend, "--kv-dtype", self.s.kv_dtype,
                    "--prefill-attention", self.s.prefill_attention,
                    "--decode-attention", self.s.decode_attention]
        if self.s.batch_invariant:
            threads.append("--batch-invariant")
        try:
            # Every service starts at once: the ports are chosen first, so each knows where
            # the others will be (workers join a gateway, and fetch from the store, as soon as
            # it listens); the workers' model load is the long pole.
            names = self.gateway_names
            mutual = self.tls is not None and self.tls.mutual
            host = "127.0.0.1" if self.s.host in ("0.0.0.0", "::") else self.s.host
            ports = self._gateway_ports()
            kv_port, *internal_ports = free_ports(1 + (len(names) if mutual else 0),
                                                  "127.0.0.1")
            self.kvstore_address = f"127.0.0.1:{kv_port}"
            self._say(f"starting the kvstore, {len(names)} gateway"
                      f"{'s' if len(names) > 1 else ''} and the workers ...")
            kv = self._spawn("kvstore", ["kvstore", "--port", str(kv_port), "--data-dir",
                                         str(self.data_dir), *common])
            peers = ",".join(f"{host}:{p}" for p in ports) if len(ports) > 1 else ""
            http_base = self.s.http_port
            gws = [self._spawn(name, [
                "gateway", "--host", self.s.host, "--port", str(port), "--http-port",
                str(http_base + i if http_base > 0 else http_base), "--gateway-id", name,
                *(["--peers", peers] if peers else []),
                "--kvstore", self.kvstore_address, "--internal-port",
                str(internal_ports[i] if mutual else 0),
                "--data-dir", str(self.data_dir), *model, *common])
                for i, (name, port) in enumerate(zip(names, ports))]
            self.gateway_addresses = [f"{host}:{p}" for p in ports]
            self.gateway_address = self.gateway_addresses[0]
            # With mutual TLS workers join on the gateways' internal ports.
            self.gateway_internal_address = ",".join(
                f"{host}:{p}" for p in (internal_ports if mutual else ports))
            # An EP group's ranks are the role's workers.
            n_prefill = self.s.prefill_ep if self.s.prefill_ep > 1 else self.s.num_prefill
            n_decode = self.s.decode_ep if self.s.decode_ep > 1 else self.s.num_decode
            workers = []
            # All workers share this machine's cores. Between two parallel regions a prefill
            # worker's OpenMP threads spin briefly, then sleep: a long spin (libgomp's default
            # 300,000) takes the cores decode needs once the step is over, no spin at all
            # (OMP_WAIT_POLICY=PASSIVE) costs a short prompt's step, hundreds of small
            # regions, a futex wake each (measured: a 64-token suffix over 1,984 cached tokens
            # 225 ms passive, 155 ms with this spin, 165 ms with the default). Settings the
            # user gave win (libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY, so a
            # user's policy means no spin count of ours).
            ours = {} if "OMP_WAIT_POLICY" in self.env else PREFILL_OMP_ENV
            prefill_env = {**ours, **self.env}
            # ... and take turns computing (services/cpu_turns.py).
            turns = (["--cpu-turns-path", str(self.run_dir / "cpu-turns")] if self.s.cpu_turns
                     else [])
            for i in range(n_prefill):
                workers.append(self._spawn(f"prefill-{i}", [
                    "prefill", "--port", "0", "--gateway", self.gateway_internal_address,
                    "--kvstore", self.kvstore_address, "--worker-id", f"prefill-{i}",
                    "--num-pages", str(self.s.prefill_pages), *model, *threads,
                    *self._ep_args("prefill", self.s.prefill_ep, i, turns), *common],
                    env=prefill_env))
            for i in range(n_decode):
                workers.append(self._spawn(f"decode-{i}", [
                    "decode", "--port", "0", "--gateway", self.gateway_internal_address,
                    "--worker-id", f"decode-{i}", "--num-pages", str(self.s.decode_pages),
                    *model, *threads, *self._ep_args("decode", self.s.decode_ep, i, turns),
                    *common]))
            self._wait_ready([kv, *gws, *workers], deadline)
            scheme = "https" if self.s.tls_cert_file else "http"
            for gw in gws:
                http = json.loads(gw.ready_file.read_text()).get("http_port")
                if http:
                    self.http_urls.append(f"{scheme}://{host}:{http}")
            self.http_url = self.http_urls[0] if self.http_urls else None
            self._wait_serving(deadline)
        except BaseException:
            self.stop()
            raise
        self._say("start-up, per service (pdserve/startup.py; KV pool size: --decode-pages, "
                  "--prefill-pages):")
        for svc in self.services:
            self._say(f"  {svc.name:<10} {summary(svc.phases)}")
        if self.http_urls:
            self._say("OpenAI-compatible API: " + ", ".join(f"{u}/v1" for u in self.http_urls))
        self._say(f"pdserve up: gateway{'s' if len(self.gateway_addresses) > 1 else ''} on "
                  f"{', '.join(self.gateway_addresses)} "
                  f"(ready in {time.monotonic() - t0:.1f} s, data in {self.data_dir})")
        if self.s.metrics:
            self._say("metrics: " + ", ".join(
                f"{s.name} http://127.0.0.1:{s.metrics_port}/metrics" for s in self.services))
        return self

    def _ep_args(self, role: str, size: int, rank: int, turns: list[str]) -> list[str]:
        """A worker's flags: its CPU turns (a group's rank 0 takes them for the group,
        engine/ep/hooks.py), and its rank of the role's EP group (rendezvous through a file of
        this start, made anew)."""
        if size == 1:
            return turns
        rendezvous = self.run_dir / f"ep-{role}.rendezvous"
        if rank == 0:
            rendezvous.unlink(missing_ok=True)
        threads = max(1, (os.cpu_count() or 1) // size)
        return [*turns, "--ep-size", str(size), "--ep-rank", str(rank), "--ep-group", role,
                "--dist-init", f"file://{rendezvous}", "--threads", str(threads),
                "--redundant-experts", str(self.s.redundant_experts),
                "--eplb-interval-steps", str(self.s.eplb_interval_steps),
                "--tbo", self.s.tbo, "--tbo-min-tokens", str(self.s.tbo_min_tokens),
                "--ep-dispatch-dtype", self.s.ep_dispatch_dtype]

    def metrics_urls(self) -> dict[str, str]:
        return {s.name: f"http://127.0.0.1:{s.metrics_port}/metrics"
                for s in self.services if s.metrics_port}

    def _wait_serving(self, deadline: float) -> None:
        for address in self.gateway_addresses:
            self.wait_gateway_serving(address, deadline)

    def wait_gateway_serving(self, address: str, deadline: float) -> None:
        """Waits until the gateway at `address` says SERVING (it has a prefill and a decode
        worker, and the store answered); ClusterError when a service died or at `deadline`."""
        from pdserve.services.security import sync_channel

        with sync_channel(address, self.tls) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                for s in self.services:
                    s.poll_ready()  # raises if a service died
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"gateway {address} never became SERVING")
                time.sleep(0.1)

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash would."""
        svc = self.service(name)
        svc.proc.kill()
        svc.wait(15)

    def restart(self, name: str, timeout_s: float = 300.0,
                extra_args: Sequence[str] = ()) -> Service:
        """Stops a service (SIGTERM; no-op if it is already dead) and starts it again with the
        same arguments plus `extra_args` (the kvstore and the gateway on the same ports, so
        their peers reconnect; workers as new processes, hence new epochs)."""
        old = self.service(name)
        internal = None
        if _tier(name) == 1 and old.ready_file.exists():
            internal = json.loads(old.ready_file.read_text()).get("internal_port")
        old.terminate()
        old.wait(30)
        self.services.remove(old)
        args = list(old.base_args)
        if _tier(name):
            args[args.index("--port") + 1] = str(old.port)
        if internal:
            args[args.index("--internal-port") + 1] = str(internal)
        svc = self._spawn(name, args, list(extra_args), env=old.env)
        self._wait_ready([svc], time.monotonic() + timeout_s)
        return svc

    def restart_kvstore(self, timeout_s: float = 60.0) -> None:
        self.restart("kvstore", timeout_s)

    def stop(self, grace_s: float = 15.0) -> None:
        # Workers first (they drain), then the gateways, then the store.
        for tier in (0, 1, 2):
            members = [s for s in self.services if _tier(s.name) == tier]
            for s in members:
                s.terminate()
            for s in members:
                s.wait(grace_s)
        self.services.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free now, below the kernel's ephemeral range where it can (a freed
    ephemeral port may be taken by an outgoing connection before its service binds it, and no
    pdserve port is shared: SO_REUSEPORT is off)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError):
        low = 0
    out: list[int] = []
    rng = random.Random()
    for _ in range(100 * n):
        if len(out) == n:
            return out
        port = rng.randrange(20_100, low) if low > 20_200 else 0
        with socket.socket() as sk:
            try:
                sk.bind((host, port))
            except OSError:
                continue
            port = sk.getsockname()[1]
        if port not in out:
            out.append(port)
    raise ClusterError(f"could not find {n} free ports on {host}")


def _tier(name: str) -> int:
    """Stop order: workers (0), gateways (1), the store (2)."""
    return 2 if name == "kvstore" else 1 if name.startswith("gateway") else 0


def run_up(settings: UpSettings) -> int:
    cluster = LocalCluster(settings)
    stop = {"now": False}

    def handler(signum: int, frame: FrameType | None) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    cluster.start()
    print(f"serving on {','.join(cluster.gateway_addresses)}; Ctrl-C stops", flush=True)
    try:
        while not stop["now"]:
            for s in list(cluster.services):
                if s.proc.poll() is None:
                    continue
                others = [g for g in cluster.services if g is not s
                          and g.name.startswith("gateway") and g.proc.poll() is None]
                if s.name.startswith("gateway") and others:
                    # The other gateways serve meanwhile; this one comes back on its port.
                    print(f"{s.name} exited ({s.proc.returncode}); restarting it",
                          file=sys.stderr, flush=True)
                    cluster.restart(s.name, timeout_s=settings.startup_timeout_s)
                    continue
                print(f"{s.name} exited ({s.proc.returncode}); stopping\n{s.log_tail()}",
                      file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        cluster.stop()
    return 0
