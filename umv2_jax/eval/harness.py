"""lm-eval-harness adapter: a trained run as an `lm_eval.api.model.LM` (optional extra `[eval]`).

    pip install 'umv2-jax[eval]'                     # lm-eval
    python -m umv2_jax.evaluate --workdir runs/tiny --lm-eval hellaswag --limit 100
    python -m umv2_jax.evaluate --workdir runs/tiny --lm-eval path/to/my_task.yaml

    from umv2_jax.eval.harness import UMV2LM, run_tasks
    lm = UMV2LM(config, parts, params, rest, tokenizer=tokenizer)    # training.restore.load_params
    results = run_tasks(lm, ["my_task"], include_path="tasks/", limit=50)   # {task: {metric: v}}

The three request types of the harness map onto `umv2_jax.eval.loglik.Scorer` (batched, KV cache):

  loglikelihood(context, continuation)  the continuation's summed log-probability and whether it
                                        is the greedy one. Text is tokenized as the harness's
                                        Hugging Face model does: trailing spaces of the context move
                                        to the continuation, the continuation's ids are those of
                                        context + continuation past the context's; the context is
                                        prefixed with BOS (the run's documents start with it).
  loglikelihood_rolling(text)           the text's log-likelihood over windows of the run's
                                        `data.seq_len` (lm-eval's rolling windows, BOS as prefix).
  generate_until(context, gen_kwargs)   greedy decoding of up to `max_gen_toks` (default 256)
                                        tokens, cut at the first `until` string or EOS (batched;
                                        sampling arguments are ignored: always greedy).

Tasks are names the harness knows (its data must be reachable: many download from the Hugging
Face hub) or paths to task YAML files / folders of them (`include_path`), e.g. a local
multiple-choice task with `dataset_path: json` and `dataset_kwargs: {data_files: …}`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from umv2_jax.errors import ConfigError

try:  # the optional extra: without it, only `require_lm_eval` (one line) is usable
    from lm_eval.api.model import LM as _LMBase
except ImportError:  # pragma: no cover - exercised by the "not installed" test in a subprocess
    _LMBase = object

INSTALL_HINT = "pip install 'umv2-jax[eval]' (or pip install lm-eval)"


def require_lm_eval() -> None:
    """ConfigError (one line) unless the `lm-eval` package can be imported."""
    try:
        importlib.import_module("lm_eval")
        importlib.import_module("lm_eval.api.model")
    except ImportError:
        raise ConfigError(
            f"--lm-eval needs the lm-eval package, which is not installed; {INSTALL_HINT}"
        ) from None


class UMV2LM(_LMBase):
    """A restored run (config, parts, params, rest) behind lm-eval's model interface."""

    def __init__(
        self,
        config,
        parts,
        params,
        rest,
        *,
        tokenizer=None,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ):
        require_lm_eval()
        super().__init__()
        from umv2_jax.eval.loglik import Scorer

        if tokenizer is None:
            from umv2_jax.generate import _config_tokenizer

            tokenizer = _config_tokenizer(config)
        self.tokenizer = tokenizer
        self.max_gen_toks = max_gen_toks
        self.scorer = Scorer.from_run(
            config,
            parts,
            params,
            rest,
            batch_size=batch_size,
            pad_id=tokenizer.pad_id,
            **({"max_length": max_length} if max_length else {}),
        )

    # ---- tokenization ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in np.asarray(self.tokenizer.encode(text)).reshape(-1)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(BOS + context ids, continuation ids) as the harness's Hugging Face model splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return [self.tokenizer.bos_id, *context_ids], whole[len(context_ids) :]

    # ---- the LM interface --------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*request.args[:2]) for request in requests]
        return self.scorer.loglikelihood(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [self.encode(request.args[0]) for request in requests]
        return self.scorer.loglikelihood_rolling(texts, prefix_id=self.tokenizer.bos_id)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy text per request, batched over requests with the same `max_gen_toks`."""
        prompts, stops, limits = [], [], []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1] or {})
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            limits.append(int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            prompts.append([self.tokenizer.bos_id, *self.encode(context)])
        out: list[str] = [""] * len(prompts)
        for limit in sorted(set(limits)):
            chosen = [i for i, value in enumerate(limits) if value == limit]
            generated = self.scorer.generate(
                [prompts[i] for i in chosen], limit, stop_ids=[self.tokenizer.eos_id]
            )
            for index, ids in zip(chosen, generated):
                text = self.tokenizer.decode(np.asarray(ids, np.int64))
                cuts = [text.find(stop) for stop in stops[index] if stop and stop in text]
                out[index] = text[: min(cuts)] if cuts else text
        return out


def run_tasks(
    lm: UMV2LM,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    include_path: str | Sequence[str] | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}} of lm-eval's `simple_evaluate` on `lm`. A task given as a path to a
    YAML file (or a folder of them) is loaded from there (its `task:` name is what runs)."""
    require_lm_eval()
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    names = []
    for task in tasks:
        task = task.strip()
        if task.endswith((".yaml", ".yml")):
            if not os.path.isfile(task):
                raise ConfigError(f"--lm-eval {task}: no such task file; pass a task YAML path")
            with open(task) as handle:
                spec = yaml.safe_load(handle) or {}
            if not isinstance(spec, dict) or "task" not in spec:
                raise ConfigError(f"--lm-eval {task}: the YAML has no `task:` name")
            paths.append(os.path.dirname(os.path.abspath(task)))
            names.append(str(spec["task"]))
        elif task:
            names.append(task)
    if not names:
        raise ConfigError("--lm-eval: no task named; pass e.g. --lm-eval hellaswag")
    local_only = len(paths) > 0 and all(t.endswith((".yaml", ".yml")) for t in tasks if t.strip())
    manager = TaskManager(include_path=paths or None, include_defaults=not local_only)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--lm-eval: unknown task {unknown[0]}; pass a task lm-eval knows or a task YAML path"
        )
    results = simple_evaluate(
        model=lm, tasks=names, limit=limit, task_manager=manager, num_fewshot=num_fewshot
    )
    return {task: dict(values) for task, values in results["results"].items()}
