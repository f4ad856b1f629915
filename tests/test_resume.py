"""Exact resume of benchmarks.harness.train (--resume): in fresh processes, on a budget after the
guard grew it, and its refusals.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from benchmarks.harness.train import run
from torch_tempopt import LearnableHorizon

ROOT = Path(__file__).resolve().parents[1]
# Clocks differ; and the first half of a split run ends with an evaluation that the straight run
# does not make.
TIMELESS = ("wall_seconds", "cpu_seconds", "seconds", "test_nll")  # seconds: the guard's clock


def args(out: Path, iters: int, *extra: str) -> list[str]:
    return [
        "--data", "8gaussians", "--method", "toflow", "--divergence", "hutchinson",
        "--iters", str(iters), "--seed", "3", "--out", str(out), "--hidden", "8,8",
        "--batch-size", "32", "--test-size", "32",
        "--eval-every", "0", "--checkpoint-every", "0", "--no-progress",
        "--rtol", "1e-3", "--atol", "1e-3", "--eval-rtol", "1e-3", "--eval-atol", "1e-3", *extra,
    ]  # fmt: skip


def same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested checkpoints, clocks aside."""
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


def compare(straight: Path, split: Path) -> tuple[dict, dict]:
    """The two final checkpoints, equal in model, stepper, RNG states, NFE counters and log."""
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["format"] == b["format"] == 2 and a["iteration"] == b["iteration"] == 4
    for key in ("model", "optimizer", "rng", "log"):
        same(a[key], b[key], key)
    assert a["counters"][:2] == b["counters"][:2]  # NFE forward and backward (then the clocks)
    same(a["evals"][-1], b["evals"][-1], "evals")
    assert (
        a["evals"][-1]["test_nll"] == b["evals"][-1]["test_nll"]
    )  # the final test NLL: same weights and T
    same(
        a["config"] | {"out": None, "resume": None},
        b["config"] | {"out": None, "resume": None},
        "config",
    )
    return a, b


