"""ops.attention: the chunked XLA path equals `jax.nn.dot_product_attention` (forward and gradients)
without holding the [batch, heads, seq, seq] scores, and `auto` reaches cuDNN / splash when lowered
for CUDA / TPU. With segment_ids (packed documents) every path equals each document run alone."""

import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.testing import lower_for
from tests.fixtures import run_fresh
from umv2_jax.ops.attention import (
    attention,
    chunked_attention,
    masks_documents,
    reference_attention,
)


def _qkv(shape, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, d_out = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), d_out


def _value_and_grads(fn, q, k, v, d_out):
    @jax.jit
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(d_out.astype(out.dtype)))

    return run(q, k, v, d_out)


@pytest.mark.parametrize(
    "seq, chunk, causal",
    [
        (40, 16, True),  # 3 blocks, the last one padded
        (40, 16, False),
        (32, 8, True),  # 4 whole blocks
        (24, 64, True),  # one block bigger than the sequence
    ],
)
def test_chunked_attention_equals_the_reference_forward_and_gradients_f32(seq, chunk, causal):
    q, k, v, d_out = _qkv((2, seq, 3, 8))
    got = _value_and_grads(
        lambda *a: chunked_attention(*a, causal=causal, chunk=chunk), q, k, v, d_out
    )
    want = _value_and_grads(lambda *a: reference_attention(*a, causal=causal), q, k, v, d_out)
    for name, g, w in zip(("out", "d_q", "d_k", "d_v"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=name)


def test_chunked_attention_in_bf16_is_as_close_to_f32_as_the_reference_in_bf16():
    """Both run in bf16 on the same bf16 inputs; the truth is the f32 reference on those inputs.
    The chunked path's error must be of the reference's own bf16 order (≤ 2× + a bf16 ulp)."""
    q, k, v, d_out = _qkv((2, 64, 2, 16), jnp.bfloat16)
    truth = _value_and_grads(
        reference_attention, *(x.astype(jnp.float32) for x in (q, k, v)), d_out
    )
    got = _value_and_grads(lambda *a: chunked_attention(*a, chunk=16), q, k, v, d_out)
    ref = _value_and_grads(reference_attention, q, k, v, d_out)
    for name, g, r, t in zip(("out", "d_q", "d_k", "d_v"), got, ref, truth):
        assert g.dtype == jnp.bfloat16, name
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - t)))
        ref_err = float(jnp.max(jnp.abs(r.astype(jnp.float32) - t)))
        scale = float(jnp.max(jnp.abs(t)))
        assert err <= 2 * ref_err + 2**-8 * scale, (name, err, ref_err)


def test_chunked_attention_gradient_never_holds_the_score_matrix():
    """The compiled forward+backward at seq 512, chunk 64 has no [.., 512, 512] buffer and plans
    less temporary memory than one f32 [batch, heads, seq, seq] score matrix."""
    batch, seq, heads, dim = 1, 512, 2, 16
    spec = jax.ShapeDtypeStruct((batch, seq, heads, dim), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)

    def compiled(fn):
        return (
            jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2))).trace(spec, spec, spec).lower().compile()
        )

    chunked = compiled(lambda q, k, v: chunked_attention(q, k, v, chunk=64))
    plain = compiled(reference_attention)
    scores = batch * heads * seq * seq * 4
    square = re.compile(rf"\[(\d+,)*{seq},{seq}\]")
    assert square.search(plain.as_text())  # the check can see the reference's score matrix
    assert not square.search(chunked.as_text())
    assert plain.memory_analysis().temp_size_in_bytes >= scores
    assert chunked.memory_analysis().temp_size_in_bytes < scores / 4


# ---------------------------------------------------------------------------------------------
# Document masks (segment_ids)

# Packed rows of 40 tokens: documents crossing 16- and 7-token block boundaries, a one-token
# document, a document starting late in a block, trailing padding (segment 0), a row of one document.
DOCUMENT_LENGTHS = ([5, 13, 1, 15, 0, 0, 0, 0, 0, 0], [40], [3, 20, 17], [9, 9, 9, 9, 0, 0, 0, 0])


def _segment_ids(rows=DOCUMENT_LENGTHS):
    """int32 [rows, 40]: ids 1, 2, … per listed length; each 0 listed is one padding token (id 0)."""
    out = []
    for lengths in rows:
        ids = []
        for number, length in enumerate(lengths, start=1):
            ids += [number if length else 0] * max(length, 1)
        out.append(ids)
    return jnp.asarray(out, jnp.int32)


