"""Export a trained run's weights as safetensors, and import them back onto any mesh.

    python -m umv2_jax.export --workdir RUN --out DIR [--step N] [--unscanned]
                              [--dtype float32|bfloat16] [--shard-size 2GB] [--overwrite]
    python -m umv2_jax.export --from DIR --check [--set mesh.data=1 --set mesh.fsdp=4]

    config, parts, params, rest = load_pretrained(DIR, mesh=None, overrides=())
    model = parts.build(params, rest)

An export directory holds:

    model-00001-of-0000N.safetensors …   the tensors, filled in name order up to --shard-size each
    model.safetensors.index.json          {"metadata": {"total_size", "format", "layout", ...},
                                           "weight_map": {tensor name: file}} (as Hugging Face)
    config.json                           the run's Config (`model` is what the tensors need)
    tokenizer/                            the run's tokenizer file and identity.json (when saved)
    README.md                             every tensor's name, shape and dtype; the conventions

Tensor names are the dotted paths of the model's NNX pure-dict trees: trainable parameters as they
are (`embed`, `blocks.0.attn.query`, `shared.values`), the non-trainable variables a forward pass
needs (grid permutations, value-table windows, calibration constants) under `rest.`
(`rest.blocks.0.sparse.permutation`). `blocks.S` is segment S of the model's segment layout
(`umv2_jax.models.transformer.segment_layout`): a scanned run of identical blocks is one segment
whose tensors are `blocks.S.layers.…` with a leading [layers] axis; a single block's tensors have
none. `--unscanned` writes one segment per block (`convert_block_tree`) and sets
`model.scan_layers: false` in the exported config. Import regroups tensors into whatever layout its
config asks for (`overrides=["model.scan_layers=true"]`), reading each device's slice only.

Read-only on RUN. Bad input (a run without checkpoints, a step that does not exist, a missing
shard, a tensor of the wrong shape, an unknown or missing tensor, a non-empty --out without
--overwrite) is one line on stderr and exit status 2, with nothing written: the export is written
into a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from umv2_jax.errors import CheckpointError, ConfigError, UserError

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
README_FILE = "README.md"
TOKENIZER_DIR = "tokenizer"
REST_PREFIX = "rest."
FORMAT = "umv2-jax"
DEFAULT_SHARD_SIZE = 2 * 10**9
_SHARD_NAME = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


# ------------------------------------------------------------------------------------------------
# Names and layouts
# ------------------------------------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted name: leaf} of a pure-dict tree (dict keys and list indices joined by dots), in
    the tree's own order (jax's: sorted keys)."""
    import jax

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[prefix + ".".join(_key(k) for k in path)] = leaf
    return flat


def _key(key: Any) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _block_of(layout: tuple[tuple[int, ...], ...]) -> dict[int, tuple[int, int | None]]:
    """{block: (segment, position in its stack, or None for a single-block segment)}."""
    where = {}
    for segment, indices in enumerate(layout):
        for position, block in enumerate(indices):
            where[block] = (segment, position if len(indices) > 1 else None)
    return where


def _split_block_name(name: str) -> tuple[str, int, bool, str] | None:
    """'rest.blocks.3.layers.attn.query' → ('rest.', 3, True, 'attn.query'); None if not a block."""
    match = re.match(r"^((?:rest\.)?)blocks\.(\d+)\.(layers\.)?(.+)$", name)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), match.group(3) is not None, match.group(4)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a target tensor's numbers are: one source tensor, or one per stacked block.

    parts: ((source name, position or None), ...); `stacked`: the target has a leading [layers]
    axis made of the parts in order (one part each); otherwise one part, sliced at `position`
    (its leading axis) when the source is a stack.
    """

    parts: tuple[tuple[str, int | None], ...]
    stacked: bool


def sources_for(target_names: list[str], source_layout, target_layout) -> dict[str, Source]:
    """Each target tensor's `Source` in an export written with `source_layout` (by name only)."""
    source_where = _block_of(source_layout)
    sources = {}
    for name in target_names:
        split = _split_block_name(name)
        if split is None:
            sources[name] = Source(((name, None),), stacked=False)
            continue
        prefix, segment, stacked, tail = split
        blocks = target_layout[segment] if segment < len(target_layout) else ()
        parts = []
        for block in blocks:
            if block not in source_where:  # a layout that does not cover the block: missing
                parts.append((f"{prefix}blocks.<block {block}>.{tail}", None))
                continue
            source_segment, position = source_where[block]
            layers = "layers." if position is not None else ""
            parts.append((f"{prefix}blocks.{source_segment}.{layers}{tail}", position))
        sources[name] = Source(tuple(parts), stacked)
    return sources


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


