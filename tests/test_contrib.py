"""contrib adapters: dL/dT and dL/dt0 against finite differences in both directions, solutions
against torchdiffeq.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchdiffeq
from fields import TimeMLP, TupleField

from torch_tempopt import LearnableHorizon
from torch_tempopt.contrib import final_state_solver, torchode_solver, zuko_solver

# adaptive tolerances: central differences with step 1e-4 then see only their own O(step^2) error
TOL = 1e-11
NAMES = ["final_state", "zuko", "torchode-autodiff", "torchode-backsolve"]


def _rk4_integrate(x, odefun, tspan, nt):
    """Like OT-Flow's integrate(x, net, tspan, nt): classic RK4, the field called as odefun(x, t),
    time advanced in place.
    """
    h = (tspan[1] - tspan[0]) / nt
    tk = tspan[0]
    for _ in range(nt):
        k1 = odefun(x, tk)
        k2 = odefun(x + h / 2 * k1, tk + h / 2)
        k3 = odefun(x + h / 2 * k2, tk + h / 2)
        k4 = odefun(x + h * k3, tk + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        tk += h
    return x


def _rk4_tuple(func, y0, t0, t1, nt):
    """Classic RK4 on a tuple state with odeint's argument order (final_state_solver's default
    signature).
    """
    h = (t1 - t0) / nt

    def add(y, k, c):
        return tuple(a + c * b for a, b in zip(y, k))

    for i in range(nt):
        t = t0 + i * h
        k1 = func(t, y0)
        k2 = func(t + h / 2, add(y0, k1, h / 2))
        k3 = func(t + h / 2, add(y0, k2, h / 2))
        k4 = func(t + h, add(y0, k3, h))
        y0 = tuple(
            y + h / 6 * (a + 2 * b + 2 * c + d) for y, a, b, c, d in zip(y0, k1, k2, k3, k4)
        )
    return y0


def _adapter(name, tuple_state=False):
    """(solver, kwargs for the horizon's call)."""
    if name == "final_state":
        if tuple_state:
            return final_state_solver(_rk4_tuple, nt=60), {}
        return final_state_solver(
            _rk4_integrate, signature="y0, func, tspan", field="y, t", nt=60
        ), {}
    if name == "zuko":
        pytest.importorskip("zuko")
        return zuko_solver, dict(atol=TOL, rtol=TOL)
    pytest.importorskip("torchode")
    return torchode_solver, dict(atol=TOL, rtol=TOL, adjoint=name.split("-")[1])


def _loss(out):
    parts = out if isinstance(out, tuple) else (out,)
    return sum(
        w * (p[-1].pow(2).sum() + p[-1].sin().sum()) for w, p in zip([1.0, -0.7, 0.3], parts)
    )


def _grad_and_fd(h, which, call, step=1e-4):
    param = getattr(h, which)
    x = param.item()
    h.zero_grad()
    _loss(call()).backward()
    vals = []
    for sign in (1, -1):
        with torch.no_grad():
            param.fill_(x + sign * step)
            vals.append(_loss(call()).item())
    with torch.no_grad():
        param.fill_(x)
    return param.grad.item(), (vals[0] - vals[1]) / (2 * step)


def _assert_time_grads_match_fd(h, call):
    for which in ("T", "t0"):
        g, fd = _grad_and_fd(h, which, call)
        assert g == pytest.approx(fd, rel=1e-6), (which, g, fd)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_time_gradients_match_finite_differences(name, reverse, device):
    solver, kw = _adapter(name)
    func = TimeMLP().to(device)
    y0 = torch.randn(5, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1, learn_t0=True).to(device)
    _assert_time_grads_match_fd(h, lambda: h(func, y0, solver=solver, reverse=reverse, **kw))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_tuple_state(name, reverse, device):
    """A CNF-like state (z, logp, kinetic): flattened for torchode, a sequence for zuko."""
    solver, kw = _adapter(name, tuple_state=True)
    func = TupleField().to(device)
    y0 = (
        torch.randn(4, 2, device=device),
        torch.zeros(4, 1, device=device),
        torch.zeros(4, 1, device=device),
    )
    h = LearnableHorizon(T0=0.8, t0=0.1, learn_t0=True).to(device)
    out = h(func, y0, solver=solver, reverse=reverse, **kw)
    assert isinstance(out, tuple) and [p.shape for p in out] == [(2, *p.shape) for p in y0]
    _assert_time_grads_match_fd(h, lambda: h(func, y0, solver=solver, reverse=reverse, **kw))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_matches_torchdiffeq(name, reverse, device):
    """The trajectory at times= and the weight gradients are odeint's on the same (increasing or
    decreasing) grid.
    """
    solver, kw = _adapter(name)
    func = TimeMLP().to(device)
    y0 = torch.randn(3, 2, device=device)
    h = LearnableHorizon(T0=0.9, t0=0.2).to(device)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], device=device)
    ours = h(func, y0, solver=solver, reverse=reverse, times=s, **kw)
    grid = (
        0.9 - 0.7 * s if reverse else 0.2 + 0.7 * s
    )  # times are fractions from the start of the integration
    ref = torchdiffeq.odeint(func, y0, grid, rtol=TOL, atol=TOL)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)
    grads = [torch.autograd.grad(_loss(y), tuple(func.parameters())) for y in (ours, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reverse", [False, True])
def test_final_state_solver_with_its_own_field(reverse, device):
    """OT-Flow's case: integrate(x, net, tspan, nt) brings its own field; the horizon's func is the
    same field.
    """
    net = TimeMLP().to(device)

    def odefun(x, t, net):
        return net(t, x)

    solver = final_state_solver(
        lambda x, tspan, nt: _rk4_integrate(x, lambda z, t: odefun(z, t, net), tspan, nt),
        signature="y0, tspan",
        nt=60,
    )
    y0 = torch.randn(4, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1, learn_t0=True).to(device)
    for which in ("T", "t0"):
        g, fd = _grad_and_fd(
            h, which, lambda: h(lambda t, x: odefun(x, t, net), y0, solver=solver, reverse=reverse)
        )
        assert g == pytest.approx(fd, rel=1e-6), which


def test_final_state_solver_passes_fresh_times(device):
    """An integrator that advances its time in place (tk += h) leaves the grid alone."""
    grid = torch.tensor([0.0, 0.5, 1.0], device=device)
    solver, _ = _adapter("final_state")
    out = solver(lambda t, y: -y, torch.ones(2, device=device), grid)
    assert torch.equal(grid, torch.tensor([0.0, 0.5, 1.0], device=device))
    torch.testing.assert_close(out[:, 0], torch.exp(-grid), rtol=1e-9, atol=0)


def _common_bad_calls(solver, kw):
    t = torch.tensor([0.0, 1.0])
    cases = [
        ((None, torch.ones(2), t), TypeError, "func must be callable"),
        (
            (lambda t, y: -y, torch.ones(2, dtype=torch.long), t),
            TypeError,
            "y0 must be a floating-point tensor",
        ),
        (
            (lambda t, y: -y, torch.ones(2), torch.tensor([0, 1])),
            TypeError,
            "t must be a floating-point tensor",
        ),
        (
            (lambda t, y: -y, torch.ones(2), torch.tensor(1.0)),
            ValueError,
            "t must be 1-D with at least two times",
        ),
        (
            (lambda t, y: -y, torch.ones(2), t.clone().requires_grad_()),
            ValueError,
            "t must not require grad",
        ),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            solver(*args, **kw)


@pytest.mark.parametrize("name", ["final_state", "zuko", "torchode-autodiff"])
def test_bad_calls_name_their_argument(name):
    solver, _ = _adapter(name)
    _common_bad_calls(solver, dict(phi=()) if name == "zuko" else {})


def test_final_state_solver_bad_inputs():
    with pytest.raises(TypeError, match="integrate must be callable"):
        final_state_solver(None)
    with pytest.raises(TypeError, match="signature must be a string"):
        final_state_solver(_rk4_integrate, signature=("y0", "tspan"))
    for bad in ("x, net, tspan", "y0, y0, tspan", "func, tspan", "y0, func, t0"):
        with pytest.raises(ValueError, match="signature must name y0 and the times"):
            final_state_solver(_rk4_integrate, signature=bad)
    with pytest.raises(ValueError, match="field must be 't, y' or 'y, t'"):
        final_state_solver(_rk4_integrate, signature="y0, func, tspan", field="x, t, net")
    solver = final_state_solver(lambda f, y0, t0, t1: (y0, y0))
    with pytest.raises(
        ValueError, match=r"integrate must return the final state with y0's shapes \[\(2,\)\]"
    ):
        solver(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))


def test_zuko_bad_inputs():
    pytest.importorskip("zuko")
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="phi must be given when func is not an nn.Module"):
        LearnableHorizon()(lambda t, y: net(y), torch.ones(3, 2), solver=zuko_solver)
    with pytest.raises(TypeError, match="phi must be an iterable of tensors"):
        zuko_solver(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), phi=[1.0])


