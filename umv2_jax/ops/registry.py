"""One implementation registry for every hot op: names, preference lists, fall-through, interpret.

    out = registry.call("value_bag", *arrays, implementation="auto", interpret=False, **options)

Every op module declares its op once (`declare_op`) with its plain-JAX path `"xla"` (the reference
every kernel is tested against lives beside it), and implementations register themselves
(`register_implementation`): named XLA variants from the op module (e.g. grouped_matmul's
`"ragged_dot"`), Pallas kernels from `pallas_kernels.<op>.gpu` / `pallas_kernels.<op>.tpu`, which
`call` tries to import the first time an op is used (a missing module registers nothing).

`implementation` is one name of `IMPLEMENTATIONS`, or a preference list (a tuple of names):

    "xla"         the plain-JAX path; available on every platform
    "pallas"      the op's Pallas kernel for the platform lowered for (`interpret=True`: in the
                  Pallas interpreter, on every platform). Lowered for CPU, where no kernel
                  compiles, "pallas" alone runs the kernel in the interpreter; lists skip it there
    "ragged_dot"  grouped_matmul / moe_dispatch: `jax.lax.ragged_dot` (XLA); other ops lack it
    "auto"        the op's preference for the platform lowered for: ("pallas", "xla") on GPU / TPU and
                  ("xla",) on CPU unless the op declares its own (grouped_matmul and moe_dispatch:
                  ("pallas", "ragged_dot", "xla") on GPU / TPU, because on CPU ragged_dot costs every
                  group's FLOPs while the block-padded loop does not)

Resolution happens per lowering platform, not from the host's `jax.default_backend()`: when the
choice differs between platforms the op is traced once per distinct choice under
`jax.lax.platform_dependent`, and lowering keeps only the branch of the platform lowered for.
When every platform resolves to the same implementation (e.g. "xla", or an op without kernels
under "auto") the op is called directly, with no conditional in the program.

Which platforms get a traced branch is `traced_platforms()`: by default the host's own (CPU on a
CPU machine; CUDA and ROCm on a GPU one; TPU on a TPU one), because tracing a Pallas kernel costs
time and a branch no lowering keeps is wasted (`benchmarks/traced_platforms.py`, 2-core CPU VM:
the default config's training step traces in 6.8 s with every platform's branches and 1.6 s with
CPU's, 11.2 vs 5.9 s with lowering and compiling). To lower
for another platform (cross-lowering from a CPU host, the AOT fit checks), trace inside
`lowering_platforms(...)`, which adds its platforms to the host's:

    with registry.lowering_platforms("cuda"):
        jax.jit(f).trace(x).lower(lowering_platforms=("cuda",))   # reaches the GPU kernel

or set `UMV2_LOWERING_PLATFORMS` (a comma list of PLATFORMS, or "all"; added to the host's too)
before the first trace.
Lowering a call for a platform it was not traced for fails with a one-line NotImplementedError
naming the op, the platforms it was traced for and this fix; it never falls back silently to
another platform's implementation.

Within a preference list, an implementation that raises `NotImplementedError` while being traced
(a kernel declining a shape or dtype, before it builds any custom_vjp) falls through to the next
name, on the platform whose kernel declined only (every platform's branch is traced, but a decline
on one does not touch the others). Names not available on a platform are skipped there, so a
missing kernel is never an error under "auto" or a list ending in "xla". An explicit choice with
nothing registered anywhere is a one-line ValueError naming the op and its choices; one that no
implementation of a lowering platform serves (none registered there, or all declined: e.g.
"pallas" with bf16 tables of an odd row count, which the TPU value_bag kernel declines and the GPU
one serves) fails only when lowered for that platform, a decline with a one-line
NotImplementedError naming the arguments' shapes and the platform. Under `interpret`, every
registered kernel is tried in the interpreter in turn.

Implementations are called as `fn(*args, interpret=interpret, **options)` and must all return the
same shapes and dtypes; `interpret` is for the Pallas ones (XLA paths ignore it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend
from jax.interpreters import mlir

# The vocabulary shared by every op and every config `implementation` field: config data
# (umv2_jax.config owns it, so that config imports nothing above it), re-exported here.
from umv2_jax.config import IMPLEMENTATIONS  # noqa: F401
from umv2_jax.config import RENAMED_IMPLEMENTATIONS as RENAMED  # noqa: F401

# Platform names as `jax.lax.platform_dependent` and `lowering_platforms` spell them.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
KERNEL_PLATFORMS = ("cuda", "rocm", "tpu")
# The modules a platform's Pallas kernels live in: pallas_kernels.<op>.<module>.
_KERNEL_MODULES = {"gpu": ("cuda", "rocm"), "tpu": ("tpu",)}

_DEFAULT_AUTO = {
    "cpu": ("xla",),
    **dict.fromkeys(KERNEL_PLATFORMS, ("pallas", "xla")),
}

Implementation = str | tuple[str, ...]


@dataclasses.dataclass
class Op:
    """An op: its implementations per platform and what "auto" prefers on each platform."""

    name: str
    auto: dict[str, tuple[str, ...]]
    # implementation name → {platform: fn}; "xla" is available on every platform.
    implementations: dict[str, dict[str, Callable[..., Any]]]
    kernels_imported: bool = False

    def choices(self) -> tuple[str, ...]:
        """The names `implementation` may take for this op: the shared ones and its variants."""
        return tuple(dict.fromkeys(("auto", "xla", "pallas", *self.implementations)))

    def registered_choices(self) -> tuple[str, ...]:
        """The choices with at least one registered implementation."""
        return ("auto", *self.implementations)


_OPS: dict[str, Op] = {}


def declare_op(
    name: str,
    xla: Callable[..., Any],
    *,
    auto: dict[str, tuple[str, ...]] | None = None,
) -> Op:
    """Declares op `name` with its plain-JAX implementation `xla` (every platform).

    auto: {platform: preference} overriding the default ("pallas", "xla") on GPU / TPU, ("xla",) on
    CPU, for the platforms given.
    """
    preference = {**_DEFAULT_AUTO, **(auto or {})}
    for platform, names in preference.items():
        if platform not in PLATFORMS or not set(names) <= set(IMPLEMENTATIONS) - {"auto"}:
            raise ValueError(f"{name}: bad auto preference {platform!r}: {names!r}")
    op = Op(name=name, auto=preference, implementations={"xla": dict.fromkeys(PLATFORMS, xla)})
    _OPS[name] = op
    return op


def register_implementation(
    op_name: str,
    implementation: str,
    fn: Callable[..., Any],
    *,
    platforms: Sequence[str] = PLATFORMS,
) -> None:
    """Registers `fn` as `implementation` of `op_name` on `platforms` (a later call replaces it).

    Pallas kernels register from `pallas_kernels.<op>.gpu` (platforms ("cuda", "rocm")) and
    `pallas_kernels.<op>.tpu` (("tpu",)).
    """
    if implementation not in IMPLEMENTATIONS or implementation == "auto":
        raise ValueError(
            f"{op_name}: cannot register {implementation!r}; names come from "
            f"{', '.join(IMPLEMENTATIONS[1:])}"
        )
    unknown = set(platforms) - set(PLATFORMS)
    if unknown:
        raise ValueError(f"{op_name}: unknown platforms {sorted(unknown)}; use {PLATFORMS}")
    per_platform = _op(op_name).implementations.setdefault(implementation, {})
    per_platform.update(dict.fromkeys(platforms, fn))


def unregister_implementation(op_name: str, implementation: str) -> None:
    """Removes `implementation` of `op_name` everywhere (tests register fakes and remove them)."""
    if implementation == "xla":
        raise ValueError(f"{op_name}: the xla implementation cannot be removed")
    _op(op_name).implementations.pop(implementation, None)


def call(
    op_name: str,
    *args: Any,
    implementation: Implementation = "auto",
    interpret: bool = False,
    **options: Any,
) -> Any:
    """Runs op `op_name` on `args` with the implementation chosen for each lowering platform."""
    op = _op(op_name)
    planned = {
        platform: chain for platform, chain in _plan(op, implementation, interpret).items() if chain
    }

    def branch(chain):
        return lambda *arrays: _first_that_traces(op.name, chain, arrays, interpret, options)

    distinct = set(planned.values())
    if len(distinct) == 1 and len(planned) == len(PLATFORMS):
        return branch(distinct.pop())(*args)
    xla = op.implementations["xla"]["cpu"]

    def xla_path(*arrays):  # the output shapes every implementation shares
        return xla(*arrays, interpret=interpret, **options)

    # One branch per platform (identical chains trace once each: platform_dependent groups equal
    # callables), for the traced platforms (`platform_dependent` below); platforms without a chain
    # cannot lower this call. Every traced branch is traced, so a chain whose every implementation
    # declines must not fail the others: it becomes a branch that fails when (and only when) the
    # call is lowered for its platforms.
    def deferred(chain):
        platforms = tuple(p for p, c in planned.items() if c == chain)

        def run(*arrays):
            try:
                return _first_that_traces(op.name, chain, arrays, interpret, options)
            except NotImplementedError as error:
                shapes = jax.eval_shape(xla_path, *arrays)
                message = f"{error} (lowering for {', '.join(platforms)})"
                flat, tree = jax.tree.flatten(shapes)
                avals = tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in flat)
                return jax.tree.unflatten(tree, _declined_p.bind(avals=avals, message=message))

        return run

    by_chain = {chain: deferred(chain) for chain in distinct}
    return platform_dependent(
        op.name,
        *args,
        per_platform={platform: by_chain[chain] for platform, chain in planned.items()},
        shapes_from=xla_path,
    )


def platform_dependent(
    name: str,
    *args: Any,
    per_platform: dict[str, Callable[..., Any]],
    shapes_from: Callable[..., Any],
) -> Any:
    """`jax.lax.platform_dependent(*args, **per_platform)` tracing only `traced_platforms()`.

    per_platform: {platform: branch}; equal callables trace once. A platform outside the traced
    ones shares a traced platform's branch when it is the same callable, and otherwise gets a
    branch that fails only when lowered, with a one-line NotImplementedError naming `name` and the
    fix (`lowering_platforms`). That branch has the traced branches' output types (recorded as they
    trace: platform_dependent traces its branches in order, this one last), or those of
    `shapes_from` (a plain path with the same outputs) if none was recorded; it costs no trace.
    """
    traced = traced_platforms()
    kept = {p: fn for p, fn in per_platform.items() if p in traced}
    shared = {p: fn for p, fn in per_platform.items() if p not in kept and fn in kept.values()}
    untraced = [p for p in per_platform if p not in kept and p not in shared]
    if not untraced:
        return jax.lax.platform_dependent(*args, **kept, **shared)
    outputs = []

    def recording(branch):
        def recorded(*arrays):
            out = branch(*arrays)
            outputs.append(out)
            return out

        return recorded

    def untraced_branch(*arrays):
        if outputs:
            flat, tree = jax.tree.flatten(outputs[0])
            avals = tuple(jax.typeof(x) for x in flat)
        else:
            flat, tree = jax.tree.flatten(jax.eval_shape(shapes_from, *arrays))
            avals = tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in flat)
        message = (
            f"{name} was traced for {', '.join(traced)} only, so it cannot be lowered for "
            f"{', '.join(untraced)}: trace inside `umv2_jax.ops.registry.lowering_platforms("
            f"{', '.join(repr(p) for p in untraced)})`, or set {ENVIRONMENT} (a comma list of "
            f"{', '.join(PLATFORMS)}, or all) before the first trace"
        )
        return jax.tree.unflatten(tree, _declined_p.bind(avals=avals, message=message))

    wrapped = {id(fn): recording(fn) for fn in kept.values()}
    branches = {p: wrapped[id(fn)] for p, fn in {**kept, **shared}.items()}
    # The untraced platforms last: platform_dependent traces the branches in this order.
    return jax.lax.platform_dependent(*args, **branches, **dict.fromkeys(untraced, untraced_branch))


_TRACED_OVERRIDE: tuple[str, ...] | None = None
ENVIRONMENT = "UMV2_LOWERING_PLATFORMS"


def traced_platforms() -> tuple[str, ...]:
    """The platforms `call` traces a branch for (a subset of PLATFORMS, in its order).

    The host's (the default backend's: cpu, gpu = cuda and rocm, or tpu), and those of the
    innermost `lowering_platforms(...)`, else of `UMV2_LOWERING_PLATFORMS` when set (a comma list of
    platform names, "gpu", or "all"). A bad value of the variable is a one-line ValueError.
    """
    if _TRACED_OVERRIDE is not None:
        extra = _TRACED_OVERRIDE
    else:
        names = os.environ.get(ENVIRONMENT, "").strip()
        split = tuple(n.strip() for n in names.split(","))
        extra = _parse_platforms(split, ENVIRONMENT) if names else ()
    backend = jax.default_backend()
    host = _ALIASES.get(backend, PLATFORMS)
    return tuple(p for p in PLATFORMS if p in host or p in extra)


_ALIASES = {"all": PLATFORMS, "gpu": ("cuda", "rocm"), **{p: (p,) for p in PLATFORMS}}


def _parse_platforms(names: tuple[str, ...], where: str) -> tuple[str, ...]:
    unknown = [n for n in names if n not in _ALIASES]
    if unknown or not names:
        raise ValueError(
            f"{where}: unknown platform {', '.join(map(repr, unknown)) or '(none)'}; use a comma "
            f"list of {', '.join(PLATFORMS)} (gpu: cuda and rocm), or all"
        )
    wanted = {p for n in names for p in _ALIASES[n]}
    return tuple(p for p in PLATFORMS if p in wanted)


@contextlib.contextmanager
def lowering_platforms(*platforms: str):
    """Inside, the ops also trace their branches for `platforms` (names of PLATFORMS, "gpu", or
    "all"; the host's platform is always traced). Yields `traced_platforms()`.

    For lowering on another host's platforms: `with lowering_platforms("tpu"): jax.jit(step)
    .trace(...).lower()` against a TPU topology from a CPU machine. JAX's trace caches do not know
    this setting, so entering and leaving clear them (`jax.clear_caches()`) when it changes what
    is traced; put it around the trace, not around a training loop.
    """
    global _TRACED_OVERRIDE
    chosen = _parse_platforms(platforms, "lowering_platforms")
    before = traced_platforms()
    previous = _TRACED_OVERRIDE
    _TRACED_OVERRIDE = chosen
    changes = traced_platforms() != before
    if changes:
        jax.clear_caches()
    try:
        yield traced_platforms()
    finally:
        _TRACED_OVERRIDE = previous
        if changes:
            jax.clear_caches()


def resolve(
    op_name: str, implementation: Implementation = "auto", *, interpret: bool = False
) -> dict[str, tuple[str, ...]]:
    """{platform: the implementations to try in order} for every platform of `PLATFORMS`.

    A platform with an empty tuple cannot run the choice. Raises ValueError for names outside the
    op's choices, and for an explicit choice registered on no platform.
    """
    plan = _plan(_op(op_name), implementation, interpret)
    return {
        platform: tuple(dict.fromkeys(name for name, _ in chain))
        for platform, chain in plan.items()
    }


def registered(op_name: str) -> dict[str, tuple[str, ...]]:
    """{implementation: the platforms it is registered on} (tests parametrize over this)."""
    op = _op(op_name)
    _import_kernels(op)
    return {name: tuple(fns) for name, fns in op.implementations.items()}


def ops() -> tuple[str, ...]:
    """The names of every declared op."""
    return tuple(_OPS)


# --------------------------------------------------------------------------------------------------
# Helpers


def _op(name: str) -> Op:
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; declared: {', '.join(_OPS) or 'none'}")
    return _OPS[name]


def _plan(op: Op, implementation: Implementation, interpret: bool):
    """{platform: ((name, fn), ...)}: what to try, in order, when lowering for each platform."""
    _import_kernels(op)
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    unknown = [name for name in names if name not in op.choices()]
    if unknown or not names:
        raise ValueError(
            f"{op.name}: unknown implementation {implementation!r}; choose one of "
            f"{', '.join(op.choices())}, or a tuple of them"
        )
    plan = {}
    for platform in PLATFORMS:
        wanted = []
        for name in names:
            if name == "auto":
                # The interpreter runs a kernel anywhere, so then every platform prefers kernels.
                wanted.extend(op.auto["tpu" if interpret else platform])
            else:
                wanted.append(name)
        chain = []
        for name in dict.fromkeys(wanted):
            for fn in _lookup(op, name, platform, interpret, sole=names == ("pallas",)):
                chain.append((name, fn))
        plan[platform] = tuple(chain)
    if "auto" not in names and not any(plan.values()):
        raise ValueError(
            f"{op.name}: implementation {implementation!r} has no registered kernel (Pallas kernels "
            f"register from pallas_kernels.{op.name}.gpu / .tpu); use one of "
            f"{', '.join(op.registered_choices())}"
        )
    return plan


def _lookup(
    op: Op, name: str, platform: str, interpret: bool, *, sole: bool = False
) -> list[Callable[..., Any]]:
    """The functions of implementation `name` on `platform` (none, or one, except below).

    Under `interpret` the Pallas kernels registered for any platform run in the interpreter (the
    TPU one first: it interprets best), each falling through to the next when it declines.
    `implementation="pallas"` alone (`sole`) lowered for CPU, where no kernel compiles, runs them in
    the interpreter too (the GPU kernel first); in a preference list CPU skips them."""
    per_platform = op.implementations.get(name, {})
    cpu_interpreted = sole and platform == "cpu" and platform not in per_platform
    if name == "pallas" and (interpret or cpu_interpreted):
        # The CPU fallback prefers the GPU kernels: they interpret with `interpret=True` (the
        # discharge interpreter, plain XLA ops), where the TPU interpreter's callbacks carry IO
        # effects that `vmap` of the per-platform conditional cannot batch.
        order = ("tpu", "cuda", "rocm") if interpret else ("cuda", "rocm", "tpu")
        kernels = dict.fromkeys(per_platform[p] for p in order if p in per_platform)
        return [fn if interpret else _interpreted(fn) for fn in kernels]
    return [per_platform[platform]] if platform in per_platform else []


def _interpreted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn with interpret=True forced: a Pallas kernel run by the interpreter on CPU."""

    def interpreted(*args: Any, interpret: bool = False, **options: Any) -> Any:
        del interpret
        return fn(*args, interpret=True, **options)

    return interpreted


def _first_that_traces(op_name: str, chain, arrays, interpret: bool, options) -> Any:
    """Traces the first implementation of `chain` that does not raise NotImplementedError."""
    declined = []
    for name, fn in chain:
        try:
            return fn(*arrays, interpret=interpret, **options)
        except NotImplementedError as error:
            declined.append(f"{name} ({error})")
    raise NotImplementedError(
        f"{op_name}: every implementation declined the arguments {_describe(arrays)}: "
        f"{'; '.join(declined)}"
    )


def _describe(arrays) -> str:
    """The arguments' shapes and dtypes, e.g. `bfloat16[7,8], None, int32[4,2]`."""
    return ", ".join(
        "None" if x is None else f"{jax.numpy.dtype(x.dtype).name}{list(x.shape)}".replace(" ", "")
        for x in arrays
    )


# The branch of a platform whose every implementation declined the arguments (see `call`): it has
# the op's output shapes, so the other platforms' branches trace, and lowering it raises the decline.
_declined_p = jax.extend.core.Primitive("registry_declined")
_declined_p.multiple_results = True
_declined_p.def_abstract_eval(lambda *, avals, message: avals)


def _declined_lowering(ctx, *, avals, message):
    del ctx, avals
    raise NotImplementedError(message)


mlir.register_lowering(_declined_p, _declined_lowering)


def _import_kernels(op: Op) -> None:
    """Imports pallas_kernels.<op>.gpu / .tpu once; each registers its kernel when present."""
    if op.kernels_imported:
        return
    op.kernels_imported = True
    for module in _KERNEL_MODULES:
        try:
            importlib.import_module(f"pallas_kernels.{op.name}.{module}")
        except ModuleNotFoundError as error:
            # Only the kernel module (or its package) missing is expected; a kernel module that
            # fails on its own imports is a bug to surface.
            name = f"pallas_kernels.{op.name}"
            if error.name not in ("pallas_kernels", name, f"{name}.{module}"):
                raise
