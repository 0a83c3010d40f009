"""The ahead-of-time fit check (`python -m umv2_jax.aot`, umv2_jax/aot.py).

8 fake CPU devices need `jax_num_cpu_devices` before JAX starts, and a TPU topology needs libtpu's
environment, so each family runs in one fresh interpreter (a module-scoped fixture printing one JSON
line) and the tests assert on its parts.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.fixtures import run_fresh

TINY_MODEL = [
    "model.sparse=none",  # aot's default config is configs/default.yaml (UltraMemV2): a dense one
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=64",
    "data.seq_len=32",
]
MESH = "data=2,fsdp=2,tensor=2"

PROGRAM = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import numpy as np
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)
    from umv2_jax import aot, parallel
    from umv2_jax.config import load_config
    from umv2_jax.training import state
    from umv2_jax.training.cli import default_config_path

    argv = json.loads(sys.argv[1])

    def call(extra):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = aot.main(argv + extra)
        return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

    report = {"json": call(["--json"]), "text": call([])}
    # What the step's arguments hold on one device: its shard of every state and rest leaf, and
    # its rows of the [batch, seq] arrays (2 per batch shard here: data 2 · fsdp 2): inputs,
    # targets, loss_mask, and for packed text the document ids and positions.
    config = load_config(default_config_path(), json.loads(sys.argv[2]))  # aot's default, too
    mesh = parallel.make_mesh(config.mesh)
    layout = state.plan(config, mesh)
    shard_bytes = lambda x: int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
    leaves = jax.tree.leaves((layout.state, layout.rest))
    arrays = 5 if config.data.masks_documents else 3
    report["expected_arguments"] = sum(shard_bytes(x) for x in leaves) + arrays * 2 * 32 * 4
    print(json.dumps(report))
    """
)


