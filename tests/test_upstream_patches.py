"""Tests of torch_tempopt.patches.{ffjord,rnode,otflow} and their commands (examples/*_patch.py)
against our stand-ins of the upstream checkouts (tests/standins/)."""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy
import pytest
import torch

from torch_tempopt.patches import CSV_COLUMNS, PatchError
from torch_tempopt.patches import ffjord as ffjord_patch
from torch_tempopt.patches import otflow as otflow_patch
from torch_tempopt.patches import rnode as rnode_patch

STANDINS = Path(__file__).resolve().parent / "standins"
FFJORD, RNODE, OTFLOW = STANDINS / "ffjord", STANDINS / "rnode", STANDINS / "otflow"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def column(rows: list[dict[str, str]], name: str, block: int = 0) -> list[float]:
    return [float(r[name]) if r[name] else float("nan") for r in rows if int(r["block"]) == block]


def process_state() -> dict[str, Any]:
    """What a patch changes in the process, and must restore."""
    import matplotlib

    root = logging.getLogger()
    return {
        "argv": list(sys.argv), "path": list(sys.path), "cwd": os.getcwd(),
        "handlers": list(root.handlers), "dtype": torch.get_default_dtype(),
        "adam": torch.optim.Adam, "sgd": torch.optim.SGD, "mean": numpy.mean,
        "use": matplotlib.use, "filters": list(warnings.filters),
        "modules": {
            m for m in sys.modules
            if m.split(".")[0] in {"lib", "src", "six", "h5py", "datasets", "diagnostics"}
        },
    }  # fmt: skip


def run(
    patched: Callable[..., Any],
    checkout: Path,
    script: str,
    argv: list[str],
    save: Path,
    **opts: Any,
) -> list[dict[str, str]]:
    torch.set_default_dtype(torch.float32)  # the scripts feed float32 data, as upstream
    torch.manual_seed(0)
    with patched(checkout, script=script, **opts) as patch:
        patch.run([*argv, "--save", str(save)])
    return read_csv(save / "tempopt.csv")


def broken_copy(tmp_path: Path, checkout: Path, file: str, old: str, new: str) -> Path:
    copy = tmp_path / checkout.name
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns("__pycache__"))
    text = (copy / file).read_text()
    assert old in text
    (copy / file).write_text(text.replace(old, new))
    return copy


def finite_difference(
    loss: Callable[[], torch.Tensor], T: torch.Tensor, step: float = 1e-4
) -> float:
    values, T0 = [], T.item()
    with torch.no_grad():
        for value in (T0 + step, T0 - step):
            T.fill_(value)
            values.append(loss().item())
        T.fill_(T0)
    return (values[0] - values[1]) / (2 * step)


# ------------------------------------------------------------------------------------------ FFJORD
def test_ffjord_train_toy_moves_T_and_writes_csv(tmp_path: Path) -> None:
    rows = run(
        ffjord_patch.patched,
        FFJORD,
        "train_toy.py",
        ["--niters", "4", "--val_freq", "4"],
        tmp_path,
    )
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    T = column(rows, "T")
    assert T[0] == pytest.approx(0.5, abs=1e-6) and T[-1] != T[0]
    assert all(
        r["dLdT"] != "" and int(r["nfe_forward"]) > 0 and int(r["nfe_backward"]) > 0 for r in rows
    )
    log = (tmp_path / "logs").read_text()
    assert (
        "CNF Time 0.5000" in log
    )  # upstream's own log shows the learned T; Adam's first step is lr * sign:
    assert "CNF Time 0.4900" in log or "CNF Time 0.5100" in log
    state = torch.load(tmp_path / "checkpt.pth", weights_only=False)["state_dict"]
    assert "chain.0.sqrt_end_time" in state and not any(
        "horizon" in k for k in state
    )  # upstream's keys
    assert (
        tmp_path / "trajectory" / "trajectory.npy"
    ).exists()  # a 5-point grid: upstream's odeint


