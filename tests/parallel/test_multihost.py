"""Multi-process runs (umv2_jax/parallel/distributed.py, train.py's launch flags).

Two local processes with 2 fake CPU devices each, joined through `train.py --coordinator ...`
(gloo collectives), train five steps like one process with 4 devices: equal losses, each process
reads only its half of every global batch, and the pair's checkpoint restores in one process
(values, data position) and continues like the one-process run. One module-scoped run of the
three processes; the tests assert on its parts. The launch resolution and the batch share are
unit-tested in this process.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from tests.training.conftest import TINY
from umv2_jax.errors import ConfigError
from umv2_jax.parallel import distributed
from umv2_jax.training import cli

OVERRIDES = TINY + [
    "model.sparse=none",  # the launch, data and checkpoint are what is tested here
    "train.batch_size=4",  # one row per device: 4 batch shards over 2 processes
    "train.eval_every=100",
    "train.eval_batches=1",
    "train.log_every=1",
    "checkpoint.every=5",
    "mesh.data=4",
]

# A `train.py` process that records the batches its data iterator hands the loop. argv[1]: a JSON
# list of steps, each a train.py argument list or {"compare": [workdir, workdir]} (restore both runs'
# latest checkpoints here and compare them leaf by leaf).
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import jax
    jax.config.update("jax_num_cpu_devices", int(os.environ["WORKER_DEVICES"]))
    jax.config.update("jax_compilation_cache_dir", os.environ["WORKER_CACHE"])
    import numpy as np
    from umv2_jax.data import pipeline
    from umv2_jax.training import cli

    read = []  # per run of the loop: the `inputs` of each batch this process fed
    make = pipeline.make_train_iterator

    class Recording:
        def __init__(self, inner):
            self.inner = inner
            read.append([])
        def __iter__(self):
            return self
        def __next__(self):
            batch = next(self.inner)
            read[-1].append(batch["inputs"].tolist())
            return batch
        def get_state(self):
            return self.inner.get_state()
        def set_state(self, state):
            self.inner.set_state(state)

    def compare(workdirs):
        from umv2_jax.config import load_config
        from umv2_jax.training import checkpoint, state
        setup = state.plan(load_config(None, json.loads(os.environ["WORKER_OVERRIDES"])))
        restored = []
        for workdir in workdirs:
            reader = checkpoint.Checkpointer(workdir, setup.config.checkpoint, read_only=True)
            step, train_state, _, data = reader.restore_latest(setup.state, setup.rest)
            reader.close()
            restored.append((step, jax.tree.leaves(train_state), data))
        (step_a, a, data_a), (step_b, b, data_b) = restored
        return {
            "steps": [step_a, step_b],
            "leaves": len(a),
            "max_abs": max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y)).max())
                           for x, y in zip(a, b)),
            "max_ref": max(float(np.abs(np.asarray(x, np.float64)).max()) for x in a),
            "data_equal": data_a == data_b,
        }

    pipeline.make_train_iterator = lambda *args: Recording(make(*args))
    report = {"codes": [], "read": read}
    for step in json.loads(sys.argv[1]):
        if isinstance(step, dict):
            report["compare"] = compare(step["compare"])
        else:
            report["codes"].append(cli.main(step))
    report.update(process=jax.process_index(), processes=jax.process_count(),
                  devices=jax.device_count(), local=jax.local_device_count())
    print(json.dumps(report))
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _worker(steps: list, devices: int, cache: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "WORKER_DEVICES": str(devices),
        "WORKER_CACHE": cache,
        "WORKER_OVERRIDES": json.dumps(OVERRIDES),
    }
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _report(worker: subprocess.Popen) -> dict:
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-3000:]
    *printed, last = out.strip().splitlines()
    return {**json.loads(last), "printed": printed}


def _losses(workdir) -> dict[int, float]:
    from umv2_jax.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def _args(workdir, steps: int, *extra: str) -> list[str]:
    sets = [item for override in OVERRIDES for item in ("--set", override)]
    return ["--workdir", str(workdir), "--steps", str(steps), "--quiet", *sets, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The pair trains 5 steps; then one 4-device process trains its own 5, restores both runs'
    checkpoints and compares them, and resumes both to step 6."""
    root = tmp_path_factory.mktemp("multihost")
    cache = jax.config.jax_compilation_cache_dir or str(root / "xla_cache")  # the suite's
    pair, single, resumed = root / "pair", root / "single", root / "pair_resumed"
    port = _free_port()
    launch = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    workers = [_worker([_args(pair, 5, *launch, str(i))], 2, cache) for i in range(2)]
    processes = [_report(worker) for worker in workers]
    pair_losses = _losses(pair)
    shutil.copytree(pair, resumed)
    steps = [_args(single, 5), {"compare": [str(pair), str(single)]}]
    steps += [_args(single, 6), _args(resumed, 6)]
    reference = _report(_worker(steps, 4, cache))
    return SimpleNamespace(
        processes=processes,
        reference=reference,
        pair_losses=pair_losses,
        single_losses=_losses(single),
        resumed_losses=_losses(resumed),
        pair=pair,
    )


