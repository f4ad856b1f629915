"""Smoke tests: every benchmark script and the demo run for a few iterations and write their outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _float32(_default_dtype):
    """The scripts run in float32, as from the command line."""
    torch.set_default_dtype(torch.float32)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_overhead_benchmark(tmp_path):
    res = _load("overhead").main(["--pairs", "2", "--warmup", "0", "--batch", "32", "--out", str(tmp_path)])
    assert res["extra_evaluations"] == 1
    assert (tmp_path / "overhead.md").exists() and json.loads((tmp_path / "overhead.json").read_text())["median_ratio"] > 0


def test_compare_benchmark(tmp_path):
    res = _load("compare").main([
        "--data", "8gaussians", "--iters", "3", "--eval-every", "1", "--configs", "ffjord", "toflow", "toflow-rk4",
        "--train-args", "--batch-size 16 --hidden 8,8 --test-size 64", "--runs", str(tmp_path / "runs"),
        "--out", str(tmp_path), "--name", "smoke",
    ])  # fmt: skip
    rows = {r["config"]: r for r in res["rows"]["0"]}
    assert set(rows) == {"ffjord", "toflow", "toflow-rk4"}
    assert rows["ffjord"]["nfe_ratio_to_reach"] == pytest.approx(1.0)  # the baseline reaches itself
    text = (tmp_path / "smoke.md").read_text()
    assert "NFE ratio to reach" in text and "Command:" in text
    windows = _load("windows")
    runs = [tmp_path / "runs" / "8gaussians" / f"{c}-s0" for c in ("ffjord", "toflow")]
    table = windows.table(runs, every=1)
    lines = table.splitlines()
    assert len(lines) == 2 + 3  # header, rule, one row per iteration
    log = json.loads((runs[1] / "metrics.json").read_text())["log"]
    nfe = log[1]["nfe_forward"] + log[1]["nfe_backward"]
    assert lines[3].startswith("| 2 |") and f"/ {nfe:.1f} |" in lines[3]
    split = windows.table(runs, every=1, split=True).splitlines()
    assert f"/ {log[1]['nfe_forward']:.1f} + {log[1]['nfe_backward']:.1f} |" in split[3]
    with pytest.raises(ValueError, match="every"):
        windows.table(runs, every=0)


def test_compare_reuse_takes_only_a_finished_run_with_the_same_settings(tmp_path, monkeypatch):
    compare = _load("compare")
    argv = ["--data", "8gaussians", "--iters", "2", "--eval-every", "1", "--configs", "ffjord", "--reuse",
            "--train-args", "--batch-size 8 --hidden 4 --test-size 16", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path), "--name", "reuse"]  # fmt: skip
    first = compare.main(argv)
    calls = []
    monkeypatch.setattr(compare, "run", lambda args: calls.append(args) or pytest.fail("ran again"))
    again = compare.main(argv)
    assert calls == [] and again["rows"] == first["rows"]
    monkeypatch.undo()
    changed = compare.main([a.replace("--hidden 4", "--hidden 5") for a in argv])  # other settings: runs again
    assert changed["rows"]["0"][0]["nfe_forward_total"] > 0
    config = json.loads((tmp_path / "runs" / "8gaussians" / "ffjord-s0" / "metrics.json").read_text())["config"]
    assert config["hidden"] == "5"


def test_compare_summary_says_not_reached():
    compare = _load("compare")
    base = {"test_nll": 1.0, "unit": "nats", "nfe_forward_total": 10, "nfe_backward_total": 10, "cpu_seconds": 2.0,
            "iters": 2, "T": [0.5], "eval_curve": [{"iteration": 2, "test_nll": 1.0, "nfe_total": 20, "cpu_seconds": 2.0}]}
    worse = dict(base, test_nll=1.5, eval_curve=[{"iteration": 2, "test_nll": 1.5, "nfe_total": 8, "cpu_seconds": 1.0}])
    better = dict(base, eval_curve=[{"iteration": 1, "test_nll": 0.9, "nfe_total": 5, "cpu_seconds": 0.5}])
    rows = {r["config"]: r for r in compare.summarise({"ffjord": base, "worse": worse, "better": better})}
    assert rows["worse"]["reached_at_iteration"] is None and "not reached" in compare.markdown(list(rows.values()), "t")
    assert rows["better"]["nfe_ratio_to_reach"] == pytest.approx(0.25)
    assert rows["better"]["cpu_ratio_to_reach"] == pytest.approx(0.25)


def test_soak_benchmark(tmp_path):
    soak = _load("soak")
    soak.main(["--iters", "20", "--sample-every", "10", "--out", str(tmp_path)])
    assert (tmp_path / "soak.json").exists() and (tmp_path / "soak.md").exists()


def test_update_readme_fills_marked_blocks(tmp_path, monkeypatch):
    upd = _load("update_readme")
    (tmp_path / "x.md").write_text("| a |\n")
    monkeypatch.setattr(upd, "RESULTS", tmp_path)
    text, names = upd.fill("intro\n<!-- results:x -->\nold\n<!-- /results:x -->\nend\n")
    assert names == ["x"] and "| a |" in text and "old" not in text
    with pytest.raises(SystemExit, match="does not exist"):
        upd.fill("<!-- results:missing -->\n<!-- /results:missing -->")


def test_demo(tmp_path):
    from examples.demo import main

    res = main(["--iters", "3", "--hidden", "8,8", "--test-size", "64", "--out", str(tmp_path)])
    assert set(res) == {"ffjord", "toflow"} and res["ffjord"]["T"] == [0.5]
    for name in ("comparison.md", "densities.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_ablation_benchmark(tmp_path):
    res = _load("ablation").main([
        "--iters", "2", "--alphas", "0", "1", "--epss", "0.2", "--eval-every", "1",
        "--train-args", "--batch-size 16 --hidden 8,8 --test-size 64", "--runs", str(tmp_path / "runs"),
        "--out", str(tmp_path), "--name", "abl",
    ])  # fmt: skip
    assert [(r["ablation"], r["alpha"], r["eps"]) for r in res["results"]] == [("alpha", 0.0, 0.1), ("alpha", 1.0, 0.1), ("eps", 0.1, 0.2)]
    assert (tmp_path / "abl.png").stat().st_size > 0 and "mean abs dL/dT" in (tmp_path / "abl.md").read_text()
