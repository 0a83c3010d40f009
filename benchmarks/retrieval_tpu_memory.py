"""Peak memory of the retrieval selection on a TPU v5e, XLA path against the Mosaic kernels, from the
compiler's own plan: the op (one head, T = 16384) lowered and compiled by XLA:TPU for a v5e
topology from this CPU host, `memory_analysis()` read for each implementation in one run.

    python benchmarks/retrieval_tpu_memory.py [--backward]

Needs libtpu (`pip install -e '.[test]'` on Linux x86-64, or `UMV2_TPU_PYTHON` naming a Python
that has it); no TPU is used, so this measures the memory plan, not speed. Shapes (T, n, D_k, r,
k, m, C) are those of `tests/kernels/retrieval_tpu_cases.py`. `--backward` compiles the gradient
of the selected scores too (minutes per shape).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ("227M", "2.5B_top768")


def _cases(backward: bool):
    import jax

    from tests.kernels import retrieval_tpu_cases as cases

    def one_head(name, implementation):
        step = cases.train_step(name, implementation)
        args = tuple(
            jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype) if a.ndim > 1 else a
            for a in cases.abstract_args(name)
        )
        if backward:
            return step, args
        *_, rc_topk, topk, _, _ = cases.SHAPES[name]

        def forward(q_row, q_col, k_row, k_col, cores, u_star, t_star):
            from umv2_jax.ops.retrieval_topk import retrieval_topk

            select = lambda qr, qc, kr, kc, c: retrieval_topk(  # noqa: E731
                qr, qc, kr, kc, c, u_star, t_star, rc_topk=rc_topk, topk=topk,
                implementation=implementation,
            )  # fmt: skip
            return jax.vmap(select)(q_row, q_col, k_row, k_col, cores)

        return forward, args

    return [
        (f"{name} {implementation}", *one_head(name, implementation))
        for name in SHAPES
        for implementation in ("xla", "pallas")
    ]


def forward_cases():
    return _cases(backward=False)


def backward_cases():
    return _cases(backward=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backward", action="store_true", help="forward + backward (slow)")
    args = parser.parse_args(argv)
    from pallas_kernels.testing import compile_for_tpu_v5e

    which = "backward_cases" if args.backward else "forward_cases"
    results = compile_for_tpu_v5e(f"benchmarks.retrieval_tpu_memory:{which}", timeout=3000)
    print("| shape | implementation | Mosaic calls | temps MiB | args MiB | compile s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, row in results.items():
        shape, implementation = name.rsplit(" ", 1)
        if not row["ok"]:
            print(f"| {shape} | {implementation} | failed: {row.get('error', '')[:80]} | | | |")
            continue
        print(
            f"| {shape} | {implementation} | {row['tpu_custom_calls']} | "
            f"{row['temp_bytes'] / 2**20:.1f} | {row['argument_bytes'] / 2**20:.1f} | "
            f"{row['compile_s']:.1f} |"
        )
    for shape in SHAPES:
        xla, pallas = results.get(f"{shape} xla"), results.get(f"{shape} pallas")
        if xla and pallas and xla["ok"] and pallas["ok"] and pallas["temp_bytes"]:
            print(
                f"{shape}: XLA plans {xla['temp_bytes'] / pallas['temp_bytes']:.1f}× the kernels'"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