class _Lazy:
    """A leaf read from the device only when written: `array[index…]` (so `convert_block_tree`
    can regroup a tree of these without materializing anything)."""

    def __init__(self, array, index: tuple = ()):
        self.array, self.index = array, index
        shape = tuple(array.shape)
        for _ in index:
            shape = shape[1:]
        self.shape, self.dtype = shape, np.dtype(array.dtype)

    def __getitem__(self, position):
        return _Lazy(self.array, (*self.index, int(position)))

    def numpy(self) -> np.ndarray:
        array = self.array
        if self.index:
            array = array[self.index]
        return np.asarray(array)


def restore_run(workdir: str, step: int | None = None):
    """(config, parts, params, rest, step) of RUN at `step` (default: its latest readable one).

    The one place this module restores a run: `umv2_jax.generate.load_run` for the latest step
    (it builds the whole train state; a parameters-only restore can replace it here), the same
    reader for a given step. Read-only; CheckpointError (one line) for a missing run or step.
    """
    from umv2_jax import generate

    if step is None:
        return generate.load_run(workdir)
    from umv2_jax.config import config_from_dict
    from umv2_jax.training import checkpoint as checkpoint_lib
    from umv2_jax.training.restore import read_run_config
    from umv2_jax.training.state import abstract_like, build

    config = config_from_dict(read_run_config(workdir))
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{workdir} holds no checkpoint ({directory} is missing); train first"
        )
    saved = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    if step not in saved:
        have = f"it has steps {saved}" if saved else "it has none"
        raise CheckpointError(
            f"{workdir} has no checkpoint at step {step} ({have}); pass one of them to --step "
            "or leave --step out for the latest"
        )
    reason = checkpoint_lib.verify_checksums(os.path.join(directory, str(step)))
    if reason is not None:
        raise CheckpointError(f"checkpoint at step {step} in {workdir} is unreadable: {reason}")
    setup = build(config)
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint, read_only=True)
    try:
        restored, rest = checkpointer._restore(
            step,
            abstract_like(setup.state, setup.state_shardings),
            abstract_like(setup.rest, setup.rest_shardings),
        )
    finally:
        checkpointer.close()
    return config, setup.parts, restored.state["params"], rest, step


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1.5GiB' / '123' (bytes) → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 2GB, 500MB, 1GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    size = int(number * scale[unit])
    if size < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def check_out(out: str, overwrite: bool) -> None:
    """ConfigError unless --out can be written: absent, an empty folder, or --overwrite."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a folder; pass a folder path")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(
            f"--out {out} is not empty; pass --overwrite to replace it or choose a new folder"
        )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {out}: its parent folder {parent} does not exist; create it")


def export_run(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    unscanned: bool = False,
    dtype: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
) -> dict:
    """Writes RUN's parameters (and `rest`) as safetensors in `out` (see the module docstring).

    Returns a summary: {"step", "files", "tensors", "total_size", "seconds"}.
    """
    _require_safetensors()
    import jax
    from safetensors.numpy import save_file

    from umv2_jax.models.transformer import convert_block_tree, segment_layout

    start = time.perf_counter()
    if dtype not in (None, "float32", "bfloat16"):
        raise ConfigError(f"--dtype {dtype!r}: pass float32 or bfloat16")
    check_out(out, overwrite)
    run, target = os.path.realpath(workdir), os.path.realpath(out)
    if target == run or target.startswith(run + os.sep):
        raise ConfigError(
            f"--out {out} is inside the run directory {workdir}, which export never writes to; "
            "choose a folder outside it"
        )
    if jax.process_count() > 1:
        raise ConfigError(
            "export runs in a single process (it gathers each tensor to one host); run it on one "
            "host without --distributed (the checkpoint restores onto any device count)"
        )
    config, _, params, rest, restored_step = restore_run(workdir, step)
    model = config.model
    layout = segment_layout(model)
    changes = {}
    if unscanned:
        changes["scan_layers"] = False
    if dtype is not None:
        changes["param_dtype"] = dtype
    exported_model = dataclasses.replace(model, **changes)
    exported = dataclasses.replace(config, model=exported_model)
    target_layout = segment_layout(exported_model)

    params, rest = jax.tree.map(_Lazy, params), jax.tree.map(_Lazy, rest)
    if target_layout != layout:
        params = dict(params, blocks=convert_block_tree(params["blocks"], layout, target_layout))
        if "blocks" in rest:
            rest = dict(rest, blocks=convert_block_tree(rest["blocks"], layout, target_layout))
    tensors = {**flatten(params), **flatten(rest, REST_PREFIX)}
    cast = np.dtype(_numpy_dtype(dtype)) if dtype is not None else None

    def stored_dtype(name: str, leaf: _Lazy) -> np.dtype:
        is_float = np.issubdtype(leaf.dtype, np.floating) or leaf.dtype.name == "bfloat16"
        if cast is not None and not name.startswith(REST_PREFIX) and is_float:
            return cast
        return leaf.dtype

    dtypes = {name: stored_dtype(name, leaf) for name, leaf in tensors.items()}
    sizes = {
        name: int(np.prod(leaf.shape, dtype=np.int64)) * dtypes[name].itemsize
        for name, leaf in tensors.items()
    }
    shards: list[list[str]] = [[]]
    filled = 0
    for name in tensors:
        if shards[-1] and filled + sizes[name] > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += sizes[name]
    count = len(shards)
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    parent = os.path.dirname(os.path.abspath(out))
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
    try:
        weight_map = {}
        for file, names in zip(files, shards):
            arrays = {}
            for name in names:
                array = tensors[name].numpy()
                if array.dtype != dtypes[name]:
                    array = array.astype(dtypes[name])
                arrays[name] = np.array(array, order="C", copy=True)  # keeps 0-d shapes
                weight_map[name] = file
            save_file(arrays, os.path.join(staging, file), metadata={"format": FORMAT})
            del arrays
        metadata = {
            "total_size": sum(sizes.values()),
            "format": FORMAT,
            "step": restored_step,
            "layout": [list(segment) for segment in target_layout],
            "scanned": any(len(segment) > 1 for segment in target_layout),
            "rest_prefix": REST_PREFIX,
        }
        _write_json(
            os.path.join(staging, INDEX_FILE), {"metadata": metadata, "weight_map": weight_map}
        )
        _write_json(os.path.join(staging, CONFIG_FILE), _exported_config(workdir, exported))
        tokenizer_note = _copy_tokenizer(workdir, os.path.join(staging, TOKENIZER_DIR))
        shapes = {name: (tuple(leaf.shape), dtypes[name]) for name, leaf in tensors.items()}
        with open(os.path.join(staging, README_FILE), "w") as handle:
            handle.write(
                _readme(
                    exported,
                    workdir,
                    restored_step,
                    shapes,
                    weight_map,
                    target_layout,
                    tokenizer_note,
                )
            )
        _default_permissions(staging)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "step": restored_step,
        "files": files,
        "tensors": len(tensors),
        "total_size": sum(sizes.values()),
        "seconds": time.perf_counter() - start,
    }


def _default_permissions(directory: str) -> None:
    """Folders 0777 and files 0666 less the umask (mkdtemp made the staging folder 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, folders, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
        del folders


def _require_safetensors() -> None:
    """ConfigError (one line) with the fix when the optional `safetensors` package is missing."""
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise ConfigError(
            "exporting and importing need the safetensors package; pip install 'umv2-jax[export]'"
        ) from None


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float32


def _exported_config(workdir: str, exported) -> dict:
    """The exported Config as a dict, with the run's own `mesh` section (the loaded config's mesh
    was reset to this machine's devices)."""
    data = exported.to_dict()
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as handle:
            data["mesh"] = json.load(handle).get("mesh", data["mesh"])
    except (OSError, ValueError, AttributeError):
        pass
    return data


def _write_json(path: str, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def _copy_tokenizer(workdir: str, target: str) -> str:
    """Copies RUN/tokenizer/ (the tokenizer file and identity.json); a line for the README."""
    source = os.path.join(workdir, TOKENIZER_DIR)
    if not os.path.isdir(source):
        return (
            "The run saved no tokenizer (a task source, or a run from before tokenizers were "
            "saved): `data.tokenizer` in config.json names it."
        )
    shutil.copytree(source, target)
    return (
        f"`{TOKENIZER_DIR}/` is the run's own copy: {', '.join(sorted(os.listdir(target)))} "
        "(identity.json: kind, file, SHA-256, vocabulary size, special ids)."
    )


def _readme(config, workdir, step, shapes, weight_map, layout, tokenizer_note) -> str:
    model = config.model
    lines = [
        f"# {config.name}: umv2-jax export (step {step})",
        "",
        f"Exported from `{os.path.abspath(workdir)}` by `python -m umv2_jax.export`. "
        "Load it with `umv2_jax.export.load_pretrained(DIR)` (JAX, any mesh) or check it without "
        "JAX with `umv2_jax.reference_numpy` (a NumPy forward over these files).",
        "",
        "## Conventions",
        "",
        "- Names are dotted paths of the Flax NNX pure-dict trees. Trainable parameters have no "
        f"prefix; the non-trainable variables a forward pass needs are under `{REST_PREFIX}` "
        "(grid permutations, value-table windows, layer indices, calibration constants).",
        f"- `blocks.S` is segment S of the layout {[list(s) for s in layout]} (block indices per "
        "segment). A segment of several blocks is a scanned stack: its tensors are "
        "`blocks.S.layers.NAME` with a leading [layers] axis (position p = block layout[S][p]); a "
        "single block's tensors have no such axis. `--unscanned` exports write one segment per "
        "block.",
        "- Matmul orientation: x @ W with W [in, …, out] (no transposes): attention "
        "`query/key/value` [d_model, heads, head_dim], `out` [heads, head_dim, d_model]; SwiGLU "
        "`gate/up` [d_model, d_ff], `down` [d_ff, d_model]; the LM head is `embed.T` when "
        "`tie_embeddings` (else `lm_head` [d_model, padded_vocab]).",
        f"- The vocabulary is padded to {model.padded_vocab_size} rows (a multiple of 128); ids "
        f">= {model.vocab_size} are never produced by the tokenizer.",
        "- Numbers the tensors do not carry come from config.json's `model`: `norm_eps` (every "
        "RMSNorm), `rope_theta` (rotate-half RoPE over each head's dims), `qk_norm`, and for "
        "memory layers `memory.rc_topk` (k), `memory.topk` (m), `memory.norm_eps`, "
        "`memory.pre_score_act`. `umv2_jax/reference_numpy.py` is the whole forward pass over "
        "these files in NumPy.",
    ]
    if model.sparse == "moe":
        lines.append(
            "- MoE (replaces the FFN): `sparse.router` [d_model, experts], `sparse.gate/up` "
            "[experts, d_model, d_e], `sparse.down` [experts, d_e, d_model]; softmax router, top "
            "`moe.top_k` experts."
        )
    if model.sparse == "ultramem_v2":
        memory = model.memory
        lines += [
            "- UltraMemV2 (docs/model.md §2–3): `shared.values` [memory layers, n², D_v] and "
            "`shared.pre_values` [memory layers, n², D_p] are stacked over the memory layers; "
            "layer `blocks…sparse` reads the tables `rest.…sparse.window` lists, row "
            "`π(cell) mod (g·n²)` with π = `rest.…sparse.permutation`. Retrieval: "
            "`retrieval.query` [d_model, heads, 2 (row/col), r, D_k], `keys` [heads, 2, N, r, D_k] "
            "(RMS-normalized on the fly with `key_gain`), `cores` [heads, C, r, r]; "
            f"N = {memory.key_expand * memory.effective_keys()} keys per side.",
        ]
    lines += [
        "",
        "## Tensors",
        "",
        "| name | shape | dtype | file |",
        "|---|---|---|---|",
    ]
    for name, (shape, dtype) in shapes.items():
        lines.append(f"| `{name}` | {list(shape)} | {np.dtype(dtype).name} | {weight_map[name]} |")
    lines += ["", "## Tokenizer", "", tokenizer_note, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportIndex:
    """What an export directory holds, read from its index and the shards' headers (no data)."""

    directory: str
    metadata: dict
    weight_map: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


def read_index(directory: str) -> ExportIndex:
    """The index and every shard's header; CheckpointError (one line) for a missing or damaged
    file or a weight_map that does not match the shards."""
    _require_safetensors()
    from safetensors import safe_open

    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a folder; pass an export directory")
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory} has no {INDEX_FILE}; pass a folder written by python -m umv2_jax.export"
        )
    try:
        with open(path) as handle:
            index = json.load(handle)
        weight_map = dict(index["weight_map"])
        metadata = dict(index.get("metadata", {}))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path} is not a valid index ({error}); export the run again"
        ) from None
    shapes, dtypes = {}, {}
    for file in sorted(set(weight_map.values())):
        shard = os.path.join(directory, file)
        if not os.path.isfile(shard):
            names = sorted(n for n, f in weight_map.items() if f == file)
            raise CheckpointError(
                f"{directory} is missing shard {file} (it holds {len(names)} tensors, e.g. "
                f"{names[0]}); copy the whole export folder again"
            )
        try:
            with safe_open(shard, framework="numpy") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    shapes[name] = tuple(piece.get_shape())
                    dtypes[name] = piece.get_dtype()
                    if weight_map.get(name) != file:
                        raise CheckpointError(
                            f"{shard} holds tensor {name} that {INDEX_FILE} does not map to it; "
                            "export the run again"
                        )
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 safetensors raises its own error types
            raise CheckpointError(f"{shard} is unreadable ({error}); copy it again") from None
    for name, file in weight_map.items():
        if name not in shapes:
            raise CheckpointError(
                f"{INDEX_FILE} maps tensor {name} to {file}, which does not hold it; export again"
            )
    return ExportIndex(directory, metadata, weight_map, shapes, dtypes)


