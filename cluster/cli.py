"""The `pdcluster` command."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time


def _model_tiny(args: argparse.Namespace) -> int:
    from cluster.tiny_model.generate import ensure_tiny_model

    print(ensure_tiny_model(args.out))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from cluster.local_launcher import start_process, wait_ready
    from router.config import router_config_from
    from router.server import serve_router

    worker_args = ["--model", args.model] if args.model else []
    workers = [start_process("prefill", worker_args) for _ in range(args.prefill)]
    workers += [start_process("decode", worker_args) for _ in range(args.decode)]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        started = time.monotonic()
        print(f"starting {args.prefill} prefill + {args.decode} decode workers (engines load in ~30-60 s)...", flush=True)
        for w in workers:
            try:
                wait_ready(w, cancel=stop)
            except InterruptedError:
                return 130
            print(f"  {w.role} worker ready at {w.address} after {time.monotonic() - started:.0f}s", flush=True)
        if stop.is_set():
            return 130
        config = router_config_from(args, workers=[w.address for w in workers])
        asyncio.run(serve_router(config, on_ready=lambda info: _print_ready(info, workers)))
        return 0
    finally:
        for w in workers:
            w.stop()


def _print_ready(info: dict, workers) -> None:
    counts = " + ".join(f"{sum(w.role == r for w in workers)} {r}" for r in ("prefill", "decode"))
    print(f"pdcluster ready: {info['http']}/v1 (OpenAI), grpc {info['grpc']}, model {info['model']}, "
          f"{counts} workers (Ctrl-C to stop)", flush=True)


def _bench_transfer(args: argparse.Namespace) -> int:
    from bench.transfer_bench import main as bench_main

    return bench_main(
        json_output=args.json, repeats=args.repeats, sizes=args.tokens,
        streams_per_transfer=args.streams, chunk_bytes=args.chunk_mib << 20 if args.chunk_mib else None,
    )


def _bench_router(args: argparse.Namespace) -> int:
    from bench.router_bench import main as bench_main

    return bench_main(json_output=args.json, concurrency=args.concurrency, requests=args.requests, model=args.model)


def build_parser() -> argparse.ArgumentParser:
    from router.config import add_router_flags

    parser = argparse.ArgumentParser(prog="pdcluster", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("tiny", help="generate (once) the tiny test model; prints its directory")
    tiny.add_argument("--out", default=None, help="directory to write it to (default: the cache)")
    tiny.set_defaults(func=_model_tiny)

    serve = sub.add_parser("serve", help="run a local cluster")
    add_router_flags(serve)
    serve.add_argument("--prefill", type=int, default=1)
    serve.add_argument("--decode", type=int, default=1)
    serve.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    transfer = bench_sub.add_parser("transfer", help="KV transfer throughput against raw TCP and memcpy")
    transfer.add_argument("--json", action="store_true", help="end with a JSON line")
    transfer.add_argument("--repeats", type=int, default=3)
    transfer.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt sizes")
    transfer.add_argument("--streams", type=int, default=None, help="streams per transfer (default: the setting)")
    transfer.add_argument("--chunk-mib", type=int, default=None, help="chunk size in MiB (default: the setting)")
    transfer.set_defaults(func=_bench_transfer)
    router = bench_sub.add_parser("router", help="router overhead against calling a worker directly")
    router.add_argument("--json", action="store_true", help="end with a JSON line")
    router.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    router.add_argument("--requests", type=int, default=200, help="requests per path and concurrency")
    router.add_argument("--model", default="", help="HF model directory (default: the tiny model)")
    router.set_defaults(func=_bench_router)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
