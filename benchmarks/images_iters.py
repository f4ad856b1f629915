"""Seconds and NFE per iteration over the first iterations of each image configuration.

Each configuration trains for ``--iters`` iterations in a fresh process
(``benchmarks.images_train``'s child, upstream logging every iteration); the seconds are upstream's
logged wall seconds per iteration, the NFE the training solves' from the patch's ``tempopt.csv``
(flow matching has no solves to time)::

    python -m benchmarks.images_iters --ffjord .upstream/ffjord --imagesize 28 --iters 4
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.images import CONFIGS, LABELS, RUNS, prepare, train_argv
from benchmarks.images_train import launch
from benchmarks.writer import RESULTS, command, write

__all__ = ["SOLVING", "main", "measure"]

#: the configurations that solve ODEs in training
SOLVING = [c for c in CONFIGS if c != "fm"]


def _measure_one(
    checkout: Path, out: Path, config: str, imagesize: int, iters: int, seed: int
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = [*train_argv(config, imagesize), "--log_freq", "1"]
    if launch(checkout, out, config, argv, seed, iters=iters + 1) != 0:
        raise SystemExit(f"{config} failed; see {out / 'stdout.txt'}")
    with open(out / "tempopt.csv") as f:
        table = list(csv.DictReader(f))
    per: dict[int, list[dict[str, str]]] = {}
    for r in table:
        per.setdefault(int(r["iteration"]), []).append(r)
    nfe = [
        sum(int(r["nfe_forward"]) + int(r["nfe_backward"]) for r in rs)
        for _, rs in sorted(per.items())
    ]
    log = (out / "logs").read_text()
    seconds = [float(m) for m in re.findall(r"Iter \d+ \| Time ([0-9.]+)\(", log)][:iters]
    T = sorted({round(float(r["T"]), 4) for r in table})
    return {"config": config, "seconds": seconds, "nfe": nfe[:iters], "T": T}


def measure(
    ffjord: Path, runs: Path, configs: list[str], imagesize: int, iters: int, seed: int
) -> tuple[list[dict[str, Any]], str]:
    """Every configuration's seconds, NFE and T per iteration, and their markdown table."""
    checkout = prepare(ffjord.resolve(), runs.resolve())
    head = "| configuration | s per iteration | NFE per iteration (forward + backward, all blocks)"
    lines = [head + " | T |", "|---|---|---|---|"]
    rows = []
    for config in configs:
        out = (runs / f"iters{imagesize}-{config}").resolve()
        row = _measure_one(checkout, out, config, imagesize, iters, seed)
        rows.append(row)
        T = row["T"][0] if len(row["T"]) == 1 else f"{row['T'][0]}..{row['T'][-1]}"
        seconds = " ".join(f"{s:.2f}" for s in row["seconds"])
        lines.append(f"| {LABELS[config]} | {seconds} | {' '.join(map(str, row['nfe']))} | {T} |")
    caption = (
        f"Real MNIST at {imagesize}x{imagesize}, batch 50, upstream FFJORD's train_cnf.py through "
        f"the patch, one thread; the first {iters} iterations (upstream's logged wall seconds per "
        "iteration; the guard checks a budget at iteration 1, whose seconds include it while its "
        "NFE, here, are the training solves' only)."
    )
    return rows, "\n".join(lines) + "\n\n" + caption


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ffjord", type=Path, required=True, help="an rtqichen/ffjord checkout (994864ad)"
    )
    parser.add_argument("--configs", nargs="+", choices=SOLVING, default=SOLVING)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imagesize", type=int, default=28)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows, text = measure(
        args.ffjord, args.runs, args.configs, args.imagesize, args.iters, args.seed
    )
    write(
        args.out,
        f"images_iters{args.imagesize}",
        {"rows": rows},
        text,
        command("images_iters", argv),
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
