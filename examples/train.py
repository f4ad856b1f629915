r"""The training runner of the CPU reproduction: FFJORD, STEER, TO-FLOW, RNODE and their mixes.

Run from the repository root::

    python -m examples.train --data checkerboard --method toflow --iters 10000 --seed 0 --out runs/cb-toflow

Methods (all on the reference CNF of :mod:`examples.cnf`):

``ffjord``
    Fixed end time :math:`T = T_0` (``time_mode="fixed"``).
``steer``
    STEER: in training :math:`T \sim U[T_0 - b, T_0 + b]` with :math:`b = T_0 - 0.25`;
    evaluated at :math:`T_0`.
``toflow``
    TO-FLOW: :math:`T` learned by :class:`torch_tempopt.CoordinateDescentStepper`
    (Adam on :math:`T` with lr ``--tempopt-lr``, temporal regulariser ``--alpha``,
    clip margin ``--eps``; ``--mode alternate`` is the paper's Algorithm 1).
``rnode``
    Fixed :math:`T` plus RNODE's kinetic and Jacobian penalties (``--kinetic``, ``--jacobian``).
``rnode+toflow``
    Both: learned :math:`T` and the RNODE penalties.
``joint``
    :math:`T` stepped by the weight optimizer with the weights, without regulariser or
    clip (``CoordinateDescentStepper(mode="joint")``): what upstream FFJORD's
    ``--train_T`` was meant to do.

Data: the eight 2-D toy sets of :mod:`examples.data` (loss and test NLL in nats) and
``digits`` (8x8 images, uniform dequantization and logit transform, bits/dim).

Outputs in ``--out``:

``config.json``
    The resolved configuration (written at the start).
``log.csv``
    One row per iteration: loss, every horizon's :math:`T` and :math:`dL/dT`, forward and
    backward NFE, cumulative wall and CPU seconds of training, and the test NLL at
    evaluation iterations (blank otherwise).
``checkpoint.pt``
    Everything needed to continue bitwise with ``--resume``: model, optimizer (and
    stepper) state, RNG states of torch, numpy, Python and the data generator, counters
    and the log so far. Written every ``--checkpoint-every`` iterations and at the end.
``snapshots/iter_NNNNNN.pt``
    The model at the iterations of ``--snapshot-iters`` (for :mod:`examples.plots`).
``metrics.json``
    The summary (final test NLL, NFE and time totals, final :math:`T`), the config, the
    evaluation curve and the per-iteration log.

The test NLL is measured with a fixed solver (``--eval-solver``, ``--eval-rtol``,
``--eval-atol``; dopri5 at 1e-5 by default) on a fixed held-out set drawn with
``--test-seed`` (independent of ``--seed``), without gradients, at the model's current
:math:`T` (:math:`T_0` for STEER). Its evaluations are neither counted in the NFE totals
nor in the training clocks, and they leave every random state of the training untouched.

:func:`run` runs the same in-process and returns the metrics.
"""

from __future__ import annotations

__all__ = [
    "DATASETS",
    "FIXED_GRID_SOLVERS",
    "METHODS",
    "build_model",
    "build_parser",
    "config_differences",
    "evaluate",
    "load_model",
    "main",
    "resolve_config",
    "run",
    "solver_override",
]

import argparse
import contextlib
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from torch_tempopt import CoordinateDescentStepper, LearnableHorizon

from .cnf import (
    CNF,
    bits_per_dim_and_reg,
    build_image_model,
    build_toy_model,
    end_times,
    network_parameters,
    nfe,
    nll_and_reg,
)
from .data import TOY_DATASETS, load_digits_split, toy_sample

DATASETS: tuple[str, ...] = (*TOY_DATASETS, "digits")
"""The accepted ``--data`` values."""

METHODS: dict[str, dict[str, Any]] = {
    "ffjord": {"time_mode": "fixed", "rnode": False, "stepper": None},
    "steer": {"time_mode": "steer", "rnode": False, "stepper": None},
    "toflow": {"time_mode": "learn", "rnode": False, "stepper": "tempopt"},
    "rnode": {"time_mode": "fixed", "rnode": True, "stepper": None},
    "rnode+toflow": {"time_mode": "learn", "rnode": True, "stepper": "tempopt"},
    "joint": {"time_mode": "learn", "rnode": False, "stepper": "joint"},
}
"""Each method's time treatment, whether it adds the RNODE penalties and how T is stepped."""

