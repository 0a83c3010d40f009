"""The same train step on a 2×2×2 mesh of 8 CPU devices (data, fsdp, tensor) gives the same losses
as on one device: shardings come from the logical axes, and nothing else changes."""

import json
import subprocess
import sys
import textwrap

import numpy as np

from umv2_jax.training import loop

from .conftest import TINY

PROGRAM = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from umv2_jax.config import load_config
    from umv2_jax.training import loop
    overrides = json.loads(sys.argv[1])
    config = load_config(None, overrides + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    setup = loop.build(config)
    specs = {k: list(v.spec) for k, v in [
        ("embed", setup.state_shardings["params"]["embed"]),
        ("gate", setup.state_shardings["params"]["blocks"][0]["ffn"]["gate"]),
    ]}
    result = loop.train(config, sys.argv[2], progress=False, echo=lambda line: None)
    print(json.dumps({"losses": result.losses, "devices": jax.device_count(), "specs": specs}))
    """
)


def test_eight_device_mesh_matches_one_device(tmp_path):
    overrides = TINY + ["train.steps=3", "train.batch_size=8", "train.eval_every=3"]
    completed = subprocess.run(
        [sys.executable, "-c", PROGRAM, json.dumps(overrides), str(tmp_path / "mesh")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    # embed [vocab, embed] → (tensor, fsdp); SwiGLU gate [embed, mlp] → (fsdp, tensor).
    assert report["specs"] == {
        "embed": ["tensor", "fsdp"],
        "gate": ["fsdp", "tensor"],
    }
    from umv2_jax.config import load_config

    single = loop.train(
        load_config(None, overrides),
        str(tmp_path / "single"),
        progress=False,
        echo=lambda line: None,
    )
    np.testing.assert_allclose(report["losses"], single.losses, rtol=2e-5)
