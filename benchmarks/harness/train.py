r"""The benchmarks' training runner: FFJORD, STEER, TO-FLOW, RNODE, flow matching; budgets or not.

    python -m benchmarks.harness.train --data checkerboard --method toflow --out runs/cb-toflow
    python -m benchmarks.harness.train --data 8gaussians --method ffjord --budget 4 --out runs/b4

Methods (on the reference CNF of :mod:`benchmarks.harness.cnf`): ``ffjord`` (T fixed), ``steer`` (T
drawn in training), ``toflow`` (T learned by :class:`torch_tempopt.CoordinateDescentStepper`),
``rnode`` (T fixed, RNODE's kinetic and Jacobian penalties), ``rnode+toflow``, and ``fm`` (the same
field trained by conditional flow matching, no ODE solve in training; ``--max-cpu-seconds`` gives
it a CPU budget). ``--budget N`` trains every solve on N rk4 steps (placement learned by default
for TO-FLOW, uniform otherwise; ``--placement``), guarded against the adaptive ``--solver`` every
``--guard-every`` steps. The test NLL is always scored adaptively (``--eval-solver``, dopri5 at
1e-5) on a held-out set drawn from ``--test-seed``, outside the NFE counts and clocks, leaving
every random state untouched.

Outputs in ``--out``: ``config.json``; ``log.csv`` (one row per iteration: loss, every horizon's T,
dL/dT, budget and guard error, forward and backward NFE, cumulative CPU and wall seconds, the test
NLL at evaluations); ``checkpoint.pt`` (``--resume`` continues bitwise);
``snapshots/iter_NNNNNN.pt``; ``metrics.json`` (the summary, the evaluation curve and the log).
"""

from __future__ import annotations

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

from benchmarks.scoring import SOLVE, adaptive, cnf_nll
from torch_tempopt import BudgetGuard, CoordinateDescentStepper

from .cnf import (
    bits_per_dim_and_reg,
    build_image_model,
    build_toy_model,
    end_times,
    flow_matching_loss,
    horizons,
    network_parameters,
    nfe,
    nll_and_reg,
    to_logit_space,
)
from .data import TOY_DATASETS, load_digits_split, toy_sample

__all__ = [
    "DATASETS",
    "METHODS",
    "build_model",
    "build_parser",
    "config_differences",
    "evaluate",
    "load_model",
    "main",
    "resolve_config",
    "run",
]

DATASETS: tuple[str, ...] = (*TOY_DATASETS, "digits")
#: time treatment, RNODE penalties, stepper (T learned), default placement on a budget
METHODS: dict[str, dict[str, Any]] = {
    "ffjord": {"time_mode": "fixed", "rnode": False, "learn": False},
    "steer": {"time_mode": "steer", "rnode": False, "learn": False},
    "toflow": {"time_mode": "learn", "rnode": False, "learn": True},
    "rnode": {"time_mode": "fixed", "rnode": True, "learn": False},
    "rnode+toflow": {"time_mode": "learn", "rnode": True, "learn": True},
    "fm": {"time_mode": "fixed", "rnode": False, "learn": False},
}
FIXED_GRID_SOLVERS = (
    "euler",
    "midpoint",
    "heun2",
    "heun3",
    "rk4",
    "explicit_adams",
    "implicit_adams",
    "fixed_adams",
)
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
CHECKPOINT_FORMAT = 2
# Settings a --resume may change: they do not change the trajectory.
_RESUMABLE = frozenset(
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
        "max_cpu_seconds",
    }
)
_TOY = {
    "batch_size": 100,
    "T0": 0.5,
    "hidden": "64,64,64",
    "num_blocks": 1,
    "divergence": "exact",
    "test_size": 10000,
    "layer_type": "concatsquash",
    "nonlinearity": "tanh",
}
_IMAGE = {
    "batch_size": 200,
    "T0": 1.0,
    "hidden": "64,64,64",
    "num_blocks": 2,
    "divergence": "hutchinson",
    "test_size": None,
    "layer_type": "concat",
    "nonlinearity": "softplus",
    "net": "conv",
}
_GUARD = frozenset({"guard_every", "guard_tol"})
ArgsLike = Union[Sequence[str], argparse.Namespace, dict, None]


