"""Side by side on one harness: FFJORD, TO-FLOW, RNODE, step budgets and flow matching.

Every configuration trains on the same data, seed and iterations, one after another in this process
with 1 thread (``benchmarks.harness.train.run``), and is scored on the same held-out set with the
same adaptive solve (dopri5 1e-5). The table reports, per configuration: the final test NLL, the
total forward and backward NFE (the budget guard's reference solves included), the CPU time per
iteration, and the **NFE and CPU time needed to reach FFJORD's final test NLL plus ``--margin``, as
ratios to FFJORD's totals** ("not reached" if it never does, at the evaluation points). Flow
matching (``fm``) trains for FFJORD's CPU time. Results go to ``benchmarks/results/<name>.json``,
``<name>.md`` and, with ``--figure``, a Pareto figure ``docs/img/<name>.png`` (test NLL against
total NFE and CPU time)::

    python -m benchmarks.compare --data 8gaussians --iters 2000 --configs ffjord toflow fm
    python -m benchmarks.compare --config "b2-tight=ffjord:--budget 2 --guard-tol 1e-3"

A configuration is a method of ``benchmarks.harness.train`` plus flags (see ``CONFIGS``):
``ffjord-bN`` trains on N uniform rk4 steps with T fixed, ``ffjord-bN-learned`` learns the steps'
placement, ``toflow-bN-uniform`` learns T on a uniform grid, ``toflow-bN`` learns both,
``rnode-bN`` adds RNODE's penalties.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness.train import config_differences, resolve_config, run
from benchmarks.writer import FIGURES, RESULTS, ROOT, command, write

__all__ = ["CONFIGS", "figure", "finished_run", "main", "markdown", "reach", "summarise"]

#: name -> (benchmarks.harness.train method, extra flags)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "ffjord": ("ffjord", []),
    "steer": ("steer", []),
    "toflow": ("toflow", []),
    "toflow-a1": ("toflow", ["--alpha", "1.0"]),
    "rnode": ("rnode", []),
    "rnode+toflow": ("rnode+toflow", []),
    "fm": ("fm", ["--max-cpu-seconds", "ffjord"]),  # FFJORD's CPU time of the same seed
    # fixed-grid rk4 with a step size: NFE per solve is proportional to T
    "ffjord-rk4": ("ffjord", ["--solver", "rk4", "--step-size", "0.05"]),
    "toflow-rk4": ("toflow", ["--solver", "rk4", "--step-size", "0.05"]),
    "toflow-rk4-a1": ("toflow", ["--solver", "rk4", "--step-size", "0.05", "--alpha", "1.0"]),
    "rnode+toflow-rk4": ("rnode+toflow", ["--solver", "rk4", "--step-size", "0.05"]),
}
for _n in (2, 3, 4, 6, 8):
    CONFIGS[f"ffjord-b{_n}"] = ("ffjord", ["--budget", str(_n)])
    CONFIGS[f"ffjord-b{_n}-learned"] = ("ffjord", ["--budget", str(_n), "--placement", "learned"])
    CONFIGS[f"toflow-b{_n}-uniform"] = ("toflow", ["--budget", str(_n), "--placement", "uniform"])
    CONFIGS[f"toflow-b{_n}"] = ("toflow", ["--budget", str(_n)])
    CONFIGS[f"rnode-b{_n}"] = ("rnode", ["--budget", str(_n)])
    CONFIGS[f"ffjord-b{_n}-noguard"] = ("ffjord", ["--budget", str(_n), "--guard-every", "0"])

DEFAULT_CONFIGS = ["ffjord", "toflow", "ffjord-b4", "toflow-b4", "fm"]
MARGINS = {"nats": 0.01, "bits/dim": 0.005}


def finished_run(out: Path, train_args: list[str]) -> dict[str, Any] | None:
    """The metrics of a finished run in ``out`` made with the same configuration, or None."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    wanted = resolve_config(train_args)
    capped = wanted["max_cpu_seconds"] is not None  # a CPU budget: stopped before --iters
    if (not capped and metrics.get("iters") != wanted["iters"]) or config_differences(
        metrics.get("config", {}), wanted
    ):
        return None
    return metrics


