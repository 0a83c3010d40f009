"""One hardware check of the whole stack on one accelerator, in well under 10 minutes on an H100/H200.

    python benchmarks/hardware_check.py --out results/hardware_check_h100       # GPU (or TPU)
    python benchmarks/hardware_check.py --smoke --out /tmp/hwcheck               # CPU, interpreter

Sections (each records its own failure in the JSON and the run goes on; the exit status is 1 if
any section failed, 2 for bad arguments):

1. copy_bandwidth: a device-to-device copy of a 2 GiB buffer (`x + 1`: one read, one write), the
   bandwidth every kernel row is judged against.
2. kernels: every Pallas kernel registered for the platform (value_bag, retrieval_topk,
   product_key_topk on GPU; TPU also grouped_matmul via its own tests) against its XLA path, at
   the S and 227M shapes: forward and forward + backward median time, the bytes the op must move
   at least (value_bag: `benchmarks/kernels.forward_bytes`; the selection ops: every input read
   once, every output written once; forward + backward counted as twice the forward), achieved
   GB/s, % of the copy bandwidth, and how far the kernel's outputs / gradients are from XLA's.
3. train_steps: the S config (configs/eval/s_umv2.yaml) and the 227M width with few layers
   (configs/paper/ultramem_v2_227m.yaml, model.num_layers=4) trained 20 steps from the same
   initial state on the same synthetic batches with model.memory.implementation xla and pallas:
   median step time (first step = compile, left out), tokens/s, MFU (training FLOPs per token of
   `umv2_jax.eval.accounting` / the chip's peak of `umv2_jax.hardware`), peak device memory, and
   the losses of both, which must agree within LOSS_ATOL at every step.
4. decode: cached decode (`umv2_jax.inference.decode.Decoder`) of the S UltraMemV2 model at
   batch 1 and 64: median step time and tokens/s.

Writes OUT/hardware_check.json (everything, one object) and OUT/hardware_check.md (the tables).
`--smoke` (CPU; CI runs it in tests/test_hardware_check.py) runs the same code at tiny shapes
with the Pallas kernels in the interpreter: it checks that the script works, not any speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from umv2_jax import hardware  # noqa: E402

SECTIONS = ("copy_bandwidth", "kernels", "train_steps", "decode")
# Two runs of the same 20 steps that differ only in how the memory layers are computed (bf16 value
# tables, a different summation order in the kernels) may differ by float rounding, which training
# then carries forward; a wrong kernel moves the loss by far more (tenths of a nat at step 1).
LOSS_ATOL = 2e-2  # nats, at every one of the steps
TRAIN_STEPS, SMOKE_TRAIN_STEPS = 20, 2


# ---- shapes -----------------------------------------------------------------------------------

# value_bag: (T, m, C, N rows, D_v, D_p, table dtype), the layout of benchmarks/kernels.py
VALUE_BAG = {
    "S T4096": (4096, 16, 2, 4 * 146**2, 48, 16, jnp.bfloat16),
    "227M T16384": (16384, 32, 2, 20 * 360**2, 192, 192, jnp.bfloat16),
}
SMOKE_VALUE_BAG = {"tiny f32": (37, 5, 2, 30, 24, 8, jnp.float32)}
# retrieval_topk: (T, r, D_k, n keys per side, rc_topk, topk, cores)
RETRIEVAL = {
    "S T4096": (4096, 2, 32, 146, 16, 16, 2),
    "227M T16384": (16384, 2, 192, 360, 32, 32, 2),
}
SMOKE_RETRIEVAL = {"tiny": (37, 2, 16, 20, 6, 8, 2)}
# product_key_topk: (T, D_k, n keys per side, rc_topk, topk, dtype); Memory+ 227M: n 1138, m 80
PRODUCT_KEY = {"Memory+ 227M T16384": (16384, 192, 1138, 80, 80, jnp.bfloat16)}
SMOKE_PRODUCT_KEY = {"tiny": (37, 16, 20, 6, 8, jnp.float32)}

TRAIN_CASES = {  # name: (config, overrides, global batch)
    "S": ("configs/eval/s_umv2.yaml", [], 32),
    "227M width, 4 layers": (
        "configs/paper/ultramem_v2_227m.yaml",
        ["model.num_layers=4", "data.seq_len=2048"],
        16,
    ),
}
SMOKE_OVERRIDES = [  # the smallest UltraMemV2 model: the smoke run's time is compiles
    "model.d_model=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.d_ff=64",
    "model.memory.n_keys=12",
    "model.memory.key_dim=8",
    "model.memory.rc_topk=4",
    "model.memory.topk=4",
    "model.memory.value_dim=16",
    "model.memory.pre_value_dim=8",
    "model.memory.calibration_tokens=64",
    "data.seq_len=8",
]
SMOKE_TRAIN_CASES = {"S (shrunk)": ("configs/eval/s_umv2.yaml", SMOKE_OVERRIDES, 2)}
DECODE_BATCHES, SMOKE_DECODE_BATCHES = (1, 64), (1,)


# ---- helpers ----------------------------------------------------------------------------------


def median_time(fn: Callable, args: tuple, reps: int) -> float:
    """Median seconds of `fn(*args)` to completion, after one untimed call (compile, warm-up)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def difference(got, want) -> dict[str, float]:
    """Largest |got − want| / max(1, |want|) over float leaves; fraction equal over int leaves."""
    scaled, equal = 0.0, []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if jnp.issubdtype(w.dtype, jnp.integer):
            equal.append(float(jnp.mean(g == w)))
            continue
        g32, w32 = jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32)
        denominator = max(1.0, float(jnp.max(jnp.abs(w32))))
        scaled = max(scaled, float(jnp.max(jnp.abs(g32 - w32))) / denominator)
    result = {"max_scaled_error": scaled}
    if equal:
        result["int_equal_fraction"] = min(equal)
    return result


