"""Ahead-of-time fit check: compile the real training step for a mesh, without the hardware.

    python -m umv2_jax.aot --config configs/paper/ultramem_v2_1b7b.yaml --mesh fsdp=8
    python -m umv2_jax.aot --config PATH --mesh data=2,fsdp=4 --topology v5p:2x2x2 --json
    python -m umv2_jax.aot --config PATH --set model.num_layers=2 --mesh fsdp=8 --devices 8
    python -m umv2_jax.aot --config configs/paper/ultramem_v2_2p5b_120b_top256.yaml \
        --topology v5p:4x4x4 --mesh fsdp=16,tensor=4 --batch-per-device 4      # 4096 tokens/chip
    python -m umv2_jax.aot --config PATH --devices 8 --chip h100    # XLA:CPU's plan, H100 roofline
    python -m umv2_jax.aot --config PATH --topology v5p:2x2x1 --table-layout default   # before

Builds the train state's shapes and shardings (`training.state.plan`: nothing is allocated) and
compiles the step the training loop runs (`training.step.make_train_step`, the same in/out
shardings and donation as `training.loop`) under `parallel.use_mesh(mesh)` for abstract inputs:
`jax.jit(step, ...).trace(state, rest, batch).lower().compile()`. Printed: the mesh warnings
(`parallel.warnings`), trace + lower and compile seconds, and XLA's per-device memory plan
(`compiled.memory_analysis()`); the last line reads

    per-device total: X.X GB (arguments A GB, temporaries T MB, outputs O KB)

Before it, the step's collective bytes per chip by kind and a roofline step-time estimate
(`parallel.roofline`: FLOPs / peak, HBM bytes / bandwidth, collective bytes / ICI bandwidth) on the
chip named by `--chip` (default: the TPU slice's own chip; none for an XLA:CPU plan without
`--chip`), both read from the compiled HLO with every while-loop body counted once per trip
(`parallel.hlo.step_cost`; `cost_analysis()` counts a scanned model's loop body once).

total = arguments + temporaries + outputs − aliased (outputs written into donated arguments) +
generated code; each number in the decimal unit that shows it (GB = 10⁹, MB = 10⁶, KB = 10³ bytes).
Memory tables (and their Adam moments) are row-major at the step's boundary, as in the trainer
(`parallel.layouts`); `--table-layout default` lets XLA pick their layout (XLA:TPU: column-major
for [N, 192]-like f32 tables, and a table-sized relayout temporary) to measure the difference.
Without `--config` it plans configs/default.yaml, the config `train.py` trains by default. `--json` prints instead one line
`{"per_device_bytes": {"arguments", "temporaries", "outputs", "aliased", "generated_code",
"total"}, "compile_s", "lower_s", "mesh", "platform", "devices", "batch", "seq_len", "warnings",
"collective_bytes": {kind: bytes}, "step_cost", "roofline"}` (roofline null without a chip).

Devices: `--topology v5p:2x2x2` (or `v5p-16`, `v5litepod-8`, …) compiles with XLA:TPU for that TPU
slice from this host (libtpu, the `jax[tpu]` extra; no TPU is used): the TPU compiler's memory
plan, and a step it refuses ("exceeds available HBM") is reported in one line, exit 2. Without
`--topology`, the plan is XLA:CPU's on `--devices` fake CPU devices (default: the mesh's size) and
the output says so: an estimate of the same partitioned program, not a TPU or GPU number.

The global batch is `--batch-per-device` sequences × the batch shards of the mesh (data · fsdp ·
expert); `--mesh` names the axes it sets (the others are 1; without `--mesh`, the config's). A bad
config, mesh or topology prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from umv2_jax.errors import ConfigError, UserError

GB = 1e9
# What libtpu needs to describe a TPU slice on a host without a TPU (no metadata server is asked).
TPU_COMPILE_ENV = {
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
}
# Chips of a slice named by its core/chip count (v5p-16, v5litepod-8) → the topology's shape.
_SHAPES_3D = ("1x1x1", "2x1x1", "2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8")
_SHAPES_2D = ("1x1", "2x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
# Accelerator name → (topology prefix, TensorCores per chip counted in its name, dimensions).
_GENERATIONS = {
    "v4": ("v4", 2, 3),
    "v5p": ("v5p", 2, 3),
    "v5e": ("v5e", 1, 2),
    "v5litepod": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}
_TOPOLOGY = re.compile(r"^[A-Za-z0-9_ ]+[=_:][0-9x]+(_twisted|_untwisted)?$")


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=1,fsdp=8"` → {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}; ConfigError if bad."""
    from umv2_jax.config import MeshConfig

    sizes = dict.fromkeys(MeshConfig.AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in sizes or not re.fullmatch(r"-?\d+", value.strip()):
            raise ConfigError(
                f"--mesh '{text}': '{part}' is not AXIS=SIZE with AXIS one of "
                f"{', '.join(MeshConfig.AXES)} (e.g. --mesh data=2,fsdp=4)"
            )
        sizes[name] = int(value)
    return sizes


def topology_name(text: str) -> str:
    """A TPU topology for `get_topology_desc`: `v5p:2x2x2` as is; `v5p-16` / `v5litepod-8` → shape.

    ConfigError for a name that is neither (the fix names both forms).
    """
    if _TOPOLOGY.fullmatch(text):
        return text
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    if match:
        prefix, per_chip, dims = _GENERATIONS[match.group(1)]
        count = int(match.group(2))
        chips = count // per_chip if count % per_chip == 0 else 0
        for shape in _SHAPES_3D if dims == 3 else _SHAPES_2D:
            if math.prod(int(s) for s in shape.split("x")) == chips:
                return f"{prefix}:{shape}"
    raise ConfigError(
        f"--topology '{text}' is not a TPU slice: use GENERATION:SHAPE (e.g. v5p:2x2x2, v5e:2x4) "
        "or a slice name with a power-of-two size (e.g. v5p-16, v5litepod-8)"
    )


def tpu_devices(topology: str) -> list | None:
    """The devices of a TPU slice described from this host; None without libtpu (the caller falls
    back to XLA:CPU's plan); ConfigError for a malformed name or one libtpu cannot describe."""
    import importlib.util

    for key, value in TPU_COMPILE_ENV.items():
        os.environ.setdefault(key, value)
    name = topology_name(topology)  # ConfigError for a malformed name, with or without libtpu
    if importlib.util.find_spec("libtpu") is None:
        return None
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(name, platform="tpu").devices)
    except Exception as error:  # noqa: BLE001 - libtpu's own message names the problem
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--topology {topology}: libtpu cannot describe it: {first}") from None