def read_config(directory: str, overrides=(), mesh_config: bool = False) -> Any:
    """The exported Config with `overrides` (KEY=VALUE strings) applied; the mesh is reset to
    all local devices on `data` (the run's own mesh rarely fits the reading machine) unless the
    overrides set it."""
    from umv2_jax.config import apply_overrides, config_from_dict

    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; export the run again") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); export the run again") from None
    rules = data.get("mesh", {}).get("rules", {})
    data["mesh"] = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1, "rules": rules}
    apply_overrides(data, list(overrides))
    return config_from_dict(data)


def load_pretrained(directory: str, mesh=None, *, overrides=()) -> tuple[Any, Any, dict, dict]:
    """(config, parts, params, rest) of an export, placed on `mesh` (default: the config's mesh,
    all local devices on `data` unless `overrides` set `mesh.*`).

    Every tensor is read with `safe_open(framework="numpy")` slice by slice into
    `jax.make_array_from_callback` with the parameter's NamedSharding: each device's callback reads
    only its own block, so no host holds more than its devices do. `overrides` (KEY=VALUE) change
    the exported config, e.g. "model.scan_layers=true" regroups an unscanned export into stacks.
    CheckpointError (one line) for a missing shard, a missing, unknown or misshapen tensor.
    """
    from umv2_jax import parallel
    from umv2_jax.models.transformer import segment_layout

    index = read_index(directory)
    source_config = read_config(directory)
    config = read_config(directory, overrides)
    if mesh is None:
        mesh = parallel.make_mesh(config.mesh)
    parts, abstract_params, abstract_rest = abstract_model(config, mesh)
    source_layout = _source_layout(index, source_config)
    targets = {**flatten(abstract_params), **flatten(abstract_rest, REST_PREFIX)}
    sources = sources_for(list(targets), source_layout, segment_layout(config.model))
    _check_fits(index, targets, sources)
    readers = _Readers(directory, index)
    try:
        arrays = {name: _place(readers, sources[name], target) for name, target in targets.items()}
    finally:
        readers.close()
    params = _unflatten_like(abstract_params, arrays, "")
    rest = _unflatten_like(abstract_rest, arrays, REST_PREFIX)
    return config, parts, params, rest


