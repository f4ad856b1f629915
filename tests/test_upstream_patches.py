"""Tests of examples/{ffjord,rnode,otflow}_patch.py against our stand-ins of the upstream checkouts (tests/standins/)."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from examples import ffjord_patch
from examples._upstream_common import CSV_COLUMNS, TempoptOptions

STANDINS = Path(__file__).resolve().parent / "standins"
FFJORD = STANDINS / "ffjord"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def process_state() -> dict[str, Any]:
    root = logging.getLogger()
    return {
        "argv": list(sys.argv),
        "path": list(sys.path),
        "cwd": os.getcwd(),
        "handlers": list(root.handlers),
        "dtype": torch.get_default_dtype(),
        "adam": torch.optim.Adam,
        "sgd": torch.optim.SGD,
        "lib": "lib" in sys.modules,
        "six": sys.modules.get("six"),
    }


def run_ffjord(script: str, argv: list[str], save: Path, **opts: Any) -> list[dict[str, str]]:
    torch.set_default_dtype(torch.float32)  # the scripts feed float32 data, as upstream
    torch.manual_seed(0)
    with ffjord_patch.patched(FFJORD, script=script, **opts) as session:
        session.run([*argv, "--save", str(save)])
    return read_csv(save / "tempopt.csv")


def column(rows: list[dict[str, str]], name: str, block: int = 0) -> list[float]:
    return [float(r[name]) if r[name] else float("nan") for r in rows if int(r["block"]) == block]


# ------------------------------------------------------------------------------------------------- FFJORD
def test_ffjord_train_toy_moves_T_and_writes_csv(tmp_path: Path) -> None:
    rows = run_ffjord("train_toy.py", ["--niters", "4", "--val_freq", "4"], tmp_path)
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    T = column(rows, "T")
    assert T[0] == pytest.approx(0.5, abs=1e-6) and T[-1] != T[0]
    assert all(r["dLdT"] != "" for r in rows)
    # one extra evaluation of the field per iteration for dL/dT, counted as backward
    assert all(int(r["nfe_forward"]) > 0 and int(r["nfe_backward"]) > 0 for r in rows)
    log = (tmp_path / "logs").read_text()
    assert "CNF Time 0.5000" in log  # upstream's own log shows the learned T; Adam's first step is lr * sign:
    assert "CNF Time 0.4900" in log or "CNF Time 0.5100" in log
    state = torch.load(tmp_path / "checkpt.pth", weights_only=False)
    assert "chain.0.sqrt_end_time" in state["state_dict"]  # state_dict keys unchanged
    assert not any("horizon" in k for k in state["state_dict"])
    assert (tmp_path / "trajectory" / "trajectory.npy").exists()  # explicit integration_times: upstream forward


def test_ffjord_off_keeps_T_fixed_with_the_same_logs(tmp_path: Path) -> None:
    rows = run_ffjord("train_toy.py", ["--niters", "3", "--val_freq", "3"], tmp_path, off=True)
    assert len(set(column(rows, "T"))) == 1
    assert all(r["dLdT"] == "" for r in rows)
    assert (tmp_path / "logs").read_text().count("CNF Time 0.5000") == 3


def test_ffjord_patch_is_fully_reverted(tmp_path: Path) -> None:
    before = process_state()
    torch.set_default_dtype(torch.float32)
    before["dtype"] = torch.float32
    with ffjord_patch.patched(FFJORD, script="train_toy.py") as session:
        cnf_module = sys.modules["lib.layers.cnf"]
        CNF = cnf_module.CNF
        original_forward, original_init = CNF.forward.__wrapped__, CNF.__init__.__wrapped__
        assert torch.optim.Adam is not before["adam"]
        assert str(FFJORD) == sys.path[0]
        session.run(["--niters", "2", "--val_freq", "2", "--save", str(tmp_path)])
        assert os.getcwd() == str(FFJORD)
    assert "lib.layers.cnf.CNF.forward" in session.names and "torch.optim.Adam" in session.names
    assert CNF.forward is original_forward and CNF.__init__ is original_init
    assert process_state() == before
    with pytest.raises(ModuleNotFoundError):  # the checkout left sys.path and sys.modules
        import diagnostics.viz_toy  # noqa: F401


def test_ffjord_patch_is_reverted_after_an_error(tmp_path: Path) -> None:
    before = process_state()
    with pytest.raises(SystemExit):  # argparse error inside the upstream script
        with ffjord_patch.patched(FFJORD, script="train_toy.py") as session:
            session.run(["--no-such-flag"])
    assert process_state() == before


def test_ffjord_T_not_in_weight_optimizer_warmup_or_clipping(tmp_path: Path) -> None:
    argv = ["--num_epochs", "1", "--ntrain", "16", "--batch_size", "16", "--warmup_iters", "10", "--lr", "1e-3"]
    torch.set_default_dtype(torch.float32)
    results = []
    for max_norm in ("1e10", "1e-6"):
        torch.manual_seed(0)
        save = tmp_path / max_norm
        with ffjord_patch.patched(FFJORD, script="train_cnf.py") as session:
            session.run([*argv, "--max_grad_norm", max_norm, "--save", str(save)])
            stepper = session.stepper
            time_ids = {id(h.T) for h in session.horizons}
            assert len(time_ids) == 2
            assert not time_ids & {id(p) for g in stepper.param_groups for p in g["params"]}
            for block in session.registry.blocks:
                assert not time_ids & {id(p) for p in block.owner().parameters()}  # so not clipped either
                assert "sqrt_end_time" in dict(block.owner().named_buffers())  # --train_T's parameter became a buffer
            assert stepper.param_groups[0]["lr"] == pytest.approx(1e-3 / 10)  # warm-up: weights only
            assert stepper.horizon_optimizer.param_groups[0]["lr"] == 1e-2
        results.append(read_csv(save / "tempopt.csv"))
    loose, clipped = results
    # the weights' gradients were clipped by a factor ~1e-6, dL/dT was not
    assert [r["dLdT"] for r in loose] == [r["dLdT"] for r in clipped]


def test_ffjord_resume_restores_T_from_the_checkpoint(tmp_path: Path) -> None:
    argv = ["--num_epochs", "1", "--ntrain", "32", "--batch_size", "16"]
    first = run_ffjord("train_cnf.py", argv, tmp_path / "a")
    ckpt = torch.load(tmp_path / "a" / "checkpt.pth", weights_only=False)
    assert isinstance(ckpt["optim_state_dict"], dict) and "horizon_optimizer" in ckpt["optim_state_dict"]
    second = run_ffjord("train_cnf.py", [*argv, "--resume", str(tmp_path / "a" / "checkpt.pth")], tmp_path / "b")
    for block in (0, 1):
        final = float(ckpt["state_dict"][f"chain.{block}.sqrt_end_time"]) ** 2
        assert final != pytest.approx(1.0, abs=1e-4)
        assert column(second, "T", block)[0] == pytest.approx(final, rel=1e-6)
    assert len(first) == 4


def test_ffjord_train_tabular_patches_its_own_adam(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)
    with ffjord_patch.patched(FFJORD, script="train_tabular.py") as session:
        assert "lib.custom_optimizers.Adam" in session.names and "torch.optim.Adam" not in session.names
        session.run(["--max_iters", "3", "--save", str(tmp_path)])
    T = column(read_csv(tmp_path / "tempopt.csv"), "T")
    assert len(T) == 3 and T[-1] != T[0]


def test_ffjord_dLdT_matches_finite_differences_both_directions() -> None:
    with ffjord_patch.patched(FFJORD, script=None, strict=False) as session:
        import lib.layers as layers
        from lib.layers.wrappers.cnf_regularization import l2_regularzation_fn

        torch.manual_seed(0)
        diffeq = layers.ODEnet(hidden_dims=(8,), input_shape=(2,))
        odefunc = layers.ODEfunc(diffeq, divergence_fn="brute_force")
        cnf = layers.CNF(odefunc, T=0.7, train_T=True, regularization_fns=(l2_regularzation_fn,), atol=1e-10, rtol=1e-10)
        horizon = session.horizons[0]
        x = torch.randn(5, 2)

        def loss(reverse: bool) -> torch.Tensor:
            z, dlogp = cnf(x, torch.zeros(5, 1), reverse=reverse)
            (reg,) = cnf.get_regularization_states()
            return z.pow(2).sum() + 0.5 * dlogp.sum() + 3.0 * reg

        for reverse in (False, True):
            horizon.T.grad = None
            loss(reverse).backward()
            h, T0 = 1e-4, horizon.T.item()
            with torch.no_grad():
                values = []
                for T in (T0 + h, T0 - h):
                    horizon.T.fill_(T)
                    values.append(loss(reverse).item())
                horizon.T.fill_(T0)
            fd = (values[0] - values[1]) / (2 * h)
            assert horizon.T.grad.item() == pytest.approx(fd, rel=1e-6, abs=1e-8), reverse


def test_ffjord_strict_raises_when_no_optimizer_was_intercepted() -> None:
    with ffjord_patch.patched(FFJORD, script=None) as session:
        import lib.layers as layers

        cnf = layers.CNF(layers.ODEfunc(layers.ODEnet((4,), (2,))), T=0.5, train_T=True)
        with pytest.raises(ffjord_patch.FFJORDLayoutError, match="before any optimizer"):
            cnf(torch.randn(3, 2), torch.zeros(3, 1))
        with torch.no_grad():  # evaluation needs no optimizer
            cnf(torch.randn(3, 2), torch.zeros(3, 1))
        assert len(session.horizons) == 1


def _broken_copy(tmp_path: Path, old: str, new: str, file: str = "lib/layers/cnf.py") -> Path:
    copy = tmp_path / "ffjord"
    shutil.copytree(FFJORD, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return copy


def test_ffjord_renamed_parameter_gives_a_clear_error(tmp_path: Path) -> None:
    copy = _broken_copy(tmp_path, "integration_times=None, reverse=False", "times=None, reverse=False")
    before = process_state()
    with pytest.raises(ffjord_patch.FFJORDLayoutError, match=r"lib\.layers\.cnf\.CNF\.forward has parameters") as info:
        with ffjord_patch.patched(copy):
            pass
    assert "994864ad" in str(info.value) and "integration_times" in str(info.value)
    assert process_state() == before
    with pytest.raises(SystemExit, match="does not recognise the checkout"):
        ffjord_patch.main(["--ffjord", str(copy), "--", "train_toy.py"])


def test_ffjord_missing_attribute_or_checkout_gives_a_clear_error(tmp_path: Path) -> None:
    copy = _broken_copy(tmp_path, "self.solver_options = {}", "self.options = {}")
    with pytest.raises(SystemExit, match=r"CNF \(after __init__\) has no attribute\(s\) solver_options"):
        ffjord_patch.main(["--ffjord", str(copy), "--", "train_toy.py", "--niters", "1", "--save", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="lib/layers/cnf.py is missing"):
        ffjord_patch.main(["--ffjord", str(tmp_path), "--", "train_toy.py"])
    with pytest.raises(SystemExit, match="separate the patch's options"):
        ffjord_patch.main(["--ffjord", str(FFJORD), "train_toy.py"])


def test_ffjord_cli_writes_csv_into_save(tmp_path: Path) -> None:
    torch.set_default_dtype(torch.float32)
    argv = ["--ffjord", str(FFJORD), "--tempopt-lr", "0.05", "--tempopt-alpha", "0", "--"]
    assert ffjord_patch.main([*argv, "train_toy.py", "--niters", "2", "--val_freq", "2", "--save", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "tempopt.csv")
    T, g = column(rows, "T"), abs(column(rows, "dLdT")[0])
    # Adam's first step is lr * g / (|g| + 1e-8): lr * sign unless this unseeded batch gives a tiny dL/dT.
    assert abs(T[1] - T[0]) == pytest.approx(0.05 * g / (g + 1e-8), rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": -1.0}, "tempopt-lr"), ({"eps": 0.0}, "tempopt-eps"), ({"mode": "exact"}, "closure"), ({"mode": "x"}, "mode")],
)
def test_options_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TempoptOptions(**kwargs)


def test_eps_larger_than_T0_is_a_clear_error(tmp_path: Path) -> None:
    argv = ["--ffjord", str(FFJORD), "--tempopt-eps", "0.6", "--", "train_toy.py", "--niters", "1", "--save", str(tmp_path)]
    torch.set_default_dtype(torch.float32)
    with pytest.raises(SystemExit, match="Lower --tempopt-eps below T0"):
        ffjord_patch.main(argv)


# ------------------------------------------------------------------------------------------------- RNODE
RNODE = STANDINS / "rnode"


def run_rnode(argv: list[str], save: Path, **opts: Any) -> list[dict[str, str]]:
    from examples import rnode_patch

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    with rnode_patch.patched(RNODE, **opts) as session:
        session.run([*argv, "--save", str(save)])
    return read_csv(save / "tempopt.csv")


def test_rnode_fixed_grid_nfe_moves_in_steps_of_four(tmp_path: Path) -> None:
    import math

    argv = ["--solver", "rk4", "--step_size", "0.25", "--kinetic-energy", "0.01", "--jacobian-norm2", "0.01"]
    rows = run_rnode([*argv, "--niters", "4", "--time_length", "0.5"], tmp_path, lr=0.2)
    assert {int(r["block"]) for r in rows} == {0, 1}
    for r in rows:  # torchdiffeq's rk4 grid: ceil(T / 0.25) steps, 4 evaluations each
        assert int(r["nfe_forward"]) == 4 * math.ceil(float(r["T"]) / 0.25 - 1e-6), r
    assert len({int(r["nfe_forward"]) for r in rows}) > 1  # T crossed a multiple of 0.25
    assert "TT " in (tmp_path / "logs").read_text()


def test_rnode_off_and_sgd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from examples import rnode_patch

    before = process_state()
    rows = run_rnode(["--optimizer", "sgd", "--niters", "2"], tmp_path, off=True, optimizer="SGD")
    assert len(set(column(rows, "T", 1))) == 1 and all(r["dLdT"] == "" for r in rows)
    assert process_state()["adam"] is before["adam"] and process_state()["sgd"] is before["sgd"]
    with pytest.raises(SystemExit):  # argparse's error for an out-of-range option
        rnode_patch.main(["--rnode", str(RNODE), "--tempopt-lr", "-1", "--", "train.py"])
    assert "--tempopt-lr must be a finite number >= 0" in capsys.readouterr().err


def test_rnode_T_not_in_weight_optimizer(tmp_path: Path) -> None:
    from examples import rnode_patch

    torch.set_default_dtype(torch.float32)
    with rnode_patch.patched(RNODE) as session:
        session.run(["--niters", "1", "--train_T", "True", "--warmup_iters", "4", "--save", str(tmp_path)])
        time_ids = {id(h.T) for h in session.horizons}
        assert not time_ids & {id(p) for g in session.stepper.param_groups for p in g["params"]}
        assert session.stepper.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)


def test_rnode_swallowed_exception_is_reported(tmp_path: Path) -> None:
    from examples import rnode_patch

    with pytest.raises(SystemExit, match="returned without a single optimizer step"):
        rnode_patch.main(["--rnode", str(RNODE), "--", "train.py", "--dims", "not,ints", "--save", str(tmp_path)])


def test_rnode_renamed_parameter_gives_a_clear_error(tmp_path: Path) -> None:
    from examples import rnode_patch

    copy = tmp_path / "rnode"
    shutil.copytree(RNODE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    cnf = copy / "lib" / "layers" / "cnf.py"
    cnf.write_text(cnf.read_text().replace("reg_states=tuple(), integration_times", "regs=tuple(), integration_times"))
    before = process_state()
    with pytest.raises(SystemExit, match=r"CNF\.forward has parameters \(self, z, logpz, regs"):
        rnode_patch.main(["--rnode", str(copy), "--", "train.py"])
    assert process_state() == before


def test_rnode_dLdT_with_regularisers_matches_finite_differences() -> None:
    from examples import rnode_patch

    with rnode_patch.patched(RNODE, script=None, strict=False) as session:
        import lib.layers as layers
        from lib.layers.wrappers.cnf_regularization import jacobian_frobenius_regularization_fn, quadratic_cost

        torch.manual_seed(0)
        regs = (quadratic_cost, jacobian_frobenius_regularization_fn)
        blocks = [
            layers.CNF(layers.ODEfunc(layers.ODEnet((8,), (2,))), T=0.8, regularization_fns=regs, atol=1e-10, rtol=1e-10)
            for _ in range(2)
        ]
        model = layers.SequentialFlow(blocks)
        horizons = session.horizons
        x = torch.randn(6, 2)

        def loss(reverse: bool) -> torch.Tensor:
            torch.manual_seed(1)  # the same Hutchinson noise in every solve
            z, dlogp, reg_states = model(x, torch.zeros(6, 1), reverse=reverse)
            assert len(reg_states) == 2 and reg_states[0].shape == (6,)
            return z.pow(2).sum() + dlogp.sum() + 2.0 * reg_states[0].mean() + 0.5 * reg_states[1].mean()

        for reverse in (False, True):
            for h in horizons:
                h.T.grad = None
            loss(reverse).backward()
            for horizon in horizons:
                T0, step = horizon.T.item(), 1e-4
                with torch.no_grad():
                    values = []
                    for T in (T0 + step, T0 - step):
                        horizon.T.fill_(T)
                        values.append(loss(reverse).item())
                    horizon.T.fill_(T0)
                fd = (values[0] - values[1]) / (2 * step)
                assert horizon.T.grad.item() == pytest.approx(fd, rel=1e-5, abs=1e-7), reverse


# ------------------------------------------------------------------------------------------------- OT-Flow
OTFLOW = STANDINS / "otflow"


def run_otflow(argv: list[str], save: Path, **opts: Any) -> list[dict[str, str]]:
    from examples import otflow_patch

    torch.manual_seed(0)
    with otflow_patch.patched(OTFLOW, **opts) as session:
        session.run([*argv, "--save", str(save)])
    return read_csv(save / "tempopt.csv")


@pytest.mark.parametrize(("mechanism", "nfe_backward"), [("direct", 1), ("rescale", 0)])
def test_otflow_train_moves_T(tmp_path: Path, mechanism: str, nfe_backward: int) -> None:
    rows = run_otflow(["--niters", "3", "--viz_freq", "3", "--nt", "4"], tmp_path, mechanism=mechanism)
    T = column(rows, "T")
    assert T[0] == 1.0 and T[-1] != T[0]
    assert all(int(r["nfe_forward"]) == 16 and int(r["nfe_backward"]) == nfe_backward for r in rows)
    (ckpt,) = tmp_path.glob("*_checkpt.pth")
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert "horizon.T" in state  # the checkpoint carries T
    assert list(tmp_path.glob("figs/*.png"))  # plotting went through the TkAgg -> Agg shim


def test_otflow_off_keeps_T(tmp_path: Path) -> None:
    rows = run_otflow(["--niters", "2"], tmp_path, off=True)
    assert column(rows, "T") == [1.0, 1.0] and all(r["dLdT"] == "" for r in rows)


def test_otflow_patched_problem_and_integrate_agree_with_upstream() -> None:
    from examples import otflow_patch

    with otflow_patch.patched(OTFLOW, script=None, strict=False) as session:
        import src.OTFlowProblem as ot
        from src.Phi import Phi

        torch.manual_seed(0)
        net = Phi(nTh=2, m=6, d=2, alph=[1.0, 10.0, 2.0])
        x = torch.randn(7, 2)
        horizon = session.horizons[0]
        assert "horizon.T" in net.state_dict()
        Jc, cs = ot.OTFlowProblem(x, net, [0, 1], nt=5, stepper="rk4", alph=net.alph)
        Jc_up, cs_up = ot.OTFlowProblem.__wrapped__(x, net, [0, 1], nt=5, stepper="rk4", alph=net.alph)
        torch.testing.assert_close(Jc, Jc_up, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            horizon.T.fill_(0.7)
        z = ot.integrate(x, net, [1.0, 0.0], 5, alph=net.alph)
        torch.testing.assert_close(z, ot.integrate.__wrapped__(x, net, [0.7, 0.0], 5, alph=net.alph))
        for t in (0.0, 0.3, torch.tensor(0.3)):  # our tensor-safe field equals upstream's at float times
            z0 = torch.randn(7, 5)
            torch.testing.assert_close(otflow_patch.odefun_tensor_t(z0, t, net, net.alph), ot.odefun(z0, float(t), net, net.alph))
        with pytest.raises(TypeError):  # the upstream issue the patch works around: pad(value=t) with t in the graph
            ot.odefun(z0, torch.tensor(0.3, requires_grad=True), net, net.alph)


@pytest.mark.parametrize(
    ("mechanism", "nt", "alph", "rel"),
    [
        # rescale: the exact gradient of OT-Flow's discrete objective, whatever nt
        ("rescale", 6, [1.0, 10.0, 2.0], 1e-7),
        # direct: the continuous dJ/dT = <dJ/dz(T), F(T, z(T))>; it matches the discrete objective's derivative
        # up to the discretisation error, small for a fine grid and a smooth objective (the HJB term |.| has kinks)
        ("direct", 64, [1.0, 10.0, 0.0], 1e-6),
    ],
)
def test_otflow_dJdT_matches_finite_differences(mechanism: str, nt: int, alph: list[float], rel: float) -> None:
    from examples import otflow_patch

    with otflow_patch.patched(OTFLOW, script=None, strict=False, mechanism=mechanism, T0=0.8) as session:
        import src.OTFlowProblem as ot
        from src.Phi import Phi

        torch.manual_seed(0)
        net = Phi(nTh=2, m=6, d=2, alph=alph)
        x = torch.randn(9, 2)
        horizon = session.horizons[0]
        Jc, _ = ot.OTFlowProblem(x, net, [0, 0.8], nt=nt, alph=net.alph)
        Jc.backward()
        step, values = 1e-4, []
        for T in (0.8 + step, 0.8 - step):  # the discrete objective of upstream's own integrator
            values.append(ot.OTFlowProblem.__wrapped__(x, net, [0.0, T], nt, alph=net.alph)[0].item())
        fd = (values[0] - values[1]) / (2 * step)
        assert horizon.T.grad.item() == pytest.approx(fd, rel=rel)


@pytest.mark.parametrize("reverse", [False, True])
def test_fixed_step_solver_through_a_horizon_matches_finite_differences(reverse: bool) -> None:
    from examples.otflow_patch import fixed_step_solver
    from torch_tempopt import LearnableHorizon

    A = torch.tensor([[0.0, 1.0], [-2.0, -0.3]])

    def field(t: Any, y: torch.Tensor) -> torch.Tensor:
        return y @ A.t() * (1 + 0.5 * torch.sin(torch.as_tensor(t, dtype=y.dtype)))

    y0 = torch.tensor([[1.0, 0.5]])
    horizon = LearnableHorizon(T0=0.9)
    horizon(field, y0, solver=fixed_step_solver, reverse=reverse, nt=400).pow(2).sum().backward()
    step, values = 1e-4, []
    for T in (0.9 + step, 0.9 - step):
        grid = torch.tensor([T, 0.0] if reverse else [0.0, T])
        values.append(fixed_step_solver(field, y0, grid, nt=400)[-1].pow(2).sum().item())
    assert horizon.T.grad.item() == pytest.approx((values[0] - values[1]) / (2 * step), rel=1e-7)
    with pytest.raises(ValueError, match="nt must be >= 1"):
        fixed_step_solver(field, y0, torch.tensor([0.0, 1.0]), nt=0)


def test_otflow_renamed_parameter_and_revert(tmp_path: Path) -> None:
    from examples import otflow_patch

    before = process_state()
    torch.set_default_dtype(torch.float64)
    with otflow_patch.patched(OTFLOW) as session:
        import matplotlib

        assert matplotlib.use.__name__ == "use"
        names = list(session.names)
    assert {"src.Phi.Phi.__init__", "src.OTFlowProblem.OTFlowProblem", "torch.optim.Adam"} <= set(names)
    assert not hasattr(matplotlib.use, "__wrapped__")
    assert process_state() == before
    copy = tmp_path / "otflow"
    shutil.copytree(OTFLOW, copy, ignore=shutil.ignore_patterns("__pycache__"))
    problem = copy / "src" / "OTFlowProblem.py"
    problem.write_text(problem.read_text().replace("def OTFlowProblem(x, Phi, tspan,", "def OTFlowProblem(x, Phi, span,"))
    with pytest.raises(SystemExit, match=r"OTFlowProblem\.OTFlowProblem has parameters \(x, Phi, span"):
        otflow_patch.main(["--otflow", str(copy), "--", "trainToyOTflow.py"])
    assert process_state() == before
