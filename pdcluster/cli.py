"""The `pdcluster` command."""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import sys
import threading
import time


def _model_tiny(args: argparse.Namespace) -> int:
    from pdcluster.common.tiny_model.generate import ensure_tiny_model

    print(ensure_tiny_model(args.out))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from pdcluster.cluster.cluster_spec import load_cluster_spec
    from pdcluster.cluster.ray_cluster import connect_ray, start_controller
    from pdcluster.router.server import serve_router

    try:
        spec = load_cluster_spec(args, args.vllm_flags)
    except ValueError as e:  # a bad spec or flag: say which, start nothing
        print(f"pdcluster serve: {e}", file=sys.stderr)
        return 2
    # Never an open cluster: without a configured secret, one made for this run.
    spec.auth_token = spec.auth_token or os.environ.get("PDCLUSTER_KV_TOKEN") or secrets.token_urlsafe(32)
    stop = threading.Event()
    connect_ray(spec)  # before anything imports ray: it decides how ray is set up
    import ray

    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    controller = None
    try:
        controller = start_controller(spec)
        if not _wait_for_pools(controller, stop):
            return 130
        if args.no_router:
            print(f"pdcluster pools ready: {spec.prefill.replicas} prefill + {spec.decode.replicas} decode workers", flush=True)
            stop.wait()
            return 0
        config = spec.router_config()
        membership = None if spec.registry else (lambda: controller.members.remote())
        asyncio.run(serve_router(config, on_ready=lambda info: _print_ready(info, spec), membership=membership))
        return 0
    finally:
        print("stopping workers...", flush=True)
        if controller is not None:
            try:
                ray.get(controller.shutdown.remote(), timeout=120)
            except Exception as e:  # still shut Ray down below
                print(f"controller shutdown: {e}", file=sys.stderr)
        ray.shutdown()


def _wait_for_pools(controller, stop: threading.Event) -> bool:
    """Print each replica as it becomes ready; False if stopped first."""
    import ray

    started = time.monotonic()
    status = ray.get(controller.status.remote())
    targets = {role: pool["target"] for role, pool in status["pools"].items()}
    print(f"starting {targets['prefill']} prefill + {targets['decode']} decode workers on Ray (engines load in ~30-60 s)...", flush=True)
    seen: set[str] = set()
    while not stop.wait(1.0):
        status = ray.get(controller.status.remote())
        for r in status["replicas"]:
            if r["state"] == "ready" and r["id"] not in seen:
                seen.add(r["id"])
                print(f"  {r['role']} worker {r['id']} ready at {r['address']} after {time.monotonic() - started:.0f}s", flush=True)
        if all(pool["ready"] >= pool["target"] for pool in status["pools"].values()):
            return True
    return False


def _print_ready(info, spec) -> None:
    print(
        f"pdcluster ready: {info.http}/v1 (OpenAI), grpc {info.grpc}, model {info.model}, "
        f"{spec.prefill.replicas} prefill + {spec.decode.replicas} decode workers (Ctrl-C to stop)",
        flush=True,
    )


def _status(args: argparse.Namespace) -> int:
    import json

    from pdcluster.cluster.ray_cluster import find_controller

    controller = find_controller(args.name, args.address)  # before importing ray: it sets Ray up
    import ray

    status = ray.get(controller.status.remote())
    if args.json:
        print(json.dumps(status))
        return 0
    print(f"cluster {status['name']} (autoscaling {'on' if status['autoscaling'] else 'off'})")
    for role, pool in status["pools"].items():
        print(f"  {role:<8} ready {pool['ready']}/{pool['target']} (min {pool['min']}, max {pool['max']}) per replica {pool['resources']}")
    for r in status["replicas"]:
        print(
            f"    {r['id']:<18} {r['state']:<9} {r['address']:<22} pid {r['pid']:<7} running {r['running']:<3} "
            f"free KV {r['free_kv_blocks']}/{r['total_kv_blocks']}  up {r['age_s']:.0f}s"
        )
    for d in status["decisions"][-10:]:
        print(
            f"  autoscaler {time.strftime('%H:%M:%S', time.localtime(d['at']))} {d['role']} {d['from_replicas']} -> {d['to_replicas']}: {d['reason']}"
        )
    for h in status["heals"][-10:]:
        print(f"  healed {h['role']}: {h['replaced']} ({h['reason']}) -> {h['replacement']} in {h['seconds']}s")
    return 0


