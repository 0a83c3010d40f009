"""Config loading, overrides and validation: every user mistake is a one-line ConfigError."""

import dataclasses

import pytest

from umv2_jax.config import (
    Config,
    LrMultiplier,
    MemoryConfig,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    UltraMemConfig,
    ValueShare,
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


# --------------------------------------------------------------------------------------------------
# Checks that used to live in the models: they fail in load_config, naming the dotted key.
# --------------------------------------------------------------------------------------------------

UMV2 = ["model.sparse=ultramem_v2", "model.memory.n_keys=8", "model.memory.calibration_tokens=64"]


@pytest.mark.parametrize("topology", ["ring", "noring", "block"])
def test_sharing_window_is_bounded_by_the_memory_layers_not_the_blocks(topology):
    two_memories = UMV2 + ["model.num_layers=4", "model.sparse_layers=[0, 1]"]
    with pytest.raises(
        ConfigError,
        match=r"'model.memory.value_share': window 3 is larger than the number of layers holding "
        r"a memory \(2\)",
    ):
        load_config(None, two_memories + [f"model.memory.value_share={topology}:3"])
    load_config(None, two_memories + [f"model.memory.value_share={topology}:2"])


def test_stacked_tables_must_fit_int32_rows_counting_memory_layers_only():
    # 8000² = 6.4e7 rows per table: 33 tables fit below 2³¹, 34 do not (40 blocks either way).
    big = ["model.sparse=ultramem_v2", "model.num_layers=40", "model.memory.n_keys=8000"]
    with pytest.raises(ConfigError, match=r"'model.memory.n_keys': 34 stacked tables"):
        load_config(None, big + [f"model.sparse_layers={list(range(34))}"])
    load_config(None, big + [f"model.sparse_layers={list(range(33))}"])


@pytest.mark.parametrize(
    "value, message",
    [
        ("spiral:2", "unknown topology 'spiral:2'"),
        ("ring", "'ring' needs a positive window"),
        ("ring:0", "'ring:0' needs a positive window"),
        ("block:x", "'block:x' needs a positive window"),
        (3, "expected a string like 'none'"),
    ],
)
def test_bad_value_share_is_a_one_line_config_error(value, message):
    with pytest.raises(ConfigError, match=f"'model.memory.value_share': {message}") as error:
        load_config(None, UMV2 + [f"model.memory.value_share={value}"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", ["decay", "linear:4", "decay:-1", "constant:x", "decay:nan"])
def test_bad_value_lr_names_the_key(value):
    with pytest.raises(ConfigError, match=f"'model.memory.value_lr': '{value}' is not decay:F"):
        load_config(None, [f"model.memory.value_lr={value}"])


def test_no_model_module_raises_config_errors():
    """The config is the single source of truth: models may assert, never validate user input."""
    from pathlib import Path

    models = Path(__file__).parents[1] / "umv2_jax" / "models"
    offenders = [p.name for p in sorted(models.rglob("*.py")) if "ConfigError" in p.read_text()]
    assert offenders == []


# --------------------------------------------------------------------------------------------------
# The string languages: parsed once into typed values, written back as the same strings.
# --------------------------------------------------------------------------------------------------


def test_string_languages_parse_into_typed_values():
    config = load_config(
        None,
        UMV2
        + [
            "model.num_layers=6",
            "model.memory.value_share=noring:3",
            "model.memory.value_lr=constant:0.5",
        ],
    )
    assert config.model.memory.value_share == ValueShare("noring", 3)
    assert config.model.memory.value_lr == LrMultiplier("constant", 0.5)
    v1 = load_config(
        None,
        [
            "model.sparse=ultramem",
            "model.num_layers=6",
            "model.ultramem.skip_layers=0:2/3:5",
            "model.ultramem.n_keys=8",
        ],
    )
    assert v1.model.ultramem.skip_layers == ((0, 2), (3, 5))
    assert v1.model.sparse_layer_indices() == (2, 5)
    assert load_config(None).model.memory.value_share == ValueShare("none", 1)


def test_one_skip_pair_on_the_command_line_is_not_read_as_a_base_60_number():
    # YAML 1.1 reads an unquoted 2:3 as 2·60 + 3; `--set` keeps the text instead.
    config = load_config(None, ["model.sparse=ultramem", "model.ultramem.skip_layers=2:3"])
    assert config.model.ultramem.skip_layers == ((2, 3),)
    with pytest.raises(ConfigError, match="quote it in YAML"):
        config_from_dict({"model": {"sparse": "ultramem", "ultramem": {"skip_layers": 123}}})


def test_typed_values_and_strings_are_interchangeable_from_python():
    assert MemoryConfig(value_share="ring:4") == MemoryConfig(value_share=ValueShare("ring", 4))
    assert MemoryConfig(value_lr="decay:2") == MemoryConfig(value_lr=LrMultiplier("decay", 2.0))
    assert UltraMemConfig(skip_layers="1:2/3:4").skip_layers == ((1, 2), (3, 4))
    assert UltraMemConfig(skip_layers=[[1, 2]]).skip_layers == ((1, 2),)
    replaced = dataclasses.replace(MemoryConfig(), value_share="block:2")
    assert replaced.value_share == ValueShare("block", 2)
    with pytest.raises(ConfigError, match="'model.memory.value_share'"):
        ValueShare("ring", 0)
    with pytest.raises(ConfigError, match="'model.memory.value_share'"):
        ValueShare("none", 2)
    with pytest.raises(ConfigError, match="'model.ultramem.skip_layers'"):
        UltraMemConfig(skip_layers="0-1")


def test_to_dict_writes_the_strings_back_and_round_trips(tmp_path):
    import json

    overrides = [
        "model.num_layers=6",
        "model.memory.value_share=ring:3",
        "model.memory.value_lr=decay:2.5",
    ]
    config = load_config(None, UMV2 + overrides)
    data = to_dict(config)
    assert data["model"]["memory"]["value_share"] == "ring:3"
    assert data["model"]["memory"]["value_lr"] == "decay:2.5"
    assert load_config(None).to_dict()["model"]["memory"]["value_lr"] == "decay:4"
    # Through JSON, as the config.json beside checkpoints does.
    assert config_from_dict(json.loads(json.dumps(data))) == config
    v1 = load_config(
        None,
        ["model.sparse=ultramem", "model.num_layers=4", "model.ultramem.skip_layers=0:1/2:3"],
    )
    assert to_dict(v1)["model"]["ultramem"]["skip_layers"] == "0:1/2:3"
    assert config_from_dict(json.loads(json.dumps(to_dict(v1)))) == v1
    # And through YAML.
    import yaml

    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    assert load_config(path) == config


def test_resuming_with_the_same_config_is_compatible(tmp_path):
    from umv2_jax.training.checkpoint import check_compatible, write_config

    config = load_config(None, UMV2 + ["model.memory.value_lr=constant:2"])
    write_config(str(tmp_path), config)
    assert check_compatible(
        str(tmp_path), load_config(None, UMV2 + ["model.memory.value_lr=constant:2"])
    )


# --------------------------------------------------------------------------------------------------
# UltraMem v1's own section; fields that left model.product_key say where they went.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value", [("skip_layers", "0:1"), ("value_expand", 4), ("tucker_rank", 2), ("n_cores", 2)]
)
def test_v1_fields_moved_out_of_product_key(name, value):
    with pytest.raises(
        ConfigError,
        match=f"'model.product_key.{name}' was moved to 'model.ultramem.{name}'",
    ):
        load_config(None, ["model.sparse=ultramem", f"model.product_key.{name}={value}"])


def test_ultramem_ignores_no_product_key_field_silently():
    with pytest.raises(ConfigError, match="'model.product_key': sparse: ultramem reads its fields"):
        load_config(None, ["model.sparse=ultramem", "model.product_key.n_keys=16"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.ultramem.value_expand=3"], "'model.ultramem.value_expand': 3 is not a square"),
        (["model.ultramem.skip_layers=0:1/2:9"], "'model.ultramem.skip_layers': '2:9' needs"),
        (["model.ultramem.skip_layers=0:2/1:3"], "'model.ultramem.skip_layers': spans"),
        (["model.ultramem.rc_topk=40"], "'model.ultramem.rc_topk': 40 must be in"),
        (["model.ultramem.value_dim=9"], "'model.ultramem.value_dim': 9 is not divisible"),
    ],
)
def test_ultramem_section_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.sparse=ultramem"] + overrides)


# --------------------------------------------------------------------------------------------------
# Fields that used to be dead.
# --------------------------------------------------------------------------------------------------


def test_param_dtype_accepts_bfloat16_and_nothing_else():
    assert load_config(None, ["model.param_dtype=bfloat16"]).model.param_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="'model.param_dtype': 'float16' is not allowed"):
        load_config(None, ["model.param_dtype=float16"])


def test_model_init_release_reaches_the_backbone_std():
    from umv2_jax.models.init import backbone_std

    paper, release = (load_config(None, [f"model.init={i}"]).model for i in ("paper", "release"))
    assert backbone_std(paper) != backbone_std(release)


# --------------------------------------------------------------------------------------------------
# Values that pass the type check but make no sense; run names; empty files.
# --------------------------------------------------------------------------------------------------


def _float_fields(section, prefix=""):
    """Dotted keys of every float field (sub-sections included; typed string values excluded)."""
    keys = []
    for item in dataclasses.fields(section):
        value, key = getattr(section, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value) and not item.metadata:
            keys += _float_fields(value, key + ".")
        elif isinstance(value, float):
            keys.append(key)
    return keys


FLOAT_FIELDS = _float_fields(Config())


def test_the_float_fields_are_all_found():
    assert len(FLOAT_FIELDS) >= 20
    for key in ("train.learning_rate", "train.eps", "train.b1", "train.grad_clip"):
        assert key in FLOAT_FIELDS
    for key in ("model.memory.dropout", "model.memory.norm_eps", "model.moe.capacity_factor"):
        assert key in FLOAT_FIELDS


@pytest.mark.parametrize("key", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_every_float_field_must_be_finite(key, value):
    with pytest.raises(ConfigError, match=rf"^config '{key}': (-?inf|nan) is not a finite number"):
        load_config(None, [f"{key}={value}"])


def test_non_finite_values_from_yaml_and_from_python(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: .inf\n  weight_decay: .nan\n")
    with pytest.raises(ConfigError, match="'train.learning_rate': inf is not a finite number"):
        load_config(path)
    memory = MemoryConfig(value_lr=LrMultiplier("decay", float("inf")))
    config = Config(model=ModelConfig(sparse="ultramem_v2", memory=memory))
    with pytest.raises(ConfigError, match="'model.memory.value_lr': 'decay:inf' holds inf"):
        config.validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.steps=2", "train.warmup_fraction=0.9"], "a warmup of 2 steps, not shorter"),
        (["train.steps=10", "train.warmup_fraction=0.96"], "a warmup of 10 steps, not shorter"),
        (["train.eps=0"], "'train.eps': must be > 0"),
        (["train.eps=-1e-8"], "'train.eps': must be > 0"),
        (["model.sparse=ultramem_v2", "model.memory.norm_eps=0"], "'model.memory.norm_eps'"),
        (["model.sparse=ultramem_v2", "model.memory.tucker_tau=-1"], "'model.memory.tucker_tau'"),
    ],
)
def test_values_that_make_no_sense(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_warmup_shorter_than_the_run_is_fine():
    assert load_config(None, ["train.steps=10", "train.warmup_fraction=0.9"]).train.steps == 10


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", "", ".", "..", ".hidden", "a b"])
def test_a_run_name_is_a_plain_name_never_a_path(name):
    with pytest.raises(ConfigError, match="config 'name': .* is not a plain name"):
        load_config(None, [f"name={name}"] if name else ["name=''"])


@pytest.mark.parametrize("name", ["S-umv2", "tiny_umv2", "Memory+-227M-1.2B", "run.2"])
def test_plain_names_are_accepted(name):
    assert load_config(None, [f"name={name}"]).name == name


@pytest.mark.parametrize("text", ["", "\n", "# settings to come\n", "---\n"])
def test_an_empty_config_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file '{path}' is empty"):
        load_config(path)


def test_mesh_rules_override_and_reject_unknown_names():
    from umv2_jax.config import load_config
    from umv2_jax.errors import ConfigError

    config = load_config(None, ["mesh.rules={mem_rows: null, embed: [fsdp, data]}"])
    assert dict(config.mesh.rules) == {"mem_rows": None, "embed": ("fsdp", "data")}
    with pytest.raises(ConfigError, match=r"mesh.rules.mem_row'.*unknown logical axis"):
        load_config(None, ["mesh.rules={mem_row: fsdp}"])
    with pytest.raises(ConfigError, match=r"'mesh.rules.embed'.*not a mesh axis"):
        load_config(None, ["mesh.rules={embed: model}"])


# ---- review: user-side faults of a config file or an override are one line, never a traceback ----

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(it holds the byte 0xe9\)"):
        load_config(path)


def test_a_directory_passed_as_the_config_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass --config PATH to a .yaml file"):
        load_config(tmp_path)


def test_an_unreadable_config_file_is_a_config_error_as_an_unprivileged_user():
    """Root reads any file, so the load runs as `nobody` on a root-owned 0600 file under /tmp."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="config-unreadable-", dir="/tmp"))
    try:
        base.chmod(0o755)
        path = base / "c.yaml"
        path.write_text("name: x\n")
        path.chmod(0o600)
        code = (
            "from umv2_jax.config import load_config\n"
            "from umv2_jax.errors import ConfigError\n"
            f"try:\n    load_config({str(path)!r})\n"
            "except ConfigError as error:\n    print(error)\n"
        )
        env = {**os.environ, "HOME": "/tmp", "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(
            NOBODY + [sys.executable, "-c", code], capture_output=True, text=True, env=env
        )
        assert done.stdout.startswith(f"cannot read config file '{path}' (Permission denied)"), (
            done.stdout + done.stderr
        )
        assert "Traceback" not in done.stderr
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize(
    "override",
    ["train.steps=3000000000", "train.seed=-3000000000", "checkpoint.every=" + "7" * 5000],
)
def test_integers_are_bounded_to_int32_at_load_time(override):
    with pytest.raises(ConfigError, match="is out of range; integers must be between") as error:
        load_config(None, [override])
    assert len(str(error.value)) < 300  # a 5,000-digit value is not echoed whole


def test_a_huge_override_value_is_not_echoed_whole():
    with pytest.raises(ConfigError, match="expected an integer") as error:
        load_config(None, ["model.num_layers=" + "x" * 100_000])
    assert "100,002 characters" in str(error.value) and len(str(error.value)) < 300
