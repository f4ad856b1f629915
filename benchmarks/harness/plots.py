r"""Figures of the CPU reproduction, from the run directories of :mod:`benchmarks.harness.train`.

Matplotlib's object-oriented API with the Agg canvas is used throughout (no pyplot, no
global backend switch), so the functions are safe to call from tests and scripts.

- :func:`density_grid` / :func:`plot_density`: a toy model's density :math:`p(x)` on a
  2-D grid, computed in the forward (density) direction,
  :math:`\log p(x) = \log \mathcal{N}(z(T)) - \Delta`.
- :func:`model_samples`: samples through the reverse direction
  (:func:`benchmarks.harness.cnf.sample`).
- :func:`figure_densities`: Figure 1 style, rows = data sets, columns = data and one
  column per method (FFJORD, TO-FLOW, ...), from the runs' final checkpoints.
- :func:`figure_snapshots`: Figure 2 style, densities at several iterations from the
  runs' ``--snapshot-iters`` snapshots (rows = runs, columns = iterations).
- :func:`figure_curves`: test NLL against CPU seconds and iterations, NFE per iteration
  and :math:`T` per horizon, from the runs' ``log.csv``.

Command line (from the repository root)::

    python -m benchmarks.harness.plots curves --runs runs/cb-ffjord runs/cb-toflow --out curves.png
    python -m benchmarks.harness.plots densities --runs runs/*-ffjord runs/*-toflow --out f1.png
    python -m benchmarks.harness.plots snapshots --runs runs/cb-* --iterations 100,500 --out f2.png
"""

from __future__ import annotations

__all__ = [
    "METHOD_ORDER",
    "density_grid",
    "figure_curves",
    "figure_densities",
    "figure_snapshots",
    "main",
    "model_samples",
    "plot_density",
    "plot_points",
    "read_run",
]

import argparse
import contextlib
import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn

from benchmarks.scoring import adaptive

from .cnf import end_times, sample, standard_normal_logprob
from .data import TOY_DATASETS, toy_sample
from .train import METHODS, load_model

PathLike = Union[str, Path]

METHOD_ORDER: tuple[str, ...] = tuple(METHODS)
"""The column order of the methods in :func:`figure_densities`."""

_LABELS = {
    "ffjord": "FFJORD",
    "steer": "STEER",
    "toflow": "TO-FLOW",
    "rnode": "RNODE",
    "rnode+toflow": "RNODE + TO-FLOW",
    "fm": "flow matching",
}

DEFAULT_BOUNDS = (-4.0, 4.0)


def _eval_solver(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": config["eval_solver"],
        "rtol": config["eval_rtol"],
        "atol": config["eval_atol"],
    }


# --------------------------------------------------------------------------- computations


