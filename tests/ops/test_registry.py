"""The op registry: names, preference lists, per-lowering-platform auto, fall-through, interpret."""

from __future__ import annotations

import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from umv2_jax import config as config_lib
from umv2_jax.errors import ConfigError
from umv2_jax.ops import (
    grouped_matmul,  # noqa: F401  (declares its op)
    moe_dispatch,  # noqa: F401
    product_key_topk,  # noqa: F401
    registry,
    retrieval_topk,  # noqa: F401
    value_bag,  # noqa: F401
)

TOY = "toy_op"


def _toy_xla(x, *, interpret=False):
    del interpret
    return x * 2.0  # lowers to stablehlo.multiply


@jax.custom_vjp
def _fake_kernel(x):
    return jnp.cos(x)  # lowers to stablehlo.cosine: the kernel's fingerprint


_fake_kernel.defvjp(lambda x: (jnp.cos(x), x), lambda x, g: (g * jnp.tanh(x),))


@pytest.fixture(autouse=True)
def every_platform():
    """This module lowers for other platforms than the host's: every op traces every branch
    (the default, the host's platform only, has its own tests below)."""
    with registry.lowering_platforms("all"):
        yield


@pytest.fixture
def toy():
    """A toy op with the XLA path x·2 and a list that records each kernel call's `interpret`."""
    registry.declare_op(TOY, _toy_xla)
    calls = []

    def kernel(x, *, interpret=False):
        calls.append(interpret)
        if x.shape[0] % 2:
            raise NotImplementedError("odd lengths")
        return _fake_kernel(x)

    yield kernel, calls
    registry._OPS.pop(TOY)