def abstract_model(config, mesh) -> tuple[Any, dict, dict]:
    """(parts, params, rest) with `jax.ShapeDtypeStruct` leaves carrying each variable's
    NamedSharding on `mesh` (its logical axes through `mesh.rules`), nothing allocated: the
    parameter half of `training.state.plan`, without the optimizer (so `train.trainable` and the
    optimizer's settings never matter to an import)."""
    from flax import nnx

    from umv2_jax import parallel
    from umv2_jax.models.transformer import Transformer
    from umv2_jax.training.state import ModelParts, abstract_like

    rules = parallel.resolve_rules(config.mesh.rules)
    abstract = nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(config.train.seed)))
    param_shardings = parallel.state_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    rest_shardings = parallel.state_shardings(nnx.state(abstract, nnx.Not(nnx.Param)), mesh, rules)
    parts, params, rest = ModelParts.split(abstract)
    return parts, abstract_like(params, param_shardings), abstract_like(rest, rest_shardings)


def _source_layout(index: ExportIndex, source_config) -> tuple[tuple[int, ...], ...]:
    """The segment layout the export was written in: its config's, checked against the index."""
    from umv2_jax.models.transformer import segment_layout

    layout = segment_layout(source_config.model)
    saved = index.metadata.get("layout")
    if saved is not None and tuple(tuple(s) for s in saved) != layout:
        raise CheckpointError(
            f"{INDEX_FILE} says layout {saved} but config.json builds "
            f"{[list(s) for s in layout]}; export the run again"
        )
    return layout


