"""Scores the image benchmark's checkpoints: held-out bits/dim by the scoring solve (dopri5 1e-5).

For every run in ``--runs``, the checkpoints not yet in its ``scores.jsonl`` are scored in a fresh
process (``child``: upstream's model built from its own flags, each checkpoint's weights loaded,
:func:`benchmarks.scoring.upstream_bits_per_dim`), one JSON line each::

    python -m benchmarks.images_score [--runs runs/images] [--batch 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.images import (
    RUNS,
    child,
    load_checkpoint,
    mark_of,
    read_run,
    run_dirs,
    score_argv,
    split_argv,
    upstream_model,
)
from benchmarks.scoring import upstream_bits_per_dim

__all__ = ["main", "score", "score_checkpoints"]


def _todo(out: Path) -> list[str]:
    scored_path = out / "scores.jsonl"
    lines = scored_path.read_text().splitlines() if scored_path.is_file() else []
    scored = {json.loads(line)["checkpoint"] for line in lines}
    found = (str(p) for p in out.glob("ckpt-*.pt") if str(p) not in scored)
    return sorted(found, key=mark_of)


def score(runs: Path, batch: int) -> None:
    """Scores every checkpoint in ``runs`` not yet scored, appending to its ``scores.jsonl``."""
    checkout = (runs / "ffjord").resolve()
    for out in run_dirs(runs.resolve()):
        todo = _todo(out)
        if not todo:
            continue
        (out / "score").mkdir(exist_ok=True)
        argv = [
            *score_argv(read_run(out)),
            "--save",
            str(out / "score"),
            "--test_batch_size",
            str(batch),
        ]
        print(f"{out.name}: scoring {len(todo)} checkpoints", flush=True)
        args = ["child", "--checkout", str(checkout), "--checkpoints", *todo, "--", *argv]
        with open(out / "scores.jsonl", "a") as sink:
            done = child(
                "images_score", checkout, args, stdout=sink, stderr=subprocess.PIPE, text=True
            )
        if done.returncode != 0:
            raise SystemExit(f"scoring {out.name} failed:\n{done.stderr[-3000:]}")


def score_checkpoints(checkout: Path, checkpoints: list[str], flags: list[str]) -> None:
    """Prints a JSON line per checkpoint: its bits/dim, the scoring NFE and CPU seconds, its T."""
    import torch

    from torch_tempopt.patches import ffjord as ffjord_patch

    torch.set_num_threads(1)
    with ffjord_patch.patched(checkout, script="train_cnf.py", off=True) as patch:
        upstream = upstream_model(patch, flags)
        for path in checkpoints:
            load_checkpoint(upstream, patch, path)
            scores = upstream_bits_per_dim(
                upstream.model,
                upstream.test_loader,
                upstream.tc.compute_bits_per_dim,
                upstream.count_nfe,
            )
            T = [h.T.item() for h in patch.horizons]
            print(json.dumps({"checkpoint": path, **scores, "T": T}), flush=True)


def main(argv: list[str] | None = None) -> int:
    own, flags = split_argv(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--batch", type=int, default=100, help="held-out images per solve")
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("child", help="score in this process: OPTIONS -- TRAIN_CNF FLAGS")
    one.add_argument("--checkout", type=Path, required=True)
    one.add_argument("--checkpoints", nargs="+", required=True)
    args = parser.parse_args(own)
    if args.command == "child":
        score_checkpoints(args.checkout, args.checkpoints, flags)
    else:
        score(args.runs, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
