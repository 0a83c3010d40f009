"""Fact-base memorization (docs/evaluation.md task 4): `n1 n2 n3 r o ;` facts, loss on the object `o`.

A fact is (subject, relation) → object. Subjects are 3-token names over a 64-token alphabet
(64³ = 262,144 names), relations 8 tokens, objects 512 tokens; each fact's object is uniform random
and fixed: a hash of (fact_seed, subject, relation), so the same fact has the same object in every
batch, split and run. Local fact f of a base is subject f // 8 with relation f % 8 (each subject
carries all 8 relations); base b owns the global subjects s·16 + b (16 bases), so fact bases with
different `base` never share a fact, whatever their sizes (the injection experiment's A and B).
Names are a fixed random permutation (by fact_seed) of the name space, so subjects look random.

Sequences: `facts_per_sequence` facts, 6 tokens each, left-aligned, PAD after. The answer sits
at the relation position (target = o; the input then shows o, teacher forcing).
    train  the fact multiset shuffled in passes: stream slot t holds fact perm_p[t mod N] of pass
           p = t // N, perm_p seeded by (seed, p); `exposures` passes take train_batches(B)
           batches (set train.steps to it); the stream continues with more passes after that.
    test   every fact once, in order (batch i holds facts i·B·F …); the rows after the last fact
           are PAD. It is the recall test of the memorized facts, not new data.

Tokens: objects [0, 512), alphabet [512, 576), relations [576, 584), `;` 584, PAD 585:
model.vocab_size must be >= 586 (the byte default of 259 is too small; set it).
Slices: relation. aux/fact: the local fact index at answer positions (-1 elsewhere), for per-fact
cross-entropy and `metrics.knowledge_bits`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import numpy as np

from umv2_jax.data.tasks.base import Task, empty_batch

NUM_OBJECTS, ALPHABET, NUM_RELATIONS = 512, 64, 8
OBJECT_BASE, ALPHABET_BASE, RELATION_BASE = 0, 512, 576
SEPARATOR, FACT_PAD = 584, 585
NAME_LENGTH, FACT_LENGTH = 3, 6
NUM_NAMES = ALPHABET**NAME_LENGTH
MAX_BASES = 16
SUBJECTS_PER_BASE = NUM_NAMES // MAX_BASES
MAX_FACTS = SUBJECTS_PER_BASE * NUM_RELATIONS


@dataclasses.dataclass(frozen=True)
class FactBase(Task):
    """Parameters:
        num_facts           N facts in this base, <= 131,072 (default 4096)
        exposures           training passes over the facts, for train_batches (default 100)
        facts_per_sequence  F facts per row (default 16: 96 tokens)
        base                which fact base, 0 … 15 (default 0; B = 1 for injection)
        fact_seed           which names and objects (default 0; keep it across A and B)
    Slices: relation.
    """

    name: ClassVar[str] = "fact_base"
    SLICES: ClassVar[tuple[str, ...]] = ("relation",)
    AUX: ClassVar[tuple[str, ...]] = ("fact",)

    num_facts: int = 4096
    exposures: int = 100
    facts_per_sequence: int = 16
    base: int = 0
    fact_seed: int = 0

    @property
    def vocab_size(self) -> int:
        return FACT_PAD + 1

    @property
    def pad_id(self) -> int:
        return FACT_PAD

    @property
    def object_range(self) -> tuple[int, int]:
        """[lo, hi) of the object tokens (for metrics.cross_entropy_bits' token_range)."""
        return OBJECT_BASE, OBJECT_BASE + NUM_OBJECTS

    def min_seq_len(self) -> int:
        return FACT_LENGTH * self.facts_per_sequence

    def train_batches(self, batch_size: int) -> int:
        """Batches that show every fact `exposures` times (the last one may run into a new pass)."""
        return math.ceil(self.num_facts * self.exposures / (batch_size * self.facts_per_sequence))

    def test_batches(self, batch_size: int) -> int:
        """Batches of the test split that hold every fact once."""
        return math.ceil(self.num_facts / (batch_size * self.facts_per_sequence))

    def facts(self, fact: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local fact indices int[...] → (name tokens int32[..., 3], relation, object tokens)."""
        fact = np.asarray(fact, np.int64)
        subject = (fact // NUM_RELATIONS) * MAX_BASES + self.base
        relation = fact % NUM_RELATIONS
        name = _name_permutation(self.fact_seed)[subject]
        digits = np.stack(
            [(name // ALPHABET**p) % ALPHABET for p in range(NAME_LENGTH - 1, -1, -1)], axis=-1
        )
        obj = _hash(self.fact_seed, subject * NUM_RELATIONS + relation) % NUM_OBJECTS
        return (
            (ALPHABET_BASE + digits).astype(np.int32),
            (RELATION_BASE + relation).astype(np.int32),
            (OBJECT_BASE + obj).astype(np.int32),
        )

    def _check(self) -> None:
        if self.num_facts < 1:
            self._fail("num_facts", f"must be >= 1, got {self.num_facts}")
        if self.num_facts > MAX_FACTS:
            self._fail(
                "num_facts",
                f"{self.num_facts} facts need {math.ceil(self.num_facts / NUM_RELATIONS)} "
                f"subjects, more than the {SUBJECTS_PER_BASE} distinct 3-token names of a base "
                f"(64³ names / {MAX_BASES} bases); use at most {MAX_FACTS} facts",
            )
        if self.exposures < 1:
            self._fail("exposures", f"must be >= 1, got {self.exposures}")
        if self.facts_per_sequence < 1:
            self._fail("facts_per_sequence", f"must be >= 1, got {self.facts_per_sequence}")
        if not 0 <= self.base < MAX_BASES:
            self._fail("base", f"{self.base} is not in [0, {MAX_BASES})")
        if self.fact_seed < 0:
            self._fail("fact_seed", f"must be >= 0, got {self.fact_seed}")

    def _batch(self, rng, batch_size, seq_len, split, seed, index):
        per_row = self.facts_per_sequence
        slots = (index * batch_size * per_row + np.arange(batch_size * per_row)).reshape(
            batch_size, per_row
        )
        if split == "train":
            passes, position = np.divmod(slots, self.num_facts)
            fact = np.empty_like(slots)
            for one in np.unique(passes):
                where = passes == one
                fact[where] = _pass_order(int(seed), int(one), self.num_facts)[position[where]]
            valid = np.ones_like(slots, bool)
        else:
            fact, valid = np.minimum(slots, self.num_facts - 1), slots < self.num_facts
        name, relation, obj = self.facts(fact)
        batch = empty_batch(batch_size, seq_len, self.pad_id, self.SLICES)
        batch["aux/fact"] = np.full((batch_size, seq_len), -1, np.int32)
        tokens = np.concatenate(
            [name, relation[..., None], obj[..., None], np.full_like(obj, SEPARATOR)[..., None]],
            axis=-1,
        )  # [B, F, 6]
        tokens = np.where(valid[..., None], tokens, self.pad_id)
        batch["inputs"][:, : per_row * FACT_LENGTH] = tokens.reshape(batch_size, -1)
        answer = np.arange(per_row) * FACT_LENGTH + NAME_LENGTH  # the relation positions
        batch["targets"][:, answer] = np.where(valid, obj, 0)
        batch["loss_mask"][:, answer] = valid
        batch["slice/relation"][:, answer] = np.where(valid, relation - RELATION_BASE, -1)
        batch["aux/fact"][:, answer] = np.where(valid, fact, -1)
        return batch


@functools.lru_cache(maxsize=4)
def _name_permutation(fact_seed: int) -> np.ndarray:
    return np.random.default_rng([fact_seed, 0x4E414D45]).permutation(NUM_NAMES)


@functools.lru_cache(maxsize=4)
def _pass_order(seed: int, pass_index: int, num_facts: int) -> np.ndarray:
    return np.random.default_rng([seed % 2**63, 0x50415353, pass_index]).permutation(num_facts)


def _hash(seed: int, values: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, value): a fixed pseudo-random uint64 per value."""
    with np.errstate(over="ignore"):
        x = np.asarray(values, np.uint64) + np.uint64(seed) * np.uint64(0xD1B54A32D192ED03)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x
