"""Smoke tests of the training runner (examples.train) and the figures (examples.plots), on tiny models."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples import plots
from examples.train import METHODS, load_model, resolve_config, run

REQUIRED = {
    "method",
    "data",
    "iters",
    "test_nll",
    "unit",
    "nfe_forward_total",
    "nfe_backward_total",
    "cpu_seconds",
    "wall_seconds",
    "T",
    "config",
    "eval_curve",
    "log",
}
LOOSE = ["--rtol", "1e-3", "--atol", "1e-3", "--eval-rtol", "1e-3", "--eval-atol", "1e-3"]


def tiny(out: Path, method: str = "toflow", iters: int = 3, data: str = "8gaussians", *extra: str) -> list[str]:
    return [
        "--data", data, "--method", method, "--iters", str(iters), "--seed", "1", "--out", str(out),
        "--hidden", "16", "--batch-size", "64", "--test-size", "128", "--eval-every", "2",
        "--no-progress", *LOOSE, *extra,
    ]  # fmt: skip


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_and_writes_metrics(tmp_path: Path, method: str) -> None:
    out = tmp_path / method.replace("+", "_")
    metrics = run(tiny(out, method, 3, "checkerboard"))
    saved = json.loads((out / "metrics.json").read_text())
    assert REQUIRED <= set(saved)
    assert saved["method"] == method and saved["data"] == "checkerboard" and saved["unit"] == "nats"
    assert saved["iters"] == 3 and saved["config"]["method"] == method
    assert saved["nfe_forward_total"] > 0 and saved["cpu_seconds"] > 0
    assert saved["test_nll"] == pytest.approx(metrics["test_nll"]) and torch.isfinite(torch.tensor(saved["test_nll"]))
    assert [e["iteration"] for e in saved["eval_curve"]] == [0, 2, 3]
    rows = read_log(out / "log.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert [bool(r["test_nll"]) for r in rows] == [False, True, True]
    learned = METHODS[method]["time_mode"] == "learn"
    assert (saved["T"] != [0.5]) == learned
    assert all(bool(r["dLdT_0"]) == learned for r in rows)
    assert all(float(r["T_0"]) == 0.5 for r in rows) != learned
    if METHODS[method]["rnode"]:
        assert "kinetic" in rows[0] and "jacobian" in rows[0]
        assert float(rows[0]["loss"]) > float(rows[0]["nll"])
    # The NFE in the log add up to the totals; the evaluations are not counted.
    assert sum(int(r["nfe_forward"]) for r in rows) == saved["nfe_forward_total"]
    assert sum(int(r["nfe_backward"]) for r in rows) == saved["nfe_backward_total"]
    assert float(rows[-1]["cpu_seconds"]) == pytest.approx(saved["cpu_seconds"])
    assert (out / "checkpoint.pt").exists() and (out / "config.json").exists()


def test_exact_mode_solves_twice_and_steer_keeps_T0(tmp_path: Path) -> None:
    alternate = run(tiny(tmp_path / "alt", "toflow", 2, "8gaussians", "--no-adjoint"))
    exact = run(tiny(tmp_path / "exact", "toflow", 2, "8gaussians", "--no-adjoint", "--mode", "exact"))
    assert exact["nfe_forward_total"] > 1.5 * alternate["nfe_forward_total"]
    assert exact["log"][0]["loss"] == alternate["log"][0]["loss"]  # same seed, same first loss
    steer = run(tiny(tmp_path / "steer", "steer", 2, "8gaussians", "--T0", "0.6"))
    assert steer["T"] == [pytest.approx(0.6)]


def test_digits_two_iterations_on_a_tiny_image_model(tmp_path: Path) -> None:
    args = tiny(tmp_path / "digits", "toflow", 2, "digits", "--num-blocks", "1", "--hidden", "4", "--batch-size", "16")
    metrics = run([*args, "--test-size", "32"])
    assert metrics["unit"] == "bits/dim" and metrics["config"]["T0"] == 1.0
    assert 0 < metrics["test_nll"] < 100 and len(metrics["log"]) == 2
    assert metrics["config"]["divergence"] == "hutchinson" and metrics["T"] != [1.0]


def test_digits_mlp_net_trains_and_is_checked(tmp_path: Path) -> None:
    args = tiny(tmp_path / "mlp", "toflow", 2, "digits", "--num-blocks", "1", "--hidden", "8", "--batch-size", "16")
    metrics = run([*args, "--net", "mlp", "--test-size", "32"])
    assert metrics["config"]["net"] == "mlp" and 0 < metrics["test_nll"] < 100 and metrics["T"] != [1.0]
    model, config, _ = load_model(tmp_path / "mlp")
    nets = [m for m in model.modules() if type(m).__name__ == "FlatODEnet"]
    assert len(nets) == 1 and config["net"] == "mlp"
    assert resolve_config(["--out", str(tmp_path), "--data", "digits"])["net"] == "conv"
    with pytest.raises(ValueError, match="--net applies to --data digits"):
        resolve_config(["--out", str(tmp_path), "--data", "moons", "--net", "mlp"])
    with pytest.raises(ValueError, match="net"):  # a different net is a different run
        run([*args, "--net", "conv", "--resume", "--iters", "3"])


def test_digits_checkpoint_from_before_net_loads_and_resumes_as_conv(tmp_path: Path) -> None:
    args = tiny(tmp_path / "old", "ffjord", 1, "digits", "--num-blocks", "1", "--hidden", "4", "--batch-size", "8")
    run([*args, "--test-size", "8"])
    path = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["net"]  # as written before --net existed
    torch.save(state, path)
    model, config, _ = load_model(path)
    assert config["net"] == "conv" and any(type(m).__name__ == "ConvODEnet" for m in model.modules())
    assert run([*args, "--test-size", "8", "--iters", "2", "--resume"])["iters"] == 2
    with pytest.raises(ValueError, match="net: 'conv' -> 'mlp'"):
        run([*args, "--test-size", "8", "--iters", "3", "--resume", "--net", "mlp"])


@pytest.mark.parametrize(
    "method, data, extra",
    [
        ("toflow", "8gaussians", ("--divergence", "hutchinson")),
        ("steer", "moons", ()),
        ("rnode+toflow", "digits", ("--num-blocks", "1", "--hidden", "4", "--batch-size", "16", "--test-size", "16")),
    ],
)
def test_resume_continues_bitwise(tmp_path: Path, method: str, data: str, extra: tuple[str, ...]) -> None:
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    run(tiny(straight, method, 4, data, *extra))
    first = run(tiny(split, method, 2, data, *extra))
    assert first["iters"] == 2
    resumed = run([*tiny(split, method, 4, data, *extra), "--resume"])
    assert resumed["log"][:2] == first["log"]  # continued (same clocks), not restarted
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["data"] == b["rng"]["data"] if data != "digits" else torch.equal(a["rng"]["data"], b["rng"]["data"])
    assert a["counters"]["nfe_forward"] == b["counters"]["nfe_forward"]
    assert a["counters"]["nfe_backward"] == b["counters"]["nfe_backward"]
    timeless = ("wall_seconds", "cpu_seconds", "test_nll")
    assert [{k: v for k, v in r.items() if k not in timeless} for r in a["log"]] == [
        {k: v for k, v in r.items() if k not in timeless} for r in b["log"]
    ]
    assert resumed["T"] == json.loads((straight / "metrics.json").read_text())["T"]
    assert resumed["test_nll"] == json.loads((straight / "metrics.json").read_text())["test_nll"]
    assert len(read_log(split / "log.csv")) == 4


def test_resume_rejects_another_configuration_and_a_missing_checkpoint(tmp_path: Path) -> None:
    run(tiny(tmp_path / "a", "toflow", 1))
    with pytest.raises(ValueError, match="alpha"):
        run([*tiny(tmp_path / "a", "toflow", 2), "--resume", "--alpha", "0.5"])
    with pytest.raises(FileNotFoundError):
        run([*tiny(tmp_path / "missing", "toflow", 2), "--resume"])


def test_configuration_errors_and_defaults(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="step-size"):
        resolve_config(["--out", str(tmp_path), "--solver", "rk4"])
    with pytest.raises(ValueError, match="fixed-grid"):
        resolve_config(["--out", str(tmp_path), "--step-size", "0.1"])
    toy = resolve_config({"out": tmp_path, "data": "8gaussians"})
    assert (toy["batch_size"], toy["T0"], toy["divergence"], toy["num_blocks"]) == (100, 0.5, "exact", 1)
    image = resolve_config(["--out", str(tmp_path), "--data", "digits"])
    assert (image["batch_size"], image["T0"], image["divergence"], image["num_blocks"]) == (200, 1.0, "hutchinson", 2)


def test_run_leaves_the_callers_torch_state_alone(tmp_path: Path) -> None:
    dtype, threads, rng = torch.get_default_dtype(), torch.get_num_threads(), torch.get_rng_state()
    run(tiny(tmp_path / "a", "ffjord", 1, "8gaussians", "--no-adjoint"))
    assert torch.get_default_dtype() == dtype and torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


def test_fixed_grid_solver_and_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "examples.train", *tiny(out, "ffjord", 2), "--solver", "rk4", "--step-size", "0.25"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["nfe_forward_total"] == 2 * 2 * 4  # 2 iterations x 2 rk4 steps x 4 stages
    assert summary["nfe_backward_total"] == 2 * 2 * 4  # the adjoint solve, same grid


def test_plots_write_pngs(tmp_path: Path) -> None:
    runs = []
    for method in ("ffjord", "toflow"):
        out = tmp_path / method
        run(tiny(out, method, 2, "checkerboard", "--snapshot-iters", "0,2"))
        runs.append(out)
    assert sorted(p.name for p in (runs[1] / "snapshots").iterdir()) == ["iter_000000.pt", "iter_000002.pt"]
    model, config, iteration = load_model(runs[1] / "snapshots" / "iter_000002.pt")
    assert config["method"] == "toflow" and iteration == 2
    xs, ys, logp = plots.density_grid(
        model, resolution=12, solver_kwargs={"method": "rk4", "options": {"step_size": 0.25}}
    )
    assert logp.shape == (12, 12) and xs.shape == (12,) and torch.isfinite(torch.as_tensor(logp)).all()
    fast = {"resolution": 10, "solver_kwargs": {"method": "rk4", "options": {"step_size": 0.25}}, "n_samples": 200}
    paths = [
        plots.figure_densities(runs, tmp_path / "fig1.png", **fast),
        plots.figure_snapshots(runs, tmp_path / "fig2.png", **fast),
        plots.figure_curves(runs, tmp_path / "curves.png"),
    ]
    for path in paths:
        assert Path(path).stat().st_size > 1000 and Path(path).read_bytes()[:4] == b"\x89PNG"
    assert plots.main(["curves", "--runs", *map(str, runs), "--out", str(tmp_path / "cli.png"), "--nll-from", "1"]) == 0
    assert (tmp_path / "cli.png").exists()
    with pytest.raises(ValueError, match="nll_from"):
        plots.figure_curves(runs, tmp_path / "bad.png", nll_from=-1)