def _positive_int(text: str) -> int:
    if int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def _natural(text: str) -> int:
    if int(text) < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.harness.train", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data", choices=DATASETS, default="checkerboard")
    p.add_argument("--method", choices=tuple(METHODS), default="toflow")
    p.add_argument("--iters", type=_natural, default=10000, help="training iterations")
    p.add_argument(
        "--seed", type=_natural, default=0, help="seed of the model, batches and probes"
    )
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", default=None, help="hidden widths, e.g. 64,64,64")
    g.add_argument(
        "--num-blocks",
        type=_positive_int,
        default=None,
        help="CNF blocks (default 1 toy, 2 digits)",
    )
    g.add_argument(
        "--T0",
        type=float,
        default=None,
        help="initial/fixed end time (default 0.5 toy, 1.0 digits)",
    )
    g.add_argument("--layer-type", choices=("concatsquash", "concat"), default=None)
    g.add_argument("--nonlinearity", choices=("tanh", "softplus"), default=None)
    g.add_argument("--divergence", choices=("exact", "hutchinson"), default=None)
    g.add_argument(
        "--net",
        choices=("conv", "mlp"),
        default=None,
        help="digits: conv net or MLP on the flat image",
    )
    g.add_argument(
        "--adjoint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="odeint_adjoint as FFJORD",
    )
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch-size", type=_positive_int, default=None, help="default 100 toy, 200 digits"
    )
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--tempopt-lr", type=float, default=1e-2, help="Adam learning rate of T")
    g.add_argument("--alpha", type=float, default=0.1, help="temporal regulariser alpha |T - t0|")
    g.add_argument(
        "--eps", type=float, default=0.1, help="clip margin: T in [t0 + eps, 2 T0 - t0 - eps]"
    )
    g.add_argument("--reset-at-bound", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--skip-nonfinite", action="store_true")
    g.add_argument("--kinetic", type=float, default=0.01, help="RNODE kinetic coefficient")
    g.add_argument("--jacobian", type=float, default=0.01, help="RNODE Jacobian coefficient")
    g.add_argument(
        "--max-cpu-seconds",
        type=float,
        default=None,
        help="stop once training has used this CPU time",
    )
    g = p.add_argument_group("solver")
    g.add_argument("--solver", choices=ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS, default="dopri5")
    g.add_argument("--rtol", type=float, default=1e-5)
    g.add_argument("--atol", type=float, default=1e-5)
    g.add_argument("--step-size", type=float, default=None, help="step size of fixed-grid solvers")
    g.add_argument(
        "--budget", type=_positive_int, default=None, help="train on N rk4 steps per solve"
    )
    g.add_argument(
        "--placement",
        choices=("uniform", "learned"),
        default=None,
        help="default: learned for TO-FLOW",
    )
    g.add_argument(
        "--guard-every", type=_natural, default=100, help="budget guard period (0: off)"
    )
    g.add_argument(
        "--guard-tol", type=float, default=0.025, help="budget guard tolerance (per dimension)"
    )
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval-every",
        type=_natural,
        default=100,
        help="test NLL every N iterations (0: only at the end)",
    )
    g.add_argument(
        "--test-size",
        type=_positive_int,
        default=None,
        help="held-out points (toy: 10000; digits: all)",
    )
    g.add_argument("--test-seed", type=_natural, default=12345, help="seed of the held-out set")
    g.add_argument("--eval-batch-size", type=_positive_int, default=10000)
    g.add_argument("--eval-solver", choices=ADAPTIVE_SOLVERS, default=SOLVE["method"])
    g.add_argument("--eval-rtol", type=float, default=SOLVE["rtol"])
    g.add_argument("--eval-atol", type=float, default=SOLVE["atol"])
    g.add_argument("--split-seed", type=_natural, default=0, help="digits train/test split")
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=_positive_int, default=1)
    g.add_argument("--checkpoint-every", type=_natural, default=500, help="0: only at the end")
    g.add_argument(
        "--snapshot-iters", type=lambda s: [int(i) for i in s.split(",") if i], default=[]
    )
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar"
    )
    return p