def test_ffjord_off_keeps_T_fixed_with_the_same_logs(tmp_path: Path) -> None:
    rows = run(
        ffjord_patch.patched,
        FFJORD,
        "train_toy.py",
        ["--niters", "3", "--val_freq", "3"],
        tmp_path,
        off=True,
    )
    assert len(set(column(rows, "T"))) == 1 and all(r["dLdT"] == "" for r in rows)
    assert (tmp_path / "logs").read_text().count("CNF Time 0.5000") == 3


def test_ffjord_budget_solves_on_n_rk4_steps_under_the_guard(tmp_path: Path) -> None:
    argv = ["--niters", "3", "--val_freq", "3"]
    with ffjord_patch.patched(FFJORD, script="train_toy.py", budget=3, learn_T=True) as patch:
        torch.set_default_dtype(torch.float32)
        patch.run([*argv, "--save", str(tmp_path)])
    rows = read_csv(tmp_path / "tempopt.csv")
    assert [int(r["nfe_forward"]) for r in rows] == [
        12,
        12,
        12,
    ]  # 3 rk4 steps, whatever upstream's dopri5
    assert column(rows, "T")[-1] != column(rows, "T")[0]  # learn_T: TO-FLOW on a budget
    guard = patch.stepper.guard
    assert (
        patch.horizons[0].budget.steps == 3 and guard.stats["errors"][0] is not None
    )  # checked against dopri5
    assert (
        not guard.stats["events"] and guard.stats["nfe"] > 0
    )  # its evaluations are its own, not the rows'
    budget = patch.horizons[
        0
    ].budget  # upstream's settings are the reference the guard checked against
    reference = budget.reference_for(budget.last_input.settings)
    assert {k: reference[k] for k in ("method", "rtol", "atol")} == {
        "method": "dopri5",
        "rtol": 1e-5,
        "atol": 1e-5,
    }


def test_ffjord_no_guard_keeps_n_fixed_steps_from_the_command_line(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)
    head = ["--ffjord", str(FFJORD), "--tempopt-budget", "2", "--tempopt-no-guard", "--"]
    argv = ["train_toy.py", "--niters", "3", "--val_freq", "3", "--save", str(tmp_path)]
    assert ffjord_patch.main([*head, *argv]) == 0
    rows = read_csv(tmp_path / "tempopt.csv")
    assert [int(r["nfe_forward"]) for r in rows] == [8, 8, 8]  # 2 rk4 steps, never checked
    with ffjord_patch.patched(FFJORD, script="train_toy.py", budget=2, guard=False) as patch:
        patch.run(["--niters", "1", "--val_freq", "1", "--save", str(tmp_path / "b")])
    assert patch.stepper.guard is None and patch.horizons[0].budget.steps == 2


def test_ffjord_patch_is_fully_reverted(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)
    before = process_state()
    with ffjord_patch.patched(FFJORD, script="train_toy.py") as patch:
        cnf = sys.modules["lib.layers.cnf"]
        init, odeint = cnf.CNF.__init__.__wrapped__, cnf.odeint.__wrapped__
        assert sys.path[0] == str(FFJORD) and torch.optim.Adam is not before["adam"]
        patch.run(["--niters", "2", "--val_freq", "2", "--save", str(tmp_path)])
        assert os.getcwd() == str(FFJORD)
    assert {"lib.layers.cnf.CNF.__init__", "lib.layers.cnf.odeint", "torch.optim.Adam"} <= set(
        patch.names
    )
    assert cnf.CNF.__init__ is init and cnf.odeint is odeint
    assert process_state() == before
    with pytest.raises(ModuleNotFoundError):  # the checkout left sys.path and sys.modules
        import diagnostics.viz_toy  # noqa: F401


def test_ffjord_patch_is_reverted_after_an_error() -> None:
    before = process_state()
    with pytest.raises(SystemExit):  # argparse's error inside the upstream script
        with ffjord_patch.patched(FFJORD, script="train_toy.py") as patch:
            patch.run(["--no-such-flag"])
    assert process_state() == before


