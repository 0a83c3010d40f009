"""The Python API (README "Python API", docs/python_api.md): the README's example runs as written;
`import umv2_jax` stays light."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "README.md"  # its first ```python block is the Python API example


def example_code(path: Path) -> str:
    """The first ```python block of a Markdown file."""
    match = re.search(r"```python\n(.*?)```", path.read_text(), re.DOTALL)
    assert match, f"{path} has no ```python block"
    return match.group(1)


def test_the_documented_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example names configs/… relative to the clone
    namespace: dict = {}
    exec(compile(example_code(DOC), str(DOC), "exec"), namespace)  # noqa: S102
    run, again = namespace["run"], namespace["again"]
    assert run.step == 20 and len(run.losses) == 20
    assert again.step == run.step and again.config == run.config


def test_import_is_light_and_lazy():
    program = (
        "import json, sys; import umv2_jax as u; light = 'jax' not in sys.modules; "
        "import umv2_jax.models.transformer; no_api = 'umv2_jax.api' not in sys.modules; "
        "names = sorted(u.__all__); u.build_model; "
        "print(json.dumps([light, no_api, names, 'umv2_jax.api' in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    )
    light, no_api, names, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert light, "import umv2_jax imported jax"
    assert no_api, "importing a submodule ran umv2_jax.api"
    assert loaded, "u.build_model did not load umv2_jax.api"
    assert names == sorted(
        [
            "Run",
            "build_model",
            "compare",
            "evaluate_run",
            "generate_text",
            "load_config",
            "load_run",
            "train",
        ]
    )
