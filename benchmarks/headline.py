"""The headline table and figure from the finished benchmark results, no new training.

Reads ``benchmarks/results/headline_<data>.json`` (``benchmarks.compare`` over three seeds: FFJORD
dopri5, the best budgeted configuration, TO-FLOW with dopri5 where run, flow matching) and the runs
they name, and writes ``benchmarks/results/headline.{json,md}`` (the table, with medians over seeds
of the ratios to FFJORD's totals at its final NLL plus the margin), the budget ablations of the
sweeps and seeds (``budget_ablation{,_seeds}``) and ``docs/img/headline.png`` (test NLL against
training CPU seconds, first seed, one panel per data set)::

    python -m benchmarks.headline && python -m benchmarks.update_readme
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.writer import FIGURES, RESULTS, ROOT, command, write

__all__ = ["ablation", "figure", "main", "seeds", "table"]

LABELS = {
    "ffjord": "FFJORD (dopri5 1e-5)",
    "toflow": "TO-FLOW (dopri5, learned T)",
    "fm": "flow matching",
}


def _label(config: str) -> str:
    if config in LABELS:
        return LABELS[config]
    name, _, rest = config.partition("-b")
    n, _, placement = rest.partition("-")
    what = {"ffjord": "T fixed", "toflow": "learned T", "rnode": "RNODE, T fixed"}[name]
    place = {
        "": "learned placement" if name == "toflow" else "uniform",
        "uniform": "uniform",
        "learned": "learned placement",
        "noguard": "uniform, no guard",
    }[placement]
    return f"budget {n} rk4 steps ({what}, {place})"


def _median(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    return "-" if not got else f"{statistics.median(got):.2f}"


def table(results: dict[str, dict[str, Any]]) -> str:
    """Medians over seeds of each configuration's NLL and ratios to FFJORD's totals."""
    lines = [
        "| data | configuration | test NLL (median over seeds) | seeds reaching FFJORD's NLL + "
        "margin | NFE to reach (x FFJORD) | CPU to reach (x FFJORD) | total NFE (x FFJORD) | "
        "total CPU (x FFJORD) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("nfe_ratio_to_reach", "cpu_ratio_to_reach", "nfe_ratio_total", "cpu_ratio_total")
    for data, res in results.items():
        seeds = list(res["rows"])
        for i, row in enumerate(res["rows"][seeds[0]]):
            per_seed = [res["rows"][s][i] for s in seeds]
            unit = row["unit"]
            reached = sum(r["reached_at_iteration"] is not None for r in per_seed)
            nll = statistics.median(r["test_nll"] for r in per_seed)
            ratios = " | ".join(_median([r[k] for r in per_seed]) for k in keys)
            lines.append(
                f"| {data} | {_label(row['config'])} | {nll:.4f} {unit} | "
                f"{reached}/{len(per_seed)} | {ratios} |"
            )
    return "\n".join(lines) + "\n"


def ablation(sweeps: dict[str, dict[str, Any]]) -> str:
    """Learned against fixed T, learned against uniform placement, at each budget of the sweeps."""
    lines = [
        "| data | N | T fixed, uniform | learned T, uniform | T fixed, learned placement | "
        "learned T and placement | NFE per iteration (x FFJORD) |",
        "|---|---|---|---|---|---|---|",
    ]
    for data, res in sweeps.items():
        rows = {r["config"]: r for r in next(iter(res["rows"].values()))}
        base = rows["ffjord"]
        for n in (2, 3, 4, 6):
            cells = [
                rows.get(c)
                for c in (
                    f"ffjord-b{n}",
                    f"toflow-b{n}-uniform",
                    f"ffjord-b{n}-learned",
                    f"toflow-b{n}",
                )
            ]
            if not any(cells):
                continue
            text = [
                "-"
                if c is None
                else f"{c['test_nll']:.4f}" + ("" if c["reached_at_iteration"] is None else " *")
                for c in cells
            ]
            ratio = next(c for c in cells if c)["nfe_per_iteration"] / base["nfe_per_iteration"]
            lines.append(f"| {data} | {n} | " + " | ".join(text) + f" | {ratio:.2f} |")
        lines.append(f"| {data} | FFJORD dopri5 | {base['test_nll']:.4f} | | | | 1.00 |")
    return "\n".join(lines) + (
        "\n\nTest NLL (dopri5 1e-5) after the sweep's iterations, one seed; * marks a run that "
        "reached FFJORD's final NLL plus the margin. From "
        "`benchmarks/results/sweep_<data>.json`.\n"
    )


def seeds(results: dict[str, dict[str, Any]]) -> str:
    """An ablation over seeds where one seed's difference is within the seed-to-seed spread."""
    lines = [
        "| data | configuration | test NLL per seed | median | seeds reaching the target |",
        "|---|---|---|---|---|",
    ]
    for data, res in results.items():
        by_seed = res["rows"]
        for i, row in enumerate(next(iter(by_seed.values()))):
            per_seed = [by_seed[s][i] for s in by_seed]
            nll = [r["test_nll"] for r in per_seed]
            reached = sum(r["reached_at_iteration"] is not None for r in per_seed)
            lines.append(
                f"| {data} | {_label(row['config'])} | {' / '.join(f'{v:.4f}' for v in nll)} | "
                f"{statistics.median(nll):.4f} | {reached}/{len(nll)} |"
            )
    commands = "\n".join(f"- `{r['command']}`" for r in results.values())
    numbers = ", ".join(str(s) for s in next(iter(results.values()))["seeds"])
    return "\n".join(lines) + (
        f"\n\nTest NLL (dopri5 1e-5) per seed, seeds {numbers}; the target is FFJORD's final NLL "
        f"of the same seed plus the margin. Commands:\n\n{commands}\n"
    )