def _check_fits(index: ExportIndex, targets: dict, sources: dict[str, Source]) -> None:
    """CheckpointError naming the first tensor the config needs and the export lacks or holds in
    another shape, or the first tensor the export holds that the config does not use."""
    used = set()
    fix = "import with the config the export was written with (its config.json)"
    for name, target in targets.items():
        source = sources[name]
        want = tuple(target.shape)
        part_shape = want[1:] if source.stacked else want
        if source.stacked and want[0] != len(source.parts):
            raise CheckpointError(f"tensor {name}: {want[0]} layers but {len(source.parts)} blocks")
        for source_name, position in source.parts:
            if source_name not in index.shapes:
                target = f" (for {name})" if source_name != name else ""
                raise CheckpointError(
                    f"the export has no tensor {source_name} of shape {list(part_shape)} that "
                    f"the config builds{target}; {fix}"
                )
            used.add(source_name)
            have = index.shapes[source_name]
            got = have[1:] if position is not None else have
            if position is not None and (not have or position >= have[0]):
                got = None
            if got != part_shape:
                per_layer = " per layer" if position is not None else ""
                target = f" (for {name})" if source_name != name else ""
                raise CheckpointError(
                    f"tensor {source_name} has shape {list(have)} but the config builds "
                    f"{list(part_shape)}{per_layer}{target}; {fix}"
                )
    unknown = [name for name in index.shapes if name not in used]
    if unknown:
        raise CheckpointError(
            f"the export holds tensor {unknown[0]} of shape {list(index.shapes[unknown[0]])} that "
            f"the config does not build ({len(unknown)} such); {fix}"
        )


