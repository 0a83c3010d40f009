"""Parallelism: the device mesh, logical → mesh axis rules, token-local memory and expert ops.

mesh.py     the mesh from `config.mesh`; `active_mesh()` for ops traced under `jax.set_mesh`
rules.py    logical axis names → mesh axes (`LOGICAL_RULES`, `mesh.rules` overrides)
memory.py   UltraMemV2's memory layer token-local under shard_map, tables split on tensor/fsdp
experts.py  expert-parallel MoE: tokens exchanged over `expert` with all-to-all
warnings.py mesh axes a model cannot use, reported at start-up
distributed.py  multi-process launches (`jax.distributed` from flags / env / SLURM / TPU) and
            each process's share of a batch (`batch_share(mesh)`)
"""

from umv2_jax.parallel.mesh import (
    BATCH_AXES,
    active_mesh,
    batch_axes,
    batch_sharding,
    batch_shards,
    batch_spec,
    make_mesh,
    replicated,
    use_mesh,
)
from umv2_jax.parallel.rules import (
    LOGICAL_RULES,
    logical_to_spec,
    path_index,
    resolve_rules,
    shardings_like,
    state_shardings,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_RULES",
    "active_mesh",
    "batch_axes",
    "batch_sharding",
    "batch_shards",
    "batch_spec",
    "logical_to_spec",
    "make_mesh",
    "path_index",
    "replicated",
    "resolve_rules",
    "shardings_like",
    "state_shardings",
    "use_mesh",
]
