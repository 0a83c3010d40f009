"""`train.trainable`: values-only and chosen-rows finetuning change nothing else, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umv2_jax.errors import ConfigError
from umv2_jax.training.state import build
from umv2_jax.training.step import make_train_step

from .conftest import SPARSE

STEPS = 3


def _bits(x) -> np.ndarray:
    """The raw bits of an array (so -0.0 ≠ +0.0 and NaN payloads count)."""
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _batch(config, seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.data.seq_len)
    tokens = rng.integers(0, 256, size=(shape[0], shape[1] + 1), dtype=np.int32)
    return {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "loss_mask": jnp.ones(shape, jnp.float32),
    }


def _train(setup, steps: int = STEPS, opt_state=None):
    step_fn = jax.jit(make_train_step(setup.parts, setup.optimizer, 1, 0))
    state = dict(setup.state)
    if opt_state is not None:
        state["opt_state"] = opt_state
    state = jax.tree.map(jnp.copy, state)  # the step donates nothing here, but keep setup intact
    for index in range(steps):
        state, _ = step_fn(state, setup.rest, _batch(setup.config, index))
    return state


@pytest.fixture
def umv2(tiny_config):
    def make(trainable: str):
        # Weight decay and a large LR so that any leak into a frozen parameter shows.
        return tiny_config(
            *SPARSE["umv2"],
            f"train.trainable={trainable}",
            "train.weight_decay=0.1",
            "train.learning_rate=1e-2",
            "train.warmup_fraction=0",
        )

    return make


def test_values_only_leaves_every_other_parameter_bitwise_unchanged(umv2):
    setup = build(umv2("values"))
    before = _flat(setup.state["params"])
    # A frozen -0.0 must stay -0.0 (a +0.0 "no-op" update would flip its sign bit).
    some_frozen = next(path for path in before if "embed" in path)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x.at[(0,) * x.ndim].set(-0.0) if jax.tree_util.keystr(path) == some_frozen else x
        ),
        setup.state["params"],
    )
    setup.state["params"] = params
    before = _flat(params)
    after = _flat(_train(setup)["params"])
    values = {path for path in before if "values" in path}  # values and pre_values tables
    assert values == {path for path in before if "'values'" in path or "'pre_values'" in path}
    assert len(values) == 2
    for path in before:
        if path in values:
            assert not np.array_equal(before[path], after[path]), f"{path} did not train"
        else:
            np.testing.assert_array_equal(_bits(after[path]), _bits(before[path]), err_msg=path)
    assert _bits(after[some_frozen]).reshape(-1)[0] == _bits(np.float32(-0.0))


def test_values_only_keeps_no_optimizer_state_for_frozen_parameters(umv2):
    setup = build(umv2("values"))
    shapes = {tuple(x.shape) for x in jax.tree.leaves(setup.state["opt_state"]) if x.ndim >= 2}
    value_shapes = {
        tuple(x.shape)
        for path, x in _flat(setup.state["params"]).items()
        if "values" in path  # values, pre_values
    }
    # The moments exist only for value tables (an embedding-shaped moment would be frozen state).
    assert shapes == value_shapes


def _row_mask(setup, seed: int = 0) -> np.ndarray:
    values = setup.state["params"]["shared"]["values"]
    rng = np.random.default_rng(seed)
    return rng.random(values.shape[:2]) < 0.5


def test_rows_trains_only_the_chosen_rows_of_values_and_pre_values(umv2):
    config = umv2("rows")
    mask = _row_mask(build(umv2("values")))
    setup = build(config, row_mask=mask)
    before = _flat(setup.state["params"])
    after = _flat(_train(setup)["params"])
    tables = [path for path in before if "values" in path]
    assert len(tables) == 2
    for path in before:
        if path not in tables:
            np.testing.assert_array_equal(_bits(after[path]), _bits(before[path]), err_msg=path)
            continue
        frozen_rows = ~mask
        np.testing.assert_array_equal(
            _bits(after[path][frozen_rows]), _bits(before[path][frozen_rows]), err_msg=path
        )
        # Weight decay alone moves every trained row.
        changed = np.any(after[path] != before[path], axis=-1)
        np.testing.assert_array_equal(changed, mask, err_msg=path)


def test_rows_keeps_adam_moments_for_the_chosen_rows_only(umv2):
    mask = _row_mask(build(umv2("values")), seed=1)
    mask[1, :] = False
    mask[1, 3] = True  # layers choose different numbers of rows: K = the most any layer trains
    setup = build(umv2("rows"), row_mask=mask)
    params = _flat(setup.state["params"])
    tables = {path: x for path, x in params.items() if "values" in path}
    width = int(mask.sum(axis=1).max())
    moments = [x for x in jax.tree.leaves(setup.state["opt_state"]) if x.ndim >= 2]
    # mu and nu of values and pre_values, each [L, K, D]: nothing of the size of a whole table.
    assert sorted(x.shape for x in moments) == sorted(
        (x.shape[0], width, x.shape[2]) for x in tables.values() for _ in range(2)
    )
    state = _train(setup, steps=2)
    after = _flat(state["params"])
    for path, before in tables.items():
        changed = np.any(after[path] != before, axis=-1)
        np.testing.assert_array_equal(changed, mask, err_msg=path)


@pytest.mark.parametrize("trainable, keys", [("memory", ("shared", "sparse")), ("ffn", ("ffn",))])
def test_memory_and_ffn_train_only_their_parameters_and_keep_no_other_state(umv2, trainable, keys):
    setup = build(umv2(trainable))
    before = _flat(setup.state["params"])
    trained = {path for path in before if any(f"'{key}'" in path for key in keys)}
    assert trained and len(trained) < len(before)
    moment_shapes = sorted(x.shape for x in jax.tree.leaves(setup.state["opt_state"]) if x.ndim)
    assert moment_shapes == sorted(before[p].shape for p in trained for _ in range(2))
    after = _flat(_train(setup)["params"])
    for path in before:
        if path in trained:
            assert not np.array_equal(before[path], after[path]), f"{path} did not train"
        else:
            np.testing.assert_array_equal(_bits(after[path]), _bits(before[path]), err_msg=path)


def test_rows_without_a_row_mask_is_a_config_error(umv2):
    with pytest.raises(ConfigError, match="train.trainable.*rows_usage_base"):
        build(umv2("rows"))


@pytest.mark.parametrize(
    "sparse, trainable",
    [("dense", "values"), ("moe", "values"), ("moe", "rows"), ("dense", "memory")],
)
def test_trainable_needs_value_tables(tiny_config, sparse, trainable):
    with pytest.raises(ConfigError, match="train.trainable"):
        tiny_config(*SPARSE[sparse], f"train.trainable={trainable}")
