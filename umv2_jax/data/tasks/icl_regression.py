"""In-context linear regression (docs/evaluation.md task 5a; Garg et al. 2022, Raventós et al. 2023).

An example: a task vector w ~ N(0, I_d), points x_k ~ N(0, I_d) and y_k = x_k·w / √d + ε_k,
ε_k ~ N(0, noise_std²), for k = 0 … P-1 (d = 5, P = 11). Finite task pools: `pool_size` vectors
w drawn once from `pool_seed`; training draws w uniformly from the pool (pool_size 0 = a fresh w
for every example, the infinite pool).

Real numbers as tokens: a value v is quantized to one of 128 uniform bins on [-4, 4] (clipped),
bin = floor((v + 4) / 8 · 128); x components use tokens [0, 128), y tokens [128, 256). Bin centres
-4 + (bin + ½)·8/128 decode them (`decode_y`, or `expected_y` for the mean under the logits).
The quantization step (0.0625) adds a variance of ~3e-4, far below the noise.

Layout: per point x_k1 … x_kd y_k (d + 1 tokens), points in order, left-aligned, PAD after. The
answer y_k is predicted at the position of x_kd (loss_mask 1 there, target the y token), from the
k earlier points. Splits: train (w from the pool), test (fresh w: the true task distribution),
test_pool (w from the training pool).

Slices: examples (k, the number of points in context). aux/x float32[B, P, d] (the quantized x the
model sees) and aux/y float32[B, P] (the exact y) feed `metrics.normalized_mse` and the OLS /
ridge references (`ridge_lambda` = noise_std²·d is the Bayes posterior mean on the infinite pool).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np

from umv2_jax.data.tasks.base import Task, empty_batch

NUM_BINS, VALUE_LIMIT = 128, 4.0
X_BASE, Y_BASE = 0, 128


@dataclasses.dataclass(frozen=True)
class ICLRegression(Task):
    """Parameters:
        dim        d (default 5)
        points     P points per example (default 11)
        pool_size  number of training tasks; 0 = infinite (default 0; docs/evaluation.md: 2^4 … 2^12)
        noise_std  σ of ε (default 0.5)
        pool_seed  seed of the task pool (default 0)
    Slices: examples.
    """

    name: ClassVar[str] = "icl_regression"
    SLICES: ClassVar[tuple[str, ...]] = ("examples",)
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test", "test_pool")
    AUX: ClassVar[tuple[str, ...]] = ("x", "y")

    dim: int = 5
    points: int = 11
    pool_size: int = 0
    noise_std: float = 0.5
    pool_seed: int = 0

    @property
    def y_variance(self) -> float:
        """Var(y) = 1 + noise_std²: normalized_mse divides by it (predicting 0 scores 1)."""
        return 1.0 + self.noise_std**2

    @property
    def ridge_lambda(self) -> float:
        """λ of the Bayes-optimal ridge on the infinite pool for the design aux/x."""
        return self.noise_std**2 * self.dim

    def min_seq_len(self) -> int:
        return self.points * (self.dim + 1)

    def _check(self) -> None:
        if self.dim < 1:
            self._fail("dim", f"must be >= 1, got {self.dim}")
        if self.points < 2:
            self._fail(
                "points", f"must be >= 2 (one to learn from, one to predict), got {self.points}"
            )
        if self.pool_size < 0:
            self._fail("pool_size", f"must be >= 0 (0 = infinite), got {self.pool_size}")
        if self.noise_std < 0:
            self._fail("noise_std", f"must be >= 0, got {self.noise_std}")

    def _batch(self, rng, batch_size, seq_len, split, seed, index):
        d, points = self.dim, self.points
        if self.pool_size and split != "test":
            pool = _pool(self.pool_seed, self.pool_size, d)
            w = pool[rng.integers(0, self.pool_size, size=batch_size)]
        else:
            w = rng.standard_normal((batch_size, d))
        x = rng.standard_normal((batch_size, points, d))
        y = np.einsum("bkd,bd->bk", x, w) / np.sqrt(d)
        y = y + self.noise_std * rng.standard_normal((batch_size, points))
        x_bins, y_bins = quantize(x), quantize(y)
        batch = empty_batch(batch_size, seq_len, self.pad_id, self.SLICES)
        tokens = np.concatenate([X_BASE + x_bins, (Y_BASE + y_bins)[..., None]], axis=-1)
        batch["inputs"][:, : points * (d + 1)] = tokens.reshape(batch_size, -1)
        answer = np.arange(points) * (d + 1) + d - 1  # the last x token of each point
        batch["targets"][:, answer] = Y_BASE + y_bins
        batch["loss_mask"][:, answer] = 1.0
        batch["slice/examples"][:, answer] = np.arange(points)
        batch["aux/x"] = dequantize(x_bins).astype(np.float32)
        batch["aux/y"] = y.astype(np.float32)
        return batch


def quantize(values: np.ndarray) -> np.ndarray:
    """float[...] → int32 bins in [0, 128) (uniform on [-4, 4], clipped)."""
    scaled = np.floor((np.asarray(values) + VALUE_LIMIT) / (2 * VALUE_LIMIT) * NUM_BINS)
    return np.clip(scaled, 0, NUM_BINS - 1).astype(np.int32)


def dequantize(bins: np.ndarray) -> np.ndarray:
    """int bins → float64 bin centres."""
    return -VALUE_LIMIT + (np.asarray(bins) + 0.5) * (2 * VALUE_LIMIT / NUM_BINS)


def decode_y(tokens: np.ndarray) -> np.ndarray:
    """Predicted y tokens (int[...]) → values; tokens outside the y range give nan."""
    tokens = np.asarray(tokens)
    valid = (tokens >= Y_BASE) & (tokens < Y_BASE + NUM_BINS)
    return np.where(valid, dequantize(np.clip(tokens - Y_BASE, 0, NUM_BINS - 1)), np.nan)


def expected_y(logits: np.ndarray) -> np.ndarray:
    """logits float[..., V] → the mean bin centre under softmax over the y tokens: float64[...]."""
    y_logits = np.asarray(logits, np.float64)[..., Y_BASE : Y_BASE + NUM_BINS]
    y_logits = y_logits - y_logits.max(axis=-1, keepdims=True)
    probs = np.exp(y_logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs @ dequantize(np.arange(NUM_BINS))


@functools.lru_cache(maxsize=8)
def _pool(pool_seed: int, pool_size: int, dim: int) -> np.ndarray:
    return np.random.default_rng([pool_seed, 0x504F4F4C, pool_size]).standard_normal(
        (pool_size, dim)
    )