FIXED_GRID_SOLVERS: tuple[str, ...] = (
    "euler",
    "midpoint",
    "heun2",
    "heun3",
    "rk4",
    "explicit_adams",
    "implicit_adams",
    "fixed_adams",
)
"""torchdiffeq's fixed-grid methods: they need ``--step-size``."""

ADAPTIVE_SOLVERS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")

CHECKPOINT_FORMAT = 1

# Config keys that may differ between a run and its --resume (they do not change the trajectory).
_RESUMABLE_CHANGES = frozenset(
    {
        "iters",
        "out",
        "resume",
        "progress",
        "checkpoint_every",
        "eval_every",
        "snapshot_iters",
        "threads",
        "eval_batch_size",
    }
)

_TOY_DEFAULTS: dict[str, Any] = {
    "batch_size": 100,  # FFJORD's train_toy.py default
    "T0": 0.5,
    "hidden": "64,64,64",
    "num_blocks": 1,
    "divergence": "exact",
    "test_size": 10000,
}
_IMAGE_DEFAULTS: dict[str, Any] = {
    "batch_size": 200,
    "T0": 1.0,
    "hidden": "64,64,64",
    "num_blocks": 2,
    "divergence": "hutchinson",
    "test_size": None,  # the whole held-out split (360 images)
}

ArgsLike = Union[Sequence[str], argparse.Namespace, dict, None]


# --------------------------------------------------------------------------- configuration


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers, e.g. 100,500,1000; got {text!r}"
        ) from error
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"iterations must be >= 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of :func:`run` (``python -m examples.train --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m examples.train",
        description="Train a CNF (FFJORD / STEER / TO-FLOW / RNODE) on a toy set or 8x8 digits, on the CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", choices=DATASETS, default="checkerboard")
    p.add_argument("--method", choices=tuple(METHODS), default="toflow")
    p.add_argument("--iters", type=_non_negative_int, default=10000, help="total training iterations")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the model init, batches and probes")
    p.add_argument("--out", required=True, help="output directory")

    g = p.add_argument_group("model")
    g.add_argument("--hidden", default=None, help="hidden widths/channels, e.g. 64,64,64 (default 64,64,64)")
    g.add_argument("--num-blocks", type=_positive_int, default=None, help="CNF blocks (default 1 toy, 2 digits)")
    g.add_argument("--T0", type=float, default=None, help="initial/fixed end time (default 0.5 toy, 1.0 digits)")
    g.add_argument(
        "--divergence", choices=("exact", "hutchinson"), default=None, help="default exact toy, hutchinson digits"
    )
    g.add_argument(
        "--layer-type", choices=("concatsquash", "concat"), default=None, help="default concatsquash toy, concat digits"
    )
    g.add_argument(
        "--nonlinearity", choices=("tanh", "softplus"), default=None, help="default tanh toy, softplus digits"
    )
    g.add_argument(
        "--net",
        choices=("conv", "mlp"),
        default=None,
        help="digits only: conv (FFJORD's image net, default) or mlp (on the flattened 8x8 image, FFJORD's tabular net)",
    )
    g.add_argument("--adjoint", action=argparse.BooleanOptionalAction, default=True, help="odeint_adjoint as FFJORD")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_positive_int, default=None, help="default 100 toy (FFJORD train_toy.py), 200 digits")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the weights")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--tempopt-lr", type=float, default=1e-2, help="Adam learning rate of T (TO-FLOW)")
    g.add_argument("--alpha", type=float, default=0.1, help="temporal regulariser alpha |T - t0| (TO-FLOW)")
    g.add_argument("--eps", type=float, default=0.1, help="clip margin: T in [t0 + eps, 2 T0 - t0 - eps]")
    g.add_argument("--mode", choices=("alternate", "exact"), default="alternate", help="TO-FLOW update scheme")
    g.add_argument("--reset-at-bound", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--skip-nonfinite", action="store_true", help="skip steps with NaN/inf gradients")
    g.add_argument("--kinetic", type=float, default=0.01, help="RNODE kinetic coefficient (rnode, rnode+toflow)")
    g.add_argument("--jacobian", type=float, default=0.01, help="RNODE Jacobian coefficient (rnode, rnode+toflow)")

    g = p.add_argument_group("solver")
    g.add_argument("--solver", choices=ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS, default="dopri5")
    g.add_argument("--rtol", type=float, default=1e-5)
    g.add_argument("--atol", type=float, default=1e-5)
    g.add_argument("--step-size", type=float, default=None, help="step size of fixed-grid solvers")

    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval-every", type=_non_negative_int, default=100, help="test NLL every K iterations (0: end only)"
    )
    g.add_argument(
        "--test-size", type=_positive_int, default=None, help="held-out points (default 10000 toy, all 360 digits)"
    )
    g.add_argument("--test-seed", type=_non_negative_int, default=12345, help="seed of the held-out set, not --seed")
    g.add_argument("--eval-batch-size", type=_positive_int, default=10000)
    g.add_argument("--eval-solver", choices=ADAPTIVE_SOLVERS, default="dopri5")
    g.add_argument("--eval-rtol", type=float, default=1e-5)
    g.add_argument("--eval-atol", type=float, default=1e-5)
    g.add_argument("--split-seed", type=_non_negative_int, default=0, help="digits train/test split")

    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=_positive_int, default=1, help="torch.set_num_threads")
    g.add_argument("--checkpoint-every", type=_non_negative_int, default=500, help="0: only at the end")
    g.add_argument("--snapshot-iters", type=_int_list, default=[], help="e.g. 100,500,1000: model snapshots")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return p