def device_memory() -> dict | None:
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


# ---- sections ---------------------------------------------------------------------------------


def copy_bandwidth(smoke: bool, reps: int) -> dict:
    """GB/s of `x + 1` on a 2 GiB float32 buffer (4 MiB in the smoke run): 2 × its bytes moved."""
    elements = (1 << 20) if smoke else (1 << 29)
    x = jnp.zeros((elements,), jnp.float32)
    seconds = median_time(jax.jit(lambda x: x + 1), (x,), reps)
    moved = 2 * elements * 4
    return {"buffer_bytes": elements * 4, "seconds": seconds, "GBps": moved / seconds / 1e9}


class KernelCase:
    """One op at one shape: inputs, the op as fn(*args, implementation, interpret), the float
    inputs it is differentiated in, the forward's byte floor."""

    def __init__(self, op, shape, args, call, diff_argnums, forward_bytes):
        self.op, self.shape, self.args, self.call = op, shape, args, call
        self.diff_argnums, self.forward_bytes = diff_argnums, forward_bytes

    def forward(self, implementation: str, interpret: bool) -> Callable:
        return jax.jit(lambda *a: self.call(*a, implementation=implementation, interpret=interpret))

    def outputs_and_gradients(self, implementation: str, interpret: bool) -> Callable:
        """One program returning (outputs, gradients of their float sum): one compile per
        implementation for the correctness check."""

        def both(*a):
            diff = [a[i] for i in self.diff_argnums]

            def forward(*d):
                full = list(a)
                for i, x in zip(self.diff_argnums, d):
                    full[i] = x
                return self.call(*full, implementation=implementation, interpret=interpret)

            out, pullback = jax.vjp(forward, *diff)
            cotangent = jax.tree.map(
                lambda x: (
                    jnp.ones_like(x)
                    if jnp.issubdtype(x.dtype, jnp.floating)
                    else np.zeros(x.shape, jax.dtypes.float0)
                ),
                out,
            )
            return out, pullback(cotangent)

        return jax.jit(both)

    def forward_backward(self, implementation: str, interpret: bool) -> Callable:
        def loss(*a):
            out = self.call(*a, implementation=implementation, interpret=interpret)
            floats = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating)]
            return sum(jnp.sum(jnp.asarray(x, jnp.float32)) for x in floats)

        return jax.jit(jax.grad(loss, argnums=self.diff_argnums))


