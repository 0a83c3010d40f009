"""resolve_implementation: the implementation switch shared by every op."""

from __future__ import annotations

import jax
import pytest

from umv2_jax.ops.dispatch import pallas_kernel_available, resolve_implementation


def test_xla_is_always_xla():
    assert resolve_implementation("xla", "value_bag") == "xla"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU default")
def test_auto_is_xla_on_cpu():
    assert resolve_implementation("auto", "retrieval_topk") == "xla"
    assert resolve_implementation("auto", "value_bag") == "xla"


def test_auto_falls_back_to_xla_without_a_kernel():
    assert not pallas_kernel_available("no_such_op")
    assert resolve_implementation("auto", "no_such_op") == "xla"


def test_pallas_without_a_kernel_is_a_clear_error():
    with pytest.raises(ValueError) as err:
        resolve_implementation("pallas", "no_such_op")
    assert str(err.value) == (
        "implementation='pallas' needs the Pallas kernels (pallas_kernels.no_such_op), "
        "which have not landed yet; use 'xla' or 'auto'"
    )


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="choose one of auto, xla, pallas"):
        resolve_implementation("triton", "value_bag")