def _per_document(q, k, v, segment_ids, causal=True):
    """The oracle: every document of every row through plain attention on its own (the padding,
    segment 0, as one more document), the outputs scattered back to their positions.
    Differentiable."""
    ids = np.asarray(segment_ids)
    out = jnp.zeros(q.shape, jnp.float32)
    for row in range(ids.shape[0]):
        for index in (np.nonzero(ids[row] == d)[0] for d in np.unique(ids[row])):
            part = reference_attention(
                q[row : row + 1, index], k[row : row + 1, index], v[row : row + 1, index], causal
            )
            out = out.at[row, index].set(part[0].astype(jnp.float32))
    return out


def test_the_per_document_oracle_is_not_plain_attention():
    """The oracle differs from unmasked attention on packed rows (so the tests below can fail)."""
    q, k, v, _ = _qkv((4, 40, 2, 8), seed=5)
    gap = jnp.max(jnp.abs(_per_document(q, k, v, _segment_ids()) - reference_attention(q, k, v)))
    assert float(gap) > 0.1


@pytest.mark.parametrize(
    "implementation, chunk, causal",
    [
        ("xla", 512, True),
        ("xla", 512, False),
        ("chunked", 16, True),  # 3 blocks, the last padded; documents cross block boundaries
        ("chunked", 7, True),  # a chunk that does not divide 40
        ("chunked", 8, True),  # 5 whole blocks
        ("chunked", 64, True),  # one block bigger than the sequence
        ("chunked", 16, False),
        ("chunked", 7, False),
        ("auto", 16, True),  # CPU: chunked
        ("auto", 64, True),  # CPU: the reference (one chunk)
    ],
)
def test_every_path_with_segment_ids_equals_each_document_alone(implementation, chunk, causal):
    """Forward and gradients against the per-document oracle, fresh inputs; padding tokens
    (segment 0) attend padding only and stay finite."""
    q, k, v, d_out = _qkv((4, 40, 3, 8), seed=11)
    segment_ids = _segment_ids()

    def run(q, k, v):
        return attention(
            q,
            k,
            v,
            causal=causal,
            implementation=implementation,
            chunk=chunk,
            segment_ids=segment_ids,
        )

    got = _value_and_grads(run, q, k, v, d_out)
    want = _value_and_grads(lambda *a: _per_document(*a, segment_ids, causal), q, k, v, d_out)
    for name, g, w in zip(("out", "d_q", "d_k", "d_v"), got, want):
        assert bool(jnp.all(jnp.isfinite(g))), name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=3e-6, err_msg=name)


def test_chunked_gradients_with_segment_ids_equal_the_reference_in_bf16():
    """The custom VJP against autodiff of the masked reference, both bf16; truth: f32 reference."""
    q, k, v, d_out = _qkv((4, 40, 2, 16), jnp.bfloat16, seed=3)
    segment_ids = _segment_ids()
    truth = _value_and_grads(
        lambda *a: reference_attention(*a, segment_ids=segment_ids),
        *(x.astype(jnp.float32) for x in (q, k, v)),
        d_out,
    )
    got = _value_and_grads(
        lambda *a: chunked_attention(*a, chunk=16, segment_ids=segment_ids), q, k, v, d_out
    )
    ref = _value_and_grads(
        lambda *a: reference_attention(*a, segment_ids=segment_ids), q, k, v, d_out
    )
    for name, g, r, t in zip(("out", "d_q", "d_k", "d_v"), got, ref, truth):
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - t)))
        ref_err = float(jnp.max(jnp.abs(r.astype(jnp.float32) - t)))
        assert err <= 2 * ref_err + 2**-8 * float(jnp.max(jnp.abs(t))), (name, err, ref_err)


def test_one_document_per_row_is_no_mask():
    q, k, v, _ = _qkv((2, 40, 2, 8), seed=4)
    ones = jnp.ones((2, 40), jnp.int32)
    for implementation, chunk in (("xla", 512), ("chunked", 16), ("auto", 7)):
        plain = attention(q, k, v, implementation=implementation, chunk=chunk)
        masked = attention(q, k, v, implementation=implementation, chunk=chunk, segment_ids=ones)
        np.testing.assert_allclose(masked, plain, rtol=1e-6, atol=1e-6, err_msg=implementation)