def resolve_config(args: ArgsLike) -> dict[str, Any]:
    """Parses ``args`` and fills the data-dependent defaults.

    Arguments:
        args: A list of command-line strings, an :class:`argparse.Namespace` from
            :func:`build_parser`, or a dict of overrides of the parser's defaults
            (``out`` required).

    Returns:
        The configuration, a JSON-serialisable dict.

    Raises:
        ValueError: For inconsistent settings (e.g. a fixed-grid solver without a step size).
    """
    parser = build_parser()
    if args is None:
        ns = parser.parse_args()
    elif isinstance(args, argparse.Namespace):
        ns = args
    elif isinstance(args, dict):
        if "out" not in args:
            raise ValueError("the configuration needs 'out', the output directory.")
        ns = parser.parse_args(["--out", str(args["out"])])
        unknown = set(args) - set(vars(ns))
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}; see python -m examples.train --help.")
        for key, value in args.items():
            setattr(ns, key, value)
    else:
        ns = parser.parse_args(list(args))
    config = dict(vars(ns))
    config["out"] = str(config["out"])
    config["snapshot_iters"] = sorted(int(i) for i in (config.get("snapshot_iters") or []))
    image = config["data"] == "digits"
    defaults = dict(_IMAGE_DEFAULTS if image else _TOY_DEFAULTS)
    defaults["layer_type"] = "concat" if image else "concatsquash"
    defaults["nonlinearity"] = "softplus" if image else "tanh"
    for key, value in defaults.items():
        if config.get(key) is None:
            config[key] = value
    config["hidden"] = ",".join(str(w) for w in _hidden(config["hidden"]))
    if not image and config.get("net") is not None:
        raise ValueError(f"--net applies to --data digits only (toy sets always use an MLP), got --net {config['net']}.")
    if image and config.get("net") is None:
        config["net"] = "conv"
    # Record what the method uses: the update scheme of T, and the RNODE coefficients only where they apply.
    spec = METHODS.get(config["method"], {})
    if spec.get("stepper") == "joint":
        config["mode"] = "joint"
    elif spec.get("stepper") is None:
        config["mode"] = None
    if not spec.get("rnode", True):
        config["kinetic"] = config["jacobian"] = 0.0
    if config["data"] not in DATASETS:
        raise ValueError(f"data must be one of {DATASETS}, got {config['data']!r}.")
    if config["method"] not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {config['method']!r}.")
    if config["solver"] in FIXED_GRID_SOLVERS and config["step_size"] is None:
        raise ValueError(f"--solver {config['solver']} is a fixed-grid method: give --step-size.")
    if config["solver"] not in FIXED_GRID_SOLVERS and config["step_size"] is not None:
        raise ValueError(f"--step-size applies to fixed-grid solvers {FIXED_GRID_SOLVERS}, not {config['solver']}.")
    if not 0 < config["eps"] < config["T0"]:
        raise ValueError(f"--eps must be in (0, T0) = (0, {config['T0']}), got {config['eps']}.")
    if config["method"] == "steer" and config["T0"] <= 0.25:
        raise ValueError(f"STEER samples T in [0.25, 2 T0 - 0.25]: it needs T0 > 0.25, got {config['T0']}.")
    return config


