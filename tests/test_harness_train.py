"""The training runner (benchmarks.harness.train) and its figures (.plots), on tiny models."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.harness import plots
from benchmarks.harness.data import toy_sample
from benchmarks.harness.train import (
    METHODS,
    build_model,
    evaluate,
    load_model,
    resolve_config,
    run,
)

ROOT = Path(__file__).resolve().parents[1]
# The summary of 0.1, and what 0.2 adds.
KEYS_01 = {
    "method",
    "data",
    "seed",
    "iters",
    "test_nll",
    "unit",
    "nfe_forward_total",
    "nfe_backward_total",
    "nfe_total",
    "cpu_seconds",
    "wall_seconds",
    "cpu_seconds_per_iteration",
    "wall_seconds_per_iteration",
    "nfe_forward_per_iteration",
    "nfe_backward_per_iteration",
    "T",
    "clip_counts",
    "config",
    "eval_curve",
    "log",
    "torch_version",
}
KEYS_02 = {"budget", "fractions", "guard_events"}
LOOSE = ["--rtol", "1e-3", "--atol", "1e-3", "--eval-rtol", "1e-3", "--eval-atol", "1e-3"]
TIMELESS = ("wall_seconds", "cpu_seconds", "test_nll")


def tiny(
    out: Path, method: str = "toflow", iters: int = 3, data: str = "8gaussians", *extra: str
) -> list[str]:
    return [
        "--data", data, "--method", method, "--iters", str(iters), "--seed", "1",
        "--out", str(out), "--hidden", "8", "--batch-size", "32", "--test-size", "64",
        "--eval-every", "2", "--no-progress", *LOOSE, *extra,
    ]  # fmt: skip


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def columns(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def timeless(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMELESS} for row in log]


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TO-FLOW on 2 rk4 steps (placement learned), guarded every 2 steps, with snapshots."""
    out = tmp_path_factory.mktemp("budget") / "run"
    run(
        tiny(
            out,
            "toflow",
            3,
            "8gaussians",
            "--budget",
            "2",
            "--guard-every",
            "2",
            "--snapshot-iters",
            "0,2",
        )
    )
    return out


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_and_writes_its_outputs(tmp_path: Path, method: str) -> None:
    out = tmp_path / method.replace("+", "_")
    metrics = run(tiny(out, method, 3, "checkerboard"))
    saved = json.loads((out / "metrics.json").read_text())
    assert KEYS_01 | KEYS_02 <= set(saved) and saved["test_nll"] == metrics["test_nll"]
    assert json.loads((out / "config.json").read_text()) == saved["config"]
    assert (
        saved["method"] == method and saved["data"] == "checkerboard" and saved["unit"] == "nats"
    )
    assert saved["iters"] == 3 and np.isfinite(saved["test_nll"])
    assert [e["iteration"] for e in saved["eval_curve"]] == [0, 2, 3]
    spec, rnode = METHODS[method], ["kinetic", "jacobian"] if METHODS[method]["rnode"] else []
    assert columns(out / "log.csv") == [
        "iteration",
        "loss",
        "nll",
        *rnode,
        "T_0",
        "dLdT_0",
        "budget_0",
        "guard_error_0",
        "nfe_forward",
        "nfe_backward",
        "wall_seconds",
        "cpu_seconds",
        "test_nll",
    ]
    rows = read_log(out / "log.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert [bool(r["test_nll"]) for r in rows] == [False, True, True]
    assert all(r["budget_0"] == r["guard_error_0"] == "" for r in rows)
    assert saved["budget"] == [None] and saved["fractions"] == [None]
    learned = spec["learn"]
    assert (saved["T"] != [0.5]) is learned and all(bool(r["dLdT_0"]) is learned for r in rows)
    assert saved["guard_events"] is None and saved["guard"] is None  # no budget: no guard
    if rnode:
        assert float(rows[0]["loss"]) > float(rows[0]["nll"]) > 0
    # The NFE in the log add up to the totals; the evaluations are not counted.
    assert sum(int(r["nfe_forward"]) for r in rows) == saved["nfe_forward_total"]
    assert sum(int(r["nfe_backward"]) for r in rows) == saved["nfe_backward_total"]
    if method == "fm":  # one evaluation of the network per iteration, no solve, no NLL
        assert (
            saved["nfe_forward_total"] == 3
            and saved["nfe_backward_total"] == 0
            and rows[0]["nll"] == ""
        )
    else:
        assert saved["nfe_forward_total"] > 3 * 6 and saved["nfe_backward_total"] > 0
    assert (
        float(rows[-1]["cpu_seconds"]) == pytest.approx(saved["cpu_seconds"])
        and saved["cpu_seconds"] > 0
    )
    assert (out / "checkpoint.pt").exists()


def test_budget_runs_log_budget_and_guard_columns(budget_run: Path) -> None:
    saved = json.loads((budget_run / "metrics.json").read_text())
    assert (
        saved["config"]["placement"] == "learned"
        and saved["budget"] == [2]
        and saved["guard_events"] == []
    )
    rows = read_log(budget_run / "log.csv")
    assert [r["budget_0"] for r in rows] == ["2", "2", "2"]
    # The guard checks at steps 0 and 1 (iterations 1 and 2; then 3, every=2 at most), against
    # dopri5: an error, and its NFE.
    assert [bool(r["guard_error_0"]) for r in rows] == [True, True, False]
    assert 0 < float(rows[0]["guard_error_0"]) < 0.05
    forward = [int(r["nfe_forward"]) for r in rows]
    assert forward[2] == 4 * 2 and min(forward[:2]) > 4 * 2 * 2
    # through the steps (0.4), though the run names the adjoint
    assert [int(r["nfe_backward"]) for r in rows][2] == 0
    (fractions,) = saved["fractions"]
    # the placement was learned
    assert fractions[0] == 0 and fractions[-1] == 1 and fractions[1] != 0.5
    assert saved["T"] != [0.5]


def test_uniform_budget_keeps_its_grid(tmp_path: Path) -> None:
    metrics = run(
        tiny(
            tmp_path / "b",
            "ffjord",
            2,
            "moons",
            "--budget",
            "3",
            "--guard-every",
            "1",
            "--no-adjoint",
        )
    )
    assert metrics["config"]["placement"] == "uniform" and metrics["T"] == [0.5]
    assert metrics["fractions"] == [[0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]]
    # autograd through the 3 rk4 steps
    assert [r["nfe_backward"] for r in metrics["log"]] == [
        0,
        0,
    ]
    assert all(r["guard_error_0"] is not None for r in metrics["log"])


@pytest.mark.parametrize(
    "method, extra",
    [*((m, ()) for m in METHODS), ("toflow", ("--budget", "2"))],
    ids=[*METHODS, "toflow-budget"],
)
def test_digits_with_a_tiny_mlp(tmp_path: Path, method: str, extra: tuple[str, ...]) -> None:
    out = tmp_path / method.replace("+", "_")
    metrics = run(
        tiny(
            out,
            method,
            2,
            "digits",
            "--num-blocks",
            "1",
            "--hidden",
            "8",
            "--batch-size",
            "16",
            "--net",
            "mlp",
            "--test-size",
            "32",
            *extra,
        )
    )
    assert (
        metrics["unit"] == "bits/dim"
        and metrics["config"]["T0"] == 1.0
        and metrics["config"]["net"] == "mlp"
    )
    assert 0 < metrics["test_nll"] < 100 and len(metrics["log"]) == 2
    assert (metrics["T"] != [1.0]) is METHODS[method]["learn"] and metrics["budget"] == [
        2 if extra else None
    ]
    assert (metrics["log"][0]["nll"] is None) is (method == "fm")
    model, config, _ = load_model(out)
    assert [type(m).__name__ for m in model.modules()].count("FlatODEnet") == 1 and config[
        "net"
    ] == "mlp"


def test_max_cpu_seconds_stops_early(tmp_path: Path) -> None:
    metrics = run(tiny(tmp_path / "fm", "fm", 1000, "8gaussians", "--max-cpu-seconds", "1e-9"))
    assert metrics["iters"] == 1 and len(metrics["log"]) == 1
    assert metrics["log"][-1]["test_nll"] == metrics["test_nll"]  # evaluated where it stopped
    assert torch.load(tmp_path / "fm" / "checkpoint.pt", weights_only=True)["iteration"] == 1


def test_steer_keeps_T0(tmp_path: Path) -> None:
    steer = run(tiny(tmp_path / "steer", "steer", 2, "8gaussians", "--T0", "0.6"))
    assert steer["T"] == [pytest.approx(0.6)]


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--solver", "rk4", "--step-size", "0.1", "--budget", "2"], "--budget .*rk4"),
        (["--method", "fm", "--budget", "2"], "--budget .*fm"),
        (["--method", "steer", "--budget", "2"], "--budget .*steer"),
        (["--step-size", "0.1"], "--step-size .*dopri5"),
        (["--solver", "rk4"], "--step-size .*rk4"),
        (["--data", "moons", "--net", "mlp"], "--net .*mlp"),
        (["--eps", "0.5"], r"--eps .*\(0, 0.5\), got 0.5"),
        (["--eps", "0"], "--eps .*got 0.0"),
    ],
)
def test_bad_configurations_name_the_option(tmp_path: Path, flags: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_config(["--out", str(tmp_path), *flags])


def test_configuration_defaults(tmp_path: Path) -> None:
    toy = resolve_config({"out": tmp_path, "data": "8gaussians"})
    assert (toy["batch_size"], toy["T0"], toy["divergence"], toy["num_blocks"]) == (
        100,
        0.5,
        "exact",
        1,
    )
    assert toy["placement"] is None and toy["budget"] is None and toy["kinetic"] == 0.0
    image = resolve_config(["--out", str(tmp_path), "--data", "digits"])
    assert (image["batch_size"], image["T0"], image["divergence"], image["num_blocks"]) == (
        200,
        1.0,
        "hutchinson",
        2,
    )
    assert image["net"] == "conv"
    for method, placement in (("toflow", "learned"), ("ffjord", "uniform"), ("rnode", "uniform")):
        assert (
            resolve_config(["--out", str(tmp_path), "--method", method, "--budget", "2"])[
                "placement"
            ]
            == placement
        )
    assert resolve_config(["--out", str(tmp_path), "--method", "rnode"])["kinetic"] == 0.01
    with pytest.raises(ValueError, match="unknown or missing configuration keys"):
        resolve_config({"out": tmp_path, "budgets": 2})


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    "method, extra",
    [
        ("steer", ("--divergence", "hutchinson")),
        ("toflow", ("--budget", "2", "--guard-every", "1")),
    ],
    ids=["steer-hutchinson", "toflow-budget"],
)
def test_evaluation_does_not_change_the_training_trajectory(
    tmp_path: Path, method: str, extra: tuple[str, ...]
) -> None:
    every = run([*tiny(tmp_path / "every", method, 3, "8gaussians", *extra), "--eval-every", "1"])
    never = run([*tiny(tmp_path / "never", method, 3, "8gaussians", *extra), "--eval-every", "0"])
    # iterations 0..3, and 0 and 3
    assert len(every["eval_curve"]) == 4 and len(never["eval_curve"]) == 2
    assert timeless(every["log"]) == timeless(never["log"])
    assert every["T"] == never["T"] and every["fractions"] == never["fractions"]
    assert every["test_nll"] == never["test_nll"]