@torch.no_grad()
def density_grid(
    model: nn.Module,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    resolution: int = 100,
    *,
    solver_kwargs: dict[str, Any] | None = None,
    batch_size: int = 10000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""The log-density of a 2-D flow on a square grid, through the forward direction.

    Arguments:
        model: A toy flow (e.g. from :func:`benchmarks.harness.train.load_model`), evaluated in
        eval
            mode (STEER at :math:`T_0`) at its current :math:`T`.
        bounds: The grid's range on both axes.
        resolution: Points per axis.
        solver_kwargs: The solver (default: the model's own).
        batch_size: Points per solve.
        seed: Seed of the Hutchinson probes, if the model uses them (torch's global RNG is
            left as it was).

    Returns:
        ``(xs, ys, logp)``: the axes, of shape ``(resolution,)``, and :math:`\log p` of
        shape ``(resolution, resolution)`` with rows along ``ys`` (for ``imshow(origin="lower")``).
    """
    dtype = next(model.parameters()).dtype
    xs = np.linspace(bounds[0], bounds[1], resolution)
    ys = np.linspace(bounds[0], bounds[1], resolution)
    gx, gy = np.meshgrid(xs, ys)
    points = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=dtype)
    was_training = model.training
    parts = []
    with torch.random.fork_rng(devices=[]), _maybe_override(model, solver_kwargs):
        torch.manual_seed(seed)
        model.eval()
        try:
            for start in range(0, points.shape[0], batch_size):
                x = points[start : start + batch_size]
                z, delta_logp, _ = model(x, x.new_zeros(x.shape[0]))
                parts.append(standard_normal_logprob(z) - delta_logp.reshape(-1))
        finally:
            model.train(was_training)
    logp = torch.cat(parts).double().numpy().reshape(resolution, resolution)
    return xs, ys, logp


@torch.no_grad()
def model_samples(
    model: nn.Module,
    n: int,
    *,
    seed: int = 0,
    solver_kwargs: dict[str, Any] | None = None,
) -> np.ndarray:
    """Samples of a 2-D flow through the reverse direction (:func:`benchmarks.harness.cnf.sample`).

    Arguments:
        model: A toy flow, sampled in eval mode at its current :math:`T`.
        n: The number of samples.
        seed: Seed of the base samples (and probes).
        solver_kwargs: The solver (default: the model's own).

    Returns:
        An array of shape ``(n, 2)``.
    """
    was_training = model.training
    with torch.random.fork_rng(devices=[]), _maybe_override(model, solver_kwargs):
        torch.manual_seed(seed)
        model.eval()
        try:
            x = sample(model, (n, 2), torch.Generator().manual_seed(seed)).z
        finally:
            model.train(was_training)
    return x.double().numpy()


def _maybe_override(model: nn.Module, solver_kwargs: dict[str, Any] | None) -> Any:
    return contextlib.nullcontext() if solver_kwargs is None else adaptive(model, solver_kwargs)


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {
        key: np.array([float(r[key]) if r[key] != "" else math.nan for r in rows])
        for key in rows[0]
    }


def read_run(run_dir: PathLike) -> dict[str, Any]:
    """Reads a run directory: its config, its metrics (if finished), its log and its evaluations.

    Arguments:
        run_dir: An ``--out`` directory of :mod:`benchmarks.harness.train`.

    Returns:
        ``{"dir", "config", "metrics", "log", "evals", "label"}``: ``log`` maps each
        column of ``log.csv`` to an array (blank cells are NaN); ``evals`` maps
        ``iteration``, ``test_nll``, ``cpu_seconds`` and ``nfe_total`` to arrays (from
        ``metrics.json``'s eval curve, which includes iteration 0, or from the log while
        the run is in progress).
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    log = _read_csv(run_dir / "log.csv") if (run_dir / "log.csv").exists() else {}
    keys = ("iteration", "test_nll", "cpu_seconds", "nfe_total")
    if metrics is not None:
        evals = {k: np.array([float(e[k]) for e in metrics["eval_curve"]]) for k in keys}
    elif log:
        done = ~np.isnan(log["test_nll"])
        nfe_total = np.cumsum(log["nfe_forward"] + log["nfe_backward"])
        evals = {
            "iteration": log["iteration"][done],
            "test_nll": log["test_nll"][done],
            "cpu_seconds": log["cpu_seconds"][done],
            "nfe_total": nfe_total[done],
        }
    else:
        evals = {k: np.array([]) for k in keys}
    extras = []
    if config.get("solver", "dopri5") != "dopri5":
        extras.append(f"{config['solver']} h={config.get('step_size')}")
    if config.get("budget"):
        extras.append(
            f"{config['budget']} rk4 steps"
            + (", learned placement" if config.get("placement") == "learned" else "")
        )
    if config.get("mode") and config.get("alpha") is not None and config["alpha"] != 0.1:
        extras.append(f"alpha={config['alpha']:g}")
    extra = f", {', '.join(extras)}" if extras else ""
    method = _LABELS.get(config["method"], config["method"])
    label = f"{method}{extra} ({config['data']}, seed {config['seed']})"
    return {
        "dir": run_dir,
        "config": config,
        "metrics": metrics,
        "log": log,
        "evals": evals,
        "label": label,
    }


# --------------------------------------------------------------------------- drawing


def plot_density(
    ax: Axes,
    xs: np.ndarray,
    ys: np.ndarray,
    logp: np.ndarray,
    title: str | None = None,
    cmap: str = "viridis",
) -> None:
    """Draws :math:`p = \\exp(\\log p)` of :func:`density_grid` on ``ax``, without ticks."""
    density = np.exp(np.nan_to_num(logp, nan=-np.inf))
    ax.imshow(
        density,
        origin="lower",
        extent=(xs[0], xs[-1], ys[0], ys[-1]),
        cmap=cmap,
        interpolation="nearest",
    )
    _decorate(ax, title)


def plot_points(
    ax: Axes,
    points: np.ndarray,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    bins: int = 100,
    title: str | None = None,
    cmap: str = "viridis",
) -> None:
    """Draws a 2-D histogram of ``points`` (data or samples) on ``ax``, without ticks."""
    ax.hist2d(points[:, 0], points[:, 1], bins=bins, range=[list(bounds), list(bounds)], cmap=cmap)
    ax.set_aspect("equal")
    _decorate(ax, title)


def _decorate(ax: Axes, title: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _save(fig: Figure, out: PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _grid(rows: int, cols: int, size: float = 2.2) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(size * cols, size * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def _toy_runs(runs: Sequence[PathLike]) -> list[dict[str, Any]]:
    infos = [read_run(r) for r in runs]
    images = [str(i["dir"]) for i in infos if i["config"]["data"] not in TOY_DATASETS]
    if images:
        raise ValueError(f"density figures need toy runs; {images} are image runs.")
    return infos


def figure_densities(
    runs: Sequence[PathLike],
    out: PathLike,
    *,
    kind: str = "density",
    resolution: int = 100,
    n_samples: int = 20000,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    solver_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Figure 1: rows = data sets, columns = the data and one column per method present.

    Each cell shows the final model of the first run (in ``runs`` order) of that data set
    and method, from its ``checkpoint.pt``.

    Arguments:
        runs: Toy run directories (e.g. FFJORD and TO-FLOW on several data sets).
        out: The PNG to write.
        kind: ``"density"`` (forward direction on a grid) or ``"samples"`` (reverse
            direction, a histogram of ``n_samples`` samples).
        resolution: Grid points per axis of the densities.
        n_samples: Points of the data (and samples) histograms.
        bounds: The plotted range.
        solver_kwargs: The solver of the figures (default: each run's evaluation solver).

    Returns:
        The path written.
    """
    if kind not in ("density", "samples"):
        raise ValueError(f"kind must be 'density' or 'samples', got {kind!r}.")
    infos = _toy_runs(runs)
    datasets = list(dict.fromkeys(i["config"]["data"] for i in infos))
    present = {i["config"]["method"] for i in infos}
    methods = [m for m in METHOD_ORDER if m in present]
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for info in infos:
        chosen.setdefault((info["config"]["data"], info["config"]["method"]), info)
    fig, axes = _grid(len(datasets), 1 + len(methods))
    for r, data in enumerate(datasets):
        test_seed = next(i["config"]["test_seed"] for i in infos if i["config"]["data"] == data)
        plot_points(
            axes[r, 0],
            toy_sample(data, n_samples, test_seed),
            bounds,
            title="data" if r == 0 else None,
        )
        axes[r, 0].set_ylabel(data)
        for c, method in enumerate(methods, start=1):
            ax = axes[r, c]
            info = chosen.get((data, method))
            title = _LABELS[method] if r == 0 else None
            if info is None:
                ax.axis("off")
                continue
            model, config, _ = load_model(info["dir"] / "checkpoint.pt")
            kwargs = _eval_solver(config) if solver_kwargs is None else solver_kwargs
            if kind == "density":
                plot_density(
                    ax, *density_grid(model, bounds, resolution, solver_kwargs=kwargs), title=title
                )
            else:
                plot_points(
                    ax, model_samples(model, n_samples, solver_kwargs=kwargs), bounds, title=title
                )
    return _save(fig, out)


def _snapshots(run_dir: Path) -> dict[int, Path]:
    folder = run_dir / "snapshots"
    if not folder.exists():
        return {}
    return {int(p.stem.split("_")[1]): p for p in sorted(folder.glob("iter_*.pt"))}


def figure_snapshots(
    runs: Sequence[PathLike],
    out: PathLike,
    *,
    iterations: Sequence[int] | None = None,
    resolution: int = 100,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    solver_kwargs: dict[str, Any] | None = None,
    n_samples: int = 20000,
) -> Path:
    """Figure 2: densities during training, rows = runs, columns = iterations.

    The models come from the runs' ``snapshots/`` (``--snapshot-iters``); a missing
    snapshot leaves its cell empty. The first column shows the data.

    Arguments:
        runs: Toy run directories (e.g. FFJORD and TO-FLOW on checkerboard).
        out: The PNG to write.
        iterations: The columns (default: every snapshot iteration of any run).
        resolution: Grid points per axis.
        bounds: The plotted range.
        solver_kwargs: The solver of the figures (default: each run's evaluation solver).
        n_samples: Points of the data histogram.

    Returns:
        The path written.
    """
    infos = _toy_runs(runs)
    found = [_snapshots(i["dir"]) for i in infos]
    columns = sorted(set().union(*found)) if iterations is None else sorted(set(iterations))
    if not columns:
        raise ValueError("no snapshots found: train with --snapshot-iters, e.g. 100,500,1000.")
    fig, axes = _grid(len(infos), 1 + len(columns))
    for r, (info, snaps) in enumerate(zip(infos, found)):
        config = info["config"]
        plot_points(
            axes[r, 0],
            toy_sample(config["data"], n_samples, config["test_seed"]),
            bounds,
            title="data" if r == 0 else None,
        )
        axes[r, 0].set_ylabel(_LABELS.get(config["method"], config["method"]))
        for c, iteration in enumerate(columns, start=1):
            ax = axes[r, c]
            if iteration not in snaps:
                ax.axis("off")
                continue
            model, config, _ = load_model(snaps[iteration])
            kwargs = _eval_solver(config) if solver_kwargs is None else solver_kwargs
            T = ", ".join(f"{h:.3f}" for h in end_times(model))
            plot_density(
                ax,
                *density_grid(model, bounds, resolution, solver_kwargs=kwargs),
                title=f"iter {iteration}, T={T}",
            )
    return _save(fig, out)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def figure_curves(
    runs: Sequence[PathLike], out: PathLike, *, smooth: int = 1, nll_from: int = 0
) -> Path:
    """Learning curves of several runs: test NLL against CPU seconds and iterations, NFE and T.

    Arguments:
        runs: Run directories (finished or in progress: ``log.csv`` is read).
        out: The PNG to write.
        smooth: Moving-average window of the per-iteration NFE curves.
        nll_from: Plot the test NLL from this iteration on (the untrained model's NLL can
            dwarf the differences that matter).

    Returns:
        The path written.

    Raises:
        ValueError: If ``nll_from`` is negative.
    """
    if nll_from < 0:
        raise ValueError(f"nll_from must be >= 0, got {nll_from}.")
    infos = [read_run(r) for r in runs]
    units = {"bits/dim" if i["config"]["data"] == "digits" else "nats" for i in infos}
    unit = units.pop() if len(units) == 1 else "nats or bits/dim"
    fig, axes = _grid(2, 2, size=3.6)
    (nll_cpu, nll_iter), (nfe_ax, t_ax) = axes
    colors = [f"C{k % 10}" for k in range(len(infos))]
    for info, color in zip(infos, colors):
        evals, log, label = info["evals"], info["log"], info["label"]
        keep = evals["iteration"] >= nll_from
        evals = {k: v[keep] for k, v in evals.items()}
        nll_cpu.plot(evals["cpu_seconds"], evals["test_nll"], "o-", ms=3, color=color, label=label)
        nll_iter.plot(evals["iteration"], evals["test_nll"], "o-", ms=3, color=color, label=label)
        if log:
            window = max(1, int(smooth))
            it = (
                log["iteration"][window - 1 :]
                if log["iteration"].size >= window
                else log["iteration"]
            )
            nfe_ax.plot(
                it, _smooth(log["nfe_forward"], window), "-", color=color, label=f"{label} fwd"
            )
            if np.any(log["nfe_backward"] > 0):
                nfe_ax.plot(
                    it,
                    _smooth(log["nfe_backward"], window),
                    "--",
                    color=color,
                    label=f"{label} bwd",
                )
            horizons = sorted(k for k in log if k.startswith("T_"))
            for k, key in enumerate(horizons):
                t_ax.plot(
                    log["iteration"],
                    log[key],
                    ["-", "--", ":", "-."][k % 4],
                    color=color,
                    label=f"{label} {key}",
                )
    nll_cpu.set(
        xlabel="CPU seconds (training)", ylabel=f"test NLL ({unit})", title="test NLL vs CPU time"
    )
    nll_iter.set(xlabel="iteration", ylabel=f"test NLL ({unit})", title="test NLL vs iterations")
    nfe_ax.set(
        xlabel="iteration",
        ylabel="NFE per iteration",
        title="NFE (solid forward, dashed backward)",
    )
    t_ax.set(xlabel="iteration", ylabel="T", title="end time per horizon")
    for ax in (nll_cpu, nll_iter, nfe_ax, t_ax):
        ax.grid(alpha=0.3)
    nll_iter.legend(fontsize=7)
    return _save(fig, out)


# --------------------------------------------------------------------------- command line


def _iterations(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.harness.plots {curves,densities,snapshots} --runs DIR --out PNG``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.harness.plots", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    curves = commands.add_parser("curves", help="test NLL vs CPU seconds / iterations, NFE, T")
    curves.add_argument(
        "--smooth", type=int, default=1, help="moving-average window of the NFE curves"
    )
    curves.add_argument(
        "--nll-from", type=int, default=0, help="plot the test NLL from this iteration on"
    )
    densities = commands.add_parser(
        "densities", help="Figure 1: rows data sets, columns data / methods"
    )
    densities.add_argument("--kind", choices=("density", "samples"), default="density")
    densities.add_argument("--samples", type=int, default=20000, help="points of the histograms")
    snapshots = commands.add_parser(
        "snapshots", help="Figure 2: densities at the snapshot iterations"
    )
    snapshots.add_argument(
        "--iterations", type=_iterations, default=None, help="e.g. 100,500,1000"
    )
    for sub in (curves, densities, snapshots):
        sub.add_argument(
            "--runs", nargs="+", required=True, help="run directories of benchmarks.harness.train"
        )
        sub.add_argument("--out", required=True, help="the PNG to write")
    for sub in (densities, snapshots):
        sub.add_argument("--resolution", type=int, default=100, help="grid points per axis")
    args = parser.parse_args(argv)
    if args.command == "curves":
        path = figure_curves(args.runs, args.out, smooth=args.smooth, nll_from=args.nll_from)
    elif args.command == "densities":
        path = figure_densities(
            args.runs, args.out, kind=args.kind, resolution=args.resolution, n_samples=args.samples
        )
    else:
        path = figure_snapshots(
            args.runs, args.out, iterations=args.iterations, resolution=args.resolution
        )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
