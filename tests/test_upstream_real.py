"""The upstream patches against real checkouts, when ``TEMPOPT_FFJORD_DIR`` / ``TEMPOPT_RNODE_DIR`` /
``TEMPOPT_OTFLOW_DIR`` name them (skipped otherwise). For example::

    TEMPOPT_FFJORD_DIR=../ffjord TEMPOPT_OTFLOW_DIR=../OT-Flow pytest tests/test_upstream_real.py

FFJORD needs ``six`` or the patch's stub; OT-Flow runs without h5py/pandas through the patch's stubs.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_upstream_patches import column, process_state, read_csv

from examples._upstream_common import isolated_process

ROOT = Path(__file__).resolve().parents[1]


def checkout(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"set {variable} to an upstream checkout to run this test")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        pytest.fail(f"{variable}={value} is not a directory")
    return path


# ------------------------------------------------------------------------------------------------- FFJORD
@pytest.fixture
def ffjord() -> Path:
    return checkout("TEMPOPT_FFJORD_DIR")


def test_ffjord_layout_and_commit(ffjord: Path) -> None:
    from examples import ffjord_patch

    for script in ffjord_patch.SCRIPTS:
        with ffjord_patch.patched(ffjord, script=script) as session:
            assert "lib.layers.cnf.CNF.forward" in session.names
            if session.commit is not None:
                assert session.commit == ffjord_patch.VERIFIED_COMMIT


def test_ffjord_upstream_alone_never_trains_T(ffjord: Path) -> None:
    with isolated_process(ffjord), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch 2.13 warns about the two tensor copies
        import lib.layers as layers

        cnf = layers.CNF(layers.ODEfunc(layers.ODEnet((8,), (2,), None, False, "concatsquash", "tanh")), T=0.5, train_T=True)
        z, dlogp = cnf(torch.randn(4, 2), torch.zeros(4, 1))
        (z.pow(2).sum() + dlogp.sum()).backward()
        assert isinstance(cnf.sqrt_end_time, torch.nn.Parameter) and cnf.sqrt_end_time.grad is None


def test_ffjord_dLdT_matches_finite_differences_both_directions(ffjord: Path) -> None:
    from examples import ffjord_patch

    with ffjord_patch.patched(ffjord, script=None, strict=False) as session:
        import lib.layers as layers
        import lib.layers.wrappers.cnf_regularization as reg_lib

        torch.manual_seed(0)
        diffeq = layers.ODEnet(hidden_dims=(8,), input_shape=(2,), strides=None, conv=False, layer_type="concatsquash", nonlinearity="tanh")
        odefunc = layers.ODEfunc(diffeq=diffeq, divergence_fn="brute_force")
        cnf = layers.CNF(odefunc, T=0.7, train_T=True, regularization_fns=(reg_lib.l2_regularzation_fn,), atol=1e-10, rtol=1e-10)
        horizon = session.horizons[0]
        x = torch.randn(5, 2)

        def loss(reverse: bool) -> torch.Tensor:
            z, dlogp = cnf(x, torch.zeros(5, 1), reverse=reverse)
            (reg,) = cnf.get_regularization_states()
            return z.pow(2).sum() + 0.5 * dlogp.sum() + 3.0 * reg

        for reverse in (False, True):  # reverse: T is the start of the solve, where odefunc.py:288 breaks the adjoint
            horizon.T.grad = None
            loss(reverse).backward()
            T0, step = horizon.T.item(), 1e-4
            with torch.no_grad():
                values = []
                for T in (T0 + step, T0 - step):
                    horizon.T.fill_(T)
                    values.append(loss(reverse).item())
                horizon.T.fill_(T0)
            fd = (values[0] - values[1]) / (2 * step)
            assert horizon.T.grad.item() == pytest.approx(fd, rel=1e-6, abs=1e-8), reverse


@pytest.mark.parametrize("off", [False, True])
def test_ffjord_train_toy_with_and_without_temporal_optimization(ffjord: Path, tmp_path: Path, off: bool) -> None:
    from examples import ffjord_patch

    before = process_state()
    torch.set_default_dtype(torch.float32)
    before["dtype"] = torch.float32
    argv = ["--data", "8gaussians", "--niters", "3", "--batch_size", "50", "--test_batch_size", "100"]
    argv += ["--viz_freq", "100000", "--val_freq", "3", "--save", str(tmp_path)]
    with ffjord_patch.patched(ffjord, script="train_toy.py", off=off, skip_trajectory=True) as session:
        session.run(argv)
    assert process_state() == before
    rows = read_csv(tmp_path / "tempopt.csv")
    T = column(rows, "T")
    assert len(T) == 3 and T[0] == pytest.approx(0.5, abs=1e-6)
    assert (len(set(T)) == 1) == off
    log = (tmp_path / "logs").read_text()
    assert "[TEST] Iter 0003" in log
    moved = "CNF Time 0.4900" in log or "CNF Time 0.5100" in log  # Adam's first step: lr * sign(dL/dT + alpha)
    assert moved != off  # upstream's own log line shows the learned T


def test_ffjord_train_cnf_mnist_idx_through_the_patch(ffjord: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream train_cnf.py --data mnist on the IDX stand-in of benchmarks/mnist_idx.py (the GPU check's path, tiny)."""
    import importlib.util
    import shutil

    from examples import ffjord_patch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from mnist_idx import write_mnist
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    copy = tmp_path / "ffjord"  # train_cnf.py reads ./data inside the checkout: use a copy
    shutil.copytree(ffjord, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "assets", "imgs"))
    write_mnist(copy / "data", n_train=400, n_test=200)
    standin = importlib.util.find_spec("torchvision") is None
    if standin:
        monkeypatch.syspath_prepend(str(ROOT / "tests" / "standins" / "torchvision"))
    torch.set_default_dtype(torch.float32)
    argv = ["--data", "mnist", "--dims", "8,8", "--strides", "2,1,-2", "--num_epochs", "1", "--batch_size", "200"]
    argv += ["--solver", "rk4", "--step_size", "0.5", "--val_freq", "1000", "--save", str(tmp_path / "run")]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*", category=UserWarning)
            with ffjord_patch.patched(copy, script="train_cnf.py") as session:
                session.run(argv)
    finally:
        if standin:
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
    rows = read_csv(tmp_path / "run" / "tempopt.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    import math

    assert column(rows, "T")[1] != 1.0
    assert [int(r["nfe_forward"]) for r in rows] == [4 * math.ceil(T / 0.5 - 1e-6) for T in column(rows, "T")]


# ------------------------------------------------------------------------------------------------- RNODE
def test_rnode_layout_and_dLdT(tmp_path: Path) -> None:
    rnode = checkout("TEMPOPT_RNODE_DIR")
    from examples import rnode_patch

    with rnode_patch.patched(rnode, script=None, strict=False) as session:
        import lib.layers as layers

        torch.manual_seed(0)
        cnf = layers.CNF(layers.ODEfunc(layers.ODEnet((8,), (2,), None, False, "concat", "softplus")), T=0.6, atol=1e-10, rtol=1e-10)
        x = torch.randn(4, 2)

        def loss() -> torch.Tensor:
            torch.manual_seed(1)
            z, dlogp, _ = cnf(x, torch.zeros(4, 1))
            return z.pow(2).sum() + dlogp.sum()

        loss().backward()
        horizon = session.horizons[0]
        with torch.no_grad():
            values = []
            for T in (0.6 + 1e-4, 0.6 - 1e-4):
                horizon.T.fill_(T)
                values.append(loss().item())
        assert horizon.T.grad.item() == pytest.approx((values[0] - values[1]) / 2e-4, rel=1e-5)
    # train.py itself hard-codes .cuda() and dist.all_reduce: see docs/adoption/rnode.md and benchmarks/gpu_check.sh


# ------------------------------------------------------------------------------------------------- OT-Flow
@pytest.fixture
def otflow() -> Path:
    return checkout("TEMPOPT_OTFLOW_DIR")


def test_otflow_layout_problem_and_gradient(otflow: Path) -> None:
    from examples import otflow_patch

    before = process_state()
    with otflow_patch.patched(otflow, script=None, strict=False, mechanism="rescale") as session:
        import src.OTFlowProblem as ot
        from src.Phi import Phi

        if session.commit is not None:
            assert session.commit == otflow_patch.VERIFIED_COMMIT
        torch.manual_seed(0)
        net = Phi(nTh=2, m=8, d=2, alph=[1.0, 30.0, 15.0])
        x = torch.randn(16, 2)
        Jc, _ = ot.OTFlowProblem(x, net, [0, 1], nt=8, stepper="rk4", alph=net.alph)
        Jc_up, _ = ot.OTFlowProblem.__wrapped__(x, net, [0, 1], nt=8, stepper="rk4", alph=net.alph)
        torch.testing.assert_close(Jc, Jc_up, rtol=1e-12, atol=1e-12)
        z = torch.randn(16, 5)
        torch.testing.assert_close(otflow_patch.odefun_tensor_t(z, 0.4, net, net.alph), ot.odefun(z, 0.4, net, net.alph))
        Jc.backward()
        values = [ot.OTFlowProblem.__wrapped__(x, net, [0.0, T], 8, alph=net.alph)[0].item() for T in (1 + 1e-4, 1 - 1e-4)]
        assert session.horizons[0].T.grad.item() == pytest.approx((values[0] - values[1]) / 2e-4, rel=1e-7)
    assert process_state() == before


@pytest.mark.parametrize("off", [False, True])
def test_otflow_train_toy_with_and_without_temporal_optimization(otflow: Path, tmp_path: Path, off: bool) -> None:
    from examples import otflow_patch

    argv = ["--data", "8gaussians", "--niters", "3", "--batch_size", "128", "--val_batch_size", "128"]
    argv += ["--viz_freq", "3", "--save", str(tmp_path)]
    with otflow_patch.patched(otflow, off=off) as session:
        session.run(argv)
    T = column(read_csv(tmp_path / "tempopt.csv"), "T")
    assert len(T) == 3 and T[0] == 1.0 and (len(set(T)) == 1) == off
    (ckpt,) = tmp_path.glob("*_checkpt.pth")
    assert "horizon.T" in torch.load(ckpt, weights_only=False)["state_dict"]
    assert list(tmp_path.glob("figs/*.png"))


