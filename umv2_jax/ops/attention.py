"""Memory-efficient multi-head attention: a fused kernel where the platform has one, a chunked XLA
path elsewhere; never an f32 [batch, heads, seq, seq] buffer outside the plain reference.

    out = attention(q, k, v, causal=True, implementation="auto", chunk=512, segment_ids=None)

q, k, v: [batch, seq, heads, head_dim] in the compute dtype (bf16 or f32) → [batch, seq, heads,
head_dim] in q's dtype. segment_ids: None, or int [batch, seq], one id per packed document (0 marks
padding, which then attends only to other padding): query i attends key j only if j <= i (causal)
and segment_ids[b, i] == segment_ids[b, j]. Equivalent plain JAX (the "xla" reference, which
materializes the scores):

    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # or None
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    # = softmax(q·kᵀ / sqrt(head_dim) + causal and document mask) · v, softmax in f32

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
               work without the loop); with segment_ids cuda → chunked (see below)

Document masks (segment_ids) on each path — `masks_documents(implementation)` says which apply
their own: "xla" adds the mask to the reference; "chunked" ands it into each block's mask (a row
whose earlier key blocks are all masked keeps a zero running sum, never NaN; every row sees at
least itself); "splash" passes `SegmentIds(q=ids, kv=ids)` to the kernel. cuDNN cannot: the only
mask `jax.nn.dot_product_attention(implementation="cudnn")` takes besides causal / sequence lengths
is a dense additive bias [batch, 1, seq, seq] whose gradient cuDNN computes only for batch 1, so
"cudnn" (and "auto" on cuda) run the chunked path for a batch with segment_ids.

The choice is made per platform the program is lowered for, not from the host's backend, for the
platforms the ops registry traces (`registry.traced_platforms()`: the host's by default), so
`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))` on a CPU host, traced inside
`registry.lowering_platforms("tpu")`, holds the splash kernel.

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

from umv2_jax.ops import registry

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
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Multi-head attention. q, k, v: [batch, seq, heads, head_dim] → [batch, seq, heads, head_dim].

    segment_ids: None, or int [batch, seq] document ids (a packed row): a query attends only keys
    of its own document (and, causal, at or before it). See the module docstring for the
    implementations; every one computes `reference_attention(q, k, v, causal, segment_ids)` up to
    float rounding.
    """
    _check(q, k, v, implementation, chunk, segment_ids)
    run = _per_platform(q, causal, implementation, chunk, documents=segment_ids is not None)
    args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids.astype(jnp.int32))
    from umv2_jax import parallel  # lazy: only a traced call under a mesh needs it

    mesh = parallel.active_mesh()
    if mesh is None:
        return run(*args)
    batch_axes = parallel.batch_axes(mesh)
    shards = parallel.batch_shards(mesh)
    if q.shape[0] % shards:
        return run(*args)  # an odd batch: left to the partitioner (replicated kernels)
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 else None
    batch = batch_axes if batch_axes else None
    spec = PartitionSpec(batch, None, heads, None)
    in_specs = (spec, spec, spec, PartitionSpec(batch, None))[: len(args)]
    local = jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
    return local(*args)


def masks_documents(implementation: str) -> bool:
    """Whether `implementation` (model.attention) applies a document mask (segment_ids) itself.

    True for "xla" (a mask in the reference), "chunked" (in each block's mask), "splash"
    (`SegmentIds` into the kernel; chunked where splash does not apply) and "auto" (which picks a
    path that can on every platform). False for "cudnn": cuDNN takes no per-row document mask
    (see the module docstring), so a batch with segment_ids runs the chunked path instead — the
    numbers stay right, the cuDNN kernel is not used. Raises ValueError for an unknown name.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention: implementation={implementation!r} is not one of {IMPLEMENTATIONS}"
        )
    return implementation != "cudnn"


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """The plain reference: `jax.nn.dot_product_attention(q, k, v, is_causal=causal)`, with
    segment_ids [batch, seq] also `mask=` query and key in one document ([batch, 1, seq, seq])."""
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    causal: bool = True,
    chunk: int = DEFAULT_CHUNK,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Flash-style attention in XLA: the reference's numbers, scores held one [chunk, chunk] block
    per (batch, head) at a time, forward and backward (custom VJP). Shapes as `attention`."""
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _chunked(q, k, v, segment_ids, causal, chunk)


# ---------------------------------------------------------------------------------------------
# Choosing per platform


def _check(q, k, v, implementation, chunk, segment_ids=None) -> None:
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
    if segment_ids is not None and (
        segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
    ):
        raise ValueError(
            f"attention: segment_ids must be integer [batch, seq] = {q.shape[:2]}; got "
            f"{segment_ids.dtype}{list(segment_ids.shape)}"
        )


def _per_platform(
    q, causal: bool, implementation: str, chunk: int, documents: bool = False
) -> Callable:
    """fn(q, k, v[, segment_ids]) running the implementation chosen for each lowering platform;
    `documents`: segment_ids will be passed (cuDNN cannot take them: chunked instead)."""
    seq = q.shape[1]

    def reference(q, k, v, segment_ids=None):
        return reference_attention(q, k, v, causal, segment_ids)

    def chunked(q, k, v, segment_ids=None):
        return _chunked(q, k, v, segment_ids, causal, chunk)

    if implementation == "xla":
        return reference
    if implementation == "chunked":
        return chunked
    plain = chunked
    if implementation == "auto" and seq <= chunk:
        plain = reference
    per_platform = {"cpu": plain, "rocm": plain, "cuda": plain, "tpu": plain}
    if implementation in ("auto", "cudnn") and not documents and _cudnn_accepts(q):
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

    def run(*args):
        return registry.platform_dependent(
            "attention", *args, per_platform=per_platform, shapes_from=plain
        )

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