def kernel_cases(smoke: bool) -> list[KernelCase]:
    """Every Pallas kernel's case at the check's shapes (built lazily: arrays made on call)."""
    from benchmarks.kernels import _inputs as value_bag_inputs
    from benchmarks.kernels import forward_bytes as value_bag_bytes
    from benchmarks.retrieval_kernels import _inputs as retrieval_inputs
    from umv2_jax.ops.product_key_topk import product_key_topk
    from umv2_jax.ops.retrieval_topk import retrieval_topk
    from umv2_jax.ops.value_bag import value_bag

    cases = []
    for name, shape in (SMOKE_VALUE_BAG if smoke else VALUE_BAG).items():
        cases.append(
            KernelCase(
                "value_bag",
                name,
                lambda shape=shape: value_bag_inputs(shape),
                lambda v, p, r, s, x, **kw: value_bag(
                    v, p, r, s, x, pre_score_act="identity", return_pre_scores=True, **kw
                ),
                (0, 1, 3, 4),
                value_bag_bytes(shape),
            )
        )
    for name, (tokens, rank, key_dim, n_keys, k, m, cores) in (
        SMOKE_RETRIEVAL if smoke else RETRIEVAL
    ).items():
        args = lambda t=tokens, r=rank, d=key_dim, n=n_keys, c=cores: retrieval_inputs(
            t, r, d, n, c
        )
        cases.append(
            KernelCase(
                "retrieval_topk",
                name,
                args,
                lambda *a, k=k, m=m, **kw: retrieval_topk(*a, rc_topk=k, topk=m, **kw),
                (0, 1, 2, 3),
                4 * (2 * tokens * rank * key_dim + 2 * n_keys * rank * key_dim)
                + tokens * m * (4 + 4),
            )
        )
    for name, (tokens, key_dim, n_keys, k, m, dtype) in (
        SMOKE_PRODUCT_KEY if smoke else PRODUCT_KEY
    ).items():

        def args(t=tokens, d=key_dim, n=n_keys, dtype=dtype):
            keys = jax.random.split(jax.random.key(1), 4)
            return tuple(
                jax.random.normal(key, (rows, d), dtype) for key, rows in zip(keys, (t, t, n, n))
            )

        item = jnp.dtype(dtype).itemsize
        cases.append(
            KernelCase(
                "product_key_topk",
                name,
                args,
                lambda *a, k=k, m=m, **kw: product_key_topk(*a, rc_topk=k, topk=m, **kw),
                (0, 1, 2, 3),
                item * key_dim * 2 * (tokens + n_keys) + tokens * m * (4 + 4),
            )
        )
    return cases


