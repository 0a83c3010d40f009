"""Start-up warnings for mesh axes a model cannot use (umv2_jax/parallel/warnings.py), and the
ConfigErrors of a mesh that cannot split the model (Config.check_mesh_fits_model).

The warnings read only the mesh's axis sizes, so an AbstractMesh (no devices) stands in for one.
"""

import json
import textwrap

import pytest
from jax.sharding import AbstractMesh

from tests.fixtures import run_fresh
from tests.training.conftest import SPARSE, TINY
from umv2_jax.config import load_config
from umv2_jax.errors import ConfigError
from umv2_jax.parallel.warnings import mesh_warnings

AXES = ("data", "fsdp", "tensor", "expert")


def _mesh(data=1, fsdp=1, tensor=1, expert=1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor, expert), AXES)


def test_expert_axis_on_a_memory_model_acts_as_data_parallel():
    config = load_config(None, TINY + SPARSE["umv2"])
    lines = mesh_warnings(config, _mesh(data=2, expert=4))
    assert len(lines) == 1
    assert lines[0].startswith("mesh.expert=4: model.sparse='ultramem_v2' has no experts")
    assert "acts as data parallel" in lines[0] and "replicated over it" in lines[0]
    # A model with experts uses the axis: no warning (4 experts split over expert 4).
    moe = load_config(None, TINY + SPARSE["moe"])
    assert mesh_warnings(moe, _mesh(data=2, expert=4)) == []


def test_tensor_larger_than_heads_names_attention_and_the_replicated_parameters():
    config = load_config(None, TINY)  # 2 heads of 16, d_ff 64, vocab 384 (padded)
    lines = mesh_warnings(config, _mesh(tensor=4))
    assert lines[0] == (
        "mesh.tensor=4 does not divide model.num_heads=2: attention's heads cannot be split, so "
        "attention is computed replicated over 'tensor'"
    )
    assert len(lines) == 2
    # The q/k/v/o projections carry `heads` (2, not divisible by 4): 4 per block, 2 blocks.
    assert lines[1].startswith("mesh.tensor=4 does not divide 8 parameter(s) (")
    assert "replicated over 'tensor' instead: blocks/" in lines[1]
    assert "(heads 2)" in lines[1] and "and 4 more" in lines[1]
    # The FFN (mlp 64) and the embedding (vocab 384) split over tensor 4: not listed.
    assert "ffn" not in lines[1] and "embed" not in lines[1]
    # tensor 2 divides everything: silent.
    assert mesh_warnings(config, _mesh(tensor=2)) == []


def test_fsdp_not_dividing_embed_is_reported():
    config = load_config(None, TINY)  # d_model 32: every parameter with `embed` has 32
    lines = mesh_warnings(config, _mesh(fsdp=3))
    assert len(lines) == 1
    assert lines[0].startswith("mesh.fsdp=3 does not divide ")
    assert "(embed 32)" in lines[0]
    assert mesh_warnings(config, _mesh(fsdp=4)) == []


def test_tensor_must_divide_memory_value_and_pre_value_dims():
    base = TINY + SPARSE["umv2"]  # value_dim 16, pre_value_dim 8
    with pytest.raises(ConfigError) as error:
        load_config(None, base + ["mesh.data=1", "mesh.tensor=3"])
    assert str(error.value).startswith(
        "config 'mesh.tensor': 3 does not divide model.memory.value_dim=16"
    )
    with pytest.raises(ConfigError, match=r"16 does not divide model\.memory\.pre_value_dim=8"):
        load_config(None, base + ["mesh.data=1", "mesh.tensor=16"])
    # Keeping the tables whole along their value dimension lifts the constraint.
    load_config(None, base + ["mesh.data=1", "mesh.tensor=3", "mesh.rules={mem_dim: null}"])
    load_config(None, base + ["mesh.data=1", "mesh.tensor=8"])  # divides both
    # Checked again once a -1 axis is resolved (the loop and the AOT tool call it with sizes).
    config = load_config(None, base + ["mesh.data=1", "mesh.tensor=-1"])
    with pytest.raises(ConfigError, match="6 does not divide model.memory.value_dim=16"):
        config.check_mesh_fits_model(1, 6)


LOOP = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    from umv2_jax.config import load_config
    from umv2_jax.training import loop
    lines = []
    config = load_config(None, json.loads(sys.argv[1]))
    loop.train(config, sys.argv[2], progress=False, echo=lines.append)
    print(json.dumps(lines))
    """
)


def test_the_training_loop_prints_the_warnings_at_start_up(tmp_path):
    overrides = TINY + ["train.steps=1", "train.eval_every=1", "mesh.data=1", "mesh.expert=2"]
    lines = run_fresh(LOOP, json.dumps(overrides), str(tmp_path / "run"))
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert warnings == [
        "warning: mesh.expert=2: model.sparse='none' has no experts, so 'expert' acts as data "
        "parallel (the batch is split over it); parameters are replicated over it"
    ]
