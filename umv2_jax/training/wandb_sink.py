"""Optional Weights & Biases logging of the trainer's metrics (`train.wandb_project`, `--wandb`).

    sink = WandbSink.open(config, workdir, start_step)   # None when train.wandb_project is unset
    sink.add_scalars(step, {"loss": 2.3, "tokens_per_s": 1.2e5})
    sink.close()

Every number `MetricsWriter` writes to metrics.jsonl is logged at its step. The W&B run lives in
WORKDIR/wandb/ (offline runs: WORKDIR/wandb/offline-run-*, upload later with `wandb sync`); its id
is kept in WORKDIR/wandb_run_id, so a resumed run continues the same W&B run. The mode is
`train.wandb_mode` unless the WANDB_MODE environment variable says otherwise.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from umv2_jax.errors import ConfigError

RUN_ID_FILE = "wandb_run_id"


def check_available(project: str | None) -> None:
    """ConfigError (one line) if W&B logging is asked for and `wandb` is not installed."""
    if project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"config 'train.wandb_project': {project!r} asks for Weights & Biases logging and "
            "the wandb package is not installed; pip install 'umv2-jax[wandb]' (or unset it)"
        ) from None


class WandbSink:
    def __init__(self, run):
        self._run = run

    @classmethod
    def open(
        cls, config, workdir: str, start_step: int, config_dict: dict[str, Any]
    ) -> WandbSink | None:
        """Starts (or, for a resumed run, continues) the W&B run of `workdir`; None if unset."""
        train = config.train
        if train.wandb_project is None:
            return None
        check_available(train.wandb_project)
        import wandb

        id_path = os.path.join(workdir, RUN_ID_FILE)
        run_id = None
        if start_step > 0 and os.path.isfile(id_path):
            with open(id_path) as handle:
                run_id = handle.read().strip() or None
        if run_id is None:
            run_id = secrets.token_hex(4)
            with open(id_path, "w") as handle:
                handle.write(run_id + "\n")
        run = wandb.init(
            project=train.wandb_project,
            entity=train.wandb_entity,
            mode=os.environ.get("WANDB_MODE", train.wandb_mode),
            name=config.name,
            id=run_id,
            resume="allow",
            dir=workdir,
            config=config_dict,
        )
        return cls(run)

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()
