"""The `pdcluster` command."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
import threading
import time
from typing import TYPE_CHECKING

from pdcluster.common.worker_record import ROLES
from pdcluster.kv_transfer.settings import TRANSPORTS

if TYPE_CHECKING:
    from pdcluster.cluster.cluster_status import ClusterStatus


def _model_tiny(args: argparse.Namespace) -> int:
    from pdcluster.common.tiny_model.generate import VARIANTS, ensure_tiny_model

    print(ensure_tiny_model(args.out, VARIANTS[args.variant]))
    return 0


def _lab_up(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pdcluster.lab.lab_hosts import LabError, cluster_yaml, up
    from pdcluster.lab.lab_spec import RAY_PORT, REDIS_PORT, LabSpec

    args.ray = args.ray and not args.ssh  # with sshd, `ray up` starts Ray
    try:
        spec = LabSpec(**{field: getattr(args, field) for field in LabSpec.model_fields})  # the flags are its fields
        up(spec)
    except (LabError, ValidationError) as e:
        print(f"pdcluster lab up: {e}", file=sys.stderr)
        return 1
    hosts = spec.hosts()
    if args.json:
        print(json.dumps({"name": spec.name, "hosts": [h.model_dump() for h in hosts]}))
        return 0
    for h in hosts:
        print(f"{h.name:<12} {h.address:<15} {h.resource or 'Ray head, Redis :' + str(REDIS_PORT) if spec.ray else ''}")
    head = spec.host("head").address
    if spec.ssh:
        on_head = f"pdcluster lab exec --name {spec.name} head -- .venv/bin/ray"
        print(f"lab {spec.name} is up, each host with sshd. Try, from the checkout:\n  {on_head} up -y {cluster_yaml(spec.name)}")
        print(
            f"  {on_head} exec {cluster_yaml(spec.name)} 'cd ~/pdcluster && .venv/bin/pdcluster serve --address auto --config deploy/cluster.example.yaml --host 0.0.0.0'"
        )
    else:
        print(f"lab {spec.name} is up. Try: pdcluster lab exec head -- pdcluster serve --address {head}:{RAY_PORT} --host {head}")
    return 0


def _lab_down(args: argparse.Namespace) -> int:
    from pdcluster.lab.lab_hosts import down

    removed = down(args.name)
    print(f"lab {args.name}: removed {', '.join(removed)}" if removed else f"no lab {args.name} was up")
    return 0


def _lab_exec(args: argparse.Namespace) -> int:
    from pdcluster.lab.lab_hosts import LabError, host_command, host_env

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("pdcluster lab exec: give a command after the host: pdcluster lab exec HOST -- CMD ...", file=sys.stderr)
        return 2
    try:
        command = host_command(args.name, args.host, argv)
    except (LabError, ValueError) as e:
        print(f"pdcluster lab exec: {e}", file=sys.stderr)
        return 1
    os.execvpe(command[0], command, host_env())


def _lab_fault(args: argparse.Namespace) -> int:
    from pdcluster.lab import lab_hosts

    try:
        if args.lab_command == "cut":
            lab_hosts.cut(args.name, args.host, args.peers)
        elif args.lab_command == "impair":
            lab_hosts.impair(args.name, args.host, args.peers, args.delay_ms, args.loss)
        else:
            getattr(lab_hosts, args.lab_command)(args.name, args.host)
    except (lab_hosts.LabError, ValueError) as e:
        print(f"pdcluster lab {args.lab_command}: {e}", file=sys.stderr)
        return 1
    done = {
        "cut": f"cut off from {', '.join(args.peers) if getattr(args, 'peers', None) else 'every host'}",
        "restore": "connected again",
        "impair": f"sends to {', '.join(getattr(args, 'peers', []))} {getattr(args, 'delay_ms', 0):g} ms late, losing {getattr(args, 'loss', 0):.1%}",
        "crash": "crashed: every process on it is gone",
        "boot": "up again: a fresh PID space, and its Ray node back where the lab runs Ray",
    }
    print(f"{args.host} {done[args.lab_command]}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from pdcluster.cluster.cluster_spec import load_cluster_spec
    from pdcluster.cluster.ray_cluster import connect_ray, start_controller
    from pdcluster.common.process_lifetime import on_stop_signals
    from pdcluster.router.listeners import PortTaken, bind_listeners
    from pdcluster.router.model_registry import publish_models
    from pdcluster.router.server import serve_router

    try:
        spec = load_cluster_spec(args, args.vllm_flags)
    except (ValueError, OSError) as e:  # a bad spec or flag, or a config file that cannot be read: say which, start nothing
        print(f"pdcluster serve: {e}", file=sys.stderr)
        return 2
    try:  # before Ray and the workers: a taken port fails now, and nothing started meanwhile takes ours
        listeners = None if args.no_router else bind_listeners(spec.router_config())
    except PortTaken as e:
        print(f"pdcluster serve: {e}", file=sys.stderr)
        return 1
    # Never an open cluster: without a configured secret, one made for this run.
    spec.auth_token = spec.auth_token or os.environ.get("PDCLUSTER_KV_TOKEN") or secrets.token_urlsafe(32)
    models = spec.model_clusters()  # each with the secret
    stop = threading.Event()
    connect_ray(spec)  # before anything imports ray: it decides how ray is set up
    import ray

    ray_address = ray.get_runtime_context().gcs_address  # in the ready record: tools find this cluster there

    on_stop_signals(stop.set)  # after ray.init, which installs its own handlers
    controllers = []
    try:
        for model in models:  # one controller per model: its pools, healed and scaled on their own
            controllers.append(start_controller(model))
        for controller in controllers:
            waited = _wait_for_pools(controller, stop)
            if waited != 0:
                return waited
        configs = [model.router_config() for model in models]
        if spec.registry:  # for routers started on their own
            publish_models(configs)
        if args.no_router:
            print(f"pdcluster pools ready: {_pools_text(models)}", flush=True)
            _write_ready(args.ready_file, None, models, ray_address)
            stop.wait()
            return 0
        memberships = None if spec.registry else [controller.members.remote for controller in controllers]
        asyncio.run(
            serve_router(
                configs,
                on_ready=lambda info: _on_ready(info, models, args.ready_file, ray_address),
                memberships=memberships,
                listeners=listeners,
            )
        )
        return 0
    finally:
        _tell("stopping workers...")
        for controller in controllers:
            try:
                ray.get(controller.shutdown.remote(), timeout=120)
            except Exception as e:  # still shut Ray down below
                _tell(f"controller shutdown: {e}", sys.stderr)
        ray.shutdown()


def _pools_text(models) -> str:
    return ", ".join(f"{m.prefill.replicas} prefill + {m.decode.replicas} decode workers" for m in models)


def _tell(text: str, file=None) -> None:
    """print, where the terminal may be gone (its SSH session ended: writes fail with EIO):
    the shutdown that follows must not be cut short by it."""
    try:
        print(text, file=file or sys.stdout, flush=True)
    except OSError:
        pass


def _start_failure_text(cause: str) -> str:
    """The error (it names the worker's log) and the log's last lines."""
    first, *rest = cause.splitlines() or [""]
    return "\n".join([first, *rest[-10:]])


GIVE_UP_AFTER_FAILED_STARTS = 3  # in a row, in one pool: the same cause will not go away by retrying


def _wait_for_pools(controller, stop: threading.Event) -> int:
    """Print each replica as it becomes ready, and each that fails to start, with why; 0 once
    every pool is ready, 1 when a pool's starts keep failing, 130 if stopped first."""
    import ray

    started = time.monotonic()
    status = ray.get(controller.status.remote())
    prefill, decode = (status.pools[role].target for role in ROLES)
    print(f"starting {prefill} prefill + {decode} decode workers on Ray (engines load in ~30-60 s)...", flush=True)
    seen: set[str] = set()
    while not stop.wait(1.0):
        status = ray.get(controller.status.remote())
        for r in status.replicas:
            if r.state == "ready" and r.id not in seen:
                seen.add(r.id)
                print(f"  {r.role} worker {r.id} ready at {r.address} after {time.monotonic() - started:.0f}s", flush=True)
        for failure in status.start_failures:
            if failure.replica not in seen:
                seen.add(failure.replica)
                print(
                    f"  {failure.role} worker {failure.replica} failed to start: {_start_failure_text(failure.cause)}",
                    file=sys.stderr,
                    flush=True,
                )
        for role, pool in status.pools.items():
            if pool.failed_starts_in_a_row >= GIVE_UP_AFTER_FAILED_STARTS:
                print(
                    f"pdcluster serve: {pool.failed_starts_in_a_row} {role} workers in a row failed to start (above: why); stopping",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        if all(pool.ready >= pool.target for pool in status.pools.values()):
            return 0
    return 130


def _on_ready(info, models, ready_file: str, ray_address: str) -> None:
    print(
        f"pdcluster ready: {info.http}/v1 (OpenAI), grpc {info.grpc}, model {', '.join(info.models)}, "
        f"{_pools_text(models)} (Ctrl-C to stop)",
        flush=True,
    )
    _write_ready(ready_file, info, models, ray_address)


def _write_ready(ready_file: str, router, models, ray_address: str) -> None:
    """The typed record of a serving cluster, for scripts (the printed line is for people)."""
    if ready_file:
        from pdcluster.common.files import write_atomically
        from pdcluster.common.worker_record import ServeRecord

        record = ServeRecord(
            router=router,
            ray_address=ray_address,
            prefill_workers=sum(m.prefill.replicas for m in models),
            decode_workers=sum(m.decode.replicas for m in models),
            pid=os.getpid(),
        )
        write_atomically(ready_file, record.model_dump_json())


def _ask_controller(args: argparse.Namespace, method: str, *call_args, controller=None):
    """Call one controller method; a refusal (ValueError there) is printed as the command's error."""
    from pdcluster.cluster.ray_cluster import find_controller

    controller = controller or find_controller(args.name, args.address)  # before importing ray: it sets Ray up
    import ray

    try:
        return ray.get(getattr(controller, method).remote(*call_args))
    except ray.exceptions.RayTaskError as e:
        print(f"pdcluster {args.command}: {e.cause if hasattr(e, 'cause') else e}", file=sys.stderr)
        return None


def _switch(args: argparse.Namespace) -> int:
    role = _ask_controller(args, "switch_replica", args.replica, args.role)
    if role is None:
        return 1
    print(f"{args.replica} serves {role}")
    return 0 if role == args.role else 1


def _scale(args: argparse.Namespace) -> int:
    decision = _ask_controller(args, "scale_pool", args.role, args.replicas)
    if decision is None:
        return 1
    print(f"{args.role} pool: {decision.from_replicas} -> {decision.to_replicas} replicas")
    return 0


def _restart(args: argparse.Namespace) -> int:
    from pdcluster.cluster.ray_cluster import find_controller

    spec_json = ""  # checked before anything connects: a bad flag is the error shown
    if args.config or args.vllm_flags or args.prefill_args or args.decode_args:
        from pdcluster.cluster.cluster_spec import upgrade_spec

        try:
            spec_json = upgrade_spec(
                args.config, args.vllm_flags, {"prefill": args.prefill_args, "decode": args.decode_args}
            ).model_dump_json()
        except ValueError as e:  # pydantic's and vLLM's refusals both
            print(f"pdcluster restart: {e}", file=sys.stderr)
            return 2
    controller = find_controller(args.name, args.address)  # before importing ray: it sets Ray up
    import ray

    count = _ask_controller(args, "restart_pool", args.role, spec_json, controller=controller)
    if count is None:
        return 1
    print(f"{args.role} pool: replacing {count} replicas, one at a time{' with the new spec' if spec_json else ''}", flush=True)

    began = time.monotonic()
    while time.monotonic() - began < args.timeout:
        pool = ray.get(controller.status.remote()).pools[args.role]
        if pool.outdated == 0 and pool.ready >= pool.target:
            print(f"{args.role} pool restarted: {count} replicas replaced in {time.monotonic() - began:.0f}s")
            return 0
        time.sleep(1)
    print(f"pdcluster restart: {pool.outdated} {args.role} replicas still to replace after {args.timeout:.0f}s", file=sys.stderr)
    return 1


def _status(args: argparse.Namespace) -> int:

    from pdcluster.cluster.ray_cluster import find_controller, model_controllers

    controller = find_controller(args.name, args.address)  # before importing ray: it sets Ray up
    import ray

    status = ray.get(controller.status.remote())
    if args.json:
        print(status.model_dump_json())
        return 0
    for each in [status, *ray.get([c.status.remote() for c in model_controllers(args.name)])]:
        _print_status(each)
    return 0


def _print_status(status: ClusterStatus) -> None:
    print(f"cluster {status.name} (autoscaling {'on' if status.autoscaling else 'off'})")
    for role, pool in status.pools.items():
        print(f"  {role:<8} ready {pool.ready}/{pool.target} (min {pool.min}, max {pool.max}) per replica {pool.resources}")
    for r in status.replicas:
        print(
            f"    {r.id:<18} {r.role:<8} {r.state:<9} {r.address:<22} pid {r.pid:<7} running {r.running:<3} "
            f"free KV {r.free_kv_blocks}/{r.total_kv_blocks}  up {r.age_s:.0f}s" + (f"  UNREACHABLE: {r.cut_off}" if r.cut_off else "")
        )
    for d in status.decisions[-10:]:
        print(f"  autoscaler {time.strftime('%H:%M:%S', time.localtime(d.at))} {d.role} {d.from_replicas} -> {d.to_replicas}: {d.reason}")
    for h in status.heals[-10:]:
        print(f"  healed {h.role}: {h.replaced} ({h.reason}) -> {h.replacement} in {h.seconds}s")
    for f in status.start_failures[-5:]:
        print(f"  failed to start: {f.role} {f.replica}: {_start_failure_text(f.cause)}")


def _profile(args: argparse.Namespace) -> int:
    if args.cores:  # before torch loads: its thread pool sizes itself once, to the cores it may use
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
        os.environ["OMP_NUM_THREADS"] = str(args.cores)
    from pdcluster.common.vllm_args import engine_args_from_flags
    from pdcluster.planner.profiler import profile_engine
    from pdcluster.worker.config import EngineConfig

    engine_args, unknown = engine_args_from_flags(args.vllm_flags)
    if unknown:
        print(f"pdcluster profile: not vLLM engine flags: {' '.join(unknown)}", file=sys.stderr)
        return 2
    engine = EngineConfig(model=args.model, kv_cache_gib=args.kv_cache_gib, **engine_args)
    profile = profile_engine(engine, args.kv_transport, args.quick, args.cost_per_hour, args.name, args.serving_path)
    profile.save(args.out)
    s = profile.step
    print(
        f"{profile.name}: step = {s.base_s * 1e3:.3f} ms + {s.per_token_s * 1e6:.3f} us/token + "
        f"{s.per_prefill_pair_s * 1e9:.4f} ns/prompt pair + {s.per_decode_context_token_s * 1e9:.3f} ns/context token; "
        f"KV {profile.kv_bytes_per_token} B/token, {profile.kv_capacity_tokens} tokens; transfer {profile.transfer_gbps:.2f} GB/s"
    )
    path = profile.serving_path
    print(
        f"serving path: +{path.request_s * 1e3:.1f} ms to a prompt's first token on its decode worker, "
        f"+{path.remote_request_s * 1e3:.1f} ms prefilled remotely, +{path.token_s * 1e3:.2f} ms per later token"
    )
    print(f"{profile.sources['step']}\nwritten to {args.out}")
    return 0


def _add_trace_flags(parser: argparse.ArgumentParser) -> None:
    from pdcluster.planner.workloads import TRACE_FORMATS

    parser.add_argument("--trace", default="", help="replay this request trace (see ../shared/traces/README.md)")
    parser.add_argument("--trace-format", choices=TRACE_FORMATS, default="mooncake")
    parser.add_argument("--length-scale", type=float, default=1.0, help="multiply prompt and output lengths by this")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times by this (below 1: faster)")
    parser.add_argument("--max-requests", type=int, default=0, help="replay only the first N requests (0: all)")
    parser.add_argument("--first-request", type=int, default=0, help="start at this request of the trace (a later window)")


def _trace_requests(args: argparse.Namespace, max_model_len: int):
    from pdcluster.planner.workloads import TraceScaling, load_trace

    scaling = TraceScaling(args.length_scale, args.time_scale, args.max_requests, max_model_len, first_request=args.first_request)
    return load_trace(args.trace, args.trace_format, scaling)


def _profiles(args: argparse.Namespace):
    """The profile per pool (role -> EngineProfile) for simulate and plan."""
    from pdcluster.planner.profile_files import profile_for_tp, resolve_profile_path

    tp = dict(prefill=args.tp, decode=args.tp) if args.tp.isdigit() else dict(kv.split("=") for kv in args.tp.split(","))
    return {
        role: _kv_blocks(profile_for_tp(resolve_profile_path(getattr(args, f"{role}_profile") or args.profile), int(tp[role])), args)
        for role in ("prefill", "decode")
    }


def _kv_blocks(profile, args: argparse.Namespace):
    """The profile with vLLM's --num-gpu-blocks-override applied: its KV cache in blocks."""
    blocks = args.num_gpu_blocks_override
    return profile.model_copy(update={"kv_capacity_tokens": blocks * profile.block_size}) if blocks else profile


def _simulate(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from pdcluster.planner.simulator import ClusterShape, simulate
    from pdcluster.planner.workloads import COMPARE_WORKLOADS, AgenticSessions
    from pdcluster.router.config import parse_router_args

    try:
        profiles = _profiles(args)
        shape = ClusterShape(
            profiles["prefill"] if args.prefill else None,
            profiles["decode"],
            args.prefill,
            args.decode,
            parse_router_args(shlex.split(args.router_flags)),
            shared_cores=args.shared_cores,
            tier_gib=args.kv_offloading_size,
        )
        if args.trace:
            runs = [("trace", _trace_requests(args, profiles["decode"].max_model_len))]
        elif args.workload == "agentic":  # its sessions set their own pace: no rates
            runs = [("agentic", AgenticSessions().shapes())]
        elif args.workload:
            workload = COMPARE_WORKLOADS[args.workload]
            # As `bench serve` sweeps: rate i draws from seed + i.
            runs = [(r, replace(workload, seed=workload.seed + i).shapes(args.requests, r)) for i, r in enumerate(args.rates)]
        else:
            raise ValueError("give --trace FILE or --workload NAME")
    except (ValueError, KeyError) as e:
        print(f"pdcluster simulate: {e}", file=sys.stderr)
        return 2
    results = []
    for label, requests in runs:
        result = simulate(shape, requests, args.slo_ttft_ms, args.slo_itl_ms)
        results.append({"rate": label, **result})
    _print_simulation(results, shape)
    if args.json:
        print(json.dumps({**results[0], "results": results}))
    return 0


def _print_simulation(results: list[dict], shape) -> None:
    from pdcluster.common.percentiles import format_ms

    print(
        f"simulated {shape.prefill_replicas} prefill + {shape.decode_replicas} decode replicas "
        f"({'co-located' if not shape.prefill_replicas else 'disaggregated'}), ${shape.cost_per_hour:.2f}/h"
        + (f", a {shape.tier_gib:g} GiB host KV tier under each" if shape.tier_gib else "")
    )
    print(
        f"{'rate':>6} {'done':>6} {'req/s':>7} {'TTFT p50/p90/p99 ms':>24} {'ITL p50/p90/p99 ms':>22} {'TPOT p50/p99 ms':>16} "
        f"{'in SLO':>7} {'cached':>7} {'util P/D':>10} {'$/1M in/out':>16}"
    )
    for r in results:
        util = "/".join(f"{r['pools'][p]['utilization']:.0%}" if p in r["pools"] else "-" for p in ("prefill", "decode"))
        cost = r["cost_usd_per_million_tokens"]
        print(
            f"{r['rate']!s:>6} {r['completed']:>6} {r['req_per_s']:>7.2f} {format_ms(r['ttft_ms']):>24} {format_ms(r['itl_ms']):>22} "
            f"{format_ms(r['tpot_ms'], ('p50', 'p99')):>16} {r['slo_attainment']:>7.1%} {r['prefix_hit_rate']:>7.1%} {util:>10} "
            f"{cost['input'] or 0:>7.3f}/{cost['output'] or 0:<8.3f}"
        )


def _plan(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from pdcluster.planner.plan import ATTAINMENT, plan
    from pdcluster.planner.plan_spec import write_plan_spec
    from pdcluster.planner.profile_files import profiles_by_size
    from pdcluster.planner.workloads import COMPARE_WORKLOADS, AgenticSessions
    from pdcluster.router.config import parse_router_args

    try:
        profiles = {size: _kv_blocks(p, args) for size, p in profiles_by_size(args.profile).items()}
        cost = {role: float(usd) for role, usd in (kv.split("=") for kv in args.cost.split(",") if kv)}
        if set(cost) - {"prefill", "decode"}:
            raise ValueError(f"--cost takes prefill=USD_PER_HOUR,decode=USD_PER_HOUR, not {args.cost!r}")
        if args.trace:
            requests = _trace_requests(args, max(p.max_model_len for p in profiles.values()))
        elif args.workload == "agentic":  # as many sessions as make --requests: few requests fit one batch at any rate
            requests = AgenticSessions(sessions=max(1, args.requests // AgenticSessions.turns)).shapes()
        elif args.workload:
            requests = COMPARE_WORKLOADS[args.workload].shapes(args.requests, 1.0)
        else:
            raise ValueError("give --trace FILE or --workload NAME")
    except (ValueError, KeyError) as e:
        print(f"pdcluster plan: {e}", file=sys.stderr)
        return 2
    router = parse_router_args(shlex.split(args.router_flags))
    on_gpus = any(p.gpus_per_replica for p in profiles.values())
    budget, unit = (args.max_gpus, "GPUs") if on_gpus else (args.cores or len(os.sched_getaffinity(0)), "cores")
    label = {size: f"TP{size}" if on_gpus else f"{size}-core" for size in sorted(profiles)}
    print(f"planning for {len(requests)} requests with {', '.join(label.values())} replicas, up to {budget} {unit}...", flush=True)
    for size, p in sorted(profiles.items()):
        if refused := sum(not p.holds(r.input_tokens, r.output_tokens) for r in requests):
            print(f"  a {label[size]} replica refuses {refused} of them: longer than its max_model_len {p.max_model_len}", flush=True)
    try:
        result = plan(
            profiles, requests, args.slo_ttft_ms, args.slo_itl_ms, budget, cost, router, tier_sizes=tuple(args.kv_offloading_size)
        )
    except ValueError as e:  # a profile without what a tier needs
        print(f"pdcluster plan: {e}", file=sys.stderr)
        return 2
    print(f"\n{'configuration':<34} {unit:>5} {'$/h':>8} {'goodput req/s':>14} {'req per $':>10}  basis")
    for c in result.candidates[: args.top]:
        basis = "per-phase estimate" if c.estimated else "simulated whole"
        print(f"{c.describe():<34} {c.units:>5} {c.cost_per_hour:>8.2f} {c.goodput_rate:>14.2f} {c.requests_per_dollar:>10.0f}  {basis}")
    chosen = result.chosen
    print(f"\nchosen: {chosen.describe()} on {chosen.units} {unit}{chosen.describe_tier()}.\nwhy: {result.reason}")
    rc = 0
    if chosen.goodput_rate == 0:
        print(f"no configuration on up to {budget} {unit} serves {ATTAINMENT:.0%} of these requests within the SLOs.")
        if args.write_spec:
            print(f"pdcluster plan: no cluster spec written to {args.write_spec}", file=sys.stderr)
            rc = 1
    elif args.write_spec:
        write_plan_spec(args.write_spec, result, profiles)
        print(f"cluster spec for {chosen.describe()} written to {args.write_spec} (pdcluster serve --config {args.write_spec})")
    if args.json:
        candidates = [asdict(c) for c in result.candidates]
        print(
            json.dumps(
                {
                    "chosen": asdict(chosen),
                    "reason": result.reason,
                    "candidates": candidates,
                    "tier_sizes": [asdict(t) for t in result.tier_sizes],
                }
            )
        )
    return rc


def _bench_transfer(args: argparse.Namespace) -> int:
    from pdcluster.bench.transfer_bench import main as bench_main

    return bench_main(
        json_output=args.json,
        repeats=args.repeats,
        sizes=args.tokens,
        streams_per_transfer=args.streams,
        chunk_bytes=args.chunk_mib << 20 if args.chunk_mib else None,
        lab=args.lab,
        hosts=tuple(args.hosts),
    )


def _bench_chaos(args: argparse.Namespace) -> int:
    from pdcluster.bench.chaos_bench import main as bench_main
    from pdcluster.bench.chaos_lab import LAB_FAULTS

    misplaced = [fault for fault in args.faults or () if (fault in LAB_FAULTS) != args.lab]
    if misplaced:
        where = "faults of a lab: add --lab" if not args.lab else "faults of one host: drop --lab"
        print(f"pdcluster bench chaos: {', '.join(misplaced)}: {where}", file=sys.stderr)
        return 2
    return bench_main(
        json_output=args.json,
        faults=args.faults,
        prefill=args.prefill,
        decode=args.decode,
        serve_flags=args.vllm_flags,
        load_s=args.load_seconds,
        lab=args.lab,
    )


def _bench_coldstart(args: argparse.Namespace) -> int:
    from pdcluster.bench.cold_start_bench import main as bench_main
    from pdcluster.common.vllm_args import engine_args_from_flags
    from pdcluster.worker.config import EngineConfig

    engine_args, unknown = engine_args_from_flags(args.vllm_flags)
    if unknown:
        print(f"pdcluster bench coldstart: not vLLM engine flags: {' '.join(unknown)}", file=sys.stderr)
        return 2
    bench_main(EngineConfig(model=args.model, **engine_args), args.roles, args.rounds, json_output=args.json)
    return 0


def _bench_prefix(args: argparse.Namespace) -> int:
    from pdcluster.bench.prefix_bench import main as bench_main

    if args.workload == "agentic":
        from pdcluster.planner.workloads import AgenticSessions

        trace = AgenticSessions().shapes()
    elif args.trace:
        trace = _trace_requests(args, args.max_model_len)
    else:
        print("pdcluster bench prefix: --trace (a trace whose prompts share prefixes: mooncake) or --workload agentic", file=sys.stderr)
        return 2
    report = bench_main(
        trace,
        tuple(args.modes),
        json_output=args.json,
        tier_gib=args.kv_offloading_size,
        engine_blocks=args.num_gpu_blocks_override,
        router_flags=shlex.split(args.router_flags),
        kv_transport=args.kv_transport,
    )
    return 0 if all(m["failed"] == 0 for m in report["modes"].values()) else 1


def _bench_router(args: argparse.Namespace) -> int:
    if args.prompt_tokens:
        from pdcluster.bench.router_vs_vllm_bench import main as long_main

        return long_main(args.prompt_tokens, args.requests or 3, args.json, args.disaggregated)
    from pdcluster.bench.router_bench import main as bench_main

    return bench_main(json_output=args.json, concurrency=args.concurrency, requests=args.requests or 200, model=args.model)


def _bench_pull(args: argparse.Namespace) -> int:
    from pdcluster.bench.pull_bench import main as bench_main

    return bench_main(args.prefix_tokens, args.new_tokens, args.samples, args.kv_transport, args.json)


def _bench_latency(args: argparse.Namespace) -> int:
    from pdcluster.bench.latency_bench import main as bench_main

    return bench_main(
        args.prompt_tokens,
        args.requests,
        args.max_tokens,
        model=args.model,
        json_output=args.json,
        kv_transport=args.kv_transport,
        pin_workers=args.pin_workers,
        traces=args.traces,
        lab=args.lab,
        hosts=tuple(args.hosts),
    )


def _bench_serve(args: argparse.Namespace) -> int:
    from pdcluster.bench.serve_bench import BenchTenant
    from pdcluster.bench.serve_bench import main as bench_main
    from pdcluster.planner.workloads import Workload

    workload = Workload(
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        distribution=args.distribution,
        prefix_share=args.prefix_share,
        prefix_groups=args.prefix_groups,
        seed=args.seed,
    )
    try:
        trace = _trace_requests(args, args.max_model_len) if args.trace else None
        tenants = [BenchTenant.parse(t) for t in args.tenant] or None
    except ValueError as e:
        print(f"pdcluster bench serve: {e}", file=sys.stderr)
        return 2
    results = bench_main(
        args.url,
        args.rates,
        args.requests,
        workload,
        trace=trace,
        cost_per_hour=args.cost_per_hour,
        tokenizer=args.tokenizer,
        model=args.model,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_itl_ms=args.slo_itl_ms,
        json_path=args.json_out,
        plot_path=args.plot,
        api_key=args.api_key,
        tenants=tenants,
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
        cost_per_hour=args.cost_per_hour,
        trace=_trace_requests(args, args.max_model_len) if args.trace else (),
        vllm_flags=args.vllm_flags,
        profile=args.profile,
        plan_with=args.plan_with,
    )
    return 0 if all(getattr(c, s).completed for c in comparisons for s in c.systems) else 1


def _bench_simcheck(args: argparse.Namespace) -> int:
    from pdcluster.bench.sim_check import main as bench_main
    from pdcluster.common.engine_profile import load_profile

    trace = _trace_requests(args, args.max_model_len) if args.trace else []
    bench_main(args.measured, load_profile(args.colocated_profile), load_profile(args.pd_profile), trace, args.json_out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pdcluster.bench.chaos_bench import FAULTS, LOAD_S
    from pdcluster.bench.chaos_lab import LAB_FAULTS
    from pdcluster.cluster.cluster_spec import add_cluster_flags
    from pdcluster.planner.plan import PLAN_REQUESTS
    from pdcluster.planner.workloads import COMPARE_RATES, COMPARE_WORKLOADS
    from pdcluster.router.config import PREFILL_ROUTING_MODES

    parser = argparse.ArgumentParser(prog="pdcluster", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("tiny", help="generate (once) the tiny test model; prints its directory")
    tiny.add_argument("--out", default=None, help="directory to write it to (default: the cache)")
    tiny.add_argument(
        "--variant",
        choices=["tiny", "bench", "long", "other"],
        default="tiny",
        help="tiny: 4 layers, 4K positions; bench: ~26M parameters, for bench compare; long: tiny with 128K positions; "
        "other: tiny with other weights, a second model",
    )
    tiny.set_defaults(func=_model_tiny)

    serve = sub.add_parser(
        "serve",
        help="run a cluster: workers on Ray, and the router",
        usage="pdcluster serve [MODEL] [pdcluster flags] [vllm serve flags]",
        description="Takes `vllm serve`'s command line as it is (the model positional or --model, any vLLM flag) "
        "and the pdcluster flags below, in any order.",
        allow_abbrev=False,
    )
    add_cluster_flags(serve)
    serve.add_argument("--ready-file", default="", help="write a JSON record (the router's URLs, pool sizes, pid) here once serving")
    serve.set_defaults(func=_serve, takes_vllm_flags=True)

    status = sub.add_parser("status", help="pools, replicas, health and autoscaler decisions of a running cluster")
    status.add_argument("--address", default="auto", help="Ray address (default: the local one)")
    status.add_argument("--name", default="pdcluster", help="cluster name in the spec")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    switch = sub.add_parser("switch", help="move one replica of a role-switching cluster to the other pool (it drains first)")
    switch.add_argument("replica", help="the replica's id (pdcluster status)")
    switch.add_argument("role", choices=ROLES)
    switch.add_argument("--address", default="auto", help="Ray address (default: the local one)")
    switch.add_argument("--name", default="pdcluster", help="cluster name in the spec")
    switch.set_defaults(func=_switch)

    scale = sub.add_parser("scale", help="set one pool's replica count (within its min and max); replicas start or drain")
    scale.add_argument("role", choices=ROLES)
    scale.add_argument("replicas", type=int)
    scale.add_argument("--address", default="auto", help="Ray address (default: the local one)")
    scale.add_argument("--name", default="pdcluster", help="cluster name in the spec")
    scale.set_defaults(func=_scale)

    restart = sub.add_parser(
        "restart", help="rolling restart: replace every replica of a pool, one at a time, each drained once its replacement serves"
    )
    restart.add_argument("role", choices=ROLES)
    restart.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the last replacement")
    restart.add_argument("--address", default="auto", help="Ray address (default: the local one)")
    restart.add_argument("--name", default="pdcluster", help="cluster name in the spec")
    restart.add_argument(
        "--config",
        action="append",
        default=[],
        help="a rolling upgrade: the new spec, as `serve --config` takes it (with vLLM flags, as serve's)",
    )
    for role in ("prefill", "decode"):
        restart.add_argument(f"--{role}-args", default="", help=f"with the upgrade's spec: vLLM engine flags for the {role} pool only")
    restart.set_defaults(func=_restart, takes_vllm_flags=True)

    lab = sub.add_parser("lab", help="emulated hosts on this Linux machine (network namespaces, root), each a Ray node")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lab_up = lab_sub.add_parser("up", help="build a lab: a head (Ray head, Redis) and hosts per pool, on a bridge")
    lab_up.add_argument("--name", default="pdlab", help="the lab's name (its namespaces' prefix)")
    lab_up.add_argument("--prefill-hosts", type=int, default=1)
    lab_up.add_argument("--decode-hosts", type=int, default=1)
    lab_up.add_argument("--router-hosts", type=int, default=0)
    lab_up.add_argument("--link", default=None, help="each host's link, RATE[,DELAY] as tc says them: 10gbit or 10gbit,200us")
    lab_up.add_argument("--subnet", default="10.77.0.0/24", help="the lab's addresses, only inside its namespaces")
    lab_up.add_argument("--no-ray", dest="ray", action="store_false", help="the network alone, no Ray nodes or Redis")
    lab_up.add_argument("--ssh", action="store_true", help="sshd and a home on every host, Ray left to `ray up` (deploy/ray/local.yaml)")
    lab_up.add_argument("--json", action="store_true")
    lab_up.set_defaults(func=_lab_up)
    lab_down = lab_sub.add_parser("down", help="kill every process on the lab's hosts and remove its namespaces and links")
    lab_down.add_argument("--name", default="pdlab")
    lab_down.set_defaults(func=_lab_down)
    lab_exec = lab_sub.add_parser("exec", help="run a command on one of the lab's hosts: pdcluster lab exec HOST -- CMD ...")
    lab_exec.add_argument("host", help="head, prefill-1, decode-1, router-1, ...")
    lab_exec.add_argument("argv", nargs=argparse.REMAINDER, help="the command")
    lab_exec.add_argument("--name", default="pdlab")
    lab_exec.set_defaults(func=_lab_exec)
    host_faults = {
        "cut": "cut a host off the lab's network (its cable), or from some hosts only (a partition)",
        "restore": "undo every cut and impairment of a host",
        "impair": "delay and drop what a host sends to some peers (netem's job, by a relay: this kernel has no netem)",
        "crash": "kill every process on a host at once (a power loss); `lab boot` brings it back",
        "boot": "a crashed host back: a fresh PID space and its Ray node",
    }
    for command, help_text in host_faults.items():
        fault = lab_sub.add_parser(command, help=help_text)
        fault.add_argument("host")
        fault.add_argument("--name", default="pdlab")
        if command == "cut":
            fault.add_argument("--from", dest="peers", nargs="+", default=[], metavar="HOST", help="only from these hosts")
        if command == "impair":
            fault.add_argument("--to", dest="peers", nargs="+", required=True, metavar="HOST", help="the peers whose packets are impaired")
            fault.add_argument("--delay-ms", type=float, default=0.0, help="added one-way delay")
            fault.add_argument("--loss", type=float, default=0.0, help="share of packets dropped, e.g. 0.05")
        fault.set_defaults(func=_lab_fault)

    profile = sub.add_parser("profile", help="measure this machine's engine (any vLLM engine flags) into a profile for simulate and plan")
    profile.add_argument("--model", default="", help="HF model directory (default: the tiny generated model)")
    profile.add_argument("--out", default="profile.json", help="where to write the profile")
    profile.add_argument("--name", default="", help="the profile's name (default: cpuN-MODEL)")
    profile.add_argument("--kv-transport", choices=TRANSPORTS, default="auto", help="transport to measure")
    profile.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    profile.add_argument("--cores", type=int, default=0, help="run on the first N cores, as one pool's worker would (default: all)")
    profile.add_argument("--cost-per-hour", type=float, default=0.0, help="USD per hour of one replica")
    profile.add_argument("--quick", action="store_true", help="fewer samples (for tests)")
    profile.add_argument(
        "--no-serving-path",
        dest="serving_path",
        action="store_false",
        help="skip measuring the serving path's own costs on a 1P+1D of the engine (they stay 0 in the profile)",
    )
    profile.set_defaults(func=_profile, takes_vllm_flags=True)

    for name, helptext in (
        ("simulate", "simulate a cluster on a profile: latencies, SLO attainment, utilization, $/1M tokens"),
        ("plan", "choose the shape for a workload: co-located replicas or a prefill/decode split, and replica sizes"),
    ):
        p = sub.add_parser(name, help=helptext)
        _add_trace_flags(p)
        p.add_argument(
            "--workload",
            default="",
            help="instead of a trace, a bench compare workload (" + ", ".join(COMPARE_WORKLOADS) + "), or bench prefix's agentic sessions",
        )
        p.add_argument("--requests", type=int, default=40, help=f"with --workload: requests (per rate; plan's default: {PLAN_REQUESTS})")
        p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
        p.add_argument("--slo-itl-ms", type=float, default=100.0, help="bound on each request's TPOT")
        p.add_argument(
            "--num-gpu-blocks-override",
            type=int,
            default=0,
            help="vLLM's flag: every replica's KV cache in blocks, instead of its profile's",
        )
        p.add_argument("--router-flags", default="", help="the router's own flags, e.g. '--bypass-prefill-below 64'")
        p.add_argument("--json", action="store_true", help="end with one JSON line")
    simulate_cmd, plan_cmd = sub.choices["simulate"], sub.choices["plan"]
    profile_help = "profile JSON, or a reference profile's name (e.g. h100-llama-3-8b-tp1)"
    simulate_cmd.add_argument("--profile", required=True, help=profile_help)
    simulate_cmd.add_argument("--rates", type=float, nargs="+", default=[1.0], help="with --workload: request rates (req/s)")
    simulate_cmd.add_argument("--prefill", type=int, default=1, help="prefill replicas (0: co-located engines)")
    simulate_cmd.add_argument("--decode", type=int, default=1, help="decode replicas")
    simulate_cmd.add_argument("--tp", default="1", help="tensor-parallel size: N, or prefill=N,decode=M (profiles -tpN beside --profile)")
    simulate_cmd.add_argument("--prefill-profile", default="", help="another profile for the prefill pool")
    simulate_cmd.add_argument("--decode-profile", default="", help="another profile for the decode pool (and co-located engines)")
    simulate_cmd.add_argument(
        "--shared-cores",
        action="store_true",
        help="every replica on the same cores, as a local `pdcluster serve` runs them on one machine (the profile's cores)",
    )
    simulate_cmd.add_argument(
        "--kv-offloading-size", type=float, default=0.0, help="a host KV tier of this many GiB under every replica (vLLM's flag)"
    )
    simulate_cmd.set_defaults(func=_simulate)
    plan_cmd.add_argument("--cost", default="", help="prefill=USD_PER_HOUR,decode=USD_PER_HOUR per GPU (default: the profiles')")
    plan_cmd.add_argument(
        "--profile", required=True, nargs="+", help=profile_help + "; several: one per replica size (TP size, or cores on a CPU)"
    )
    plan_cmd.add_argument("--max-gpus", type=int, default=8, help="the budget of GPU profiles")
    plan_cmd.add_argument("--cores", type=int, default=0, help="the budget of CPU profiles (default: this machine's cores)")
    plan_cmd.add_argument(
        "--kv-offloading-size",
        type=float,
        nargs="+",
        default=[],
        help="host KV tier sizes (GiB per replica, 0 for none) to choose from: the plan sizes the chosen shape's tier",
    )
    plan_cmd.add_argument("--top", type=int, default=10, help="configurations to print")
    plan_cmd.add_argument("--write-spec", default="", help="write the best configuration as a cluster spec YAML here")
    plan_cmd.set_defaults(func=_plan, requests=PLAN_REQUESTS)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    transfer = bench_sub.add_parser("transfer", help="KV transfer throughput against raw TCP and memcpy")
    transfer.add_argument("--json", action="store_true", help="end with a JSON line")
    transfer.add_argument("--repeats", type=int, default=3)
    transfer.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt sizes")
    transfer.add_argument("--streams", type=int, default=None, help="streams per transfer (default: the setting)")
    transfer.add_argument("--chunk-mib", type=int, default=None, help="chunk size in MiB (default: the setting)")
    transfer.add_argument("--lab", default="", help="across this `pdcluster lab`'s link: the producer and consumer on two of its hosts")
    transfer.add_argument("--hosts", nargs=2, default=["prefill-1", "decode-1"], metavar=("PRODUCER", "CONSUMER"), help="with --lab")
    transfer.set_defaults(func=_bench_transfer)
    chaos = bench_sub.add_parser(
        "chaos", help="faults one at a time under load: requests lost, wrong, slowest, heal time (vLLM engine flags go to the cluster)"
    )
    chaos.add_argument("--json", action="store_true", help="end with a JSON line")
    chaos.add_argument(
        "--faults", nargs="+", choices=[*FAULTS, *LAB_FAULTS], help=f"default: {' '.join(FAULTS)}; with --lab, {' '.join(LAB_FAULTS)}"
    )
    chaos.add_argument("--prefill", type=int, default=2, help="prefill workers")
    chaos.add_argument("--decode", type=int, default=2, help="decode workers")
    chaos.add_argument(
        "--lab",
        action="store_true",
        help="on a lab of emulated hosts (`pdcluster lab`, root): a head, a prefill host, two decode hosts and a router host, with the network's faults",
    )
    chaos.add_argument(
        "--load-seconds", type=float, default=LOAD_S, help="arrivals (2 req/s) in each fault's window; the fault fires 4 s in"
    )
    chaos.set_defaults(func=_bench_chaos, takes_vllm_flags=True)
    coldstart = bench_sub.add_parser(
        "coldstart",
        help="a scale-up from the decision to the new replica's first token, by phase, beside the bare vLLM engine's start",
    )
    coldstart.add_argument("--json", action="store_true", help="end with a JSON line")
    coldstart.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES), help="the pools to grow, one after the other")
    coldstart.add_argument("--rounds", type=int, default=2, help="scale-ups per pool (and bare engine starts); medians are printed")
    coldstart.add_argument("--model", default="", help="HF model directory (default: the tiny model)")
    coldstart.set_defaults(func=_bench_coldstart, takes_vllm_flags=True)
    prefix = bench_sub.add_parser("prefix", help="prefix-cache hit rate and TTFT of each --prefill-routing mode on a trace replay")
    _add_trace_flags(prefix)
    prefix.add_argument("--modes", nargs="+", choices=PREFILL_ROUTING_MODES, default=list(PREFILL_ROUTING_MODES))
    prefix.add_argument("--max-model-len", type=int, default=4096, help="cap prompt + output at this")
    prefix.add_argument("--workload", choices=["agentic"], help="multi-turn agent sessions instead of --trace")
    prefix.add_argument("--kv-offloading-size", type=float, default=0.0, help="also run each mode with this host KV tier (GiB per worker)")
    prefix.add_argument("--num-gpu-blocks-override", type=int, default=0, help="the engines' KV cache in blocks (vLLM's flag; 0: as sized)")
    prefix.add_argument("--router-flags", default="", help="the router's own flags for every run, e.g. '--bypass-prefill-below 256'")
    prefix.add_argument("--kv-transport", default="auto", choices=["auto", "nixl", "tcp", "grpc"], help="the workers' KV transport")
    prefix.add_argument("--json", action="store_true", help="end with a JSON line")
    prefix.set_defaults(func=_bench_prefix)
    router = bench_sub.add_parser("router", help="router overhead against calling a worker directly")
    router.add_argument("--json", action="store_true", help="end with a JSON line")
    router.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    router.add_argument("--requests", type=int, default=0, help="requests per path and concurrency (default 200; 3 per length)")
    router.add_argument(
        "--prompt-tokens",
        type=int,
        nargs="+",
        default=[],
        help="long text prompts of these lengths (e.g. 1024 32768 100000) on the 128K-position tiny model, against "
        "vLLM's own server on the same prompts, one at a time",
    )
    router.add_argument("--disaggregated", action="store_true", help="with --prompt-tokens: also through 1P+1D (the whole path)")
    router.add_argument("--model", default="", help="HF model directory (default: the tiny model)")
    router.set_defaults(func=_bench_router)
    pull = bench_sub.add_parser("pull", help="a prefill worker's pull of a prefix from a peer, against computing it and against holding it")
    pull.add_argument("--prefix-tokens", type=int, nargs="+", default=[1024, 2048, 3968], help="prefix lengths")
    pull.add_argument("--new-tokens", type=int, default=64, help="tokens a turn adds to its prefix")
    pull.add_argument("--samples", type=int, default=5, help="turns per prefix length and way")
    pull.add_argument("--kv-transport", default="auto", choices=["auto", "nixl", "tcp", "grpc"], help="the workers' KV transport")
    pull.add_argument("--json", action="store_true", help="end with a JSON line")
    pull.set_defaults(func=_bench_pull)
    latency = bench_sub.add_parser(
        "latency", help="one request at a time: TTFT and ITL of the disaggregated and bypass paths beside vLLM's own server"
    )
    latency.add_argument("--json", action="store_true", help="end with a JSON line")
    latency.add_argument("--prompt-tokens", type=int, nargs="+", default=[256, 1024, 4000], help="prompt lengths")
    latency.add_argument("--requests", type=int, default=20, help="requests per path and prompt length")
    latency.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    latency.add_argument("--model", default="", help="HF model directory (default: the tiny model)")
    latency.add_argument("--kv-transport", default="auto", choices=["auto", "nixl", "tcp", "grpc"], help="the workers' KV transport")
    latency.add_argument("--pin-workers", action="store_true", help="prefill worker on core 0, decode worker on core 1")
    latency.add_argument(
        "--no-traces",
        dest="traces",
        action="store_false",
        help="without OpenTelemetry tracing (and without the per-phase breakdown it gives)",
    )
    latency.add_argument("--lab", default="", help="the workers on two hosts of this `pdcluster lab`, the rest on its head")
    latency.add_argument("--hosts", nargs=2, default=["prefill-1", "decode-1"], metavar=("PREFILL", "DECODE"), help="with --lab")
    latency.set_defaults(func=_bench_latency)
    serve_bench = bench_sub.add_parser("serve", help="open-loop load (Poisson arrivals) against an OpenAI-compatible URL")
    serve_bench.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    serve_bench.add_argument("--model", default="", help="model name to send (default: the server's first)")
    serve_bench.add_argument("--tokenizer", default="", help="HF tokenizer directory for prompt token ids (default: the tiny model)")
    serve_bench.add_argument("--api-key", default=os.environ.get("PDCLUSTER_API_KEY", ""))
    serve_bench.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="NAME:KEY:WEIGHT[:MODEL]",
        help="mix callers: each request is one tenant's, by weight, with its key (and model); repeat per tenant. "
        "Reports each tenant's latencies, SLO attainment, share of the tokens and cost",
    )
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
    _add_trace_flags(serve_bench)
    serve_bench.add_argument("--max-model-len", type=int, default=4096, help="with --trace: cap prompt + output at this")
    serve_bench.add_argument("--cost-per-hour", type=float, default=0.0, help="USD per hour of the server under test: prints $/1M tokens")
    serve_bench.add_argument("--json-out", default="", help="write the results as JSON here")
    serve_bench.add_argument("--plot", default="", help="write a PNG of latency percentiles against rate here")
    serve_bench.set_defaults(func=_bench_serve)
    compare = bench_sub.add_parser(
        "compare",
        help="co-located vLLM against pdcluster 1P+1D and pdcluster as planned, same cores, same load (vLLM engine flags go to all)",
    )
    compare.add_argument("--model", default="", help="HF model directory (default: the generated bench model, ~26M parameters)")
    compare.add_argument("--rates", type=float, nargs="+", default=list(COMPARE_RATES), help="request rates to sweep (req/s)")
    compare.add_argument("--requests", type=int, default=40, help="requests per rate")
    compare.add_argument("--workloads", nargs="+", choices=list(COMPARE_WORKLOADS), default=list(COMPARE_WORKLOADS))
    compare.add_argument("--cores", type=int, default=0, help="cores to use, split evenly between prefill and decode (default: all)")
    compare.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    compare.add_argument("--slo-itl-ms", type=float, default=20.0, help="bound on each request's TPOT (mean inter-token latency)")
    compare.add_argument("--router-flags", default="", help="extra flags for pdcluster's router, e.g. '--local-prefill-above-queued 2048'")
    compare.add_argument(
        "--profile",
        default="",
        help="the workers' profile, for the router's placement (default: bench/profiles/cpuN-bench-llama.json for the bench model)",
    )
    compare.add_argument(
        "--plan-with",
        nargs="+",
        default=[],
        help="the engine's profiles, one per replica size, for `pdcluster plan` to choose each workload's shape "
        "(default: bench/profiles/cpuN-bench-llama.json for the bench model; without profiles, pdcluster as planned is left out)",
    )
    _add_trace_flags(compare)
    compare.add_argument("--max-model-len", type=int, default=4096, help="with --trace: cap prompt + output at this")
    compare.add_argument(
        "--cost-per-hour", type=float, default=0.0, help="USD per hour of the cores both systems share: prints $/1M output tokens"
    )
    compare.add_argument("--json-out", default="", help="write the results as JSON here")
    compare.add_argument("--plot", default="", help="write a PNG of p99 ITL, TPOT and TTFT and goodput against rate here")
    compare.set_defaults(func=_bench_compare, takes_vllm_flags=True)
    simcheck = bench_sub.add_parser("simcheck", help="the simulator's predictions beside a bench compare run's measurements")
    simcheck.add_argument("--measured", required=True, help="bench compare --json-out file")
    simcheck.add_argument("--colocated-profile", required=True, help="profile measured on all the cores (pdcluster profile)")
    simcheck.add_argument("--pd-profile", required=True, help="profile measured on one pool's half of the cores (--cores N/2)")
    _add_trace_flags(simcheck)
    simcheck.add_argument("--max-model-len", type=int, default=4096, help="with --trace: as bench compare had it")
    simcheck.add_argument("--json-out", default="")
    simcheck.set_defaults(func=_bench_simcheck)
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