def _hidden(text: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(text, str):
        try:
            widths = tuple(int(w) for w in text.split(",") if w.strip())
        except ValueError as error:
            raise ValueError(f"--hidden must be comma-separated integers, e.g. 64,64,64; got {text!r}.") from error
    else:
        widths = tuple(int(w) for w in text)
    if not widths or any(w <= 0 for w in widths):
        raise ValueError(f"--hidden must hold positive widths, got {text!r}.")
    return widths


def _solver_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    if config["solver"] in FIXED_GRID_SOLVERS:
        return {"method": config["solver"], "options": {"step_size": float(config["step_size"])}}
    return {"method": config["solver"], "rtol": float(config["rtol"]), "atol": float(config["atol"])}


def _eval_solver_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {"method": config["eval_solver"], "rtol": float(config["eval_rtol"]), "atol": float(config["eval_atol"])}


# --------------------------------------------------------------------------- model and optimizer


@contextlib.contextmanager
def _torch_settings(dtype: torch.dtype, threads: int | None = None) -> Iterator[None]:
    """Sets the default dtype (and thread count) for the block, restoring the caller's afterwards."""
    old_dtype = torch.get_default_dtype()
    old_threads = torch.get_num_threads()
    torch.set_default_dtype(dtype)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        if threads is not None:
            torch.set_num_threads(old_threads)


def _horizons(model: nn.Module) -> list[LearnableHorizon]:
    return [m for m in model.modules() if isinstance(m, LearnableHorizon)]


def build_model(config: dict[str, Any]) -> nn.Module:
    """The CNF of a configuration, in its dtype, with NFE counters; initialised from torch's global RNG.

    Arguments:
        config: A configuration from :func:`resolve_config`.

    Returns:
        A :class:`~examples.cnf.SequentialFlow`.
    """
    spec = METHODS[config["method"]]
    kinetic = float(config["kinetic"]) if spec["rnode"] else 0.0
    jacobian = float(config["jacobian"]) if spec["rnode"] else 0.0
    common: dict[str, Any] = {
        "num_blocks": int(config["num_blocks"]),
        "divergence": config["divergence"],
        "kinetic": kinetic,
        "jacobian": jacobian,
        "T0": float(config["T0"]),
        "layer_type": config["layer_type"],
        "nonlinearity": config["nonlinearity"],
        "time_mode": spec["time_mode"],
        "solver_kwargs": _solver_kwargs(config),
        "adjoint": bool(config["adjoint"]),
        "count": True,
        "horizon_kwargs": {"eps": float(config["eps"])},
    }
    dtype = getattr(torch, config["dtype"])
    with _torch_settings(dtype):
        if config["data"] == "digits":
            model = build_image_model(
                channels=1, hidden_channels=_hidden(config["hidden"]), net=_saved_config(config)["net"], **common
            )
        else:
            model = build_toy_model(hidden=_hidden(config["hidden"]), **common)
    return model


def _build_optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    weights = torch.optim.Adam(network_parameters(model), lr=config["lr"], weight_decay=config["weight_decay"])
    kind = METHODS[config["method"]]["stepper"]
    if kind is None:
        return weights
    mode = "joint" if kind == "joint" else config["mode"] or "alternate"
    return CoordinateDescentStepper(
        weights,
        model,
        lr=config["tempopt_lr"],
        alpha=config["alpha"],
        mode=mode,
        reset_at_bound=bool(config["reset_at_bound"]),
        skip_nonfinite=bool(config["skip_nonfinite"]),
    )


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any], int]:
    """Rebuilds the model saved in a checkpoint or snapshot (or a run directory's checkpoint).

    Arguments:
        path: ``DIR/checkpoint.pt``, ``DIR/snapshots/iter_NNNNNN.pt`` or ``DIR``.

    Returns:
        ``(model, config, iteration)``, the model in evaluation mode.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, _saved_config(state["config"]), int(state["iteration"])


# --------------------------------------------------------------------------- data


class _Data:
    """Training batches from a seeded generator and a fixed held-out set."""

    def __init__(self, config: dict[str, Any], dtype: torch.dtype) -> None:
        self.config = config
        self.name = config["data"]
        self.dtype = dtype
        self.image = self.name == "digits"
        self.batch_size = int(config["batch_size"])
        if self.image:
            self.train, test = load_digits_split(seed=int(config["split_seed"]))
            if config["test_size"] is not None:
                test = test[: int(config["test_size"])]
            self.test = test
            if self.batch_size > self.train.shape[0]:
                raise ValueError(f"--batch-size {self.batch_size} exceeds the {self.train.shape[0]} training images.")
            self.generator: Any = torch.Generator().manual_seed(int(config["seed"]))
        else:
            self.test = torch.from_numpy(toy_sample(self.name, int(config["test_size"]), int(config["test_seed"]))).to(
                dtype
            )
            self.generator = np.random.default_rng(int(config["seed"]))

    @property
    def unit(self) -> str:
        return "bits/dim" if self.image else "nats"

    def batch(self) -> Tensor:
        """The next training batch: points, or grey levels of images."""
        if self.image:
            index = torch.randperm(self.train.shape[0], generator=self.generator)[: self.batch_size]
            return self.train[index]
        return torch.from_numpy(toy_sample(self.name, self.batch_size, self.generator)).to(self.dtype)

    def loss(self, model: nn.Module, x: Tensor, generator: Any = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(loss, nll, regs)``: the NLL (nats or bits/dim) plus the RNODE penalties."""
        if self.image:
            nll, regs = bits_per_dim_and_reg(model, x, generator=self.generator if generator is None else generator)
        else:
            nll, regs = nll_and_reg(model, x)
        loss = nll + sum(regs.values()) if regs else nll
        return loss, nll, regs

    def get_state(self) -> Any:
        if self.image:
            return self.generator.get_state()
        return self.generator.bit_generator.state

    def set_state(self, state: Any) -> None:
        if self.image:
            self.generator.set_state(state)
        else:
            self.generator.bit_generator.state = state


