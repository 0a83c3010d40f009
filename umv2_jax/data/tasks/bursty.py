"""Bursty few-shot classification (docs/evaluation.md task 5b; Chan et al. 2022, Reddy 2023), in tokens.

Items are 3-token strings over a 64-token alphabet. Each class has a fixed prototype string
(distinct, drawn once from `class_seed`); an exemplar is its prototype with each token replaced
by a uniform random alphabet token with probability `exemplar_noise`. Trained classes
0 … num_classes-1 each carry a fixed label in [0, num_labels); `novel_classes` more classes are
never shown in training.

An episode: N × (item label), then a query item; the answer (the query's label) is predicted at
the query's last token. 4N + 3 tokens, left-aligned, PAD after.
    train     with probability bursty_prob a bursty episode: N / burstiness trained classes, each
              `burstiness` times, the query from one of them (solvable in context or in weights);
              otherwise N iid trained classes and an iid query class (in weights only)
    test_icl  novel classes in a bursty context, labels assigned at random per episode (distinct
              per class): only in-context learning answers it
    test_iwl  a trained query class absent from the context of other trained classes, true
              labels: only in-weights learning answers it
    test      rows alternate test_iwl (even rows) and test_icl (odd rows)

Tokens: alphabet [0, 64), labels [64, 64 + num_labels) (num_labels <= 128).
Slices: kind (1 = the query's class is in the context: bursty train / test_icl, 0 = it is not
guaranteed / test_iwl), for `metrics.icl_iwl_accuracy`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np

from umv2_jax.data.tasks.base import Task, empty_batch, sample_without_replacement

ALPHABET, ITEM_LENGTH = 64, 3
LABEL_BASE, MAX_LABELS = 64, 128


@dataclasses.dataclass(frozen=True)
class BurstyClassification(Task):
    """Parameters:
        num_classes     trained classes K (default 512)
        novel_classes   held-out classes for test_icl (default 64)
        num_labels      L (default 32)
        context_pairs   N item-label pairs before the query (default 8)
        burstiness      copies of each class in a bursty context; divides N (default 4)
        bursty_prob     fraction of bursty training episodes (default 0.9)
        exemplar_noise  per-token replacement probability of an exemplar (default 0.1)
        class_seed      seed of the prototypes and labels (default 0)
    Slices: kind.
    """

    name: ClassVar[str] = "bursty_classification"
    SLICES: ClassVar[tuple[str, ...]] = ("kind",)
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test", "test_icl", "test_iwl")

    num_classes: int = 512
    novel_classes: int = 64
    num_labels: int = 32
    context_pairs: int = 8
    burstiness: int = 4
    bursty_prob: float = 0.9
    exemplar_noise: float = 0.1
    class_seed: int = 0

    @property
    def episode_length(self) -> int:
        return (ITEM_LENGTH + 1) * self.context_pairs + ITEM_LENGTH

    def min_seq_len(self) -> int:
        return self.episode_length

    def class_labels(self) -> np.ndarray:
        """int64[num_classes]: the fixed label index (not token) of each trained class."""
        return _classes(self.class_seed, self.num_classes, self.novel_classes, self.num_labels)[1]

    def _check(self) -> None:
        if not 2 <= self.num_labels <= MAX_LABELS:
            self._fail("num_labels", f"{self.num_labels} is not in [2, {MAX_LABELS}]")
        if self.context_pairs < 1 or self.burstiness < 1:
            self._fail("context_pairs", "context_pairs and burstiness must be >= 1")
        if self.context_pairs % self.burstiness:
            self._fail(
                "burstiness",
                f"{self.burstiness} does not divide context_pairs={self.context_pairs}",
            )
        groups = self.context_pairs // self.burstiness
        if self.num_classes < max(2, groups):
            self._fail(
                "num_classes", f"{self.num_classes} is fewer than a context needs ({groups})"
            )
        if self.novel_classes < groups or self.num_labels < groups:
            self._fail(
                "novel_classes",
                f"a bursty context holds {groups} classes with distinct labels: novel_classes "
                f"({self.novel_classes}) and num_labels ({self.num_labels}) must be >= {groups}",
            )
        if self.num_classes + self.novel_classes > ALPHABET**ITEM_LENGTH:
            self._fail("num_classes", f"more classes than the {ALPHABET**ITEM_LENGTH} item strings")
        if not 0 <= self.bursty_prob <= 1 or not 0 <= self.exemplar_noise <= 1:
            self._fail("bursty_prob", "bursty_prob and exemplar_noise must be in [0, 1]")

    def _batch(self, rng, batch_size, seq_len, split, seed, index):
        prototypes, labels = _classes(
            self.class_seed, self.num_classes, self.novel_classes, self.num_labels
        )
        n, groups, rows = (
            self.context_pairs,
            self.context_pairs // self.burstiness,
            np.arange(batch_size),
        )
        if split == "train":
            kind = (rng.random(batch_size) < self.bursty_prob).astype(np.int64)
        elif split == "test":
            kind = rows % 2
        else:
            kind = np.full(batch_size, int(split == "test_icl"))
        bursty = kind == 1
        novel = bursty & (split != "train")  # bursty test rows use the novel classes
        # Bursty contexts: `groups` distinct classes, each `burstiness` times, in random order.
        trained = sample_without_replacement(rng, self.num_classes, groups, batch_size)
        unseen = self.num_classes + sample_without_replacement(
            rng, self.novel_classes, groups, batch_size
        )
        chosen = np.where(novel[:, None], unseen, trained)  # [B, groups] class ids
        random_labels = sample_without_replacement(rng, self.num_labels, groups, batch_size)
        group_labels = np.where(novel[:, None], random_labels, labels[trained])
        order = np.argsort(rng.random((batch_size, n)), axis=1)
        bursty_context = np.repeat(chosen, self.burstiness, axis=1)[rows[:, None], order]
        bursty_labels = np.repeat(group_labels, self.burstiness, axis=1)[rows[:, None], order]
        slot = rng.integers(0, groups, batch_size)
        # In-weights contexts: iid trained classes; at test the query's class is left out.
        iid_query = rng.integers(0, self.num_classes, batch_size)
        exclude = int(split != "train")
        draw = rng.integers(0, self.num_classes - exclude, (batch_size, n))
        iid_context = draw + exclude * (draw >= iid_query[:, None])
        context = np.where(bursty[:, None], bursty_context, iid_context)
        context_labels = np.where(bursty[:, None], bursty_labels, labels[iid_context])
        query = np.where(bursty, chosen[rows, slot], iid_query)
        query_label = np.where(bursty, group_labels[rows, slot], labels[iid_query])
        items = np.concatenate([context, query[:, None]], axis=1)  # [B, N + 1] class ids
        strings = prototypes[items]  # [B, N + 1, 3]
        noisy = rng.random(strings.shape) < self.exemplar_noise
        strings = np.where(noisy, rng.integers(0, ALPHABET, strings.shape), strings)
        batch = empty_batch(batch_size, seq_len, self.pad_id, self.SLICES)
        episode = np.concatenate(
            [strings[:, :n], (LABEL_BASE + context_labels)[..., None]], axis=-1
        ).reshape(batch_size, -1)
        length = self.episode_length
        batch["inputs"][:, : length - ITEM_LENGTH] = episode
        batch["inputs"][:, length - ITEM_LENGTH : length] = strings[:, n]
        batch["targets"][:, length - 1] = LABEL_BASE + query_label
        batch["loss_mask"][:, length - 1] = 1.0
        batch["slice/kind"][:, length - 1] = kind
        # For tests and analysis: aux/classes int32[B, N + 1], the class of each item (query last).
        batch["aux/classes"] = items.astype(np.int32)
        return batch


@functools.lru_cache(maxsize=4)
def _classes(class_seed: int, num_classes: int, novel: int, num_labels: int):
    """(prototypes int32[K + novel, 3], labels int64[K]): distinct strings, fixed labels."""
    rng = np.random.default_rng([class_seed, 0x434C4153])
    codes = rng.choice(ALPHABET**ITEM_LENGTH, size=num_classes + novel, replace=False)
    digits = np.stack([(codes // ALPHABET**p) % ALPHABET for p in (2, 1, 0)], axis=-1)
    return digits.astype(np.int32), rng.integers(0, num_labels, num_classes)