def test_ffjord_T_not_in_weight_optimizer_warmup_or_clipping(tmp_path: Path) -> None:
    argv = [
        "--num_epochs",
        "1",
        "--ntrain",
        "16",
        "--batch_size",
        "16",
        "--warmup_iters",
        "10",
        "--lr",
        "1e-3",
    ]
    results = []
    for max_norm in ("1e10", "1e-6"):
        torch.set_default_dtype(torch.float32)
        torch.manual_seed(0)
        with ffjord_patch.patched(FFJORD, script="train_cnf.py") as patch:
            patch.run([*argv, "--max_grad_norm", max_norm, "--save", str(tmp_path / max_norm)])
            time_ids = {id(h.T) for h in patch.horizons}
            assert len(time_ids) == 2
            assert not time_ids & {id(p) for g in patch.stepper.param_groups for p in g["params"]}
            for owner in patch.owners:
                assert not time_ids & {id(p) for p in owner.parameters()}  # so not clipped either
                assert "sqrt_end_time" in dict(
                    owner.named_buffers()
                )  # --train_T's parameter became a buffer
            assert patch.stepper.param_groups[0]["lr"] == pytest.approx(
                1e-3 / 10
            )  # warm-up: the weights only
            assert patch.stepper.horizon_optimizer.param_groups[0]["lr"] == 1e-2
        results.append(read_csv(tmp_path / max_norm / "tempopt.csv"))
    loose, clipped = (
        results  # the weights' gradients were clipped by a factor ~1e-6, dL/dT was not
    )
    assert [r["dLdT"] for r in loose] == [r["dLdT"] for r in clipped]


def test_ffjord_resume_restores_T_from_the_checkpoint(tmp_path: Path) -> None:
    argv = ["--num_epochs", "1", "--ntrain", "32", "--batch_size", "16"]
    assert len(run(ffjord_patch.patched, FFJORD, "train_cnf.py", argv, tmp_path / "a")) == 4
    ckpt = torch.load(tmp_path / "a" / "checkpt.pth", weights_only=False)
    assert set(ckpt["optim_state_dict"]) == {
        "optimizer",
        "horizon_optimizer",
        "guard",
        "stats",
        "kept",
    }
    second = run(
        ffjord_patch.patched,
        FFJORD,
        "train_cnf.py",
        [*argv, "--resume", str(tmp_path / "a" / "checkpt.pth")],
        tmp_path / "b",
    )
    for block in (0, 1):
        final = float(ckpt["state_dict"][f"chain.{block}.sqrt_end_time"]) ** 2
        assert final != pytest.approx(1.0, abs=1e-4)
        assert column(second, "T", block)[0] == pytest.approx(final, rel=1e-6)
    ckpt["optim_state_dict"] = ckpt["optim_state_dict"][
        "optimizer"
    ]  # as an unpatched run saves it
    torch.save(ckpt, tmp_path / "plain.pth")
    third = run(
        ffjord_patch.patched,
        FFJORD,
        "train_cnf.py",
        [*argv, "--resume", str(tmp_path / "plain.pth")],
        tmp_path / "c",
    )
    assert column(third, "T", 1)[0] == pytest.approx(
        float(ckpt["state_dict"]["chain.1.sqrt_end_time"]) ** 2, rel=1e-6
    )


def test_ffjord_train_tabular_patches_its_own_adam(tmp_path: Path) -> None:
    with ffjord_patch.patched(FFJORD, script="train_tabular.py") as patch:
        assert (
            "lib.custom_optimizers.Adam" in patch.names and "torch.optim.Adam" not in patch.names
        )
        torch.set_default_dtype(torch.float32)
        patch.run(["--max_iters", "3", "--save", str(tmp_path)])
    T = column(read_csv(tmp_path / "tempopt.csv"), "T")
    assert len(T) == 3 and T[-1] != T[0]


