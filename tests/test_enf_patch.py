"""torch_tempopt.patches.enf (examples/enf_patch.py): E-NF's DW-4 script through the patch, when
``TEMPOPT_ENF_DIR`` names a checkout of vgsatorras/en_flows (skipped otherwise), and the DW-4 data
writer (benchmarks/enf_dw4.py) and the name checks without one::

    TEMPOPT_ENF_DIR=.upstream/en_flows pytest tests/test_enf_patch.py

The runs copy the checkout (E-NF reads ``dw4_experiment/data/dw4-dataidx.npy`` relative to it) and
write small DW-4 data into the copy. A run is 3 training iterations of a tiny EGNN and E-NF's own
test of 2 x 1000 samples.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_upstream_patches import column, finite_difference, read_csv

from benchmarks import enf_dw4
from torch_tempopt.patches import Patch, PatchError
from torch_tempopt.patches import enf as enf_patch

SCRIPT = "main_dw4_lj13.py"
TINY = [
    "--data",
    "dw4",
    "--model",
    "egnn_dynamics",
    "--nf",
    "8",
    "--n_layers",
    "1",
    "--n_data",
    "300",
    "--n_epochs",
    "1",
    "--lr",
    "5e-4",
]


# ------------------------------------------------------------------------------------- no checkout
def test_write_dw4_is_the_file_enf_loads(tmp_path: Path) -> None:
    path = enf_dw4.write_dw4(tmp_path / "data", n=150, seed=3, chains=20, steps=400)
    assert path == tmp_path / "data" / "dw4-dataidx.npy"
    data, idx = np.load(path, allow_pickle=True)  # upstream's dataset.py, line for line
    assert (
        isinstance(data, torch.Tensor) and data.dtype == torch.float32 and data.shape == (150, 8)
    )
    assert np.array_equal(idx, np.arange(150)) and bool(torch.isfinite(data).all())
    pairs = torch.cdist(data.view(-1, 4, 2), data.view(-1, 4, 2))
    assert 1.0 < pairs[:, 0, 1:].mean() < 6.0  # DW-4's wells sit at distances 4 +- 1.5
    assert data.view(-1, 4, 2).shape == (150, 4, 2) and data[:100].clone().shape == (
        100,
        8,
    )  # remove_mean, [:n_data]
    with pytest.raises(FileExistsError, match="remove it first"):
        enf_dw4.write_dw4(tmp_path / "data", n=150, seed=3, chains=20, steps=400)
    with pytest.raises(
        SystemExit, match="remove it first"
    ):  # the command line, before any sampling
        enf_dw4.main([str(tmp_path / "data"), "--samples", "150"])


def test_the_old_data_option_names_its_new_command() -> None:
    with pytest.raises(SystemExit, match="python -m benchmarks.enf_dw4 DIR"):
        enf_patch.main(["--tempopt-write-dw4", "data"])


def test_a_checkout_without_a_patched_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "ffjord.py").write_text(
        "class FFJORD:\n    pass\n\n\nclass ODEfunc:\n    pass\n"
    )
    with pytest.raises(PatchError, match="flows.ffjord has no odeint"):
        enf_patch.patched(tmp_path).__enter__()
    with pytest.raises(PatchError, match="flows/ffjord.py is missing"):
        enf_patch.patched(tmp_path / "flows").__enter__()


# ------------------------------------------------------------------------------------ the checkout
@pytest.fixture
def enf() -> Path:
    value = os.environ.get("TEMPOPT_ENF_DIR")
    if not value:
        pytest.skip("set TEMPOPT_ENF_DIR to a checkout of vgsatorras/en_flows to run this test")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        pytest.fail(f"TEMPOPT_ENF_DIR={value} is not a directory")
    return path


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout with 2,300 small-chain DW-4 samples (300 training, E-NF's 1,000 +
    1,000 held out).
    """
    source = Path(os.environ.get("TEMPOPT_ENF_DIR") or ".").expanduser().resolve()
    if not (source / "flows" / "ffjord.py").is_file():
        pytest.skip("set TEMPOPT_ENF_DIR to a checkout of vgsatorras/en_flows to run this test")
    target = tmp_path_factory.mktemp("enf") / "en_flows"
    shutil.copytree(
        source,
        target,
        ignore=shutil.ignore_patterns(".git", "outputs", "__pycache__", "*.png", "*.npy"),
    )
    enf_dw4.write_dw4(target / "dw4_experiment" / "data", n=2300, seed=0, chains=100, steps=1000)
    return target


