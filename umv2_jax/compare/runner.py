"""One run of a comparison: train a model on a task in process, evaluate it on the task's tests.

    programs = Programs(config, vocab_size)     # jitted init / train step / eval, reused across seeds
    result = train_and_evaluate(programs, task, spec, seed, on_step=bar.update)

The training step is the project's own (`umv2_jax.training.step.make_train_step` over
`umv2_jax.training.state` parts and `make_optimizer`), run without checkpoints: a run is a few
hundred steps, and a finished run is saved whole by the caller (one file per run). Batches come
straight from the task's generator: train batch i of seed k is `task.batch(B, S, seed=k, index=i)`,
the same for every model (paired seeds). Initialization is jitted once per model shape with the seed
as an argument, so the seeds of one model share one compilation.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umv2_jax.config import Config
from umv2_jax.eval import metrics as task_metrics
from umv2_jax.models.build import compile_once
from umv2_jax.models.transformer import Transformer
from umv2_jax.training.optimizer import make_optimizer, parameter_labels
from umv2_jax.training.state import ModelParts
from umv2_jax.training.step import document_kwargs, make_train_step, token_losses

DEVICE_KEYS = ("inputs", "targets", "loss_mask")
# A packed batch's document ids and in-document positions, sent along where a batch has them.
DOCUMENT_KEYS = ("segment_ids", "positions")


def device_batch(batch: dict[str, Any]) -> dict[str, jax.Array]:
    """The arrays the compiled steps read: DEVICE_KEYS, and DOCUMENT_KEYS where `batch` has them."""
    return {key: jnp.asarray(batch[key]) for key in DEVICE_KEYS + DOCUMENT_KEYS if key in batch}


class Programs:
    """The jitted programs of one model config (its seed is ignored: `init(seed)` takes it).

    init(seed) → (params, rest) pure dicts; optimizer: the config's update rule;
    train_step(state, rest, batch) → (state, metrics) with the state donated;
    evaluate(params, rest, batch) → (predictions int32 [B, S], losses fp32 [B, S] in nats,
    range_bits fp32 [B, S]: cross entropy in bits over the `token_range=(lo, hi)` tokens only
    (default: the whole vocabulary; the range is data, one compilation serves every range),
    aux metrics {name: fp32 scalar}).
    """

    def __init__(
        self,
        config: Config,
        vocab_size: int,
        *,
        row_mask: Any = None,
    ):
        self.config = config
        self.vocab_size = vocab_size
        model_config = config.model
        abstract = nnx.eval_shape(lambda: Transformer(model_config, nnx.Rngs(0)))
        self.parts, _, _ = ModelParts.split(abstract)
        self.labels = parameter_labels(nnx.state(abstract, nnx.Param))
        self.optimizer = make_optimizer(config, self.labels, row_mask)

        @jax.jit
        def init(seed):
            # nnx.Rngs(k) with an int k draws from jax.random.key(k): the same numbers as state.build.
            rngs = nnx.Rngs(jax.random.key(seed))
            _, params, rest = ModelParts.split(Transformer(model_config, rngs))
            return params, rest

        self._init = init
        self._init_compiled = None
        # Dropout keys are the only use of the step's seed; the compared configs have no dropout.
        self.train_step = jax.jit(
            make_train_step(self.parts, self.optimizer, config.train.micro_batches, 0),
            donate_argnums=(0,),
        )
        parts = self.parts

        @jax.jit
        def evaluate(params, rest, batch, bounds):
            # bounds: int32[2], the [lo, hi) token range as data, so every range (the fact
            # base's objects, the whole vocabulary) shares one compilation.
            model = parts.build(params, rest)
            logits, aux = model(
                batch["inputs"], deterministic=True, diagnostics=True, **document_kwargs(batch)
            )
            logits = logits[..., :vocab_size]  # the padded vocabulary is never a prediction
            losses = token_losses(logits, batch["targets"])
            ids = jnp.arange(vocab_size)
            inside = (ids >= bounds[0]) & (ids < bounds[1])
            ranged = jnp.where(inside, logits.astype(jnp.float32), -1e30)  # exp() → 0 outside
            in_range = jnp.clip(batch["targets"], bounds[0], bounds[1] - 1)
            range_bits = token_losses(ranged, in_range) / jnp.log(2.0)
            predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return predictions, losses, range_bits, aux.metrics, aux.row_hits

        self._evaluate = evaluate

    def evaluate(self, params, rest, batch, token_range=None):
        """(predictions, losses, range_bits, aux metrics, row hits) of one batch (class doc)."""
        lo, hi = token_range if token_range is not None else (0, self.vocab_size)
        return self._evaluate(params, rest, batch, jnp.asarray([lo, hi], jnp.int32))

    def init(self, seed: int) -> tuple[dict, dict]:
        if self._init_compiled is None:  # one program for every seed (the seed is data)
            self._init_compiled = compile_once(self._init, jnp.int32(0))
        return self._init_compiled(jnp.int32(seed))

    def initial_state(self, params: dict) -> dict[str, Any]:
        return {
            "params": params,
            "opt_state": self.optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
        }


class ProgramCache:
    """Programs per distinct config (its name and seed aside) and row mask: one compilation serves
    every seed and every task of one shape."""

    def __init__(self):
        self._programs: dict[str, Programs] = {}

    def get(self, config: Config, row_mask: Any = None) -> Programs:
        data = config.to_dict()
        data.pop("name")
        data["train"].pop("seed")
        mask = None if row_mask is None else np.asarray(row_mask, bool).tobytes().hex()
        key = json.dumps([data, mask], sort_keys=True)
        if key not in self._programs:
            self._programs[key] = Programs(config, config.model.vocab_size, row_mask=row_mask)
        return self._programs[key]


@dataclasses.dataclass
class RunOutput:
    curve: list[dict[str, float]]  # {step, loss, lm_loss, tokens, flops, wall_s}
    records: list[dict[str, Any]]  # {metric, slice, value, split}
    wall_s: float  # the whole run: training (compile included) and evaluation
    train_s: float
    first_step_s: float  # the first step (compilation, mostly)
    params: dict | None = None  # the trained parameters when asked for (injection)
    rest: dict | None = None


def train(
    programs: Programs,
    state: dict,
    rest: dict,
    batches: Callable[[int], dict[str, np.ndarray]],
    steps: int,
    *,
    log_every: int,
    flops_per_token: float,
    on_step: Callable[[int], None] | None = None,
    start_step: int = 0,
    probe: Callable[[dict], dict[str, float]] | None = None,
    probe_every: int = 0,
    digest: Any = None,
) -> tuple[dict, list[dict[str, float]], float, float]:
    """`steps` train steps on `batches(i)`; (state, curve, train seconds, first-step seconds).

    Every `log_every` steps (and the last) the curve gets {step, loss, lm_loss, tokens, flops,
    wall_s}. With `probe` (params → {name: value}, e.g. held-out metrics) and `probe_every` > 0,
    the points at multiples of `probe_every` and the last step also get the probe's values under
    "test/<name>"; the probe's own time is left out of wall_s and of the returned train seconds
    (the curves are against training time). `digest`: a hashlib object updated with every
    batch's inputs and targets, in order (seed pairing is checked with it).
    """
    curve: list[dict[str, float]] = []
    pending: list[tuple[int, Any]] = []
    tokens = 0
    start = time.perf_counter()
    first_step_s = 0.0
    probe_s = 0.0

    def flush() -> None:
        for (step, seen, elapsed, _), values in zip(
            pending, jax.device_get([p[-1] for p in pending])
        ):
            loss = float(values["loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}")
            curve.append(
                {
                    "step": step,
                    "loss": loss,
                    "lm_loss": float(values["lm_loss"]),
                    "tokens": seen,
                    "flops": seen * flops_per_token,
                    "wall_s": elapsed,
                }
            )
        pending.clear()

    for index in range(start_step, start_step + steps):
        batch = batches(index)
        if digest is not None:
            digest.update(np.ascontiguousarray(batch["inputs"], np.int32).tobytes())
            digest.update(np.ascontiguousarray(batch["targets"], np.int32).tobytes())
        tokens += int(batch["inputs"].size)
        state, metrics = programs.train_step(state, rest, device_batch(batch))
        step = index + 1
        if index == start_step:
            jax.block_until_ready(metrics)
            first_step_s = time.perf_counter() - start
        last = step == start_step + steps
        probing = probe is not None and probe_every > 0 and (step % probe_every == 0 or last)
        if step % log_every == 0 or last or probing:
            jax.block_until_ready(metrics)
            pending.append((step, tokens, time.perf_counter() - start - probe_s, metrics))
            flush()
        if probing:
            probe_start = time.perf_counter()
            values = probe(state["params"])
            curve[-1].update({f"test/{name}": float(v) for name, v in values.items()})
            probe_s += time.perf_counter() - probe_start
        if on_step is not None:
            on_step(1)
    return state, curve, time.perf_counter() - start - probe_s, first_step_s


def evaluate(
    programs: Programs,
    params: dict,
    rest: dict,
    task: Any,
    batches: list[dict[str, np.ndarray]],
    split: str,
) -> list[dict[str, Any]]:
    """Metric records of `batches` (one test split): exact match per slice, loss at the answers,
    the task's own metrics (stale-answer rate, whole-answer match, ICL/IWL, knowledge bits) and the
    model's health diagnostics (means over the batches)."""
    counts, sequences, stale = [], [], [0, 0]
    regression: dict[str, list[np.ndarray]] = {"model": [], "y": [], "x": []}
    loss_sum, answers, range_bits = 0.0, 0.0, []
    health: dict[str, float] = {}
    for batch in batches:
        predictions, losses, bits, aux_metrics, _ = jax.device_get(
            programs.evaluate(
                params,
                rest,
                device_batch(batch),
                token_range=getattr(task, "object_range", None),
            )
        )
        mask = batch["loss_mask"] > 0
        counts.append(task_metrics.exact_match(predictions, batch))
        if task.name.startswith("needle") or task.name == "variable_tracking":
            sequences.append(task_metrics.sequence_exact_match(predictions, batch))
        if "aux/stale_value" in batch:
            right, total = task_metrics.stale_answer_rate(predictions, batch)
            stale[0] += right
            stale[1] += total
        if task.name == "icl_regression":
            regression["model"].append(_regression_predictions(predictions, batch, task))
            regression["y"].append(np.asarray(batch["aux/y"], np.float64))
            regression["x"].append(np.asarray(batch["aux/x"], np.float64))
        loss_sum += float(np.sum(losses[mask]))
        answers += float(mask.sum())
        range_bits.append(bits[mask])
        for name, value in aux_metrics.items():
            health[name] = health.get(name, 0.0) + float(value) / len(batches)
    records = []

    def add(metric: str, slice_name: str, value: float) -> None:
        records.append(
            {"metric": metric, "slice": slice_name, "value": float(value), "split": split}
        )

    for key, value in task_metrics.accuracy(task_metrics.merge_counts(*counts)).items():
        add("exact_match", key, value)
    if sequences:
        merged = task_metrics.merge_counts(*sequences)
        for key, value in task_metrics.accuracy(merged).items():
            add("answer_exact_match", key, value)
    if stale[1]:
        add("stale_answer_rate", "all", stale[0] / stale[1])
    add("answer_loss", "all", loss_sum / max(answers, 1.0))
    if getattr(task, "bits_per_byte", False):  # byte-level LM: every position is one byte
        add("bits_per_byte", "all", loss_sum / max(answers, 1.0) / np.log(2.0))
    if regression["y"]:
        y, x = np.concatenate(regression["y"]), np.concatenate(regression["x"])
        references = {
            "normalized_mse": np.concatenate(regression["model"]),
            "ols_normalized_mse": task_metrics.ols_reference(x, y),
            "ridge_normalized_mse": task_metrics.ridge_reference(x, y, task.ridge_lambda),
        }
        for metric, predicted in references.items():
            curve = task_metrics.normalized_mse(predicted, y, task.y_variance)
            add(metric, "all", float(curve.mean()))
            for k, value in enumerate(curve):
                add(metric, f"examples={k}", value)
    object_range = getattr(task, "object_range", None)
    if object_range is not None:
        bits = np.concatenate(range_bits)
        add("object_ce_bits", "all", float(bits.mean()))
        add(
            "knowledge_bits",
            "all",
            task_metrics.knowledge_bits(bits, object_range[1] - object_range[0]),
        )
    for name, value in sorted(health.items()):
        add(f"health/{name}", "all", value)
    return records


def _regression_predictions(predictions: np.ndarray, batch: dict, task: Any) -> np.ndarray:
    """float64 [B, P]: the model's y for each point of an icl_regression batch, the bin centre of
    its argmax token at the answer position (a token outside the y bins counts as predicting 0,
    the prior mean). Plain numpy: decode_y(predictions[:, k·(d+1) + d − 1]), nan → 0."""
    from umv2_jax.data.tasks.icl_regression import decode_y

    answer = np.arange(task.points) * (task.dim + 1) + task.dim - 1
    values = decode_y(np.asarray(predictions)[:, answer])
    return np.nan_to_num(values.astype(np.float64), nan=0.0)
