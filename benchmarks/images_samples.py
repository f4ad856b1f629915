"""A figure of samples from the image benchmark's runs of one seed: the last checkpoint of each.

Each model samples through the reverse solve by the scoring solve (dopri5 1e-5), from the same
latent draws, in a fresh process (``child``)::

    python -m benchmarks.images_samples [--n 64] [--seed 0]   # docs/img/images_14_samples.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.images import (
    CONFIGS,
    LABELS,
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
from benchmarks.writer import FIGURES

__all__ = ["draw", "figure", "main", "samples"]


def draw(checkout: Path, checkpoint: Path, n: int, flags: list[str]) -> None:
    """Saves ``n`` samples of a checkpoint's model beside it (``.samples``), latent seed 4321."""
    from torch_tempopt.patches import ffjord as ffjord_patch

    torch.set_num_threads(1)
    with ffjord_patch.patched(checkout, script="train_cnf.py", off=True) as patch:
        upstream = upstream_model(patch, flags)
        load_checkpoint(upstream, patch, str(checkpoint))
        upstream.model.eval()
        shape = upstream.data_shape
        z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(4321))
        with torch.no_grad():
            x = upstream.model(z, reverse=True).view(-1, *shape).clamp(0, 1)
        torch.save(x, checkpoint.with_suffix(".samples"))


def samples(runs: Path, seed: int, n: int) -> list[tuple[str, torch.Tensor]]:
    """``(title, samples)`` of the last checkpoint of each run of ``seed``, in CONFIGS' order."""
    from torch_tempopt.patches.torchvision_cpu import make_grid

    checkout, order = (runs / "ffjord").resolve(), list(CONFIGS)
    grids = []
    for out in sorted(
        run_dirs(runs.resolve(), seed), key=lambda p: order.index(read_run(p)["config"])
    ):
        info = read_run(out)
        last = max(out.glob("ckpt-*.pt"), key=mark_of)
        (out / "score").mkdir(exist_ok=True)
        flags = [*score_argv(info), "--save", str(out / "score")]
        args = [
            "child",
            "--checkout",
            str(checkout),
            "--checkpoint",
            str(last),
            "--n",
            str(n),
            "--",
            *flags,
        ]
        done = child("images_samples", checkout, args, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"sampling {out.name} failed:\n{done.stderr[-3000:]}")
        x = torch.load(last.with_suffix(".samples"))
        title = f"{LABELS[info['config']]}, seed {info['seed']}, {last.stem[5:]} CPU s"
        grids.append((title, make_grid(x, nrow=int(len(x) ** 0.5))[0].numpy()))
    return grids


def figure(grids: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """The grids side by side, four to a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, grid) in zip(axes.flat, grids):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title.replace(", seed", "\nseed"), fontsize=8)
    fig.tight_layout(h_pad=2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    own, flags = split_argv(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--n", type=int, default=64, help="samples per model")
    parser.add_argument("--seed", type=int, default=0, help="the runs of this seed")
    parser.add_argument("--name", default="images_14_samples")
    parser.add_argument("--figures", type=Path, default=FIGURES)
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("child", help="draw in this process: OPTIONS -- TRAIN_CNF FLAGS")
    one.add_argument("--checkout", type=Path, required=True)
    one.add_argument("--checkpoint", type=Path, required=True)
    one.add_argument("--n", type=int, required=True)
    args = parser.parse_args(own)
    if args.command == "child":
        draw(args.checkout, args.checkpoint, args.n, flags)
    else:
        figure(samples(args.runs, args.seed, args.n), args.figures / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