def test_evaluate_leaves_random_states_mode_and_budget_alone(budget_run: Path) -> None:
    model, config, iteration = load_model(budget_run)
    assert not model.training and iteration == 3
    test = torch.from_numpy(
        toy_sample(config["data"], int(config["test_size"]), int(config["test_seed"]))
    )
    kwargs = {
        "image": False,
        "seed": int(config["test_seed"]),
        "solver_kwargs": {
            "method": "dopri5",
            "rtol": config["eval_rtol"],
            "atol": config["eval_atol"],
        },
    }
    model.train()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    value = evaluate(model, test, **kwargs)
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(
        np.random.get_state()[1], before[1]
    )
    assert random.getstate() == before[2] and model.training
    assert [b.horizon.budget.steps for b in model.chain] == [2] and model.chain[0].solver_kwargs[
        "method"
    ] == "dopri5"
    assert model.chain[0].adjoint  # scoring() restored the training solver
    # The checkpoint's model scores what the run reported; a smaller evaluation batch changes
    # nothing.
    assert value == json.loads((budget_run / "metrics.json").read_text())["test_nll"]
    assert evaluate(model, test, batch_size=20, **kwargs) == pytest.approx(value, rel=1e-6)


def test_load_model_round_trip(budget_run: Path) -> None:
    saved = json.loads((budget_run / "metrics.json").read_text())
    model, config, iteration = load_model(budget_run / "checkpoint.pt")
    assert config == saved["config"] and iteration == saved["iters"] == 3
    horizon = model.chain[0].horizon
    assert [horizon.T.item()] == saved["T"] and horizon.budget.fractions().tolist() == saved[
        "fractions"
    ][0]
    assert (
        not horizon.budget.placement.requires_grad
        and not model.training
        and horizon.budget.steps == 2
    )
    fresh = build_model(config)
    assert set(fresh.state_dict()) == set(model.state_dict())
    first, _, zero = load_model(budget_run / "snapshots" / "iter_000000.pt")
    assert zero == 0 and first.chain[0].horizon.T.item() == 0.5
    assert sorted(p.name for p in (budget_run / "snapshots").iterdir()) == [
        "iter_000000.pt",
        "iter_000002.pt",
    ]