def resolve_config(args: ArgsLike) -> dict[str, Any]:
    """Parses strings, a Namespace or a dict of settings (``out`` required); fills the defaults."""
    parser = build_parser()
    if isinstance(args, dict):
        ns = parser.parse_args(["--out", str(args.get("out", ""))])
        unknown = set(args) - set(vars(ns))
        if unknown or "out" not in args:
            raise ValueError(
                f"unknown or missing configuration keys {sorted(unknown) or ['out']}; see --help."
            )
        vars(ns).update(args)
    else:
        ns = (
            args
            if isinstance(args, argparse.Namespace)
            else parser.parse_args(None if args is None else list(args))
        )
    c = dict(vars(ns), out=str(ns.out))
    image = c["data"] == "digits"
    for key, value in (_IMAGE if image else _TOY).items():
        c[key] = value if c.get(key) is None else c[key]
    if not image and c["net"] is not None:
        raise ValueError(f"--net applies to --data digits only, got --net {c['net']}.")
    spec = METHODS[c["method"]]
    if not spec["rnode"]:
        c["kinetic"] = c["jacobian"] = 0.0
    fixed = c["solver"] in FIXED_GRID_SOLVERS
    if fixed != (c["step_size"] is not None):
        raise ValueError(
            f"--step-size goes with the fixed-grid solvers {FIXED_GRID_SOLVERS}, "
            f"got --solver {c['solver']}."
        )
    if c["budget"] is not None and fixed:
        raise ValueError(
            "--budget needs an adaptive --solver (its guard's reference), "
            f"got --solver {c['solver']}."
        )
    if c["budget"] is not None and c["method"] in ("fm", "steer"):
        raise ValueError(f"--budget needs a method that solves on it, got --method {c['method']}.")
    if c["budget"] is None:
        if c["placement"] is not None:
            raise ValueError(
                f"--placement {c['placement']} needs --budget N (it places the budget's steps)."
            )
    elif c["placement"] is None:
        c["placement"] = "learned" if spec["learn"] else "uniform"
    if not 0 < c["eps"] < c["T0"]:
        raise ValueError(f"--eps must be in (0, T0) = (0, {c['T0']}), got {c['eps']}.")
    return c


def _hidden(text: str) -> tuple[int, ...]:
    widths = tuple(int(w) for w in str(text).split(",") if w.strip())
    if not widths or min(widths) <= 0:
        raise ValueError(
            f"--hidden must be positive comma-separated widths such as 64,64,64, got {text!r}."
        )
    return widths


def _solver_kwargs(c: dict[str, Any]) -> dict[str, Any]:
    if c["solver"] in FIXED_GRID_SOLVERS:
        return {"method": c["solver"], "options": {"step_size": float(c["step_size"])}}
    return {"method": c["solver"], "rtol": float(c["rtol"]), "atol": float(c["atol"])}


@contextlib.contextmanager
def _torch_settings(dtype: torch.dtype, threads: int | None = None) -> Iterator[None]:
    old = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads or old[1])
    try:
        yield
    finally:
        torch.set_default_dtype(old[0])
        torch.set_num_threads(old[1])


def build_model(c: dict[str, Any]) -> nn.Module:
    """The CNF of a configuration, with NFE counters, initialised from torch's global RNG."""
    spec = METHODS[c["method"]]
    common = dict(
        num_blocks=int(c["num_blocks"]),
        divergence=c["divergence"],
        kinetic=float(c["kinetic"]),
        jacobian=float(c["jacobian"]),
        T0=float(c["T0"]),
        layer_type=c["layer_type"],
        nonlinearity=c["nonlinearity"],
        count=True,
        time_mode=spec["time_mode"],
        solver_kwargs=_solver_kwargs(c),
        adjoint=bool(c["adjoint"]),
        budget=c["budget"],
        eps=float(c["eps"]),
    )
    with _torch_settings(getattr(torch, c["dtype"])):
        if c["data"] == "digits":
            return build_image_model(1, _hidden(c["hidden"]), net=c["net"], **common)
        return build_toy_model(_hidden(c["hidden"]), **common)