def test_the_pair_is_two_processes_of_two_devices(runs):
    for index, report in enumerate(runs.processes):
        assert report["codes"] == [0]
        assert (report["process"], report["processes"]) == (index, 2)
        assert (report["devices"], report["local"]) == (4, 2)
    # Process 0 reports for the run (summary, result lines); process 1 prints none of it.
    first, second = (report["printed"] for report in runs.processes)
    assert any(line.startswith("checkpoints ") for line in first)
    assert any(line.startswith("devices   4 × cpu") and "2 process(es)" in line for line in first)
    assert not [line for line in second if line.startswith(("checkpoints", "run ", "step "))]
    assert runs.reference["codes"] == [0, 0, 0]
    assert (runs.reference["processes"], runs.reference["devices"]) == (1, 4)


def test_five_steps_of_two_processes_equal_one_process(runs):
    from umv2_jax.training.metrics import read_metrics

    # Written once, by process 0: one record per step, not two.
    assert [r["step"] for r in read_metrics(str(runs.pair)) if "loss" in r] == [1, 2, 3, 4, 5]
    steps = sorted(runs.pair_losses)
    np.testing.assert_allclose(
        [runs.pair_losses[s] for s in steps], [runs.single_losses[s] for s in steps], rtol=2e-5
    )


def test_each_process_reads_only_its_half_of_every_batch(runs):
    first, second = (np.asarray(r["read"][0]) for r in runs.processes)
    whole = np.asarray(runs.reference["read"][0])  # the single process: [5 steps, 4 rows, S]
    assert whole.shape == (5, 4, 32)
    assert first.shape == second.shape == (5, 2, 32)
    np.testing.assert_array_equal(first, whole[:, :2])
    np.testing.assert_array_equal(second, whole[:, 2:])
    for a, b in zip(first, second):  # no row of a step read by both
        assert not {tuple(row) for row in a} & {tuple(row) for row in b}


def test_the_pairs_checkpoint_restores_in_one_process(runs):
    compare = runs.reference["compare"]
    assert compare["steps"] == [5, 5]
    assert compare["leaves"] > 10
    # The same values up to the collectives' summation order (gloo across processes).
    assert compare["max_abs"] <= 1e-5 * max(compare["max_ref"], 1.0)
    assert compare["data_equal"]
    data = json.loads((runs.pair / "checkpoints" / "5" / "data" / "metadata").read_text())
    assert data["format"] == "per-process" and len(data["processes"]) == 2


def test_the_pairs_run_continues_in_one_process_like_the_one_process_run(runs):
    # Resumed on 1 process from the pair's step 5: the same 6th batch and loss.
    second_runs = runs.reference["read"]
    assert len(second_runs) == 3 and len(second_runs[1]) == len(second_runs[2]) == 1
    np.testing.assert_array_equal(second_runs[2], second_runs[1])
    np.testing.assert_allclose(runs.resumed_losses[6], runs.single_losses[6], rtol=2e-5)


@pytest.mark.slow
def test_tensor_across_the_processes_feeds_both_the_whole_batch(runs, tmp_path):
    # (tensor 2, expert 2) over [p0, p0, p1, p1]: each process's devices hold every batch shard,
    # so both feed the whole batch (share 0 of 1), and the run still equals one process.
    mesh = ["--set", "mesh.data=1", "--set", "mesh.tensor=2", "--set", "mesh.expert=2"]
    port = _free_port()
    launch = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    cache = jax.config.jax_compilation_cache_dir or str(tmp_path / "xla_cache")
    workdir = tmp_path / "tensor_across"
    workers = [_worker([_args(workdir, 5, *mesh, *launch, str(i))], 2, cache) for i in range(2)]
    reports = [_report(worker) for worker in workers]
    whole = np.asarray(runs.reference["read"][0])
    for report in reports:
        assert report["codes"] == [0]
        np.testing.assert_array_equal(np.asarray(report["read"][0]), whole)
    losses = _losses(workdir)
    np.testing.assert_allclose(
        [losses[s] for s in range(1, 6)], [runs.single_losses[s] for s in range(1, 6)], rtol=2e-5
    )


