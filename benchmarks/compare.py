"""Side-by-side training benchmark: FFJORD, STEER, TO-FLOW, RNODE and variants on the same budget.

Every configuration trains on the same data, seed and number of iterations, one after another
in this process with 1 thread (``examples.train.run``), and is evaluated on the same held-out set
with the same fixed solver. The table reports, per configuration: the final test NLL, the total
forward and backward NFE, the CPU time per iteration, and the **NFE and CPU time needed to reach
FFJORD's final test NLL, as a ratio to FFJORD's totals** ("not reached" if it never does, at the
evaluation points). Results go to ``benchmarks/results/<name>.json`` and ``<name>.md``.

Run from the repository root::

    python benchmarks/compare.py --data 8gaussians --iters 2000 --seeds 0
    python benchmarks/compare.py --data checkerboard --configs ffjord toflow toflow-rk4 ffjord-rk4

A configuration is a method of ``examples.train`` plus flags (see ``CONFIGS``); add your own with
``--config NAME=METHOD:FLAGS``, e.g. ``--config "toflow-a1=toflow:--alpha 1"``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.train import config_differences, resolve_config, run  # noqa: E402

#: name -> (examples.train method, extra flags)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "ffjord": ("ffjord", []),
    "steer": ("steer", []),
    "toflow": ("toflow", []),
    "toflow-exact": ("toflow", ["--mode", "exact"]),
    "toflow-a1": ("toflow", ["--alpha", "1.0"]),
    "rnode": ("rnode", []),
    "rnode+toflow": ("rnode+toflow", []),
    "joint": ("joint", []),
    # fixed-grid rk4: NFE per solve is proportional to T, so a shorter T is directly cheaper
    "ffjord-rk4": ("ffjord", ["--solver", "rk4", "--step-size", "0.05"]),
    "toflow-rk4": ("toflow", ["--solver", "rk4", "--step-size", "0.05"]),
    "toflow-rk4-a1": ("toflow", ["--solver", "rk4", "--step-size", "0.05", "--alpha", "1.0"]),
    "rnode+toflow-rk4": ("rnode+toflow", ["--solver", "rk4", "--step-size", "0.05"]),
}

DEFAULT_CONFIGS = ["ffjord", "steer", "toflow", "rnode", "rnode+toflow", "ffjord-rk4", "toflow-rk4", "toflow-rk4-a1"]


def finished_run(out: Path, train_args: list[str]) -> dict[str, Any] | None:
    """The metrics of a finished run in ``out`` made with the same configuration, or None."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    wanted = resolve_config(train_args)
    if metrics.get("iters") != wanted["iters"] or config_differences(metrics.get("config", {}), wanted):
        return None
    return metrics


