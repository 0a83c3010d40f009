"""Config loading, overrides and validation: every user mistake is a one-line ConfigError."""

import dataclasses

import pytest

from umv2_jax.config import (
    Config,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    to_dict,
)
from umv2_jax.errors import ConfigError


def test_defaults_validate():
    config = load_config(None)
    assert config.model.padded_vocab_size % 128 == 0
    assert config.model.padded_vocab_size >= config.model.vocab_size


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mine\nmodel:\n  num_layers: 3\ntrain:\n  steps: 7\n")
    config = load_config(
        path, ["model.d_model=96", "model.num_heads=3", "train.learning_rate=1e-3"]
    )
    assert (config.name, config.model.num_layers, config.model.d_model) == ("mine", 3, 96)
    assert config.train.steps == 7 and config.train.learning_rate == pytest.approx(1e-3)


def test_round_trip_through_dict():
    config = load_config(None, ["model.sparse_layers=[0, 2]"])
    assert config.model.sparse_layers == (0, 2)
    assert config_from_dict(to_dict(config)) == config


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'model.num_layer'; did you mean 'model.num_layers'"
    ):
        load_config(None, ["model.num_layer=4"])


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(None, ["modle.num_layers=4"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_layers=two", "'model.num_layers': expected an integer"),
        ("model.num_layers=2.5", "'model.num_layers': expected an integer"),
        ("model.tie_embeddings=3", "'model.tie_embeddings': expected true or false"),
        ("train.learning_rate=fast", "'train.learning_rate': expected a number"),
        (
            "model.compute_dtype=float16",
            "'model.compute_dtype': 'float16' is not allowed; allowed: float32, bfloat16",
        ),
        ("model.sparse=switch", "'model.sparse': 'switch' is not allowed"),
    ],
)
def test_wrong_types(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.parametrize("value", [0, -5])
def test_seq_len_must_be_positive(value):
    with pytest.raises(ConfigError, match="'data.seq_len': must be positive"):
        load_config(None, [f"data.seq_len={value}"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.d_model=100", "model.num_heads=3"], "not divisible by num_heads"),
        (["train.batch_size=10", "train.micro_batches=3"], "not divisible by micro_batches"),
        (["model.sparse_layers=[5]"], "block 5 out of range"),
        (["model.d_ff=0"], "only allowed with sparse: moe"),
        (["data.source=imagenet"], "is not one of shakespeare, tfds:NAME"),
        (["data.seq_len=4096"], "exceeds model.max_seq_len"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis may be -1"),
    ],
)
def test_invalid_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_moe_top_k_larger_than_experts():
    model = dataclasses.replace(ModelConfig(), sparse="moe", moe=MoEConfig(num_experts=4, top_k=5))
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        Config(model=model).validate()


def test_experts_must_divide_over_the_expert_axis():
    moe = ["model.sparse=moe", "model.d_ff=0", "model.moe.num_experts=6", "model.moe.top_k=2"]
    with pytest.raises(
        ConfigError, match="'mesh.expert': 4 does not divide model.moe.num_experts=6"
    ):
        load_config(None, moe + ["mesh.expert=4"])
    load_config(None, moe + ["mesh.expert=3"])


def test_mesh_that_does_not_divide_the_devices():
    with pytest.raises(ConfigError, match="do not divide 8 devices"):
        MeshConfig(data=-1, tensor=3).shape(8)
    with pytest.raises(ConfigError, match="need 4 devices but 8 are available"):
        MeshConfig(data=2, tensor=2).shape(8)
    assert MeshConfig(data=-1, tensor=2).shape(8) == (4, 1, 2, 1)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)


def test_override_syntax():
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        apply_overrides({}, ["model.num_layers"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_every_shipped_config_validates():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        load_config(path)