def test_run_leaves_the_callers_torch_state_alone(tmp_path: Path) -> None:
    dtype, threads, rng = torch.get_default_dtype(), torch.get_num_threads(), torch.get_rng_state()
    run(tiny(tmp_path / "a", "ffjord", 1, "8gaussians", "--no-adjoint"))
    assert torch.get_default_dtype() == dtype and torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


def test_fixed_grid_solver_and_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.harness.train",
        *tiny(out, "ffjord", 2),
        "--solver",
        "rk4",
        "--step-size",
        "0.25",
    ]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["nfe_forward_total"] == 2 * 2 * 4  # 2 iterations x 2 rk4 steps x 4 stages
    assert summary["nfe_backward_total"] == 2 * 2 * 4  # the adjoint solve, same grid
    assert summary["budget"] == [None] and summary["T"] == [0.5]


# ----------------------------------------------------------------------------- figures


def test_plots_write_pngs(tmp_path: Path, budget_run: Path) -> None:
    runs = [tmp_path / "ffjord", budget_run, tmp_path / "fm"]
    run(tiny(runs[0], "ffjord", 2, "8gaussians", "--snapshot-iters", "2"))
    run(tiny(runs[2], "fm", 2, "8gaussians"))
    labels = [plots.read_run(r)["label"] for r in runs]
    assert labels[0] == "FFJORD (8gaussians, seed 1)"
    assert labels[1] == "TO-FLOW, 2 rk4 steps, learned placement (8gaussians, seed 1)"
    assert labels[2].startswith("flow matching")
    model, _, _ = load_model(budget_run)
    rk4 = {"method": "rk4", "options": {"step_size": 0.25}}
    xs, ys, logp = plots.density_grid(model, resolution=12, solver_kwargs=rk4)
    assert logp.shape == (12, 12) and xs.shape == (12,) and np.isfinite(logp).all()
    assert model.chain[0].horizon.budget.steps == 2 and not model.training
    fast = {"resolution": 10, "solver_kwargs": rk4, "n_samples": 200}
    paths = [
        plots.figure_densities(runs, tmp_path / "fig1.png", **fast),
        plots.figure_snapshots(runs[:2], tmp_path / "fig2.png", **fast),
        plots.figure_curves(runs, tmp_path / "curves.png"),
    ]
    for path in paths:
        assert Path(path).stat().st_size > 1000 and Path(path).read_bytes()[:4] == b"\x89PNG"
    assert (
        plots.main(
            [
                "curves",
                "--runs",
                *map(str, runs),
                "--out",
                str(tmp_path / "cli.png"),
                "--nll-from",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="nll_from"):
        plots.figure_curves(runs, tmp_path / "bad.png", nll_from=-1)
    with pytest.raises(ValueError, match="no snapshots"):
        plots.figure_snapshots(runs[2:], tmp_path / "none.png")
