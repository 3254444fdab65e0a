"""Expert-parallel load balancer (EPLB), after DeepSeek's published policy.

Given per-expert loads of each MoE layer, choose how many replicas each logical expert gets and
where every replica (physical expert slot) sits, so that the most loaded GPU carries as little
as possible:

- hierarchical policy, when the number of nodes divides the number of expert groups:
  Step 1: pack whole expert groups onto nodes (keeps group-limited routing traffic intra-node);
  Step 2: inside each node, give one more replica to the expert with the highest load per
          replica, until the node's slots are used;
  Step 3: pack the node's replicas onto its GPUs, heaviest first, each to the lightest GPU
          that still has a free slot.
- global policy otherwise: the same with one group and one node.

Ties are stable: equal loads keep ascending expert order; equal GPU loads take the lowest GPU.
Pure functions over Python lists; shapes in the docstrings are [rows, columns].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    phy2log: list[list[int]]          # [layers, replicas]: logical expert of each slot
    log2phy: list[list[list[int]]]    # [layers, experts, max replicas]: slots, -1 padded
    logcnt: list[list[int]]           # [layers, experts]: replicas of each expert


def balanced_packing(weights: Sequence[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Packs n items into num_packs packs of exactly n / num_packs items, heaviest item first
    into the lightest pack with room. Returns (pack of each item, rank of the item in its pack)."""
    n = len(weights)
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    pack_load = [0.0] * num_packs
    pack_size = [0] * num_packs
    pack_of, rank_of = [0] * n, [0] * n
    for item in sorted(range(n), key=lambda i: -weights[i]):  # stable: ties keep index order
        pack = min((p for p in range(num_packs) if pack_size[p] < per_pack),
                   key=lambda p: pack_load[p])
        pack_of[item], rank_of[item] = pack, pack_size[pack]
        pack_load[pack] += weights[item]
        pack_size[pack] += 1
    return pack_of, rank_of


def replicate(weights: Sequence[float], num_slots: int) -> tuple[list[int], list[int], list[int]]:
    """Gives num_slots - n extra replicas, each to the expert with the highest load per replica.
    Returns (expert of each slot, replica rank of each slot, replica count of each expert)."""
    n = len(weights)
    if num_slots < n:
        raise ValueError(f"{num_slots} slots cannot hold {n} experts")
    count = [1] * n
    slot_expert, slot_rank = list(range(n)), [0] * n
    for _ in range(num_slots - n):
        best = max(range(n), key=lambda e: weights[e] / count[e])  # first of equals
        slot_expert.append(best)
        slot_rank.append(count[best])
        count[best] += 1
    return slot_expert, slot_rank, count


def _layer(weights: Sequence[float], num_slots: int, num_groups: int, num_nodes: int,
           num_gpus: int) -> tuple[list[int], list[int], list[int]]:
    """One layer, hierarchical policy: (phy2log, replica rank per slot, logcnt)."""
    n = len(weights)
    group_size = n // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_node = num_slots // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_slots // num_gpus
    # Step 1: groups to nodes. Experts are renumbered node-major ("node-local" order).
    group_load = [sum(weights[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
    node_of, rank_in_node = balanced_packing(group_load, num_nodes)
    local_to_expert = [0] * n
    for g in range(num_groups):
        first = (node_of[g] * groups_per_node + rank_in_node[g]) * group_size
        for j in range(group_size):
            local_to_expert[first + j] = g * group_size + j
    phy2log = [0] * num_slots
    phy_rank = [0] * num_slots
    logcnt = [0] * n
    per_node = n // num_nodes
    for node in range(num_nodes):
        experts = local_to_expert[node * per_node:(node + 1) * per_node]
        loads = [weights[e] for e in experts]
        # Step 2: replicas inside the node.
        slot_expert, slot_rank, count = replicate(loads, slots_per_node)
        # Step 3: the node's slots onto its GPUs.
        slot_load = [loads[e] / count[e] for e in slot_expert]
        gpu_of, rank_on_gpu = balanced_packing(slot_load, gpus_per_node)
        for s in range(slots_per_node):
            pos = node * slots_per_node + gpu_of[s] * slots_per_gpu + rank_on_gpu[s]
            phy2log[pos] = experts[slot_expert[s]]
            phy_rank[pos] = slot_rank[s]
        for e_local, c in enumerate(count):
            logcnt[experts[e_local]] = c
    return phy2log, phy_rank, logcnt


def check_args(num_experts: int, num_replicas: int, num_groups: int, num_nodes: int,
               num_gpus: int) -> None:
    if num_experts % num_groups:
        raise ValueError(f"--groups {num_groups} must divide the {num_experts} experts")
    if num_gpus % num_nodes:
        raise ValueError(f"--gpus {num_gpus} must be a multiple of --nodes {num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"--replicas {num_replicas} must be a multiple of --gpus {num_gpus}")
    if num_replicas < num_experts:
        raise ValueError(f"--replicas {num_replicas} must be at least the {num_experts} experts")


def rebalance_experts(weight: Sequence[Sequence[float]], num_replicas: int, num_groups: int,
                      num_nodes: int, num_gpus: int) -> Placement:
    """weight: [layers, experts] loads. Hierarchical policy when nodes divide groups, else
    global. Returns the placement of num_replicas slots over num_gpus GPUs."""
    if not weight:
        raise ValueError("weight: no layers")
    n = len(weight[0])
    if num_groups % num_nodes == 0:
        check_args(n, num_replicas, num_groups, num_nodes, num_gpus)
        groups, nodes = num_groups, num_nodes
    else:
        check_args(n, num_replicas, 1, 1, num_gpus)
        groups, nodes = 1, 1
    phy2log, log2phy, logcnt = [], [], []
    for row in weight:
        if len(row) != n:
            raise ValueError("weight: every layer needs the same number of experts")
        p2l, rank, cnt = _layer([float(x) for x in row], num_replicas, groups, nodes, num_gpus)
        width = max(cnt)
        l2p = [[-1] * width for _ in range(n)]
        for slot, (e, r) in enumerate(zip(p2l, rank)):
            l2p[e][r] = slot
        phy2log.append(p2l)
        log2phy.append(l2p)
        logcnt.append(cnt)
    # One width for the whole tensor, as a [layers, experts, X] array would have.
    width = max(max(c) for c in logcnt)
    log2phy = [[slots + [-1] * (width - len(slots)) for slots in layer] for layer in log2phy]
    return Placement(phy2log, log2phy, logcnt)


def gpu_loads(weight: Sequence[float], phy2log: Sequence[int], logcnt: Sequence[int],
              num_gpus: int) -> list[float]:
    """Load of each GPU for one layer: a replica carries its expert's load / replica count."""
    per_gpu = len(phy2log) // num_gpus
    return [sum(weight[e] / logcnt[e] for e in phy2log[g * per_gpu:(g + 1) * per_gpu])
            for g in range(num_gpus)]


def max_over_mean(loads: Sequence[float]) -> float:
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0
