"""Checks before any model is built: can this machine hold the run?

    sizes = preflight.check(config, workdir, mesh)   # ResourceError (one line, exit 2) if not

Nothing is allocated and nothing is written. In order:

1. the work directory is a directory, or can be created as one, and is writable, its name is UTF-8
   (orbax cannot save under other names), and the files a resume appends to are writable;
2. one training step fits the device memory: parameters, gradients, optimizer state, the other
   variables and an activation estimate, per device under the most favourable sharding the mesh
   allows (so a run that could fit is never refused), against the device's reported limit
   (`memory_stats()["bytes_limit"]`) or, on CPU, the machine's available RAM (`MemAvailable` in
   /proc/meminfo) for all of this process's devices together;
3. its filesystem has room for two checkpoints (the one being written while the previous one is
   kept): parameters + optimizer state + the other variables, from abstract shapes, plus orbax's
   per-array metadata (about 2 KiB an array).

The activation estimate is coarse on purpose (float32, no rematerialization, per micro-batch): per
layer and token 16·d_model + 2·(FFN width) + 2·heads·seq (attention probabilities; seq capped at
model.attention_chunk unless model.attention is xla) numbers, plus a sparse layer's scores over its
keys (2 · heads · rank · keys per side) or its experts' hidden units, and 3 · vocab for the logits
(vocab capped at model.loss_vocab_chunk). It catches the runs that cannot fit by far, not the last 10%.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from flax import nnx

from umv2_jax.config import Config, ModelConfig
from umv2_jax.errors import ResourceError, show

CHECKPOINTS_NEEDED = 2
METADATA_BYTES_PER_ARRAY = 2048  # orbax's _METADATA, _sharding and array metadata, measured
MEMINFO = "/proc/meminfo"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Bytes of one run's state (whole model, unsharded) and of one step's activations."""

    params: int
    optimizer: int
    rest: int
    arrays: int  # leaves in a checkpoint
    activations: int  # one micro-batch, whole batch (divide by the batch shards)

    @property
    def checkpoint(self) -> int:
        state = self.params + self.optimizer + self.rest
        return state + METADATA_BYTES_PER_ARRAY * self.arrays

    @property
    def state(self) -> int:
        """Parameters, gradients, optimizer state and the other variables."""
        return 2 * self.params + self.optimizer + self.rest


def check(config: Config, workdir: str, mesh: jax.sharding.Mesh, resume: bool = True) -> Sizes:
    """Raises ResourceError with the numbers and the fix if `workdir` or this machine cannot hold
    the run; otherwise returns the sizes it checked. `resume=False`: the previous run's files will
    be deleted, so only the directory needs to be writable."""
    existing = check_workdir(workdir, resume)
    sizes = estimate(config)
    check_memory(sizes, mesh)
    check_disk(existing, sizes)
    return sizes


def check_workdir(workdir: str, resume: bool = True) -> str:
    """The directory the run's files would be created in: `workdir` itself or its nearest
    existing ancestor. ResourceError if that is not a directory or is not writable."""
    workdir = os.path.abspath(workdir)
    try:
        workdir.encode("utf-8")
    except UnicodeEncodeError as error:  # a name of raw bytes, e.g. from a Latin-1 shell
        byte = os.fsencode(workdir[error.start : error.end])[:1].hex()
        raise ResourceError(
            f"--workdir {show(workdir)} is not UTF-8 (it holds the byte 0x{byte}); checkpoints "
            "cannot be saved under such a path: pass a --workdir whose name is UTF-8"
        ) from None
    existing = workdir
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is not a directory" if existing == workdir else f"is inside the file {existing}"
        raise ResourceError(f"--workdir {workdir} {what}; pass a directory")
    targets = [existing] + [
        path
        for path in (os.path.join(workdir, "checkpoints"),)
        if existing == workdir and os.path.isdir(path)
    ]
    for path in targets:
        if not os.access(path, os.W_OK | os.X_OK):
            hint = "" if path == workdir else f" (the run would create {workdir} there)"
            raise ResourceError(
                f"{path} is not writable{hint}; pass a writable --workdir or fix its permissions"
            )
    if resume and existing == workdir:  # the files a resumed run appends to or rewrites in place
        for name, mode in (
            ("metrics.jsonl", os.W_OK),
            ("loss.png", os.W_OK),
            ("tensorboard", os.W_OK | os.X_OK),
        ):
            path = os.path.join(workdir, name)
            if os.path.lexists(path) and not os.access(path, mode):
                raise ResourceError(
                    f"{path} is not writable; fix its permissions (or pass --no-resume to start "
                    "over, deleting it) or use another --workdir"
                )
    return existing


def check_disk(directory: str, sizes: Sizes) -> None:
    """ResourceError if `directory`'s filesystem has less room than two checkpoints."""
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    needed = CHECKPOINTS_NEEDED * sizes.checkpoint
    if free < needed:
        raise ResourceError(
            f"the disk of {directory} has {_bytes(free)} free, but {CHECKPOINTS_NEEDED} "
            f"checkpoints of this model need {_bytes(needed)} ({_bytes(sizes.checkpoint)} each); "
            "free disk space or pass a --workdir on a larger disk"
        )