def _cpu_devices(count: int) -> list:
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ConfigError(
            f"--devices {count}: this process already started JAX with {len(devices)} CPU "
            "device(s); run `python -m umv2_jax.aot` in a fresh process"
        )
    return devices[:count]


def _refusal(error: Exception) -> str | None:
    """The TPU compiler's one-line reason for refusing a program that does not fit, or None."""
    text = str(error)
    for line in text.splitlines():
        if re.search(r"exceeds|Ran out of memory|RESOURCE_EXHAUSTED|out of memory", line, re.I):
            return re.sub(r"\s+", " ", line).strip().rstrip(".")
    return None


def compile_step(config, mesh, *, batch: int, row_major_tables: bool = True) -> dict[str, Any]:
    """Compiles one training step of `config` on `mesh` for a global batch of `batch` sequences,
    with the memory tables row-major at the step's boundary (as the trainer) or, with
    `row_major_tables=False`, in the layout XLA picks.

    Returns {"compiled", "lower_s", "compile_s", "plan"}; raises what the compiler raises.
    """
    import jax
    import jax.numpy as jnp

    from umv2_jax import parallel
    from umv2_jax.ops import registry
    from umv2_jax.training import state as state_lib
    from umv2_jax.training.step import make_train_step

    device = mesh.devices.flat[0]
    # The ops trace their branches for the mesh's platform (a TPU topology from a CPU host).
    with registry.lowering_platforms(device.platform), parallel.use_mesh(mesh):
        layout = state_lib.plan(config, mesh, row_major_tables=row_major_tables)
        batch_sharding = parallel.batch_sharding(mesh)
        seq = config.data.seq_len
        tokens = lambda dtype: jax.ShapeDtypeStruct((batch, seq), dtype, sharding=batch_sharding)
        abstract_batch = {
            "inputs": tokens(jnp.int32),
            "targets": tokens(jnp.int32),
            "loss_mask": tokens(jnp.float32),
        }
        if config.data.masks_documents:  # packed text batches carry document ids (data.pipeline)
            abstract_batch["segment_ids"] = tokens(jnp.int32)
            abstract_batch["positions"] = tokens(jnp.int32)
        step = jax.jit(
            make_train_step(
                layout.parts, layout.optimizer, config.train.micro_batches, config.train.seed
            ),
            in_shardings=(layout.step_shardings, layout.rest_shardings, batch_sharding),
            out_shardings=(layout.step_shardings, parallel.replicated(mesh)),
            donate_argnums=(0,),
        )
        start = time.perf_counter()
        # The project's kernels do not need it (DEVELOPERS.md), but Mosaic lowers some ops by asking
        # the default device for the chip: a TPU default device keeps other kernels compiling.
        with jax.default_device(device) if device.platform == "tpu" else contextlib.nullcontext():
            lowered = step.trace(layout.state, layout.rest, abstract_batch).lower()
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    return {"compiled": compiled, "lower_s": lower_s, "compile_s": compile_s, "plan": layout}


