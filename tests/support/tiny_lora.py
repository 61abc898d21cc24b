"""Small LoRA adapters for the tiny model, made with peft (once, cached beside the model):
rank 8 on every attention and MLP projection, with random (seeded) A and B so an adapter
really changes the output, and the KV (k_proj, v_proj)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ensure_tiny_lora(model_dir: str | Path, seed: int) -> Path:
    model_dir = Path(model_dir)
    target = model_dir.parent / f"{model_dir.name}-lora-r{RANK}-s{seed}"
    if (target / "adapter_config.json").exists():
        return target
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # init_lora_weights=False: B random too (peft's default B = 0 would leave the model as is);
    # alpha = rank keeps the update the size of one random projection.
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=False)
    adapted = get_peft_model(model, config)
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=model_dir.parent))
    try:
        adapted.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "adapter_config.json").exists():  # lost a race: theirs is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