def test_resume_in_fresh_processes_continues_bitwise(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(args(straight, 4))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for extra in (args(split, 2), [*args(split, 4), "--resume"]):  # two fresh processes
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.harness.train", *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    a, _ = compare(straight, split)
    # model (weights, T), the stepper (Adam on the weights, Adam on T, stats), the RNG states
    # (torch, numpy, Python, data: the Hutchinson probes and the batches)
    assert a["optimizer"]["stats"]["steps"] == 4 and a["optimizer"]["horizon_optimizer"]["state"]
    assert a["model"]["chain.0.horizon.T"] != 0.5


def test_resume_on_a_budget_after_the_guard_grew_it(tmp_path: Path) -> None:
    # float64 and a tight reference, so that the 2-step error (~1.6e-6 at T0 = 1) is rk4's, not
    # dopri5's: the guard grows the budget to 3 at the first step, and 3 steps pass (~3e-7).
    budget = [
        "--budget",
        "2",
        "--guard-every",
        "1",
        "--guard-tol",
        "6e-7",
        "--T0",
        "1.0",
        "--dtype",
        "float64",
        "--rtol",
        "1e-8",
        "--atol",
        "1e-8",
        "--divergence",
        "exact",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    with pytest.warns(RuntimeWarning, match="2-step rk4 solve .* budget grown to 3 steps"):
        whole = run(args(straight, 4, *budget))
    with pytest.warns(RuntimeWarning, match="budget grown to 3 steps"):
        first = run(args(split, 2, *budget))
    resumed = run(
        [*args(split, 4, *budget), "--resume"]
    )  # resumed on 3 steps: no growth, no warning
    assert [e["budget"] for e in whole["guard_events"]] == [[2, 3]] and whole["guard_events"][0][
        "step"
    ] == 0
    assert first["budget"] == resumed["budget"] == whole["budget"] == [3]
    assert resumed["guard_events"] == whole["guard_events"] and resumed["log"][:2] == first["log"]
    assert [r["budget_0"] for r in whole["log"]] == [3, 3, 3, 3]
    assert whole["fractions"][0] != pytest.approx(
        [0, 1 / 3, 2 / 3, 1], abs=1e-6
    )  # learned after the growth
    a, _ = compare(straight, split)
    budget = {
        k.rsplit(".", 1)[-1]: v
        for k, v in a["model"].items()
        if k.startswith("chain.0.horizon.budget.")
    }
    assert int(budget["n_steps"]) == 3 and budget["placement"].shape == (
        64,
    )  # the grown budget is in the checkpoint
    assert resumed["fractions"] == whole["fractions"] and resumed["T"] == whole["T"]


def test_resume_refuses_another_configuration_an_old_checkpoint_and_none(tmp_path: Path) -> None:
    out = tmp_path / "a"
    run(args(out, 1, "--budget", "2"))
    for flags, name in (
        (["--alpha", "0.5"], "alpha"),
        (["--budget", "3"], "budget"),
        (["--placement", "uniform"], "placement"),
        (["--guard-tol", "0.01"], "guard_tol"),
    ):
        with pytest.raises(ValueError, match=rf"different configuration \({name}\)"):
            run([*args(out, 2, "--budget", "2"), *flags, "--resume"])
    # What may change: the length, the evaluation and checkpoint periods, the CPU cap.
    more = run(
        [
            *args(out, 2, "--budget", "2"),
            "--resume",
            "--eval-every",
            "1",
            "--max-cpu-seconds",
            "100",
        ]
    )
    assert more["iters"] == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**state, "format": 1}, out / "checkpoint.pt")  # as torch_tempopt 0.1 wrote it
    with pytest.raises(ValueError, match="checkpoint format 1, expected 2"):
        run([*args(out, 3, "--budget", "2"), "--resume"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run([*args(tmp_path / "missing", 2), "--resume"])


def test_a_0_3_state_dict_loads_into_the_budget() -> None:
    """0.3 kept a budget's buffers on the horizon (``placement``, ``n_steps``); 0.4 keeps them on
    its Budget.
    """
    placement = torch.zeros(64)
    placement[:5] = torch.tensor([0.3, -0.2, 0.1, 0.4, -0.6])
    old = {
        "chain.0.horizon.T": torch.tensor(0.8),
        "chain.0.horizon.t0": torch.tensor(0.0),
        "chain.0.horizon.placement": placement,
        "chain.0.horizon.n_steps": torch.tensor(5),
    }
    keys = list(old)
    model = nn.ModuleDict(
        {"chain": nn.ModuleList([nn.ModuleDict({"horizon": LearnableHorizon(T0=1.0, budget=2)})])}
    )
    model.load_state_dict(old)  # strict: every key of 0.3 has its place
    horizon = model["chain"][0]["horizon"]
    assert (
        horizon.budget.steps == 5
        and torch.equal(horizon.budget.placement, placement)
        and horizon.T.item() == 0.8
    )
    fractions = torch.cat([torch.zeros(1), torch.softmax(placement[:5], 0).cumsum(0)])
    torch.testing.assert_close(horizon.budget.fractions(), fractions, rtol=0, atol=1e-15)
    assert list(old) == keys  # the caller's dict is read, not renamed
    assert set(model.state_dict()) == {
        "chain.0.horizon.T",
        "chain.0.horizon.t0",
        "chain.0.horizon.budget.placement",
        "chain.0.horizon.budget.n_steps",
        "chain.0.horizon.budget.retired",  # 0.5's, False when a 0.3 or 0.4 dict lacks it
    }
    with pytest.raises(
        RuntimeError, match="Unexpected key"
    ):  # a budgeted checkpoint does not fit an adaptive horizon
        LearnableHorizon(T0=1.0).load_state_dict({k.split(".")[-1]: v for k, v in old.items()})
    adaptive = LearnableHorizon(T0=1.0)
    adaptive.load_state_dict(
        {"T": torch.tensor(0.8), "t0": torch.tensor(0.0)}
    )  # a 0.3 checkpoint without a budget
    assert adaptive.T.item() == 0.8 and adaptive.budget is None