def memory_bytes(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program's memory plan (`memory_analysis()`) and their total."""
    analysis = compiled.memory_analysis()
    get = lambda name: int(getattr(analysis, name, 0) or 0)
    sizes = {
        "arguments": get("argument_size_in_bytes"),
        "temporaries": get("temp_size_in_bytes"),
        "outputs": get("output_size_in_bytes"),
        "aliased": get("alias_size_in_bytes"),
        "generated_code": get("generated_code_size_in_bytes"),
    }
    sizes["total"] = (
        sizes["arguments"]
        + sizes["temporaries"]
        + sizes["outputs"]
        - sizes["aliased"]
        + sizes["generated_code"]
    )
    return sizes


def size_text(count: float) -> str:
    """Bytes in the decimal unit that shows the number: `12.3 GB`, `412.0 MB`, `3.5 KB`, `512 B`
    (a small model's plan read `0.1 GB (arguments 0.0 GB, …)` in GB alone)."""
    for unit, size in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def total_line(sizes: dict[str, int]) -> str:
    """`per-device total: X (arguments A, temporaries T, outputs O)`, each in its `size_text`."""
    return (
        f"per-device total: {size_text(sizes['total'])} (arguments {size_text(sizes['arguments'])}"
        f", temporaries {size_text(sizes['temporaries'])}, outputs {size_text(sizes['outputs'])})"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m umv2_jax.aot",
        description="Compile the training step for a mesh without the hardware; print per-device "
        "memory and compile time.",
    )
    parser.add_argument(
        "--config", default=None, help="YAML config (default: configs/default.yaml, as train.py)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.num_layers=2 (repeatable)",
    )
    parser.add_argument(
        "--mesh", default=None, help="mesh axes, e.g. data=1,fsdp=8 (unnamed axes are 1)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--topology", default=None, help="TPU slice to compile for, e.g. v5p:2x2x2 or v5p-16"
    )
    where.add_argument(
        "--devices", type=int, default=None, help="fake CPU devices (default: the mesh's size)"
    )
    parser.add_argument(
        "--batch-per-device",
        type=int,
        default=1,
        help="sequences per batch shard (global batch = this × data·fsdp·expert)",
    )
    parser.add_argument(
        "--chip",
        default=None,
        help="chip whose peaks the roofline uses (v4, v5e, v5p, v6e, a100, h100, h200, b200; "
        "default: the TPU slice's chip)",
    )
    parser.add_argument(
        "--table-layout",
        choices=("row-major", "default"),
        default="row-major",
        help="memory tables at the step's boundary: row-major (as the trainer) or XLA's choice "
        "(on TPU column-major for [N, 192]-like tables: a table-sized relayout per gather)",
    )
    parser.add_argument(
        "--state-only",
        action="store_true",
        help="print the train state's per-chip bytes (params, optimizer, the tables' optimizer "
        "state) from the plan and stop: no compile (e.g. to compare train.table_optimizer)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line instead")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, echo=print) -> dict[str, Any]:
    """Does the fit check for parsed arguments; returns the JSON report (UserError on bad input)."""
    import umv2_jax.data.tasks  # noqa: F401 (registers the task checks load_config runs)
    from umv2_jax.config import MeshConfig, load_config

    if args.batch_per_device < 1:
        raise ConfigError(f"--batch-per-device {args.batch_per_device}: must be >= 1")
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: must be >= 1")
    from umv2_jax import hardware

    if args.chip is not None and args.chip.strip().lower() not in hardware.CHIPS:
        raise ConfigError(
            f"--chip {args.chip}: unknown; use one of {', '.join(hardware.CHIPS)} (umv2_jax.hardware)"
        )
    overrides = list(args.overrides)
    if args.mesh is not None:
        sizes = parse_mesh(args.mesh)
        overrides += [f"mesh.{axis}={size}" for axis, size in sizes.items()]
    from umv2_jax.training.cli import default_config_path

    config_path = args.config or default_config_path()  # the config train.py would train
    base = load_config(config_path, overrides)  # ConfigError for a bad key, value or mesh
    fixed = math.prod(getattr(base.mesh, axis) for axis in MeshConfig.AXES if axis != "data")

    devices = tpu_devices(args.topology) if args.topology is not None else None
    if devices is not None:
        where = f"XLA:TPU plan for {args.topology} ({len(devices)} × {devices[0].device_kind})"
    elif args.topology is not None:  # no libtpu: the same slice's device count, planned by XLA:CPU
        count = args.devices or math.prod(
            int(size) for size in re.findall(r"\d+", topology_name(args.topology).split(":")[-1])
        )
        devices = _cpu_devices(count)
        where = (
            f"libtpu is not installed (pip install -e '.[tpu]'), so this is XLA:CPU's plan on "
            f"{count} fake devices for {args.topology}, not the TPU compiler's"
        )
    else:
        sizes = [getattr(base.mesh, axis) for axis in MeshConfig.AXES]
        count = args.devices or (math.prod(sizes) if -1 not in sizes else 8)
        devices = _cpu_devices(count)
        where = f"XLA:CPU plan on {count} fake devices (not a TPU/GPU number; --topology for TPU)"
        if args.chip is not None:
            where += f"; the roofline puts XLA:CPU's plan on {args.chip} peaks"
    if base.mesh.data != -1 and fixed * base.mesh.data != len(devices):
        source = f"topology {args.topology}" if args.topology else f"--devices {len(devices)}"
        raise ConfigError(
            f"--mesh: axes {', '.join(f'{a}={getattr(base.mesh, a)}' for a in MeshConfig.AXES)} "
            f"need {fixed * base.mesh.data} devices but {len(devices)} are available ({source}); "
            f"make the product {len(devices)} (or set one axis to -1)"
        )

    from umv2_jax import parallel
    from umv2_jax.parallel import exchange as table_exchange
    from umv2_jax.parallel import warnings as mesh_warnings

    mesh = parallel.make_mesh(base.mesh, devices)
    batch = args.batch_per_device * parallel.batch_shards(mesh)
    config = load_config(
        config_path,
        overrides
        + [f"mesh.{axis}={mesh.shape[axis]}" for axis in MeshConfig.AXES]
        + [f"train.batch_size={batch}"],
    )
    config.check_mesh_fits_model(mesh.shape["expert"], mesh.shape["tensor"])
    warnings = mesh_warnings.mesh_warnings(config, mesh)
    table_lines = table_exchange.startup_lines(config, mesh)  # ConfigError if a path cannot run
    mesh_text = ", ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    if not args.json:
        echo(where)
        echo(
            f"config    {config.name}: {config.model.num_layers} layers, d_model "
            f"{config.model.d_model}, sparse {config.model.sparse}; batch {batch} × seq "
            f"{config.data.seq_len} ({args.batch_per_device} per batch shard), "
            f"{config.train.micro_batches} micro-batch(es)"
        )
        echo(f"mesh      {mesh_text}")
        for line in warnings:
            echo(f"warning: {line}")
        for line in table_lines:
            echo(line)
    if args.state_only:
        return _state_only(config, mesh, args, echo)

    try:
        result = compile_step(
            config, mesh, batch=batch, row_major_tables=args.table_layout == "row-major"
        )
    except Exception as error:  # noqa: BLE001 - the TPU compiler's refusal is a user answer
        reason = _refusal(error)
        if reason is None:
            raise
        compiler = f"XLA:TPU for {args.topology}" if devices[0].platform == "tpu" else "XLA:CPU"
        raise UserError(
            f"{compiler} refused the step on mesh {mesh_text}: {reason}; try more fsdp/tensor "
            "sharding, model.remat=full, or a smaller --batch-per-device"
        ) from None
    sizes = memory_bytes(result["compiled"])
    cost, estimate = step_costs(result["compiled"], config, devices, batch, args.chip)
    report = {
        "per_device_bytes": sizes,
        "compile_s": round(result["compile_s"], 3),
        "lower_s": round(result["lower_s"], 3),
        "mesh": dict(mesh.shape),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "fake_cpu_devices": devices[0].platform == "cpu",
        "batch": batch,
        "seq_len": config.data.seq_len,
        "param_count": result["plan"].param_count,
        "table_layout": args.table_layout,
        "state_bytes_per_chip": state_bytes(result["plan"]),
        "warnings": warnings,
        "collective_bytes": {kind: cost.collective_bytes.get(kind, 0) for kind in COLLECTIVE_KINDS},
        "step_cost": {
            "flops": cost.flops,
            "hbm_bytes": cost.hbm_bytes,
            "loop_trips": cost.trips,
            "unknown_trips": list(cost.unknown_trips),
        },
        "roofline": None if estimate is None else estimate.as_dict(),
    }
    if args.json:
        echo(json.dumps(report))
    else:
        echo(f"params    {result['plan'].param_count:,}")
        echo(
            f"compile   trace + lower {result['lower_s']:.1f} s, compile {result['compile_s']:.1f} s"
        )
        for line in cost_lines(cost, estimate):
            echo(line)
        for key in ("arguments", "temporaries", "outputs", "aliased", "generated_code"):
            echo(f"  {key.replace('_', ' '):<15}{size_text(sizes[key]):>10}")
        echo(total_line(sizes))
    return report


