"""Ablations of TO-FLOW's regulariser alpha and clip margin eps (the paper's Figures 6-9).

Trains TO-FLOW on one toy set for every alpha in ``--alphas`` (at the default eps) and every eps
in ``--epss`` (at the default alpha), same seed and data, one run at a time with 1 thread, and
writes ``<name>.json``, ``<name>.md`` (final test NLL, NFE per iteration, final T, mean |dL/dT|)
into ``--out`` and ``<name>.png`` (|dL/dT|, NFE per iteration, test NLL and T against iterations,
one panel row per ablation) into ``--figures``::

    python -m benchmarks.ablation --data 8gaussians --iters 1000
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness.train import run
from benchmarks.writer import FIGURES, RESULTS, ROOT, command, write

__all__ = ["main", "table"]


def _smooth(x: np.ndarray, w: int) -> np.ndarray:
    if x.size < w or w <= 1:
        return x
    return np.convolve(x, np.ones(w) / w, mode="valid")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="8gaussians")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    p.add_argument("--epss", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--alpha", type=float, default=0.1, help="alpha of the eps ablation")
    p.add_argument("--eps", type=float, default=0.1, help="eps of the alpha ablation")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--train-args", default="", help="flags passed to every run")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--figures", type=Path, default=FIGURES, help="where the figure goes")
    p.add_argument("--name", default=None)
    return p


def _one(args: argparse.Namespace, kind: str, alpha: float, eps: float) -> dict[str, Any]:
    """One TO-FLOW run at ``alpha`` and ``eps``, summarised."""
    out = args.runs / args.data / f"{kind}-a{alpha:g}-e{eps:g}-s{args.seed}"
    m = run([
        "--data", args.data, "--method", "toflow", "--iters", str(args.iters),
        "--seed", str(args.seed), "--alpha", str(alpha), "--eps", str(eps), "--out", str(out),
        "--eval-every", str(args.eval_every), "--threads", "1", "--no-progress",
        "--checkpoint-every", "0", *shlex.split(args.train_args),
    ])  # fmt: skip
    log = m["log"]
    dldt = [abs(r["dLdT_0"]) for r in log if r.get("dLdT_0") not in (None, "")]
    nfe = np.array([r["nfe_forward"] + r["nfe_backward"] for r in log], dtype=float)
    mean_dldt = float(np.mean(dldt))
    summary = f"test NLL {m['test_nll']:.4f}  NFE/iter {nfe.mean():.1f}  T {m['T']}"
    print(f"{kind}: alpha={alpha:g} eps={eps:g}  {summary}", flush=True)
    return {
        "ablation": kind,
        "alpha": alpha,
        "eps": eps,
        "test_nll": m["test_nll"],
        "unit": m["unit"],
        "nfe_per_iteration": float(nfe.mean()),
        "T": m["T"],
        "mean_abs_dLdT": mean_dldt,
        "cpu_seconds": m["cpu_seconds"],
        "eval_curve": [(e["iteration"], e["test_nll"]) for e in m["eval_curve"]],
        "nfe": nfe.tolist(),
        "abs_dLdT": dldt,
        "T_curve": [r["T_0"] for r in log],
    }


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of the ablations."""
    unit = results[0]["unit"]
    head = f"| ablation | alpha | eps | test NLL ({unit}) | NFE/iter | final T | mean abs dL/dT |"
    lines = [head + " CPU s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        T = ", ".join(f"{t:.3f}" for t in r["T"])
        cost = f"{r['mean_abs_dLdT']:.3g} | {r['cpu_seconds']:.0f}"
        lines.append(
            f"| {r['ablation']} | {r['alpha']:g} | {r['eps']:g} | {r['test_nll']:.4f} | "
            f"{r['nfe_per_iteration']:.1f} | {T} | {cost} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    name = args.name or f"ablation_{args.data}"
    settings = [("alpha", a, args.eps) for a in args.alphas] + [
        ("eps", args.alpha, e) for e in args.epss
    ]
    results = [_one(args, kind, alpha, eps) for kind, alpha, eps in settings]
    title = (
        f"**TO-FLOW ablations, {args.data}, {args.iters} iterations, seed {args.seed}, 1 thread**"
    )
    record = write(
        args.out,
        name,
        {"results": results},
        f"{title}\n\n{table(results)}",
        command("ablation", argv),
    )
    _figure(results, args.figures / f"{name}.png")
    print((args.out / f"{name}.md").read_text())
    return record


def _figure(results: list[dict[str, Any]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    for row, kind in enumerate(("alpha", "eps")):
        for r in (r for r in results if r["ablation"] == kind):
            label = f"{kind}={r[kind]:g}"
            axes[row, 0].plot(_smooth(np.array(r["abs_dLdT"]), 20), label=label)
            axes[row, 1].plot(_smooth(np.array(r["nfe"]), 20), label=label)
            it, nll = zip(*r["eval_curve"])
            axes[row, 2].plot(it, nll, "o-", ms=3, label=label)
            axes[row, 3].plot(r["T_curve"], label=label)
        for ax, title in zip(
            axes[row], ("|dL/dT| (smoothed)", "NFE per iteration (smoothed)", "test NLL", "T")
        ):
            ax.set_title(f"{title}, varying {kind}", fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.legend(fontsize=7)
        axes[row, 0].set_yscale("log")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main()