def _lowered(fn, platform: str, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_a_name_resolves_to_itself_on_every_platform():
    assert registry.resolve("value_bag", "xla") == dict.fromkeys(registry.PLATFORMS, ("xla",))


def test_auto_on_cpu_is_xla_for_every_op():
    assert set(registry.ops()) >= {
        "grouped_matmul",
        "moe_dispatch",
        "product_key_topk",
        "retrieval_topk",
        "value_bag",
    }
    for op in registry.ops():
        assert registry.resolve(op)["cpu"] == ("xla",), op


def test_a_missing_kernel_is_never_an_error_under_auto(toy):
    # The toy op has no kernel module: every platform runs xla.
    assert registry.resolve(TOY) == dict.fromkeys(registry.PLATFORMS, ("xla",))


def test_auto_prefers_the_registered_kernels_on_gpu_and_tpu_and_xla_on_cpu():
    for op in ("value_bag", "retrieval_topk", "product_key_topk"):
        plan = registry.resolve(op)
        assert plan["cpu"] == ("xla",), op
        assert plan["cuda"] == ("pallas", "xla") and plan["tpu"] == ("pallas", "xla"), op


def test_preference_list_keeps_order_and_skips_what_a_platform_lacks(toy):
    kernel, _ = toy
    registry.register_implementation(TOY, "pallas", kernel, platforms=("cuda", "tpu"))
    plan = registry.resolve(TOY, ("pallas", "xla"))
    assert plan["cpu"] == ("xla",) and plan["rocm"] == ("xla",)
    assert plan["cuda"] == ("pallas", "xla") and plan["tpu"] == ("pallas", "xla")
    assert registry.resolve(TOY, ("xla", "pallas"))["tpu"] == ("xla", "pallas")
    assert registry.resolve(TOY) == plan  # the default auto


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as error:
        registry.resolve("value_bag", "triton")
    assert str(error.value) == (
        "value_bag: unknown implementation 'triton'; choose one of auto, xla, pallas, or a tuple "
        "of them"
    )


def test_explicit_pallas_without_a_kernel_is_a_one_line_error(toy):
    with pytest.raises(ValueError) as error:
        registry.call(TOY, jnp.ones(4), implementation="pallas")
    assert str(error.value) == (
        "toy_op: implementation 'pallas' has no registered kernel (Pallas kernels register from "
        "pallas_kernels.toy_op.gpu / .tpu); use one of auto, xla"
    )


def test_auto_lowers_the_kernel_for_cuda_and_tpu_and_xla_for_cpu_from_one_trace(toy):
    kernel, _ = toy
    registry.register_implementation(TOY, "pallas", kernel, platforms=("cuda", "tpu"))
    traced = jax.jit(lambda x: registry.call(TOY, x)).trace(jnp.ones(4))
    text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda", "tpu")}
    assert "stablehlo.multiply" in text["cpu"] and "cosine" not in text["cpu"]
    for platform in ("cuda", "tpu"):
        # Only the chosen branch is lowered.
        assert "cosine" in text[platform] and "multiply" not in text[platform], platform
    # The host (CPU) runs the XLA path.
    np.testing.assert_array_equal(jax.jit(lambda x: registry.call(TOY, x))(jnp.ones(4)), 2.0)


def test_auto_under_grad_lowers_the_kernels_custom_vjp(toy):
    kernel, _ = toy
    registry.register_implementation(TOY, "pallas", kernel, platforms=("cuda", "tpu"))

    def grad(x):
        return jax.grad(lambda x: jnp.sum(registry.call(TOY, x)))(x)

    assert "tanh" in _lowered(grad, "tpu", jnp.ones(4))  # the fake kernel's own backward
    assert "tanh" not in _lowered(grad, "cpu", jnp.ones(4))
    np.testing.assert_array_equal(jax.jit(grad)(jnp.ones(4)), 2.0)


def test_a_kernel_declining_a_shape_falls_through_to_the_next_choice(toy):
    kernel, _ = toy
    registry.register_implementation(TOY, "pallas", kernel, platforms=("cuda", "tpu"))
    odd = _lowered(lambda x: registry.call(TOY, x), "cuda", jnp.ones(5))
    assert "multiply" in odd and "cosine" not in odd
    even = _lowered(lambda x: registry.call(TOY, x), "cuda", jnp.ones(6))
    assert "cosine" in even


def test_interpret_threads_through_to_the_kernel(toy):
    kernel, calls = toy
    registry.register_implementation(TOY, "pallas", kernel, platforms=("tpu",))
    x = jnp.linspace(0.0, 1.0, 4)
    # In the interpreter the kernel runs on this CPU machine: its output, not the XLA path's.
    out = registry.call(TOY, x, implementation="pallas", interpret=True)
    np.testing.assert_allclose(out, jnp.cos(x), rtol=1e-6)
    assert calls == [True]
    # "pallas" alone on CPU, where no kernel compiles, runs the kernel in the interpreter too.
    out = jax.jit(lambda x: registry.call(TOY, x, implementation="pallas"))(x)
    np.testing.assert_allclose(out, jnp.cos(x), rtol=1e-6)
    # One trace per distinct branch: interpreted for CPU (which ran), compiled for TPU.
    assert sorted(calls[1:]) == [False, True]
    # In a preference list CPU skips the kernel it cannot compile.
    assert registry.resolve(TOY, ("pallas", "xla"))["cpu"] == ("xla",)


def test_kernel_modules_register_themselves_when_imported(toy, tmp_path, monkeypatch):
    package = tmp_path / TOY
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tpu.py").write_text(
        "import jax.numpy as jnp\n"
        "from umv2_jax.ops import registry\n"
        "registry.register_implementation(\n"
        "    'toy_op', 'pallas', lambda x, *, interpret=False: jnp.cos(x), platforms=('tpu',)\n"
        ")\n"
    )
    monkeypatch.setattr(pallas_kernels, "__path__", [*pallas_kernels.__path__, str(tmp_path)])
    for name in (f"pallas_kernels.{TOY}", f"pallas_kernels.{TOY}.tpu"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert registry.resolve(TOY)["tpu"] == ("pallas", "xla")  # imported on first use
        assert registry.resolve(TOY)["cuda"] == ("xla",)  # no gpu.py: nothing registered there
    finally:
        for name in (f"pallas_kernels.{TOY}", f"pallas_kernels.{TOY}.tpu"):
            sys.modules.pop(name, None)


def test_config_fields_use_the_registry_vocabulary():
    assert typing.get_args(config_lib.Implementation) == registry.IMPLEMENTATIONS
    hints = {
        section: typing.get_type_hints(section)["implementation"]
        for section in (config_lib.MemoryConfig, config_lib.MoEConfig, config_lib.ProductKeyConfig)
    }
    assert set(hints.values()) == {config_lib.Implementation}


@pytest.mark.parametrize("old, new", [("block_padded", "xla"), ("megablox", "pallas")])
def test_renamed_moe_implementations_name_the_new_value(old, new):
    with pytest.raises(ConfigError) as error:
        config_lib.load_config(None, [f"model.moe.implementation={old}"])
    assert str(error.value) == (
        f"config 'model.moe.implementation': '{old}' was renamed; use '{new}'"
    )


def test_explicit_pallas_declined_on_one_platform_only_fails_there_only(toy):
    """The TPU kernel declines odd lengths, the GPU one does not: "pallas" lowers for CUDA, runs in
    the CPU interpreter, and fails only when lowered for TPU, with one line naming the shape."""
    tpu_kernel, _ = toy  # declines odd lengths

    def gpu_kernel(x, *, interpret=False):
        del interpret
        return _fake_kernel(x)

    registry.register_implementation(TOY, "pallas", gpu_kernel, platforms=("cuda", "rocm"))
    registry.register_implementation(TOY, "pallas", tpu_kernel, platforms=("tpu",))
    pallas = lambda x: registry.call(TOY, x, implementation="pallas")
    odd = jnp.linspace(0.0, 1.0, 5)
    assert "cosine" in _lowered(pallas, "cuda", odd)
    np.testing.assert_allclose(jax.jit(pallas)(odd), jnp.cos(odd), rtol=1e-6)  # CPU interpreter
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(pallas(x)))(odd), jnp.tanh(odd))
    assert jax.vmap(pallas)(jnp.ones((2, 5))).shape == (2, 5)
    with pytest.raises(NotImplementedError) as error:
        _lowered(pallas, "tpu", odd)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "toy_op: every implementation declined the arguments float32[5]: pallas (odd lengths) "
        "(lowering for tpu)"
    )
    # The even length takes the TPU kernel; lowering for several platforms at once needs them all.
    assert "cosine" in _lowered(pallas, "tpu", jnp.ones(6))
    with pytest.raises(NotImplementedError, match="lowering for tpu"):
        jax.jit(pallas).trace(odd).lower(lowering_platforms=("cuda", "tpu"))


