"""Seconds, NFE and peak memory per iteration of upstream FFJORD's ``train_cnf.py``, patched.

The gradient options of a budget side by side (``backprop`` through the steps, the default;
``checkpoint``, each step recomputed in the backward pass; ``adjoint``, 0.3's solve of the adjoint
on the same steps), with upstream's own FFJORD (``--tempopt-off``: dopri5 1e-5 and its adjoint) as
the baseline. The model is the images benchmark's (:data:`benchmarks.images.MODEL`: upstream's
multiscale ODEnet) on real MNIST (``benchmarks.mnist_idx``), at each ``--imagesize`` and
``--batch``, one thread, seed 0.

Each configuration trains in its own process (``python -m benchmarks.iteration_cost child``) for
``--iters`` iterations: seconds per iteration are wall seconds between two optimizer steps (the
median, the first iteration excluded), NFE per iteration those of the last iteration (forward and
backward, all blocks; a budget's are the same every iteration until the guard grows it), peak
memory the process's peak resident set size (``ru_maxrss``; the same setup in every configuration,
so differences are the training iteration's)::

    python -m benchmarks.iteration_cost --ffjord .upstream/ffjord --imagesize 14 28 --batch 50 200
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy
import torch

from benchmarks.images import MODEL, prepare
from benchmarks.writer import RESULTS, ROOT, command, write

__all__ = ["CONFIGS", "main", "measure", "render"]

#: name -> the patch's keyword arguments
CONFIGS: dict[str, dict[str, Any]] = {
    "ffjord": {"off": True},
    "adjoint": {"budget": 2, "gradient": "adjoint"},
    "backprop": {"budget": 2, "gradient": "backprop"},
    "checkpoint": {"budget": 2, "gradient": "checkpoint"},
}
LABELS = {
    "ffjord": "FFJORD (dopri5 1e-5, adjoint)",
    "adjoint": "2 rk4 steps, adjoint on the steps (0.3)",
    "backprop": "2 rk4 steps, through the steps (0.4's default)",
    "checkpoint": "2 rk4 steps, through the steps, each recomputed",
}


class _Done(Exception):
    pass


def child(
    ffjord: Path, config: str, imagesize: int, batch: int, iters: int, out: Path
) -> dict[str, Any]:
    """Trains one configuration ``iters`` iterations in this process; returns its measurements."""
    from torch_tempopt.patches import ffjord as patch_module

    torch.set_num_threads(1)
    torch.manual_seed(0)
    numpy.random.seed(0)
    stamps: list[float] = []
    argv = [*MODEL, "--imagesize", str(imagesize), "--batch_size", str(batch), "--save", str(out)]
    with patch_module.patched(ffjord, script="train_cnf.py", **CONFIGS[config]) as patch:

        def stamp() -> None:
            stamps.append(time.perf_counter())
            if patch.iterations >= iters:
                raise _Done()

        patch.after_step.append(stamp)
        try:
            patch.run(argv)
        except _Done:
            pass
        budgets = [None if h.budget is None else h.budget.steps for h in patch.horizons]
    with open(out / "tempopt.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["iteration"]) == iters]
    seconds = [b - a for a, b in zip(stamps[:-1], stamps[1:])]  # iterations 2..iters
    return {
        "config": config,
        "imagesize": imagesize,
        "batch": batch,
        "iterations": iters,
        "seconds_per_iteration": statistics.median(seconds),
        "seconds": seconds,
        "nfe_forward": sum(int(r["nfe_forward"]) for r in rows),
        "nfe_backward": sum(int(r["nfe_backward"]) for r in rows),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "budgets": budgets,
    }


def measure(
    ffjord: Path, work: Path, configs: list[str], sizes: list[int], batches: list[int], iters: int
) -> list[dict[str, Any]]:
    """Every configuration at every size and batch, each in a fresh process."""
    checkout = prepare(ffjord, work)
    results = []
    for size in sizes:
        for batch in batches:
            for config in configs:
                out = work / f"{config}-{size}-{batch}"
                out.mkdir(parents=True, exist_ok=True)
                cmd = [
                    sys.executable, "-m", "benchmarks.iteration_cost", "child",
                    "--ffjord", str(checkout), "--config", config, "--imagesize", str(size),
                    "--batch", str(batch), "--iters", str(iters), "--out", str(out),
                ]  # fmt: skip
                env = {
                    "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1",
                    "MPLBACKEND": "Agg",
                    "PYTHONPATH": str(ROOT),
                }
                done = subprocess.run(
                    cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
                )
                if done.returncode != 0:
                    raise RuntimeError(
                        f"{config} at {size}x{size}, batch {batch} failed:\n{done.stderr[-3000:]}"
                    )
                results.append(json.loads((out / "cost.json").read_text()))
                print(_row(results[-1], results), flush=True)
    return results


def _row(r: dict[str, Any], results: list[dict[str, Any]]) -> str:
    base = next(
        (
            b
            for b in results
            if b["config"] == "ffjord"
            and b["imagesize"] == r["imagesize"]
            and b["batch"] == r["batch"]
        ),
        None,
    )
    ratio = (
        ""
        if base is None
        else f"{r['seconds_per_iteration'] / base['seconds_per_iteration']:.2f}x"
    )
    return (
        f"| {r['imagesize']}x{r['imagesize']} | {r['batch']} | {LABELS[r['config']]} | "
        f"{r['seconds_per_iteration']:.2f} | {ratio} | {r['nfe_forward']} + {r['nfe_backward']} | "
        f"{r['peak_rss_mib']:.0f} |"
    )


def render(results: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`measure`'s results."""
    lines = [
        "| image | batch | configuration | s / iteration | x FFJORD | NFE (forward + backward) | "
        "peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r, results) for r in results]
    iters = results[0]["iterations"] if results else 0
    lines += [
        "",
        "Real MNIST, upstream FFJORD's `train_cnf.py` through the patch (the images benchmark's "
        f"multiscale model), one thread, seed 0; {iters} iterations per configuration in a fresh "
        "process: seconds are the median wall seconds between optimizer steps after the first, "
        "NFE that of the last iteration (all blocks), peak RSS the process's (its setup is the "
        "same in every configuration).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="measure (the default)")
    one = sub.add_parser("child", help="one configuration, in this process")
    for p in (parser, run):
        p.add_argument("--ffjord", type=Path, help="an rtqichen/ffjord checkout")
        p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
        p.add_argument("--imagesize", nargs="+", type=int, default=[14, 28])
        p.add_argument("--batch", nargs="+", type=int, default=[50, 200])
        p.add_argument("--iters", type=int, default=4)
        p.add_argument("--work", type=Path, default=ROOT / "runs" / "iteration_cost")
        p.add_argument("--results", type=Path, default=RESULTS)
        p.add_argument("--name", default="iteration_cost")
    one.add_argument("--ffjord", type=Path, required=True)
    one.add_argument("--config", choices=sorted(CONFIGS), required=True)
    one.add_argument("--imagesize", type=int, required=True)
    one.add_argument("--batch", type=int, required=True)
    one.add_argument("--iters", type=int, required=True)
    one.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "child":
        result = child(args.ffjord, args.config, args.imagesize, args.batch, args.iters, args.out)
        (args.out / "cost.json").write_text(json.dumps(result, indent=1))
        return 0
    if args.ffjord is None or args.iters < 2:
        parser.error(
            "--ffjord PATH is required, and --iters must be at least 2 (the first is not timed)"
        )
    results = measure(
        args.ffjord.resolve(),
        args.work.resolve(),
        args.configs,
        args.imagesize,
        args.batch,
        args.iters,
    )
    cmd = command("iteration_cost", argv)
    write(args.results, args.name, {"rows": results}, render(results), cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
