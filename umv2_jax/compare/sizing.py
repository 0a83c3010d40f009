"""Measure learning curves to size the quick suite's tasks (results/sizing/).

    python -m umv2_jax.compare.sizing --probe mqar_s32 --seeds 0 1 --out results/sizing/curves.jsonl
    python -m umv2_jax.compare.sizing --probe fact_16k --models T-dense T-umv2 --steps 40  # timing

Each (probe, model, seed) run appends one JSON line to --out (umv2_jax.compare.probes:
the test metrics at the probe's eval points, train loss every 10 steps, seconds per step).
`--summary` prints a Markdown table of what --out holds (final metric, steps to 0.5 / 0.9).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

from umv2_jax.compare import probes, runner
from umv2_jax.compare.suites import T_FAMILY, ModelSpec

# Candidate sizes; the quick suite's TaskSpecs cite the ones chosen (results/sizing/README.md).
PROBES = {
    # The separating MQAR setting: 51k examples.
    "mqar_s32": probes.Probe(
        "mqar", {"mix": [[32, 4]]}, 32, 64, 800, (100, 200, 300, 400, 600, 800)
    ),
    "mqar_s32_400": probes.Probe("mqar", {"mix": [[32, 4]]}, 32, 64, 400, (100, 200, 300, 400)),
    # The quick suite before this sizing (3,200 examples).
    "mqar_old": probes.Probe("mqar", {"mix": [[64, 4]]}, 64, 16, 200, (100, 200)),
    # 16,384 facts × 20 exposures: 640 steps of 32 rows × 16 facts.
    "fact_16k": probes.Probe(
        "fact_base",
        {"num_facts": 16384, "exposures": 20},
        96,
        32,
        640,
        (160, 320, 480, 640),
    ),
    "fact_8k": probes.Probe(
        "fact_base",
        {"num_facts": 8192, "exposures": 30},
        96,
        32,
        480,
        (120, 240, 360, 480),
    ),
    "overwrite": probes.Probe("overwrite", {}, 128, 16, 300, (100, 200, 300), eval_batches=2),
    "overwrite_b32": probes.Probe("overwrite", {}, 128, 32, 400, (100, 200, 300, 400), 2),
    "icl": probes.Probe("icl_regression", {}, 66, 32, 400, (100, 200, 300, 400)),
}


def models(names: list[str] | None) -> list[ModelSpec]:
    family = [ModelSpec(n, p) for n, p in T_FAMILY]
    return family if not names else [m for m in family if m.name in names]


def summary(path: str) -> str:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["probe"]["label"], r["model"], tuple(r["overrides"])), []).append(r)
    lines = [
        "| probe | model | seeds | final headline (per seed) | steps to 0.5 | steps to 0.9 | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, model, overrides), runs in sorted(groups.items()):
        task = runs[0]["probe"]["task"]
        metric, slice_ = probes.HEADLINE[task]
        key = f"test/{metric}/{slice_}"
        finals = [r["evals"][-1].get(key, float("nan")) for r in runs]
        to5 = [probes.steps_to(r["evals"], key, 0.5) for r in runs]
        to9 = [probes.steps_to(r["evals"], key, 0.9) for r in runs]
        step_s = statistics.median(r["step_s"] for r in runs)
        name = model + (" " + " ".join(overrides) if overrides else "")
        lines.append(
            f"| {label} | {name} | {len(runs)} | {', '.join(f'{f:.3f}' for f in finals)} | "
            f"{to5} | {to9} | {step_s:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", nargs="+", choices=sorted(PROBES))
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, help="cut each probe to this many steps (timing)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every model")
    parser.add_argument("--out", default="results/sizing/curves.jsonl")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.out))
        return 0
    if not args.probe:
        print("sizing: give --probe NAME ... (or --summary)", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    cache = runner.ProgramCache()
    for name in args.probe:
        probe = PROBES[name]
        if args.steps:
            probe = dataclasses.replace(
                probe, steps=args.steps, eval_at=(args.steps,), eval_batches=1
            )
        for seed in args.seeds:
            for model in models(args.models):
                result = probes.learning_curve(cache, model, probe, seed, extra=tuple(args.set))
                result["probe_name"] = name
                result["load_average"] = os.getloadavg()
                last = result["evals"][-1]
                shown = {k: round(v, 4) for k, v in last.items() if "health" not in k}
                print(name, model.name, seed, f"{result['step_s']:.3f} s/step", shown, flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