def test_ffjord_dLdT_matches_finite_differences_both_directions() -> None:
    with ffjord_patch.patched(FFJORD) as patch:
        import lib.layers as layers
        from lib.layers.wrappers.cnf_regularization import l2_regularzation_fn

        diffeq = layers.ODEnet(hidden_dims=(8,), input_shape=(2,))
        odefunc = layers.ODEfunc(diffeq, divergence_fn="brute_force")
        cnf = layers.CNF(
            odefunc,
            T=0.7,
            train_T=True,
            regularization_fns=(l2_regularzation_fn,),
            atol=1e-10,
            rtol=1e-10,
        )
        (horizon,) = patch.horizons
        assert cnf.horizon is horizon and "horizon" not in dict(cnf.named_modules())
        x = torch.randn(5, 2)

        def loss(reverse: bool) -> torch.Tensor:
            z, dlogp = cnf(x, torch.zeros(5, 1), reverse=reverse)
            (reg,) = cnf.get_regularization_states()
            return z.pow(2).sum() + 0.5 * dlogp.sum() + 3.0 * reg

        for reverse in (False, True):
            horizon.T.grad = None
            loss(reverse).backward()
            fd = finite_difference(lambda: loss(reverse), horizon.T)  # noqa: B023
            assert horizon.T.grad.item() == pytest.approx(fd, rel=1e-6, abs=1e-8), reverse
        horizon.T.grad = (
            None  # a grid of the caller's own goes to upstream's odeint, without dL/dT
        )
        z, _ = cnf(x, torch.zeros(5, 1), integration_times=torch.tensor([0.0, 0.3]))
        z.sum().backward()
        assert horizon.T.grad is None


@pytest.mark.parametrize(
    ("file", "old", "new", "match"),
    [
        ("lib/layers/cnf.py", "integration_times=None, reverse", "times=None, reverse",
         r"lib\.layers\.cnf\.CNF\.forward has parameters \(self, z, logpz, times, reverse\)"),
        ("lib/layers/cnf.py", "sqrt_end_time", "sqrt_T",
         r"lib\.layers\.cnf\.CNF has no sqrt_end_time"),
    ],
)  # fmt: skip
def test_ffjord_layout_errors_name_the_commit(
    tmp_path: Path, file: str, old: str, new: str, match: str
) -> None:
    copy = broken_copy(tmp_path, FFJORD, file, old, new)
    before = process_state()
    argv = [
        "--ffjord",
        str(copy),
        "--",
        "train_toy.py",
        "--niters",
        "1",
        "--save",
        str(tmp_path / "run"),
    ]
    with pytest.raises(
        SystemExit,
        match=rf"checked against rtqichen/ffjord@994864ad\) does not recognise .*{match}",
    ):
        ffjord_patch.main(argv)
    assert process_state() == before


def test_ffjord_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="lib/layers/cnf.py is missing"):
        ffjord_patch.main(["--ffjord", str(tmp_path), "--", "train_toy.py"])
    with pytest.raises(SystemExit, match="separate the patch's options"):
        ffjord_patch.main(["--ffjord", str(FFJORD), "train_toy.py"])
    with pytest.raises(
        SystemExit, match="eps must lie in"
    ):  # --tempopt-eps 0.6 leaves no room below T0 = 0.5
        torch.set_default_dtype(torch.float32)
        ffjord_patch.main(
            [
                "--ffjord",
                str(FFJORD),
                "--tempopt-eps",
                "0.6",
                "--",
                "train_toy.py",
                "--save",
                str(tmp_path),
            ]
        )
    for option, value in [
        ("lr", "-1"),
        ("alpha", "nan"),
        ("eps", "0"),
        ("budget", "0"),
        ("budget", "2.5"),
    ]:
        with pytest.raises(SystemExit):
            ffjord_patch.main(
                ["--ffjord", str(FFJORD), f"--tempopt-{option}", value, "--", "train_toy.py"]
            )
        assert f"argument --tempopt-{option}: " in capsys.readouterr().err
    with pytest.raises(TypeError, match="no option 'skip_trajectory'"):
        rnode_patch.patched(RNODE, skip_trajectory=True)


