"""Renders the kustomize overlays and runs a rendered overlay's workloads as local processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdserve.cluster import free_ports

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


@dataclass
class LocalPod:
    workload: str
    argv: list[str]
    env: dict[str, str]
    ports: dict[int, int]          # containerPort -> local port
    readiness: tuple[int, str]     # (local port, gRPC health service)
    liveness: tuple[int, str]
    pod: str = ""                  # the pod's name (workload-<i>)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    extra: dict = field(default_factory=dict)


def local_pods(docs: list[dict], workdir: Path) -> list[LocalPod]:
    """Each workload's pods (its replicas) as local processes, one container each: the rendered
    command, arguments and environment (ConfigMap values included), every container port a
    free local port, Service host names mapped to 127.0.0.1 (a headless Service's name to
    every pod of it, comma-separated, as its DNS name resolves to all of them; `pod-i.svc` to
    that pod), volumes to directories under `workdir/<pod name>`."""
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in of_kind(docs, "ConfigMap")}
    workloads = of_kind(docs, *WORKLOADS)
    replicas = {w["metadata"]["name"]: [f"{w['metadata']['name']}-{i}"
                                        for i in range(w["spec"].get("replicas", 1))]
                for w in workloads}
    keys = [(pod, p["containerPort"])
            for w in workloads for pod in replicas[w["metadata"]["name"]]
            for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
    ports = dict(zip(keys, free_ports(len(keys), "0.0.0.0")))
    services: dict[str, dict[int, list[int]]] = {}
    for s in of_kind(docs, "Service"):
        [w] = [w for w in workloads if selects(s["spec"]["selector"], pod_labels(w))]
        c = w["spec"]["template"]["spec"]["containers"][0]
        by_name = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        pods_of = replicas[w["metadata"]["name"]]
        if s["spec"].get("clusterIP") != "None":
            pods_of = pods_of[:1]  # a ClusterIP Service: one address (kube-proxy picks a pod)
        services[s["metadata"]["name"]] = {
            sp["port"]: [ports[(pod, by_name.get(sp.get("targetPort"),
                                                 sp.get("targetPort", sp["port"])))]
                         for pod in pods_of]
            for sp in s["spec"]["ports"]}

    def map_hosts(value: str) -> str:
        def sub(m: re.Match) -> str:
            labels, port = m[1].split("."), int(m[2])
            if len(labels) > 1 and (labels[0], port) in ports:  # "pod-0.headless-svc"
                return f"127.0.0.1:{ports[(labels[0], port)]}"
            for name in labels[:1]:  # "svc", "svc.ns.svc.cluster.local"
                if name in services and port in services[name]:
                    return ",".join(f"127.0.0.1:{p}" for p in services[name][port])
            return m[0]
        return re.sub(r"\b([a-z0-9][a-z0-9.-]*):(\d+)\b", sub, value)

    pods = []
    for w in workloads:
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        assert len(spec["containers"]) == 1, name
        c = spec["containers"][0]
        for pod in replicas[name]:
            pods.append(_local_pod(name, pod, c, configmaps, ports, map_hosts, workdir))
    return pods


def _local_pod(name: str, pod: str, c: dict, configmaps: dict, ports: dict,
               map_hosts: Any, workdir: Path) -> LocalPod:
    mounts = {m["mountPath"]: workdir / pod / m["name"] for m in c.get("volumeMounts", [])}
    for d in mounts.values():
        d.mkdir(parents=True, exist_ok=True)
    own = {p["containerPort"]: ports[(pod, p["containerPort"])] for p in c.get("ports", [])}

    def resolve(value: str) -> str:
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
                                  "metadata.name": pod}[ref["fieldRef"]["fieldPath"]]
            else:
                k = ref["configMapKeyRef"]
                env[e["name"]] = configmaps[k["name"]][k["key"]]
    env = {k: resolve(v) for k, v in env.items()}
    cmd = list(c.get("command", [])) + list(c.get("args", []))
    assert cmd[0] == "pdserve", cmd  # the image's entry point is the pdserve CLI
    exe = Path(sys.executable).parent / "pdserve"
    argv = ([str(exe)] if exe.exists() else [sys.executable, "-m", "pdserve"]) + [
        resolve(a) for a in cmd[1:]]

    def probe(kind: str) -> tuple[int, str]:
        g = c[kind]["grpc"]
        return own[g["port"]], g.get("service", "")

    return LocalPod(name, argv, env, own, probe("readinessProbe"), probe("livenessProbe"),
                    pod=pod)


def start(pods: list[LocalPod], workdir: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    for p in pods:
        p.log = workdir / f"{p.pod}.log"
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