def kernels(smoke: bool, reps: int, copy_GBps: float | None) -> list[dict]:
    """One row per (op, shape); a row that fails records its error and the next one runs."""
    interpret = smoke
    rows = []
    for case in kernel_cases(smoke):
        row = {"op": case.op, "shape": case.shape, "forward_bytes": case.forward_bytes}
        try:
            args = case.args()
            want = case.outputs_and_gradients("xla", False)(*args)
            got = case.outputs_and_gradients("pallas", interpret)(*args)
            for kind, index in (("forward", 0), ("forward+backward", 1)):
                row.update(
                    {f"{kind}/{k}": v for k, v in difference(got[index], want[index]).items()}
                )
            if smoke:  # the interpreter's speed means nothing
                row["status"] = "ok"
                rows.append(row)
                print(f"  kernels | {_one_line(row)}", flush=True)
                continue
            for kind, build, moved in (
                ("forward", case.forward, case.forward_bytes),
                ("forward+backward", case.forward_backward, 2 * case.forward_bytes),
            ):
                for impl in ("xla", "pallas"):
                    seconds = median_time(build(impl, False), args, reps)
                    row[f"{kind}/{impl}_ms"] = 1e3 * seconds
                    row[f"{kind}/{impl}_GBps"] = moved / seconds / 1e9
                    if copy_GBps:
                        row[f"{kind}/{impl}_pct_of_copy"] = 100 * moved / seconds / 1e9 / copy_GBps
                row[f"{kind}/xla_over_pallas"] = row[f"{kind}/xla_ms"] / row[f"{kind}/pallas_ms"]
            row["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - recorded, the next case runs
            row.update(_failure(error))
        rows.append(row)
        print(f"  kernels | {_one_line(row)}", flush=True)
    return rows


def _synthetic_batch(config, batch: int, seed: int, sharding) -> dict:
    rng = np.random.default_rng(seed)
    seq = config.data.seq_len
    tokens = rng.integers(0, min(config.model.vocab_size, 50000), (batch, seq + 1), np.int32)
    arrays = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    if config.data.masks_documents:  # one document per row
        arrays["segment_ids"] = np.ones((batch, seq), np.int32)
        arrays["positions"] = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    if sharding is None:
        return {key: jnp.asarray(value) for key, value in arrays.items()}
    return {key: jax.device_put(value, sharding) for key, value in arrays.items()}


def train_run(config, batch: int, steps: int) -> dict:
    """`steps` training steps of `config` (one device) on synthetic batches; losses and timing."""
    from umv2_jax import aot, parallel
    from umv2_jax.eval.accounting import account
    from umv2_jax.training import state as state_lib
    from umv2_jax.training.throughput import mfu

    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    compiled = aot.compile_step(config, mesh, batch=batch)
    program = compiled["compiled"]
    with parallel.use_mesh(mesh):
        setup = state_lib.build(config, mesh)
        sharding = parallel.batch_sharding(mesh)
        state, rest = setup.state, setup.rest
        losses, times = [], []
        for index in range(steps):
            data = _synthetic_batch(config, batch, index, sharding)
            start = time.perf_counter()
            state, metrics = program(state, rest, data)
            losses.append(float(jax.block_until_ready(metrics["loss"])))
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    tokens = batch * config.data.seq_len
    chip = hardware.chip_for_device(jax.devices()[0])
    return {
        "compile_s": compiled["lower_s"] + compiled["compile_s"],
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "mfu": mfu(tokens / step_s, account(config).training_flops_per_token, chip, 1),
        "losses": losses,
        "memory": device_memory(),
    }


def lower_train_step(config, batch: int, platforms: tuple[str, ...]):
    """The one-device training step of `train_run`, lowered for `platforms` (e.g. ("cuda",)) from
    any host: `jax.stages.Lowered` (`.as_text()` is its StableHLO)."""
    from umv2_jax import parallel
    from umv2_jax.ops import registry
    from umv2_jax.training import state as state_lib
    from umv2_jax.training.step import make_train_step

    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    with registry.lowering_platforms(*platforms), parallel.use_mesh(mesh):
        layout = state_lib.plan(config, mesh)
        sharding = parallel.batch_sharding(mesh)
        abstract_batch = jax.eval_shape(lambda: _synthetic_batch(config, batch, 0, None))
        abstract_batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
            for k, v in abstract_batch.items()
        }
        step = jax.jit(
            make_train_step(
                layout.parts, layout.optimizer, config.train.micro_batches, config.train.seed
            ),
            in_shardings=(layout.state_shardings, layout.rest_shardings, sharding),
            out_shardings=(layout.state_shardings, parallel.replicated(mesh)),
            donate_argnums=(0,),
        )
        return step.trace(layout.state, layout.rest, abstract_batch).lower(
            lowering_platforms=platforms
        )


def train_steps(smoke: bool) -> list[dict]:
    from umv2_jax.config import load_config

    steps = SMOKE_TRAIN_STEPS if smoke else TRAIN_STEPS
    rows = []
    for name, (path, overrides, batch) in (SMOKE_TRAIN_CASES if smoke else TRAIN_CASES).items():
        row = {"case": name, "config": path, "overrides": overrides, "batch": batch}
        try:
            runs = {}
            for impl in ("xla", "pallas"):
                config = load_config(
                    str(REPO / path),
                    [
                        *overrides,
                        f"train.batch_size={batch}",
                        f"model.memory.implementation={impl}",
                    ],
                )
                row["seq_len"], row["name"] = config.data.seq_len, config.name
                runs[impl] = train_run(config, batch, steps)
                print(f"  train_steps | {name} | {impl} | {_one_line(runs[impl])}", flush=True)
            gaps = [abs(a - b) for a, b in zip(runs["xla"]["losses"], runs["pallas"]["losses"])]
            row.update(runs=runs, steps=steps, max_loss_gap=max(gaps), loss_atol=LOSS_ATOL)
            row["losses_match"] = bool(max(gaps) <= LOSS_ATOL and np.all(np.isfinite(gaps)))
            row["status"] = "ok" if row["losses_match"] else "failed"
            if not row["losses_match"]:
                row["error"] = f"losses differ by {max(gaps):.4g} > {LOSS_ATOL} nats"
        except Exception as error:  # noqa: BLE001 - recorded, the next case runs
            row.update(_failure(error))
        rows.append(row)
    return rows