def test_ffjord_cli_writes_csv_into_save(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)
    argv = [
        "--ffjord",
        str(FFJORD),
        "--tempopt-lr",
        "0.05",
        "--tempopt-alpha",
        "0",
        "--tempopt-skip-trajectory",
        "--",
    ]
    assert (
        ffjord_patch.main(
            [*argv, "train_toy.py", "--niters", "2", "--val_freq", "2", "--save", str(tmp_path)]
        )
        == 0
    )
    rows = read_csv(tmp_path / "tempopt.csv")
    T, g = column(rows, "T"), abs(column(rows, "dLdT")[0])
    # Adam's first step is lr * g / (|g| + 1e-8): lr * sign unless this unseeded batch gives a tiny
    # dL/dT.
    assert abs(T[1] - T[0]) == pytest.approx(0.05 * g / (g + 1e-8), rel=1e-3)
    assert not (tmp_path / "trajectory").exists()


# ------------------------------------------------------------------------------------------- RNODE
def test_rnode_fixed_grid_nfe_moves_in_steps_of_four(tmp_path: Path) -> None:
    argv = [
        "--solver",
        "rk4",
        "--step_size",
        "0.25",
        "--kinetic-energy",
        "0.01",
        "--jacobian-norm2",
        "0.01",
    ]
    rows = run(
        rnode_patch.patched,
        RNODE,
        "train.py",
        [*argv, "--niters", "4", "--time_length", "0.5"],
        tmp_path,
        lr=0.2,
    )
    assert {int(r["block"]) for r in rows} == {0, 1}
    for r in rows:  # torchdiffeq's rk4 grid: ceil(T / 0.25) steps, 4 evaluations each
        assert int(r["nfe_forward"]) == 4 * math.ceil(float(r["T"]) / 0.25 - 1e-6), r
    assert len({int(r["nfe_forward"]) for r in rows}) > 1  # T crossed a multiple of 0.25
    assert "TT " in (tmp_path / "logs").read_text()


def test_rnode_budget_from_the_command_line(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)
    argv = [
        "--rnode",
        str(RNODE),
        "--tempopt-budget",
        "2",
        "--",
        "train.py",
        "--kinetic-energy",
        "0.01",
    ]
    assert rnode_patch.main([*argv, "--niters", "2", "--save", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "tempopt.csv")
    assert len(rows) == 4 and all(
        int(r["nfe_forward"]) == 8 for r in rows
    )  # 2 rk4 steps per block, not dopri5


def test_rnode_off_and_sgd(tmp_path: Path) -> None:
    before = process_state()
    rows = run(
        rnode_patch.patched,
        RNODE,
        "train.py",
        ["--optimizer", "sgd", "--niters", "2"],
        tmp_path,
        off=True,
    )
    assert len(set(column(rows, "T", 1))) == 1 and all(r["dLdT"] == "" for r in rows)
    after = process_state()
    assert after["adam"] is before["adam"] and after["sgd"] is before["sgd"]


def test_rnode_T_not_in_weight_optimizer(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)
    with rnode_patch.patched(RNODE, script="train.py") as patch:
        patch.run(
            ["--niters", "1", "--train_T", "True", "--warmup_iters", "4", "--save", str(tmp_path)]
        )
        time_ids = {id(h.T) for h in patch.horizons}
        assert not time_ids & {id(p) for g in patch.stepper.param_groups for p in g["params"]}
        assert patch.stepper.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)


def test_rnode_swallowed_exception_is_reported(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="returned without stepping its blocks"):
        rnode_patch.main(
            [
                "--rnode",
                str(RNODE),
                "--",
                "train.py",
                "--dims",
                "not,ints",
                "--save",
                str(tmp_path),
            ]
        )


def test_rnode_renamed_parameter_names_the_commit(tmp_path: Path) -> None:
    copy = broken_copy(
        tmp_path,
        RNODE,
        "lib/layers/cnf.py",
        "reg_states=tuple(), integration_times",
        "regs=tuple(), integration_times",
    )
    before = process_state()
    with pytest.raises(
        SystemExit,
        match=r"ffjord-rnode@02c6e2ce.*CNF\.forward has parameters \(self, z, logpz, regs",
    ):
        rnode_patch.main(["--rnode", str(copy), "--", "train.py"])
    assert process_state() == before


