"""The package's layers, read from the source: who may import whom (directly or through others).

    ops  <  models  <  training.state / step  <  training.loop  <  training.cli
                                              <  generate, inference
    eval (accounting) sits above training's state: the loop never reaches it; the CLI passes it in.

Every `import` counts, also those inside functions (a lazy import is still a dependency) and a
string naming a package module (what a registry hands to `importlib`); importing `a.b.c` runs
`a/__init__` and `a/b/__init__` too.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "umv2_jax"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & MODULES.keys()


def _direct_imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` imports the module a.b when there is one, else the name b of a.
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and node.value in MODULES:
            names = [node.value]  # a module named for `importlib.import_module` (the registries)
        else:
            continue
        for name in names:
            if name.split(".")[0] == "umv2_jax":
                found |= _with_parents(name)
    found.discard(module)
    return found


GRAPH = {module: _direct_imports(module) for module in MODULES}


def reachable(module: str) -> set[str]:
    """Every package module that importing `module` can run (transitive closure of GRAPH)."""
    seen, todo = set(), [module]
    while todo:
        for name in GRAPH[todo.pop()] - seen:
            seen.add(name)
            todo.append(name)
    return seen


def _under(prefix: str) -> list[str]:
    return sorted(m for m in MODULES if m == prefix or m.startswith(prefix + "."))


def _offending(module: str, forbidden: str) -> list[str]:
    return sorted(m for m in reachable(module) if m == forbidden or m.startswith(forbidden + "."))


def test_the_graph_sees_known_edges():
    # Guards the checker itself: a parser that found nothing would pass every rule below.
    assert "umv2_jax.training.state" in GRAPH["umv2_jax.training.loop"]
    assert "umv2_jax.training.restore" in GRAPH["umv2_jax.generate"]  # a function-local import
    assert "umv2_jax.eval.accounting" in GRAPH["umv2_jax.training.cli"]  # likewise
    assert "umv2_jax.models.transformer" in reachable("umv2_jax.training.loop")
    assert "umv2_jax.models.ultramem_v2" in GRAPH["umv2_jax.models.sparse"]  # by name
    assert "umv2_jax.ops.value_bag" in reachable("umv2_jax.training.loop")


def test_the_training_loop_never_reaches_eval():
    assert _offending("umv2_jax.training.loop", "umv2_jax.eval") == []


@pytest.mark.parametrize("module", ["umv2_jax.generate", *_under("umv2_jax.inference")])
def test_inference_never_reaches_the_training_loop(module):
    assert _offending(module, "umv2_jax.training.loop") == []
    assert _offending(module, "umv2_jax.training.cli") == []


@pytest.mark.parametrize("module", _under("umv2_jax.models") + _under("umv2_jax.ops"))
def test_models_and_ops_never_reach_training_eval_or_inference(module):
    for layer in ("umv2_jax.training", "umv2_jax.eval", "umv2_jax.inference", "umv2_jax.generate"):
        assert _offending(module, layer) == [], layer


@pytest.mark.parametrize("module", _under("umv2_jax.ops"))
def test_ops_never_reach_models(module):
    assert _offending(module, "umv2_jax.models") == []


def test_byte_vocab_is_defined_once_in_the_tokenizer():
    definers = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            if any(isinstance(t, ast.Name) and t.id == "BYTE_VOCAB" for t in targets):
                definers.append(module)
    assert definers == ["umv2_jax.data.tokenizer"]