@pytest.mark.upstream
def test_layout_names_and_commit(enf: Path) -> None:
    with enf_patch.patched(enf, script=SCRIPT) as patch:
        assert {"flows.ffjord.FFJORD.__init__", "flows.ffjord.odeint", "torch.optim.AdamW"} <= set(
            patch.names
        )
        assert patch.commit in (None, enf_patch.COMMIT)
        import flows.ffjord as ffjord

        assert ffjord.odeint.__wrapped__.__name__ == "odeint_adjoint"
    assert (enf / SCRIPT).is_file() and (enf / "dw4_experiment" / "dataset.py").is_file()


def _flow(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    from egnn.models import EGNN_dynamics
    from flows.ffjord import FFJORD

    torch.manual_seed(0)
    dynamics = EGNN_dynamics(
        n_particles=4,
        n_dimension=2,
        hidden_nf=8,
        n_layers=1,
        act_fn=torch.nn.SiLU(),
        recurrent=True,
        tanh=True,
        attention=True,
        condition_time=True,
    )
    flow = FFJORD(dynamics, trace_method="exact").to(dtype)
    flow.set_odeint(rtol=1e-10, atol=1e-10)
    return flow


def _nll(flow: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from flows.distributions import PositionPrior

    z, ldj, _ = flow(x)
    return -(PositionPrior()(z) + ldj).mean()


@pytest.mark.upstream
def test_off_is_upstreams_solve_and_dLdT_matches_a_finite_difference(enf: Path) -> None:
    x = torch.randn(5, 4, 2, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    with Patch(dataclasses.replace(enf_patch.ENF, install=lambda patch: None), enf):
        upstream = _nll(_flow(), x).item()
    with enf_patch.patched(enf, off=True):
        assert _nll(_flow(), x).item() == pytest.approx(upstream, rel=1e-12)
    with enf_patch.patched(enf) as patch:  # T learned
        flow = _flow()
        _nll(flow, x).backward()
        (horizon,) = patch.horizons
        assert horizon.T.grad.item() == pytest.approx(
            finite_difference(lambda: _nll(flow, x), horizon.T), rel=1e-5
        )


@pytest.mark.upstream
@pytest.mark.parametrize("budget", [None, 2])
def test_dw4_script_trains_on_the_horizon_and_tests_adaptively(
    copy: Path, tmp_path: Path, budget: int | None, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_default_dtype(torch.float32)  # E-NF's data and model are float32
    torch.manual_seed(0)
    np.random.seed(0)
    with enf_patch.patched(copy, script=SCRIPT, off=budget is None, budget=budget) as patch:
        patch.run([*TINY, "--save", str(tmp_path)])
        (flow,) = patch.owners
    out = capsys.readouterr()
    assert "epoch: 0, iter: 2/3, NLL:" in out.out and "test nll " in out.out  # upstream's own log
    assert "enf_patch.py: 3 training steps" in out.err
    rows = read_csv(tmp_path / "tempopt.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3] and column(rows, "T") == [1.0] * 3
    nfe = [int(r["nfe_forward"]) for r in rows]
    if budget is None:  # upstream's dopri5: 6 evaluations a step and 2 more
        assert all(n >= 8 and (n - 2) % 6 == 0 for n in nfe)
    else:
        # the guard checked at steps 0 and 1 (then 3): its evaluations are not in nfe_forward
        assert nfe == [4 * budget] * 3 and patch.stepper.guard.stats["checks"] == 2
    evals = (
        flow.odefunc.num_evals
    )  # E-NF's own count, of its last test batch: dopri5 (the reference), not rk4
    assert evals != 4 * (budget or 0) and (evals - 2) % 6 == 0