@contextlib.contextmanager
def solver_override(model: nn.Module, solver_kwargs: dict[str, Any]) -> Iterator[None]:
    """Swaps every CNF block's solver for ``solver_kwargs`` (plain odeint, no adjoint) within the ``with`` block."""
    blocks = [m for m in model.modules() if isinstance(m, CNF)]
    saved = [(b.solver_kwargs, b.adjoint) for b in blocks]
    try:
        for b in blocks:
            b.solver_kwargs = dict(solver_kwargs)
            b.adjoint = False
        yield
    finally:
        for b, (kwargs, adjoint) in zip(blocks, saved):
            b.solver_kwargs = kwargs
            b.adjoint = adjoint


def evaluate(
    model: nn.Module,
    test: Tensor,
    *,
    image: bool,
    solver_kwargs: dict[str, Any],
    seed: int,
    batch_size: int = 10000,
) -> float:
    """The mean test NLL (nats) or bits/dim, without gradients, at the model's current T.

    Runs in evaluation mode (STEER at :math:`T_0`) with ``solver_kwargs``; the
    Hutchinson probes and the dequantization noise come from ``seed``, so the value is a
    deterministic function of the weights. Torch's global RNG and the model's mode are
    restored afterwards, and the NFE counters are reset (evaluations are not counted).

    Arguments:
        model: The flow.
        test: Points, or grey levels of images.
        image: Whether ``test`` holds images (bits/dim) or points (nats).
        solver_kwargs: The fixed evaluation solver.
        seed: Seed of the probes and the dequantization.
        batch_size: Chunk size of the evaluation.

    Returns:
        The mean over ``test``.
    """
    was_training = model.training
    nfe(model, reset=True)
    total = 0.0
    with torch.random.fork_rng(devices=[]), torch.no_grad(), solver_override(model, solver_kwargs):
        torch.manual_seed(seed)
        dequant = torch.Generator().manual_seed(seed)
        model.eval()
        try:
            for start in range(0, test.shape[0], batch_size):
                chunk = test[start : start + batch_size]
                if image:
                    value, _ = bits_per_dim_and_reg(model, chunk, generator=dequant)
                else:
                    value, _ = nll_and_reg(model, chunk.to(next(model.parameters()).dtype))
                total += float(value) * chunk.shape[0]
        finally:
            model.train(was_training)
            nfe(model, reset=True)
    return total / test.shape[0]


