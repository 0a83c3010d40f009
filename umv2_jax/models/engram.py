"""Engram conditional memory (`model.sparse: engram`): hashed n-gram embeddings addressed by token ids.

    out = Engram(config, block_index, rngs)(u, context)   # u: [batch, seq, h] → out.y [batch, seq, h]
                                                          # context.token_ids: int32 [batch, seq]

DeepSeek-AI, "Conditional Memory via Scalable Lookup: A New Axis of Sparsity for Large Language
Models", arXiv 2601.07372 (2026), §2 (retrieval, gating, convolution). Per block ℓ that holds the
layer and per token t with id x_t (N = max_ngram, H = heads per order, K = kernel_size,
δ = dilation, h = d_model; x_s = ⊥ for every s before the sequence's (document's) first token):

    hash      mix_n(t)   = ⊕_{k=0}^{n−1} (x_{t−k} · m_{ℓ,k})            n = 2 … N, uint32 arithmetic
              r_{n,j}(t) = o_{n,j} + mix_n(t) mod p_{n,j}                 j = 1 … H
    retrieve  e_t = concat_{n,j} E_ℓ[r_{n,j}(t)]                          [(N−1)·H·D_h], D_h = D_e / H
    gate      k_t = W_K e_t,   v_t = W_V e_t                               [h] each
              z_t = ⟨RMSNorm(k_t; γ_k), RMSNorm(u_t; γ_q)⟩ / √h
              α_t = sigmoid(sign(z_t) · sqrt(max(|z_t|, 1e-6)))
              ṽ_t = α_t · v_t
    conv      c_t = RMSNorm(ṽ_t; γ_c)
              y_t = ṽ_t + SiLU(Σ_{i=0}^{K−1} w_i ⊙ c_{t−iδ})               (c_s = 0 for s < 0)

m_{ℓ,k} are random odd multipliers per block, p_{n,j} distinct primes >= `table_size` (one per
order and head), o_{n,j} their offsets in the block's one table E_ℓ [Σ p, D_h]. y_t is added to the
residual stream (`umv2_jax.models.transformer.Block`).

Details this implementation chose (the paper's production code is not public; its equations above
follow the paper and the authors' public demo):

- Placement: the repository's sparse slot, i.e. beside the FFN of the chosen blocks
  (`model.sparse_layers`), reading the block's normalized FFN input `u` as the gate's hidden state;
  the paper adds Engram to the residual before a block's attention. Every compared baseline sits in
  the same slot, so the comparison changes only the layer.
- No tokenizer compression (the paper's canonical-id map of normalized token strings): the
  comparison suite runs byte-level and synthetic-task vocabularies where it has nothing to merge.
- One residual branch (no hyper-connections / multi-branch): one key projection, one gate.
- Hash arithmetic is uint32 (JAX runs without x64): products wrap modulo 2^32 before the XOR.
  ⊥ (no token: before the sequence start, across a packed document boundary, a left-pad slot) is
  the id 2^32 − 1, which no vocabulary reaches. Multipliers: `numpy.random.default_rng((seed,
  block))`, odd, below 2^32. Primes are shared by all blocks (so blocks stack for scan over layers);
  the multipliers differ per block, so two blocks hash the same n-gram to different rows.
- Init: tables N(0, 1) (an embedding), W_K the backbone std, W_V and the convolution weights the
  output std (they write into the residual stream), norm gains 1.
- Tables are `ValueParam`s (the optimizer's values group) with logical axes ("mem_rows", "mem_dim"):
  the lookup is a gather and its gradient a scatter-add.

Decoding: a cached pass (context.state) reads the last N−1 ids and the last (K−1)·δ conv inputs c of
every row and returns the updated ones (`init_state`); slots before a row's first real slot count as
⊥ / zeros, so a left-padded row computes what it would alone. The rows a token reads depend on its
ids only, known before the layer runs: prefetchable (`umv2_jax.eval.decode_access`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umv2_jax.config import EngramConfig, ModelConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.layers import dtype_of
from umv2_jax.models.sparse import SparseBuilder, SparseContext, SparseOutput, register_sparse

NO_TOKEN = 2**32 - 1  # ⊥: the hash input of a position without a token


class HashMultipliers(nnx.Variable):
    """A block's odd hash multipliers m_{ℓ,k}, uint32 [max_ngram]. Not trainable; saved with the
    checkpoint so that a checkpoint says which row each n-gram reads."""


@functools.lru_cache(maxsize=32)
def table_primes(engram: EngramConfig) -> tuple[int, ...]:
    """The rows p_{n,j} of every (order, head) table, order-major: (N−1)·H distinct primes, each the
    next unused prime >= table_size."""
    primes, candidate = [], engram.table_size
    while len(primes) < (engram.max_ngram - 1) * engram.heads:
        if _is_prime(candidate):
            primes.append(candidate)
        candidate += 1
    return tuple(primes)


def table_rows(engram: EngramConfig) -> int:
    """Rows of one block's table: Σ p_{n,j}."""
    return sum(table_primes(engram))