def _bench_transfer(args: argparse.Namespace) -> int:
    from pdcluster.bench.transfer_bench import main as bench_main

    return bench_main(
        json_output=args.json,
        repeats=args.repeats,
        sizes=args.tokens,
        streams_per_transfer=args.streams,
        chunk_bytes=args.chunk_mib << 20 if args.chunk_mib else None,
    )


def _bench_chaos(args: argparse.Namespace) -> int:
    from pdcluster.bench.chaos_bench import main as bench_main

    return bench_main(json_output=args.json, faults=args.faults, prefill=args.prefill, decode=args.decode)


def _bench_router(args: argparse.Namespace) -> int:
    from pdcluster.bench.router_bench import main as bench_main

    return bench_main(json_output=args.json, concurrency=args.concurrency, requests=args.requests, model=args.model)


def _bench_serve(args: argparse.Namespace) -> int:
    from pdcluster.bench.serve_bench import main as bench_main
    from pdcluster.bench.workloads import Workload

    workload = Workload(
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        distribution=args.distribution,
        prefix_share=args.prefix_share,
        prefix_groups=args.prefix_groups,
        seed=args.seed,
    )
    results = bench_main(
        args.url,
        args.rates,
        args.requests,
        workload,
        tokenizer=args.tokenizer,
        model=args.model,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_itl_ms=args.slo_itl_ms,
        json_path=args.json_out,
        plot_path=args.plot,
        api_key=args.api_key,
    )
    return 0 if all(r.completed for r in results) else 1


def _bench_compare(args: argparse.Namespace) -> int:
    from pdcluster.bench.compare_bench import main as bench_main

    comparisons = bench_main(
        model=args.model,
        rates=args.rates,
        requests=args.requests,
        workloads=args.workloads,
        cores=args.cores,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_itl_ms=args.slo_itl_ms,
        json_path=args.json_out,
        plot_path=args.plot,
        router_flags=shlex.split(args.router_flags),
    )
    return 0 if all(c.colocated.completed and c.pdcluster.completed for c in comparisons) else 1


