"""Multi-process (multi-host) runs: joining `jax.distributed`, and each process's share of a batch.

    launch = resolve(coordinator="10.0.0.1:8476", num_processes=2, process_id=0)  # or from env
    initialize(launch)                # before anything touches a JAX backend; None: one process
    index, count = batch_share(mesh)  # this process feeds block `index` of `count` of each batch

Where a launch comes from, first match wins, field by field:
    flags       --coordinator HOST:PORT --num-processes N --process-id I [--local-device-ids 0,1]
    environment JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS
    SLURM       an `srun` step of more than one task: JAX reads SLURM_* (coordinator = first node)
    --distributed  JAX's own cluster detection (Cloud TPU VMs, SLURM, Open MPI, Kubernetes)
Nothing of these (or one process) is a plain single-process run. A launch of several processes
that names no coordinator and asks for no detection is a ConfigError: every process would wait
for a coordinator nobody started.

CPU processes exchange collectives through gloo (`jax_cpu_collectives_implementation`); the
setting only affects the CPU client, so it is set for every launch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from umv2_jax.errors import ConfigError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
# What JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py), plus the step's task count
# that `srun` sets: a batch script itself (one task) is not a multi-process launch.
SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
SLURM_STEP_TASKS = "SLURM_STEP_NUM_TASKS"


@dataclasses.dataclass(frozen=True)
class Launch:
    """How to call `jax.distributed.initialize`; a None field is left to JAX's cluster detection."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    source: str  # "flags", "environment", "SLURM" or "cluster detection", for the run summary

    def describe(self) -> str:
        parts = [f"{self.source}"]
        if self.coordinator:
            parts.append(f"coordinator {self.coordinator}")
        if self.num_processes is not None:
            parts.append(f"process {self.process_id} of {self.num_processes}")
        return ", ".join(parts)


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    *,
    detect: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Launch | None:
    """The launch the flags (these arguments) and the environment ask for; None: one process.

    ConfigError (one line, naming the flag or variable and the fix) for an unusable combination:
    several processes without a coordinator, a process id outside [0, N), a non-integer count.
    """
    env = os.environ if environ is None else environ
    flags = (coordinator, num_processes, process_id, local_device_ids)
    from_flags = any(value is not None for value in flags)
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(env, ENV_NUM_PROCESSES, "--num-processes")
    if process_id is None:
        process_id = _env_int(env, ENV_PROCESS_ID, "--process-id")
    if local_device_ids is None:
        local_device_ids = env.get(ENV_LOCAL_DEVICE_IDS) or None
    devices = _device_ids(local_device_ids)
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes {num_processes}: must be >= 1")
    if process_id is not None and process_id < 0:
        raise ConfigError(f"--process-id {process_id}: must be >= 0")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ConfigError(
            f"--process-id {process_id} is not below --num-processes {num_processes}; number the "
            f"processes 0 … {num_processes - 1}"
        )
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    source = "flags" if from_flags else "environment"
    slurm = _slurm_step(env)
    if not explicit:
        if detect:
            return Launch(None, None, None, devices, "cluster detection")
        if slurm:
            return Launch(None, None, None, devices, "SLURM")
        return None
    if num_processes == 1 and coordinator is None:
        return None  # one process, said explicitly: nothing to join
    if coordinator is None and not (detect or slurm):
        count = num_processes if num_processes is not None else "several"
        raise ConfigError(
            f"a launch of {count} processes (--num-processes / {ENV_NUM_PROCESSES}) has no "
            f"coordinator: pass --coordinator HOST:PORT (process 0's address, the same on every "
            f"process) or set {ENV_COORDINATOR}; on Cloud TPU VMs or Open MPI pass --distributed "
            "to let JAX detect the cluster"
        )
    if coordinator is not None and not detect and not slurm:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"--coordinator {coordinator!r} is not HOST:PORT; pass e.g. "
                "--coordinator 10.0.0.1:8476 (process 0's address and a free port)"
            )
        missing = [
            flag
            for flag, value in (("--num-processes", num_processes), ("--process-id", process_id))
            if value is None
        ]
        if missing:
            raise ConfigError(
                f"--coordinator {coordinator} needs {' and '.join(missing)} too (or "
                f"{ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); give every process the same count and "
                "its own id"
            )
    return Launch(coordinator, num_processes, process_id, devices, source)


