"""Multi-round overwrite recall (docs/evaluation.md task 2): the answer is a key's *current* value.

A row holds R rounds, each `ROUND, P × (key value), Q × (QUERY key), F × filler` (default P = Q = 4,
F = 16: 33 tokens a round). An assignment overwrites a key assigned in an earlier round with
probability `overwrite_prob` (and whenever no unused key is left), otherwise it takes a fresh key;
the keys of one round are distinct and an overwrite always changes the value. Each query asks a
key assigned so far (uniformly, this round's included); the answer, at the query's key position
(loss_mask 1), is the key's latest value.

Tokens (all < 256, so the byte vocabulary of 259 holds them):
    keys     [0, num_keys)            num_keys <= 64
    values   [64, 192)                128 values
    filler   [192, 252)               uniform random
    ROUND    252,  QUERY 253;  PAD 258 after the last round

Slices: rounds_since (current round − the round of the key's latest assignment), assignments (how
many times the key was assigned so far; >= 2 means overwritten). aux/stale_value holds the value
the latest overwrite replaced (-1 if never overwritten), for `metrics.stale_answer_rate`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from umv2_jax.data.tasks.base import Task, empty_batch

KEY_BASE, MAX_KEYS = 0, 64
VALUE_BASE, NUM_VALUES = 64, 128
FILLER_BASE, NUM_FILLER = 192, 60
ROUND, QUERY = 252, 253


@dataclasses.dataclass(frozen=True)
class OverwriteRecall(Task):
    """Parameters:
        rounds          R; 0 = as many whole rounds as fit data.seq_len (default 0)
        pairs           P assignments per round (default 4)
        queries         Q queries per round (default 4)
        filler          F random filler tokens per round (default 16)
        overwrite_prob  probability an assignment overwrites an earlier key (default 0.3)
        num_keys        size of the key pool, <= 64 (default 64)
    Slices: rounds_since, assignments.
    """

    name: ClassVar[str] = "overwrite"
    SLICES: ClassVar[tuple[str, ...]] = ("rounds_since", "assignments")
    AUX: ClassVar[tuple[str, ...]] = ("stale_value",)

    rounds: int = 0
    pairs: int = 4
    queries: int = 4
    filler: int = 16
    overwrite_prob: float = 0.3
    num_keys: int = 64

    @property
    def round_length(self) -> int:
        return 1 + 2 * self.pairs + 2 * self.queries + self.filler

    def min_seq_len(self) -> int:
        return self.round_length * max(self.rounds, 1)

    def num_rounds(self, seq_len: int) -> int:
        return self.rounds or seq_len // self.round_length

    def _check(self) -> None:
        if self.rounds < 0:
            self._fail("rounds", f"{self.rounds} is negative; use 0 (fit data.seq_len) or more")
        if self.pairs < 1 or self.queries < 1 or self.filler < 0:
            self._fail("pairs", "pairs and queries must be >= 1 and filler >= 0")
        if not 0 <= self.overwrite_prob <= 1:
            self._fail("overwrite_prob", f"{self.overwrite_prob} is not in [0, 1]")
        if not self.pairs <= self.num_keys <= MAX_KEYS:
            self._fail(
                "num_keys",
                f"{self.num_keys} is not in [pairs = {self.pairs}, {MAX_KEYS}]: a round assigns "
                f"{self.pairs} distinct keys and the token layout holds {MAX_KEYS}",
            )

    def _batch(self, rng, batch_size, seq_len, split, seed, index):
        batch = empty_batch(batch_size, seq_len, self.pad_id, self.SLICES)
        batch["aux/stale_value"] = np.full((batch_size, seq_len), -1, np.int32)
        rows = np.arange(batch_size)
        current = np.full((batch_size, self.num_keys), -1)  # value index per key, -1 unassigned
        previous = np.full((batch_size, self.num_keys), -1)  # the value the last overwrite replaced
        last_round = np.full((batch_size, self.num_keys), -1)
        assignments = np.zeros((batch_size, self.num_keys), np.int64)
        fresh_order = np.argsort(rng.random((batch_size, self.num_keys)), axis=1)
        fresh_used = np.zeros(batch_size, np.int64)
        inputs = batch["inputs"]
        for round_index in range(self.num_rounds(seq_len)):
            start = round_index * self.round_length
            inputs[:, start] = ROUND
            for slot in range(self.pairs):
                candidate = (current >= 0) & (last_round != round_index)
                has_fresh = fresh_used < self.num_keys
                overwrite = candidate.any(axis=1) & (
                    (rng.random(batch_size) < self.overwrite_prob) | ~has_fresh
                )
                pick = np.where(candidate, rng.random(candidate.shape), -1.0).argmax(axis=1)
                fresh = fresh_order[rows, np.minimum(fresh_used, self.num_keys - 1)]
                key = np.where(overwrite, pick, fresh)
                fresh_used += ~overwrite
                old = current[rows, key]
                # A new value, never equal to the old one: draw from the other 127 and skip it.
                draw = rng.integers(0, NUM_VALUES - 1, size=batch_size)
                value = np.where(
                    overwrite, draw + (draw >= old), rng.integers(0, NUM_VALUES, batch_size)
                )
                previous[rows, key] = np.where(overwrite, old, -1)
                current[rows, key] = value
                last_round[rows, key] = round_index
                assignments[rows, key] += 1
                inputs[:, start + 1 + 2 * slot] = KEY_BASE + key
                inputs[:, start + 2 + 2 * slot] = VALUE_BASE + value
            for query in range(self.queries):
                assigned = current >= 0
                key = np.where(assigned, rng.random(assigned.shape), -1.0).argmax(axis=1)
                at = start + 1 + 2 * self.pairs + 2 * query
                inputs[:, at] = QUERY
                inputs[:, at + 1] = KEY_BASE + key
                batch["targets"][:, at + 1] = VALUE_BASE + current[rows, key]
                batch["loss_mask"][:, at + 1] = 1.0
                batch["slice/rounds_since"][:, at + 1] = round_index - last_round[rows, key]
                batch["slice/assignments"][:, at + 1] = assignments[rows, key]
                stale = previous[rows, key]
                batch["aux/stale_value"][:, at + 1] = np.where(stale >= 0, VALUE_BASE + stale, -1)
            filler_at = start + 1 + 2 * self.pairs + 2 * self.queries
            inputs[:, filler_at : filler_at + self.filler] = FILLER_BASE + rng.integers(
                0, NUM_FILLER, size=(batch_size, self.filler)
            )
        return batch