# --------------------------------------------------------------------------- checkpoints


def _rng_states(data: _Data) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
        "data": data.get_state(),
    }


def _set_rng_states(states: dict[str, Any], data: _Data) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_as_tuples(states["python"]))
    data.set_state(states["data"])


def _as_tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration with the defaults of options added since it was written."""
    if saved.get("data") == "digits" and "net" not in saved:  # runs from before --net used the conv net
        return {**saved, "net": "conv"}
    return saved


def config_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The keys, outside those a ``--resume`` may change, on which two configurations differ."""
    saved = _saved_config(saved)
    return sorted(k for k in set(saved) | set(config) if k not in _RESUMABLE_CHANGES and saved.get(k) != config.get(k))


def _check_resumable(saved: dict[str, Any], config: dict[str, Any]) -> None:
    differ = config_differences(saved, config)
    if differ:
        saved = _saved_config(saved)
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in differ)
        raise ValueError(
            f"--resume with a different configuration ({details}); only {sorted(_RESUMABLE_CHANGES)} may change."
        )


# --------------------------------------------------------------------------- the run


def _log_columns(n_horizons: int, reg_names: Sequence[str]) -> list[str]:
    return [
        "iteration",
        "loss",
        "nll",
        *reg_names,
        *(f"T_{i}" for i in range(n_horizons)),
        *(f"dLdT_{i}" for i in range(n_horizons)),
        "nfe_forward",
        "nfe_backward",
        "wall_seconds",
        "cpu_seconds",
        "test_nll",
    ]


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


