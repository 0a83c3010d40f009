"""Two processes joined by `jax.distributed.initialize` (gloo CPU collectives) train the same model
as one process: each reads its own half of every global batch, and the losses agree."""

import json
import socket
import subprocess
import sys
import textwrap

import numpy as np

from umv2_jax.config import load_config
from umv2_jax.training import loop
from umv2_jax.training.metrics import read_metrics

from .conftest import TINY

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, process_id, workdir, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from umv2_jax.config import load_config
    from umv2_jax.training import loop
    result = loop.train(load_config(None, json.loads(overrides)), workdir, progress=False)
    print(json.dumps({"losses": result.losses, "devices": jax.device_count(),
                      "processes": jax.process_count()}))
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    overrides = TINY + ["train.steps=4", "train.eval_every=4", "checkpoint.every=2"]
    workdir, port = str(tmp_path / "two"), _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(port), str(i), workdir, json.dumps(overrides)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["devices"] == 2 and r["processes"] == 2 for r in reports)
    assert reports[0]["losses"] == reports[1]["losses"]
    single = loop.train(
        load_config(None, overrides), str(tmp_path / "one"), progress=False, echo=lambda line: None
    )
    np.testing.assert_allclose(reports[0]["losses"], single.losses, rtol=2e-5)
    # Only the first process writes the run's files: one metrics record per step, not two.
    steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2", "4"]
