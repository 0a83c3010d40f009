"""Scaling smoke run: the S-size training step on 1/2/4/8 fake CPU devices, per parallel strategy.

    python benchmarks/scaling.py                                  # every strategy, 1/2/4/8 devices
    python benchmarks/scaling.py --strategies s-umv2 --devices 1 8 --steps 3 --json
    python benchmarks/scaling.py --gpu                            # one real GPU: step time and MFU

For each strategy (S-dense, S-umv2, S-moe of configs/eval/, at one global batch) and each mesh, the
real training step (`umv2_jax.aot.compile_step`: `make_train_step` with the loop's shardings and
donation, under `parallel.use_mesh`) is compiled, the state built on the mesh (`training.state.build`)
and `--steps` steps timed after one warm-up step. Printed per mesh: median step time, its ratio to the
same strategy on one device, the bytes the step's collectives move per device (from the compiled
HLO, `umv2_jax.parallel.hlo`: each collective counted once as written, so one inside a loop, e.g. the
layer scan of a model of 8+ blocks, counts once; groups of one device, which move nothing, are left
out), and the per-device memory plan (arguments + temporaries).

The fake devices of one process share this machine's cores (2 here), so a step on 8 devices takes
the TOTAL work of all 8: the ratio to one device measures the work that parallelism adds (repeated
computation, collectives, resharding), not a speed-up. The issue's targets: S-umv2 at data 8 and
S-moe at expert 8 within 1.5× of one device (dense: 1.3× measured before this issue). Each device
count runs in its own process (`jax_num_cpu_devices` is fixed when JAX starts).

`--gpu`: runs each strategy on the one real accelerator instead (no fake devices, mesh of 1) and
adds MFU = training FLOPs per token (umv2_jax.eval.accounting) × tokens per step / step time / peak
FLOP/s of the device (`--peak-tflops`, default from a small table of bf16 dense peaks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = {
    "dense": "configs/eval/s_dense.yaml",
    "s-umv2": "configs/eval/s_umv2.yaml",
    "s-moe": "configs/eval/s_moe.yaml",
}
# Meshes per strategy: (data, fsdp, tensor, expert).
MESHES = {
    "dense": [(1, 1, 1, 1), (2, 1, 1, 1), (4, 1, 1, 1), (8, 1, 1, 1), (1, 8, 1, 1), (1, 4, 2, 1)],
    "s-umv2": [(1, 1, 1, 1), (2, 1, 1, 1), (4, 1, 1, 1), (8, 1, 1, 1), (4, 1, 2, 1), (1, 4, 2, 1)],
    "s-moe": [(1, 1, 1, 1), (2, 1, 1, 1), (4, 1, 1, 1), (8, 1, 1, 1), (1, 1, 1, 8), (2, 1, 1, 4)],
}
AXES = ("data", "fsdp", "tensor", "expert")
# bf16 dense peak FLOP/s per device kind (vendor data sheets), for --gpu's MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def mesh_name(mesh: tuple[int, ...]) -> str:
    parts = [f"{axis} {size}" for axis, size in zip(AXES, mesh) if size > 1]
    return ", ".join(parts) or "1 device"


def measure(strategy: str, mesh: tuple[int, ...], args: argparse.Namespace) -> dict:
    """Compiles, builds and times one (strategy, mesh) in this process."""
    import jax
    import numpy as np

    from umv2_jax import aot, parallel
    from umv2_jax.config import load_config
    from umv2_jax.parallel import hlo
    from umv2_jax.training import state as state_lib

    overrides = [f"mesh.{axis}={size}" for axis, size in zip(AXES, mesh)]
    overrides += [f"train.batch_size={args.batch}", f"data.seq_len={args.seq_len}"] + args.overrides
    config = load_config(os.path.join(REPO, CONFIGS[strategy]), overrides)
    devices = jax.devices()[: int(np.prod(mesh))]
    mesh_ = parallel.make_mesh(config.mesh, devices)
    compiled = aot.compile_step(config, mesh_, batch=args.batch)
    program = compiled["compiled"]
    sizes = aot.memory_bytes(program)
    # Collectives over groups of one device (a psum inside a shard_map over a size-1 axis) move
    # nothing; each collective is counted once as written (one inside a scan runs per iteration).
    ops = [op for op in hlo.collectives(program.as_text()) if _moves(op.groups)]
    moved = hlo.bytes_moved(ops)
    with parallel.use_mesh(mesh_):
        setup = state_lib.build(config, mesh_)
        sharding = parallel.batch_sharding(mesh_)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 256, (args.batch, args.seq_len + 1), dtype=np.int32)
        batch = {
            "inputs": jax.device_put(tokens[:, :-1], sharding),
            "targets": jax.device_put(tokens[:, 1:], sharding),
            "loss_mask": jax.device_put(np.ones((args.batch, args.seq_len), np.float32), sharding),
        }
        state, rest = setup.state, setup.rest
        times, loss = [], None
        for index in range(args.steps + 1):
            start = time.perf_counter()
            state, metrics = program(state, rest, batch)
            loss = float(jax.block_until_ready(metrics["loss"]))
            if index:  # the first step is a warm-up
                times.append(time.perf_counter() - start)
    return {
        "strategy": strategy,
        "mesh": dict(zip(AXES, mesh)),
        "devices": len(devices),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "step_s": statistics.median(times),
        "min_step_s": min(times),
        "compile_s": compiled["lower_s"] + compiled["compile_s"],
        "loss": loss,
        "collective_bytes": {k: int(v) for k, v in moved.items() if v},
        "per_device_bytes": sizes,
        "tokens_per_step": args.batch * args.seq_len,
        "config": config,
    }


def worker(args: argparse.Namespace) -> None:
    """One process: every (strategy, mesh) of `args.worker` devices; one JSON line each."""
    import jax

    if not args.gpu:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.worker)
    for strategy in args.strategies:
        meshes = [(1, 1, 1, 1)] if args.gpu else MESHES[strategy]
        for mesh in meshes:
            wanted = args.meshes is None or mesh in args.meshes or _size(mesh) == 1
            if args.gpu or (_size(mesh) == args.worker and wanted):
                result = measure(strategy, mesh, args)
                config = result.pop("config")
                if args.gpu:
                    result.update(_mfu(config, result, args.peak_tflops))
                print("SCALING " + json.dumps(result), flush=True)


def _mfu(config, result: dict, peak_tflops: float | None) -> dict:
    from umv2_jax.eval.accounting import account

    kind = result["device_kind"]
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    flops = account(config).training_flops_per_token * result["tokens_per_step"]
    achieved = flops / result["step_s"]
    mfu = achieved / (peak * 1e12) if peak else None
    return {"achieved_tflops": achieved / 1e12, "peak_tflops": peak, "mfu": mfu}


def _moves(groups) -> bool:
    """Whether replica groups exchange data: empty groups mean all devices; size-1 groups none."""
    return not groups or max(len(group) for group in groups) > 1


def _parse_mesh(text: str) -> tuple[int, ...]:
    sizes = dict.fromkeys(AXES, 1)
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis not in sizes or not size.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: expected AXIS=N,... with AXIS in {AXES}")
        sizes[axis] = int(size)
    return tuple(sizes.values())


def _size(mesh: tuple[int, ...]) -> int:
    size = 1
    for axis in mesh:
        size *= axis
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument(
        "--meshes",
        nargs="+",
        type=_parse_mesh,
        default=None,
        metavar="AXIS=N,...",
        help="only these meshes of the table (e.g. data=8 expert=8), plus 1 device",
    )
    parser.add_argument("--gpu", action="store_true", help="one real GPU: step time and MFU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    parser.add_argument("--json", action="store_true", help="one JSON line per measurement")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0
    results = []
    counts = [1] if args.gpu else args.devices
    for count in counts:
        command = [sys.executable, os.path.abspath(__file__), "--worker", str(count)]
        command += ["--strategies", *args.strategies, "--steps", str(args.steps)]
        command += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
        command += [item for override in args.overrides for item in ("--set", override)]
        if args.meshes:
            command += ["--meshes"] + [
                ",".join(f"{a}={n}" for a, n in zip(AXES, mesh)) for mesh in args.meshes
            ]
        if args.gpu:
            command += ["--gpu"] + (
                ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
            )
        env = dict(os.environ)
        if not args.gpu:
            env["JAX_PLATFORMS"] = "cpu"
        process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        if process.returncode != 0:
            print(process.stderr[-4000:], file=sys.stderr)
            return process.returncode
        for line in process.stdout.splitlines():
            if line.startswith("SCALING "):
                results.append(json.loads(line[len("SCALING ") :]))
                if args.json:
                    print(line[len("SCALING ") :], flush=True)
    if not args.json:
        print(report(results, args))
    return 0


def report(results: list[dict], args: argparse.Namespace) -> str:
    """A table per strategy: step time, ratio to one device, collective bytes, memory."""
    cores = os.cpu_count()
    lines = []
    if not args.gpu:
        lines.append(
            f"Fake CPU devices sharing this machine's {cores} core(s): a step's time is the total "
            f"work of all devices; ratio = time / time on 1 device. Global batch {args.batch} × "
            f"{args.seq_len} tokens, median of {args.steps} steps after a warm-up."
        )
    for strategy in args.strategies:
        rows = [r for r in results if r["strategy"] == strategy]
        if not rows:
            continue
        base = next((r["step_s"] for r in rows if r["devices"] == 1), None)
        lines += [
            "",
            f"{strategy}",
            _ROW.format(
                "mesh",
                "step ms",
                "× 1 dev",
                "collectives MB/dev",
                "args MB",
                "temps MB",
                "compile s",
            ),
        ]
        for r in rows:
            moved = sum(r["collective_bytes"].values()) / 1e6
            kinds = ", ".join(
                f"{k} {v / 1e6:.1f}" for k, v in sorted(r["collective_bytes"].items())
            )
            ratio = f"{r['step_s'] / base:.2f}" if base else "-"
            lines.append(
                _ROW.format(
                    mesh_name(tuple(r["mesh"].values())),
                    f"{r['step_s'] * 1e3:.0f}",
                    ratio,
                    f"{moved:.1f}" + (f" ({kinds})" if kinds else ""),
                    f"{r['per_device_bytes']['arguments'] / 1e6:.1f}",
                    f"{r['per_device_bytes']['temporaries'] / 1e6:.1f}",
                    f"{r['compile_s']:.1f}",
                )
            )
            if args.gpu:
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a (unknown peak)"
                lines.append(
                    f"    {r['device_kind']}: {r['achieved_tflops']:.2f} TFLOP/s achieved, MFU {mfu}"
                )
    return "\n".join(lines)


_ROW = "  {:<18} {:>8} {:>8}  {:<48} {:>8} {:>9} {:>9}"

if __name__ == "__main__":
    sys.exit(main())
