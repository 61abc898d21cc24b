"""A plan's chosen configuration as a cluster spec `pdcluster serve --config` takes."""

from __future__ import annotations

import yaml

from pdcluster.cluster.cluster_spec import ClusterSpec
from pdcluster.common.engine_profile import EngineProfile
from pdcluster.planner.plan import Candidate, Plan


def plan_spec(best: Candidate, profiles: dict[int, EngineProfile]) -> ClusterSpec:
    """Co-located engines are a decode pool alone: the router computes every prompt there."""
    decode = profiles[best.decode_size]

    def pool(size: int, replicas: int, cost_per_hour: float) -> dict:
        profile = profiles[size]
        return {
            "replicas": replicas,
            "min_replicas": replicas,
            "max_replicas": max(1, replicas),
            "tensor_parallel_size": profile.tensor_parallel_size,
            "num_gpus": float(profile.gpus_per_replica),
            **({"num_cpus": float(profile.cpu_cores)} if profile.cpu_cores else {}),
            "cost_per_hour": cost_per_hour,
        }

    return ClusterSpec.model_validate(
        {
            "engine": {
                "model": decode.model,
                # What the simulation assumed of each engine.
                "max_num_seqs": decode.max_num_seqs,
                "max_num_batched_tokens": decode.max_num_batched_tokens,
                "max_model_len": decode.max_model_len,
                **({"kv_offloading_size": best.tier_gib} if best.tier_gib else {}),
            },
            "prefill": pool(best.prefill_size, best.prefill_replicas, best.prefill_replica_cost),
            "decode": pool(best.decode_size, best.decode_replicas, best.decode_replica_cost),
        }
    )


def write_plan_spec(path: str, chosen: Plan, profiles: dict[int, EngineProfile]) -> None:
    best = chosen.chosen
    spec = plan_spec(best, profiles)
    with open(path, "w") as f:
        f.write(
            f"# pdcluster plan: {best.describe()}{best.describe_tier()}, {best.goodput_rate:.2f} req/s within SLOs, ${best.cost_per_hour:.2f}/h\n"
        )
        f.write(f"# why: {chosen.reason}\n")
        yaml.safe_dump(spec.model_dump(exclude_defaults=True), f, sort_keys=False)
