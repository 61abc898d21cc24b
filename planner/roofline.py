"""Reference profiles for GPUs this machine does not have, from a roofline.

Compute from the datasheet's dense BF16 peak, memory traffic from its HBM bandwidth,
tensor-parallel all-reduces over NVLink, KV transfers over one 400 Gb/s NIC per GPU, the host
KV tier over each GPU's PCIe link. The
efficiencies that turn peaks into expected figures are estimates, named as such in each
profile's `sources`; `python -m pdcluster.planner.roofline` rewrites the shipped files, and
a unit test checks they are what this module computes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdcluster.common.engine_profile import EngineProfile, StepCost
from pdcluster.planner.profile_files import REFERENCE_DIR

GIB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense
    hbm_tbps: float
    memory_gib: float
    usd_per_hour: float
    source: str
    price_source: str


@dataclass(frozen=True)
class LlamaShape:
    name: str
    params_b: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    source: str

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * self.head_dim * 2 * 2  # K and V, bf16

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * 2


GPUS = {
    "h100": Gpu(
        "H100-SXM5-80GB",
        989.4,
        3.35,
        80,
        2.99,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989.4 TFLOPS dense BF16, 3.35 TB/s HBM3, 80 GB, NVLink 900 GB/s",
        "estimate: a typical 2025 on-demand cloud list price per H100 GPU-hour; pass your own with --cost",
    ),
    "h200": Gpu(
        "H200-SXM-141GB",
        989.4,
        4.8,
        141,
        3.79,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOPS dense BF16, 4.8 TB/s HBM3e, 141 GB, NVLink 900 GB/s",
        "estimate: a typical 2025 on-demand cloud list price per H200 GPU-hour; pass your own with --cost",
    ),
}
MODELS = {
    "llama-3-8b": LlamaShape(
        "meta-llama/Meta-Llama-3.1-8B",
        8.03,
        32,
        4096,
        32,
        8,
        128,
        "Meta Llama 3.1 8B config.json: 32 layers, hidden 4096, 32 heads, 8 KV heads, head dim 128; 8.03B parameters",
    ),
    "llama-3-70b": LlamaShape(
        "meta-llama/Meta-Llama-3.1-70B",
        70.6,
        80,
        8192,
        64,
        8,
        128,
        "Meta Llama 3.1 70B config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads, head dim 128; 70.6B parameters",
    ),
}
TP_SIZES = (1, 2, 4, 8)

# Estimates: what fraction of a peak a serving engine reaches, and fixed costs.
GEMM_EFFICIENCY = 0.6  # dense BF16 GEMMs in large prefill batches
ATTENTION_EFFICIENCY = 0.5  # FlashAttention-class prefill kernels
HBM_EFFICIENCY = 0.8  # streaming weights and KV
NVLINK_GBPS = 450 * 0.7  # one direction of NVLink 4's 900 GB/s, at 70%
NIC_GBPS = 50 * 0.8  # one ConnectX-7 400 Gb/s NIC per GPU (as in DGX H100/H200), at 80%
PCIE_GBPS = 64 * 0.8  # each GPU's PCIe Gen5 x16 link to host memory (the host KV tier), one direction, at 80%
STEP_OVERHEAD_S = 0.0015  # scheduler, sampling and launches per engine step
TRANSFER_LATENCY_S = 0.0005  # NIXL/UCX RDMA write completion and notification per transfer
ACTIVATION_RESERVE_GIB = 4  # per GPU, besides weights and KV
MEMORY_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization default
MAX_MODEL_LEN = 131072  # Llama 3.1's context
BLOCK_SIZE, MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS = 16, 1024, 8192  # vLLM serve's defaults on H100/H200


def reference_profile(gpu_key: str, model_key: str, tp: int) -> EngineProfile | None:
    """The roofline profile of one replica, or None when the weights leave no room for KV."""
    gpu, model = GPUS[gpu_key], MODELS[model_key]
    flops = tp * gpu.bf16_tflops * 1e12
    hbm = tp * gpu.hbm_tbps * 1e12 * HBM_EFFICIENCY
    kv_room = tp * (gpu.memory_gib * MEMORY_UTILIZATION - ACTIVATION_RESERVE_GIB) * GIB - model.weight_bytes
    kv_tokens = int(kv_room // model.kv_bytes_per_token)
    if kv_tokens < MAX_NUM_BATCHED_TOKENS:
        return None
    all_reduce = 0.0 if tp == 1 else 2 * model.layers * model.hidden * 2 * 2 * (tp - 1) / tp / (NVLINK_GBPS * 1e9)
    step = StepCost(
        base_s=STEP_OVERHEAD_S + model.weight_bytes / hbm,
        per_token_s=2 * model.params_b * 1e9 / (flops * GEMM_EFFICIENCY) + all_reduce,
        per_prefill_pair_s=4 * model.layers * model.heads * model.head_dim / (flops * ATTENTION_EFFICIENCY),
        per_decode_context_token_s=model.kv_bytes_per_token / hbm,
    )
    name = f"{gpu_key}-{model_key}-tp{tp}"
    estimate = "estimate (roofline)"
    return EngineProfile(
        name=name,
        estimate=True,
        hardware=f"{tp} x {gpu.name}",
        model=model.name,
        tensor_parallel_size=tp,
        gpus_per_replica=tp,
        block_size=BLOCK_SIZE,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        # vLLM refuses to start with a context its KV cache cannot hold, so a small cache caps it.
        max_model_len=min(MAX_MODEL_LEN, kv_tokens // BLOCK_SIZE * BLOCK_SIZE),
        kv_capacity_tokens=kv_tokens,
        kv_bytes_per_token=model.kv_bytes_per_token,
        step=step,
        transfer_gbps=tp * NIC_GBPS,
        transfer_latency_s=TRANSFER_LATENCY_S,
        tier_gbps=tp * PCIE_GBPS,
        cost_per_hour=round(tp * gpu.usd_per_hour, 2),
        sources={
            "hardware": gpu.source,
            "model": model.source,
            "step.base_s": f"{estimate}: weights read once per step at {HBM_EFFICIENCY:.0%} of HBM bandwidth, "
            f"plus {STEP_OVERHEAD_S * 1e3:g} ms of scheduling and launches (estimate)",
            "step.per_token_s": f"{estimate}: 2 x parameters FLOPs per token at {GEMM_EFFICIENCY:.0%} of dense BF16 peak"
            + (f", plus 2 all-reduces per layer over NVLink at {NVLINK_GBPS:g} GB/s (estimate)" if tp > 1 else ""),
            "step.per_prefill_pair_s": f"{estimate}: 4 x layers x heads x head dim FLOPs per attended pair "
            f"at {ATTENTION_EFFICIENCY:.0%} of peak",
            "step.per_decode_context_token_s": f"{estimate}: the KV of each context token read once per step "
            f"at {HBM_EFFICIENCY:.0%} of HBM bandwidth",
            "kv_capacity_tokens": f"{estimate}: {MEMORY_UTILIZATION:.0%} of HBM less weights and "
            f"{ACTIVATION_RESERVE_GIB} GiB of activations per GPU",
            "transfer_gbps": f"{estimate}: one 400 Gb/s ConnectX-7 NIC per GPU (DGX H100/H200 layout) at 80%",
            "transfer_latency_s": f"{estimate}: RDMA write completion and notification",
            "tier_gbps": f"{estimate}: each GPU's PCIe Gen5 x16 link to host memory (64 GB/s one way) at 80%",
            "max_model_len": f"Llama 3.1's {MAX_MODEL_LEN} tokens, or what the KV cache holds if less (vLLM refuses more)",
            "max_num_seqs": "vLLM 0.32 `vllm serve` default on GPUs with >= 70 GiB (EngineArgs)",
            "max_num_batched_tokens": "vLLM 0.32 `vllm serve` default on GPUs with >= 70 GiB (EngineArgs)",
            "cost_per_hour": gpu.price_source,
        },
    )


def reference_profiles() -> dict[str, EngineProfile]:
    profiles = (reference_profile(g, m, tp) for g in GPUS for m in MODELS for tp in TP_SIZES)
    return {p.name: p for p in profiles if p is not None}


def main() -> None:
    REFERENCE_DIR.mkdir(exist_ok=True)
    for name, profile in reference_profiles().items():
        profile.save(REFERENCE_DIR / f"{name}.json")
        print(REFERENCE_DIR / f"{name}.json")


if __name__ == "__main__":
    main()