def reach(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation point at which the test NLL is <= target, or None."""
    for point in curve:
        if point["test_nll"] <= target:
            return point
    return None


def summarise(
    runs: dict[str, dict[str, Any]], margin: float, baseline: str = "ffjord"
) -> list[dict[str, Any]]:
    """One row per configuration, its ratios to the baseline's totals at its NLL + ``margin``."""
    base = runs[baseline]
    target = base["test_nll"] + margin
    base_nfe, base_cpu = base["nfe_total"], base["cpu_seconds"]
    rows = []
    for name, m in runs.items():
        hit = reach(m["eval_curve"], target)
        rows.append(
            {
                "config": name,
                "test_nll": m["test_nll"],
                "unit": m["unit"],
                "iters": m["iters"],
                "nfe_forward_total": m["nfe_forward_total"],
                "nfe_backward_total": m["nfe_backward_total"],
                "nfe_per_iteration": m["nfe_total"] / max(m["iters"], 1),
                "cpu_seconds": m["cpu_seconds"],
                "cpu_ms_per_iteration": 1000 * m["cpu_seconds"] / max(m["iters"], 1),
                "T": m["T"],
                "budget": m.get("budget"),
                "guard_events": len(m.get("guard_events") or []),
                "target": target,
                "reached_at_iteration": None if hit is None else hit["iteration"],
                "nfe_ratio_to_reach": None if hit is None else hit["nfe_total"] / base_nfe,
                "cpu_ratio_to_reach": None if hit is None else hit["cpu_seconds"] / base_cpu,
                "nfe_ratio_total": m["nfe_total"] / base_nfe,
                "cpu_ratio_total": m["cpu_seconds"] / base_cpu,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The results table."""
    unit, target = rows[0]["unit"], rows[0]["target"]
    lines = [
        f"**{title}** (target: FFJORD's final NLL + margin = {target:.4f} {unit})",
        "",
        f"| config | test NLL ({unit}) | iters | NFE fwd | NFE bwd | NFE/iter | CPU ms/iter | "
        "final T | budget | reached target at | NFE ratio to reach | CPU ratio to reach |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        T = ", ".join(f"{t:.3f}" for t in r["T"])
        budget = ", ".join("-" if b is None else str(b) for b in (r["budget"] or [None]))
        budget += f" ({r['guard_events']} grown)" if r["guard_events"] else ""
        reached = "not reached | - | -"
        if r["reached_at_iteration"] is not None:
            ratios = f"{r['nfe_ratio_to_reach']:.2f} | {r['cpu_ratio_to_reach']:.2f}"
            reached = f"iter {r['reached_at_iteration']} | {ratios}"
        lines.append(
            f"| {r['config']} | {r['test_nll']:.4f} | {r['iters']} | {r['nfe_forward_total']} | "
            f"{r['nfe_backward_total']} | {r['nfe_per_iteration']:.1f} | "
            f"{r['cpu_ms_per_iteration']:.1f} | {T} | {budget} | {reached} |"
        )
    return "\n".join(lines) + "\n"


def figure(runs_by_seed: dict[int, dict[str, dict[str, Any]]], title: str, path: Path) -> None:
    """Test NLL against training NFE and CPU seconds, one curve per configuration (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = next(iter(runs_by_seed.values()))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax in axes:
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    base = runs["ffjord"]["test_nll"]
    for name, m in runs.items():
        curve = [p for p in m["eval_curve"] if p["iteration"] > 0]
        for ax, key in zip(axes, ("nfe_total", "cpu_seconds")):
            (line,) = ax.plot(
                [p[key] for p in curve], [p["test_nll"] for p in curve], lw=1.2, label=name
            )
            ax.plot([curve[-1][key]], [curve[-1]["test_nll"]], "o", color=line.get_color(), ms=4)
    for ax, label in zip(
        axes, ("total training NFE (forward + backward)", "training CPU seconds (1 thread)")
    ):
        ax.set_xscale("log")
        ax.axhline(base, color="k", lw=0.6, ls=":")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    unit = next(iter(runs.values()))["unit"]
    axes[0].set_ylabel(f"test NLL ({unit}, dopri5 1e-5)")
    lo = min(m["test_nll"] for m in runs.values())
    axes[0].set_ylim(
        lo - 0.05 * abs(lo) if unit == "nats" else lo - 0.05,
        base + (0.5 if unit == "nats" else 0.3),
    )
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="8gaussians")
    parser.add_argument(
        "--configs", nargs="+", default=DEFAULT_CONFIGS, help=f"from {sorted(CONFIGS)}"
    )
    parser.add_argument("--config", action="append", default=[], help="extra NAME=METHOD:FLAGS")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--train-args", default="", help="flags of every run, e.g. '--batch-size 100'"
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES, help="where --figure draws")
    parser.add_argument("--name", default=None, help="results file stem (default: compare_<data>)")
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        help="added to FFJORD's NLL for the target (default 0.01 nats, 0.005 bits/dim)",
    )
    parser.add_argument(
        "--figure", action="store_true", help="also draw the Pareto figure <name>.png"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take a configuration's metrics from its run directory if a run with the same "
        "settings finished there (lets a long benchmark be run one configuration at a time)",
    )
    return parser


def _configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """:data:`CONFIGS` and the ``--config`` ones; ``args.configs`` gains those and ``ffjord``."""
    configs = dict(CONFIGS)
    for spec in args.config:
        name, _, rest = spec.partition("=")
        method, _, flags = rest.partition(":")
        configs[name] = (method, shlex.split(flags))
        if name not in args.configs:
            args.configs.append(name)
    unknown = [c for c in args.configs if c not in configs]
    if unknown:
        parser.error(f"unknown --configs {unknown}; known: {sorted(configs)}")
    if "ffjord" not in args.configs:
        args.configs.insert(0, "ffjord")
    return configs


def _train_seed(
    args: argparse.Namespace, configs: dict[str, Any], seed: int, started: float
) -> dict[str, dict[str, Any]]:
    """Every configuration's metrics on one seed (a finished run's with ``--reuse``)."""
    runs: dict[str, dict[str, Any]] = {}
    for cfg in args.configs:
        method, flags = configs[cfg]
        if "ffjord" in flags:  # --max-cpu-seconds ffjord: FFJORD's CPU time on this seed
            flags = [f"{runs['ffjord']['cpu_seconds']:.3f}" if f == "ffjord" else f for f in flags]
            cheap = ["--iters", str(1000 * args.iters), "--eval-every", str(20 * args.eval_every)]
            flags += cheap  # cheap iterations: many more of them
        out = args.runs / args.data / f"{cfg}-s{seed}"
        train_args = [
            "--data", args.data, "--method", method, "--iters", str(args.iters),
            "--seed", str(seed), "--out", str(out), "--eval-every", str(args.eval_every),
            "--threads", "1", "--no-progress", "--checkpoint-every", "0",
            *shlex.split(args.train_args), *flags,
        ]  # fmt: skip
        elapsed = time.time() - started
        print(
            f"[{elapsed:7.0f}s] {args.data} seed {seed}: {cfg} ({method} {' '.join(flags)})",
            flush=True,
        )
        previous = finished_run(out, train_args) if args.reuse else None
        if previous is not None:
            print(f"    reusing the finished run in {out}", flush=True)
        runs[cfg] = m = previous if previous is not None else run(train_args)
        nfe, cpu = f"{m['nfe_forward_total']}+{m['nfe_backward_total']}", m["cpu_seconds"]
        summary = f"test NLL {m['test_nll']:.4f}  NFE {nfe}  CPU {cpu:.0f}s  T {m['T']}"
        print(f"    {summary}", flush=True)
    return runs


def _nan_median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def over_seeds(per_seed: dict[int, list[dict[str, Any]]], configs: list[str]) -> str:
    """The medians over seeds of each configuration's NLL and ratios (those that reached)."""
    lines = [
        "| config | test NLL | seeds reaching | NFE ratio | CPU ratio |",
        "|---|---|---|---|---|",
    ]
    for i, cfg in enumerate(configs):
        vals = [rows[i] for rows in per_seed.values()]
        nfe = [v["nfe_ratio_to_reach"] for v in vals if v["nfe_ratio_to_reach"] is not None]
        cpu = [v["cpu_ratio_to_reach"] for v in vals if v["cpu_ratio_to_reach"] is not None]
        nll = statistics.median(v["test_nll"] for v in vals)
        ratios = f"{_nan_median(nfe):.2f} | {_nan_median(cpu):.2f}"
        lines.append(f"| {cfg} | {nll:.4f} | {len(nfe)}/{len(vals)} | {ratios} |")
    title = "**Over seeds** (medians; ratios over the seeds that reached FFJORD's NLL)"
    return title + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    configs = _configs(parser, args)
    name = args.name or f"compare_{args.data}"
    per_seed: dict[int, list[dict[str, Any]]] = {}
    all_runs: dict[int, dict[str, dict[str, Any]]] = {}
    started = time.time()
    for seed in args.seeds:
        all_runs[seed] = runs = _train_seed(args, configs, seed, started)
        margin = args.margin if args.margin is not None else MARGINS[runs["ffjord"]["unit"]]
        per_seed[seed] = summarise(runs, margin)
    title = f"{args.data}, seed {{}}, {args.iters} iterations"
    tables = [markdown(rows, title.format(s)) for s, rows in per_seed.items()]
    if len(args.seeds) > 1:
        tables.append(over_seeds(per_seed, args.configs))
    tables.append("One thread per run.")
    runs_dir = args.runs.resolve()
    data = {
        "benchmark": name,
        "data": args.data,
        "iters": args.iters,
        "seeds": args.seeds,
        "configs": {c: configs[c] for c in args.configs},
        "train_args": args.train_args,
        "runs": str(runs_dir.relative_to(ROOT))
        if runs_dir.is_relative_to(ROOT)
        else str(args.runs),
        "rows": {str(s): rows for s, rows in per_seed.items()},
    }
    result = write(args.out, name, data, "\n".join(tables), command("compare", argv))
    if args.figure:
        figure(all_runs, title.format(args.seeds[0]), args.figures / f"{name}.png")
    print((args.out / f"{name}.md").read_text())
    return result


if __name__ == "__main__":
    main()