def _python(*args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def cpu_report():
    argv = ["--mesh", MESH, "--batch-per-device", "2"]
    for override in TINY_MODEL:
        argv += ["--set", override]
    config_overrides = TINY_MODEL + [
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
        "train.batch_size=8",
    ]
    return run_fresh(PROGRAM, json.dumps(argv), json.dumps(config_overrides))


def test_json_report_holds_the_per_device_plan(cpu_report):
    run = cpu_report["json"]
    assert run["code"] == 0, run["err"]
    report = json.loads(run["out"].strip().splitlines()[-1])
    sizes = report["per_device_bytes"]
    assert {"arguments", "temporaries", "outputs", "total"} <= set(sizes)
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    assert report["platform"] == "cpu" and report["fake_cpu_devices"] is True
    assert report["devices"] == 8
    assert report["batch"] == 8  # 2 per batch shard × (data 2 · fsdp 2)
    assert report["compile_s"] > 0
    # The arguments are one device's shards of the state and of the batch, nothing replicated.
    assert sizes["arguments"] == cpu_report["expected_arguments"]
    assert sizes["temporaries"] > 0
    # The donated state comes back in place: outputs alias the arguments but for the metrics.
    assert 0 < sizes["aliased"] <= sizes["outputs"]
    assert sizes["total"] == (
        sizes["arguments"]
        + sizes["temporaries"]
        + sizes["outputs"]
        - sizes["aliased"]
        + sizes["generated_code"]
    )


def test_text_report_ends_with_the_total_line(cpu_report):
    run = cpu_report["text"]
    assert run["code"] == 0, run["err"]
    lines = run["out"].strip().splitlines()
    assert lines[0].startswith("XLA:CPU plan on 8 fake devices")
    sizes = json.loads(cpu_report["json"]["out"].strip().splitlines()[-1])["per_device_bytes"]
    assert lines[-1] == (
        f"per-device total: {_size(sizes['total'])} (arguments {_size(sizes['arguments'])}, "
        f"temporaries {_size(sizes['temporaries'])}, outputs {_size(sizes['outputs'])})"
    )
    assert " 0.0 " not in lines[-1]  # each number in a unit that shows it (a tiny model: KB, MB)
    assert any(line.startswith("compile   trace + lower ") for line in lines)


def test_bad_mesh_and_bad_topology_exit_2_with_one_line():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    bad_mesh = _python("-m", "umv2_jax.aot", "--mesh", "data=3", "--devices", "8", env=env)
    assert bad_mesh.returncode == 2, bad_mesh.stderr[-2000:]
    assert bad_mesh.stderr.strip() == (
        "error: --mesh: axes data=3, fsdp=1, tensor=1, expert=1 need 3 devices but 8 are "
        "available (--devices 8); make the product 8 (or set one axis to -1)"
    )
    bad_topology = _python("-m", "umv2_jax.aot", "--topology", "v5p-7", env=env)
    assert bad_topology.returncode == 2, bad_topology.stderr[-2000:]
    assert len(bad_topology.stderr.strip().splitlines()) == 1
    assert bad_topology.stderr.startswith("error: --topology 'v5p-7' is not a TPU slice")


TPU_PROGRAM = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from umv2_jax import aot

    def call(argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = aot.main(argv)
        return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

    tiny = json.loads(sys.argv[1])
    big = json.loads(sys.argv[2])
    scaled = json.loads(sys.argv[3])
    report = {
        "fits": call(tiny + ["--mesh", "fsdp=4,tensor=2", "--topology", "v5p:2x2x2", "--json"]),
        "scaled_120b": call(scaled + ["--mesh", "fsdp=4", "--topology", "v5p:2x2x1"]),
        "no_such_slice": call(tiny + ["--topology", "v5p:3x3x3"]),
        # ~1.3B parameters with f32 Adam state replicated 4 ways: > 16 GB per v5e chip.
        "refused": call(big + ["--mesh", "data=4", "--topology", "v5e:2x2"]),
    }
    print(json.dumps(report))
    """
)


# UltraMemV2-2.5B/120B-top256 shrunk with its ratios (d_ff = 1.6·h, D_v = 2·D_p, topk = 2·rc_topk,
# untied embeddings, remat full, memory in every block): 2 layers, h 256, 64² rows of 128 + 64.
SCALED_120B = [
    "model.num_layers=2",
    "model.d_model=256",
    "model.num_heads=2",
    "model.d_ff=384",
    "model.vocab_size=1024",
    "model.memory.key_dim=64",
    "model.memory.value_dim=128",
    "model.memory.pre_value_dim=64",
    "model.memory.n_keys=64",
    "model.memory.topk=32",
    "model.memory.rc_topk=16",
    "data.seq_len=256",
    "model.max_seq_len=256",
]


@pytest.fixture(scope="module")
def tpu_report():
    pytest.importorskip("libtpu", reason="TPU topologies need libtpu (pip install -e '.[tpu]')")
    tiny = [item for override in TINY_MODEL for item in ("--set", override)]
    big = [
        "model.d_model=2048",
        "model.num_layers=16",
        "model.num_heads=16",
        "model.d_ff=8192",
        "model.vocab_size=50304",
        "data.seq_len=512",
        "model.max_seq_len=512",
    ]
    big = [item for override in big for item in ("--set", override)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scaled = ["--config", os.path.join(root, "configs/paper/ultramem_v2_2p5b_120b_top256.yaml")]
    scaled += [item for override in SCALED_120B for item in ("--set", override)]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    # Four compiles (the scaled 120B shape ≈ 52 s of CPU alone); wall time on a loaded host.
    return run_fresh(
        TPU_PROGRAM, json.dumps(tiny), json.dumps(big), json.dumps(scaled), env=env, timeout=1800
    )


def test_compiles_for_a_tpu_topology_from_this_host(tpu_report):
    run = tpu_report["fits"]
    assert run["code"] == 0, run["err"][-3000:]
    report = json.loads(run["out"].strip().splitlines()[-1])
    assert report["platform"] == "tpu" and report["fake_cpu_devices"] is False
    assert report["device_kind"] == "TPU v5" and report["devices"] == 8
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    assert report["per_device_bytes"]["arguments"] > 0
    # Collective bytes by kind from the compiled HLO, and the roofline on the slice's own chip.
    assert report["collective_bytes"]["all-gather"] > 0  # fsdp gathers the weights
    assert report["roofline"]["chip"] == "v5p"
    assert report["roofline"]["bound"] in ("compute", "memory", "collectives")


def test_a_scaled_down_120b_shape_compiles_for_v5p_with_costs(tpu_report):
    run = tpu_report["scaled_120b"]
    assert run["code"] == 0, run["err"][-3000:]
    lines = run["out"].strip().splitlines()
    assert lines[0] == "XLA:TPU plan for v5p:2x2x1 (4 × TPU v5)"
    collectives = next(line for line in lines if line.startswith("collectives per chip"))
    for kind in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute"):
        assert re.search(rf"{kind} {SIZE}", collectives), collectives
    roof = next(line for line in lines if line.startswith("roofline"))
    bound = r"→ ≥ [\d.]+ ms per step, (compute|memory|collectives)-bound"
    assert re.search(rf"on v5p peaks: compute .* {bound}", roof), roof
    assert lines[-1].startswith("per-device total: ")


def test_a_well_formed_slice_that_does_not_exist_is_one_line_exit_2(tpu_report):
    run = tpu_report["no_such_slice"]
    assert run["code"] == 2, run["err"][-3000:]
    error = run["err"].strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith("error: --topology v5p:3x3x3: libtpu cannot describe it: "), error


def test_a_step_the_tpu_compiler_refuses_is_one_line_exit_2(tpu_report):
    run = tpu_report["refused"]
    assert run["code"] == 2
    error = run["err"].strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith(
        "error: XLA:TPU for v5e:2x2 refused the step on mesh data=4, fsdp=1, tensor=1, expert=1: "
    )
    # The compiler's own numbers: what the step needs and the chip's HBM.
    assert re.search(r"exceeds available HBM \(15\.\d+G\)", error), error


# libtpu hidden from the tool (as on a machine without the `tpu` extra).
NO_LIBTPU = textwrap.dedent(
    """
    import importlib.util, sys
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a, **k: None if name == "libtpu" else real(name, *a, **k)
    from umv2_jax import aot
    sys.exit(aot.main(sys.argv[1:]))
    """
)


def test_without_libtpu_a_topology_falls_back_to_the_cpu_plan_and_says_so():
    tiny = [item for override in TINY_MODEL for item in ("--set", override)]
    argv = tiny + ["--mesh", "fsdp=4,tensor=2", "--topology", "v5p:2x2x2"]
    completed = _python("-c", NO_LIBTPU, *argv, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert lines[0] == (
        "libtpu is not installed (pip install -e '.[tpu]'), so this is XLA:CPU's plan on 8 fake "
        "devices for v5p:2x2x2, not the TPU compiler's"
    )
    assert re.fullmatch(
        rf"per-device total: {SIZE} \(arguments {SIZE}, temporaries {SIZE}, outputs {SIZE}\)",
        lines[-1],
    ), lines[-1]


SIZE = r"(\d+\.\d [KMG]B|\d+ B)"


def _size(count: float) -> str:
    """The unit rule the report follows: the largest decimal unit the number reaches."""
    if count >= 1e9:
        return f"{count / 1e9:.1f} GB"
    if count >= 1e6:
        return f"{count / 1e6:.1f} MB"
    if count >= 1e3:
        return f"{count / 1e3:.1f} KB"
    return f"{int(count)} B"


def test_sizes_are_printed_in_the_unit_that_shows_them():
    from umv2_jax.aot import size_text, total_line

    assert [size_text(n) for n in (512, 3_500, 412_000_000, 12_345_000_000)] == [
        "512 B",
        "3.5 KB",
        "412.0 MB",
        "12.3 GB",
    ]
    sizes = {"total": 95_000_000, "arguments": 40_000, "temporaries": 94_000_000, "outputs": 960}
    assert total_line(sizes) == (
        "per-device total: 95.0 MB (arguments 40.0 KB, temporaries 94.0 MB, outputs 960 B)"
    )


def test_without_config_it_plans_the_default_config_like_train_py(monkeypatch):
    """It planned the dataclass defaults (a 32-key memory), not configs/default.yaml (146 keys)."""
    from umv2_jax import aot

    seen = []

    def compile_step(config, mesh, *, batch, row_major_tables=True):
        seen.append(config)
        raise KeyboardInterrupt  # stop before compiling

    monkeypatch.setattr(aot, "compile_step", compile_step)
    with pytest.raises(KeyboardInterrupt):
        aot.run(aot.parse_args(["--devices", "1", "--json"]), echo=lambda line: None)
    (config,) = seen
    assert config.name == "default" and config.model.memory.n_keys == 146
