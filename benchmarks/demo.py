"""``make demo``: what makes CNF training cheaper, on a toy set, on the CPU, in a few minutes.

Trains FFJORD's toy model three times with :func:`benchmarks.harness.train.run`, from the same
seed, data stream and held-out set: FFJORD as published (dopri5 1e-5, T = 0.5), the same on a
budget of 4 rk4 steps per solve (``LearnableHorizon(budget=4)``, guarded by the stepper), and
TO-FLOW on that budget (T and the steps' placement learned). Every test NLL is scored with dopri5
1e-5. Prints the table (test NLL, NFE, CPU time, final T) and writes to ``--out``:
``comparison.md``, the densities (``densities.png``), the learning curves (``curves.png``) and each
run's directory::

    python -m benchmarks.demo --data 8gaussians --iters 400 --out runs/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from benchmarks.harness.plots import figure_curves, figure_densities
from benchmarks.harness.train import run

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the demo; returns the three runs' metrics."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="8gaussians")
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", default="64,64,64")
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--no-figures", action="store_true", help="skip the PNGs (faster)")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {}
    configs = {
        "ffjord": ["--method", "ffjord"],
        "ffjord-b4": ["--method", "ffjord", "--budget", "4"],
        "toflow-b4": ["--method", "toflow", "--budget", "4"],
    }
    for name, flags in configs.items():
        print(f"== {name}: {args.iters} iterations on {args.data}", flush=True)
        results[name] = run([
            "--data", args.data, "--iters", str(args.iters), "--seed", str(args.seed), *flags,
            "--out", str(args.out / name), "--hidden", args.hidden,
            "--test-size", str(args.test_size), "--eval-every", str(max(1, args.iters // 8)),
            "--checkpoint-every", "0", "--threads", "1",
        ])  # fmt: skip

    lines = [
        "| config | test NLL (nats, dopri5) | NFE fwd | NFE bwd | NFE/iter | CPU s | final T |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in results.items():
        per_iter = (m["nfe_forward_total"] + m["nfe_backward_total"]) / m["iters"]
        nfe = f"{m['nfe_forward_total']} | {m['nfe_backward_total']} | {per_iter:.1f}"
        T = ", ".join(f"{t:.3f}" for t in m["T"])
        lines.append(f"| {method} | {m['test_nll']:.4f} | {nfe} | {m['cpu_seconds']:.1f} | {T} |")
    table = (
        "\n".join(lines)
        + f"\n\n{args.data}, {args.iters} iterations, seed {args.seed}, 1 thread.\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(table)
    print(table)
    if not args.no_figures:
        runs = [args.out / name for name in configs]
        print("wrote", figure_densities(runs, args.out / "densities.png", resolution=80))
        print("wrote", figure_curves(runs, args.out / "curves.png", smooth=10))
    print(f"wrote {args.out / 'comparison.md'}")
    return results


if __name__ == "__main__":
    main()
