"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from pdserve import config
from pdserve.log import setup_logging

SERVICES = {
    "gateway": config.GatewaySettings,
    "prefill": config.PrefillSettings,
    "decode": config.DecodeSettings,
    "kvstore": config.KVStoreSettings,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole cluster on this machine, serve until Ctrl-C")
    config.add_flags(up, config.UpSettings)
    for name, cls in SERVICES.items():
        sp = sub.add_parser(name, help=f"run one {name} service")
        if name == "kvstore":
            sp.add_argument("action", nargs="?", default="serve",
                            choices=["serve", "stats", "verify"],
                            help="serve (default), or on a stopped store: stats | verify")
            sp.add_argument("--json", action="store_true", help="stats/verify: print JSON")
        config.add_flags(sp, cls)
    demo = sub.add_parser("demo", help="the main job: cluster + a short chat workload + summary")
    config.add_flags(demo, config.UpSettings)
    demo.add_argument("--max-tokens", type=int, default=48, help="tokens per answer")
    demo.add_argument("--keep-data", action="store_true",
                      help="use --data-dir instead of a temporary directory")
    ep = sub.add_parser("eplb", help="expert placement from per-layer expert loads (JSON)")
    ep.add_argument("loads", help='JSON file {"weight": [[load per expert], ...per layer]}')
    ep.add_argument("--replicas", type=int, required=True, help="physical expert slots")
    ep.add_argument("--groups", type=int, default=1, help="expert groups")
    ep.add_argument("--nodes", type=int, default=1, help="server nodes")
    ep.add_argument("--gpus", type=int, required=True, help="GPUs (a multiple of --nodes)")
    ep.add_argument("--json", action="store_true", help="print {phy2log, log2phy, logcnt}")
    rp = sub.add_parser("replay", help="replay a Mooncake-format trace through the balancers "
                                       "on a simulated clock, policy by policy")
    rp.add_argument("trace", help="JSONL trace (timestamp ms, input_length, output_length, hash_ids)")
    rp.add_argument("--prefill", type=int, default=4, help="prefill instances")
    rp.add_argument("--decode", type=int, default=4, help="decode instances")
    rp.add_argument("--limit", type=int, default=0, help="first N requests only (0 = all)")
    rp.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times")
    rp.add_argument("--store-blocks", type=int, default=0, help="KV store capacity in 512-token "
                                                                "blocks (0 = unbounded)")
    rp.add_argument("--policies", default="pdserve,round_robin,least_requests,cache_affinity")
    rp.add_argument("--json", action="store_true", help="one JSON object per policy")
    rp.add_argument("--live", action="store_true",
                    help="send the (scaled) trace to a running gateway instead of simulating")
    rp.add_argument("--address", default="127.0.0.1:50051", help="--live: gateway address")
    rp.add_argument("--tokens-per-block", type=int, default=64,
                    help="--live: tokens per trace block (the trace's 512, scaled down)")
    rp.add_argument("--max-blocks", type=int, default=16, help="--live: cap on blocks per prompt")
    rp.add_argument("--max-tokens", type=int, default=8, help="--live: tokens per answer")
    rp.add_argument("--concurrency", type=int, default=4, help="--live: requests at once")
    gen = sub.add_parser("generate", help="send one request to a gateway, stream the answer")
    gen.add_argument("prompt", nargs="?", default="", help="text (a user message)")
    gen.add_argument("--address", default="127.0.0.1:50051", help="gateway address")
    gen.add_argument("--token-ids", default="", help="comma-separated token ids instead of text")
    gen.add_argument("--system", default="", help="system message")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    gen.add_argument("--top-p", type=float, default=0.0, help="0 or 1 = no limit")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--stop-token-ids", default="", help="comma-separated stop token ids")
    gen.add_argument("--logprobs", action="store_true", help="return each token's logprob")
    gen.add_argument("--cache-salt", default="")
    gen.add_argument("--request-id", default="")
    gen.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.client import Client

    ids = [int(t) for t in args.token_ids.split(",") if t.strip()] if args.token_ids else None
    messages = None
    prompt = args.prompt or None
    if args.system and prompt:
        messages, prompt = [("system", args.system), ("user", prompt)], None
    stream = None if args.json else (lambda t: print(t, end="", flush=True))
    with Client(args.address) as c:
        try:
            r = c.generate(prompt=prompt, token_ids=ids, messages=messages,
                           max_tokens=args.max_tokens, temperature=args.temperature,
                           seed=args.seed, cache_salt=args.cache_salt, top_k=args.top_k,
                           top_p=args.top_p, stop=args.stop, logprobs=args.logprobs,
                           stop_token_ids=[int(t) for t in args.stop_token_ids.split(",")
                                           if t.strip()],
                           request_id=args.request_id, on_text=stream)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(r.__dict__))
    else:
        print(f"\n[{r.finish_reason}; prompt {r.prompt_tokens} tokens, {r.cached_tokens} cached; "
              f"{r.completion_tokens} generated; TTFT {r.ttft_s * 1000:.0f} ms; "
              f"{r.e2e_s:.2f} s]", file=sys.stderr)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from pdserve.scheduler.replay import load_trace, simulate

    if args.prefill < 1 or args.decode < 1:
        print("pdserve replay: --prefill and --decode must be >= 1", file=sys.stderr)
        return 2
    trace = load_trace(args.trace, args.limit, args.time_scale)
    if args.live:
        from pdserve.replay_live import run_live

        print(f"replaying {len(trace)} requests against {args.address} (time x{args.time_scale}, "
              f"{args.tokens_per_block} tokens per trace block) ...", file=sys.stderr)
        r = run_live(trace, args.address, args.tokens_per_block, args.max_blocks,
                     args.max_tokens, concurrency=args.concurrency)
        print(json.dumps(r) if args.json else "  ".join(f"{k}={v}" for k, v in r.items()))
        return 0 if not r["failed"] else 1
    for policy in args.policies.split(","):
        if not args.json:
            print(f"replaying {len(trace)} requests with {policy} ...", file=sys.stderr)
        r = simulate(trace, policy.strip(), args.prefill, args.decode,
                     store_blocks=args.store_blocks)
        print(json.dumps(r) if args.json else
              "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cmd = args.command
    try:
        if cmd == "generate":
            return _generate(args)
        if cmd == "replay":
            return _replay(args)
        if cmd == "eplb":
            from pdserve.scheduler.eplb_cli import run_eplb

            return run_eplb(args)
        cls = config.UpSettings if cmd in ("up", "demo") else SERVICES[cmd]
        settings = config.load_settings(cls, args)
    except config.SettingsError as e:
        print(f"pdserve {cmd}: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, service=cmd)
    if cmd == "up":
        from pdserve.cluster import run_up

        return run_up(settings)
    if cmd == "demo":
        from pdserve.demo import main as demo_main

        return demo_main(settings, args.max_tokens, args.keep_data)
    if cmd == "kvstore" and args.action != "serve":
        from pdserve.cache.offline import run_offline

        return run_offline(settings, args.action, args.json)
    from importlib import import_module

    module = import_module(f"pdserve.services.{cmd}")
    try:
        asyncio.run(module.run(settings))
    except FileNotFoundError as e:  # e.g. the model file
        print(f"pdserve {cmd}: {e}", file=sys.stderr)
        return 2
    return 0