def build_parser() -> argparse.ArgumentParser:
    from pdcluster.bench.chaos_bench import FAULTS
    from pdcluster.bench.workloads import COMPARE_WORKLOADS
    from pdcluster.cluster.cluster_spec import add_cluster_flags

    parser = argparse.ArgumentParser(prog="pdcluster", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("tiny", help="generate (once) the tiny test model; prints its directory")
    tiny.add_argument("--out", default=None, help="directory to write it to (default: the cache)")
    tiny.set_defaults(func=_model_tiny)

    serve = sub.add_parser("serve", help="run a cluster: workers on Ray, and the router")
    add_cluster_flags(serve)
    serve.set_defaults(func=_serve, takes_vllm_flags=True)

    status = sub.add_parser("status", help="pools, replicas, health and autoscaler decisions of a running cluster")
    status.add_argument("--address", default="auto", help="Ray address (default: the local one)")
    status.add_argument("--name", default="pdcluster", help="cluster name in the spec")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    transfer = bench_sub.add_parser("transfer", help="KV transfer throughput against raw TCP and memcpy")
    transfer.add_argument("--json", action="store_true", help="end with a JSON line")
    transfer.add_argument("--repeats", type=int, default=3)
    transfer.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt sizes")
    transfer.add_argument("--streams", type=int, default=None, help="streams per transfer (default: the setting)")
    transfer.add_argument("--chunk-mib", type=int, default=None, help="chunk size in MiB (default: the setting)")
    transfer.set_defaults(func=_bench_transfer)
    chaos = bench_sub.add_parser("chaos", help="faults one at a time under load: requests lost, wrong, slowest, heal time")
    chaos.add_argument("--json", action="store_true", help="end with a JSON line")
    chaos.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    chaos.add_argument("--prefill", type=int, default=2, help="prefill workers")
    chaos.add_argument("--decode", type=int, default=2, help="decode workers")
    chaos.set_defaults(func=_bench_chaos)
    router = bench_sub.add_parser("router", help="router overhead against calling a worker directly")
    router.add_argument("--json", action="store_true", help="end with a JSON line")
    router.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    router.add_argument("--requests", type=int, default=200, help="requests per path and concurrency")
    router.add_argument("--model", default="", help="HF model directory (default: the tiny model)")
    router.set_defaults(func=_bench_router)
    serve_bench = bench_sub.add_parser("serve", help="open-loop load (Poisson arrivals) against an OpenAI-compatible URL")
    serve_bench.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    serve_bench.add_argument("--model", default="", help="model name to send (default: the server's first)")
    serve_bench.add_argument("--tokenizer", default="", help="HF tokenizer directory for prompt token ids (default: the tiny model)")
    serve_bench.add_argument("--api-key", default=os.environ.get("PDCLUSTER_API_KEY", ""))
    serve_bench.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="request rates to sweep (req/s)")
    serve_bench.add_argument("--requests", type=int, default=50, help="requests per rate")
    serve_bench.add_argument("--prompt-tokens", type=int, default=512, help="mean prompt length")
    serve_bench.add_argument("--output-tokens", type=int, default=64, help="mean output length")
    serve_bench.add_argument("--distribution", choices=["fixed", "uniform", "exponential"], default="uniform")
    serve_bench.add_argument("--prefix-share", type=float, default=0.0, help="fraction of each prompt from a shared prefix")
    serve_bench.add_argument("--prefix-groups", type=int, default=4, help="distinct shared prefixes")
    serve_bench.add_argument("--seed", type=int, default=0)
    serve_bench.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    serve_bench.add_argument("--slo-itl-ms", type=float, default=100.0)
    serve_bench.add_argument("--json-out", default="", help="write the results as JSON here")
    serve_bench.add_argument("--plot", default="", help="write a PNG of latency percentiles against rate here")
    serve_bench.set_defaults(func=_bench_serve)
    compare = bench_sub.add_parser("compare", help="co-located vLLM against pdcluster 1P+1D on the same cores, same load")
    compare.add_argument("--model", default="", help="HF model directory (default: the generated bench model, ~26M parameters)")
    compare.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0], help="request rates to sweep (req/s)")
    compare.add_argument("--requests", type=int, default=40, help="requests per rate")
    compare.add_argument("--workloads", nargs="+", choices=list(COMPARE_WORKLOADS), default=list(COMPARE_WORKLOADS))
    compare.add_argument("--cores", type=int, default=0, help="cores to use, split evenly between prefill and decode (default: all)")
    compare.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    compare.add_argument("--slo-itl-ms", type=float, default=20.0, help="bound on each request's TPOT (mean inter-token latency)")
    compare.add_argument("--router-flags", default="", help="extra flags for pdcluster's router, e.g. '--local-prefill-above-queued 2048'")
    compare.add_argument("--json-out", default="", help="write the results as JSON here")
    compare.add_argument("--plot", default="", help="write a PNG of p99 ITL, TPOT and TTFT and goodput against rate here")
    compare.set_defaults(func=_bench_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, vllm_flags = parser.parse_known_args(argv)  # `serve` takes `vllm serve`'s flags too
    if vllm_flags and not getattr(args, "takes_vllm_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(vllm_flags)}")
    args.vllm_flags = vllm_flags
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