class _CsvLog:
    """``log.csv``, rewritten from the rows so far and appended to row by row."""

    def __init__(self, path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
        self.columns = columns
        self.file = open(path, "w", newline="")  # noqa: SIM115 (closed in close())
        self.writer = csv.writer(self.file)
        self.writer.writerow(columns)
        for row in rows:
            self.append(row, flush=False)
        self.file.flush()

    def append(self, row: dict[str, Any], flush: bool = True) -> None:
        self.writer.writerow([_csv_value(row.get(c)) for c in self.columns])
        if flush:
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def run(args: ArgsLike = None) -> dict[str, Any]:
    """Trains one model and returns its metrics (also written to ``OUT/metrics.json``).

    The caller's default dtype, thread count and torch/numpy/Python random states are
    restored on return.

    Arguments:
        args: Command-line strings (``["--data", "8gaussians", "--out", "runs/x", ...]``),
            a Namespace from :func:`build_parser`, or a dict of settings (see
            :func:`resolve_config`).

    Returns:
        The metrics: ``method``, ``data``, ``iters``, ``test_nll``, ``unit``,
        ``nfe_forward_total``, ``nfe_backward_total``, ``cpu_seconds``, ``wall_seconds``,
        ``T``, ``config``, ``eval_curve`` and ``log`` among others.
    """
    config = resolve_config(args)
    dtype = getattr(torch, config["dtype"])
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]), _torch_settings(dtype, int(config["threads"])):
            return _Run(config).train()
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class _Run:
    """The state of one training run."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.out = Path(config["out"])
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = getattr(torch, config["dtype"])
        seed = int(config["seed"])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.data = _Data(config, self.dtype)
        self.model = build_model(config)
        self.model.train()
        self.optimizer = _build_optimizer(self.model, config)
        self.horizons = _horizons(self.model)
        self.reg_names = [n for n in ("kinetic", "jacobian") if config[n] > 0]
        self.columns = _log_columns(len(self.horizons), self.reg_names)
        self.iteration = 0
        self.nfe_forward = 0
        self.nfe_backward = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.rows: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        if config["resume"]:
            self._resume()
        with open(self.out / "config.json", "w") as f:
            json.dump(config, f, indent=2)

    # ------------------------------------------------------------ persistence
    def _resume(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} has checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}.")
        _check_resumable(state["config"], self.config)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_states(state["rng"], self.data)
        self.iteration = int(state["iteration"])
        counters = state["counters"]
        self.nfe_forward = int(counters["nfe_forward"])
        self.nfe_backward = int(counters["nfe_backward"])
        self.wall = float(counters["wall_seconds"])
        self.cpu = float(counters["cpu_seconds"])
        self.rows = list(state["log"])
        self.evals = list(state["evals"])

    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_states(self.data),
            "counters": {
                "nfe_forward": self.nfe_forward,
                "nfe_backward": self.nfe_backward,
                "wall_seconds": self.wall,
                "cpu_seconds": self.cpu,
            },
            "log": self.rows,
            "evals": self.evals,
        }

    def _checkpoint(self) -> None:
        _atomic_save(self._state(), self.out / "checkpoint.pt")

    def _snapshot(self) -> None:
        folder = self.out / "snapshots"
        folder.mkdir(exist_ok=True)
        state = {"config": self.config, "iteration": self.iteration, "model": self.model.state_dict()}
        _atomic_save(state, folder / f"iter_{self.iteration:06d}.pt")

    # ------------------------------------------------------------ evaluation
    def _evaluate(self) -> float:
        value = evaluate(
            self.model,
            self.data.test,
            image=self.data.image,
            solver_kwargs=_eval_solver_kwargs(self.config),
            seed=int(self.config["test_seed"]),
            batch_size=int(self.config["eval_batch_size"]),
        )
        self.evals.append(
            {
                "iteration": self.iteration,
                "test_nll": value,
                "cpu_seconds": self.cpu,
                "wall_seconds": self.wall,
                "nfe_forward": self.nfe_forward,
                "nfe_backward": self.nfe_backward,
                "nfe_total": self.nfe_forward + self.nfe_backward,
                "T": end_times(self.model),
            }
        )
        return value

    # ------------------------------------------------------------ training
    def _step(self) -> tuple[float, float, dict[str, float]]:
        """One iteration; returns the loss, the NLL and the penalties (before the step)."""
        self.optimizer.zero_grad(set_to_none=True)
        x = self.data.batch()
        if isinstance(self.optimizer, CoordinateDescentStepper) and self.optimizer.mode == "exact":
            # The closure is called twice (before and after the weight step): same batch, same dequantization.
            data_state = self.data.get_state()
            first: list[tuple[Tensor, Tensor, dict[str, Tensor]]] = []

            def closure() -> Tensor:
                self.optimizer.zero_grad(set_to_none=True)
                self.data.set_state(data_state)
                result = self.data.loss(self.model, x)
                result[0].backward()
                if not first:
                    first.append(result)
                return result[0]

            self.optimizer.step(closure)
            loss, nll, regs = first[0]
        else:
            loss, nll, regs = self.data.loss(self.model, x)
            loss.backward()
            self.optimizer.step()
        return loss.item(), nll.item(), {k: v.item() for k, v in regs.items()}

    def train(self) -> dict[str, Any]:
        config = self.config
        iters = int(config["iters"])
        eval_every = int(config["eval_every"])
        checkpoint_every = int(config["checkpoint_every"])
        snapshots = set(config["snapshot_iters"])
        if self.iteration == 0:
            self.rows, self.evals = [], []
            if 0 in snapshots:
                self._snapshot()
            if iters > 0:
                self._evaluate()  # the initial model, at zero cost
        log = _CsvLog(self.out / "log.csv", self.columns, self.rows)
        bar = _progress(config, self.iteration, iters)
        try:
            while self.iteration < iters:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                loss, nll, regs = self._step()
                self.cpu += time.process_time() - cpu0
                self.wall += time.perf_counter() - wall0
                self.iteration += 1
                counts = nfe(self.model, reset=True)
                self.nfe_forward += counts["forward"]
                self.nfe_backward += counts["backward"]
                row: dict[str, Any] = {"iteration": self.iteration, "loss": loss, "nll": nll, **regs}
                for i, h in enumerate(self.horizons):
                    row[f"T_{i}"] = float(h.T.detach())
                    row[f"dLdT_{i}"] = None if h.T.grad is None else float(h.T.grad)
                row.update(
                    nfe_forward=counts["forward"],
                    nfe_backward=counts["backward"],
                    wall_seconds=self.wall,
                    cpu_seconds=self.cpu,
                    test_nll=None,
                )
                if self.iteration == iters or (eval_every and self.iteration % eval_every == 0):
                    row["test_nll"] = self._evaluate()
                self.rows.append(row)
                log.append(row)
                if self.iteration in snapshots:
                    self._snapshot()
                if self.iteration == iters or (checkpoint_every and self.iteration % checkpoint_every == 0):
                    self._checkpoint()
                if bar is not None:
                    postfix = {
                        "loss": f"{loss:.4f}",
                        "T": ",".join(f"{row[f'T_{i}']:.3f}" for i in range(len(self.horizons))),
                        "nfe": f"{counts['forward']}+{counts['backward']}",
                    }
                    if self.evals:
                        postfix["test"] = f"{self.evals[-1]['test_nll']:.4f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
        finally:
            log.close()
            if bar is not None:
                bar.close()
        if not self.evals:
            self._evaluate()
        if self.iteration == 0:
            self._checkpoint()
        metrics = self._metrics()
        with open(self.out / "metrics.json", "w") as f:
            json.dump(metrics, f, indent=1)
        return metrics

    def _metrics(self) -> dict[str, Any]:
        config = self.config
        last = self.evals[-1] if self.evals else {}
        done = max(self.iteration, 1)
        return {
            "method": config["method"],
            "data": config["data"],
            "seed": config["seed"],
            "iters": self.iteration,
            "test_nll": last.get("test_nll", math.nan),
            "unit": self.data.unit,
            "nfe_forward_total": self.nfe_forward,
            "nfe_backward_total": self.nfe_backward,
            "nfe_total": self.nfe_forward + self.nfe_backward,
            "cpu_seconds": self.cpu,
            "wall_seconds": self.wall,
            "cpu_seconds_per_iteration": self.cpu / done,
            "wall_seconds_per_iteration": self.wall / done,
            "nfe_forward_per_iteration": self.nfe_forward / done,
            "nfe_backward_per_iteration": self.nfe_backward / done,
            "T": end_times(self.model),
            "clip_counts": _clip_counts(self.optimizer),
            "config": config,
            "eval_curve": self.evals,
            "log": self.rows,
            "torch_version": torch.__version__,
        }


def _clip_counts(optimizer: torch.optim.Optimizer) -> list[int] | None:
    if isinstance(optimizer, CoordinateDescentStepper):
        return [int(h["clip_count"]) for h in optimizer.stats["horizons"]]
    return None


def _progress(config: dict[str, Any], start: int, total: int) -> Any:
    if not config["progress"]:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        desc=f"{config['method']} {config['data']}",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: trains and prints the summary."""
    metrics = run(list(sys.argv[1:] if argv is None else argv))
    summary = {
        k: metrics[k]
        for k in (
            "method",
            "data",
            "iters",
            "test_nll",
            "unit",
            "T",
            "nfe_forward_total",
            "nfe_backward_total",
            "cpu_seconds",
            "wall_seconds",
        )
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
