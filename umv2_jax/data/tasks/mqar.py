"""Multi-query associative recall (MQAR), the Zoology generator (Arora et al. 2023), in numpy.

An example of length L with K pairs (L even, 4K <= L):

    k1 v1 k2 v2 … kK vK | x x k3 x x x k1 x … x      positions 0 … L-1
                          ^ queries at even offsets 2K + 2·gap, gaps drawn without replacement
                            with probability ∝ a·g^(a-1), g = 1 … (L-2K)/2 (power law, a = 0.01)

keys: K distinct ids of [1, V/2); values: K distinct ids of [V/2, V) (V = `vocab`). Every key is
queried exactly once; at a query position the input is the key and the target is its value
(loss_mask 1). Other positions hold uniform random ids of [0, V) (Zoology's random_non_queries).

Training mix with one seq_len per batch: the rows of a batch cycle through the (L, K) settings of
`mix` (global row r = index·B + b takes setting r mod len(mix)), each example left-aligned in its
row and the tail padded with PAD (loss_mask 0). Under causal attention a left-aligned example
never sees the padding, so a row is exactly a length-L example. Every L must fit data.seq_len.
Test on other settings by passing another mix, e.g. {"mix": [[512, 32]]}.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from umv2_jax.data.tasks.base import (
    Task,
    empty_batch,
    sample_without_replacement,
    weighted_without_replacement,
)
from umv2_jax.data.tokenizer import PAD


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
    """Parameters:
        mix       ((L, K), …) example lengths and key-value pair counts, one per row in turn;
                  default ((64, 4), (128, 8), (256, 16)) — docs/evaluation.md's training mix
        vocab     V: content ids are [0, V); keys [1, V/2), values [V/2, V); default 256 (the
                  byte ids, so the default model vocabulary of 259 holds it)
        power_a   the power-law exponent a of the query gaps; default 0.01
    Slices: length (L of the row's example), pairs (its K).
    """

    name: ClassVar[str] = "mqar"
    SLICES: ClassVar[tuple[str, ...]] = ("length", "pairs")

    mix: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16))
    vocab: int = 256
    power_a: float = 0.01

    @property
    def vocab_size(self) -> int:
        return max(PAD + 1, self.pad_id + 1)

    @property
    def pad_id(self) -> int:
        return PAD if self.vocab <= 256 else self.vocab

    def min_seq_len(self) -> int:
        return max(length for length, _ in self.mix)

    def _check(self) -> None:
        if not self.mix:
            self._fail("mix", "is empty; give at least one [length, pairs] setting")
        if self.vocab < 4:
            self._fail("vocab", f"{self.vocab} is too small; keys and values need >= 4 ids")
        if not 0 < self.power_a <= 1:
            self._fail("power_a", f"{self.power_a} is not in (0, 1]")
        num_keys, num_values = self.vocab // 2 - 1, self.vocab - self.vocab // 2
        for length, pairs in self.mix:
            if pairs < 1 or length < 2 or length % 2:
                self._fail("mix", f"[{length}, {pairs}]: length must be even and >= 2, pairs >= 1")
            if 4 * pairs > length:
                self._fail(
                    "mix",
                    f"[{length}, {pairs}]: {pairs} pairs need 4·{pairs} = {4 * pairs} positions "
                    f"(pairs, then as many query slots), more than the length {length}; use at "
                    f"most {length // 4} pairs or a longer example",
                )
            if pairs > min(num_keys, num_values):
                self._fail(
                    "mix",
                    f"[{length}, {pairs}]: vocab {self.vocab} holds only {num_keys} keys and "
                    f"{num_values} values; raise data.task.vocab or use fewer pairs",
                )

    def _batch(self, rng, batch_size, seq_len, split, seed, index):
        batch = empty_batch(batch_size, seq_len, self.pad_id, self.SLICES)
        setting = (index * batch_size + np.arange(batch_size)) % len(self.mix)
        for which, (length, pairs) in enumerate(self.mix):
            rows = np.flatnonzero(setting == which)
            if rows.size:
                self._fill(rng, batch, rows, length, pairs)
        return batch

    def _fill(self, rng, batch, rows, length, pairs) -> None:
        count, half = rows.size, self.vocab // 2
        keys = 1 + sample_without_replacement(rng, half - 1, pairs, count)
        values = half + sample_without_replacement(rng, self.vocab - half, pairs, count)
        space = (length - 2 * pairs) // 2
        gaps = np.arange(1, space + 1, dtype=np.float64)
        weights = self.power_a * gaps ** (self.power_a - 1)
        chosen = weighted_without_replacement(rng, weights / weights.sum(), pairs, count)
        tokens = rng.integers(0, self.vocab, size=(count, length))  # the random non-queries
        tokens[:, 0 : 2 * pairs : 2] = keys
        tokens[:, 1 : 2 * pairs : 2] = values
        query_at = 2 * pairs + 2 * chosen  # [count, pairs]
        row_index = np.arange(count)[:, None]
        tokens[row_index, query_at] = keys
        batch["inputs"][rows, :length] = tokens
        full_rows = rows[:, None]
        batch["targets"][full_rows, query_at] = values
        batch["loss_mask"][full_rows, query_at] = 1.0
        batch["slice/length"][full_rows, query_at] = length
        batch["slice/pairs"][full_rows, query_at] = pairs