def initialize(launch: Launch | None, *, timeout_s: int = 300) -> None:
    """Joins the launch's processes (`jax.distributed.initialize`); nothing for None.

    Must run before any JAX backend is initialized (before `jax.devices()`). Then sets gloo as the
    CPU collectives. A launch that cannot join (no cluster found, a coordinator that does not
    answer within `timeout_s`) raises ConfigError.
    """
    if launch is None:
        return
    import jax

    if jax.distributed.is_initialized():  # joined already (a second `main` in one process)
        return
    try:
        jax.distributed.initialize(
            coordinator_address=launch.coordinator,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            local_device_ids=list(launch.local_device_ids) if launch.local_device_ids else None,
            initialization_timeout=timeout_s,
        )
    except (ValueError, RuntimeError) as error:  # jax's detection / connection failures
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if launch.coordinator is None and "coordinator_address" in text:
            raise ConfigError(
                f"{launch.source} found no cluster to join (no Cloud TPU slice, SLURM step, Open "
                "MPI or Kubernetes job here); pass --coordinator HOST:PORT --num-processes N "
                "--process-id I, or drop --distributed for a one-process run"
            ) from None
        raise ConfigError(
            f"could not join the distributed run ({launch.describe()}): {text[:200]}; check that "
            "every process got the same --coordinator and --num-processes and its own --process-id"
        ) from None
    # Read when the CPU client is created (after this, at the first device query): CPU processes
    # exchange collectives through gloo. Other platforms' clients ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def batch_share(mesh) -> tuple[int, int]:
    """(index, count): this process feeds rows [index·B/count, (index+1)·B/count) of a batch.

    The batch dimension is split over the mesh's batch axes (`parallel.batch_spec`); a process
    must supply exactly the rows its own devices hold. Processes whose devices hold the same rows
    (e.g. when `tensor` spans hosts) get the same index and read the same data. ValueError if a
    process's devices hold rows that are not one contiguous block of the same size everywhere (a
    hand-made device order; `make_mesh` never builds one).
    """
    import jax

    return _batch_share(mesh.devices, mesh.axis_names, jax.process_index())


def _batch_share(devices: np.ndarray, axis_names: Sequence[str], process: int) -> tuple[int, int]:
    from umv2_jax.parallel.mesh import BATCH_AXES

    names = list(axis_names)
    batch = [names.index(a) for a in BATCH_AXES if a in names]  # split order of the batch dim
    sizes = [devices.shape[i] for i in batch]
    shards: dict[int, set[int]] = {}
    for coords in np.ndindex(devices.shape):
        shard = int(np.ravel_multi_index([coords[i] for i in batch], sizes)) if batch else 0
        shards.setdefault(devices[coords].process_index, set()).add(shard)
    total = int(np.prod(sizes, dtype=np.int64)) if batch else 1
    per_process = {len(s) for s in shards.values()}
    mine = sorted(shards[process])
    width = len(mine)
    if len(per_process) != 1 or any(
        min(s) % width or max(s) - min(s) + 1 != width for s in shards.values()
    ):
        raise ValueError(
            f"the processes' devices hold batch shards {sorted(map(sorted, shards.values()))} of "
            f"{total}: not equal contiguous blocks; build the mesh with parallel.make_mesh"
        )
    return mine[0] // width, total // width


def _env_int(env: Mapping[str, str], name: str, flag: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer (it stands for {flag})") from None


def _device_ids(value: Sequence[int] | str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ConfigError(
                f"--local-device-ids {value!r} is not a comma-separated list of integers, "
                "e.g. 0,1,2,3"
            ) from None
    return tuple(int(v) for v in value)


def _slurm_step(env: Mapping[str, str]) -> bool:
    """Inside an `srun` step of several tasks (where JAX's SLURM detection has all it needs)."""
    try:
        tasks = int(env.get(SLURM_STEP_TASKS, "1"))
    except ValueError:
        return False
    return tasks > 1 and all(name in env for name in SLURM_VARS)
