"""Smoke tests: the benchmark commands, the demo and the quickstart, a few iterations each."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import (
    ablation,
    budget_eval,
    code_lines,
    compare,
    defaults,
    headline,
    overhead,
    rescaling,
    soak,
    update_readme,
    windows,
)
from benchmarks.harness.train import run

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--batch-size 16 --hidden 8,8 --test-size 64 --rtol 1e-3 --atol 1e-3 --eval-rtol 1e-3 "
    "--eval-atol 1e-3"
)


@pytest.fixture(autouse=True)
def _float32(_default_dtype):
    """The scripts run in float32, as from the command line."""
    torch.set_default_dtype(torch.float32)


def _metrics(test_nll: float, curve: list[tuple[int, float, int, float]], **extra) -> dict:
    """Synthetic metrics.json: the final NLL and (iteration, test NLL, NFE, CPU so far) points."""
    last = curve[-1]
    return {
        "test_nll": test_nll,
        "unit": "nats",
        "iters": last[0],
        "nfe_forward_total": last[2] // 2,
        "nfe_backward_total": last[2] - last[2] // 2,
        "nfe_total": last[2],
        "cpu_seconds": last[3],
        "T": [0.5],
        "eval_curve": [
            {"iteration": i, "test_nll": v, "nfe_total": n, "cpu_seconds": c}
            for i, v, n, c in curve
        ],
        **extra,
    }


# ------------------------------------------------------------------- the commands the docs give

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND = re.compile(r"python -m (benchmarks[\w.]*)([^`\n#]*)")


def documented_commands() -> list[tuple[str, str, str]]:
    """``(page, module, arguments)`` of every ``python -m benchmarks.NAME ...`` the pages give."""
    found = []
    for page in PAGES:
        for m in COMMAND.finditer(page.read_text()):
            args = re.split(r"\s(?:&&|\|\||;|\|)\s", m.group(2))[0].strip()
            if "[" not in args and "..." not in args:  # a synopsis, not a command
                found.append((page.relative_to(ROOT).as_posix(), m.group(1), args))
    return found


class _Parsed(Exception):
    pass


def test_the_docs_give_benchmark_commands_as_modules() -> None:
    """``python -m benchmarks.NAME``, never a path (a script cannot import the package)."""
    paths = {p.name: re.findall(r"python3? benchmarks/\w+\.py", p.read_text()) for p in PAGES}
    assert not {k: v for k, v in paths.items() if v}
    assert {module for _, module, _ in documented_commands()} >= {"benchmarks.compare"}


@pytest.mark.parametrize(("page", "module", "args"), documented_commands())
def test_every_documented_benchmark_command_parses(
    page: str, module: str, args: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each command the docs give names a module whose ``main`` parses its arguments."""
    if module == "benchmarks.fm_likelihood":
        pytest.importorskip("flow_matching")
    parse = argparse.ArgumentParser.parse_args

    def parsed_then_stop(self: argparse.ArgumentParser, *given: object) -> None:
        raise _Parsed(parse(self, *given))

    main = importlib.import_module(module).main
    if not args:  # the module named in prose: it runs
        with pytest.raises(SystemExit, match="^0$"):
            main(["--help"])
        return
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed_then_stop)
    with pytest.raises(_Parsed):
        main(shlex.split(args))


# ----------------------------------------------------------------------------- compare.py