# --------------------------------------------------------------------------------------------------
# Launch resolution, batch shares, the CLI's one-line errors (this process, no JAX backend needed)
# --------------------------------------------------------------------------------------------------

SLURM = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
}


def test_a_launch_comes_from_flags_then_the_environment():
    assert distributed.resolve(environ={}) is None
    launch = distributed.resolve("10.0.0.1:8476", 4, 2, "0,1", environ={})
    assert launch == distributed.Launch("10.0.0.1:8476", 4, 2, (0, 1), "flags")
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.resolve(environ=env) == distributed.Launch("h:1", 2, 1, None, "environment")
    assert distributed.resolve(process_id=0, environ=env).process_id == 0  # a flag wins
    assert distributed.resolve(num_processes=1, environ={}) is None
    # SLURM (an srun step of 2 tasks) and --distributed: JAX's cluster detection fills it in.
    assert distributed.resolve(environ=SLURM) == distributed.Launch(None, None, None, None, "SLURM")
    assert distributed.resolve(environ={**SLURM, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert distributed.resolve(detect=True, environ={}).source == "cluster detection"


@pytest.mark.parametrize(
    "kwargs, env, words",
    [
        ({"num_processes": 2}, {}, ["2 processes", "no coordinator", "--coordinator HOST:PORT"]),
        ({}, {"JAX_NUM_PROCESSES": "4"}, ["4 processes", "no coordinator"]),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, ["--process-id 2"]),
        ({"coordinator": "h:1", "num_processes": 2}, {}, ["needs --process-id"]),
        ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, {}, ["HOST:PORT"]),
        ({}, {"JAX_NUM_PROCESSES": "two"}, ["JAX_NUM_PROCESSES='two'"]),
        ({"local_device_ids": "0,x"}, {}, ["--local-device-ids"]),
    ],
)
def test_an_unusable_launch_is_a_config_error(kwargs, env, words):
    with pytest.raises(ConfigError) as caught:
        distributed.resolve(**kwargs, environ=env)
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_the_cli_refuses_two_processes_without_a_coordinator(capsys, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert cli.main(["--num-processes", "2", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: a launch of 2 processes"), err


def test_the_cli_says_when_distributed_finds_no_cluster(tmp_path):
    # A fresh process: in this one JAX may already have started a backend (other tests), and
    # `jax.distributed.initialize` must come before that, as it does in a real launch.
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
        and not name.startswith("SLURM_")
    }
    program = "import sys; from umv2_jax.training import cli; sys.exit(cli.main(sys.argv[1:]))"
    completed = subprocess.run(
        [sys.executable, "-c", program, "--distributed", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**env, "JAX_PLATFORMS": "cpu"},
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    err = [line for line in completed.stderr.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1 and "found no cluster to join" in err[0], completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr


def _devices(processes: list[int], shape: tuple[int, ...]) -> np.ndarray:
    grid = np.empty(len(processes), dtype=object)
    grid[:] = [SimpleNamespace(process_index=p) for p in processes]
    return grid.reshape(shape)


AXES = ("data", "fsdp", "tensor", "expert")


@pytest.mark.parametrize(
    "processes, shape, shares",
    [
        ([0, 0, 1, 1], (4, 1, 1, 1), [(0, 2), (1, 2)]),  # data across both: halves
        ([0, 0, 0, 0], (2, 2, 1, 1), [(0, 1)]),  # one process: the whole batch
        ([0, 0, 1, 1], (2, 1, 2, 1), [(0, 2), (1, 2)]),  # tensor inside a process
        ([0, 1, 0, 1], (2, 1, 2, 1), [(0, 1), (0, 1)]),  # tensor across: both read it all
        ([0, 1, 2, 3], (1, 1, 2, 2), [(0, 2), (1, 2), (0, 2), (1, 2)]),  # expert splits the batch
        ([0] * 4 + [1] * 4, (1, 2, 2, 2), [(0, 2), (1, 2)]),
    ],
)
def test_a_process_feeds_the_rows_its_devices_hold(processes, shape, shares):
    devices = _devices(processes, shape)
    got = [distributed._batch_share(devices, AXES, p) for p in sorted(set(processes))]
    assert got == shares


def test_a_device_order_that_splits_a_process_s_rows_is_refused():
    with pytest.raises(ValueError, match="not equal contiguous blocks"):
        distributed._batch_share(_devices([0, 1, 1, 0], (4, 1, 1, 1)), AXES, 0)
