"""Runs of ``benchmarks.harness.train`` window by window: test NLL, T and NFE per iteration.

For every window of ``--every`` iterations it prints, per run, the last test NLL evaluated at or
before the window's end, every horizon's T at the end, and the mean NFE (forward + backward) per
iteration over the window (with ``--split``, forward and backward apart), as a markdown table (read
from each run's ``log.csv`` and ``metrics.json``)::

    python -m benchmarks.windows --every 1000 --runs runs/bench/digits/{ffjord,toflow}-s0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.harness.plots import read_run

__all__ = ["main", "table"]


def table(runs: list[str | Path], every: int, *, split: bool = False) -> str:
    """The markdown table of windows of ``every`` iterations (``split``: NFE fwd + bwd)."""
    if every <= 0:
        raise ValueError(f"every must be a positive number of iterations, got {every}.")
    infos = [read_run(r) for r in runs]
    if any(not info["log"] for info in infos):
        raise ValueError("every run needs a log.csv with at least one iteration.")
    last = min(int(info["log"]["iteration"][-1]) for info in infos)
    what = "NFE fwd + bwd per iter" if split else "NFE per iter"
    header = (
        "| iteration | "
        + " | ".join(f"{info['label']}: NLL / T / {what}" for info in infos)
        + " |"
    )
    lines = [header, "|---:|" + "---|" * len(infos)]
    for end in range(every, last + 1, every):
        cells = []
        for info in infos:
            log, evals = info["log"], info["evals"]
            window = (log["iteration"] > end - every) & (log["iteration"] <= end)
            fwd, bwd = (
                float(np.mean(log["nfe_forward"][window])),
                float(np.mean(log["nfe_backward"][window])),
            )
            nfe = f"{fwd:.1f} + {bwd:.1f}" if split else f"{fwd + bwd:.1f}"
            row = int(np.flatnonzero(log["iteration"] == end)[0])
            T = ", ".join(
                f"{log[k][row]:.3f}" for k in sorted(k for k in log if k.startswith("T_"))
            )
            done = evals["iteration"] <= end
            nll = f"{evals['test_nll'][done][-1]:.4f}" if done.any() else "-"
            cells.append(f"{nll} / {T} / {nfe}")
        lines.append(f"| {end:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", nargs="+", required=True, help="run directories of benchmarks.harness.train"
    )
    parser.add_argument("--every", type=int, default=1000, help="iterations per window")
    parser.add_argument(
        "--split", action="store_true", help="NFE per iteration as forward + backward"
    )
    args = parser.parse_args(argv)
    text = table(args.runs, args.every, split=args.split)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