def reach(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation point at which the test NLL is <= target, or None."""
    for point in curve:
        if point["test_nll"] <= target:
            return point
    return None


def summarise(runs: dict[str, dict[str, Any]], baseline: str = "ffjord") -> list[dict[str, Any]]:
    """One row per configuration, with the ratios to the baseline's totals at its final NLL."""
    base = runs[baseline]
    target = base["test_nll"]
    base_nfe = base["nfe_forward_total"] + base["nfe_backward_total"]
    base_cpu = base["cpu_seconds"]
    rows = []
    for name, m in runs.items():
        hit = reach(m["eval_curve"], target)
        nfe_total = m["nfe_forward_total"] + m["nfe_backward_total"]
        rows.append(
            {
                "config": name,
                "test_nll": m["test_nll"],
                "unit": m["unit"],
                "nfe_forward_total": m["nfe_forward_total"],
                "nfe_backward_total": m["nfe_backward_total"],
                "nfe_per_iteration": nfe_total / m["iters"],
                "cpu_seconds": m["cpu_seconds"],
                "cpu_ms_per_iteration": 1000 * m["cpu_seconds"] / m["iters"],
                "T": m["T"],
                "reached_at_iteration": None if hit is None else hit["iteration"],
                "nfe_ratio_to_reach": None if hit is None else hit["nfe_total"] / base_nfe,
                "cpu_ratio_to_reach": None if hit is None else hit["cpu_seconds"] / base_cpu,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The results table."""
    unit = rows[0]["unit"]
    lines = [
        f"**{title}**",
        "",
        f"| config | test NLL ({unit}) | NFE fwd | NFE bwd | NFE/iter | CPU ms/iter | final T | "
        "reached FFJORD's NLL at | NFE ratio to reach | CPU ratio to reach |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        T = ", ".join(f"{t:.3f}" for t in r["T"])
        if r["reached_at_iteration"] is None:
            reached = "not reached | - | -"
        else:
            reached = f"iter {r['reached_at_iteration']} | {r['nfe_ratio_to_reach']:.2f} | {r['cpu_ratio_to_reach']:.2f}"
        lines.append(
            f"| {r['config']} | {r['test_nll']:.4f} | {r['nfe_forward_total']} | {r['nfe_backward_total']} | "
            f"{r['nfe_per_iteration']:.1f} | {r['cpu_ms_per_iteration']:.1f} | {T} | {reached} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="8gaussians")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help=f"from {sorted(CONFIGS)}")
    parser.add_argument("--config", action="append", default=[], help="extra NAME=METHOD:FLAGS")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--train-args", default="", help="flags passed to every run, e.g. '--batch-size 100'")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=None, help="results file stem (default: compare_<data>)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take a configuration's metrics from its run directory if a run with the same settings finished there "
        "(lets a long benchmark be run one configuration at a time)",
    )
    args = parser.parse_args(argv)

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

    name = args.name or f"compare_{args.data}"
    command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    per_seed: dict[int, list[dict[str, Any]]] = {}
    started = time.time()
    for seed in args.seeds:
        runs: dict[str, dict[str, Any]] = {}
        for cfg in args.configs:
            method, flags = configs[cfg]
            out = args.runs / args.data / f"{cfg}-s{seed}"
            train_args = [
                "--data", args.data, "--method", method, "--iters", str(args.iters), "--seed", str(seed),
                "--out", str(out), "--eval-every", str(args.eval_every), "--threads", "1", "--no-progress",
                "--checkpoint-every", "0", *shlex.split(args.train_args), *flags,
            ]
            print(f"[{time.time() - started:7.0f}s] {args.data} seed {seed}: {cfg} ({method} {' '.join(flags)})", flush=True)
            previous = finished_run(out, train_args) if args.reuse else None
            if previous is not None:
                print(f"    reusing the finished run in {out}", flush=True)
            runs[cfg] = previous if previous is not None else run(train_args)
            m = runs[cfg]
            print(f"    test NLL {m['test_nll']:.4f}  NFE {m['nfe_forward_total']}+{m['nfe_backward_total']}  "
                  f"CPU {m['cpu_seconds']:.0f}s  T {m['T']}", flush=True)
        per_seed[seed] = summarise(runs)

    tables = [markdown(rows, f"{args.data}, seed {seed}, {args.iters} iterations") for seed, rows in per_seed.items()]
    if len(args.seeds) > 1:  # medians over seeds of the ratios
        agg = []
        for i, cfg in enumerate(args.configs):
            vals = [per_seed[s][i] for s in args.seeds]
            nfe = [v["nfe_ratio_to_reach"] for v in vals if v["nfe_ratio_to_reach"] is not None]
            cpu = [v["cpu_ratio_to_reach"] for v in vals if v["cpu_ratio_to_reach"] is not None]
            agg.append(f"| {cfg} | {statistics.median(v['test_nll'] for v in vals):.4f} | {len(nfe)}/{len(vals)} | "
                       f"{statistics.median(nfe) if nfe else float('nan'):.2f} | {statistics.median(cpu) if cpu else float('nan'):.2f} |")
        tables.append("**Over seeds** (medians; ratios over the seeds that reached FFJORD's NLL)\n\n"
                      "| config | test NLL | seeds reaching | NFE ratio | CPU ratio |\n|---|---|---|---|---|\n" + "\n".join(agg) + "\n")
    machine = f"{platform.processor() or platform.machine()}, {platform.platform()}, Python {platform.python_version()}, 1 thread"
    footer = f"\nCommand: `{command}`. Machine: {machine}.\n"
    text = "\n".join(tables) + footer
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": name, "command": command, "machine": machine, "data": args.data, "iters": args.iters,
        "seeds": args.seeds, "configs": {c: configs[c] for c in args.configs}, "train_args": args.train_args,
        "rows": {str(s): rows for s, rows in per_seed.items()},
    }
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