def test_compare_benchmark_with_a_budget_and_flow_matching(tmp_path: Path) -> None:
    res = compare.main([
        "--data", "8gaussians", "--iters", "3", "--eval-every", "2",
        "--configs", "ffjord", "ffjord-b2", "fm", "--train-args", TINY,
        "--runs", str(tmp_path / "runs"), "--out", str(tmp_path), "--name", "smoke",
        "--margin", "0.001", "--figure", "--figures", str(tmp_path),
    ])  # fmt: skip
    rows = {r["config"]: r for r in res["rows"]["0"]}
    assert list(rows) == ["ffjord", "ffjord-b2", "fm"]
    base, budget, fm = rows["ffjord"], rows["ffjord-b2"], rows["fm"]
    # its own NLL
    assert base["nfe_ratio_to_reach"] == pytest.approx(1.0) and base["reached_at_iteration"] == 3
    assert base["target"] == pytest.approx(base["test_nll"] + 0.001)
    assert budget["budget"] == [2] and budget["guard_events"] == 0 and base["budget"] == [None]
    # Flow matching trains for FFJORD's CPU time (on up to 1000x the iterations), one network
    # evaluation each;
    # how many iterations fit in that time depends on the machine.
    assert 3 < fm["iters"] <= 3000 and (
        fm["cpu_seconds"] >= round(base["cpu_seconds"], 3) or fm["iters"] == 3000
    )
    assert fm["nfe_forward_total"] == fm["iters"] and fm["nfe_backward_total"] == 0
    assert res["configs"]["fm"] == ("fm", ["--max-cpu-seconds", "ffjord"])
    text = (tmp_path / "smoke.md").read_text()
    assert (
        "NFE ratio to reach" in text
        and "Command:" in text
        and "| ffjord-b2 |" in text
        and "| 2 |" in text
    )
    assert json.loads((tmp_path / "smoke.json").read_text())["rows"] == json.loads(
        json.dumps(res["rows"])
    )
    assert (tmp_path / "smoke.png").read_bytes()[:4] == b"\x89PNG"

    runs = [tmp_path / "runs" / "8gaussians" / f"{c}-s0" for c in ("ffjord", "ffjord-b2")]
    lines = windows.table(runs, every=1).splitlines()
    assert len(lines) == 2 + 3  # header, rule, one row per iteration
    log = json.loads((runs[1] / "metrics.json").read_text())["log"]
    nfe = log[1]["nfe_forward"] + log[1]["nfe_backward"]
    assert (
        lines[3].startswith("| 2 |") and f"/ {nfe:.1f} |" in lines[3] and "2 rk4 steps" in lines[0]
    )
    split = windows.table(runs, every=1, split=True).splitlines()
    assert f"/ {log[1]['nfe_forward']:.1f} + {log[1]['nfe_backward']:.1f} |" in split[3]
    with pytest.raises(ValueError, match="every"):
        windows.table(runs, every=0)
    assert windows.main(["--every", "3", "--runs", *map(str, runs)]).count("\n") == 3


def test_compare_reuse_takes_only_a_finished_run_with_the_same_settings(
    tmp_path: Path, monkeypatch
) -> None:
    argv = ["--data", "8gaussians", "--iters", "2", "--eval-every", "1", "--configs", "ffjord",
            "--reuse", "--train-args", TINY.replace("8,8", "4"), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path), "--name", "reuse"]  # fmt: skip
    first = compare.main(argv)
    calls = []
    monkeypatch.setattr(
        compare, "run", lambda args: calls.append(args) or pytest.fail("ran again")
    )
    again = compare.main(argv)
    assert calls == [] and again["rows"] == first["rows"]
    monkeypatch.undo()
    # other settings: runs again
    changed = compare.main([a.replace("--hidden 4", "--hidden 5") for a in argv])
    assert changed["rows"]["0"][0]["nfe_forward_total"] > 0
    config = json.loads(
        (tmp_path / "runs" / "8gaussians" / "ffjord-s0" / "metrics.json").read_text()
    )["config"]
    assert config["hidden"] == "5"


