"""The benchmark's inputs: random token ids and lengths, the same for Hearth and the baseline.

Every prompt is drawn from its own seeded stream keyed by (seed, suite, sizes, repeat), so
both engines see identical inputs whatever order they run in, and no two prompts share a
prefix (random ids over the whole vocabulary): the prefix cache never turns a repeat into
a cache hit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SUITE_KEYS = {"decode": 1, "prefill": 2, "throughput": 3}


@dataclass(frozen=True, slots=True)
class TimedRequest:
    """One throughput request: its prompt ids and how many tokens to generate."""

    prompt: list[int]
    output_len: int


class Workload:
    """Seeded random inputs over a vocabulary of ``vocab_size`` ids."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)

    def _rng(self, suite: str, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SUITE_KEYS[suite], *key])

    def decode_prompts(self, batch: int, prompt_len: int, repeat: int) -> list[list[int]]:
        """``batch`` prompts of ``prompt_len`` ids for decode repeat ``repeat`` (0 = warm-up)."""
        ids = self._rng("decode", batch, prompt_len, repeat).integers(
            0, self.vocab_size, size=(batch, prompt_len))
        return ids.tolist()

    def prefill_prompt(self, length: int, repeat: int) -> list[int]:
        """One prompt of ``length`` ids for prefill repeat ``repeat`` (0 = warm-up)."""
        return self._rng("prefill", length, repeat).integers(0, self.vocab_size, size=length).tolist()

    def throughput_requests(self, n: int, min_len: int, max_len: int, stream: int = 0) -> list[TimedRequest]:
        """``n`` requests whose prompt and output lengths are uniform in [min_len, max_len].

        ``stream`` picks another independent set (1: the warm-up's), never a prefix of this one.
        """
        rng = self._rng("throughput", n, min_len, max_len, stream)
        lens = rng.integers(min_len, max_len + 1, size=(n, 2))
        return [TimedRequest(rng.integers(0, self.vocab_size, size=int(p)).tolist(), int(o))
                for p, o in lens]