def test_explicit_pallas_value_bag_with_bf16_odd_rows_runs_where_a_kernel_serves_them():
    """bf16 tables with an odd row count: the GPU kernel serves them, the TPU kernel declines."""
    from umv2_jax.ops.value_bag import value_bag as value_bag_fn

    rng = np.random.default_rng(0)
    values = jnp.asarray(rng.normal(size=(7, 8)), jnp.bfloat16)
    rows = jnp.asarray(rng.integers(0, 7, size=(4, 2)), jnp.int32)
    scores = jnp.asarray(rng.normal(size=(4, 2, 1)), jnp.float32)
    pallas = lambda v, s: value_bag_fn(v, None, rows, s, None, implementation="pallas")
    text = _lowered(pallas, "cuda", values, scores)
    assert "value_bag" in text  # the Triton kernel's custom call
    out = jax.jit(pallas)(values, scores)  # the GPU kernel in the CPU interpreter
    want = value_bag_fn(values, None, rows, scores, None, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=1e-2)
    with pytest.raises(NotImplementedError, match=r"bfloat16\[7,8\].*odd number of rows"):
        _lowered(pallas, "tpu", values, scores)


def test_interpret_falls_through_to_the_next_kernel_when_one_declines(toy):
    tpu_kernel, calls = toy  # declines odd lengths

    def gpu_kernel(x, *, interpret=False):
        calls.append(("gpu", interpret))
        return _fake_kernel(x) + 1.0

    registry.register_implementation(TOY, "pallas", gpu_kernel, platforms=("cuda",))
    registry.register_implementation(TOY, "pallas", tpu_kernel, platforms=("tpu",))
    x = jnp.linspace(0.0, 1.0, 5)
    out = registry.call(TOY, x, implementation="pallas", interpret=True)
    np.testing.assert_allclose(out, jnp.cos(x) + 1.0, rtol=1e-6)
    assert calls == [True, ("gpu", True)]  # the TPU kernel declined, then the GPU one ran
    assert registry.resolve(TOY, "pallas", interpret=True)["cpu"] == ("pallas",)


