"""The image benchmark's definition: upstream FFJORD's MNIST model, the configurations, the data.

Every configuration runs upstream's ``train_cnf.py`` unchanged through
``torch_tempopt.patches.ffjord``, in a fresh process with one thread, on the same model
(:data:`MODEL`: ``--multiscale True --dims 32,32 --strides 1,1,1 --num_blocks 1 --layer_type concat
--rademacher True --batch_size 50``), data (the 4,500 real MNIST training images of
``benchmarks.mnist_idx``) and seed, for the same CPU seconds. A step hook saves the weights at
fixed CPU marks (the seconds spent saving are not counted) and stops the run at the last. Every
checkpoint is then scored the same way, in another process: bits/dim of the 500 held-out images by
:data:`benchmarks.scoring.SOLVE` (dopri5 at ``rtol = atol = 1e-5``) with one fixed set of
Hutchinson (Rademacher) probes and dequantization noise.

NFE are exact: the training solves' evaluations from the patch's ``tempopt.csv`` plus the guard's
(``stepper.guard.stats["nfe"]``). Upstream's per-epoch figure of 100 samples is part of each run,
drawn as upstream draws it (with the training solver: the model never leaves ``train()`` without
validation).

Configurations (:data:`CONFIGS`): ``ffjord`` (``--tempopt-off``, dopri5 1e-5), ``toflow`` (the
paper's settings), ``b2``/``b4`` (2 or 4 rk4 steps, T fixed, the guard on, backpropagated through
the steps), ``b2-adjoint`` (the same 2 steps with upstream's ``odeint_adjoint`` solved backward on
them, 0.3's gradient), ``b2-checkpoint`` (the exact gradient of ``b2`` in less memory: each step
recomputed in the backward pass), ``rnode`` (RNODE's MNIST recipe: ``--tempopt-off --solver rk4
--step_size 0.25``, so 4 rk4 steps over upstream's T = 1, with RNODE's kinetic and Jacobian
penalties at 0.01 each, upstream's adjoint) and ``rnode-b2`` (the same penalties on 2 rk4 steps
with the guard); ``rnode-dto`` is RNODE's recipe backpropagated through its 4 steps instead of the
adjoint (discretize-then-optimize, Onken and Ruthotto 2020: a budget of 4 steps over T = 1 without
the guard). Upstream FFJORD has no RNODE penalties (its ``--l2int`` is the mean of ||f|| / sqrt(D);
its ``--JFrobint`` takes the exact Jacobian, 196 vector-Jacobian products per evaluation at 14x14),
so for these three configurations the training child puts RNODE's definitions under upstream's two
flags (:data:`RNODE_PENALTIES`, ``benchmarks.images_train``): 0.5 ||f||^2 / D and ||e^T df/dx||^2 /
D, the second with its own Rademacher probe e (one vector-Jacobian product per evaluation; RNODE's
fork reuses the divergence estimator's probe and saves that product).
``fm`` is the row a user with data would pick: upstream's single-scale model (``--multiscale
False``: the logit transform and one CNF block of the same ODEnet at full resolution; a multiscale
chain is not one ODE) trained by conditional flow matching with Meta's ``flow_matching`` library
(``benchmarks.images_fm``), no ODE solved, and scored like the others.

The commands, one job each (runs go to ``runs/images/<config>-s<seed>``, ``--runs``)::

    python -m benchmarks.images_train --ffjord .upstream/ffjord --configs ffjord b2 b4
    python -m benchmarks.images_score                     # every checkpoint not yet scored
    python -m benchmarks.images_report --name images_14   # results/images_14.{json,md}, docs/img
    python -m benchmarks.images_samples                   # docs/img/images_14_samples.png
    python -m benchmarks.images_iters --ffjord .upstream/ffjord --imagesize 28 --iters 4
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.mnist_idx import write_mnist
from benchmarks.scoring import SOLVE
from benchmarks.writer import ROOT

__all__ = [
    "CONFIGS",
    "LABELS",
    "MODEL",
    "RNODE_PENALTIES",
    "RUNS",
    "child",
    "load_checkpoint",
    "mark_of",
    "prepare",
    "read_run",
    "run_dirs",
    "score_argv",
    "split_argv",
    "train_argv",
    "upstream_model",
]

#: upstream ``train_cnf.py``'s flags of the model and the schedule, shared by every configuration
MODEL = [
    "--data", "mnist", "--multiscale", "True", "--dims", "32,32", "--strides", "1,1,1",
    "--num_blocks", "1", "--layer_type", "concat", "--rademacher", "True", "--batch_size", "50",
    "--test_batch_size", "100", "--val_freq", "100000", "--log_freq", "10",
    "--num_epochs", "100000",
]  # fmt: skip
#: name -> (the patch's keyword arguments, train_cnf.py flags)
CONFIGS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "ffjord": ({"off": True}, []),
    "toflow": ({"lr": 1e-2, "alpha": 0.1, "eps": 0.1}, []),
    "b2": ({"budget": 2}, []),
    "b2-adjoint": ({"budget": 2, "gradient": "adjoint"}, []),
    "b2-checkpoint": ({"budget": 2, "gradient": "checkpoint"}, []),
    "b4": ({"budget": 4}, []),
    # RNODE's recipe as far as upstream's flags reach: its rk4 grid, and upstream's (not RNODE's)
    # penalties
    "rnode": (
        {"off": True},
        ["--solver", "rk4", "--step_size", "0.25", "--l2int", "0.01", "--JFrobint", "0.01"],
    ),
    # the same grid (4 rk4 steps over T = 1) backpropagated through its steps, never grown
    "rnode-dto": (
        {"budget": 4, "guard": False},
        ["--solver", "rk4", "--step_size", "0.25", "--l2int", "0.01", "--JFrobint", "0.01"],
    ),
    "rnode-b2": ({"budget": 2}, ["--l2int", "0.01", "--JFrobint", "0.01"]),
    # flow matching trains upstream's single-scale model (logit transform, one block at full
    # resolution)
    "fm": ({"off": True}, ["--multiscale", "False"]),
}
#: the configurations whose --l2int / --JFrobint are RNODE's penalties (see the module docstring)
RNODE_PENALTIES = {"rnode", "rnode-dto", "rnode-b2"}
LABELS = {
    "ffjord": "FFJORD (dopri5 1e-5)",
    "toflow": "TO-FLOW (paper's settings)",
    "b2": "2 rk4 steps, guard",
    "b2-adjoint": "2 rk4 steps, guard, adjoint on the steps",
    "b2-checkpoint": "2 rk4 steps, guard, each step recomputed in backward",
    "b4": "4 rk4 steps, guard",
    "rnode": "RNODE (rk4 step 0.25, its penalties 0.01)",
    "rnode-dto": "RNODE's recipe through its steps",
    "rnode-b2": "RNODE's penalties on 2 rk4 steps, guard",
    "fm": "flow matching (one full-resolution block)",
}
#: where the runs go
RUNS = ROOT / "runs" / "images"


def prepare(ffjord: Path, work: Path, seed: int = 0) -> Path:
    """A copy of the checkout (its ``./data`` holds real MNIST's IDX files) under ``work``."""
    copy = work / "ffjord"
    if not (copy / "train_cnf.py").is_file():
        ignore = shutil.ignore_patterns(".git", "__pycache__", "assets", "imgs", "data")
        shutil.copytree(ffjord, copy, ignore=ignore)
    if not (copy / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        write_mnist(copy / "data", seed=seed, source="mnist5k")
    return copy


def split_argv(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """A command line's own arguments and those after ``--`` (upstream's flags)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def train_argv(config: str, imagesize: int) -> list[str]:
    """A configuration's ``train_cnf.py`` flags at ``imagesize``."""
    return [*MODEL, "--imagesize", str(imagesize), *CONFIGS[config][1]]


def score_argv(info: dict[str, Any]) -> list[str]:
    """A run's model (``run.json``) as ``train_cnf.py`` flags, its test solver :data:`SOLVE`."""
    single = ["--multiscale", "False"] if info["config"] == "fm" else []
    solve = ["--test_solver", SOLVE["method"], "--test_atol", str(SOLVE["atol"])]
    return [
        *train_argv("ffjord", info["imagesize"]),
        *single,
        *solve,
        "--test_rtol",
        str(SOLVE["rtol"]),
    ]


def read_run(out: Path) -> dict[str, Any]:
    """A run's ``run.json``; its CPU seconds under ``cpu_seconds`` (older runs: ``cpu_budget``)."""
    info = json.loads((out / "run.json").read_text())
    info.setdefault("cpu_seconds", info.get("cpu_budget"))
    return info


def mark_of(checkpoint: str | Path) -> float:
    """The CPU mark in a checkpoint's name, ``ckpt-<seconds>.pt``."""
    return float(Path(checkpoint).stem.split("-")[1])


def run_dirs(runs: Path, seed: int | None = None) -> list[Path]:
    """The run directories in ``runs`` (those of one ``seed``), by name."""
    found = sorted(p for p in runs.iterdir() if (p / "run.json").is_file())
    return [p for p in found if seed is None or read_run(p)["seed"] == seed]


def child(
    module: str, checkout: Path, args: list[str], **kwargs: Any
) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<module> ARGS`` in the checkout (upstream reads ./data), 1 thread."""
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", f"benchmarks.{module}", *args]
    return subprocess.run(command, cwd=checkout, env={**env, "PYTHONPATH": path}, **kwargs)


def upstream_model(patch: Any, argv: list[str]) -> SimpleNamespace:
    """Upstream's model from its own flags, inside ``patched(...) as patch``.

    Returns ``train_cnf`` (``tc``), its ``args``, the ``model``, its ``weights`` (every parameter
    but the horizons' T, in the order the checkpoints keep), the data and ``count_nfe``.
    """
    sys.argv = ["train_cnf.py", *argv]
    import train_cnf as tc
    from train_misc import count_nfe, set_cnf_options

    args = tc.args
    train_set, test_loader, data_shape = tc.get_dataset(args)
    model = tc.create_model(args, data_shape, None)
    set_cnf_options(args, model)
    times = {id(p) for h in patch.horizons for p in h.parameters()}
    weights = [p for p in model.parameters() if id(p) not in times]
    return SimpleNamespace(
        tc=tc,
        args=args,
        model=model,
        weights=weights,
        train_set=train_set,
        test_loader=test_loader,
        data_shape=data_shape,
        count_nfe=count_nfe,
    )


@torch.no_grad()
def load_checkpoint(upstream: SimpleNamespace, patch: Any, path: str) -> None:
    """Copies a checkpoint's weights and end times into :func:`upstream_model`'s model."""
    ck = torch.load(path, weights_only=False)
    shapes = [tuple(p.shape) for p in upstream.weights]
    if [tuple(w.shape) for w in ck["weights"]] != shapes:
        raise ValueError(
            f"{path} holds weights of other shapes than the model built from its flags."
        )
    for p, w in zip(upstream.weights, ck["weights"]):
        p.copy_(w)
    for h, state in zip(patch.horizons, ck["horizons"]):
        h.T.copy_(state["T"])
