"""Suite-wide settings: a persistent XLA compilation cache so that the many small train runs of the
suite compile each distinct program once (the loop builds fresh jitted closures every run), and
reproducible hypothesis tests."""

import os
import tempfile

import jax
from hypothesis import settings

_CACHE = os.environ.get("UMV2_TEST_COMPILATION_CACHE") or os.path.join(
    tempfile.gettempdir(), "umv2_jax_test_xla_cache"
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Hypothesis: derandomized (examples drawn from a fixed seed derived from each test, so every run
# and every machine tests the same cases; a failure reproduces), no deadline (interpret-mode kernels
# are slow and compile on first use). Tests set their own max_examples and explicit @example cases
# for planted ties and boundary shapes.
settings.register_profile("umv2", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("UMV2_HYPOTHESIS_PROFILE", "umv2"))
