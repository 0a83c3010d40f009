"""Row-major memory tables at the train step's boundary (`parallel.layouts`, `state.plan`)."""

import jax
from jax.experimental.layout import Format

from umv2_jax.config import load_config
from umv2_jax.training import state as state_lib

from ..training.conftest import SPARSE, TINY


def _formatted_paths(tree):
    """Key paths (as '/'-joined strings) of the leaves that carry a row-major Format."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Format))[0]
    out = {}
    for path, leaf in flat:
        if isinstance(leaf, Format):
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            out[name] = leaf.layout.major_to_minor
    return out


def test_tables_and_their_adam_moments_are_row_major_and_nothing_else():
    config = load_config(None, TINY + SPARSE["umv2"])
    plan = state_lib.plan(config)
    formatted = _formatted_paths(plan.step_shardings)
    params = {k for k in formatted if k.startswith("params/")}
    moments = {k for k in formatted if k.startswith("opt_state/")}
    # The values and pre-values tables [L, n², D]: each once in params and twice (mu, nu) in Adam.
    assert len(params) == 2, formatted
    assert len(moments) == 2 * len(params), formatted
    for name, order in formatted.items():
        assert order == (0, 1, 2), (name, order)
    # The abstract state the AOT tool compiles against carries the same formats.
    leaf = plan.state["params"]
    for name in params:
        for key in name.split("/")[1:]:
            leaf = leaf[key]
        assert leaf.format.layout.major_to_minor == (0, 1, 2)
        leaf = plan.state["params"]


def test_without_row_major_tables_the_step_shardings_are_the_state_shardings():
    config = load_config(None, TINY + SPARSE["umv2"])
    plan = state_lib.plan(config, row_major_tables=False)
    assert plan.step_shardings is plan.state_shardings
    assert _formatted_paths(plan.step_shardings) == {}


def test_a_dense_model_has_no_formatted_leaf():
    plan = state_lib.plan(load_config(None, TINY))
    assert _formatted_paths(plan.step_shardings) == {}