def test_masks_documents_names_the_paths_that_apply_a_document_mask():
    assert {
        name: masks_documents(name) for name in ("auto", "xla", "chunked", "splash", "cudnn")
    } == {
        "auto": True,
        "xla": True,
        "chunked": True,
        "splash": True,
        "cudnn": False,
    }
    with pytest.raises(ValueError, match="implementation='flash'"):
        masks_documents("flash")


def test_auto_on_cpu_is_the_reference_up_to_one_chunk_and_chunked_beyond():
    q, k, v, _ = _qkv((1, 32, 2, 8))
    run = jax.jit(attention, static_argnames="chunk")
    np.testing.assert_array_equal(run(q, k, v, chunk=32), jax.jit(reference_attention)(q, k, v))
    np.testing.assert_array_equal(
        run(q, k, v, chunk=8), jax.jit(chunked_attention, static_argnames="chunk")(q, k, v, chunk=8)
    )


def _lowered_text(
    platform: str, implementation: str = "auto", dtype=jnp.bfloat16, documents: bool = False
) -> str:
    """Forward and backward lowered for `platform`; `documents`: with segment_ids [2, 256]."""
    spec = jax.ShapeDtypeStruct((2, 256, 4, 64), dtype)
    ids = (jax.ShapeDtypeStruct((2, 256), jnp.int32),) if documents else ()

    def step(q, k, v, segment_ids=None):
        def loss(q, k, v):
            out = attention(
                q, k, v, implementation=implementation, chunk=128, segment_ids=segment_ids
            )
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return lower_for(step, (spec, spec, spec, *ids), platform)