def check_memory(sizes: Sizes, mesh: jax.sharding.Mesh) -> None:
    """ResourceError if one step's state and activations exceed the device memory."""
    shape = dict(mesh.shape)
    parameter_shards = max(1, mesh.size // shape.get("data", 1))  # fsdp × tensor × expert
    batch_shards = max(1, shape.get("data", 1) * shape.get("fsdp", 1))
    state = math.ceil(sizes.state / parameter_shards)
    activations = math.ceil(sizes.activations / batch_shards)
    device = jax.local_devices()[0]
    limit, source = device_memory(device)
    if limit is None:
        return
    devices = len(jax.local_devices()) if device.platform == "cpu" else 1
    needed = devices * (state + activations)
    if needed > limit:
        per = f" on each of {devices} devices" if devices > 1 else ""
        raise ResourceError(
            f"the model needs about {_bytes(needed)} of memory (params {_bytes(sizes.params)} "
            f"+ gradients {_bytes(sizes.params)} + optimizer state {_bytes(sizes.optimizer)} "
            f"+ other variables {_bytes(sizes.rest)}, sharded {parameter_shards}-way, + "
            f"activations {_bytes(activations)}{per}), but {device.platform} has {_bytes(limit)} "
            f"({source}); shrink the model (e.g. model.memory.n_keys, model.d_model) or "
            "train.batch_size (or raise train.micro_batches), or shard it over more devices"
        )


def device_memory(device: jax.Device) -> tuple[int | None, str]:
    """(bytes, where the number comes from): the device's limit, or the host's available RAM."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 some back ends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), "free device memory"
    available = _meminfo_available()
    if available is not None:
        return available, f"MemAvailable in {MEMINFO}"
    return None, "unknown"


def estimate(config: Config) -> Sizes:
    """Sizes of `config`'s run from abstract shapes (`models.abstract.abstract_model`)."""
    from umv2_jax.models.abstract import abstract_model
    from umv2_jax.training.optimizer import make_optimizer, parameter_labels

    abstract = abstract_model(config.model)
    params_state = nnx.state(abstract, nnx.Param)
    params = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params_state.to_pure_dict()
    )
    rest = jax.tree.leaves(nnx.state(abstract, nnx.Not(nnx.Param)).to_pure_dict())
    if config.train.trainable == "rows":  # its moments cover chosen rows only: values bounds them
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, trainable="values")
        )
    optimizer = make_optimizer(config, parameter_labels(params_state))
    opt_state = jax.tree.leaves(jax.eval_shape(optimizer.init, params))
    param_leaves = jax.tree.leaves(params)
    return Sizes(
        params=_tree_bytes(param_leaves),
        optimizer=_tree_bytes(opt_state),
        rest=_tree_bytes(rest) + 4,  # + the step counter
        arrays=2 * len(param_leaves) + len(opt_state) + len(rest) + 1,
        activations=activation_bytes(config),
    )


def activation_bytes(config: Config) -> int:
    """The module docstring's coarse estimate for one micro-batch (float32 numbers)."""
    model = config.model
    seq = config.data.seq_len
    tokens = max(1, config.train.batch_size // max(1, config.train.micro_batches)) * seq
    # Chunked / fused attention holds scores for one key block per query; the plain one, all keys.
    attended = seq if model.attention == "xla" else min(seq, model.attention_chunk)
    per_layer = 16 * model.d_model + 2 * model.d_ff + 2 * model.num_heads * attended
    sparse = _sparse_numbers_per_token(model)
    layers = model.num_layers
    sparse_layers = len(model.sparse_layer_indices()) if model.sparse != "none" else 0
    columns = min(model.vocab_size, model.loss_vocab_chunk or model.vocab_size)  # logits chunk
    numbers = tokens * (layers * per_layer + sparse_layers * sparse + 3 * columns)
    return 4 * numbers


def _sparse_numbers_per_token(model: ModelConfig) -> int:
    if model.sparse == "moe":
        moe = model.moe
        return 3 * moe.top_k * moe.expert_d_ff + moe.num_experts
    section = {
        "ultramem_v2": "memory",
        "ultramem": "ultramem",
    }.get(model.sparse, "product_key")
    memory = getattr(model, section, None)
    if memory is None:
        return 0
    heads = getattr(memory, "heads", 1)
    rank = getattr(memory, "tucker_rank", 1) or 1
    keys = getattr(memory, "n_keys", 0)
    topk = getattr(memory, "topk", 0)
    width = getattr(memory, "value_dim", 0) + getattr(memory, "pre_value_dim", 0)
    return heads * (2 * 2 * rank * keys + topk * (width + 2))


def _tree_bytes(leaves) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def _meminfo_available() -> int | None:
    try:
        with open(MEMINFO) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"
