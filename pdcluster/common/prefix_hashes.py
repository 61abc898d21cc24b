"""The names routers and workers give a prompt's full KV blocks: chained hashes of their
tokens, so that equal names mean equal prefixes (as vLLM's own block hashes do; those are
salted per process, so a router cannot compute them). A LoRA adapter's prompts chain from a
root of the adapter's name: their KV is the adapter's, never the base model's or another's."""

from __future__ import annotations

import numpy as np
import xxhash


def block_name(token_ids, parent: int) -> int:
    """The name of a block holding `token_ids` after the block named `parent` (0: none)."""
    return xxhash.xxh3_64_intdigest(np.asarray(token_ids, dtype=np.uint32).tobytes(), seed=parent)


def chain_root(lora_name: str | None) -> int:
    """The parent of a prompt's first block: 0 for the base model, else the adapter's."""
    return xxhash.xxh3_64_intdigest(b"lora:" + lora_name.encode()) if lora_name else 0


def prompt_block_hashes(token_ids: list[int], block_size: int, lora_name: str | None = None) -> list[int]:
    """The names of the prompt's full blocks, in order."""
    tokens = np.asarray(token_ids, dtype=np.uint32)
    hashes, parent = [], chain_root(lora_name)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_name(tokens[start : start + block_size], parent)
        hashes.append(parent)
    return hashes
