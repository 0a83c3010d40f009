"""Configs by packaged name (umv2_jax.config.load_config / resolve_config_path) and the checks that
higher floors register with the config (config.register_check)."""

import os

import pytest

import umv2_jax.data.tasks  # noqa: F401  (registers the task checks)
from umv2_jax import config as config_lib
from umv2_jax.config import load_config, packaged_configs, resolve_config_path
from umv2_jax.errors import ConfigError


def test_every_packaged_config_loads_by_name():
    names = packaged_configs()
    assert {"default", "tiny_umv2", "eval/t_umv2", "paper/ultramem_v2_227m"} <= set(names)
    for name in names:
        load_config(name)  # validates


@pytest.mark.parametrize(
    "spelling",
    [
        "paper/ultramem_v2_227m",
        "paper/ultramem_v2_227m.yaml",
        "configs/paper/ultramem_v2_227m.yaml",
    ],
)
def test_names_and_repository_paths_resolve_from_any_directory(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    path = resolve_config_path(spelling)
    assert os.path.isfile(path) and path.endswith(os.path.join("paper", "ultramem_v2_227m.yaml"))
    assert load_config(spelling).name == "UltraMemV2-227M-1.2B"


def test_a_file_in_the_working_directory_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_umv2").write_text("name: mine\n")
    assert load_config("tiny_umv2").name == "mine"


def test_an_unknown_name_is_one_line_naming_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_config("paper/nope")
    message = str(error.value)
    assert "\n" not in message and "'paper/nope' does not exist" in message
    assert "paper/ultramem_v2_227m" in message
    with pytest.raises(ConfigError):
        load_config("../configs/default")  # names stay inside the packaged folder


def test_registered_task_checks_run_in_validation():
    task = ["data.source=task:mqar", "data.seq_len=256", "model.max_seq_len=256"]
    with pytest.raises(ConfigError, match="too small for task mqar"):
        load_config(None, [*task, "model.vocab_size=8"])  # Config's check
    with pytest.raises(ConfigError, match="needs at least 256 positions"):
        load_config(None, ["data.source=task:mqar", "data.seq_len=128"])  # DataConfig's check
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        load_config(None, ["data.source=task:nope"])


def test_register_check_refuses_an_unknown_section_and_keeps_one_copy(monkeypatch):
    monkeypatch.setattr(config_lib, "_CHECKS", {"data": [], "config": []})
    calls = []
    check = calls.append
    config_lib.register_check("config", check)
    config_lib.register_check("config", check)
    load_config(None)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="unknown section"):
        config_lib.register_check("model", check)