def test_torchode_bad_inputs():
    pytest.importorskip("torchode")
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="adjoint must be one of"):
        torchode_solver(TimeMLP(), torch.ones(3, 2), t, adjoint="checkpoint")
    with pytest.raises(ValueError, match="method must be one of torchode's"):
        torchode_solver(TimeMLP(), torch.ones(3, 2), t, method="rk45")
    with pytest.raises(TypeError, match="func must be an nn.Module with adjoint='backsolve'"):
        torchode_solver(lambda t, y: -y, torch.ones(2), t, adjoint="backsolve")
    with pytest.raises(
        RuntimeError, match="torchode stopped before the end of t with status INFINITE_NORM"
    ) as info:
        LearnableHorizon()(lambda t, y: y * float("nan"), torch.ones(1), solver=torchode_solver)
    assert "func(t0, y0) is not finite" in str(info.value.__notes__)  # the horizon's diagnosis


@pytest.mark.parametrize("name", ["final_state", "zuko", "torchode"])
def test_an_adapter_is_refused_on_a_budget(name):
    """A budget solves its steps with torchdiffeq and its reference with torchdiffeq's odeint or
    odeint_adjoint.
    """
    solver = {
        "final_state": final_state_solver(_rk4_tuple, nt=4),
        "zuko": zuko_solver,
        "torchode": torchode_solver,
    }
    horizon = LearnableHorizon(budget=2)
    for mode in (horizon.train, horizon.eval):
        mode()
        with pytest.raises(
            TypeError, match="^solver must be torchdiffeq's odeint or odeint_adjoint on a budget"
        ):
            horizon(TimeMLP(), torch.ones(3, 2), solver=solver[name])
    assert horizon.budget.last_input is None  # refused before any solve


@pytest.mark.parametrize(
    ("backend", "solver"), [("zuko", zuko_solver), ("torchode", torchode_solver)]
)
def test_missing_backend_gives_the_install_hint(backend, solver, monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # `import backend` now raises ImportError
    with pytest.raises(ImportError, match=rf"pip install 'torch-tempopt\[{backend}\]'"):
        LearnableHorizon()(torch.nn.Identity(), torch.ones(2), solver=solver)


def test_import_leaves_backends_alone():
    code = (
        "import sys, torch_tempopt, torch_tempopt.contrib; "
        "print(sorted({'zuko', 'torchode'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