def state_bytes(layout) -> dict[str, int]:
    """Per-chip bytes of the train state's shards (`training.state.plan`): params, optimizer state
    and, of the optimizer state, what belongs to the value / pre-value tables (every leaf whose key
    path ends with a table's: moments, factored statistics)."""
    import jax
    import numpy as np

    def shard(x) -> int:
        return int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize

    def names(path) -> tuple:
        return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)

    is_format = lambda f: hasattr(f, "layout")  # noqa: E731 - a row-major table (parallel.layouts)
    flat = jax.tree_util.tree_flatten_with_path(layout.step_shardings["params"], is_leaf=is_format)[
        0
    ]
    tables = {names(path) for path, f in flat if is_format(f)}
    opt = jax.tree_util.tree_flatten_with_path(layout.state["opt_state"])[0]
    of_tables = sum(
        shard(x)
        for path, x in opt
        if any(names(path)[start:] in tables for start in range(len(path)))
    )
    return {
        "params": sum(shard(x) for x in jax.tree.leaves(layout.state["params"])),
        "opt_state": sum(shard(x) for _, x in opt),
        "opt_state_tables": of_tables,
    }


def _state_only(config, mesh, args, echo) -> dict[str, Any]:
    """--state-only: the state's per-chip bytes from the plan, nothing compiled."""
    from umv2_jax import parallel
    from umv2_jax.training import state as state_lib

    with parallel.use_mesh(mesh):
        layout = state_lib.plan(config, mesh)
    sizes = state_bytes(layout)
    report = {
        "state_bytes_per_chip": sizes,
        "table_optimizer": config.train.table_optimizer,
        "mesh": dict(mesh.shape),
    }
    if args.json:
        echo(json.dumps(report))
    else:
        echo(
            f"state per chip (train.table_optimizer {config.train.table_optimizer}): params "
            f"{size_text(sizes['params'])}, optimizer {size_text(sizes['opt_state'])} (of it "
            f"the tables' {size_text(sizes['opt_state_tables'])}); not compiled (--state-only)"
        )
    return report