def _cudnn(q, k, v, *, causal: bool, fallback: Callable):
    try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    except (NotImplementedError, ValueError):  # cuDNN declines this shape at trace time
        return fallback(q, k, v)


def _splash_accepts(q) -> bool:
    """Splash's blocks are multiples of 128 rows: the sequence must be one."""
    return q.shape[1] % 128 == 0


def _splash(q, k, v, segment_ids=None, *, causal: bool):
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

    q, k, v = heads_first(q * scale), heads_first(k), heads_first(v)
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:  # the kernel ands the segment mask into the causal one; each row sees itself

        def one_row(q, k, v, ids):
            return kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(q=ids, kv=ids))

        out = jax.vmap(one_row)(q, k, v, segment_ids)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# The chunked XLA path


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(q, k, v, segment_ids, causal, chunk):
    """segment_ids: None or int32 [batch, seq] (no gradient)."""
    return _chunked_forward(q, k, v, segment_ids, causal, chunk)[0]


def _blocks(seq: int, chunk: int) -> tuple[int, int]:
    """(block size, number of blocks): one block when the sequence fits in a chunk."""
    block = min(chunk, seq)
    return block, -(-seq // block)


def _pad(x, padded: int):
    return jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))


def _pad_segments(segment_ids, padded: int):
    """[batch, seq] → [batch, padded], padding rows repeating the last id: a padding query row then
    shares the last real key's document, so it sees at least that key (no empty softmax)."""
    if segment_ids is None:
        return None
    return jnp.pad(segment_ids, ((0, 0), (0, padded - segment_ids.shape[1])), mode="edge")


def _block_mask(i, j, block: int, seq: int, causal: bool, segments=None):
    """bool [block, block]: query block i may attend key block j (causal, real keys only); with
    segments (the padded [batch, padded] ids) [batch, 1, block, block], also same document."""
    query = i * block + jnp.arange(block)[:, None]
    key = j * block + jnp.arange(block)[None, :]
    allowed = key < seq
    allowed = allowed & (key <= query) if causal else allowed
    if segments is None:
        return allowed
    query_ids = jax.lax.dynamic_slice_in_dim(segments, i * block, block, axis=1)
    key_ids = jax.lax.dynamic_slice_in_dim(segments, j * block, block, axis=1)
    same = query_ids[:, :, None] == key_ids[:, None, :]  # [batch, block, block]
    return (allowed & same)[:, None]


def _key_blocks(i, count: int, causal: bool):
    """How many key blocks query block i reads: those at or before it when causal."""
    return i + 1 if causal else count


def _chunked_forward(q, k, v, segment_ids, causal, chunk):
    batch, seq, heads, head_dim = q.shape
    block, count = _blocks(seq, chunk)
    padded = block * count
    q, k, v = _pad(q, padded), _pad(k, padded), _pad(v, padded)
    segments = _pad_segments(segment_ids, padded)
    scale = 1.0 / math.sqrt(head_dim)

    def query_block(i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)

        def key_block(j, carry):
            running_max, running_sum, acc = carry
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q_i, k_j, preferred_element_type=jnp.float32)
            mask = _block_mask(i, j, block, seq, causal, segments)
            scores = jnp.where(mask, scores * scale, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
            shift = new_max
            if segments is not None:
                # A row may see no key yet (its document starts in a later block): shift by 0
                # there, so exp(-inf − 0) = 0 instead of exp(-inf + inf) = NaN.
                shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
            probs = jnp.exp(scores - shift[..., None])
            correction = jnp.exp(running_max - shift)
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
        # Without segments key block 0 is visible to every query row, so the running max is
        # finite from then on; with them every row sees at least its own key (the diagonal
        # block, or the last real key for padding rows), so the sum is positive at the end.
        running_max, running_sum, acc = jax.lax.fori_loop(
            0, _key_blocks(i, count, causal), key_block, init
        )
        out = (acc / running_sum[..., None]).astype(q.dtype)
        return jnp.swapaxes(out, 1, 2), running_max + jnp.log(running_sum)

    out, logsumexp = jax.lax.map(query_block, jnp.arange(count))
    # out: [count, batch, block, heads, head_dim]; logsumexp: [count, batch, heads, block]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, heads, head_dim)
    logsumexp = jnp.moveaxis(logsumexp, 0, 2).reshape(batch, heads, padded)
    return out[:, :seq], (q, k, v, segments, out, logsumexp)


def _chunked_fwd(q, k, v, segment_ids, causal, chunk):
    out, residuals = _chunked_forward(q, k, v, segment_ids, causal, chunk)
    return out, residuals


def _chunked_bwd(causal, chunk, residuals, d_out):
    q, k, v, segments, out, logsumexp = residuals  # padded to whole blocks
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
                _block_mask(i, j, block, seq, causal, segments),
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
    d_q, d_k, d_v = (g[:, :seq].astype(q.dtype) for g in (d_q, d_k, d_v))
    return d_q, d_k, d_v, None  # segment ids: integers, no cotangent


def _add_block(total, block_values, start):
    current = jax.lax.dynamic_slice_in_dim(total, start, block_values.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(total, current + block_values, start, axis=1)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
