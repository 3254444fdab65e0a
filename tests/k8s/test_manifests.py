"""Kubernetes manifests: both overlays render, validate against the Kubernetes schema, follow
our policies, and the dev overlay's containers really start the services."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.client import Client
from pdserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.helpers import wait_until
from tests.k8s.render import (
    WORKLOADS,
    local_pods,
    of_kind,
    pod_labels,
    render,
    selects,
    start,
    stop,
)

pytestmark = pytest.mark.integration  # starts processes

K8S_VERSION = "1.35.0"  # a current release; kubernetes-validate ships its schemas offline
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["dev", "gpu"])
def overlay(request):
    return request.param, render(request.param)


def containers(w: dict) -> list[dict]:
    return w["spec"]["template"]["spec"]["containers"]


def test_every_rendered_object_validates_against_the_schema(overlay):
    name, docs = overlay
    assert len(docs) >= 15
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    # The check can fail: a misspelled field is refused.
    bad = copy.deepcopy(of_kind(docs, "Deployment")[0])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_every_container_has_resources_probes_and_a_locked_down_security_context(overlay):
    _, docs = overlay
    workloads = of_kind(docs, *WORKLOADS)
    assert {w["metadata"]["name"] for w in workloads} == {
        "pdserve-gateway", "pdserve-prefill", "pdserve-decode", "pdserve-kvstore"}
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, w["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert not pod.get("hostNetwork") and not pod.get("hostPID")
        for c in containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert "grpc" in c[probe], (where, probe)
            assert c["livenessProbe"]["grpc"]["service"] == "liveness"
            assert c["readinessProbe"]["grpc"].get("service", "") == ""
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert "ALL" in sc["capabilities"]["drop"]
            assert "preStop" in c["lifecycle"]
            assert not any("hostPort" in p for p in c.get("ports", []))
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts  # the only writable places are volumes
        if w["metadata"]["name"] in ("pdserve-prefill", "pdserve-decode"):
            env = {e["name"]: e.get("value") for e in containers(w)[0]["env"]}
            drain = float(env["PDSERVE_DRAIN_TIMEOUT_S"])
            assert pod["terminationGracePeriodSeconds"] > drain + 10  # drain, then exit
            assert "/dev/shm" in {m["mountPath"] for m in containers(w)[0]["volumeMounts"]}


def test_every_workload_has_a_pdb_and_network_policies_select_every_pod(overlay):
    _, docs = overlay
    pdbs = of_kind(docs, "PodDisruptionBudget")
    policies = of_kind(docs, "NetworkPolicy")
    for w in of_kind(docs, *WORKLOADS):
        labels = pod_labels(w)
        assert [p for p in pdbs if selects(p["spec"]["selector"], labels)], w["metadata"]["name"]
        own = [p for p in policies if p["spec"]["podSelector"]
               and selects(p["spec"]["podSelector"], labels)]
        assert own, f"no NetworkPolicy of its own selects {w['metadata']['name']}"
    [deny] = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]


def test_network_policies_open_only_what_each_role_needs(overlay):
    _, docs = overlay
    pol = {p["metadata"]["name"]: p["spec"] for p in of_kind(docs, "NetworkPolicy")}

    def sources(name: str, port: int) -> list:
        out = []
        for rule in pol[name]["ingress"]:
            if any(p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"]):
                out.append([f.get("podSelector", {}).get("matchLabels", {}).get(
                    "app.kubernetes.io/name") or f.get("namespaceSelector", {}).get(
                    "matchLabels", {}).get("kubernetes.io/metadata.name")
                    for f in rule.get("from", [])] or ["anyone"])
        return out

    assert sources("pdserve-gateway", 50051) == [["anyone"]]  # clients reach only the gateway
    assert sources("pdserve-prefill", 50070) == [["pdserve-gateway", "pdserve-prefill"]]
    assert sources("pdserve-decode", 50080) == [["pdserve-gateway"]]
    assert sources("pdserve-kvstore", 50060) == [["pdserve-gateway", "pdserve-prefill"]]
    assert sources("pdserve-decode", 20050) == [["pdserve-prefill"]]  # KV only between workers
    assert sources("pdserve-prefill", 20050) == [["pdserve-decode", "pdserve-prefill"]]
    for name in ("pdserve-gateway", "pdserve-prefill", "pdserve-decode", "pdserve-kvstore"):
        assert sources(name, 9400) == [["monitoring"]]


def test_overlay_specifics(overlay):
    name, docs = overlay
    services = of_kind(docs, "Service")
    workers = [w for w in of_kind(docs, "Deployment")
               if w["metadata"]["name"] in ("pdserve-prefill", "pdserve-decode")]
    limits = [c["resources"]["limits"] for w in workers for c in containers(w)]
    images = {c["image"] for w in of_kind(docs, *WORKLOADS) for c in containers(w)}
    assert len(images) == 1  # one image, set in one place (base/kustomization.yaml)
    sets = {w["metadata"]["name"]: w for w in of_kind(docs, "StatefulSet")}
    kvstore = sets["pdserve-kvstore"]
    assert kvstore["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    [headless] = [s for s in services if s["metadata"]["name"] == kvstore["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    # Several gateways: rolled one at a time, a ledger volume each, workers register with
    # every one through a headless Service (which lists them before they are ready).
    gw = sets["pdserve-gateway"]
    assert gw["spec"]["replicas"] >= 2 and gw["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert [t["metadata"]["name"] for t in gw["spec"]["volumeClaimTemplates"]] == ["ledger"]
    [gw_headless] = [s for s in services if s["metadata"]["name"] == gw["spec"]["serviceName"]]
    assert gw_headless["spec"]["clusterIP"] == "None"
    assert gw_headless["spec"]["publishNotReadyAddresses"] is True
    [cm] = of_kind(docs, "ConfigMap")
    assert cm["data"]["PDSERVE_GATEWAY"] == f"{gw['spec']['serviceName']}:50051"
    env = {e["name"]: e for e in containers(gw)[0]["env"]}
    assert env["PDSERVE_GATEWAY_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["PDSERVE_PEERS"]["value"] == f"{gw['spec']['serviceName']}:50051"
    [pdb] = [b for b in of_kind(docs, "PodDisruptionBudget")
             if b["metadata"]["name"] == "pdserve-gateway"]
    assert pdb["spec"]["maxUnavailable"] == 1  # a drain may take one gateway at a time
    if name == "dev":
        assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services)
        assert not any("nvidia.com/gpu" in lim for lim in limits)
        assert all(w["spec"]["replicas"] == 1 for w in of_kind(docs, *WORKLOADS)
                   if w is not gw)
        assert not of_kind(docs, "HorizontalPodAutoscaler")
    else:
        exposed = [s["metadata"]["name"] for s in services
                   if s["spec"].get("type") in ("LoadBalancer", "NodePort")]
        assert exposed == ["pdserve-gateway"]  # the only thing exposed
        for lim in limits:
            assert lim["nvidia.com/gpu"] == "1"
            assert any(k.startswith("rdma/") for k in lim)
        hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in
                of_kind(docs, "HorizontalPodAutoscaler")}
        assert set(hpas) == {"pdserve-prefill", "pdserve-decode"}
        metrics = {h["spec"]["metrics"][0]["pods"]["metric"]["name"] for h in hpas.values()}
        assert metrics == {"pdserve_prefill_queued_tokens", "pdserve_kv_usage_ratio"}
        shards = cm["data"]["PDSERVE_KVSTORE"].split(",")
        assert len(shards) == kvstore["spec"]["replicas"] == 4
        assert all(re.fullmatch(rf"pdserve-kvstore-{i}\.pdserve-kvstore:50060", s)
                   for i, s in enumerate(shards))


def test_hpa_metrics_are_ones_the_workers_export():
    from prometheus_client import CollectorRegistry

    from pdserve.metrics import DecodeMetrics, PrefillMetrics

    names = set()
    for metrics in (PrefillMetrics, DecodeMetrics):
        reg = CollectorRegistry()
        metrics(reg)
        names |= {m.name for m in reg.collect()}
    assert {"pdserve_prefill_queued_tokens", "pdserve_kv_usage_ratio"} <= names


def test_dockerfile_is_multi_stage_non_root_with_the_cli_as_entry_point():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M)  # a CUDA base is a build argument
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["pdserve"\]', text, re.M)


def health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            return -1


def test_the_dev_overlay_runs(tmp_path):
    """Each workload's rendered command, arguments and environment, started as a local
    process; every readiness probe passes; a Generate through the gateway answers."""
    pods = local_pods(render("dev"), tmp_path)
    assert {p.workload for p in pods} == {"pdserve-gateway", "pdserve-prefill",
                                          "pdserve-decode", "pdserve-kvstore"}
    # Workers register with every gateway: the headless Service's name resolves to both.
    [worker] = [p for p in pods if p.workload == "pdserve-prefill"]
    assert len(worker.env["PDSERVE_GATEWAY"].split(",")) == 2
    start(pods, tmp_path)
    try:
        def all_ready() -> bool:
            for p in pods:
                if p.proc.poll() is not None:
                    pytest.fail(f"{p.workload} exited {p.proc.returncode}:\n"
                                + p.log.read_text()[-3000:])
            return all(health(*p.readiness) == health_pb2.HealthCheckResponse.SERVING
                       for p in pods)

        wait_until(all_ready, 300, interval_s=0.2, what="every pod's readiness probe")
        for p in pods:
            assert health(*p.liveness) == health_pb2.HealthCheckResponse.SERVING, p.workload
        gateways = [p for p in pods if p.workload == "pdserve-gateway"]
        assert len(gateways) == 2
        for gw in gateways:  # the workers registered with both; each serves
            address = f"127.0.0.1:{gw.readiness[0]}"
            with grpc.insecure_channel(address) as ch:
                st = gateway_pb2_grpc.GatewayStub(ch).Stats(gateway_pb2.ClusterStatsRequest(),
                                                            timeout=5)
            assert sorted(w.role for w in st.workers if w.in_rotation) == ["decode", "prefill"]
            with Client(address) as c:
                r = c.generate(prompt="What is the capital of France?", max_tokens=8)
            assert r.completion_tokens > 0 and r.text
            # The ledger went where this gateway's own volume is mounted, under its pod name.
            assert (tmp_path / gw.pod / "ledger" / "ledger" / "requests" / gw.pod).is_dir()
        assert any((tmp_path / "pdserve-kvstore-0" / "data").iterdir())
    finally:
        stop(pods)
    for p in pods:
        assert p.proc.returncode == 0, (p.workload, p.log.read_text()[-2000:])


def test_the_ep_overlay_runs_each_role_as_one_expert_parallel_group():
    from pdserve.config import DecodeSettings, PrefillSettings

    docs = render("ep")
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    # The policies every overlay follows hold here too.
    test_every_container_has_resources_probes_and_a_locked_down_security_context(("ep", docs))
    test_every_workload_has_a_pdb_and_network_policies_select_every_pod(("ep", docs))
    sets = {w["metadata"]["name"]: w for w in of_kind(docs, "StatefulSet")}
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(docs, "NetworkPolicy")}
    assert not of_kind(docs, "HorizontalPodAutoscaler")  # a group's size is fixed
    assert not [w for w in of_kind(docs, "Deployment")
                if w["metadata"]["name"] in ("pdserve-prefill", "pdserve-decode")]
    for role, settings in (("prefill", PrefillSettings), ("decode", DecodeSettings)):
        w = sets[f"pdserve-{role}"]
        spec = w["spec"]
        env = {e["name"]: e for e in containers(w)[0]["env"]}
        size = int(env["PDSERVE_EP_SIZE"]["value"])
        assert spec["replicas"] == size > 1 and spec["podManagementPolicy"] == "Parallel"
        assert env["PDSERVE_EP_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.labels['apps.kubernetes.io/pod-index']")  # rank = the pod's index
        headless = services[spec["serviceName"]]
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"]["publishNotReadyAddresses"] is True  # ranks meet before ready
        assert selects(headless["spec"]["selector"], pod_labels(w))
        init = env["PDSERVE_DIST_INIT"]["value"]
        assert init == f"tcp://pdserve-{role}-0.{spec['serviceName']}:29500"  # pod 0
        assert 29500 in {p["containerPort"] for p in containers(w)[0]["ports"]}
        # The settings a rank starts with are valid, and V3's 256 experts + the redundant ones
        # split evenly over the group.
        values = {k.removeprefix("PDSERVE_").lower(): e["value"] for k, e in env.items()
                  if k.startswith("PDSERVE_EP_") or k in (
                      "PDSERVE_DIST_INIT", "PDSERVE_REDUNDANT_EXPERTS")
                  if "value" in e}
        s = settings(**values, ep_rank=size - 1)
        assert (256 + s.redundant_experts) % s.ep_size == 0
        # gloo: the ranks reach each other on ports they pick: the role's pods are open to
        # the same role's pods, and to no other new source.
        same = [r for r in policies[f"pdserve-{role}"]["ingress"] if "ports" not in r]
        assert len(same) == 1 and [f["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                                   for f in same[0]["from"]] == [f"pdserve-{role}"]