def test_rnode_dLdT_with_regularisers_matches_finite_differences() -> None:
    with rnode_patch.patched(RNODE) as patch:
        import lib.layers as layers
        from lib.layers.wrappers.cnf_regularization import (
            jacobian_frobenius_regularization_fn,
            quadratic_cost,
        )

        regs = (quadratic_cost, jacobian_frobenius_regularization_fn)
        blocks = [
            layers.CNF(
                layers.ODEfunc(layers.ODEnet((8,), (2,))),
                T=0.8,
                regularization_fns=regs,
                atol=1e-10,
                rtol=1e-10,
            )
            for _ in range(2)
        ]
        model = layers.SequentialFlow(blocks)
        x = torch.randn(6, 2)

        def loss(reverse: bool) -> torch.Tensor:
            torch.manual_seed(1)  # the same Hutchinson noise in every solve
            z, dlogp, reg_states = model(x, torch.zeros(6, 1), reverse=reverse)
            assert len(reg_states) == 2 and reg_states[0].shape == (6,)
            return (
                z.pow(2).sum()
                + dlogp.sum()
                + 2.0 * reg_states[0].mean()
                + 0.5 * reg_states[1].mean()
            )

        for reverse in (False, True):
            for h in patch.horizons:
                h.T.grad = None
            loss(reverse).backward()
            for h in patch.horizons:
                fd = finite_difference(lambda: loss(reverse), h.T)  # noqa: B023
                assert h.T.grad.item() == pytest.approx(fd, rel=1e-5, abs=1e-7), reverse


# ----------------------------------------------------------------------------------------- OT-Flow
def test_otflow_train_moves_T(tmp_path: Path) -> None:
    rows = run(
        otflow_patch.patched,
        OTFLOW,
        "trainToyOTflow.py",
        ["--niters", "3", "--viz_freq", "3", "--nt", "4"],
        tmp_path,
    )
    T = column(rows, "T")
    assert T[0] == 1.0 and T[-1] != T[0]
    assert all(
        int(r["nfe_forward"]) == 16 and int(r["nfe_backward"]) == 1 for r in rows
    )  # 4 RK4 steps; dJ/dT
    (ckpt,) = tmp_path.glob("*_checkpt.pth")
    assert (
        "horizon.T" in torch.load(ckpt, weights_only=False)["state_dict"]
    )  # the checkpoint carries T
    assert list(tmp_path.glob("figs/*.png"))  # plotting went through the TkAgg -> Agg shim


def test_otflow_off_keeps_T(tmp_path: Path) -> None:
    rows = run(
        otflow_patch.patched, OTFLOW, "trainToyOTflow.py", ["--niters", "2"], tmp_path, off=True
    )
    assert column(rows, "T") == [1.0, 1.0] and all(r["dLdT"] == "" for r in rows)


def test_otflow_budget_from_the_command_line(tmp_path: Path) -> None:
    argv = [
        "--otflow",
        str(OTFLOW),
        "--tempopt-budget",
        "2",
        "--tempopt-learn-T",
        "--",
        "trainToyOTflow.py",
        "--niters",
        "2",
        "--nt",
        "8",
    ]
    assert otflow_patch.main([*argv, "--save", str(tmp_path)]) == 0
    rows = read_csv(
        tmp_path / "tempopt.csv"
    )  # 2 rk4 steps instead of nt = 8; the grid in the graph: no extra evaluation
    assert all(int(r["nfe_forward"]) == 8 and int(r["nfe_backward"]) == 0 for r in rows)
    assert column(rows, "T")[1] != 1.0


