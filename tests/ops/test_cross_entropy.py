"""ops.cross_entropy: the vocabulary-chunked head + loss equals optax on full logits (forward and
gradients) without an f32 [tokens, vocab] buffer; the train / eval steps' losses use it."""

import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.fixtures import run_fresh
from umv2_jax.ops.cross_entropy import chunk_count, chunked_cross_entropy


def _inputs(lead, embed, vocab, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (*lead, embed))
    head = jax.random.normal(keys[1], (embed, vocab)) / np.sqrt(embed)
    targets = jax.random.randint(keys[2], lead, 0, vocab)
    d_losses = jax.random.normal(keys[3], lead)
    return x, head, targets, d_losses


def _value_and_grads(fn, x, head, d_losses):
    @jax.jit
    def run(x, head, d_losses):
        losses, vjp = jax.vjp(fn, x, head)
        return (losses, *vjp(d_losses))

    return run(x, head, d_losses)


def _optax(targets, dtype):
    def fn(x, head):
        logits = (x.astype(dtype) @ head.astype(dtype)).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

    return fn


@pytest.mark.parametrize(
    "lead, vocab, chunk",
    [
        ((2, 5), 384, 128),  # 3 strided chunks of 128
        ((7,), 384, 100),  # 4 chunks of 96
        ((2, 5), 131, 40),  # prime vocab: 4 chunks of 33, the head padded by one masked column
    ],
)
def test_chunked_cross_entropy_equals_optax_forward_and_gradients_f32(lead, vocab, chunk):
    x, head, targets, d_losses = _inputs(lead, 16, vocab)
    assert chunk_count(vocab, chunk) > 1
    got = _value_and_grads(
        lambda x, h: chunked_cross_entropy(x, h, targets, chunk=chunk), x, head, d_losses
    )
    want = _value_and_grads(_optax(targets, jnp.float32), x, head, d_losses)
    assert got[0].shape == lead and got[0].dtype == jnp.float32
    for name, g, w in zip(("losses", "d_x", "d_head"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)


def test_chunked_cross_entropy_in_bf16_matches_optax_on_bf16_logits():
    """compute_dtype bf16: the same bf16 matmul as the full-logits path, then f32 softmax; the
    losses agree to a bf16 ulp of the logits, the gradients to bf16 rounding of their matmuls."""
    x, head, targets, d_losses = _inputs((64,), 32, 512)
    got = _value_and_grads(
        lambda x, h: chunked_cross_entropy(x, h, targets, chunk=128, compute_dtype=jnp.bfloat16),
        x,
        head,
        d_losses,
    )
    want = _value_and_grads(_optax(targets, jnp.bfloat16), x, head, d_losses)
    truth = _value_and_grads(_optax(targets, jnp.float32), x, head, d_losses)
    for name, g, w, t in zip(("losses", "d_x", "d_head"), got, want, truth):
        err = float(jnp.max(jnp.abs(g - t)))
        want_err = float(jnp.max(jnp.abs(w - t)))
        assert err <= 2 * want_err + 1e-6, (name, err, want_err)
        np.testing.assert_allclose(g, w, atol=4 * 2**-8 * float(jnp.max(jnp.abs(t))), err_msg=name)


def test_the_gradient_never_holds_full_logits():
    """Compiled loss + gradient at 256 tokens × vocab 8192, chunk 1024: no [256, 8192] buffer,
    and temporaries below one f32 [tokens, vocab] array."""
    tokens, embed, vocab = 256, 32, 8192
    x = jax.ShapeDtypeStruct((tokens, embed), jnp.float32)
    head = jax.ShapeDtypeStruct((embed, vocab), jnp.float32)
    targets = jax.ShapeDtypeStruct((tokens,), jnp.int32)

    def compiled(loss_fn):
        grad = jax.grad(lambda x, h, t: jnp.sum(loss_fn(x, h, t)), argnums=(0, 1))
        return jax.jit(grad).trace(x, head, targets).lower().compile()

    chunked = compiled(lambda x, h, t: chunked_cross_entropy(x, h, t, chunk=1024))
    plain = compiled(lambda x, h, t: _optax(t, jnp.float32)(x, h))
    full = re.compile(rf"f32\[{tokens},{vocab}\]")
    assert full.search(plain.as_text())  # the check sees the full logits where they exist
    assert not full.search(chunked.as_text())
    logits_bytes = tokens * vocab * 4
    assert plain.memory_analysis().temp_size_in_bytes >= logits_bytes
    assert chunked.memory_analysis().temp_size_in_bytes < logits_bytes / 2


def test_one_chunk_covering_the_vocabulary_is_the_plain_computation():
    """Bitwise, gradients included: a small vocabulary trains exactly as with full logits."""
    x, head, targets, d_losses = _inputs((2, 9), 16, 256)
    got = _value_and_grads(
        lambda x, h: chunked_cross_entropy(x, h, targets, chunk=256), x, head, d_losses
    )
    want = _value_and_grads(_optax(targets, jnp.float32), x, head, d_losses)
    for name, g, w in zip(("losses", "d_x", "d_head"), got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)


def test_chunk_count_is_the_smallest_divisor_within_the_chunk():
    assert chunk_count(50304, 8192) == 8  # 50304 = 8 · 6288
    assert chunk_count(384, 8192) == 1
    assert chunk_count(131, 40) == 4  # prime: ceil(131 / 40), padded


def test_bad_arguments_are_value_errors_naming_them():
    x, head, targets, _ = _inputs((4,), 8, 128)
    with pytest.raises(ValueError, match="chunk=0"):
        chunked_cross_entropy(x, head, targets, chunk=0)
    with pytest.raises(ValueError, match=r"head \(8, 128\)"):
        chunked_cross_entropy(x[:, :4], head, targets)
    with pytest.raises(ValueError, match="integers"):
        chunked_cross_entropy(x, head, targets.astype(jnp.float32))


def test_train_step_losses_and_gradients_equal_the_full_logits_loss():
    """The steps' `model_token_losses` (vocabulary chunks of 128 on a 384-column padded vocab)
    against optax on `Transformer.__call__`'s logits, on a tiny f32 model."""
    from umv2_jax.config import load_config
    from umv2_jax.training.state import build
    from umv2_jax.training.step import model_token_losses, token_losses

    overrides = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_ff=64"]
    config = load_config(None, [*overrides, "model.loss_vocab_chunk=128", "data.seq_len=16"])
    setup = build(config)
    parts, rest = setup.parts, setup.rest
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 17)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def chunked(params):
        model = parts.build(params, rest)
        assert model.config.padded_vocab_size == 384
        return jnp.mean(model_token_losses(model, inputs, targets)[0])

    def full(params):
        return jnp.mean(token_losses(parts.build(params, rest)(inputs)[0], targets))

    params = setup.state["params"]
    got_loss, got = jax.jit(jax.value_and_grad(chunked))(params)
    want_loss, want = jax.jit(jax.value_and_grad(full))(params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        w = jax.tree_util.tree_flatten_with_path(want)[0]
        w = dict((jax.tree_util.keystr(p), leaf) for p, leaf in w)[jax.tree_util.keystr(path)]
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


MESH_PROGRAM = textwrap.dedent(
    """
    import json, re
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from umv2_jax import parallel
    from umv2_jax.config import MeshConfig
    from umv2_jax.ops.cross_entropy import chunked_cross_entropy

    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    token_spec, head_spec = P(parallel.BATCH_AXES), P("fsdp", "tensor")  # the rules' embed, vocab

    def grads(chunk):
        def loss(x, head, targets):
            return jnp.sum(chunked_cross_entropy(x, head, targets, chunk=chunk) ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1))

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (64, 16))
    head = jax.random.normal(keys[1], (16, 1024)) / 4
    targets = jax.random.randint(keys[2], (64,), 0, 1024)
    single = jax.jit(grads(256))(x, head, targets)
    with parallel.use_mesh(mesh):
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        meshed = jax.jit(grads(256))(put(x, token_spec), put(head, head_spec),
                                     put(targets, token_spec))
        tokens, embed, vocab = 4096, 64, 50304
        abstract = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
            shape, dtype, sharding=NamedSharding(mesh, spec))
        compiled = jax.jit(grads(8192)).trace(
            abstract((tokens, embed), jnp.float32, token_spec),
            abstract((embed, vocab), jnp.float32, head_spec),
            abstract((tokens,), jnp.int32, token_spec),
        ).lower().compile()
    collectives = re.findall(
        r"= \\S+\\[([0-9,]*)\\]\\S* (all-gather|all-reduce|reduce-scatter|all-to-all)\\(",
        compiled.as_text())
    print(json.dumps({
        "relative_difference": max(
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
            for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(meshed))),
        "collective_shapes": sorted({shape for shape, _ in collectives}),
        "temporaries": compiled.memory_analysis().temp_size_in_bytes,
    }))
    """
)


@pytest.fixture(scope="module")
def on_a_mesh() -> dict:
    """One subprocess with 8 fake CPU devices, mesh (data 2, fsdp 2, tensor 2); the head sharded
    as the rules shard it (embed on fsdp, vocab on tensor), tokens over the batch axes."""
    return run_fresh(MESH_PROGRAM)


def test_chunked_cross_entropy_on_a_mesh_equals_one_device(on_a_mesh):
    """Loss and gradients (x, head) relative to their largest entry: f32 rounding only."""
    assert on_a_mesh["relative_difference"] < 1e-5


def test_a_tensor_sharded_vocabulary_stays_sharded_in_every_chunk(on_a_mesh):
    """4096 tokens, vocab 50304 on tensor 2, chunks of 6288 strided columns: collectives move
    [tokens]-sized maxima / sums and each device's 3144 columns, never a whole chunk or the
    vocabulary; temporaries stay below one device's share of f32 logits (1024 × 25152)."""
    shapes = on_a_mesh["collective_shapes"]
    assert shapes, "expected collectives on a (data 2, fsdp 2, tensor 2) mesh"
    columns = {int(d) for shape in shapes for d in shape.split(",") if d}
    assert 3144 in columns
    assert not columns & {6288, 25152, 50304}, shapes
    assert on_a_mesh["temporaries"] < 1024 * 25152 * 4
