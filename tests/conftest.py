"""Suite-wide settings: a persistent XLA compilation cache so that the many small train runs of the
suite compile each distinct program once (the loop builds fresh jitted closures every run)."""

import os
import tempfile

import jax

_CACHE = os.environ.get("UMV2_TEST_COMPILATION_CACHE") or os.path.join(
    tempfile.gettempdir(), "umv2_jax_test_xla_cache"
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
