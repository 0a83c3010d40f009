"""Memory-efficient multi-head attention: a fused kernel where the platform has one, a chunked XLA
path elsewhere; never an f32 [batch, heads, seq, seq] buffer outside the plain reference.

    out = attention(q, k, v, causal=True, implementation="auto", chunk=512)

q, k, v: [batch, seq, heads, head_dim] in the compute dtype (bf16 or f32) → [batch, seq, heads,
head_dim] in q's dtype. Equivalent plain JAX (the "xla" reference, which materializes the scores):

    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    # = softmax(q·kᵀ / sqrt(head_dim) + causal mask) · v, softmax in f32

Implementations (`model.attention`):

    "xla"      the reference above: f32 scores [batch, heads, seq, seq] (forward and backward)
    "chunked"  flash-style XLA: per query block of `chunk` rows, a loop over the key/value blocks at or
               before it (causal) with an online softmax in f32 (running max, running sum); a custom
               VJP recomputes each block's probabilities from the saved log-sum-exp, so forward and
               backward hold O(seq · chunk) scores per (batch, head) at a time
    "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")` when lowered for CUDA (bf16 /
               fp16, a head_dim cuDNN accepts, cuDNN importable at trace time); chunked otherwise
    "splash"   Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) when
               lowered for TPU (seq a multiple of 128); chunked otherwise
    "auto"     per lowering platform (`jax.lax.platform_dependent`): cuda → cudnn, tpu → splash,
               cpu / rocm → chunked, or the plain reference when seq <= chunk (one block: the same
               work without the loop)

The choice is made per platform the program is lowered for, not from the host's backend, so
`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))` on a CPU host holds the splash kernel.

Under a mesh (`umv2_jax.parallel.use_mesh`) the attention runs inside `jax.shard_map` with the batch
split over the mesh's batch axes and the heads over `tensor` (when they divide): attention is local to
a sequence and a head, and the fused kernels are custom calls the partitioner cannot split.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
DEFAULT_CHUNK = 512


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    implementation: str = "auto",
    chunk: int = DEFAULT_CHUNK,
) -> jax.Array:
    """Multi-head attention. q, k, v: [batch, seq, heads, head_dim] → [batch, seq, heads, head_dim].

    See the module docstring for the implementations; every one computes
    `jax.nn.dot_product_attention(q, k, v, is_causal=causal)` up to float rounding.
    """
    _check(q, k, v, implementation, chunk)
    run = _per_platform(q, causal, implementation, chunk)
    from umv2_jax import parallel  # lazy: parallel imports the config, which imports the ops

    mesh = parallel.active_mesh()
    if mesh is None:
        return run(q, k, v)
    batch_axes = parallel.batch_axes(mesh)
    shards = parallel.batch_shards(mesh)
    if q.shape[0] % shards:
        return run(q, k, v)  # an odd batch: left to the partitioner (replicated kernels)
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 else None
    spec = PartitionSpec(batch_axes if batch_axes else None, None, heads, None)
    local = jax.shard_map(
        run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
    )
    return local(q, k, v)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = True) -> jax.Array:
    """The plain reference: `jax.nn.dot_product_attention(q, k, v, is_causal=causal)`."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


def chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = True, chunk: int = DEFAULT_CHUNK
) -> jax.Array:
    """Flash-style attention in XLA: the reference's numbers, scores held one [chunk, chunk] block
    per (batch, head) at a time, forward and backward (custom VJP). Shapes as `attention`."""
    return _chunked(q, k, v, causal, chunk)


# ---------------------------------------------------------------------------------------------
# Choosing per platform


def _check(q, k, v, implementation, chunk) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention: implementation={implementation!r} is not one of {IMPLEMENTATIONS}"
        )
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "attention: q, k, v must all be [batch, seq, heads, head_dim] of one shape; got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"attention: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"attention: chunk={chunk!r} must be a positive integer (e.g. 512)")


