"""`pdserve eplb`: placement for a JSON of per-layer expert loads."""

from __future__ import annotations

import argparse
import json
import sys

from pdserve.scheduler.eplb import gpu_loads, max_over_mean, rebalance_experts


def run_eplb(args: argparse.Namespace) -> int:
    try:
        with open(args.loads) as f:
            weight = json.load(f)["weight"]
        p = rebalance_experts(weight, args.replicas, args.groups, args.nodes, args.gpus)
    except (OSError, KeyError, ValueError, TypeError) as e:
        print(f"pdserve eplb: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"phy2log": p.phy2log, "log2phy": p.log2phy, "logcnt": p.logcnt}))
        return 0
    n = len(weight[0])
    for layer, row in enumerate(weight):
        # Before: no redundant experts, experts spread over the GPUs in id order.
        if n % args.gpus == 0:
            before = max_over_mean(gpu_loads(row, list(range(n)), [1] * n, args.gpus))
            before_s = f"{before:.3f}"
        else:
            before_s = "n/a (experts do not split evenly over GPUs)"
        after = max_over_mean(gpu_loads(row, p.phy2log[layer], p.logcnt[layer], args.gpus))
        print(f"layer {layer}: max/mean GPU load {before_s} -> {after:.3f}")
        per_gpu = args.replicas // args.gpus
        for g in range(args.gpus):
            print(f"  gpu {g}: experts {p.phy2log[layer][g * per_gpu:(g + 1) * per_gpu]}")
    return 0
