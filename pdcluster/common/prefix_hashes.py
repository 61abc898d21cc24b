"""The names routers and workers give a prompt's full KV blocks: chained hashes of their
tokens, so that equal names mean equal prefixes (as vLLM's own block hashes do; those are
salted per process, so a router cannot compute them)."""

from __future__ import annotations

import numpy as np
import xxhash


def block_name(token_ids, parent: int) -> int:
    """The name of a block holding `token_ids` after the block named `parent` (0: none)."""
    return xxhash.xxh3_64_intdigest(np.asarray(token_ids, dtype=np.uint32).tobytes(), seed=parent)


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The names of the prompt's full blocks, in order."""
    tokens = np.asarray(token_ids, dtype=np.uint32)
    hashes, parent = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_name(tokens[start : start + block_size], parent)
        hashes.append(parent)
    return hashes
