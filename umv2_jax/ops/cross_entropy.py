"""The LM head and next-token cross entropy in vocabulary chunks: the full f32 [tokens, vocab] logits
never exist, neither in the forward nor in the backward.

    losses = chunked_cross_entropy(x, head, targets, chunk=8192, compute_dtype=jnp.bfloat16)

x: [tokens, embed] or [batch, seq, embed] final hidden states; head: [embed, vocab] (tied embeddings:
`embed.T`); targets: int [tokens] or [batch, seq] → per-token loss in nats, f32 [tokens] or
[batch, seq]. Equivalent plain JAX (what `Transformer.__call__` + the old loss computed):

    logits = (x.astype(compute_dtype) @ head.astype(compute_dtype)).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    #      = logsumexp(logits, -1) - logits[target]

Chunks: the vocabulary is split into `count` chunks of `vocab / count` columns, `count` the
smallest divisor of vocab whose chunk is at most `chunk` columns (vocab is padded to a multiple of
128, so one always exists for vocab <= 128 · chunk; otherwise the head is padded with masked
columns). Chunk j holds the columns j, j + count, j + 2·count, … (strided): a vocabulary sharded in
contiguous ranges over `tensor` stays sharded within every chunk, so under a mesh each device
computes its own columns of every chunk and only [tokens]-sized maxima and sums cross devices.
A running max and sum give the log-sum-exp (online, in f32); the custom VJP recomputes each chunk's
logits from the saved log-sum-exp: d logits = (softmax − onehot(target)) · d loss. With a single
chunk (vocab <= chunk) the plain lines above run as they are (the same rounding, bit for bit).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_CHUNK = 8192


def chunked_cross_entropy(
    x: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    chunk: int = DEFAULT_CHUNK,
    compute_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """Per-token cross entropy in nats, f32 with the shape of `targets`. See the module docstring.

    compute_dtype: the matmul's dtype (the model's `compute_dtype`; default x's dtype). The chunk's
    logits are rounded to it before the f32 softmax, exactly as the full-logits path rounds them.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_cross_entropy: chunk={chunk!r} must be a positive integer")
    if head.ndim != 2 or x.shape[-1] != head.shape[0] or x.shape[:-1] != targets.shape:
        raise ValueError(
            "chunked_cross_entropy: want x [..., embed], head [embed, vocab], targets [...]; got "
            f"x {x.shape}, head {head.shape}, targets {targets.shape}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"chunked_cross_entropy: targets must be integers, got {targets.dtype}")
    dtype = jnp.dtype(compute_dtype if compute_dtype is not None else x.dtype)
    vocab = head.shape[1]
    count = chunk_count(vocab, chunk)
    if count == 1:  # one chunk is the whole vocabulary: the plain computation, same rounding
        logits = (x.astype(dtype) @ head.astype(dtype)).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    flat = x.reshape(-1, x.shape[-1])
    losses = _cross_entropy(flat, head, targets.reshape(-1).astype(jnp.int32), count, vocab, dtype)
    return losses.reshape(targets.shape)


def chunk_count(vocab: int, chunk: int) -> int:
    """How many chunks the vocabulary is split into: the smallest divisor of vocab leaving at most
    `chunk` columns per chunk, or ceil(vocab / chunk) (with padding) when no divisor up to 128 does."""
    for count in range(1, 129):
        if vocab % count == 0 and vocab // count <= chunk:
            return count
    return -(-vocab // chunk)


# ---------------------------------------------------------------------------------------------


def _chunked_head(head, count: int, dtype):
    """[count, embed, columns]: chunk j = head[:, j::count] (padded with zero columns if needed)."""
    embed, vocab = head.shape
    columns = -(-vocab // count)
    head = head.astype(dtype)
    if columns * count != vocab:
        head = jnp.pad(head, ((0, 0), (0, columns * count - vocab)))
    return jnp.moveaxis(head.reshape(embed, columns, count), 2, 0)


def _chunk_columns(index, columns: int, count: int):
    """int32 [columns]: the vocabulary ids of chunk `index`."""
    return jnp.arange(columns, dtype=jnp.int32) * count + index


def _chunk_logits(x, head_chunk, index, count: int, vocab: int):
    """f32 [tokens, columns] logits of one chunk (padded columns −inf) and their ids."""
    columns = _chunk_columns(index, head_chunk.shape[1], count)
    logits = (x @ head_chunk).astype(jnp.float32)
    return jnp.where(columns < vocab, logits, -jnp.inf), columns


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _cross_entropy(x, head, targets, count, vocab, dtype):
    return _forward(x, head, targets, count, vocab, dtype)[0]


def _forward(x, head, targets, count, vocab, dtype):
    x_c = x.astype(dtype)
    chunks = _chunked_head(head, count, dtype)

    def body(carry, inputs):
        running_max, running_sum, target_logit = carry
        index, head_chunk = inputs
        logits, columns = _chunk_logits(x_c, head_chunk, index, count, vocab)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=-1
        )
        hit = columns[None, :] == targets[:, None]
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        return (new_max, running_sum, target_logit), None

    tokens = x.shape[0]
    init = (
        jnp.full((tokens,), -jnp.inf, jnp.float32),
        jnp.zeros((tokens,), jnp.float32),
        jnp.zeros((tokens,), jnp.float32),
    )
    # Chunk 0 holds vocabulary id 0, a real column: the running max is finite after it.
    (running_max, running_sum, target_logit), _ = jax.lax.scan(
        body, init, (jnp.arange(count, dtype=jnp.int32), chunks)
    )
    logsumexp = running_max + jnp.log(running_sum)
    return logsumexp - target_logit, (x, head, targets, logsumexp)


def _fwd(x, head, targets, count, vocab, dtype):
    return _forward(x, head, targets, count, vocab, dtype)


def _bwd(count, vocab, dtype, residuals, d_losses):
    x, head, targets, logsumexp = residuals
    x_c = x.astype(dtype)
    chunks = _chunked_head(head, count, dtype)
    d_losses = d_losses.astype(jnp.float32)

    def body(d_x, inputs):
        index, head_chunk = inputs
        logits, columns = _chunk_logits(x_c, head_chunk, index, count, vocab)
        probs = jnp.exp(logits - logsumexp[:, None])  # padded columns: exp(−inf) = 0
        onehot = (columns[None, :] == targets[:, None]).astype(jnp.float32)
        d_logits = ((probs - onehot) * d_losses[:, None]).astype(dtype)
        d_x = d_x + jnp.dot(d_logits, head_chunk.T, preferred_element_type=jnp.float32)
        d_head_chunk = jnp.dot(x_c.T, d_logits, preferred_element_type=jnp.float32)
        return d_x, d_head_chunk.astype(head.dtype)

    d_x, d_chunks = jax.lax.scan(
        body,
        jnp.zeros(x.shape, jnp.float32),
        (jnp.arange(count, dtype=jnp.int32), chunks),
    )
    embed = head.shape[0]
    d_head = jnp.moveaxis(d_chunks, 0, 2).reshape(embed, -1)[:, :vocab]
    return d_x.astype(x.dtype), d_head, np.zeros(targets.shape, jax.dtypes.float0)


_cross_entropy.defvjp(_fwd, _bwd)
