"""Suite-wide settings: a persistent XLA compilation cache so that the many small train runs of the
suite compile each distinct program once (the loop builds fresh jitted closures every run), and
reproducible hypothesis tests."""

import os
import tempfile

import jax
import pytest
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

# Variants that run with -m slow only (the default suite's 20-minute budget on 2 cores), each beside
# the default-suite test that covers the same code path. Node ids as pytest prints them.
SLOW_VARIANTS = {
    # the scanned memory model on 8 devices: test_memory.py's data8 case (scan_layers=true)
    "tests/parallel/test_parallel.py::test_scanned_memory_model_on_eight_devices_matches_one_device",
    # scan == loop: dense, moe, umv2 and pkm (the product-key family) stay in the default suite
    "tests/models/test_scan.py::test_scanned_model_equals_the_loop_model[umv2_ring_losses_heads]",
    "tests/models/test_scan.py::test_scanned_model_equals_the_loop_model[peer]",
    "tests/models/test_scan.py::test_scanned_model_equals_the_loop_model[memory_plus]",
    "tests/models/test_scan.py::test_scanned_model_equals_the_loop_model[ultramem_skip]",
    "tests/models/test_scan.py::test_scanned_model_equals_the_loop_model[umv2_some_blocks]",
    # remat changes no number: [True-save_dots] stays (and remat is on in test_loop's
    # umv2_scanned_remat resume); documents under remat: [True-save_dots] stays
    "tests/models/test_scan.py::test_rematerialization_changes_no_number[False-full]",
    "tests/models/test_scan.py::test_rematerialization_changes_no_number[False-save_dots]",
    "tests/models/test_scan.py::test_rematerialization_changes_no_number[True-full]",
    "tests/models/test_document_mask.py::test_rematerialized_blocks_mask_documents_too[False-full]",
    # resume is exact: umv2 (loop and scanned-remat) and moe stay; dense is the simplest state
    "tests/training/test_loop.py::test_resume_is_exact[dense]",
    "tests/training/test_loop.py::test_scanned_model_trains_like_the_loop_model[moe]",
    # scanned == loop training for umv2: test_scan.py checks the model, test_loop.py the resume
    "tests/training/test_loop.py::test_scanned_model_trains_like_the_loop_model[umv2]",
    # Hugging Face logit parity: qwen3 stays (the same retrofit path; llama is the slower model)
    "tests/test_retrofit.py::test_logits_match_transformers_and_zero_memory_changes_nothing[llama]",
    # a damaged checkpoint: the bit flip stays, truncation is the same code path
    "tests/training/test_checkpoint.py::test_damaged_newest_checkpoint_is_one_line_and_the_run_falls_back[truncate]",
    # cached decoding == recomputation: umv2 (loop and scanned), moe stay
    "tests/inference/test_decode.py::test_cached_decoding_equals_full_recomputation[pkm]",
}


@pytest.hookimpl(tryfirst=True)  # before `-m 'not slow'` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW_VARIANTS:
            item.add_marker(pytest.mark.slow)