def hash_multipliers(engram: EngramConfig, block_index: int) -> np.ndarray:
    """m_{ℓ,k}: uint32 [max_ngram], odd, drawn from (seed, block)."""
    rng = np.random.default_rng((engram.seed, block_index))
    return (rng.integers(0, 2**31, size=engram.max_ngram, dtype=np.int64) * 2 + 1).astype(np.uint32)


def _is_prime(value: int) -> bool:
    if value < 2:
        return False
    if value % 2 == 0:
        return value == 2
    return all(value % d for d in range(3, math.isqrt(value) + 1, 2))


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) · γ over the last axis, fp32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


class Engram(nnx.Module):
    """One block's Engram: hashed n-gram tables, context-aware gate, short causal convolution."""

    def __init__(self, config: ModelConfig, block_index: int, rngs: nnx.Rngs):
        engram = config.engram
        h = config.d_model
        self.max_ngram = engram.max_ngram
        self.heads = engram.heads
        self.head_dim = engram.embed_dim // engram.heads
        self.kernel_size = engram.kernel_size
        self.dilation = engram.resolved_dilation()
        self.eps = engram.norm_eps
        self.compute_dtype = dtype_of(config.compute_dtype)
        primes = table_primes(engram)
        self.primes = primes  # the same for every block (Python constants keep blocks stackable)
        self.offsets = tuple(int(o) for o in np.cumsum((0, *primes[:-1])))
        self.rows = sum(primes)
        width = (engram.max_ngram - 1) * engram.embed_dim
        std = init_lib.truncated_normal(init_lib.backbone_std(config))
        out_std = init_lib.truncated_normal(init_lib.output_std(config))
        self.multipliers = HashMultipliers(jnp.asarray(hash_multipliers(engram, block_index)))
        self.table = init_lib.make_value_param(
            rngs,
            init_lib.truncated_normal(1.0),
            (self.rows, self.head_dim),
            ("mem_rows", "mem_dim"),
        )
        self.key = init_lib.make_param(rngs, std, (width, h), ("mem_dim", "embed"))
        self.value = init_lib.make_param(rngs, out_std, (width, h), ("mem_dim", "embed"))
        self.key_norm = nnx.Param(
            jnp.ones((h,), jnp.float32), sharding_names=("norm",), eager_sharding=False
        )
        self.query_norm = nnx.Param(
            jnp.ones((h,), jnp.float32), sharding_names=("norm",), eager_sharding=False
        )
        self.conv_norm = nnx.Param(
            jnp.ones((h,), jnp.float32), sharding_names=("norm",), eager_sharding=False
        )
        self.conv = init_lib.make_param(rngs, out_std, (engram.kernel_size, h), (None, "embed"))

    # ---------------------------------------------------------------------------------------------

    def __call__(self, u: jax.Array, context: SparseContext) -> SparseOutput:
        """u: [batch, seq, h] → SparseOutput (y [batch, seq, h] in compute dtype).

        context.token_ids int32 [batch, seq] (required); context.segment_ids [batch, seq] or None
        (packed documents: no n-gram or convolution tap crosses a boundary); context.state and
        context.window for a cached pass (then out.state is the updated state).
        With diagnostics, row_hits is bool [rows]: the table rows this pass read.
        """
        if context is None or context.token_ids is None:
            raise ValueError("Engram needs the input token ids (SparseContext.token_ids)")
        batch, seq, h = u.shape
        dtype = self.compute_dtype
        lagged, valid, history = self._lagged_ids(context, batch, seq)
        rows = self.addresses(lagged)  # int32 [B, S, (N−1)·H]
        table = self.table[...].astype(dtype)
        embedded = jnp.take(table, rows, axis=0).reshape(batch, seq, -1)  # [B, S, (N−1)·D_e]
        key = embedded @ self.key[...].astype(dtype)
        value = embedded @ self.value[...].astype(dtype)
        score = jnp.sum(
            _rms_norm(key, self.key_norm[...], self.eps)
            * _rms_norm(u, self.query_norm[...], self.eps),
            axis=-1,
            keepdims=True,
        ) / math.sqrt(h)
        gate = jax.nn.sigmoid(jnp.sign(score) * jnp.sqrt(jnp.maximum(jnp.abs(score), 1e-6)))
        gated = gate * value.astype(jnp.float32)  # ṽ [B, S, h] fp32
        normed = _rms_norm(gated, self.conv_norm[...], self.eps)
        normed = jnp.where(valid[..., None], normed, 0.0).astype(dtype)
        conv, new_conv = self._convolve(normed, context)
        y = (gated + jax.nn.silu(conv)).astype(dtype)
        out = SparseOutput(
            y=y,
            metrics={"engram_gate_mean": jax.lax.stop_gradient(jnp.mean(gate))},
            addressable_rows=self.rows,
        )
        if context.state is not None:
            out.state = {"ids": history, "conv": new_conv}
        if context.diagnostics:
            out.row_hits = jnp.zeros((self.rows,), bool).at[rows.reshape(-1)].set(True)
        return out

    def addresses(self, lagged: list[jax.Array]) -> jax.Array:
        """lagged[k]: uint32 [batch, S] the id k positions back (⊥ where none), k = 0 … N−1 →
        int32 rows [batch, S, (N−1)·H] of the table, order-major (n = 2 … N, then head)."""
        multipliers = self.multipliers[...]
        rows = []
        mix = lagged[0] * multipliers[0]
        for n in range(2, self.max_ngram + 1):
            mix = jnp.bitwise_xor(mix, lagged[n - 1] * multipliers[n - 1])
            for head in range(self.heads):
                index = (n - 2) * self.heads + head
                prime, offset = self.primes[index], self.offsets[index]
                rows.append((mix % jnp.uint32(prime)).astype(jnp.int32) + offset)
        return jnp.stack(rows, axis=-1)

    def _lagged_ids(
        self, context: SparseContext, batch: int, seq: int
    ) -> tuple[list[jax.Array], jax.Array, jax.Array | None]:
        """([uint32 [B, S] ids k back, k = 0 … N−1, ⊥ where no token], bool [B, S] whether each
        position holds a real token of its row, the last N−1 ids (uint32 [B, N−1]) of a cached pass
        or None)."""
        span = self.max_ngram - 1
        ids = context.token_ids.astype(jnp.uint32)
        valid = jnp.ones((batch, seq), bool)
        if context.state is not None:  # cached: slots before a row's first real slot are ⊥
            slots = context.window.index + jnp.arange(seq, dtype=jnp.int32)
            valid = slots[None, :] >= context.window.start[:, None]
            ids = jnp.where(valid, ids, jnp.uint32(NO_TOKEN))
            past = context.state["ids"]
        else:
            past = jnp.full((batch, span), NO_TOKEN, jnp.uint32)
        extended = jnp.concatenate([past, ids], axis=1)  # [B, N−1+S]
        lagged = []
        for lag in range(self.max_ngram):
            shifted = extended[:, span - lag : span - lag + seq]
            if context.segment_ids is not None and context.state is None and lag > 0:
                segments = context.segment_ids
                earlier = jnp.pad(segments, ((0, 0), (lag, 0)), constant_values=-1)[:, :seq]
                shifted = jnp.where(earlier == segments, shifted, jnp.uint32(NO_TOKEN))
            lagged.append(shifted)
        history = extended[:, extended.shape[1] - span :] if context.state is not None else None
        return lagged, valid, history

    def _convolve(self, normed: jax.Array, context: SparseContext) -> tuple[jax.Array, jax.Array]:
        """normed: c [B, S, h] → (Σ_i w_i ⊙ c_{t−iδ} fp32 [B, S, h], the last (K−1)·δ inputs of a
        cached pass, else None)."""
        batch, seq, h = normed.shape
        span = (self.kernel_size - 1) * self.dilation
        if context.state is not None:
            past = context.state["conv"].astype(normed.dtype)
        else:
            past = jnp.zeros((batch, span, h), normed.dtype)
        extended = jnp.concatenate([past, normed], axis=1)  # [B, span + S, h]
        weights = self.conv[...].astype(jnp.float32)
        total = jnp.zeros((batch, seq, h), jnp.float32)
        segments = context.segment_ids if context.state is None else None
        for tap in range(self.kernel_size):
            lag = tap * self.dilation
            shifted = extended[:, span - lag : span - lag + seq].astype(jnp.float32)
            if segments is not None and lag > 0:
                earlier = jnp.pad(segments, ((0, 0), (lag, 0)), constant_values=-1)[:, :seq]
                shifted = jnp.where((earlier == segments)[..., None], shifted, 0.0)
            total = total + weights[tap] * shifted
        new = extended[:, extended.shape[1] - span :] if context.state is not None else None
        return total, new


def init_state(config: ModelConfig, batch: int) -> dict[str, jax.Array]:
    """One Engram layer's zero decode state: {"ids": uint32 [batch, N−1] all ⊥, "conv": [batch,
    (K−1)·δ, h] zeros in the compute dtype}."""
    engram = config.engram
    span = (engram.kernel_size - 1) * engram.resolved_dilation()
    return {
        "ids": jnp.full((batch, engram.max_ngram - 1), NO_TOKEN, jnp.uint32),
        "conv": jnp.zeros((batch, span, config.d_model), dtype_of(config.compute_dtype)),
    }


def _build_layer(config: ModelConfig, block_index: int, rngs: nnx.Rngs) -> Engram:
    return Engram(config, block_index, rngs)


register_sparse("engram", SparseBuilder(build_layer=_build_layer, init_state=init_state))
