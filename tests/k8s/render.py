"""Renders the kustomize overlays and runs a rendered overlay's workloads as local processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
WORKLOADS = ("Deployment", "StatefulSet")


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize) is needed to render k8s/: install Debian's kubectl"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def of_kind(docs: list[dict], *kinds: str) -> list[dict]:
    return [d for d in docs if d["kind"] in kinds]


def selects(selector: dict, labels: dict) -> bool:
    """matchLabels semantics (and a bare label map, as Services use)."""
    match = selector.get("matchLabels", selector) if "matchExpressions" not in selector else None
    assert match is not None, "matchExpressions are not used in our manifests"
    return all(labels.get(k) == v for k, v in match.items())


def pod_labels(w: dict) -> dict:
    return w["spec"]["template"]["metadata"]["labels"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalPod:
    workload: str
    argv: list[str]
    env: dict[str, str]
    ports: dict[int, int]          # containerPort -> local port
    readiness: tuple[int, str]     # (local port, gRPC health service)
    liveness: tuple[int, str]
    proc: subprocess.Popen | None = None
    log: Path | None = None
    extra: dict = field(default_factory=dict)


def local_pods(docs: list[dict], workdir: Path) -> list[LocalPod]:
    """Each workload's single container as a local process: the rendered command, arguments and
    environment (ConfigMap values included), Service host names mapped to 127.0.0.1 and every
    container port to a free local port, volumes to directories under `workdir`."""
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in of_kind(docs, "ConfigMap")}
    workloads = of_kind(docs, *WORKLOADS)
    ports = {(w["metadata"]["name"], p["containerPort"]): free_port()
             for w in workloads for c in w["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    services = {}
    for s in of_kind(docs, "Service"):
        [w] = [w for w in workloads if selects(s["spec"]["selector"], pod_labels(w))]
        c = w["spec"]["template"]["spec"]["containers"][0]
        by_name = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        services[s["metadata"]["name"]] = {
            sp["port"]: ports[(w["metadata"]["name"],
                               by_name.get(sp.get("targetPort"), sp.get("targetPort", sp["port"])))]
            for sp in s["spec"]["ports"]}

    def map_hosts(value: str) -> str:
        def sub(m: re.Match) -> str:
            labels, port = m[1].split("."), int(m[2])
            for name in labels[:2]:  # "svc", "svc.ns.svc.cluster.local", "pod-0.headless-svc"
                if name in services and port in services[name]:
                    return f"127.0.0.1:{services[name][port]}"
            return m[0]
        return re.sub(r"\b([a-z0-9][a-z0-9.-]*):(\d+)\b", sub, value)

    pods = []
    for w in workloads:
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        assert len(spec["containers"]) == 1, name
        c = spec["containers"][0]
        mounts = {m["mountPath"]: workdir / name / m["name"] for m in c.get("volumeMounts", [])}
        for d in mounts.values():
            d.mkdir(parents=True, exist_ok=True)
        own = {p["containerPort"]: ports[(name, p["containerPort"])] for p in c.get("ports", [])}

        def resolve(value: str, own: dict[int, int] = own,
                    mounts: dict[str, Path] = mounts) -> str:
            if value.isdigit() and int(value) in own:  # a listen port of this container
                return str(own[int(value)])
            for path, local in mounts.items():
                if value == path or value.startswith(path + "/"):
                    return str(local) + value[len(path):]
            return map_hosts(value)

        env: dict[str, str] = {}
        for src in c.get("envFrom", []):
            env.update(configmaps[src["configMapRef"]["name"]])
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]
                if "fieldRef" in ref:
                    env[e["name"]] = {"status.podIP": "127.0.0.1",
                                      "metadata.name": f"{name}-0"}[ref["fieldRef"]["fieldPath"]]
                else:
                    k = ref["configMapKeyRef"]
                    env[e["name"]] = configmaps[k["name"]][k["key"]]
        env = {k: resolve(v) for k, v in env.items()}
        cmd = list(c.get("command", [])) + list(c.get("args", []))
        assert cmd[0] == "pdserve", cmd  # the image's entry point is the pdserve CLI
        exe = Path(sys.executable).parent / "pdserve"
        argv = ([str(exe)] if exe.exists() else [sys.executable, "-m", "pdserve"]) + [
            resolve(a) for a in cmd[1:]]

        def probe(kind: str, c: dict[str, Any] = c,
                  own: dict[int, int] = own) -> tuple[int, str]:
            g = c[kind]["grpc"]
            return own[g["port"]], g.get("service", "")

        pods.append(LocalPod(name, argv, env, own, probe("readinessProbe"),
                             probe("livenessProbe")))
    return pods


def start(pods: list[LocalPod], workdir: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    for p in pods:
        p.log = workdir / f"{p.workload}.log"
        with open(p.log, "wb") as log:
            p.proc = subprocess.Popen(p.argv, env={**base, **p.env}, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)


def stop(pods: list[LocalPod]) -> None:
    for p in pods:
        if p.proc and p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in pods:
        if p.proc:
            try:
                p.proc.wait(30)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
