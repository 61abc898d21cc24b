"""Synthetic request mixes for the load generators: prompt and output lengths drawn from a
seeded distribution, optionally sharing prompt prefixes."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Workload:
    prompt_tokens: int = 512
    output_tokens: int = 64
    distribution: str = "uniform"  # fixed | uniform (±50%) | exponential (mean as given)
    prefix_share: float = 0.0  # fraction of each prompt taken from a shared prefix
    prefix_groups: int = 4  # how many distinct shared prefixes
    seed: int = 0

    def _length(self, rng: random.Random, mean: int) -> int:
        if self.distribution == "fixed":
            return mean
        if self.distribution == "exponential":
            return max(1, int(rng.expovariate(1.0 / mean)))
        return max(1, int(rng.uniform(0.5 * mean, 1.5 * mean)))

    def requests(self, count: int, vocab: int) -> list[tuple[list[int], int]]:
        """(prompt token ids, output tokens) per request, the same for the same seed."""
        rng = random.Random(self.seed)
        low, high = min(100, vocab // 4), vocab - 1  # clear of the special tokens at the start
        shared_len = int(self.prompt_tokens * self.prefix_share)
        prefixes = [[rng.randint(low, high) for _ in range(shared_len)] for _ in range(self.prefix_groups)]
        out = []
        for _ in range(count):
            n = self._length(rng, self.prompt_tokens)
            head = rng.choice(prefixes)[: min(shared_len, n)] if shared_len else []
            out.append((head + [rng.randint(low, high) for _ in range(n - len(head))], self._length(rng, self.output_tokens)))
        return out


# `pdcluster bench compare`'s mixes.
COMPARE_WORKLOADS = {
    # Long prompts, short answers: prefill steps land between a co-located engine's decode steps.
    "prefill-heavy": Workload(prompt_tokens=1024, output_tokens=32, distribution="uniform", seed=1),
    "decode-heavy": Workload(prompt_tokens=128, output_tokens=256, distribution="uniform", seed=2),
}