def _build_optimizer(model: nn.Module, c: dict[str, Any]) -> torch.optim.Optimizer:
    weights = torch.optim.Adam(
        network_parameters(model), lr=c["lr"], weight_decay=c["weight_decay"]
    )
    if not METHODS[c["method"]]["learn"] and c["budget"] is None:
        return weights
    guard = c["budget"] is not None and BudgetGuard(
        model,
        every=int(c["guard_every"]),
        tol=float(c["guard_tol"]),
        fit_steps=int(c["placement"] == "learned"),
    )
    return CoordinateDescentStepper(
        weights,
        model,
        lr=c["tempopt_lr"],
        alpha=c["alpha"],
        guard=guard,
        reset_at_bound=bool(c["reset_at_bound"]),
        skip_nonfinite=bool(c["skip_nonfinite"]),
    )


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any], int]:
    """``(model, config, iteration)`` of ``DIR``, ``DIR/checkpoint.pt`` or a snapshot; eval()."""
    path = Path(path)
    state = torch.load(
        path / "checkpoint.pt" if path.is_dir() else path, map_location="cpu", weights_only=True
    )
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    return model.eval(), state["config"], int(state["iteration"])


class _Data:
    """Training batches from a seeded generator and a fixed held-out set."""

    def __init__(self, c: dict[str, Any], dtype: torch.dtype) -> None:
        self.name, self.dtype, self.batch_size = c["data"], dtype, int(c["batch_size"])
        self.image = self.name == "digits"
        self.unit = "bits/dim" if self.image else "nats"
        if self.image:
            self.train, test = load_digits_split(seed=int(c["split_seed"]))
            self.test = test if c["test_size"] is None else test[: int(c["test_size"])]
            if self.batch_size > self.train.shape[0]:
                raise ValueError(
                    f"--batch-size {self.batch_size} exceeds the {self.train.shape[0]} "
                    "training images."
                )
            self.generator: Any = torch.Generator().manual_seed(int(c["seed"]))
        else:
            self.test = torch.from_numpy(
                toy_sample(c["data"], int(c["test_size"]), int(c["test_seed"]))
            ).to(dtype)
            self.generator = np.random.default_rng(int(c["seed"]))

    def batch(self) -> Tensor:
        if self.image:
            return self.train[
                torch.randperm(self.train.shape[0], generator=self.generator)[: self.batch_size]
            ]
        return torch.from_numpy(toy_sample(self.name, self.batch_size, self.generator)).to(
            self.dtype
        )

    def loss(
        self, model: nn.Module, x: Tensor, method: str
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """``(loss, nll, regs)``: the NLL (nats, bits/dim) plus RNODE's penalties, or FM's loss."""
        if method == "fm":
            y = to_logit_space(model, x, self.generator)[0] if self.image else x
            return flow_matching_loss(model, y), None, {}
        nll, regs = (
            bits_per_dim_and_reg(model, x, self.generator) if self.image else nll_and_reg(model, x)
        )
        return nll + sum(regs.values()) if regs else nll, nll, regs

    def get_state(self) -> Any:
        return self.generator.get_state() if self.image else self.generator.bit_generator.state

    def set_state(self, state: Any) -> None:
        if self.image:
            self.generator.set_state(state)
        else:
            self.generator.bit_generator.state = state


def evaluate(
    model: nn.Module,
    test: Tensor,
    *,
    image: bool,
    solver_kwargs: dict[str, Any],
    seed: int,
    batch_size: int = 10000,
) -> float:
    """The mean test NLL (nats or bits/dim) at the model's T, without gradients or side effects.

    Probes and dequantization come from ``seed``; torch's RNG, the model's mode and the NFE
    counters are restored (evaluations are not counted).
    """
    was_training = model.training
    nfe(model, reset=True)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), adaptive(model, solver_kwargs):
        try:
            return cnf_nll(model, test, image=image, seed=seed, batch_size=batch_size)
        finally:
            model.train(was_training)
            nfe(model, reset=True)


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
    random.setstate(_tuples(states["python"]))
    data.set_state(states["data"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def config_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The settings, outside those a ``--resume`` may change, on which two configurations differ.

    The guard's settings do not count for runs without a budget, where they do nothing.
    """
    idle = _GUARD if saved.get("budget") is None and config.get("budget") is None else frozenset()
    return sorted(
        k
        for k in set(saved) | set(config)
        if k not in _RESUMABLE | idle and saved.get(k) != config.get(k)
    )


def run(args: ArgsLike = None) -> dict[str, Any]:
    """Trains one model; its metrics (also in ``OUT/metrics.json``). The caller's RNG survives."""
    config = resolve_config(args)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with (
            torch.random.fork_rng(devices=[]),
            _torch_settings(getattr(torch, config["dtype"]), int(config["threads"])),
        ):
            return _Run(config).train()
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class _Run:
    """The state of one training run."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config, self.out = config, Path(config["out"])
        self.out.mkdir(parents=True, exist_ok=True)
        seed = int(config["seed"])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.data = _Data(config, getattr(torch, config["dtype"]))
        self.model = build_model(config).train()
        self.optimizer = _build_optimizer(self.model, config)
        self.horizons = horizons(self.model)
        regs = [n for n in ("kinetic", "jacobian") if config[n] > 0]
        hz = range(len(self.horizons))
        self.columns = [
            "iteration",
            "loss",
            "nll",
            *regs,
            *(f"T_{i}" for i in hz),
            *(f"dLdT_{i}" for i in hz),
            *(f"budget_{i}" for i in hz),
            *(f"guard_error_{i}" for i in hz),
            "nfe_forward",
            "nfe_backward",
            "wall_seconds",
            "cpu_seconds",
            "test_nll",
        ]
        self.iteration, self.nfe_forward, self.nfe_backward, self.wall, self.cpu = (
            0,
            0,
            0,
            0.0,
            0.0,
        )
        self.rows: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        if config["resume"]:
            self._resume()
        (self.out / "config.json").write_text(json.dumps(config, indent=2))

    def _resume(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path} has checkpoint format {state.get('format')!r}, "
                f"expected {CHECKPOINT_FORMAT}."
            )
        differ = config_differences(state["config"], self.config)
        if differ:
            raise ValueError(
                f"--resume with a different configuration ({', '.join(differ)}); only "
                f"{sorted(_RESUMABLE)} may change."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_states(state["rng"], self.data)
        self.iteration = int(state["iteration"])
        self.nfe_forward, self.nfe_backward, self.wall, self.cpu = state["counters"]
        self.rows, self.evals = list(state["log"]), list(state["evals"])

    def _save(self, path: Path, full: bool = True) -> None:
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
        }
        if full:
            state.update(
                optimizer=self.optimizer.state_dict(),
                rng=_rng_states(self.data),
                log=self.rows,
                evals=self.evals,
                counters=[self.nfe_forward, self.nfe_backward, self.wall, self.cpu],
            )
        path.parent.mkdir(exist_ok=True)
        torch.save(state, path.with_name(path.name + ".tmp"))
        os.replace(path.with_name(path.name + ".tmp"), path)

    def _evaluate(self) -> float:
        c = self.config
        value = evaluate(
            self.model,
            self.data.test,
            image=self.data.image,
            seed=int(c["test_seed"]),
            solver_kwargs={
                "method": c["eval_solver"],
                "rtol": c["eval_rtol"],
                "atol": c["eval_atol"],
            },
            batch_size=int(c["eval_batch_size"]),
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

    def _step(self) -> tuple[float, float | None, dict[str, float]]:
        """One iteration; returns the loss, the NLL and the penalties (before the step)."""
        self.optimizer.zero_grad(set_to_none=True)
        x, method = self.data.batch(), self.config["method"]
        loss, nll, regs = self.data.loss(self.model, x, method)
        loss.backward()
        self.optimizer.step()
        return (
            loss.item(),
            None if nll is None else nll.item(),
            {k: v.item() for k, v in regs.items()},
        )

    def _row(
        self, loss: float, nll: float | None, regs: dict[str, float], counts: dict[str, int]
    ) -> dict[str, Any]:
        row: dict[str, Any] = {"iteration": self.iteration, "loss": loss, "nll": nll, **regs}
        guard = getattr(self.optimizer, "guard", None)
        checks = 0 if guard is None else guard.stats["checks"]
        checked, self._checks_seen = checks != getattr(self, "_checks_seen", 0), checks
        errors = guard.stats["errors"] if guard is not None else []
        for i, h in enumerate(self.horizons):
            row[f"T_{i}"], row[f"dLdT_{i}"] = (
                float(h.T.detach()),
                None if h.T.grad is None else float(h.T.grad),
            )
            row[f"budget_{i}"] = None if h.budget is None else h.budget.steps
            error = errors[i] if i < len(errors) else None
            row[f"guard_error_{i}"] = max(error) if checked and error else None
        row.update(
            nfe_forward=counts["forward"],
            nfe_backward=counts["backward"],
            wall_seconds=self.wall,
            cpu_seconds=self.cpu,
            test_nll=None,
        )
        return row

    def train(self) -> dict[str, Any]:
        c, snapshots = self.config, set(self.config["snapshot_iters"])
        iters, every, ckpt = int(c["iters"]), int(c["eval_every"]), int(c["checkpoint_every"])
        limit = math.inf if c["max_cpu_seconds"] is None else float(c["max_cpu_seconds"])
        if self.iteration == 0:
            self.rows, self.evals = [], []
            if 0 in snapshots:
                self._save(self.out / "snapshots" / "iter_000000.pt", full=False)
            if iters > 0:
                self._evaluate()
        with (
            open(self.out / "log.csv", "w", newline="") as f,
            _progress(c, self.iteration, iters) as bar,
        ):
            log = csv.writer(f)
            log.writerow(self.columns)
            log.writerows([_cell(r.get(k)) for k in self.columns] for r in self.rows)
            while self.iteration < iters and self.cpu < limit:
                wall0, cpu0 = time.perf_counter(), time.process_time()
                loss, nll, regs = self._step()
                self.cpu += time.process_time() - cpu0
                self.wall += time.perf_counter() - wall0
                self.iteration += 1
                counts = nfe(self.model, reset=True)
                # one network evaluation, without the divergence
                counts["forward"] += int(c["method"] == "fm")
                self.nfe_forward += counts["forward"]
                self.nfe_backward += counts["backward"]
                row = self._row(loss, nll, regs, counts)
                last = self.iteration == iters or self.cpu >= limit
                if last or (every and self.iteration % every == 0):
                    row["test_nll"] = self._evaluate()
                self.rows.append(row)
                log.writerow([_cell(row.get(k)) for k in self.columns])
                f.flush()
                if self.iteration in snapshots:
                    self._save(
                        self.out / "snapshots" / f"iter_{self.iteration:06d}.pt", full=False
                    )
                if last or (ckpt and self.iteration % ckpt == 0):
                    self._save(self.out / "checkpoint.pt")
                if bar is not None:
                    bar.set_postfix(
                        {
                            "loss": f"{loss:.4f}",
                            "T": ",".join(f"{t:.3f}" for t in end_times(self.model)),
                            "nfe": f"{counts['forward']}+{counts['backward']}",
                        },
                        refresh=False,
                    )
                    bar.update(1)
        if not self.evals:
            self._evaluate()
        if self.iteration == 0:
            self._save(self.out / "checkpoint.pt")
        metrics = self._metrics()
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics

    def _metrics(self) -> dict[str, Any]:
        c, last, done = self.config, self.evals[-1] if self.evals else {}, max(self.iteration, 1)
        stats, guard = (
            getattr(self.optimizer, "stats", None),
            getattr(self.optimizer, "guard", None),
        )
        return {
            "method": c["method"],
            "data": c["data"],
            "seed": c["seed"],
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
            "budget": [None if h.budget is None else h.budget.steps for h in self.horizons],
            "fractions": [
                None if h.budget is None else h.budget.fractions().tolist() for h in self.horizons
            ],
            "clip_counts": None if stats is None else [h["clip_count"] for h in stats["horizons"]],
            "guard_events": None if guard is None else guard.stats["events"],
            "guard": None
            if guard is None
            else {k: guard.stats[k] for k in ("checks", "nfe", "seconds")},
            "config": c,
            "eval_curve": self.evals,
            "log": self.rows,
            "torch_version": torch.__version__,
        }


def _cell(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


@contextlib.contextmanager
def _progress(c: dict[str, Any], start: int, total: int) -> Iterator[Any]:
    if not c["progress"]:
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        initial=start,
        desc=f"{c['method']} {c['data']}",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=None,  # no bar where stderr is not a terminal (a log file)
    ) as bar:
        yield bar


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: trains and prints the summary."""
    m = run(list(sys.argv[1:] if argv is None else argv))
    keys = (
        "method",
        "data",
        "iters",
        "test_nll",
        "unit",
        "T",
        "budget",
        "nfe_forward_total",
        "nfe_backward_total",
        "cpu_seconds",
        "wall_seconds",
    )
    print(json.dumps({k: m[k] for k in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