class _Readers:
    """Open safetensors shards, read by slices."""

    def __init__(self, directory: str, index: ExportIndex):
        from safetensors import safe_open

        self.index = index
        self.handles = {}
        for file in sorted(set(index.weight_map.values())):
            context = safe_open(os.path.join(directory, file), framework="numpy")
            self.handles[file] = (context, context.__enter__())

    def read(self, name: str, index: tuple) -> np.ndarray:
        handle = self.handles[self.index.weight_map[name]][1]
        if not index:
            return np.asarray(handle.get_tensor(name))
        return np.asarray(handle.get_slice(name)[index])

    def close(self) -> None:
        for context, _ in self.handles.values():
            context.__exit__(None, None, None)


def _place(readers: _Readers, source: Source, target) -> Any:
    """The target array on its sharding, each device's block read by `readers`."""
    import jax

    shape, dtype = tuple(target.shape), np.dtype(target.dtype)

    def normalize(index: tuple) -> tuple:
        return tuple(
            slice(*s.indices(size)) if isinstance(s, slice) else s for s, size in zip(index, shape)
        )

    def block(index: tuple) -> np.ndarray:
        index = normalize(index)
        if source.stacked:
            layers = range(*index[0].indices(shape[0]))
            pieces = [_read_part(readers, source.parts[p], index[1:]) for p in layers]
            data = np.stack(pieces) if pieces else np.zeros((0, *shape[1:]), dtype)
        else:
            data = _read_part(readers, source.parts[0], index)
        return data if data.dtype == dtype else data.astype(dtype)

    return jax.make_array_from_callback(shape, target.sharding, block)