COLLECTIVE_KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
)


def step_costs(compiled, config, devices, batch: int, chip_name: str | None):
    """(hlo.StepCost per device, roofline.Roofline or None) of a compiled step; the chip is
    `chip_name` or the TPU devices' own (None on an XLA:CPU plan without --chip)."""
    from umv2_jax import hardware
    from umv2_jax.eval.accounting import account
    from umv2_jax.parallel import hlo, roofline

    cost = hlo.step_cost(compiled.as_text())
    if chip_name is not None:
        chip = hardware.chip(chip_name)
    elif devices[0].platform == "tpu":
        chip = hardware.chip_for_kind(devices[0].device_kind)
    else:
        chip = None
    if chip is None:
        return cost, None
    tokens_per_chip = batch * config.data.seq_len / len(devices)
    model_flops = account(config).training_flops_per_token * tokens_per_chip
    return cost, roofline.roofline(cost, chip, model_flops=model_flops)


def cost_lines(cost, estimate) -> list[str]:
    """The text report's collective-bytes and roofline lines."""
    kinds = ", ".join(
        f"{kind} {size_text(cost.collective_bytes.get(kind, 0))}"
        for kind in COLLECTIVE_KINDS
        if kind != "ragged-all-to-all" or kind in cost.collective_bytes
    )
    total = sum(cost.collective_bytes.values())
    counted = sorted(trips for name, trips in cost.trips.items() if name not in cost.unknown_trips)
    loops = ", ".join(f"{trips}" for trips in counted if trips > 1) or "none over 1 trip"
    lines = [
        f"collectives per chip per step: {kinds} (total {size_text(total)}; loop bodies × their "
        f"trips: {loops})",
    ]
    if cost.unknown_trips:
        lines.append(
            f"note: {len(cost.unknown_trips)} while loop(s) with a data-dependent trip count (e.g. "
            "an SVD's iterations) counted once"
        )
    if estimate is None:
        lines.append("roofline  n/a (XLA:CPU plan; name a chip with --chip, e.g. --chip h100)")
        return lines
    terms = estimate.terms
    lines.append(
        f"roofline  on {estimate.chip} peaks: compute {terms['compute'] * 1e3:.1f} ms "
        f"({estimate.flops / 1e12:.1f} TFLOP), HBM {terms['memory'] * 1e3:.1f} ms "
        f"({size_text(estimate.hbm_bytes)}), collectives {terms['collectives'] * 1e3:.1f} ms → "
        f"≥ {estimate.seconds * 1e3:.1f} ms per step, {estimate.bound}-bound "
        f"({estimate.serial_seconds * 1e3:.1f} ms with no overlap)"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    logging.getLogger("jax").setLevel(logging.ERROR)  # "Unable to initialize backend 'tpu'" noise
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
