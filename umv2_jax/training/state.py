"""Building the train state from a config, and its abstract (shape + sharding) twin.

    setup = build(config)                       # params, rest, optimizer state on the config's mesh
    target = abstract_like(setup.state, setup.state_shardings)   # what a checkpoint restores into

Shared by the training loop and by everything that loads a trained run (generation, inference,
evaluation), so none of those needs the loop. The model is split once into a graph definition,
the trainable parameters and the other variables (`rest`: permutations, calibration constants —
never updated by a step); the steps are pure functions of those pure-dict trees.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umv2_jax import parallel
from umv2_jax.config import Config
from umv2_jax.models.build import compile_once
from umv2_jax.models.transformer import Transformer
from umv2_jax.parallel import layouts
from umv2_jax.training.optimizer import make_optimizer, parameter_labels


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """What is needed to rebuild the model from pure-dict trees inside a jitted function.

    The templates hold shapes only (`jax.ShapeDtypeStruct` leaves), never arrays, so nothing is
    baked into a compiled step as a constant.
    """

    graphdef: nnx.GraphDef
    params_template: nnx.State
    rest_template: nnx.State

    @classmethod
    def split(cls, model: nnx.Module) -> tuple[ModelParts, dict, dict]:
        """(parts, params pure dict, rest pure dict) of a model."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        shapes = lambda state: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        parts = cls(graphdef, shapes(params), shapes(rest))
        return parts, params.to_pure_dict(), rest.to_pure_dict()

    def build(self, params: dict, rest: dict) -> nnx.Module:
        params_state = jax.tree.map(lambda x: x, self.params_template)  # fresh copies
        rest_state = jax.tree.map(lambda x: x, self.rest_template)
        nnx.replace_by_pure_dict(params_state, params)
        nnx.replace_by_pure_dict(rest_state, rest)
        return nnx.merge(self.graphdef, params_state, rest_state)


@dataclasses.dataclass
class Setup:
    """Everything built from the config before the first step.

    state: {"params": pure dict, "opt_state": optax state, "step": int32 scalar}; rest: the
    non-trainable pure dict; each has a matching tree of NamedShardings.
    """

    config: Config
    mesh: jax.sharding.Mesh
    parts: ModelParts
    state: dict[str, Any]
    rest: dict[str, Any]
    state_shardings: Any
    rest_shardings: Any
    optimizer: Any
    param_count: int
    # state_shardings with the memory tables (and their optimizer mirrors) as row-major
    # `Format`s: the train step's in/out shardings (umv2_jax.parallel.layouts)
    step_shardings: Any = None


@dataclasses.dataclass
class Plan:
    """The train state's shapes and shardings, with no array allocated (`plan`).

    params / rest / opt_state: `jax.ShapeDtypeStruct` trees (sharding attached); the shardings
    trees match them. What `build` fills with arrays, and what the AOT tool compiles against.
    """

    config: Config
    mesh: jax.sharding.Mesh
    parts: ModelParts
    optimizer: Any
    state: dict[str, Any]  # {"params", "opt_state", "step"}: ShapeDtypeStructs
    rest: dict[str, Any]
    state_shardings: Any
    rest_shardings: Any
    param_count: int
    # The train step's in/out shardings of the state: state_shardings with the memory tables and
    # their optimizer mirrors row-major (`parallel.layouts`); `state` carries them too.
    step_shardings: Any = None


def plan(
    config: Config,
    mesh: jax.sharding.Mesh | None = None,
    *,
    row_mask: Any = None,
    row_major_tables: bool = True,
) -> Plan:
    """Shapes and shardings of the train state on `mesh` (default: the config's), nothing allocated.

    Parameters are sharded by their logical axes through `mesh.rules` (umv2_jax.parallel.rules);
    optimizer state takes each parameter's sharding. row_major_tables: the step's memory tables
    (value, pre-value and their optimizer moments) keep a row-major layout (`step_shardings`);
    False leaves the layout to XLA (what `python -m umv2_jax.aot --table-layout default` measures).
    """
    mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    if row_mask is None and config.train.trainable == "rows":  # e.g. a finetuned run, reloaded
        from umv2_jax.training.finetune import row_mask_from_config

        row_mask = row_mask_from_config(config)  # the same rows: from the run's usage files
    rules = parallel.resolve_rules(config.mesh.rules)
    abstract = nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(config.train.seed)))
    param_shardings = parallel.state_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    rest_shardings = parallel.state_shardings(nnx.state(abstract, nnx.Not(nnx.Param)), mesh, rules)
    labels = parameter_labels(nnx.state(abstract, nnx.Param))
    parts, params, rest = ModelParts.split(abstract)
    params = abstract_like(_shapes(params), param_shardings)
    rest = abstract_like(_shapes(rest), rest_shardings)
    optimizer = make_optimizer(config, labels, row_mask)
    references = parallel.path_index(param_shardings, params)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = parallel.shardings_like(opt_shapes, references, mesh)
    replicated = parallel.replicated(mesh)
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
    state = {
        "params": params,
        "opt_state": abstract_like(opt_shapes, opt_shardings),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    }
    step_shardings = state_shardings
    if row_major_tables:
        tables = layouts.table_paths(labels, params)
        step_shardings = layouts.row_major_tables(state_shardings, state, tables)
        state = abstract_like(state, step_shardings)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return Plan(
        config,
        mesh,
        parts,
        optimizer,
        state,
        rest,
        state_shardings,
        rest_shardings,
        count,
        step_shardings,
    )


def build(config: Config, mesh: jax.sharding.Mesh | None = None, *, row_mask: Any = None) -> Setup:
    """Initializes the model and optimizer on the mesh, sharded by the parameters' logical axes.

    row_mask: bool [L, n²] for `train.trainable: rows` (see `training.optimizer.make_optimizer`).

    Initialization is one jitted program whose outputs are laid out by `out_shardings`, so no host
    ever holds the whole model (and op-by-op init, slow to dispatch, is avoided).
    """
    layout = plan(config, mesh, row_mask=row_mask)
    seed = config.train.seed
    shardings = layout.state_shardings

    @functools.partial(jax.jit, out_shardings=(shardings["params"], layout.rest_shardings))
    def initialize():
        _, params, rest = ModelParts.split(Transformer(config.model, nnx.Rngs(seed)))
        return params, rest

    params, rest = compile_once(initialize)()
    opt_state = jax.jit(layout.optimizer.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    state = to_step_layout(
        {"params": params, "opt_state": opt_state, "step": step}, layout.step_shardings
    )
    return Setup(
        config,
        layout.mesh,
        layout.parts,
        state,
        rest,
        shardings,
        layout.rest_shardings,
        layout.optimizer,
        layout.param_count,
        layout.step_shardings,
    )


def to_step_layout(state: Any, step_shardings: Any) -> Any:
    """The state's arrays in the train step's layouts (row-major tables); a no-op where they are
    (CPU and GPU, whose default is row-major, or a state that already went through a step)."""
    return jax.device_put(state, step_shardings)


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves with each leaf's shape, dtype and sharding (a restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