def _read_part(readers: _Readers, part: tuple[str, int | None], index: tuple) -> np.ndarray:
    name, position = part
    if position is None:
        return readers.read(name, index)
    return readers.read(name, (slice(position, position + 1), *index))[0]


def _unflatten_like(template: Any, arrays: dict[str, Any], prefix: str) -> Any:
    import jax

    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = [arrays[prefix + ".".join(_key(k) for k in path)] for path, _ in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------------------------------------
# Check
# ------------------------------------------------------------------------------------------------


def check_export(directory: str, overrides=(), *, batch: int = 2, seq: int = 0, seed: int = 0):
    """Imports `directory` onto the config's mesh, compares every placed tensor with the file
    (bitwise) and our logits with the NumPy reference forward's on random tokens.

    Returns {"tensors", "bitwise", "devices", "mesh", "max_abs_diff", "max_rel_diff",
    "min_selection_gap", "seconds"}; the logit comparison is None where the reference declines
    the model (it says why in "reference").
    """
    import jax

    from umv2_jax import parallel
    from umv2_jax import reference_numpy as ref
    from umv2_jax.models.transformer import segment_layout

    start = time.perf_counter()
    config = read_config(directory, overrides)
    mesh = parallel.make_mesh(config.mesh)
    config, parts, params, rest = load_pretrained(directory, mesh, overrides=overrides)
    index = read_index(directory)
    source_layout = _source_layout(index, read_config(directory))
    placed = {**flatten(params), **flatten(rest, REST_PREFIX)}
    sources = sources_for(list(placed), source_layout, segment_layout(config.model))
    readers = _Readers(directory, index)
    bitwise = True
    try:
        for name, array in placed.items():
            source = sources[name]
            if source.stacked:
                expected = np.stack([_read_part(readers, p, ()) for p in source.parts])
            else:
                expected = _read_part(readers, source.parts[0], ())
            got = np.asarray(jax.device_get(array))
            if got.dtype != expected.dtype or got.shape != expected.shape:
                bitwise = False
            elif got.tobytes() != expected.tobytes():
                bitwise = False
    finally:
        readers.close()
    report = {
        "tensors": len(index.shapes),
        "bitwise": bitwise,
        "devices": int(mesh.size),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
    }
    seq = seq or min(config.data.seq_len, config.model.max_seq_len, 64)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.model.vocab_size, (batch, seq)).astype(np.int32)
    try:
        tensors, model_config = ref.load(directory)
        reference, info = ref.forward(model_config, tensors, tokens, return_info=True)
    except ref.Unsupported as error:
        report.update(reference=str(error), max_abs_diff=None, max_rel_diff=None)
    else:
        with parallel.use_mesh(mesh):
            logits = jax.jit(lambda p, r, t: parts.build(p, r)(t)[0])(params, rest, tokens)
        logits = np.asarray(jax.device_get(logits), np.float64)
        diff = np.abs(logits - reference)
        report.update(
            reference="numpy",
            max_abs_diff=float(diff.max()),
            max_rel_diff=float(diff.max() / max(np.abs(reference).max(), 1e-30)),
            min_selection_gap=info.get("min_gap"),
        )
    report["seconds"] = time.perf_counter() - start
    return report


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; pass a saved step")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _gap(gap) -> str:
    return "" if gap is None else f" (smallest top-k selection gap {gap:.3g})"


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m umv2_jax.export",
        description="Export a run's weights as safetensors (--workdir --out), or read an export "
        "back and check it (--from --check).",
    )
    parser.add_argument("--workdir", help="a run directory written by train.py (read only)")
    parser.add_argument("--out", help="the export folder to write (absent or empty)")
    parser.add_argument("--step", type=_step, default=None, help="a saved step (default: latest)")
    parser.add_argument(
        "--unscanned", action="store_true", help="one tensor per block (no [layers] axis)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="cast the floating parameters (default: as trained; rest keeps its dtypes)",
    )
    parser.add_argument(
        "--shard-size",
        type=_size,
        default=DEFAULT_SHARD_SIZE,
        metavar="SIZE",
        help="largest shard file, e.g. 2GB (default), 500MB; a larger tensor gets a file alone",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--from", dest="source", metavar="DIR", help="an export folder to read")
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --from: import onto the mesh, compare tensors bitwise and logits with the "
        "NumPy reference forward",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --from: override the exported config (mesh.fsdp=4, model.scan_layers=true)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = parser.parse_args(argv)
    if (args.workdir is None) == (args.source is None):
        parser.error("pass either --workdir RUN --out DIR (export) or --from DIR --check (import)")
    try:
        if args.workdir is not None:
            if args.out is None:
                parser.error("--workdir needs --out DIR")
            if args.check or args.set:
                parser.error("--check and --set go with --from")
            summary = export_run(
                args.workdir,
                args.out,
                step=args.step,
                unscanned=args.unscanned,
                dtype=args.dtype,
                shard_size=args.shard_size,
                overwrite=args.overwrite,
            )
            if args.json:
                print(json.dumps(summary))
            else:
                print(
                    f"exported step {summary['step']}: {summary['tensors']} tensors, "
                    f"{summary['total_size'] / 2**20:.2f} MiB in {len(summary['files'])} file(s) "
                    f"to {args.out} ({summary['seconds']:.1f} s)"
                )
            return 0
        if args.out or args.step is not None or args.unscanned or args.dtype or args.overwrite:
            parser.error("--out, --step, --unscanned, --dtype and --overwrite go with --workdir")
        if not args.check:
            parser.error("--from needs --check (load_pretrained(DIR) imports from Python)")
        report = check_export(args.source, args.set)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"imported {report['tensors']} tensors onto {report['devices']} device(s) "
            f"{report['mesh']}: bitwise {'equal' if report['bitwise'] else 'DIFFERENT'}"
        )
        if report["max_abs_diff"] is None:
            print(f"reference forward: skipped ({report['reference']})")
        else:
            print(
                f"NumPy reference forward: max |Δlogit| {report['max_abs_diff']:.3g}, relative "
                f"{report['max_rel_diff']:.3g}{_gap(report['min_selection_gap'])}"
            )
        print(f"({report['seconds']:.1f} s)")
    return 0 if report["bitwise"] else 1


if __name__ == "__main__":
    sys.exit(main())
