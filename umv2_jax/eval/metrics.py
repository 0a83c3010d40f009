"""Task metrics (docs/evaluation.md, tasks 1–5): counts at answer positions, sliced; knowledge bits; ICL MSE.

Everything here runs on host numpy arrays after the model's forward pass, never inside the
training step. Counts are `(correct, total)` pairs so batches add up (`merge_counts`):

    counts = exact_match(predictions, batch)              # predictions: int[B, S], e.g. argmax
    counts["all"], counts["pairs=8"]                      # (correct, total)
    grid = exact_match(predictions, batch, by=("depth", "length"))
    grid["depth=25,length=512"]
    accuracy(counts)                                      # {key: correct / total}

`batch` is a task batch (umv2_jax.data.tasks): loss_mask marks the answer positions, targets hold
the answers, `slice/<name>` the slice labels there. Where the vocabulary is large, take logits
only at the answer positions: `answer_positions(batch)` gives fixed-shape indices and
`gather_positions(x, positions)` picks them from any [B, S, ...] array (hidden states or logits).

Plain-numpy equivalents, for a reader:
    exact_match["all"]          ((pred == targets) & mask).sum(), mask.sum()
    knowledge_bits(ce_bits)     np.maximum(0, log2(num_objects) - ce_bits).sum()
    normalized_mse(p, y, var)   ((p - y) ** 2).mean(axis=0) / var
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Counts = dict[str, tuple[int, int]]


# --------------------------------------------------------------------------------------------------
# Exact match
# --------------------------------------------------------------------------------------------------


def exact_match(
    predictions: np.ndarray,
    batch: Mapping[str, np.ndarray],
    by: Sequence[str] | None = None,
) -> Counts:
    """Token exact match at answer positions: {"all": (correct, total), "<slice>=<value>": …}.

    predictions: int[B, S] predicted token per position (e.g. logits.argmax(-1)).
    batch: targets int[B, S], loss_mask float[B, S] (> 0 at answers), slice/<name> int[B, S].
    by: None = every slice of the batch on its own ("pairs=8", "length=128"); a tuple of slice
    names = their grid ("depth=25,length=512").
    """
    mask = np.asarray(batch["loss_mask"]) > 0
    correct = (np.asarray(predictions) == np.asarray(batch["targets"])) & mask
    return _sliced_counts(correct[mask], {k: np.asarray(v)[mask] for k, v in _slices(batch)}, by)


def sequence_exact_match(
    predictions: np.ndarray,
    batch: Mapping[str, np.ndarray],
    by: Sequence[str] | None = None,
) -> Counts:
    """Whole-answer exact match: an answer counts as correct only if all its tokens are.

    Answers are the groups of `aux/answer` (int[B, S], answer number within the row, -1 elsewhere)
    when the batch has it, else the maximal runs of consecutive answer positions in a row. A
    group's slice value is the one at its first token. Under teacher forcing, all tokens right
    means greedy decoding would produce the same answer, so this equals greedy exact match.
    """
    mask = np.asarray(batch["loss_mask"]) > 0
    correct = (np.asarray(predictions) == np.asarray(batch["targets"])) & mask
    group = _answer_groups(batch, mask)
    rows, cols = np.nonzero(mask)
    ids = group[rows, cols].astype(np.int64) + rows.astype(np.int64) * (group.max() + 1)
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    wrong = np.zeros(unique.size, np.int64)
    np.add.at(wrong, inverse, ~correct[rows, cols])
    slices = {k: np.asarray(v)[rows[first], cols[first]] for k, v in _slices(batch)}
    return _sliced_counts(wrong == 0, slices, by)


def merge_counts(*counts: Counts) -> Counts:
    """Sums (correct, total) per key over batches."""
    merged: dict[str, list[int]] = {}
    for one in counts:
        for key, (right, total) in one.items():
            entry = merged.setdefault(key, [0, 0])
            entry[0] += int(right)
            entry[1] += int(total)
    return {key: (right, total) for key, (right, total) in merged.items()}


def accuracy(counts: Counts) -> dict[str, float]:
    """correct / total per key (nan where total is 0)."""
    return {key: (right / total if total else math.nan) for key, (right, total) in counts.items()}


def stale_answer_rate(predictions: np.ndarray, batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(stale, total) over the overwrite task's answers to keys assigned more than once.

    stale = the prediction equals `aux/stale_value`, the value the latest overwrite replaced
    (-1 where the key was never overwritten). A model that remembers the first assignment instead
    of the current one scores a high rate; one that answers right scores 0.
    """
    mask = np.asarray(batch["loss_mask"]) > 0
    stale_value = np.asarray(batch["aux/stale_value"])
    overwritten = mask & (stale_value >= 0)
    stale = overwritten & (np.asarray(predictions) == stale_value)
    return int(stale.sum()), int(overwritten.sum())