def _per_platform(q, causal: bool, implementation: str, chunk: int) -> Callable:
    """fn(q, k, v) running the implementation chosen for each lowering platform."""
    seq = q.shape[1]
    chunked = functools.partial(_chunked, causal=causal, chunk=chunk)
    if implementation == "xla":
        return functools.partial(reference_attention, causal=causal)
    if implementation == "chunked":
        return chunked
    plain = chunked
    if implementation == "auto" and seq <= chunk:
        plain = functools.partial(reference_attention, causal=causal)
    per_platform = {"cpu": plain, "rocm": plain, "cuda": plain, "tpu": plain}
    if implementation in ("auto", "cudnn") and _cudnn_accepts(q):
        per_platform["cuda"] = functools.partial(_cudnn, causal=causal, fallback=plain)
    if implementation in ("auto", "splash") and _splash_accepts(q):
        per_platform["tpu"] = functools.partial(_splash, causal=causal)
    if implementation == "cudnn":
        per_platform = {**dict.fromkeys(per_platform, chunked), "cuda": per_platform["cuda"]}
    if implementation == "splash":
        per_platform = {**dict.fromkeys(per_platform, chunked), "tpu": per_platform["tpu"]}
    distinct = {id(fn): fn for fn in per_platform.values()}
    if len(distinct) == 1:
        return next(iter(distinct.values()))

    def run(q, k, v):
        return jax.lax.platform_dependent(q, k, v, **per_platform)

    return run


def _cudnn_accepts(q) -> bool:
    """cuDNN flash attention takes bf16 / fp16 with head_dim a multiple of 8 up to 128 (256 on
    Hopper, which the trace cannot see), and needs cuDNN importable where the program is traced."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[3] % 8 or q.shape[3] > 128:
        return False
    try:
        from jax._src.cudnn import fused_attention_stablehlo

        fused_attention_stablehlo.check_cudnn_version()
    except (ImportError, RuntimeError):
        return False
    return True


def _cudnn(q, k, v, causal: bool, fallback: Callable):
    try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    except (NotImplementedError, ValueError):  # cuDNN declines this shape at trace time
        return fallback(q, k, v)


def _splash_accepts(q) -> bool:
    """Splash's blocks are multiples of 128 rows: the sequence must be one."""
    return q.shape[1] % 128 == 0


def _splash(q, k, v, causal: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    _, seq, heads, head_dim = q.shape
    one = mask_lib.CausalMask((seq, seq)) if causal else mask_lib.FullMask((seq, seq))
    block = next(b for b in (512, 256, 128) if seq % b == 0)
    sizes = kernel_lib.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1, block_sizes=sizes
    )
    scale = jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)  # splash does not scale the scores

    def heads_first(x):
        return jnp.swapaxes(x, 1, 2)  # [batch, heads, seq, head_dim]

    out = jax.vmap(kernel)(heads_first(q * scale), heads_first(k), heads_first(v))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# The chunked XLA path


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(q, k, v, causal, chunk):
    return _chunked_forward(q, k, v, causal, chunk)[0]


def _blocks(seq: int, chunk: int) -> tuple[int, int]:
    """(block size, number of blocks): one block when the sequence fits in a chunk."""
    block = min(chunk, seq)
    return block, -(-seq // block)


def _pad(x, padded: int):
    return jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))


def _block_mask(i, j, block: int, seq: int, causal: bool):
    """bool [block, block]: query block i may attend key block j (causal, real keys only)."""
    query = i * block + jnp.arange(block)[:, None]
    key = j * block + jnp.arange(block)[None, :]
    allowed = key < seq
    return allowed & (key <= query) if causal else allowed


def _key_blocks(i, count: int, causal: bool):
    """How many key blocks query block i reads: those at or before it when causal."""
    return i + 1 if causal else count


