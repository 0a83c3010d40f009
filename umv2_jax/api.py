"""The Python API a notebook needs, in one place (re-exported lazily by `umv2_jax`).

    import umv2_jax as u
    config = u.load_config("configs/tiny_umv2.yaml", ["train.steps=200"])
    model = u.build_model(config)                     # one compiled init program
    logits, aux = model(tokens)                       # int32 [batch, seq] → fp32 [batch, seq, vocab]
    run = u.train(config, "runs/tiny")                # → Run: config, model, losses, eval, workdir
    print(u.generate_text(run, "The ", max_new_tokens=32))
    print(u.evaluate_run(run)["metrics"]["eval_loss"])
    run = u.load_run("runs/tiny")                     # a finished run, again

Each function is a thin layer over the module that does the work (named in its docstring); the
command-line tools call the same modules. Generation and evaluation are `generate_text` and
`evaluate_run`: `umv2_jax.generate` and `umv2_jax.evaluate` are the command-line modules
(`python -m umv2_jax.generate`), and a package attribute cannot be both the module and a function.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from umv2_jax.config import Config, load_config
from umv2_jax.models.build import build_model

__all__ = [
    "Run",
    "build_model",
    "evaluate_run",
    "generate_text",
    "load_config",
    "load_run",
    "train",
]


@dataclasses.dataclass
class Run:
    """A trained model and where it came from.

    config:  the run's `Config`
    model:   the `Transformer` (tokens int32 [batch, seq] → logits fp32 [batch, seq, padded_vocab])
    step:    the training step of its parameters
    workdir: the run directory (checkpoints, metrics.jsonl, config.json)
    losses:  the training loss of each step this process ran (empty for `load_run`)
    eval:    the last evaluation's metrics (eval_loss, eval_bpb, …; empty if none ran)
    """

    config: Config
    model: Any
    step: int
    workdir: str
    losses: list[float] = dataclasses.field(default_factory=list)
    eval: dict[str, float] = dataclasses.field(default_factory=dict)

    def parts(self) -> tuple[Any, dict, dict]:
        """(ModelParts, params, rest): the pure-dict form the jitted steps and tools take."""
        from umv2_jax.training.state import ModelParts

        return ModelParts.split(self.model)


def train(
    config: Config,
    workdir: str | os.PathLike | None = None,
    *,
    steps: int | None = None,
    resume: bool = True,
    progress: bool = False,
    echo: Callable[[str], None] | None = print,
) -> Run:
    """Trains `config` for `config.train.steps` steps (or `steps`) and returns the trained `Run`.

    The same loop as `python train.py` (`umv2_jax.training.loop.train`): a run directory with
    checkpoints, metrics.jsonl and the loss plot in `workdir` (default: a fresh temporary folder);
    an existing run there of the same model resumes unless `resume=False`. `echo` receives the log
    lines (None: silent); `progress` shows the progress bar.
    """
    from umv2_jax.training.loop import train as train_loop

    if steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))
        config.validate()
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="umv2_run_")
    result = train_loop(
        config,
        os.fspath(workdir),
        resume=resume,
        progress=progress,
        echo=echo if echo is not None else (lambda line: None),
    )
    run = load_run(result.workdir)
    run.losses = list(result.losses)
    run.eval = dict(result.eval)
    return run


def load_run(path: str | os.PathLike, step: int | None = None) -> Run:
    """The run in directory `path` at its newest readable checkpoint (or `step`), on the default
    devices (`umv2_jax.training.restore.load_params`; never reads the optimizer state).

    A missing or unreadable run raises CheckpointError (a one-line UserError)."""
    from umv2_jax.training.restore import load_params

    config, parts, params, rest, saved_step = load_params(os.fspath(path), step)
    return Run(config, parts.build(params, rest), int(saved_step), os.path.abspath(path))


def generate_text(
    run: Run,
    prompt: str | bytes,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The text `run.model` writes after `prompt` (BOS-prefixed, tokenized by the config's
    tokenizer), up to `max_new_tokens` tokens or EOS, with a KV cache of `data.seq_len` slots.

    temperature 0 is greedy; otherwise sampling from the `top_k` most likely tokens (0: all)
    within nucleus `top_p` (`umv2_jax.generate.generate`). `run` may be any object with `config`
    (a Config) and `model` (its Transformer), e.g. `Run(config, build_model(config), 0, "")`.
    """
    from umv2_jax.generate import generate as generate_text
    from umv2_jax.training.state import ModelParts

    parts, params, rest = ModelParts.split(run.model)
    return generate_text(
        run.config, parts, params, rest, prompt, max_new_tokens, temperature, top_k, seed, top_p
    )


def evaluate_run(
    run: Run,
    batches: Sequence[dict[str, np.ndarray]] | None = None,
    *,
    max_tokens: int | None = None,
    row_usage: bool = False,
) -> dict[str, Any]:
    """Held-out metrics of `run.model` (`umv2_jax.evaluate.evaluate`).

    batches: dicts of int32 [batch, seq] arrays ("tokens", "targets", "loss_mask", …); default the
        config's evaluation batches (`train.eval_batches` of them, or `max_tokens` worth).
    Returns {"metrics": {eval_loss, eval_bpb, …}, "tokens", "bytes", "perplexity", "row_counts":
    {block: int64 [window rows]} (filled with `row_usage`: how many tokens read each value row)}.
    """
    from umv2_jax import evaluate as evaluate_lib
    from umv2_jax.training.state import ModelParts

    if batches is None:
        batches = evaluate_lib.eval_batches(run.config, max_tokens)
    parts, params, rest = ModelParts.split(run.model)
    return evaluate_lib.evaluate(
        run.config, parts, params, rest, list(batches), row_usage=row_usage
    )


load_config = load_config  # re-exported: a YAML path (or a packaged name, where supported)
build_model = build_model  # re-exported: umv2_jax.models.build