def icl_iwl_accuracy(predictions: np.ndarray, batch: Mapping[str, np.ndarray]) -> Counts:
    """{"icl": (correct, total), "iwl": (correct, total)} for bursty classification.

    Uses `slice/kind` (1 = in-context: a novel class whose label is only given in the context;
    0 = in-weights: a trained class absent from the context).
    """
    counts = exact_match(predictions, batch, by=("kind",))
    return {
        "icl": counts.get("kind=1", (0, 0)),
        "iwl": counts.get("kind=0", (0, 0)),
    }


# --------------------------------------------------------------------------------------------------
# Logits at answer positions
# --------------------------------------------------------------------------------------------------


def answer_positions(
    batch: Mapping[str, np.ndarray], max_answers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(positions int32[B, A], valid bool[B, A]): the answer columns of each row, left-packed.

    A = max_answers or the largest number of answers in a row; unused slots point at column 0 and
    are not valid. `gather_positions(logits, positions)` then costs B·A·V instead of B·S·V.
    """
    mask = np.asarray(batch["loss_mask"]) > 0
    counts = mask.sum(axis=1)
    width = int(max_answers if max_answers is not None else max(1, counts.max(initial=0)))
    if counts.max(initial=0) > width:
        raise ValueError(f"a row has {counts.max()} answers, more than max_answers={width}")
    order = np.argsort(~mask, axis=1, kind="stable")[:, :width]
    valid = np.take_along_axis(mask, order, axis=1)
    return np.where(valid, order, 0).astype(np.int32), valid


def gather_positions(x, positions):
    """x: [B, S, ...] (numpy or jax), positions: int[B, A] → [B, A, ...].

    Plain-JAX equivalent: jnp.take_along_axis(x, positions[..., None], axis=1) for 3-D x.
    """
    import jax.numpy as jnp

    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    if isinstance(x, np.ndarray):
        return np.take_along_axis(x, index, axis=1)
    return jnp.take_along_axis(x, jnp.asarray(index), axis=1)


def cross_entropy_bits(
    logits: np.ndarray, targets: np.ndarray, token_range: tuple[int, int] | None = None
) -> np.ndarray:
    """Cross-entropy in bits per answer: logits float[N, V], targets int[N] → float64[N].

    token_range=(lo, hi) normalizes over tokens [lo, hi) only (e.g. the fact base's objects, so a
    uniform guess costs exactly log2(hi - lo) bits); targets must lie in it.
    """
    logits = np.asarray(logits, np.float64)
    targets = np.asarray(targets)
    if token_range is not None:
        lo, hi = token_range
        if np.any((targets < lo) | (targets >= hi)):
            raise ValueError(f"targets outside token_range [{lo}, {hi})")
        logits, targets = logits[:, lo:hi], targets - lo
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    picked = np.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return (log_z - picked) / math.log(2)


def knowledge_bits(ce_bits: np.ndarray, num_objects: int = 512) -> float:
    """Σ_facts max(0, log2(num_objects) − CE_bits(fact)) (docs/evaluation.md task 4; 9 bits at 512 objects).

    ce_bits: float[F], each fact's cross-entropy of its object in bits (one value per distinct
    fact; `cross_entropy_bits(..., token_range=task.object_range)`). A fact the model knows
    perfectly is worth log2(num_objects) bits; one it guesses uniformly, 0.
    """
    ce_bits = np.asarray(ce_bits, np.float64)
    return float(np.maximum(0.0, math.log2(num_objects) - ce_bits).sum())


# --------------------------------------------------------------------------------------------------
# In-context regression
# --------------------------------------------------------------------------------------------------


def normalized_mse(
    predictions: np.ndarray, targets: np.ndarray, y_variance: float = 1.0
) -> np.ndarray:
    """float64[P]: mean over examples of (prediction − y)² at each point k, divided by Var(y).

    predictions, targets: float[B, P] (point k is predicted from the k points before it). With
    y_variance = the task's Var(y) (ICLRegression.y_variance) predicting 0 scores 1.0.
    """
    error = (np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)) ** 2
    return error.mean(axis=0) / y_variance


def ridge_reference(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """float64[B, P]: point k predicted from points 0 … k-1 by ridge regression.

    x: float[B, P, d], y: float[B, P]. For k = 0 the prediction is 0. ridge = λ in
    w = (XᵀX + λI)⁻¹ Xᵀy; λ = noise variance / prior variance is the Bayes posterior mean for a
    Gaussian prior (the optimal predictor on the infinite task pool). ridge = 0 is OLS (with the
    minimum-norm solution while k < d).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    batch, points, dim = x.shape
    out = np.zeros((batch, points))
    for k in range(1, points):
        xs, ys = x[:, :k], y[:, :k]
        if ridge > 0:
            gram = np.einsum("bki,bkj->bij", xs, xs) + ridge * np.eye(dim)
            w = np.linalg.solve(gram, np.einsum("bki,bk->bi", xs, ys)[..., None])[..., 0]
        else:
            w = np.einsum("bik,bk->bi", np.linalg.pinv(xs), ys)
        out[:, k] = np.einsum("bi,bi->b", w, x[:, k])
    return out