def test_compare_summary_reach_and_margin() -> None:
    base = _metrics(1.0, [(0, 3.0, 0, 0.0), (2, 1.5, 10, 1.0), (4, 1.0, 20, 2.0)])
    near = _metrics(
        1.004,
        [(0, 3.0, 0, 0.0), (2, 1.004, 6, 0.5), (4, 1.004, 12, 1.0)],
        budget=[2],
        guard_events=[{"step": 0}],
    )
    worse = _metrics(1.5, [(0, 3.0, 0, 0.0), (4, 1.5, 8, 1.0)])
    rows = {
        r["config"]: r
        for r in compare.summarise({"ffjord": base, "near": near, "worse": worse}, margin=0.005)
    }
    assert (
        rows["ffjord"]["target"] == pytest.approx(1.005)
        and rows["ffjord"]["reached_at_iteration"] == 4
    )
    # Within the margin at its first point below the target: iteration 2, 6 of FFJORD's 20 NFE, 0.5
    # of its 2 s.
    assert rows["near"]["reached_at_iteration"] == 2
    assert rows["near"]["nfe_ratio_to_reach"] == pytest.approx(0.3)
    assert rows["near"]["cpu_ratio_to_reach"] == pytest.approx(0.25)
    assert (
        rows["near"]["nfe_ratio_total"] == pytest.approx(0.6) and rows["near"]["guard_events"] == 1
    )
    assert (
        compare.summarise({"ffjord": base, "near": near}, margin=0.001)[1]["reached_at_iteration"]
        is None
    )
    assert (
        rows["worse"]["reached_at_iteration"] is None
        and rows["worse"]["nfe_ratio_to_reach"] is None
    )
    text = compare.markdown(list(rows.values()), "t")
    assert (
        "| worse | 1.5000 |" in text
        and "not reached | - | -" in text
        and "iter 2 | 0.30 | 0.25" in text
    )
    assert (
        "| 2 (1 grown) |" in text and "target: FFJORD's final NLL + margin = 1.0050 nats" in text
    )
    assert (
        compare.reach(base["eval_curve"], 1.5)["iteration"] == 2
        and compare.reach(base["eval_curve"], 0.5) is None
    )


# ------------------------------------------------------------------- budget_eval.py, code_lines.py


# RNODE's state carries its regulariser integrals
@pytest.mark.parametrize("method", ["ffjord", "rnode"])
def test_budget_eval_on_a_finished_run(tmp_path: Path, method: str) -> None:
    out = tmp_path / "run"
    run(
        [
            "--data",
            "8gaussians",
            "--method",
            method,
            "--iters",
            "1",
            "--out",
            str(out),
            "--no-progress",
            *TINY.split(),
        ]
    )
    rows = budget_eval.main(
        [
            "--runs",
            str(out),
            "--budgets",
            "2",
            "3",
            "--fit-steps",
            "2",
            "--fit-size",
            "16",
            "--samples",
            "16",
            "--out",
            str(tmp_path),
            "--name",
            "be",
        ]
    )
    assert [r["N"] for r in rows] == [2, 3] and [r["nfe_per_solve"] for r in rows] == [8, 12]
    for r in rows:
        assert r["nfe_ratio"] == pytest.approx(r["nfe_per_solve"] / r["nfe_dopri5_per_solve"])
        assert r["nll_error_uniform"] == pytest.approx(r["nll_uniform"] - r["nll_dopri5"])
        assert r["sample_error_uniform"] >= 0 and len(r["fit_error"]) == 1
    text = (tmp_path / "be.md").read_text()
    assert (
        text.count(f"| {tmp_path.name}/run (dopri5") == 2 and "nats" in text and "Command:" in text
    )
    assert json.loads((tmp_path / "be.json").read_text())["rows"][0]["N"] == 2


def test_code_lines_counts_code_only(tmp_path: Path) -> None:
    source = '''"""A module docstring
over two lines."""
# a comment
import os  # a trailing comment


def f(x):
    """A docstring."""
    # a comment in a function
    return (x +
            1)


class A:
    """A class."""

    def g(self):
        return os.sep
'''
    assert sorted(code_lines.code_lines(source)) == [4, 7, 10, 11, 14, 17, 18]
    assert code_lines.functions(source, "m.py") == [("m.py:f", 3), ("m.py:A.g", 2)]
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(source)
    (tmp_path / "pkg" / "skip").mkdir()
    (tmp_path / "pkg" / "skip" / "n.py").write_text("x = 1\n")
    measured = code_lines.measure([str(tmp_path / "pkg")], [str(tmp_path / "pkg" / "skip")])
    assert measured["code_lines"] == 7 and measured["longest_functions"][0] == (
        f"{tmp_path / 'pkg' / 'm.py'}:f",
        3,
    )


