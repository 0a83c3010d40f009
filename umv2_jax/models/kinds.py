"""Which module provides each sparse kind (`model.sparse`), and the lookup that imports it.

    builder = get_sparse_builder("ultramem_v2")   # a `umv2_jax.models.sparse.SparseBuilder`

The layer modules register themselves in `umv2_jax.models.sparse` when imported; this module sits
above them (it names them) and below the Transformer (which asks it for a builder), so the backbone
does not import a layer it does not build and no layer imports the backbone.
"""

from __future__ import annotations

import importlib

from umv2_jax.models.sparse import _REGISTRY, SparseBuilder

# Modules that register a kind when imported; imported lazily so the backbone does not depend on them.
PROVIDERS: dict[str, str] = {
    "ultramem_v2": "umv2_jax.models.ultramem_v2",
    "moe": "umv2_jax.models.moe",
    "ultramem": "umv2_jax.models.product_key",
    "memory_plus": "umv2_jax.models.product_key",
    "pkm": "umv2_jax.models.product_key",
    "peer": "umv2_jax.models.product_key",
    "engram": "umv2_jax.models.engram",
}


def get_sparse_builder(name: str) -> SparseBuilder:
    """The builder registered for sparse kind `name`, importing its module first if needed."""
    if name not in _REGISTRY and name in PROVIDERS:
        try:
            importlib.import_module(PROVIDERS[name])
        except ModuleNotFoundError as error:
            if error.name != PROVIDERS[name]:
                raise
    if name not in _REGISTRY:
        available = ", ".join(sorted(_REGISTRY)) or "none yet"
        # `model.sparse` is checked against SparseKind by the config: an unknown name is a bug here.
        raise ValueError(f"sparse kind '{name}' is not registered (available: {available})")
    return _REGISTRY[name]