def ols_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ridge_reference with λ = 0: minimum-norm least squares from the points before each k."""
    return ridge_reference(x, y, 0.0)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _slices(batch: Mapping[str, np.ndarray]) -> Iterable[tuple[str, np.ndarray]]:
    return (
        (key.removeprefix("slice/"), value)
        for key, value in batch.items()
        if key.startswith("slice/")
    )


def _sliced_counts(
    correct: np.ndarray, slices: Mapping[str, np.ndarray], by: Sequence[str] | None
) -> Counts:
    counts: Counts = {"all": (int(correct.sum()), int(correct.size))}
    if by is None:
        groups = [(name,) for name in slices]
    else:
        missing = [name for name in by if name not in slices]
        if missing:
            raise ValueError(f"the batch has no slice {missing} (slices: {', '.join(slices)})")
        groups = [tuple(by)]
    for names in groups:
        labels = np.stack([slices[name] for name in names], axis=-1) if correct.size else None
        if labels is None:
            continue
        values, inverse = np.unique(labels, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        right = np.bincount(inverse, weights=correct, minlength=len(values))
        total = np.bincount(inverse, minlength=len(values))
        for value, r, t in zip(values, right, total):
            key = ",".join(f"{n}={int(v)}" for n, v in zip(names, value))
            counts[key] = (int(r), int(t))
    return counts


def _answer_groups(batch: Mapping[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """int64[B, S]: an answer number per answer position (from aux/answer or consecutive runs)."""
    if "aux/answer" in batch:
        return np.asarray(batch["aux/answer"]).astype(np.int64)
    starts = mask & ~np.concatenate([np.zeros_like(mask[:, :1]), mask[:, :-1]], axis=1)
    return np.cumsum(starts, axis=1) - 1
