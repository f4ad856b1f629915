"""Exact resume in a fresh process, and switching temporal optimization on mid-training."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torchdiffeq
from fields import TimeMLP
from torch import nn

from examples.train import run
from torch_tempopt import CoordinateDescentStepper, LearnableHorizon, load_state_dict_adding_horizons

ROOT = Path(__file__).resolve().parents[1]
# Clocks differ; and the first half of a split run ends with an evaluation that the straight run does not make.
TIMELESS = ("wall_seconds", "cpu_seconds", "test_nll")


def args(out: Path, iters: int) -> list[str]:
    return [
        "--data", "8gaussians", "--method", "toflow", "--divergence", "hutchinson", "--iters", str(iters),
        "--seed", "3", "--out", str(out), "--hidden", "16,16", "--batch-size", "64", "--test-size", "64",
        "--eval-every", "0", "--checkpoint-every", "0", "--no-progress",
        "--rtol", "1e-3", "--atol", "1e-3", "--eval-rtol", "1e-3", "--eval-atol", "1e-3",
    ]  # fmt: skip


def same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested checkpoints."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            if k not in TIMELESS:
                same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resume_in_a_fresh_process_continues_bitwise(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(args(straight, 4))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in ([*args(split, 2)], [*args(split, 4), "--resume"]):  # two fresh processes
        done = subprocess.run(
            [sys.executable, "-m", "examples.train", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    # model (weights, T, bounds), the stepper (Adam on the weights, Adam on T, bounds, stats), the RNG states
    # (torch, numpy, Python, data), the NFE counters and the log, except wall and CPU clocks.
    for key in ("model", "optimizer", "rng", "counters", "log"):
        same(a[key], b[key], key)
    same(a["evals"][-1], b["evals"][-1], "evals")
    assert a["evals"][-1]["test_nll"] == b["evals"][-1]["test_nll"]  # the final test NLL, same weights and T
    assert a["optimizer"]["stats"]["steps"] == 4 and a["optimizer"]["horizon_optimizer"]["state"]
    same(a["config"] | {"out": None, "resume": None}, b["config"] | {"out": None, "resume": None}, "config")


# ------------------------------------------------------------------ turning temporal optimization on


class Fixed(nn.Module):
    """Before: a plain odeint over a fixed [0, 0.5]."""

    def __init__(self) -> None:
        super().__init__()
        self.field = TimeMLP(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([0.0, 0.5], dtype=x.dtype)
        return torchdiffeq.odeint(self.field, x, t, method="rk4", options=dict(step_size=0.125))[-1]


class Learned(nn.Module):
    """After: the same field over a learnable horizon starting at the old end time."""

    def __init__(self) -> None:
        super().__init__()
        self.field = TimeMLP(2, 8)
        self.horizon = LearnableHorizon(T0=0.5, eps=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizon(self.field, x, method="rk4", options=dict(step_size=0.125))


def _fit(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 2, generator=g)
        opt.zero_grad()
        loss = (model(x) - 1).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_switching_temporal_optimization_on_mid_training() -> None:
    old = Fixed()
    old_opt = torch.optim.Adam(old.parameters(), lr=1e-2)
    _fit(old, old_opt, 3)
    model_sd, opt_sd = copy.deepcopy(old.state_dict()), copy.deepcopy(old_opt.state_dict())

    new = Learned()
    with pytest.warns(UserWarning, match=r"1 horizon\(s\).*'horizon': T=0.5, t0=0, bounds \[0.2, 0.8\]"):
        added = load_state_dict_adding_horizons(new, model_sd)
    assert added == {"horizon": "T=0.5, t0=0, bounds [0.2, 0.8]"}
    for key, value in model_sd.items():
        assert torch.equal(new.state_dict()[key], value), key
    x = torch.randn(4, 2)
    assert torch.equal(new(x), old(x))  # the same function at T = T0

    weights = [p for n, p in new.named_parameters() if not n.startswith("horizon.")]
    stepper = CoordinateDescentStepper(torch.optim.Adam(weights, lr=1e-2), new)
    with pytest.warns(UserWarning, match="plain optimizer state.*horizon optimizer and stats start fresh"):
        stepper.load_state_dict(copy.deepcopy(opt_sd))
    assert all(stepper.state[p]["step"] == 3 for p in weights)  # Adam continues (bias correction, moments)
    assert stepper.stats["steps"] == 0 and not stepper.horizon_optimizer.state

    # The next weight step equals the old optimizer's next step; only T moves in addition.
    reference = Fixed()
    reference.load_state_dict(model_sd)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    ref_opt.load_state_dict(copy.deepcopy(opt_sd))
    _fit(reference, ref_opt, 1)
    _fit(new, stepper, 1)
    for key, value in reference.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    assert new.horizon.T.item() != 0.5 and stepper.stats["steps"] == 1

    # A checkpoint with the horizons loads silently (filterwarnings=error) and initialises nothing.
    assert load_state_dict_adding_horizons(Learned(), new.state_dict()) == {}


def test_adding_horizons_refuses_other_mismatches_and_reports_partial_entries() -> None:
    new = Learned()
    before = {k: v.clone() for k, v in new.state_dict().items()}
    sd = Fixed().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\].*Nothing was loaded"):
        load_state_dict_adding_horizons(new, sd)
    for key, value in before.items():
        assert torch.equal(new.state_dict()[key], value), key
    with pytest.warns(UserWarning, match="horizon"):
        assert "horizon" in load_state_dict_adding_horizons(new, sd, strict=False)
    # An older checkpoint with T but without the bounds: T is loaded, the bounds come from the constructor.
    sd = {k: v for k, v in Learned().state_dict().items() if k in ("field.net.0.weight", "horizon.T")}
    sd = {**Fixed().state_dict(), "horizon.T": torch.tensor(0.6)}
    with pytest.warns(UserWarning, match=r"T=0.6.*only t0, T_init, t0_init, eps initialised"):
        load_state_dict_adding_horizons(new, sd)
    with pytest.raises(TypeError, match="model"):
        load_state_dict_adding_horizons({}, sd)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state_dict"):
        load_state_dict_adding_horizons(new, [1])  # type: ignore[arg-type]


def test_plain_optimizer_state_that_does_not_fit_is_refused_clearly() -> None:
    new = Learned()
    weights = [p for n, p in new.named_parameters() if not n.startswith("horizon.")]
    stepper = CoordinateDescentStepper(torch.optim.Adam(weights, lr=1e-2), new)
    wrong = torch.optim.Adam([nn.Parameter(torch.zeros(1))]).state_dict()
    with pytest.raises(ValueError, match="plain optimizer state that does not fit the weight optimizer"):
        stepper.load_state_dict(wrong)
    with pytest.raises(TypeError, match="state_dict"):
        stepper.load_state_dict([])  # type: ignore[arg-type]
