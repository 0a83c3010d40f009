"""The wheel: what it ships (configs, prepared data, every module), and that an install from it,
outside the clone, loads configs by name and trains (README's first command, on the tiny config).

The wheel is built from a copy of the sources in a temporary folder (the clone gets no build/ or
egg-info), without build isolation (setuptools comes from this environment: no network).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("umv2_jax", "pallas_kernels", "configs", "setup.py", "pyproject.toml", "README.md")
NOISE = re.compile(r"libtpu|\bTPU\b|CUDA|Unable to initialize backend", re.I)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600, cwd=source,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    (built,) = out.glob("umv2_jax-*.whl")
    return built


def _repo_files(folder: str, pattern: str = "**/*") -> set[str]:
    root = REPO / folder
    return {
        path.relative_to(root).as_posix()
        for path in root.glob(pattern)
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_the_wheel_ships_configs_prepared_data_and_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = _repo_files("configs", "**/*.yaml")
    assert {
        "default.yaml",
        "tiny_umv2.yaml",
        "paper/ultramem_v2_227m.yaml",
        "eval/t_umv2.yaml",
    } <= configs
    assert {f"umv2_jax/configs/{name}" for name in configs} <= names
    prepared = _repo_files("umv2_jax/data/prepared")
    assert any(name.startswith("shakespeare/") for name in prepared)
    assert "tokenizers/shakespeare_bpe2048.model" in prepared
    assert {f"umv2_jax/data/prepared/{name}" for name in prepared} <= names
    modules = {f"umv2_jax/{n}" for n in _repo_files("umv2_jax", "**/*.py")}
    modules |= {f"pallas_kernels/{n}" for n in _repo_files("pallas_kernels", "**/*.py")}
    assert modules <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert (
        "umv2-train = umv2_jax.training.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


CHECK = """
import json, umv2_jax
from umv2_jax.config import load_config, packaged_configs
from umv2_jax.data import sources, tokenizers
from umv2_jax.training.cli import default_config_path
print(json.dumps({
    "file": umv2_jax.__file__,
    "names": [load_config(n).name for n in ("paper/ultramem_v2_227m", "eval/t_umv2", "tiny_umv2")],
    "by_repo_path": load_config("configs/eval/t_umv2.yaml").name,
    "default": default_config_path(),
    "packaged": packaged_configs(),
    "shakespeare": (sources.EMBEDDED_VERSION_DIR / "dataset_info.json").is_file(),
    "tokenizer": (tokenizers.SHIPPED_DIR / "shakespeare_bpe2048.model").is_file(),
}))
"""


@pytest.mark.slow  # a fresh venv and a tiny training run: ~3 min on 2 loaded cores
def test_a_wheel_installed_outside_the_clone_loads_configs_by_name_and_trains(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # The dependencies come from this environment (a path, not its .pth files: not its editable
    # umv2_jax); the package itself only from the wheel.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"  # no configs/ here: everything comes through the package
    work.mkdir()
    drop = {"PYTHONPATH", "JAX_PLATFORMS", "XLA_FLAGS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    check = subprocess.run(
        [python, "-c", CHECK], capture_output=True, text=True, timeout=600, env=env, cwd=work
    )
    assert check.returncode == 0, check.stderr[-3000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(venv)), report["file"]
    assert report["names"] == ["UltraMemV2-227M-1.2B", "T-umv2", "tiny_umv2"]
    assert report["by_repo_path"] == "T-umv2"
    assert report["default"].startswith(str(venv)) and report["default"].endswith("default.yaml")
    assert "paper/ultramem_v2_227m" in report["packaged"] and "default" in report["packaged"]
    assert report["shakespeare"] and report["tokenizer"]

    train = subprocess.run(
        [venv / "bin" / "umv2-train", "--config", "tiny_umv2", "--steps", "2", "--workdir", "run"],
        capture_output=True, text=True, timeout=1200, env=env, cwd=work,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert "final validation (step 2)" in train.stdout
    assert (work / "run" / "metrics.jsonl").is_file()
    assert [line for line in train.stderr.splitlines() if NOISE.search(line)] == []