def figure(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {
        (data, config): ROOT
        / res.get("runs", "runs/bench")
        / data
        / f"{config}-s{res['seeds'][0]}"
        / "metrics.json"
        for data, res in results.items()
        for config in res["configs"]
    }
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        print(
            f"{path.name} not redrawn: its runs are not here ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); rerun the commands above to redraw it."
        )
        return
    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.8))
    for ax, (data, res) in zip(list(axes) if len(results) > 1 else [axes], results.items()):
        seed = res["seeds"][0]
        base = None
        for config in res["configs"]:
            m = json.loads(paths[data, config].read_text())
            curve = [p for p in m["eval_curve"] if p["iteration"] > 0]
            ax.plot(
                [p["cpu_seconds"] for p in curve],
                [p["test_nll"] for p in curve],
                lw=1.3,
                label=_label(config),
            )
            base = m["test_nll"] if config == "ffjord" else base
        unit = "bits/dim" if data == "digits" else "nats"
        ax.axhline(base, color="k", lw=0.6, ls=":")
        ax.set(
            xscale="log",
            xlabel="training CPU seconds (1 thread)",
            ylabel=f"test NLL ({unit}, dopri5)",
            title=f"{data}, seed {seed}",
        )
        ax.set_ylim(None, base + (0.4 if unit == "nats" else 0.2))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7) if len(results) > 1 else axes.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _read(folder: Path, prefix: str, names: list[str]) -> dict[str, dict[str, Any]]:
    paths = {d: folder / f"{prefix}_{d}.json" for d in names}
    return {d: json.loads(path.read_text()) for d, path in paths.items() if path.exists()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="+", default=["8gaussians", "checkerboard", "digits"])
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the compare results are"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the tables go")
    parser.add_argument("--figures", type=Path, default=FIGURES, help="where headline.png goes")
    args = parser.parse_args(argv)
    results = _read(args.results, "headline", args.data)
    sweeps, over_seeds = (
        _read(args.results, "sweep", args.data),
        _read(args.results, "seeds", args.data),
    )
    cmd = command("headline", argv)
    write(args.out, "budget_ablation", {"sweeps": sorted(sweeps)}, ablation(sweeps), cmd)
    if over_seeds:
        write(
            args.out,
            "budget_ablation_seeds",
            {"seeds": sorted(over_seeds)},
            seeds(over_seeds),
            cmd,
        )
    commands = "\n".join(f"- `{r['command']}`" for r in results.values())
    margins = "0.01 nats on the toy sets, 0.005 bits/dim on digits"
    text = table(results) + (
        "\nTest NLL always scored with dopri5 1e-5 on the same held-out set; NFE and CPU seconds "
        "count every training solve, the budget guard's reference solves included; ratios to "
        "FFJORD's totals of the same seed, medians over the seeds that reached the target "
        f"(FFJORD's final NLL + {margins}). Flow matching trains for FFJORD's CPU time and solves "
        "no ODE in training (its NFE counts one network evaluation per iteration). "
        f"Commands:\n\n{commands}\n"
    )
    write(args.out, "headline", {"data": args.data}, text, cmd)
    figure(results, args.figures / "headline.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