@pytest.fixture
def cudnn_present(monkeypatch):
    """This CPU host has no cuDNN; the cuDNN attention lowering only needs its version."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)


def test_auto_lowered_for_cuda_calls_cudnn_flash_attention(cudnn_present):
    text = _lowered_text("cuda")
    assert "__cudnn$fmhaSoftmax(" in text  # forward
    assert "__cudnn$fmhaSoftmaxBackward" in text
    assert "tpu_custom_call" not in text


def test_cuda_falls_back_to_chunked_for_f32_which_cudnn_lacks(cudnn_present):
    text = _lowered_text("cuda", dtype=jnp.float32)
    assert "cudnn" not in text
    assert "while" in text  # the chunked loops


def test_auto_lowered_for_tpu_calls_splash_attention():
    text = _lowered_text("tpu")
    assert text.count("tpu_custom_call") >= 3  # forward, d_q, d_k/d_v kernels
    assert "splash" in text
    assert "cudnn" not in text


# Per-row segment ids reach a splash kernel as an int32 operand with the batch (2) and the
# sequence (256) in its shape (the kernel's own mask tables are [256, 128] per call, no batch).
_ROW_IDS = re.compile(r"tensor<2x(\d+x)*256(x\d+)*xi32>")


@pytest.mark.parametrize("implementation", ["auto", "splash"])
def test_splash_lowered_for_tpu_takes_the_segment_ids(implementation):
    with_ids = _lowered_text("tpu", implementation, documents=True)
    kernels = [line for line in with_ids.splitlines() if "tpu_custom_call" in line]
    assert len(kernels) >= 3 and "cudnn" not in with_ids
    assert all(_ROW_IDS.search(line) for line in kernels)  # forward, d_q and d_k/d_v
    plain = _lowered_text("tpu", implementation)
    assert not any(
        _ROW_IDS.search(line) for line in plain.splitlines() if "tpu_custom_call" in line
    )


@pytest.mark.parametrize("implementation", ["auto", "cudnn"])
def test_cuda_with_segment_ids_runs_the_chunked_path_not_cudnn(cudnn_present, implementation):
    """cuDNN takes no per-row document mask: auto and cudnn lower the chunked loops instead."""
    text = _lowered_text("cuda", implementation, documents=True)
    assert "cudnn" not in text and "tpu_custom_call" not in text
    assert "while" in text
    assert "__cudnn$fmhaSoftmax(" in _lowered_text("cuda", implementation)  # without: cuDNN


def test_auto_lowered_for_cpu_has_no_kernel(cudnn_present):
    text = _lowered_text("cpu")
    assert "tpu_custom_call" not in text and "cudnn" not in text


def test_bad_arguments_are_value_errors_naming_them():
    q, k, v, _ = _qkv((1, 8, 2, 4))
    with pytest.raises(ValueError, match="implementation='flash'"):
        attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="one shape"):
        attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match="chunk=0"):
        attention(q, k, v, chunk=0)
    with pytest.raises(ValueError, match="one dtype"):
        attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, k, v, segment_ids=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, k, v, segment_ids=jnp.ones((1, 8), jnp.float32))


MESH_PROGRAM = textwrap.dedent(
    """
    import json, re
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    from jax._src.cudnn import fused_attention_stablehlo
    from jax.sharding import NamedSharding, PartitionSpec as P
    from umv2_jax import parallel
    from umv2_jax.config import MeshConfig
    from umv2_jax.ops import registry
    from umv2_jax.ops.attention import attention

    fused_attention_stablehlo.check_cudnn_version = lambda: 90800  # no cuDNN on this host
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharding = NamedSharding(mesh, P(parallel.BATCH_AXES, None, "tensor", None))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (jax.random.normal(key, (8, 48, 4, 8)) for key in keys)

    ids = jnp.asarray([[1] * 20 + [2] * 28] * 4 + [[1] * 7 + [2] * 30 + [0] * 11] * 4, jnp.int32)

    def value_and_grads(q, k, v, d_out, segment_ids=None):
        run = lambda *a: attention(*a, chunk=16, segment_ids=segment_ids)
        out, vjp = jax.vjp(run, q, k, v)
        return (out, *vjp(d_out))

    single = jax.jit(value_and_grads)(q, k, v, d_out)
    single_documents = jax.jit(value_and_grads)(q, k, v, d_out, ids)
    with parallel.use_mesh(mesh):
        placed = [jax.device_put(x, sharding) for x in (q, k, v, d_out)]
        meshed = jax.jit(value_and_grads)(*placed)
        placed_ids = jax.device_put(ids, parallel.batch_sharding(mesh))
        meshed_documents = jax.jit(value_and_grads)(*placed, placed_ids)
        spec = jax.ShapeDtypeStruct((8, 256, 4, 64), jnp.bfloat16, sharding=sharding)
        kernels = {}
        for platform, name in (("cuda", "cudnn"), ("tpu", "tpu_custom_call")):
            with registry.lowering_platforms(platform):
                text = jax.jit(attention).trace(spec, spec, spec).lower(
                    lowering_platforms=(platform,)).as_text()
            calls = [line for line in text.splitlines() if "custom_call" in line and name in line]
            found = re.findall(r"tensor<([0-9x]+)xbf16>", calls[0]) if calls else []
            kernels[platform] = found[:3]
    print(json.dumps({
        "max_difference": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(single, meshed)),
        "max_difference_documents": max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(single_documents, meshed_documents)),
        "documents_change_the_output": float(jnp.max(jnp.abs(single[0] - single_documents[0]))),
        "kernel_operands": kernels,
    }))
    """
)


@pytest.fixture(scope="module")
def on_a_mesh() -> dict:
    """One subprocess with 8 fake CPU devices, mesh (data 2, fsdp 2, tensor 2)."""
    return run_fresh(MESH_PROGRAM)


def test_attention_on_a_mesh_equals_one_device(on_a_mesh):
    assert on_a_mesh["max_difference"] < 1e-6


def test_attention_with_segment_ids_on_a_mesh_equals_one_device(on_a_mesh):
    """The ids are split over the batch axes with q, k, v (shard_map in_specs)."""
    assert on_a_mesh["max_difference_documents"] < 1e-6
    assert on_a_mesh["documents_change_the_output"] > 0.1


def test_fused_kernels_on_a_mesh_see_only_their_own_sequences_and_heads(on_a_mesh):
    """Batch 8 over data·fsdp (4 shards), 4 heads over tensor (2): each kernel call gets
    [2, 256, 2, 64] (cuDNN, batch-seq-heads-dim) / [2, 2, 256, 64] (splash, heads first)."""
    assert on_a_mesh["kernel_operands"]["cuda"] == ["2x256x2x64"] * 3
    assert on_a_mesh["kernel_operands"]["tpu"] == ["2x2x256x64"] * 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.attention=flash", "model.attention"),
        ("model.attention_chunk=0", "model.attention_chunk"),
        ("model.loss_vocab_chunk=-1", "model.loss_vocab_chunk"),
    ],
)
def test_bad_attention_and_loss_settings_are_config_errors_naming_the_key(override, message):
    from umv2_jax.config import load_config
    from umv2_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"'{message}'")):
        load_config(None, [override])
