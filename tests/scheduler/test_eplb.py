from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.scheduler.eplb import (
    balanced_packing,
    gpu_loads,
    rebalance_experts,
    replicate,
)

README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]


def test_reproduces_the_deepseek_readme_example():
    p = rebalance_experts(README_WEIGHT, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert p.phy2log == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                         [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert p.logcnt == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                        [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def test_global_policy_when_nodes_do_not_divide_groups():
    # 3 groups over 2 nodes: global policy. Worked by hand: expert 0 (40) gets 3 replicas
    # (the tie 20 vs 20 goes to the lower id), then heaviest replica first onto the lightest GPU.
    p = rebalance_experts([[40, 10, 10, 20, 5, 5]], num_replicas=8, num_groups=3, num_nodes=2,
                          num_gpus=4)
    assert p.phy2log == [[3, 5, 0, 1, 0, 2, 0, 4]]
    assert p.logcnt == [[3, 1, 1, 1, 1, 1]]
    assert p.log2phy[0][0] == [2, 4, 6] and p.log2phy[0][3] == [0, -1, -1]
    loads = gpu_loads([40, 10, 10, 20, 5, 5], p.phy2log[0], p.logcnt[0], 4)
    assert loads == pytest.approx([25, 70 / 3, 70 / 3, 55 / 3])


def test_packing_and_replication_tie_rules():
    assert balanced_packing([5, 5, 5, 5], 2) == ([0, 1, 0, 1], [0, 0, 1, 1])
    assert replicate([4, 4], 3) == ([0, 1, 0], [0, 0, 1], [2, 1])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="--replicas"):
        rebalance_experts(README_WEIGHT, 15, 4, 2, 8)
    with pytest.raises(ValueError, match="--groups"):
        rebalance_experts(README_WEIGHT, 16, 5, 5, 8)


@st.composite
def problems(draw):
    gpus = draw(st.sampled_from([1, 2, 4, 8]))
    nodes = draw(st.sampled_from([n for n in (1, 2, 4) if gpus % n == 0]))
    groups = draw(st.sampled_from([1, 2, 3, 4, 6]))
    experts = groups * draw(st.integers(1, 4)) * (nodes if groups % nodes == 0 else 1)
    per_gpu = draw(st.integers(1, 4))
    replicas = max(gpus * per_gpu, gpus * (-(-experts // gpus)))
    layers = draw(st.integers(1, 3))
    weight = draw(st.lists(st.lists(st.integers(0, 1000), min_size=experts, max_size=experts),
                           min_size=layers, max_size=layers))
    return weight, replicas, groups, nodes, gpus


@settings(max_examples=150, deadline=None)
@given(problems())
def test_placement_invariants(problem):
    weight, replicas, groups, nodes, gpus = problem
    p = rebalance_experts(weight, replicas, groups, nodes, gpus)
    n = len(weight[0])
    for layer in range(len(weight)):
        p2l, l2p, cnt = p.phy2log[layer], p.log2phy[layer], p.logcnt[layer]
        assert len(p2l) == replicas
        assert all(c >= 1 for c in cnt)                 # every expert has a replica
        assert sum(cnt) == replicas                      # counts sum to the slots
        assert len(p2l) % gpus == 0                      # same slots on every GPU
        for e in range(n):
            slots = [s for s in l2p[e] if s >= 0]
            assert len(slots) == cnt[e]
            assert sorted(slots) == [s for s in range(replicas) if p2l[s] == e]


@pytest.mark.integration
def test_cli_prints_the_maps(tmp_path):
    f = tmp_path / "loads.json"
    f.write_text(json.dumps({"weight": README_WEIGHT}))
    r = subprocess.run([sys.executable, "-m", "pdserve", "eplb", str(f), "--replicas", "16",
                        "--groups", "4", "--nodes", "2", "--gpus", "8", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["phy2log"][0] == [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
    assert set(out) >= {"phy2log", "log2phy", "logcnt"}
    r = subprocess.run([sys.executable, "-m", "pdserve", "eplb", str(f), "--replicas", "16",
                        "--groups", "4", "--nodes", "2", "--gpus", "8"],
                       capture_output=True, text=True, timeout=60)
    assert "max/mean GPU load" in r.stdout