def decode(smoke: bool, reps: int) -> list[dict]:
    from flax import nnx

    from umv2_jax.config import load_config
    from umv2_jax.inference.decode import Decoder
    from umv2_jax.models.transformer import Transformer

    overrides = SMOKE_OVERRIDES if smoke else []
    config = load_config(str(REPO / "configs/eval/s_umv2.yaml"), overrides)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(Transformer(config.model, nnx.Rngs(0)))[1])()
    decoder = Decoder(nnx.merge(graphdef, state))
    rng = np.random.default_rng(0)
    prompt_len, warmup = 32 if not smoke else 4, 3
    rows = []
    for batch in SMOKE_DECODE_BATCHES if smoke else DECODE_BATCHES:
        prompt = rng.integers(0, config.model.vocab_size, (batch, prompt_len)).astype(np.int32)
        logits, cache, _ = decoder.prefill(
            prompt, np.zeros((batch,), np.int32), prompt_len + warmup + reps
        )
        times = []
        for step in range(warmup + reps):
            token = np.asarray(np.argmax(logits, axis=-1), np.int32)
            began = time.perf_counter()
            logits, cache, _ = decoder.step(token, cache)
            jax.block_until_ready(logits)
            if step >= warmup:
                times.append(time.perf_counter() - began)
        median = statistics.median(times)
        rows.append(
            {
                "model": config.name,
                "batch": batch,
                "prompt_len": prompt_len,
                "median_step_ms": 1e3 * median,
                "tokens_per_s": batch / median,
                "memory_implementation": config.model.memory.implementation,
            }
        )
        print(f"  decode | {_one_line(rows[-1])}", flush=True)
    return rows


# ---- the run ----------------------------------------------------------------------------------


def header() -> dict:
    device = jax.devices()[0]
    chip = hardware.chip_for_device(device)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or None,
        "chip": None
        if chip is None
        else {
            "name": chip.name,
            "peak_bf16_TFLOPs": chip.peak_bf16_flops / 1e12,
            "hbm_GB": chip.hbm_bytes / 1e9,
            "hbm_GBps": chip.hbm_bytes_per_s / 1e9,
        },
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def _failure(error: BaseException) -> dict:
    lines = traceback.format_exception(error)
    return {
        "status": "failed",
        "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
        "traceback": "".join(lines[-6:]),
    }


def _one_line(row: dict) -> str:
    shown = []
    for key, value in row.items():
        if key in ("traceback", "losses", "runs", "overrides"):
            continue
        shown.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(shown)


