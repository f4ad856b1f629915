"""E-NF's EGNN dynamics as the harness CNF's field (benchmarks/harness/egnn.py).

``TEMPOPT_ENF_DIR`` names a checkout of vgsatorras/en_flows (the module is skipped otherwise)::

    TEMPOPT_ENF_DIR=.upstream/en_flows pytest tests/test_egnn_field.py
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.harness.cnf import _core, nfe, standard_normal_logprob
from benchmarks.harness.egnn import ENF_ENV, EGNNNet, build_egnn_model

_DIR = os.environ.get(ENF_ENV)
pytestmark = [
    pytest.mark.upstream,
    pytest.mark.skipif(
        not _DIR or not (Path(_DIR).expanduser() / "egnn" / "models.py").is_file(),
        reason=f"set {ENF_ENV} to a checkout of vgsatorras/en_flows to run these tests",
    ),
]
DOUBLE = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread: the graph's many small ops crawl when threads contend for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net() -> EGNNNet:
    torch.manual_seed(0)
    return EGNNNet(_DIR).to(DOUBLE)


def _rotation(angle: float, reflect: bool = False) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    r = torch.tensor([[c, -s], [s, c]], dtype=DOUBLE)
    return r @ torch.diag(torch.tensor([1.0, -1.0], dtype=DOUBLE)) if reflect else r


def _act(
    x: torch.Tensor, r: torch.Tensor, perm: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """Rotates (about the origin), permutes and translates the 4 particles of flat ``x``."""
    p = x.reshape(x.shape[0], 4, 2)
    return (p[:, perm] @ r.T + shift).reshape(x.shape)


def test_nothing_of_the_checkout_stays_importable_by_name(net: EGNNNet) -> None:
    assert not [m for m in sys.modules if m.split(".")[0] in ("egnn", "flows")]
    assert type(net.dynamics).__name__ == "EGNN_dynamics"


@pytest.mark.parametrize("reflect", [False, True])
def test_rotating_and_permuting_the_particles_rotates_and_permutes_the_velocity(
    net: EGNNNet, reflect: bool
) -> None:
    x = torch.randn(6, 8, dtype=DOUBLE) * 1.5
    r, perm, t = _rotation(0.7, reflect), torch.tensor([2, 0, 3, 1]), torch.tensor(0.4)
    v = net(t, x)
    zero = torch.zeros(2, dtype=DOUBLE)
    torch.testing.assert_close(net(t, _act(x, r, perm, zero)), _act(v, r, perm, zero), **TOL)
    # a translation of all particles leaves the velocity unchanged
    shift = torch.tensor([0.3, -1.2], dtype=DOUBLE)
    torch.testing.assert_close(net(t, _act(x, r, perm, shift)), _act(v, r, perm, zero), **TOL)


def test_the_velocity_has_zero_mean_over_particles(net: EGNNNet) -> None:
    x = torch.randn(7, 8, dtype=DOUBLE) * 2 + 0.5
    v = net(0.9, x)
    assert v.shape == x.shape and v.abs().max() > 1e-3  # not the zero field
    torch.testing.assert_close(v.reshape(7, 4, 2).mean(dim=1), torch.zeros(7, 2, dtype=DOUBLE))


def test_a_float32_net_runs_under_a_float64_default_and_leaves_it(net: EGNNNet) -> None:
    small = copy.deepcopy(net).float()
    v = small(torch.tensor(0.5), torch.randn(3, 8, dtype=torch.float32))
    assert v.dtype == torch.float32 and torch.get_default_dtype() == DOUBLE


@pytest.mark.parametrize("budget", [2, None])
def test_the_cnf_solves_on_a_budget_and_with_dopri5_and_its_divergence_is_exact(
    budget: int | None, device: torch.device
) -> None:
    torch.manual_seed(1)
    solver = dict(method="dopri5", rtol=1e-6, atol=1e-6)
    model = build_egnn_model(
        _DIR, count=True, time_mode="fixed", budget=budget, solver_kwargs=solver
    ).to(device, DOUBLE)
    assert model.chain[0].horizon.T.item() == 1.0
    z = torch.randn(5, 8, dtype=DOUBLE, device=device)
    x, logq, regs = model(z, standard_normal_logprob(z), reverse=True)
    assert x.shape == (5, 8) and logq.shape == (5,) and regs == {}
    assert torch.isfinite(x).all() and torch.isfinite(logq).all()
    # the field keeps the centre of mass
    torch.testing.assert_close(x.reshape(5, 4, 2).mean(1), z.reshape(5, 4, 2).mean(1), **TOL)
    counts = nfe(model)
    assert counts["forward"] == 8 if budget == 2 else counts["forward"] > 8  # 2 rk4 steps
    # the augmented dynamics' -div against the trace of the field's autograd Jacobian
    field, net = model.chain[0].odefunc, _core(model.chain[0].odefunc).diffeq
    point, t = z[:1] * 1.3, torch.tensor(0.35, dtype=DOUBLE, device=device)
    _, minus_div = field(t, (point, torch.zeros(1, dtype=DOUBLE, device=device)))
    jac = torch.autograd.functional.jacobian(lambda y: net(t, y.reshape(1, 8))[0], point[0])
    torch.testing.assert_close(-minus_div.reshape(()), torch.trace(jac), **TOL)
    # and against central finite differences
    h, eye = 1e-6, torch.eye(8, dtype=DOUBLE, device=device)
    with torch.no_grad():
        fd = sum(
            (net(t, point + h * eye[i]) - net(t, point - h * eye[i]))[0, i] / (2 * h)
            for i in range(8)
        )
    torch.testing.assert_close(-minus_div.reshape(()), fd, rtol=1e-5, atol=1e-5)


def test_a_directory_without_the_checkout_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"enf_dir must be .*{tmp_path.name}.*{ENF_ENV}"):
        build_egnn_model(tmp_path)