def _chunked_forward(q, k, v, causal, chunk):
    batch, seq, heads, head_dim = q.shape
    block, count = _blocks(seq, chunk)
    padded = block * count
    q, k, v = _pad(q, padded), _pad(k, padded), _pad(v, padded)
    scale = 1.0 / math.sqrt(head_dim)

    def query_block(i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)

        def key_block(j, carry):
            running_max, running_sum, acc = carry
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
            scores = jnp.where(_block_mask(i, j, block, seq, causal), scores * scale, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
            probs = jnp.exp(scores - new_max[..., None])
            correction = jnp.exp(running_max - new_max)
            running_sum = running_sum * correction + jnp.sum(probs, axis=-1)
            update = jnp.einsum(
                "bhqk,bkhd->bhqd", probs.astype(v.dtype), v_j, preferred_element_type=jnp.float32
            )
            return new_max, running_sum, acc * correction[..., None] + update

        init = (
            jnp.full((batch, heads, block), -jnp.inf, jnp.float32),
            jnp.zeros((batch, heads, block), jnp.float32),
            jnp.zeros((batch, heads, block, head_dim), jnp.float32),
        )
        # Key block 0 is visible to every query row, so the running max is finite from then on.
        running_max, running_sum, acc = jax.lax.fori_loop(
            0, _key_blocks(i, count, causal), key_block, init
        )
        out = (acc / running_sum[..., None]).astype(q.dtype)
        return jnp.swapaxes(out, 1, 2), running_max + jnp.log(running_sum)

    out, logsumexp = jax.lax.map(query_block, jnp.arange(count))
    # out: [count, batch, block, heads, head_dim]; logsumexp: [count, batch, heads, block]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, heads, head_dim)
    logsumexp = jnp.moveaxis(logsumexp, 0, 2).reshape(batch, heads, padded)
    return out[:, :seq], (q, k, v, out, logsumexp)


def _chunked_fwd(q, k, v, causal, chunk):
    out, residuals = _chunked_forward(q, k, v, causal, chunk)
    return out, residuals


def _chunked_bwd(causal, chunk, residuals, d_out):
    q, k, v, out, logsumexp = residuals  # padded to whole blocks
    batch, padded, heads, head_dim = q.shape
    seq = d_out.shape[1]
    block, count = _blocks(seq, chunk)
    scale = 1.0 / math.sqrt(head_dim)
    d_out = _pad(d_out.astype(q.dtype), padded)
    # Δ_i = Σ_d dO·O: the row term of the softmax backward (FlashAttention-2, Alg. 2).
    delta = jnp.einsum(
        "bshd,bshd->bhs", d_out.astype(jnp.float32), out.astype(jnp.float32)
    )  # [batch, heads, padded]

    def query_block(carry, i):
        d_k, d_v = carry
        q_i = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)
        d_out_i = jax.lax.dynamic_slice_in_dim(d_out, i * block, block, axis=1)
        logsumexp_i = jax.lax.dynamic_slice_in_dim(logsumexp, i * block, block, axis=2)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, i * block, block, axis=2)

        def key_block(j, inner):
            d_q_i, d_k, d_v = inner
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
            probs = jnp.where(
                _block_mask(i, j, block, seq, causal),
                jnp.exp(scores * scale - logsumexp_i[..., None]),
                0.0,
            )
            d_v_j = jnp.einsum(
                "bhqk,bqhd->bkhd",
                probs.astype(q.dtype),
                d_out_i,
                preferred_element_type=jnp.float32,
            )
            d_probs = jnp.einsum(
                "bqhd,bkhd->bhqk", d_out_i, v_j, preferred_element_type=jnp.float32
            )
            d_scores = (probs * (d_probs - delta_i[..., None]) * scale).astype(q.dtype)
            d_q_i = d_q_i + jnp.einsum(
                "bhqk,bkhd->bqhd", d_scores, k_j, preferred_element_type=jnp.float32
            )
            d_k_j = jnp.einsum("bhqk,bqhd->bkhd", d_scores, q_i, preferred_element_type=jnp.float32)
            d_k = _add_block(d_k, d_k_j, j * block)
            d_v = _add_block(d_v, d_v_j, j * block)
            return d_q_i, d_k, d_v

        d_q_i = jnp.zeros((batch, block, heads, head_dim), jnp.float32)
        d_q_i, d_k, d_v = jax.lax.fori_loop(
            0, _key_blocks(i, count, causal), key_block, (d_q_i, d_k, d_v)
        )
        return (d_k, d_v), d_q_i

    zeros = jnp.zeros((batch, padded, heads, head_dim), jnp.float32)
    (d_k, d_v), d_q = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(count))
    d_q = jnp.moveaxis(d_q, 0, 1).reshape(batch, padded, heads, head_dim)
    return tuple(g[:, :seq].astype(q.dtype) for g in (d_q, d_k, d_v))


def _add_block(total, block_values, start):
    current = jax.lax.dynamic_slice_in_dim(total, start, block_values.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(total, current + block_values, start, axis=1)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