def test_otflow_patched_problem_and_integrate_agree_with_upstream() -> None:
    with otflow_patch.patched(OTFLOW) as patch:
        import src.OTFlowProblem as ot
        from src.Phi import Phi

        net = Phi(nTh=2, m=6, d=2, alph=[1.0, 10.0, 2.0])
        x = torch.randn(7, 2)
        (horizon,) = patch.horizons
        assert "horizon.T" in net.state_dict()
        Jc, _ = ot.OTFlowProblem(x, net, [0, 1], nt=5, stepper="rk4", alph=net.alph)
        Jc_up, _ = ot.OTFlowProblem.__wrapped__(x, net, [0, 1], nt=5, stepper="rk4", alph=net.alph)
        torch.testing.assert_close(Jc, Jc_up, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            horizon.T.fill_(0.7)
        z = ot.integrate(x, net, [1.0, 0.0], 5, alph=net.alph)
        torch.testing.assert_close(
            z, ot.integrate.__wrapped__(x, net, [0.7, 0.0], 5, alph=net.alph)
        )
        z0 = torch.randn(7, 5)
        for t in (0.0, 0.3, torch.tensor(0.3)):  # our field equals upstream's at float times
            torch.testing.assert_close(
                otflow_patch.odefun(z0, t, net, net.alph), ot.odefun(z0, float(t), net, net.alph)
            )
        with pytest.raises(
            TypeError
        ):  # why the patch has a field of its own: pad(value=t) with t in the graph
            ot.odefun(z0, torch.tensor(0.3, requires_grad=True), net, net.alph)


@pytest.mark.parametrize(
    ("budget", "nt", "alph", "rel"),
    [(None, 64, [1.0, 10.0, 0.0], 1e-6), (3, 6, [1.0, 10.0, 2.0], 1e-7)],
)
def test_otflow_dJdT_matches_finite_differences(
    budget: int | None, nt: int, alph: list[float], rel: float
) -> None:
    """Upstream's scheme: the continuous dJ/dT, equal to the discrete objective's derivative up to
    the RK4 error on a fine grid (the HJB term |.| has kinks, so it is off). On a budget: the exact
    derivative of the budgeted solve."""
    with otflow_patch.patched(OTFLOW, budget=budget, learn_T=budget is not None) as patch:
        import src.OTFlowProblem as ot
        from src.Phi import Phi

        net = Phi(nTh=2, m=6, d=2, alph=alph)
        x = torch.randn(9, 2)
        (horizon,) = patch.horizons
        ot.OTFlowProblem(x, net, [0, 1], nt=nt, alph=net.alph)[0].backward()
        if budget is None:  # the discrete objective of upstream's own integrator
            T = torch.tensor(1.0)
            fd = finite_difference(
                lambda: ot.OTFlowProblem.__wrapped__(x, net, [0.0, T.item()], nt, alph=net.alph)[
                    0
                ],
                T,
            )
        else:
            fd = finite_difference(
                lambda: ot.OTFlowProblem(x, net, [0, 1], nt=nt, alph=net.alph)[0], horizon.T
            )
        assert horizon.T.grad.item() == pytest.approx(fd, rel=rel)


def test_otflow_renamed_parameter_and_revert(tmp_path: Path) -> None:
    before = process_state()
    with otflow_patch.patched(OTFLOW, script="trainToyOTflow.py") as patch:
        import matplotlib

        assert matplotlib.use.__name__ == "use" and matplotlib.use is not before["use"]
    assert {
        "src.Phi.Phi.__init__",
        "src.OTFlowProblem.OTFlowProblem",
        "src.OTFlowProblem.integrate",
        "torch.optim.Adam",
    } <= set(patch.names)
    assert process_state() == before
    copy = broken_copy(
        tmp_path,
        OTFLOW,
        "src/OTFlowProblem.py",
        "def OTFlowProblem(x, Phi, tspan,",
        "def OTFlowProblem(x, Phi, span,",
    )
    with pytest.raises(
        PatchError,
        match=r"OT-Flow@4d66618e.*OTFlowProblem\.OTFlowProblem has parameters \(x, Phi, span",
    ):
        with otflow_patch.patched(copy):
            pass
    assert process_state() == before


# --------------------------------------------------------------------------------------- 0.3 fixes
def test_ffjord_budget_validation_is_scored_with_the_reference_and_checkpoints_keep_the_budget(
    tmp_path: Path,
) -> None:
    """0.2 logged the 2-step test loss under --tempopt-budget; the horizon now follows its block's
    eval().
    """
    with ffjord_patch.patched(FFJORD, budget=1) as patch:  # budget 1: 0.2 crashed here
        import lib.layers as layers

        torch.set_default_dtype(torch.float64)
        odefunc = layers.ODEfunc(
            layers.ODEnet((8,), (2,), layer_type="concat"), divergence_fn="brute_force"
        )
        cnf = layers.CNF(odefunc, T=0.5, train_T=True, solver="dopri5", atol=1e-9, rtol=1e-9)
        (horizon,) = patch.horizons
        x, zero = torch.randn(6, 2), torch.zeros(6, 1)
        cnf.train()
        on_budget = cnf(x, zero)[0]
        cnf.eval()  # upstream's validation: its test settings are the reference, solved adaptively
        scored = cnf(x, zero)[0]
        assert horizon.budget.reference is None and not horizon.training
        with (
            horizon.budgeted(False),
            torch.no_grad(),
        ):  # the same as the horizon at upstream's test settings
            assert torch.equal(cnf(x, zero)[0], scored)
        with horizon.budgeted():
            assert torch.equal(cnf(x, zero)[0], on_budget)
        assert not torch.allclose(scored, on_budget, atol=1e-6)
        with torch.no_grad():
            horizon.budget.steps = 3
            horizon.budget.placement[:3] = torch.tensor([0.3, -0.2, 0.1])
        state = cnf.state_dict()
        assert int(state["tempopt_budget"]) == 3 and "tempopt_placement" in state
        fresh = layers.CNF(odefunc, T=0.5, train_T=True, solver="dopri5", atol=1e-9, rtol=1e-9)
        fresh.load_state_dict(state)
        assert fresh.horizon.budget.steps == 3
        assert torch.equal(fresh.horizon.budget.fractions(), horizon.budget.fractions())
        plain = {
            k: v for k, v in state.items() if "tempopt_" not in k
        }  # an unpatched run's checkpoint
        fresh.load_state_dict(plain)
        torch.set_default_dtype(torch.float32)


def test_ffjord_csv_starts_afresh_on_a_rerun_and_help_prints_the_options(
    tmp_path: Path, capsys
) -> None:
    torch.set_default_dtype(torch.float32)
    argv = [
        "--ffjord",
        str(FFJORD),
        "--tempopt-budget",
        "1",
        "--tempopt-skip-trajectory",
        "--",
        "train_toy.py",
        "--niters",
        "2",
        "--val_freq",
        "2",
        "--save",
        str(tmp_path),
    ]
    for _ in range(2):
        assert ffjord_patch.main(argv) == 0
        assert [r["iteration"] for r in read_csv(tmp_path / "tempopt.csv")] == [
            "1",
            "2",
        ]  # not appended to
    assert ffjord_patch.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--tempopt-budget N" in out and "--tempopt-learn-T" in out and "--tempopt-alpha" in out


def test_otflow_guard_compares_x_and_l_against_dopri5(tmp_path: Path) -> None:
    """0.2's guard compared OT-Flow's cost integrals against its own rk4 and grew 2 steps to 10."""
    torch.set_default_dtype(torch.float32)
    with otflow_patch.patched(OTFLOW, script="trainToyOTflow.py", budget=2) as patch:
        patch.run(["--niters", "2", "--nt", "8", "--save", str(tmp_path)])
    guard = patch.stepper.guard
    (horizon,) = patch.horizons
    assert horizon.budget.reference_for(horizon.budget.last_input.settings) == {
        "method": "dopri5",
        "rtol": 1e-5,
        "atol": 1e-5,
    }
    assert (
        len(guard.stats["errors"][0]) == 2
        and not guard.stats["events"]
        and horizon.budget.steps == 2
    )
