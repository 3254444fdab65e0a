"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from pdserve import config
from pdserve.log import setup_logging

SERVICES: dict[str, type[config.ServiceSettings]] = {
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
    rp.add_argument("trace",
                    help="JSONL trace (timestamp ms, input_length, output_length, hash_ids)")
    rp.add_argument("--prefill", type=int, default=4, help="prefill instances")
    rp.add_argument("--decode", type=int, default=4, help="decode instances")
    rp.add_argument("--limit", type=int, default=0, help="first N requests only (0 = all)")
    rp.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times")
    rp.add_argument("--store-blocks", type=int, default=0, help="KV store capacity in 512-token "
                                                                "blocks (0 = unbounded)")
    rp.add_argument("--policies", default="pdserve,round_robin,least_requests,dynamo,llm_d,"
                    "sglang,mooncake", help="simulated policies (pdserve's balancers, simple "
                    "ones, and the anchors' own: scheduler/replay.py)")
    rp.add_argument("--dynamo-temperature", type=float, default=0.0,
                    help="the dynamo policy's softmax temperature (0 = lowest cost)")
    rp.add_argument("--json", action="store_true", help="one JSON object per policy")
    rp.add_argument("--live", action="store_true",
                    help="send the (scaled) trace to a running gateway instead of simulating")
    rp.add_argument("--address", default="127.0.0.1:50051", help="--live: gateway address")
    rp.add_argument("--tokens-per-block", type=int, default=64,
                    help="--live: tokens per trace block (the trace's 512, scaled down)")
    rp.add_argument("--max-blocks", type=int, default=16, help="--live: cap on blocks per prompt")
    rp.add_argument("--max-tokens", type=int, default=8, help="--live: tokens per answer")
    rp.add_argument("--concurrency", type=int, default=4, help="--live: requests at once")
    an = sub.add_parser("analytics", help="SQL over the request ledger (tables `requests`, "
                                          "`workers`), or a named query")
    an.add_argument("query", nargs="?", default="",
                    help="a SELECT statement, or a named query (see --list)")
    an.add_argument("--data-dir", default="data", help="the gateway's --data-dir")
    an.add_argument("--format", choices=["table", "csv", "json"], default="table")
    an.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="named query parameter: since, until, tenant, limit (repeatable)")
    an.add_argument("--list", action="store_true", help="list the named queries")
    rep = sub.add_parser("report", help="the period's serving statistics and cost, in the shape "
                                        "of DeepSeek's daily report")
    rep.add_argument("--data-dir", default="data", help="the gateway's --data-dir")
    rep.add_argument("--since", default=None, help="ISO-8601 time or Unix seconds (inclusive)")
    rep.add_argument("--until", default=None, help="ISO-8601 time or Unix seconds (exclusive)")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.add_argument("--plot", default=None, metavar="OUT.png",
                     help="also draw hit share, tokens/s and busy workers over time")
    rep.add_argument("--gpu-hour-cost", type=float, default=2.0, help="USD per GPU-hour")
    rep.add_argument("--gpus-per-worker", type=int, default=1)
    rep.add_argument("--price-input-hit", type=float, default=0.14,
                     help="USD per million input tokens served from the KV cache")
    rep.add_argument("--price-input-miss", type=float, default=0.55,
                     help="USD per million input tokens computed")
    rep.add_argument("--price-output", type=float, default=2.19,
                     help="USD per million output tokens")
    mi = sub.add_parser("model-info", help="a model's parameters, weight and KV bytes, and what "
                                           "one expert-parallel rank holds (reads config.json)")
    mi.add_argument("model", help="a Hugging Face model directory, or its config.json")
    mi.add_argument("--ep-size", default="", help="EP group sizes to size a rank for, "
                                                 "comma-separated (e.g. 32,144)")
    mi.add_argument("--redundant-experts", type=int, default=0,
                    help="redundant expert slots across the group (EPLB)")
    mi.add_argument("--kv-dtype", default="bfloat16",
                    choices=["bfloat16", "float16", "float32", "float8_e4m3fn"])
    mi.add_argument("--json", action="store_true", help="print one JSON object")
    gen = sub.add_parser("generate", help="send one request to a gateway, stream the answer")
    gen.add_argument("prompt", nargs="?", default="", help="text (a user message)")
    gen.add_argument("--address", default="127.0.0.1:50051",
                     help="gateway address, or several comma-separated (the request goes to "
                     "one of them, another when one is down before answering)")
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
    gen.add_argument("--tls-ca-file", default=None, help="CA of the gateway's TLS certificate")
    gen.add_argument("--token-file", default=None,
                     help="file holding the bearer token (or set PDSERVE_TOKEN)")
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
    token = (Path(args.token_file).read_text().strip() if args.token_file
             else os.environ.get("PDSERVE_TOKEN") or None)
    with Client(args.address, tls_ca=args.tls_ca_file, token=token) as c:
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
    from pdserve.scheduler.replay import simulate
    from pdserve.scheduler.traces import load_trace

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
                     store_blocks=args.store_blocks, dynamo_temperature=args.dynamo_temperature)
        print(json.dumps(r) if args.json else
              "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    return 0


def _analytics(args: argparse.Namespace) -> int:
    import csv

    from pdserve.cache.analytics import NAMED_QUERIES, run_named
    from pdserve.cache.errors import QueryError
    from pdserve.cache.ledger import run_query

    if args.list or not args.query:
        for name, (what, _) in NAMED_QUERIES.items():
            print(f"{name:28s} {what}")
        return 0
    params = {}
    for p in args.param:
        name, eq, value = p.partition("=")
        if not eq:
            print(f"pdserve analytics: --param {p!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        params[name] = value
    if not Path(args.data_dir, "ledger").is_dir():
        print(f"pdserve analytics: no ledger under --data-dir {args.data_dir}", file=sys.stderr)
        return 2
    try:
        if args.query in NAMED_QUERIES:
            columns, rows = run_named(Path(args.data_dir), args.query, params)
        else:
            if params:
                raise QueryError("--param: only named queries take parameters")
            columns, rows = run_query(Path(args.data_dir), args.query)
    except QueryError as e:
        print(f"pdserve analytics: {e}", file=sys.stderr)
        return 2
    if args.format == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
    elif args.format == "json":
        for r in rows:
            print(json.dumps(dict(zip(columns, r)), default=str))
    else:
        cells = [columns] + [["" if v is None else str(v) for v in r] for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
        for c in cells:
            print("  ".join(v.ljust(n) for v, n in zip(c, widths)).rstrip())
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from pdserve.engine.model_config import config_from_hf
    from pdserve.engine.model_info import as_dict, model_info, render

    path = Path(args.model)
    path = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(path.read_text())
        cfg = config_from_hf(raw)
        sizes = [int(s) for s in args.ep_size.split(",") if s.strip()]
        info = model_info(cfg, raw, args.kv_dtype)
        ranks = [info.rank(n, args.redundant_experts) for n in sizes]
    except (OSError, ValueError, KeyError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        print(f"pdserve model-info: {path}: {what}", file=sys.stderr)
        return 2
    print(json.dumps(as_dict(info, ranks)) if args.json else render(info, ranks))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pdserve.cache.analytics import Prices, format_report, plot, report
    from pdserve.cache.errors import QueryError

    if not Path(args.data_dir, "ledger").is_dir():
        print(f"pdserve report: no ledger under --data-dir {args.data_dir}", file=sys.stderr)
        return 2
    prices = Prices(args.gpu_hour_cost, args.gpus_per_worker, args.price_input_hit,
                    args.price_input_miss, args.price_output)
    try:
        r = report(Path(args.data_dir), args.since, args.until, prices)
        if args.plot:
            plot(Path(args.data_dir), Path(args.plot), args.since, args.until)
    except QueryError as e:
        print(f"pdserve report: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r.as_dict()) if args.json else format_report(r))
    if args.plot:
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cmd = args.command
    try:
        if cmd == "analytics":
            return _analytics(args)
        if cmd == "report":
            return _report(args)
        if cmd == "generate":
            return _generate(args)
        if cmd == "model-info":
            return _model_info(args)
        if cmd == "replay":
            return _replay(args)
        if cmd == "eplb":
            from pdserve.scheduler.eplb_cli import run_eplb

            return run_eplb(args)
        cls: type[config.AnySettings] = (config.UpSettings if cmd in ("up", "demo")
                                          else SERVICES[cmd])
        settings = config.load_settings(cls, args)
    except config.SettingsError as e:
        print(f"pdserve {cmd}: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, service=cmd)
    from pdserve.supervise import DirectoryInUse, die_with_parent

    if isinstance(settings, config.UpSettings):
        from pdserve.cluster import ClusterError

        try:
            if cmd == "up":
                from pdserve.cluster import run_up

                return run_up(settings)
            from pdserve.demo import main as demo_main

            return demo_main(settings, args.max_tokens, args.keep_data)
        except DirectoryInUse as e:
            print(f"pdserve {cmd}: {e}", file=sys.stderr)
            return 2
        except ClusterError as e:  # a service did not start; its log's tail says why
            print(f"pdserve {cmd}: {e}", file=sys.stderr)
            return 1
    die_with_parent()  # started by `pdserve up`: die with it
    if isinstance(settings, config.KVStoreSettings) and args.action != "serve":
        from pdserve.cache.offline import run_offline

        return run_offline(settings, args.action, args.json)
    from importlib import import_module

    from pdserve.engine.backend import BackendError
    from pdserve.engine.errors import EPError
    from pdserve.services.gateway.auth import AuthError
    from pdserve.services.security import SecurityError
    from pdserve.services.server import ListenError
    from pdserve.startup import phase

    phase("interpreter start")
    module = import_module(f"pdserve.services.{cmd}.main")
    phase("imports")
    try:
        asyncio.run(module.run(settings))
    except (FileNotFoundError, SecurityError, AuthError, BackendError, EPError,
            ListenError, DirectoryInUse) as e:
        print(f"pdserve {cmd}: {e}", file=sys.stderr)
        return 2
    return 0
