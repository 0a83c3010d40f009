"""Why is UltraMemV2 level with dense at T size? Table probes and ablations (results/diagnosis/).

    python -m umv2_jax.compare.diagnose --variants base dense --probe fact_4k --seeds 0
    python -m umv2_jax.compare.diagnose --summary results/diagnosis/runs.jsonl

Every run trains one variant (a T-family config plus dotted overrides) on one fact-base probe
(umv2_jax.compare.probes) and, at each evaluation, measures on the next training batch:
  grad_norm/<group>      ‖∂L/∂θ‖ of the LM loss over the values group (value + pre-value tables)
                         and the default group (everything else);
  step_ratio/<group>     ‖Δθ‖ / ‖θ‖ of the update the optimizer would apply now (its real state:
                         the value-LR multiplier and the schedule included), per group;
  layer{i}/values_grad_norm, layer{i}/rows_with_grad (fraction of the value rows whose gradient
                         is non-zero on that batch), layer{i}/hit_row_step_ratio (‖Δ‖/‖θ‖ over
                         those rows only);
and at the last evaluation layer{i}/rows_hit_union: the fraction of the table read by any token of
the whole test set (the health/ metrics are per-batch means: top-1 / top-m scores, memory output
std beside ffn_output_std, rows_hit_fraction). One JSON line per run goes to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from umv2_jax.compare import probes, runner
from umv2_jax.compare.suites import ModelSpec
from umv2_jax.training.optimizer import DEFAULT_GROUP, VALUES_GROUP
from umv2_jax.training.step import document_kwargs, token_losses

UMV2 = "configs/eval/t_umv2.yaml"
DENSE = "configs/eval/t_dense.yaml"
MOE = "configs/eval/t_moe.yaml"

# Fact-base probes for the diagnosis (B 32 rows × 16 facts, 96 tokens): small enough for a
# loaded 2-core CPU, past the point where every model saturates (see results/sizing/).
PROBES = {
    "fact_4k": probes.Probe(
        "fact_base", {"num_facts": 4096, "exposures": 20}, 96, 32, 160, (40, 80, 120, 160)
    ),
    "fact_8k": probes.Probe(
        "fact_base", {"num_facts": 8192, "exposures": 20}, 96, 32, 320, (80, 160, 240, 320)
    ),
}

# name → (config, overrides). Budget-changing variants say so in docs/diagnosis.md.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dense": (DENSE, ()),
    "moe": (MOE, ()),
    "base": (UMV2, ()),
    # value LR multiplier and schedule (docs/model.md §5 default decay:4)
    "vlr_const1": (UMV2, ("model.memory.value_lr=constant:1",)),
    "vlr_const4": (UMV2, ("model.memory.value_lr=constant:4",)),
    "vlr_decay16": (UMV2, ("model.memory.value_lr=decay:16",)),
    # decoupled weight decay reaches every row every step, read or not
    "wd0": (UMV2, ("train.weight_decay=0.0",)),
    "dense_wd0": (DENSE, ("train.weight_decay=0.0",)),
    # init scheme
    "init_release": (UMV2, ("model.memory.init=release",)),
    # per-rank vs shared query
    "shared_query": (UMV2, ("model.memory.per_rank_query=false",)),
    # density vs table size (item 3): topk at fixed table, table at fixed topk
    "topk4": (UMV2, ("model.memory.topk=4", "model.memory.rc_topk=4")),
    "topk16": (UMV2, ("model.memory.topk=16", "model.memory.rc_topk=16")),
    "topk32": (UMV2, ("model.memory.topk=32", "model.memory.rc_topk=32")),
    "n48": (UMV2, ("model.memory.n_keys=48",)),
    "n96": (UMV2, ("model.memory.n_keys=96",)),
    # value / pre-value / key dims
    "dv48": (UMV2, ("model.memory.value_dim=48",)),
    "dp0": (UMV2, ("model.memory.pre_value_dim=0",)),
    "dk32": (UMV2, ("model.memory.key_dim=32",)),
    # memory:FFN ratio (the FFN takes the width the table gives up, or the reverse)
    "ffn256": (UMV2, ("model.d_ff=256",)),
    # row count vs row width at fixed table parameters and FLOPs (accounting: within 2%)
    "rows_n96_narrow": (
        UMV2,
        ("model.memory.n_keys=96", "model.memory.value_dim=12", "model.memory.pre_value_dim=4"),
    ),
    "rows_n48_wide": (
        UMV2,
        ("model.memory.n_keys=48", "model.memory.value_dim=48", "model.memory.pre_value_dim=16"),
    ),
    # pre-values at fixed row width (32 numbers per row: D_v + D_p)
    "dv32_dp0": (UMV2, ("model.memory.value_dim=32", "model.memory.pre_value_dim=0")),
    "dv16_dp16": (UMV2, ("model.memory.value_dim=16", "model.memory.pre_value_dim=16")),
    # The other memory layers, each matched to T-umv2's FFN slot (total parameters and forward
    # FLOPs per token within 3%: `python -m umv2_jax.eval.accounting --config
    # configs/eval/t_umv2.yaml --set ...`; the d_ff gives each the FFN width its table leaves).
    "pkm": (
        UMV2,
        (
            "model.sparse=pkm",
            "model.product_key.n_keys=48",
            "model.product_key.topk=8",
            "model.product_key.key_dim=16",
            "model.d_ff=240",
        ),
    ),
    "peer": (
        UMV2,
        (
            "model.sparse=peer",
            "model.product_key.n_keys=34",
            "model.product_key.topk=8",
            "model.product_key.key_dim=16",
            "model.d_ff=240",
        ),
    ),
    "memory_plus": (
        UMV2,
        (
            "model.sparse=memory_plus",
            "model.product_key.n_keys=96",
            "model.product_key.topk=8",
            "model.product_key.key_dim=16",
            "model.product_key.value_dim=32",
            "model.d_ff=224",
        ),
    ),
    "ultramem_v1": (
        UMV2,
        (
            "model.sparse=ultramem",
            "model.ultramem.n_keys=68",
            "model.ultramem.topk=8",
            "model.ultramem.rc_topk=8",
            "model.ultramem.key_dim=16",
            "model.ultramem.value_dim=32",
        ),
    ),
}


def _masked_loss(parts, params, rest, batch):
    model = parts.build(params, rest)
    logits, _ = model(batch["inputs"], deterministic=True, **document_kwargs(batch))
    losses = token_losses(logits, batch["targets"]) * batch["loss_mask"]
    return jnp.sum(losses) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)


def _norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return optax.global_norm(leaves)


def _split(tree, labels, group):
    flat = jax.tree.leaves(jax.tree.map(lambda x, g: x if g == group else None, tree, labels))
    return [x for x in flat if x is not None]


class TableProbe:
    """The on_eval hook of umv2_jax.compare.probes.learning_curve (see the module docstring)."""

    def __init__(self, probe: probes.Probe, seed: int):
        self.probe, self.seed = probe, seed
        self._compiled: dict[int, Any] = {}

    def _fns(self, programs):
        if id(programs) not in self._compiled:
            parts, optimizer, labels = programs.parts, programs.optimizer, programs.labels

            @jax.jit
            def measure(params, opt_state, rest, batch):
                grads = jax.grad(lambda p: _masked_loss(parts, p, rest, batch))(params)
                updates, _ = optimizer.update(grads, opt_state, params)
                out = {}
                for group in (DEFAULT_GROUP, VALUES_GROUP):
                    p, g, u = (_split(t, labels, group) for t in (params, grads, updates))
                    if p:
                        out[f"grad_norm/{group}"] = _norm(g)
                        out[f"step_ratio/{group}"] = _norm(u) / _norm(p)
                values = params.get("shared", {}).get("values")
                if values is not None:  # [L, rows, D_v] stacked tables (UltraMemV2)
                    g, u = grads["shared"]["values"], updates["shared"]["values"]
                    if values.ndim == 2:  # one [rows, D] table shared by every layer (Memory+)
                        values, g, u = values[None], g[None], u[None]
                    hit = jnp.any(g != 0, axis=-1)  # [L, rows]
                    out["values_grad_norm"] = jnp.sqrt(jnp.sum(g * g, axis=(1, 2)))
                    out["rows_with_grad"] = jnp.mean(hit, axis=1)
                    w = hit[..., None]
                    out["hit_row_step_ratio"] = jnp.sqrt(jnp.sum((u * w) ** 2, axis=(1, 2))) / (
                        jnp.sqrt(jnp.sum((values * w) ** 2, axis=(1, 2))) + 1e-12
                    )
                    out["values_norm"] = jnp.sqrt(jnp.sum(values * values, axis=(1, 2)))
                return out

            self._compiled[id(programs)] = measure
        return self._compiled[id(programs)]

    def __call__(self, programs, state, rest, task, point, final) -> dict[str, Any]:
        batch = task.batch(self.probe.batch_size, self.probe.seq_len, seed=self.seed, index=point)
        values = jax.device_get(
            self._fns(programs)(
                state["params"], state["opt_state"], rest, runner.device_batch(batch)
            )
        )
        out: dict[str, Any] = {}
        for key, value in values.items():
            value = np.asarray(value)
            if value.ndim == 0:
                out[key] = float(value)
            else:
                for layer, v in enumerate(value):
                    out[f"layer{layer}/{key}"] = float(v)
        if final:
            out |= _rows_hit_union(programs, state, rest, task, self.probe, self.seed)
        return out


def _rows_hit_union(programs, state, rest, task, probe, seed) -> dict[str, float]:
    union: dict[int, np.ndarray] = {}
    addressable: dict[int, float] = {}
    count = task.test_batches(probe.batch_size) if hasattr(task, "test_batches") else 4
    for i in range(count):
        batch = task.batch(probe.batch_size, probe.seq_len, seed=seed, index=i, split="test")
        *_, hits = programs.evaluate(state["params"], rest, runner.device_batch(batch))
        for block, hit in jax.device_get(hits).items():
            union[block] = np.asarray(hit) | union.get(block, False)
            addressable[block] = float(hit.size)
    return {f"layer{b}/rows_hit_union": float(h.sum()) / addressable[b] for b, h in union.items()}


def run(variants: list[str], probe_name: str, seeds: list[int], out: str, steps: int | None):
    probe = PROBES[probe_name]
    if steps:
        probe = dataclasses.replace(probe, steps=steps, eval_at=(steps,))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    cache = runner.ProgramCache()
    for seed in seeds:
        for name in variants:
            config, overrides = VARIANTS[name]
            model = ModelSpec(name, config, overrides)
            result = probes.learning_curve(
                cache, model, probe, seed, on_eval=TableProbe(probe, seed)
            )
            result |= {"variant": name, "probe_name": probe_name, "load_average": os.getloadavg()}
            last = result["evals"][-1]
            print(
                name,
                seed,
                f"{result['step_s']:.3f} s/step",
                f"em {last.get('test/exact_match/all', float('nan')):.4f}",
                f"kbits {last.get('test/knowledge_bits/all', float('nan')):.0f}",
                flush=True,
            )
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")


SUMMARY_KEYS = (
    "test/exact_match/all",
    "test/knowledge_bits/all",
    "step_ratio/values",
    "step_ratio/default",
    "grad_norm/values",
    "grad_norm/default",
)


def summary(path: str) -> str:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["probe_name"], r["variant"]), []).append(r)
    head = ["probe", "variant", "seeds", "total params", "train FLOPs/token", *SUMMARY_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (probe, variant), runs in groups.items():
        cells = [probe, variant, str(len(runs))]
        cells.append(f"{runs[0]['accounting']['total_params']:,}")
        cells.append(f"{runs[0]['accounting']['training_flops_per_token']:,.0f}")
        for key in SUMMARY_KEYS:
            vals = [r["evals"][-1].get(key) for r in runs]
            vals = [v for v in vals if v is not None]
            cells.append(", ".join(f"{v:.4g}" for v in vals) if vals else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LAYER_KEYS = (
    ("rows hit (test set, union)", "{l}/rows_hit_union"),
    ("rows hit (per batch)", "test/health/{l}/rows_hit_fraction/all"),
    ("top-1 score", "test/health/{l}/top1_score/all"),
    ("top-m score", "test/health/{l}/topm_score/all"),
    ("memory output std", "test/health/{l}/output_std/all"),
    ("FFN output std", "test/health/{l}/ffn_output_std/all"),
    ("‖∂L/∂V‖ (layer table)", "{l}/values_grad_norm"),
    ("rows with gradient (one batch)", "{l}/rows_with_grad"),
    ("‖ΔV‖/‖V‖ over those rows", "{l}/hit_row_step_ratio"),
    ("‖V‖", "{l}/values_norm"),
)


def layer_table(path: str, variants: tuple[str, ...] = ("base",)) -> str:
    """Per-layer probes of the memory variants at each evaluated step (first seed)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    lines = []
    for r in rows:
        if r["variant"] not in variants or r["seed"] != min(x["seed"] for x in rows):
            continue
        layers = sorted({k.split("/")[0] for e in r["evals"] for k in e if k.startswith("layer")})
        steps = [e["step"] for e in r["evals"]]
        lines += [
            f"### {r['variant']} on {r['probe_name']} (seed {r['seed']})",
            "",
            "| quantity | " + " | ".join(f"step {s}" for s in steps) + " |",
            "|---|" + "---:|" * len(steps),
        ]
        for key in (
            "step_ratio/values",
            "step_ratio/default",
            "grad_norm/values",
            "grad_norm/default",
            "test/exact_match/all",
        ):
            vals = [e.get(key) for e in r["evals"]]
            lines.append(
                f"| {key} | " + " | ".join("—" if v is None else f"{v:.4g}" for v in vals) + " |"
            )
        for layer in layers:
            for label, pattern in LAYER_KEYS:
                key = pattern.format(l=layer)
                vals = [e.get(key) for e in r["evals"]]
                if all(v is None for v in vals):
                    continue
                lines.append(
                    f"| {layer} {label} | "
                    + " | ".join("—" if v is None else f"{v:.4g}" for v in vals)
                    + " |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--probe", default="fact_4k", choices=sorted(PROBES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, help="cut the probe to this many steps (smoke)")
    parser.add_argument("--out", default="results/diagnosis/runs.jsonl")
    parser.add_argument("--summary", metavar="JSONL")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        print()
        print(layer_table(args.summary, tuple(args.variants or ("base",))))
        return 0
    if not args.variants:
        print("diagnose: give --variants NAME ... (or --summary JSONL)", file=sys.stderr)
        return 2
    run(args.variants, args.probe, args.seeds, args.out, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