def test_by_default_only_the_hosts_platform_is_traced_and_another_lowering_says_how(
    toy, monkeypatch
):
    kernel, calls = toy
    registry.register_implementation(TOY, "pallas", kernel, platforms=("cuda", "tpu"))
    monkeypatch.setattr(registry, "_TRACED_OVERRIDE", None)
    monkeypatch.delenv(registry.ENVIRONMENT, raising=False)
    assert registry.traced_platforms() == ("cpu",)  # this host
    traced = jax.jit(lambda x: registry.call(TOY, x)).trace(jnp.ones(4))
    assert calls == []  # no GPU / TPU kernel was traced
    assert "multiply" in traced.lower(lowering_platforms=("cpu",)).as_text()
    with pytest.raises(NotImplementedError) as error:
        traced.lower(lowering_platforms=("cuda",))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "toy_op was traced for cpu only, so it cannot be lowered for cuda, tpu: trace inside "
        "`umv2_jax.ops.registry.lowering_platforms('cuda', 'tpu')`"
    )
    # ROCm has no kernel here: its chain is CPU's, so it shares the traced branch.
    assert "multiply" in traced.lower(lowering_platforms=("rocm",)).as_text()
    # Under grad and vmap the untraced branch costs nothing and the host runs the XLA path.
    grad = jax.jit(jax.vmap(jax.grad(lambda x: registry.call(TOY, x))))
    np.testing.assert_array_equal(grad(jnp.ones(4)), 2.0)
    assert calls == []


def test_lowering_platforms_retraces_what_was_traced_for_the_host(toy):
    kernel, calls = toy
    registry.register_implementation(TOY, "pallas", kernel, platforms=("cuda", "tpu"))
    double = jax.jit(lambda x: registry.call(TOY, x))
    with registry.lowering_platforms("cpu") as chosen:
        assert chosen == ("cpu",)  # the host's alone
        np.testing.assert_array_equal(double(jnp.ones(4)), 2.0)
        assert calls == []
        with registry.lowering_platforms("tpu") as chosen:
            assert chosen == registry.traced_platforms() == ("cpu", "tpu")  # the host's too
            # The same jitted function, traced again (entering cleared JAX's caches).
            assert (
                "cosine" in double.trace(jnp.ones(4)).lower(lowering_platforms=("tpu",)).as_text()
            )
        assert calls == [False]
        assert registry.traced_platforms() == ("cpu",)
        with pytest.raises(NotImplementedError, match="traced for cpu only"):
            double.trace(jnp.ones(4)).lower(lowering_platforms=("tpu",))


@pytest.mark.parametrize(
    "value, platforms",
    [
        ("cpu", ("cpu",)),
        ("tpu", ("cpu", "tpu")),  # the host's (this CPU) and the variable's
        ("tpu, cpu", ("cpu", "tpu")),
        ("gpu", ("cpu", "cuda", "rocm")),
        ("all", registry.PLATFORMS),
    ],
)
def test_the_environment_variable_chooses_the_traced_platforms(value, platforms, monkeypatch):
    monkeypatch.setattr(registry, "_TRACED_OVERRIDE", None)
    monkeypatch.setenv(registry.ENVIRONMENT, value)
    assert registry.traced_platforms() == platforms


def test_an_unknown_platform_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(registry, "_TRACED_OVERRIDE", None)
    monkeypatch.setenv(registry.ENVIRONMENT, "cpu,tpuv5")
    with pytest.raises(ValueError) as error:
        registry.traced_platforms()
    assert str(error.value) == (
        "UMV2_LOWERING_PLATFORMS: unknown platform 'tpuv5'; use a comma list of cpu, cuda, rocm, "
        "tpu (gpu: cuda and rocm), or all"
    )
    with pytest.raises(ValueError, match="lowering_platforms: unknown platform 'metal'"):
        with registry.lowering_platforms("metal"):
            pass