def run(smoke: bool, reps: int, sections: tuple[str, ...]) -> dict:
    report = {"header": header(), "smoke": smoke, "sections": {}}
    chip = report["header"]["chip"]
    print(
        f"hardware check{' (smoke: tiny shapes, Pallas interpreter, no speed)' if smoke else ''}\n"
        f"device   {report['header']['device_kind']} ({report['header']['platform']}, "
        f"{report['header']['devices']} device(s)); jax {report['header']['jax']}, "
        f"commit {report['header']['commit']}\n"
        + (
            f"peaks    {chip['name']}: {chip['peak_bf16_TFLOPs']:.0f} TFLOP/s bf16, "
            f"{chip['hbm_GBps']:.0f} GB/s HBM, {chip['hbm_GB']:.0f} GB"
            if chip
            else "peaks    unknown for this device (MFU n/a)"
        ),
        flush=True,
    )
    copy_GBps = None
    for name in sections:
        print(f"[{name}]", flush=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            if name == "copy_bandwidth":
                result = copy_bandwidth(smoke, reps)
                copy_GBps = result["GBps"]
                print(f"  copy {result['GBps']:.1f} GB/s", flush=True)
            elif name == "kernels":
                result = kernels(smoke, reps, copy_GBps)
            elif name == "train_steps":
                result = train_steps(smoke)
            else:
                result = decode(smoke, reps)
            failed = (
                [r for r in result if r.get("status") == "failed"]
                if isinstance(result, list)
                else []
            )
            entry = {"status": "failed" if failed else "ok", "result": result}
            if failed:
                entry["error"] = f"{len(failed)} row(s) failed: " + "; ".join(
                    r.get("error", "?") for r in failed
                )
        except Exception as error:  # noqa: BLE001 - the section's failure goes in the report
            entry = _failure(error)
        entry["seconds"] = time.perf_counter() - started
        entry["cpu_seconds"] = time.process_time() - cpu_started  # this process, all threads
        report["sections"][name] = entry
        if entry["status"] != "ok":
            print(f"  FAILED: {entry['error']}", flush=True)
    return report


def markdown(report: dict) -> str:
    head, chip = report["header"], report["header"]["chip"]
    lines = [
        "# Hardware check" + (" (smoke)" if report["smoke"] else ""),
        "",
        f"Device {head['device_kind']} ({head['platform']}), jax {head['jax']}, "
        f"commit {head['commit']}, {head['date']}.",
        f"Peaks: {chip['name']} {chip['peak_bf16_TFLOPs']:.0f} TFLOP/s bf16, "
        f"{chip['hbm_GBps']:.0f} GB/s HBM."
        if chip
        else "Peaks: unknown for this device.",
        "",
    ]
    if report["smoke"]:
        lines += ["Smoke run: tiny shapes, Pallas kernels in the interpreter; no speed.", ""]
    for name, entry in report["sections"].items():
        lines += [f"## {name}: {entry['status']} ({entry['seconds']:.1f} s)", ""]
        if entry["status"] != "ok" and "error" in entry:
            lines += [f"Error: `{entry['error']}`", ""]
        result = entry.get("result")
        if isinstance(result, dict):
            lines += [f"Copy: {result['GBps']:.1f} GB/s ({result['buffer_bytes']:,} bytes)", ""]
        elif name == "train_steps" and result:
            lines += [
                "| case | impl | step ms | tokens/s | MFU | compile s | first / last loss | "
                "max loss gap |",
                "|---|---|---:|---:|---:|---:|---|---:|",
            ]
            for row in result:
                for impl, r in row.get("runs", {}).items():
                    used = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                    lines.append(
                        f"| {row['case']} | {impl} | {1e3 * r['step_s']:.2f} | "
                        f"{r['tokens_per_s']:,.0f} | {used} | {r['compile_s']:.1f} | "
                        f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f} | "
                        f"{row['max_loss_gap']:.2e} (≤ {row['loss_atol']}) |"
                    )
            lines.append("")
        elif isinstance(result, list) and result:
            keys = list(dict.fromkeys(k for r in result for k in r if k != "traceback"))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for r in result:
                cells = [
                    f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                    for k in keys
                ]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for hardware_check.{json,md}")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, Pallas interpreter (CPU)"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"error: --sections {','.join(unknown)}: not one of {', '.join(SECTIONS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out} is a file; give a folder (created if missing)",
              file=sys.stderr)  # fmt: skip
        return 2
    if jax.devices()[0].platform == "cpu" and not args.smoke:
        print(
            "error: no GPU or TPU here (jax sees only CPU): the full check needs an accelerator; "
            "add --smoke for the tiny interpreter run",
            file=sys.stderr,
        )
        return 2
    reps = args.reps or (2 if args.smoke else 20)
    report = run(args.smoke, reps, sections)
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = (os.path.join(args.out, f"hardware_check.{e}") for e in ("json", "md"))
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    with open(md_path, "w") as handle:
        handle.write(markdown(report) + "\n")
    failed = [n for n, e in report["sections"].items() if e["status"] != "ok"]
    print(f"wrote {json_path} and {md_path}")
    if failed:
        print(f"FAILED sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("all sections ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
