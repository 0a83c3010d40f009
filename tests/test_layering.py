"""The package's layers, read from the source: who may import whom (directly or through others).

    ops  <  models  <  training.state / step  <  training.loop  <  training.cli
                                              <  generate, inference
    eval (accounting) sits above training's state: the loop never reaches it; the CLI passes it in.

The floors, lowest first (`FLOORS`; a module imports only from its own floor or lower ones):

    0  errors, config, backends   config imports nothing of the package but errors (a leaf)
    1  paths, hardware, reference_numpy, data
    2  parallel (mesh, rules, distributed)
    3  ops
    4  models, parallel.memory / experts / warnings   (the layers and their sharded forms)
    5  training's parts (state, step, optimizer, checkpoint, restore, …), inference, generate,
       export, retrofit
    6  training.loop
    7  the programs: training.cli, evaluate, eval, compare, aot
    8  api (the Python API: train, load_run, generate_text, evaluate_run over the programs)

The root `umv2_jax/__init__.py` is the public facade: it may import any floor, and no module of the
package imports it (so it takes no part in the circles below).

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
    """Every package module importing `module` runs: its imports and their parent packages."""
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
    assert "umv2_jax.models.ultramem_v2" in GRAPH["umv2_jax.models.kinds"]  # by name
    assert "umv2_jax.models.ultramem_v2" in EXPLICIT["umv2_jax.models.kinds"]
    assert "umv2_jax.training.restore" in EXPLICIT["umv2_jax.generate"]
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


def _explicit_imports(module: str) -> set[str]:
    """The modules `module` names in its imports (and registry strings), without the parent
    packages Python runs on the way: `from a.b import c` is a.b.c when that is a module, else a.b.
    A package's __init__ importing its own children is then no circle (Python allows it), while
    two modules that import each other, at any depth or lazily, are."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            modules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            names = modules if len(modules) == len(node.names) else [base, *modules]
        elif isinstance(node, ast.Constant) and node.value in MODULES:
            names = [node.value]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import a.b.func` style: the longest module
                name = name.rpartition(".")[0]
            if name.startswith("umv2_jax.") or name == "umv2_jax":
                found.add(name)
    found.discard(module)
    found.discard("umv2_jax")  # the facade (module docstring); test_nothing_imports_the_facade
    return found


EXPLICIT = {module: _explicit_imports(module) for module in MODULES if module != "umv2_jax"}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of `graph` with more than one module (Tarjan's algorithm,
    iterative), each sorted; sorted by their first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return sorted(circles)


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": {"e"}, "f": set()}
    assert import_circles(graph) == [["a", "b", "c"], ["e", "e2"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert import_circles(EXPLICIT) == [], (
        "import circles (strongly connected components of the import graph)"
    )


def test_config_imports_nothing_of_the_package():
    # `errors` is a leaf below it: ConfigError must be the one class every caller catches.
    assert GRAPH["umv2_jax.config"] - {"umv2_jax"} == {"umv2_jax.errors"}
    assert GRAPH["umv2_jax.errors"] - {"umv2_jax"} == set()


def test_nothing_imports_the_facade():
    importers = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "umv2_jax" and not node.level:
                names = [f"umv2_jax.{a.name}" for a in node.names]
                if any(name not in MODULES for name in names):
                    importers.append(module)
            elif isinstance(node, ast.Import) and any(a.name == "umv2_jax" for a in node.names):
                importers.append(module)
    assert [m for m in importers if m != "umv2_jax"] == []


# Module prefix → floor (module docstring); the longest matching prefix decides.
FLOORS = {
    "umv2_jax.errors": 0,
    "umv2_jax.backends": 0,
    "umv2_jax.config": 0,
    "umv2_jax.paths": 1,
    "umv2_jax.hardware": 1,
    "umv2_jax.reference_numpy": 1,
    "umv2_jax.data": 1,
    "umv2_jax.parallel": 2,
    "umv2_jax.ops": 3,
    "umv2_jax.models": 4,
    "umv2_jax.parallel.memory": 4,
    "umv2_jax.parallel.experts": 4,
    "umv2_jax.parallel.warnings": 4,
    "umv2_jax.training": 5,
    "umv2_jax.inference": 5,
    "umv2_jax.generate": 5,
    "umv2_jax.export": 5,
    "umv2_jax.retrofit": 5,
    "umv2_jax.training.loop": 6,
    "umv2_jax.training.cli": 7,
    "umv2_jax.evaluate": 7,
    "umv2_jax.eval": 7,
    "umv2_jax.compare": 7,
    "umv2_jax.aot": 7,
    "umv2_jax.api": 8,
}


def floor(module: str) -> int:
    prefixes = [p for p in FLOORS if module == p or module.startswith(p + ".")]
    if not prefixes:
        raise AssertionError(f"{module} has no floor: add it to FLOORS and the module docstring")
    return FLOORS[max(prefixes, key=len)]


def test_every_module_has_a_floor():
    for module in EXPLICIT:
        floor(module)


def test_no_import_from_a_lower_floor_to_a_higher_one():
    upward = sorted(
        f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
        for module, targets in EXPLICIT.items()
        for target in targets
        if floor(target) > floor(module)
    )
    assert upward == []


def test_the_floor_check_sees_an_upward_import():
    # Guards the check: config → training would be reported.
    assert (
        floor("umv2_jax.training.loop")
        > floor("umv2_jax.models.transformer")
        > floor("umv2_jax.config")
    )
    assert (
        floor("umv2_jax.parallel.memory")
        == floor("umv2_jax.models")
        > floor("umv2_jax.parallel.mesh")
    )
