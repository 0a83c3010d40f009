"""`train.table_optimizer`: the value and pre-value tables' update rule (adamw | adafactor | sgd).

Oracle: one step's update written out in numpy. A rank-1 gradient g = a ⊗ b makes Adafactor's
factored second moment exact (row means ⊗ column means / overall mean = g²), so its first update is
-lr·(sign(g) + wd·p); SGD's is -lr·(g + wd·p); AdamW's (the other groups, always) -lr·(g/(|g| + ε)
+ wd·p) at step one.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax import parallel
from umv2_jax.config import load_config
from umv2_jax.errors import ConfigError
from umv2_jax.models.init import ValueParam
from umv2_jax.training import loop
from umv2_jax.training.optimizer import make_optimizer, parameter_labels

from .conftest import SPARSE

QUIET = {"progress": False, "echo": lambda line: None}
LR, DECAY, FACTOR = 0.1, 0.5, 3.0
L, ROWS, D = 2, 256, 128  # optax factors dimensions of 128 and more


class _Toy(nnx.Module):
    def __init__(self):
        self.matrix = nnx.Param(jnp.ones((3, 3)))
        self.gain = nnx.Param(jnp.ones((3,)))
        self.table = ValueParam(jnp.ones((L, ROWS, D)))


def _config(rule):
    return load_config(
        None,
        [
            "train.steps=10",
            "train.warmup_fraction=0",
            f"train.learning_rate={LR}",
            "train.min_lr_ratio=1",
            f"train.weight_decay={DECAY}",
            "train.grad_clip=0",
            f"model.memory.value_lr=constant:{FACTOR:g}",
            f"train.table_optimizer={rule}",
        ],
    )


def _first_update(rule):
    state = nnx.state(_Toy(), nnx.Param)
    params = state.to_pure_dict()
    optimizer = make_optimizer(_config(rule), parameter_labels(state))
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 2.0, (L, ROWS, 1)) * rng.choice([-1, 1], (L, ROWS, 1))
    b = rng.uniform(0.5, 2.0, (L, 1, D))
    grads = {
        "matrix": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
        "gain": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        "table": jnp.asarray(a * b, jnp.float32),
    }
    opt_state = optimizer.init(params)
    updates, _ = optimizer.update(grads, opt_state, params)
    return grads, updates, opt_state


def _table_state_leaves(opt_state):
    """Shapes of the optimizer-state arrays that belong to the table (its key path ends 'table')."""
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return sorted(
        tuple(leaf.shape)
        for path, leaf in leaves
        if getattr(path[-1], "key", None) == "table" and np.ndim(leaf) > 0
    )


@pytest.mark.parametrize("rule", ["adamw", "adafactor", "sgd"])
def test_tables_get_their_rule_and_the_rest_keeps_adamw(rule):
    grads, updates, opt_state = _first_update(rule)
    g, p = np.asarray(grads["table"], np.float64), 1.0
    expected_table = {
        "adamw": g / (np.abs(g) + 1e-8) + DECAY * p,
        "adafactor": np.sign(g) + DECAY * p,  # rank-1 g: the factored estimate is exact
        "sgd": g + DECAY * p,
    }[rule]
    np.testing.assert_allclose(updates["table"], -LR * FACTOR * expected_table, rtol=2e-5)
    for name, decay in (("matrix", DECAY), ("gain", 0.0)):  # AdamW whatever the table rule
        gm = np.asarray(grads[name], np.float64)
        np.testing.assert_allclose(
            updates[name], -LR * (gm / (np.abs(gm) + 1e-8) + decay), rtol=2e-5
        )
    # What the table's rule keeps: AdamW two moments of its shape; Adafactor a row and a column
    # statistic ([L, D] and [L, ROWS]: the largest dimension, then the second, factored away) and
    # no first moment; SGD nothing.
    assert (
        _table_state_leaves(opt_state)
        == {
            "adamw": [(L, ROWS, D), (L, ROWS, D)],
            "adafactor": sorted(
                [(L, D), (L, ROWS), (1,)]
            ),  # (1,): optax's unused full-v placeholder
            "sgd": [],
        }[rule]
    )


def test_factored_statistics_take_the_tables_sharding():
    mesh = parallel.make_mesh(load_config(None, []).mesh, jax.devices()[:1])
    spec = jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    table = jax.sharding.NamedSharding(mesh, spec)
    index = {("table",): (table, (L, ROWS, D))}
    shapes = {"v_row": {"table": np.zeros((L, D))}, "v_col": {"table": np.zeros((L, ROWS))}}
    shardings = parallel.shardings_like(shapes, index, mesh)
    assert shardings["v_row"]["table"].spec == jax.sharding.PartitionSpec(None, "tensor")
    assert shardings["v_col"]["table"].spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_unknown_table_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="table_optimizer"):
        load_config(None, ["train.table_optimizer=lion"])


UMV2_WIDE = [*SPARSE["umv2"], "model.memory.value_dim=128"]  # [L, 144, 128]: factored


@pytest.mark.slow  # ≈ 150-230 s each on the loaded 2-core host
@pytest.mark.parametrize("rule", ["adafactor", "sgd"])
def test_training_with_the_table_rule_lowers_the_loss(tmp_path, tiny_config, rule):
    config = tiny_config(
        f"train.table_optimizer={rule}",
        "train.steps=16",
        "train.eval_every=16",
        "checkpoint.every=16",
        "train.learning_rate=1e-2",
        *UMV2_WIDE,
    )
    result = loop.train(config, str(tmp_path), **QUIET)
    assert float(np.mean(result.losses[-3:])) < result.losses[0] - 1.0, result.losses


@pytest.mark.slow  # two short runs: ≈ 36 s of CPU (365 s wall at load average 21)
def test_a_run_with_factored_table_state_learns_saves_and_resumes(tmp_path, tiny_config):
    # 4 steps, a checkpoint (with Adafactor's row/column statistics), a resume, 4
    # more; the loss falls over the 8 steps. The exact straight == split comparison is `slow`.
    config = tiny_config("train.table_optimizer=adafactor", "train.learning_rate=1e-2", *UMV2_WIDE)
    first = loop.train(config, str(tmp_path), stop_after=4, **QUIET)
    second = loop.train(config, str(tmp_path), **QUIET)
    assert first.step == 4 and second.step == 8 and len(second.losses) == 4
    losses = first.losses + second.losses
    assert float(np.mean(losses[-2:])) < losses[0] - 0.5, losses


@pytest.mark.slow  # ≈ 340 s on the loaded 2-core host
def test_resume_with_factored_table_state_is_exact(tmp_path, tiny_config):
    config = tiny_config("train.table_optimizer=adafactor", *UMV2_WIDE)
    straight = loop.train(config, str(tmp_path / "straight"), **QUIET)
    first = loop.train(config, str(tmp_path / "split"), stop_after=4, **QUIET)
    second = loop.train(config, str(tmp_path / "split"), **QUIET)
    assert first.step == 4 and second.step == 8
    assert first.losses + second.losses == straight.losses


def test_aot_state_only_shows_the_tables_optimizer_saving():
    from umv2_jax import aot

    from .conftest import TINY

    sizes = {}
    for rule in ("adamw", "adafactor", "sgd"):
        overrides = [*TINY, *UMV2_WIDE, f"train.table_optimizer={rule}"]
        argv = ["--devices", "1", "--state-only", "--json"]
        for override in overrides:
            argv += ["--set", override]
        lines = []
        aot.run(aot.parse_args(argv), echo=lines.append)
        sizes[rule] = json.loads(lines[-1])["state_bytes_per_chip"]
    config = load_config(None, [*TINY, *UMV2_WIDE])
    memory = config.model.memory
    rows = memory.n_keys**2 * config.model.num_layers  # every block holds a memory here
    tables = rows * (memory.value_dim + memory.pre_value_dim) * 4  # fp32
    assert sizes["adamw"]["opt_state_tables"] == 2 * tables  # Adam's two moments
    assert sizes["sgd"]["opt_state_tables"] == 0
    # Adafactor: values [L, 144, 128] factored into [L, 128] + [L, 144]; pre-values [L, 144, 8]
    # (8 < 128: not factored) keep a full second moment.
    factored = config.model.num_layers * (memory.value_dim + memory.n_keys**2) * 4
    full = rows * memory.pre_value_dim * 4
    placeholders = 3 * 4  # optax keeps a (1,) stand-in for each unused statistic: v; v_row, v_col
    assert sizes["adafactor"]["opt_state_tables"] == factored + full + placeholders
    for rule in ("adafactor", "sgd"):  # the rest of the state is AdamW's, unchanged
        rest = sizes[rule]["opt_state"] - sizes[rule]["opt_state_tables"]
        adamw_rest = sizes["adamw"]["opt_state"] - sizes["adamw"]["opt_state_tables"]
        assert abs(rest - adamw_rest) <= 8  # only the rules' int32 step counters differ
        assert sizes[rule]["params"] == sizes["adamw"]["params"]