def test_code_lines_command_measures_the_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    folder = ROOT / "benchmarks"
    assert code_lines.main([str(folder), "--exclude", str(folder / "harness")]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["top_level_files"] == len(measured["files"]) > 10
    longest = measured["longest_functions"][0][1]
    assert measured["median_function"] <= measured["p90_function"] <= longest


# ------------------------------------------------------------------------ rescaling, headline


def test_rescaling_command_reproduces_its_committed_counts(tmp_path: Path) -> None:
    rows = rescaling.main(["--out", str(tmp_path)])
    assert all(r["nfe_over_T"] == r["nfe_rescaled"] for r in rows if r["first_step"] is not None)
    committed = json.loads((ROOT / "benchmarks" / "results" / "rescaling.json").read_text())
    committed = committed["rows"] if isinstance(committed, dict) else committed
    keys = ("T", "first_step", "nfe_over_T", "nfe_rescaled")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in committed]
    text = (tmp_path / "rescaling.md").read_text()
    assert "Command: `python -m benchmarks.rescaling --out" in text


def _table(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("|")]


def test_headline_command_rewrites_the_committed_tables(tmp_path: Path) -> None:
    """The tables derived from the committed compare results are the committed ones."""
    results = ROOT / "benchmarks" / "results"
    assert headline.main(["--out", str(tmp_path), "--figures", str(tmp_path)]) == 0
    for name in ("headline", "budget_ablation", "budget_ablation_seeds"):
        assert _table(tmp_path / f"{name}.md") == _table(results / f"{name}.md"), name


def test_defaults_command_on_its_own_codebase_and_render(tmp_path: Path) -> None:
    argv = ["--codebases", "torchdiffeq", "--T0", "0.5", "--iters", "2", "--out", str(tmp_path)]
    assert defaults.main(argv) == 0
    saved = json.loads((tmp_path / "defaults.json").read_text())
    assert [r["config"] for r in saved["rows"]] == list(defaults.CONFIGS) and saved["iters"] == 2
    assert saved["rows"][-1]["T"] == 0.5 and saved["rows"][1]["T"] != 0.5  # budget2: T fixed
    committed = ROOT / "benchmarks" / "results" / "defaults.json"  # --render: the table from JSON
    (tmp_path / "old.json").write_text(committed.read_text())
    assert defaults.main(["--render", "--out", str(tmp_path), "--name", "old"]) == 0
    assert _table(tmp_path / "old.md") == _table(committed.with_suffix(".md"))


# ------------------------------------------------------------------------ ablation, soak, overhead


def test_ablation_benchmark(tmp_path: Path) -> None:
    res = ablation.main([
        "--iters", "2", "--alphas", "0", "1", "--epss", "0.2", "--eval-every", "1",
        "--train-args", TINY, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path),
        "--figures", str(tmp_path), "--name", "abl",
    ])  # fmt: skip
    settings = [(r["ablation"], r["alpha"], r["eps"]) for r in res["results"]]
    assert settings == [("alpha", 0.0, 0.1), ("alpha", 1.0, 0.1), ("eps", 0.1, 0.2)]
    assert all(len(r["abs_dLdT"]) == 2 and r["T"] != [0.5] for r in res["results"])
    assert (tmp_path / "abl.png").read_bytes()[:4] == b"\x89PNG" and "mean abs dL/dT" in (
        tmp_path / "abl.md"
    ).read_text()


def test_soak_benchmark(tmp_path: Path) -> None:
    argv = [
        "--iters",
        "6",
        "--sample-every",
        "3",
        "--hidden",
        "8",
        "--batch",
        "16",
        "--budget",
        "2",
        "--guard-every",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert soak.main(argv) == 0
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["passed"] and result["budget"] == [2] and result["checks"]["bad_grid"] == 0
    assert [s["iteration"] for s in result["samples"]] == [3, 6] and result["T"]["final"] != [0.5]
    assert result["fractions"][0][1] != 0.5  # the guard stepped the learned placement
    assert "budget 2 rk4 steps (learned placement" in (tmp_path / "soak.md").read_text()
    assert soak.main([*argv, "--budget", "0", "--iters", "2"]) == 0
    assert json.loads((tmp_path / "soak.json").read_text())["budget"] == [None]


def test_overhead_benchmark(tmp_path: Path) -> None:
    res = overhead.main(["--pairs", "2", "--warmup", "0", "--batch", "32", "--out", str(tmp_path)])
    assert res["outputs_equal"] and res["extra_evaluations"] == 1
    assert (
        res["nfe_horizon"]["forward"] == res["nfe_bare"]["forward"]
        and res["nfe_horizon"]["backward"] == 1
    )
    assert json.loads((tmp_path / "overhead.json").read_text())["median_ratio"] > 0
    assert "`LearnableHorizon(T0=T)(func, y0)`" in (tmp_path / "overhead.md").read_text()


def test_update_readme_fills_marked_blocks(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "x.md").write_text("| a |\n")
    monkeypatch.setattr(update_readme, "RESULTS", tmp_path)
    text, names = update_readme.fill("intro\n<!-- results:x -->\nold\n<!-- /results:x -->\nend\n")
    assert names == ["x"] and "| a |" in text and "old" not in text
    with pytest.raises(SystemExit, match="does not exist"):
        update_readme.fill("<!-- results:missing -->\n<!-- /results:missing -->")
    assert {ROOT / "README.md", ROOT / "docs" / "energy.md"} <= set(update_readme.pages())
    page = tmp_path / "page.md"
    page.write_text("<!-- results:x -->\nold\n<!-- /results:x -->\n")
    monkeypatch.setattr(update_readme, "pages", lambda: [page])
    monkeypatch.setattr(update_readme, "ROOT", tmp_path)
    # stale, left as it is
    assert update_readme.main(["--check"]) == 1 and "old" in page.read_text()
    assert update_readme.main([]) == 0 and update_readme.main(["--check"]) == 0
    assert page.read_text() == "<!-- results:x -->\n| a |\n<!-- /results:x -->\n"


# ----------------------------------------------------------------------------- demo and quickstart


def test_demo(tmp_path: Path) -> None:
    from benchmarks.demo import main

    res = main(["--iters", "2", "--hidden", "8,8", "--test-size", "64", "--out", str(tmp_path)])
    assert list(res) == ["ffjord", "ffjord-b4", "toflow-b4"]
    assert (
        res["ffjord"]["T"] == [0.5]
        and res["ffjord-b4"]["T"] == [0.5]
        and res["toflow-b4"]["T"] != [0.5]
    )
    assert res["ffjord"]["budget"] == [None] and res["ffjord-b4"]["budget"] == res["toflow-b4"][
        "budget"
    ] == [4]
    table = (tmp_path / "comparison.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == list(res)
    for name in ("densities.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_quickstart_runs_as_a_script_and_stays_short(tmp_path: Path) -> None:
    script = ROOT / "examples" / "quickstart.py"
    assert len(script.read_text().splitlines()) <= 150
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(script), "--iters", "3", "--plot", str(tmp_path / "q.png")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [
        ["iter", "1"],
        ["iter", "2"],
        ["iter", "3"],
    ]
    T = [float(line.split(" T ")[1].split()[0]) for line in lines[:3]]
    assert T == [0.5, 0.5, 0.5]  # on a budget T is fixed by default: the steps carry the cost
    nfe = [tuple(map(int, line.split(" NFE ")[1].split()[0].split("+"))) for line in lines[:3]]
    guard = [int(line.split("(guard ")[1].split()[0]) for line in lines[:3]]
    # Cumulative: 4 rk4 steps x 4 stages forward, backpropagated through (no evaluation in
    # backward, though the
    # model names odeint_adjoint); the guard's check at the first step (its reference and its fit)
    # is counted too.
    # The guard checks at steps 0 and 1 (then 3).
    assert [(b[0] - a[0], b[1] - a[1]) for a, b in zip(nfe, nfe[1:])] == [
        (16 + guard[1] - guard[0], 0),
        (16, 0),
    ] and nfe[0][1] == 0
    assert nfe[0][0] == 16 + guard[0] and 0 < guard[0] < guard[1] == guard[2]
    assert lines[3].startswith("test NLL ") and "nats (dopri5 1e-5)" in lines[3]
    assert f"training NFE {sum(nfe[-1])} " in lines[3] and f"T {T[-1]:.4f}" in lines[3]
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_quickstart_adaptive(capsys: pytest.CaptureFixture[str]) -> None:
    from examples.quickstart import main

    result = main(["--iters", "2", "--budget", "0", "--plot", ""])
    assert result["T"] != 0.5 and result["nfe"] > 2 * 6 and 0 < result["test_nll"] < 20
    assert "density:" not in capsys.readouterr().out


def test_headline_figure_reads_each_results_runs_and_says_when_they_are_missing(
    tmp_path: Path, capsys
) -> None:
    head = headline
    runs = tmp_path / "r"
    for config in ("ffjord", "fm"):
        (runs / "toy" / f"{config}-s3").mkdir(parents=True)
        curve = [
            {"iteration": i, "cpu_seconds": 2.0 * i, "test_nll": 3.0 - 0.1 * i} for i in range(4)
        ]
        (runs / "toy" / f"{config}-s3" / "metrics.json").write_text(
            json.dumps({"test_nll": 2.7, "eval_curve": curve})
        )
    res = {
        "seeds": [3],
        "configs": {"ffjord": ["ffjord", []], "fm": ["fm", []]},
        "runs": str(runs),
    }
    head.figure({"toy": res}, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    head.figure({"toy": {**res, "runs": str(tmp_path / "nowhere")}}, tmp_path / "b.png")
    assert (
        not (tmp_path / "b.png").exists()
        and "b.png not redrawn: its runs are not here" in capsys.readouterr().out
    )


def test_images_crossing_is_interpolated_between_checkpoints() -> None:
    from benchmarks.images_report import crossing

    points = [
        {"cpu_seconds": 100.0, "nfe": 1000, "bits_per_dim": 4.0},
        {"cpu_seconds": 200.0, "nfe": 3000, "bits_per_dim": 3.0},
        {"cpu_seconds": 300.0, "nfe": 5000, "bits_per_dim": 2.5},
    ]
    assert crossing(points, 2.75) == pytest.approx({"cpu_seconds": 250.0, "nfe": 4000.0})
    assert crossing(points, 3.0) == pytest.approx({"cpu_seconds": 200.0, "nfe": 3000.0})
    # reached at the first checkpoint: nothing is known before it
    assert crossing(points, 5.0) == {"cpu_seconds": 100.0, "nfe": 1000}
    assert crossing(points, 2.0) is None


def test_images_race_reads_ffjords_curve_at_its_marks(tmp_path: Path) -> None:
    from benchmarks.images_report import race

    def run(config: str, bpd: list[float], events: list[dict]) -> dict:
        points = []
        for k, b in enumerate(bpd, 1):
            path = tmp_path / f"{config}-{k}.pt"
            torch.save({"guard_events": events}, path)
            points.append({"checkpoint": str(path), "cpu_seconds": 100.0 * k, "nfe": 10 * k,
                           "bits_per_dim": b})  # fmt: skip
        return {"config": config, "seed": 0, "points": points}

    grew = {"horizon": "2", "budget": [2, 3], "step": 41, "error": [0.03], "spread": 0.1}
    runs = {
        "ffjord-s0": run("ffjord", [5.0, 4.0, 3.0, 2.0], []),
        "b2-s0": run("b2", [4.0, 2.5, 2.2, 2.1], [{**grew, "rolled_back_to": 31}]),
    }
    (row,) = race(runs, [200.0, 400.0])[0]
    # FFJORD's 4.0 at 200 s: b2 had it at 100 s; FFJORD's 2.0 at 400 s: never reached
    assert row["cpu_ratios"] == [pytest.approx(0.5), None]
    assert row["behind_at"] == [400.0]  # 2.1 against 2.0
    assert row["events"] == "block 2: 2>3 @41 (0.03/dim, spread 0.1 nats), back to 31"


def test_images_report_reads_a_longer_run_up_to_a_mark(tmp_path: Path) -> None:
    from benchmarks.images_report import curves

    out = tmp_path / "b2-s0"
    out.mkdir()
    marks = [100.0, 200.0, 300.0]
    info = {"config": "b2", "seed": 0, "cpu_seconds": 300.0, "marks": marks, "argv": []}
    (out / "run.json").write_text(json.dumps(info))
    lines = []
    for k, mark in enumerate(marks, 1):
        path = out / f"ckpt-{mark:g}.pt"
        state = {"nfe": 10 * k, "iteration": k, "cpu_seconds": mark + 0.5, "guard_nfe": 0}
        state.update(horizons=[{"budget.n_steps": torch.tensor(2)}], guard_events=[])
        torch.save(state, path)
        lines.append(json.dumps({"checkpoint": str(path), "bits_per_dim": 5.0 - k, "T": [1.0]}))
    (out / "scores.jsonl").write_text("\n".join(lines) + "\n")
    whole, start = curves(tmp_path)["b2-s0"], curves(tmp_path, until=200)["b2-s0"]
    assert [p["bits_per_dim"] for p in whole["points"]] == [4.0, 3.0, 2.0]
    assert [p["bits_per_dim"] for p in start["points"]] == [4.0, 3.0]
    assert start["cpu_seconds"] == 200 and start["marks"] == [100.0, 200.0]


def test_images_flattening_is_where_every_later_window_improves_little() -> None:
    from benchmarks.images_report import flattens

    def points(bpd: list[float]) -> list[dict]:
        return [{"cpu_seconds": 100.0 * k, "nfe": k, "bits_per_dim": b}
                for k, b in enumerate(bpd, 1)]  # fmt: skip

    # windows of 200 s: from 300 s (2.5 -> 2.39) on, every one improves by less than 0.2
    run = points([4.0, 3.0, 2.5, 2.45, 2.39, 2.38, 2.37])
    assert flattens(run, 0.2, 200.0) == 300.0
    # a steady fall of 0.15 per 100 s is never flat, however close its end
    assert flattens(points([3.0, 2.85, 2.7, 2.55, 2.4]), 0.2, 200.0) is None
    # a pause and a fall after it: flat only from where the later windows are all small
    run = points([4.0, 3.0, 2.99, 2.98, 2.5, 2.49, 2.48, 2.47])
    assert flattens(run, 0.2, 200.0) == 500.0
    assert flattens(points([3.0, 2.0]), 0.2, 200.0) is None  # shorter than a window


def test_images_report_reads_several_folders_and_refuses_a_run_in_two(tmp_path: Path) -> None:
    from benchmarks.images_report import curves

    for folder, name in (("a", "b2-s0"), ("b", "b2-s1"), ("c", "b2-s0")):
        out = tmp_path / folder / name
        out.mkdir(parents=True)
        info = {"config": "b2", "seed": int(name[-1]), "cpu_seconds": 100.0, "marks": [100.0],
                "argv": []}  # fmt: skip
        (out / "run.json").write_text(json.dumps(info))
        path = out / "ckpt-100.pt"
        torch.save(
            {
                "nfe": 10,
                "iteration": 1,
                "cpu_seconds": 100.5,
                "guard_nfe": 0,
                "horizons": [{"budget.n_steps": torch.tensor(2)}],
                "guard_events": [],
            },
            path,
        )
        (out / "scores.jsonl").write_text(
            json.dumps({"checkpoint": str(path), "bits_per_dim": 3.0, "T": [1.0]}) + "\n"
        )
    assert sorted(curves([tmp_path / "a", tmp_path / "b"])) == ["b2-s0", "b2-s1"]
    with pytest.raises(ValueError, match=r"runs \['b2-s0'\] are in more than one"):
        curves([tmp_path / "a", tmp_path / "c"])
