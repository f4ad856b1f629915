"""Solver adapters: time gradients against finite differences in both directions, weights against the backends."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torchdiffeq
from fields import TimeMLP, TupleField
from torch import nn

from torch_tempopt import LearnableHorizon
from torch_tempopt.solvers import (
    STEPS,
    final_state_solver,
    fixed_grid_solver,
    learnable_ffjt,
    torchdyn_solver,
    torchode_solver,
    zuko_solver,
)

TOL = 1e-11  # solver tolerances: finite differences with step 1e-4 then see only their own O(step^2) error


def _torchdyn():
    """torchdyn, or a skip. Its hard torchvision dependency can resolve to a build that fails to load with a CPU
    torch (RuntimeError, not ImportError), so any failure to import is a skip."""
    try:
        import torchdyn.core  # noqa: F401
        import torchdyn.numerics
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torchdyn is not importable: {type(e).__name__}: {str(e)[:80]}")
    return torchdyn.numerics


def _loss(out) -> torch.Tensor:
    parts = out if isinstance(out, tuple) else (out,)
    w = [1.0, -0.7, 0.3]
    return sum(w[i] * (p.pow(2).sum() + p.sin().sum()) for i, p in enumerate(parts))


def _grad_and_fd(h, func, y0, which="T", step=1e-4, **kw):
    param = getattr(h, which)
    x = param.item()
    h.zero_grad()
    _loss(h(func, y0, **kw)).backward()
    g = param.grad.item()
    vals = []
    for sgn in (+1, -1):
        with torch.no_grad():
            param.fill_(x + sgn * step)
            vals.append(_loss(h(func, y0, **kw)).item())
    with torch.no_grad():
        param.fill_(x)
    return g, (vals[0] - vals[1]) / (2 * step)


def _rk4_integrate(x, odefun, tspan, nt):
    """OT-Flow's integrate(x, net, tspan, nt): classic RK4, the field called as odefun(x, t), time advanced in place."""
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


def _otflow_solver():
    return final_state_solver(_rk4_integrate, signature="y0, func, tspan", field="y, t", nt=60)


def _tuple_rk4(func, y0, t0, t1):
    """A final-state integrator for tuple states with odeint's argument order (the default signature)."""
    return tuple(p[-1] for p in fixed_grid_solver("rk4", nt=60)(func, y0, torch.stack([t0, t1])))


ADAPTERS = {
    "fixed-rk4": lambda: fixed_grid_solver("rk4", nt=60),
    "final-otflow": _otflow_solver,
    "zuko": lambda: pytest.importorskip("zuko") and zuko_solver(atol=TOL, rtol=TOL),
    "torchode-autodiff": lambda: pytest.importorskip("torchode") and torchode_solver(atol=TOL, rtol=TOL),
    "torchode-backsolve": lambda: (
        pytest.importorskip("torchode") and torchode_solver(atol=TOL, rtol=TOL, adjoint="backsolve")
    ),
    "torchdyn-autograd": lambda: _torchdyn() and torchdyn_solver("dopri5", atol=TOL, rtol=TOL),
    "torchdyn-adjoint": lambda: (
        _torchdyn()
        and torchdyn_solver("dopri5", atol=TOL, rtol=TOL, sensitivity="adjoint", atol_adjoint=TOL, rtol_adjoint=TOL)
    ),
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_time_gradients_match_finite_differences(name, reverse, device):
    solver = ADAPTERS[name]()
    torch.manual_seed(1)
    func = TimeMLP().to(device)
    y0 = torch.randn(5, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1, learn_t0=True).to(device)
    for which in ("T", "t0"):
        g, fd = _grad_and_fd(h, func, y0, which=which, solver=solver, reverse=reverse)
        assert g == pytest.approx(fd, rel=1e-6), (which, g, fd)


TUPLE_ADAPTERS = {**ADAPTERS, "final-otflow": lambda: final_state_solver(_tuple_rk4)}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", sorted(TUPLE_ADAPTERS))
def test_tuple_state(name, reverse, device):
    """A CNF-like state (z, logp, kinetic): flattened for torchode/torchdyn, a sequence for zuko."""
    solver = TUPLE_ADAPTERS[name]()
    torch.manual_seed(2)
    func = TupleField().to(device)
    y0 = (torch.randn(4, 2, device=device), torch.zeros(4, 1, device=device), torch.zeros(4, 1, device=device))
    h = LearnableHorizon(T0=0.8, t0=0.1, learn_t0=True).to(device)
    for which in ("T", "t0"):
        g, fd = _grad_and_fd(h, func, y0, which=which, solver=solver, reverse=reverse)
        assert g == pytest.approx(fd, rel=1e-6), (which, g, fd)


@pytest.mark.parametrize("name", ["fixed-rk4", "zuko", "torchode-autodiff", "torchdyn-autograd"])
def test_trajectory_times(name, device):
    """times= hands the solver a longer grid: every adapter returns the states at all of it."""
    solver = ADAPTERS[name]()
    torch.manual_seed(3)
    func = TimeMLP().to(device)
    y0 = torch.randn(3, 2, device=device)
    h = LearnableHorizon(T0=0.9, t0=0.2, learn_t0=True).to(device)
    traj = h(func, y0, solver=solver, times=[0.25, 0.5, 1.0])
    ref = torchdiffeq.odeint(func, y0, torch.tensor([0.2, 0.375, 0.55, 0.9], device=device), rtol=TOL, atol=TOL)
    torch.testing.assert_close(traj, ref[1:], rtol=1e-8, atol=1e-8)
    for reverse in (False, True):
        g, fd = _grad_and_fd(h, func, y0, solver=solver, times=[0.25, 0.5, 1.0], reverse=reverse)
        assert g == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("name", ["zuko", "torchode-autodiff", "torchdyn-autograd"])
def test_rescale_mechanism(name, device):
    """mechanism='rescale': the backend differentiates T itself (zuko through adjoint_params)."""
    solver = ADAPTERS[name]()
    torch.manual_seed(4)
    func = TimeMLP().to(device)
    y0 = torch.randn(3, 2, device=device)
    h = LearnableHorizon(T0=0.6, t0=0.1, learn_t0=True).to(device)
    for reverse in (False, True):
        for which in ("T", "t0"):
            g, fd = _grad_and_fd(h, func, y0, which=which, solver=solver, reverse=reverse, mechanism="rescale")
            assert g == pytest.approx(fd, rel=1e-6), (reverse, which)


# ------------------------------------------------------------------------------------------------------------------
# Weights: the adapters pass the backend's own parameter gradients through.


def _weight_grads(module, loss):
    module.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in module.parameters()]


def _assert_same(a, b, rtol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("reverse", [False, True])
def test_zuko_weights_match_zuko(reverse, device):
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(5)
    func = TimeMLP().to(device)
    y0 = torch.randn(4, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1).to(device)
    ours = _weight_grads(func, _loss(h(func, y0, solver=zuko_solver(atol=1e-9, rtol=1e-9), reverse=reverse)))
    a, b = (0.7, 0.1) if reverse else (0.1, 0.7)
    raw = zuko.utils.odeint(func, y0, a, b, tuple(func.parameters()), 1e-9, 1e-9)
    _assert_same(ours, _weight_grads(func, _loss(raw)))


@pytest.mark.parametrize("adjoint", ["autodiff", "backsolve"])
@pytest.mark.parametrize("reverse", [False, True])
def test_torchode_weights_match_torchode(adjoint, reverse, device):
    to = pytest.importorskip("torchode")
    torch.manual_seed(6)
    func = RowField().to(device)
    y0 = torch.randn(4, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1).to(device)
    solver = torchode_solver("dopri5", atol=1e-9, rtol=1e-9, adjoint=adjoint, batched=True)
    ours = _weight_grads(func, _loss(h(func, y0, solver=solver, reverse=reverse)))
    t = torch.tensor([0.7, 0.1] if reverse else [0.1, 0.7], device=device).expand(4, 2)
    term = to.ODETerm(func)
    method, ctrl = to.Dopri5(term=term), to.PIDController(1e-9, 1e-9, 0.2, 0.5, 0.0, term=term)
    engine = to.AutoDiffAdjoint(method, ctrl) if adjoint == "autodiff" else to.BacksolveAdjoint(term, method, ctrl)
    raw = engine.solve(to.InitialValueProblem(y0=y0, t_eval=t)).ys[:, -1]
    _assert_same(ours, _weight_grads(func, _loss(raw)))


@pytest.mark.parametrize("sensitivity", ["autograd", "adjoint"])
def test_torchdyn_weights_match_torchdyn(sensitivity, device):
    numerics = _torchdyn()
    from torchdyn.core import NeuralODE

    torch.manual_seed(7)
    func = DynField().to(device)
    y0 = torch.randn(4, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1).to(device)
    kw = dict(atol=1e-9, rtol=1e-9)
    adj = dict(atol_adjoint=1e-9, rtol_adjoint=1e-9)
    solver = torchdyn_solver("dopri5", sensitivity=sensitivity, **kw, **adj)
    ours = _weight_grads(func, _loss(h(func, y0, solver=solver)))
    t = torch.tensor([0.1, 0.7], device=device)
    if sensitivity == "autograd":
        raw = numerics.odeint(func, y0, t, solver="dopri5", **kw)[1][-1]
    else:
        node = NeuralODE(func, solver="dopri5", sensitivity=sensitivity, return_t_eval=False, **kw, **adj)
        node.solver = node.solver_adjoint = numerics.solvers.ode.str_to_solver("dopri5", torch.float64)
        raw = node(y0, t)[-1]
    # Our adapter flattens the state: the error norms are the same, the order of floating-point sums may not be.
    _assert_same(ours, _weight_grads(func, _loss(raw)), rtol=1e-7)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_fixed_grid_weights_match_torchdiffeq(step, device):
    torch.manual_seed(8)
    func = TimeMLP().to(device)
    y0 = torch.randn(4, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1).to(device)
    ours = _weight_grads(func, _loss(h(func, y0, solver=fixed_grid_solver(step, nt=6))))
    method = {"euler": "euler", "midpoint": "midpoint", "rk4": "rk4"}[step]
    if step == "rk4":  # torchdiffeq's "rk4" is the 3/8 rule: compare with a hand-written classic RK4
        raw = _rk4_integrate(y0, lambda x, t: func(t, x), torch.tensor([0.1, 0.7], device=device), 6)
    else:
        t = torch.tensor([0.1, 0.7], device=device)
        raw = torchdiffeq.odeint(func, y0, t, method=method, options=dict(step_size=0.1))[-1]
    _assert_same(ours, _weight_grads(func, _loss(raw)), rtol=1e-10)


# ------------------------------------------------------------------------------------------------------------------
# Upstream behaviour the detached grid makes irrelevant.


def test_zuko_raw_odeint_start_time_gradient_has_wrong_sign(device):
    """zuko 1.6: odeint's dL/dt0 is +<a, f> (should be -<a, f>); our horizon matches finite differences."""
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(9)
    func = TimeMLP().to(device)
    y0 = torch.randn(4, 2, device=device)
    phi = tuple(func.parameters())

    def raw(T, t0):
        return _loss(zuko.utils.odeint(func, y0, t0, T, phi, TOL, TOL))

    T = torch.tensor(0.7, device=device, requires_grad=True)
    t0 = torch.tensor(0.1, device=device, requires_grad=True)
    raw(T, t0).backward()
    with torch.no_grad():
        fd = (raw(T, t0 + 1e-4) - raw(T, t0 - 1e-4)).item() / 2e-4
    h = LearnableHorizon(T0=0.7, t0=0.1, learn_t0=True).to(device)
    g, fd_h = _grad_and_fd(h, func, y0, which="t0", solver=zuko_solver(atol=TOL, rtol=TOL))
    assert fd_h == pytest.approx(fd, rel=1e-9)
    assert g == pytest.approx(fd, rel=1e-6)
    assert t0.grad.item() == pytest.approx(-fd, rel=1e-6)  # the upstream sign error
    if zuko.__version__ != "1.6.0":  # a fixed zuko would give the right answer: then only ours is checked
        pytest.skip(f"zuko {zuko.__version__}: the sign bug was seen in 1.6.0")


def test_zuko_cnf_sampling_time_gradient(device):
    """A zuko CNF on the horizon: dL/dT right for log_prob (t0 -> T) and for sampling (T -> t0),
    where zuko's own FreeFormJacobianTransform with T in its times gets the sign wrong."""
    zuko = pytest.importorskip("zuko")
    from zuko.transforms import FreeFormJacobianTransform

    torch.manual_seed(10)
    # tanh, not zuko's default ELU: ELU's kink limits the adaptive solver to ~1e-8, too noisy for the differences.
    flow = zuko.flows.CNF(2, hidden_features=(8,), atol=1e-9, rtol=1e-9, activation=nn.Tanh).to(device)
    h = LearnableHorizon(T0=1.0, learn_t0=True).to(device)
    lazy = flow.transform
    flow.transform = learnable_ffjt(lazy, h)
    assert any(p is h.T for p in flow.parameters())
    x = torch.randn(3, 2, device=device)

    def density():
        return -flow().log_prob(x).sum()

    def sample():
        t = flow().transform.inv
        z, ladj = t.call_and_ladj(x)
        return z.pow(2).sum() + z.sin().sum() + ladj.sum()

    for loss in (density, sample):
        h.zero_grad()
        loss().backward()
        for p in (h.T, h.t0):
            v = p.item()
            vals = []
            for sgn in (+1, -1):
                with torch.no_grad():
                    p.fill_(v + sgn * 1e-4)
                    vals.append(loss().item())
            with torch.no_grad():
                p.fill_(v)
            fd = (vals[0] - vals[1]) / 2e-4
            assert p.grad.item() == pytest.approx(fd, rel=1e-5), (loss.__name__, p is h.T)
    # zuko's own transform, T in its times: right when T ends the integration (log_prob), wrong when it starts it.
    base = lazy()
    T = torch.tensor(1.0, device=device, requires_grad=True)
    raw = FreeFormJacobianTransform(base.f, torch.zeros((), device=device), T, base.phi, 1e-9, 1e-9)
    raw.inv(x).pow(2).sum().backward()
    h.zero_grad()
    learnable_ffjt(base, h).inv(x).pow(2).sum().backward()
    assert T.grad.item() == pytest.approx(-h.T.grad.item(), rel=1e-8)
    flow.transform = flow.transform.transform  # undo
    assert flow.transform is lazy


def test_torchode_backsolve_raw_time_gradient_is_none(device):
    to = pytest.importorskip("torchode")
    torch.manual_seed(11)
    func = RowField().to(device)
    y0 = torch.randn(4, 2, device=device)
    t = torch.tensor([0.1, 0.7], device=device).expand(4, 2).clone().requires_grad_()
    term = to.ODETerm(func)
    engine = to.BacksolveAdjoint(term, to.Dopri5(term=term), to.PIDController(1e-9, 1e-9, 0.2, 0.5, 0.0, term=term))
    _loss(engine.solve(to.InitialValueProblem(y0=y0, t_eval=t)).ys[:, -1]).backward()
    assert t.grad is None
    h = LearnableHorizon(T0=0.7, t0=0.1, learn_t0=True).to(device)
    solver = torchode_solver(atol=TOL, rtol=TOL, adjoint="backsolve", batched=True)
    for which in ("T", "t0"):
        g, fd = _grad_and_fd(h, func, y0, which=which, solver=solver)
        assert g == pytest.approx(fd, rel=1e-6)


def test_torchdyn_adjoint_reverse_time(device):
    """torchdyn's adjoint integrates backwards in time with the field at negated times; the adapter integrates
    s = -t forwards instead, so its weight gradients match torchdyn's autograd ones."""
    numerics = _torchdyn()
    from torchdyn.core import NeuralODE

    torch.manual_seed(12)
    func = DynField().to(device)
    y0 = torch.randn(4, 2, device=device)
    t = torch.tensor([0.7, 0.1], device=device)
    kw = dict(atol=TOL, rtol=TOL)
    ref = _weight_grads(func, _loss(numerics.odeint(func, y0, t, solver="dopri5", **kw)[1][-1]))
    node = NeuralODE(func, solver="dopri5", sensitivity="adjoint", return_t_eval=False, atol_adjoint=TOL, rtol_adjoint=TOL, **kw)
    node.solver = node.solver_adjoint = numerics.solvers.ode.str_to_solver("dopri5", torch.float64)
    raw = _weight_grads(func, _loss(node(y0, t)[-1]))
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(raw, ref))  # upstream: wrong
    h = LearnableHorizon(T0=0.7, t0=0.1).to(device)
    solver = torchdyn_solver("dopri5", sensitivity="adjoint", atol_adjoint=TOL, rtol_adjoint=TOL, **kw)
    _assert_same(_weight_grads(func, _loss(h(func, y0, solver=solver, reverse=True))), ref, rtol=1e-6)


@pytest.mark.parametrize("sensitivity", ["autograd", "adjoint"])
def test_torchdyn_fixed_step_grid(sensitivity, device):
    """nt refines the grid torchdyn steps on; with a fixed-step adjoint no tolerance warning (an error here)."""
    _torchdyn()
    torch.manual_seed(15)
    func = TimeMLP().to(device)
    y0 = torch.randn(3, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1, learn_t0=True).to(device)
    solver = torchdyn_solver("midpoint", nt=30, sensitivity=sensitivity, solver_adjoint="midpoint")
    for reverse in (False, True):
        for which in ("T", "t0"):
            g, fd = _grad_and_fd(h, func, y0, which=which, solver=solver, reverse=reverse)
            assert g == pytest.approx(fd, rel=5e-3)  # midpoint: the discrete solution's O(h^2) against F


# ------------------------------------------------------------------------------------------------------------------
# Fixed grids and final-state solvers.


@pytest.mark.parametrize("reverse", [False, True])
def test_fixed_grid_taylor_remainder(reverse, device):
    """L(T + e) - L(T) - e dL/dT shrinks as O(e^2) (slope 2), against O(e) without the gradient."""
    torch.manual_seed(13)
    func = TimeMLP().to(device)
    y0 = torch.randn(4, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1).to(device)
    solver = fixed_grid_solver("rk4", nt=40)
    _loss(h(func, y0, solver=solver, reverse=reverse)).backward()
    g = h.T.grad.item()
    with torch.no_grad():
        L0 = _loss(h(func, y0, solver=solver, reverse=reverse)).item()
        eps = [0.1 / 2**k for k in range(5)]
        first, second = [], []
        for e in eps:
            h.T.fill_(0.7 + e)
            L = _loss(h(func, y0, solver=solver, reverse=reverse)).item()
            first.append(abs(L - L0))
            second.append(abs(L - L0 - e * g))
    slope = [math.log2(a / b) for a, b in zip(second, second[1:])]
    assert all(1.9 < s < 2.1 for s in slope), slope
    assert all(0.9 < math.log2(a / b) < 1.1 for a, b in zip(first, first[1:]))


def test_fixed_grid_step_size_and_custom_step(device):
    """step_size cuts each interval into equal steps; a custom rule sees the user's state structure."""
    seen = []

    def heun(func, t, y, dt):
        seen.append(type(y))
        k1 = func(t, y)
        k2 = func(t + dt, y + dt * k1)
        return y + dt / 2 * (k1 + k2)

    y0 = torch.ones(3, device=device)
    out = fixed_grid_solver(heun, step_size=0.3)(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], device=device))
    assert out.shape == (2, 3) and seen == [torch.Tensor] * 4  # ceil(1 / 0.3) = 4 steps
    assert out[-1, 0].item() == pytest.approx((1 - 0.25 + 0.25**2 / 2) ** 4, rel=1e-12)
    h = LearnableHorizon(T0=0.5).to(device)
    y = h(lambda t, y: -y, y0, solver=fixed_grid_solver("rk4", step_size=1e-2), reverse=True)
    assert y[0].item() == pytest.approx(math.exp(0.5), rel=1e-9)


def test_final_state_solver_with_its_own_field(device):
    """An integrator that brings its own field (OT-Flow's integrate(x, net, tspan, nt)): func is then only
    the horizon's copy of that field, for the time gradient."""
    torch.manual_seed(14)
    net = TimeMLP().to(device)

    def odefun(x, t, net):
        return net(t, x)

    def integrate(x, net, tspan, nt):
        return _rk4_integrate(x, lambda z, t: odefun(z, t, net), tspan, nt)

    solver = final_state_solver(lambda x, tspan, nt: integrate(x, net, tspan, nt), signature="y0, tspan", nt=60)
    y0 = torch.randn(4, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1, learn_t0=True).to(device)
    for reverse in (False, True):
        for which in ("T", "t0"):
            g, fd = _grad_and_fd(h, lambda t, x: odefun(x, t, net), y0, which=which, solver=solver, reverse=reverse)
            assert g == pytest.approx(fd, rel=1e-6)


def test_final_state_solver_passes_fresh_times(device):
    """An integrator that advances its time in place (tk += h) must not touch the horizon's grid."""
    grid = torch.tensor([0.0, 0.5, 1.0], device=device)
    before = grid.clone()
    out = _otflow_solver()(lambda t, y: -y, torch.ones(2, device=device), grid)
    assert torch.equal(grid, before)
    torch.testing.assert_close(out[:, 0], torch.exp(-grid), rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs.


def test_fixed_grid_bad_inputs():
    with pytest.raises(ValueError, match="step must be one of"):
        fixed_grid_solver("rk5", nt=4)
    with pytest.raises(TypeError, match="step must be"):
        fixed_grid_solver(3, nt=4)
    with pytest.raises(ValueError, match="exactly one of nt and step_size"):
        fixed_grid_solver("rk4")
    with pytest.raises(ValueError, match="exactly one of nt and step_size"):
        fixed_grid_solver("rk4", nt=4, step_size=0.1)
    with pytest.raises(ValueError, match="nt must be >= 1"):
        fixed_grid_solver("rk4", nt=0)
    with pytest.raises(TypeError, match="nt must be a positive int"):
        fixed_grid_solver("rk4", nt=2.5)
    with pytest.raises(ValueError, match="step_size must be positive"):
        fixed_grid_solver("rk4", step_size=-0.1)
    solver = fixed_grid_solver("rk4", nt=2)
    with pytest.raises(ValueError, match="t must be a 1-D tensor"):
        solver(lambda t, y: -y, torch.ones(2), torch.tensor(1.0))
    with pytest.raises(TypeError, match="y0 must be a floating-point tensor"):
        solver(lambda t, y: -y, torch.ones(2, dtype=torch.long), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="func must be callable"):
        solver(None, torch.ones(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="step must return the final state"):
        fixed_grid_solver(lambda f, t, y, dt: y.sum(), nt=1)(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))


def test_final_state_solver_bad_inputs():
    with pytest.raises(TypeError, match="integrate must be callable"):
        final_state_solver(None)
    with pytest.raises(ValueError, match="signature names unknown"):
        final_state_solver(_rk4_integrate, signature="x, net, tspan")
    with pytest.raises(ValueError, match="signature must place the initial state y0"):
        final_state_solver(_rk4_integrate, signature="func, tspan")
    with pytest.raises(ValueError, match="signature must place the times"):
        final_state_solver(_rk4_integrate, signature="y0, func, t0")
    with pytest.raises(ValueError, match="signature names an argument twice"):
        final_state_solver(_rk4_integrate, signature="y0, y0, tspan")
    with pytest.raises(TypeError, match="signature must be a string"):
        final_state_solver(_rk4_integrate, signature=("y0", "tspan"))
    with pytest.raises(ValueError, match="field must be one of"):
        final_state_solver(_rk4_integrate, signature="y0, func, tspan", field="x, t, net")
    bad = final_state_solver(lambda f, y0, t0, t1: (y0, y0))
    with pytest.raises(ValueError, match="integrate must return the final state"):
        LearnableHorizon()(lambda t, y: -y, torch.ones(2), solver=bad)


def test_backend_bad_inputs():
    with pytest.raises(ValueError, match="atol must be positive"):
        zuko_solver(atol=0.0)
    with pytest.raises(TypeError, match="phi must be an iterable of tensors"):
        zuko_solver(phi=[1.0])
    with pytest.raises(ValueError, match="adjoint must be one of"):
        torchode_solver(adjoint="checkpoint")
    with pytest.raises(ValueError, match="controller must be one of"):
        torchode_solver(controller="pi")
    with pytest.raises(ValueError, match="dt0 must be given with controller='fixed'"):
        torchode_solver(controller="fixed")
    with pytest.raises(TypeError, match="batched must be True or False"):
        torchode_solver(batched=1)
    with pytest.raises(ValueError, match="sensitivity must be one of"):
        torchdyn_solver(sensitivity="backsolve")
    with pytest.raises(ValueError, match="interpolated_adjoint' is not supported"):
        torchdyn_solver(sensitivity="interpolated_adjoint")
    with pytest.raises(TypeError, match="horizon must be a LearnableHorizon"):
        learnable_ffjt(None, nn.Linear(1, 1))


def test_backend_bad_calls():
    pytest.importorskip("zuko")
    pytest.importorskip("torchode")
    net = nn.Linear(2, 2)
    h = LearnableHorizon(T0=0.5)
    with pytest.raises(ValueError, match="func must be an nn.Module, or phi must be given"):
        h(lambda t, y: net(y), torch.ones(3, 2), solver=zuko_solver())
    with pytest.raises(ValueError, match="func must be an nn.Module for adjoint='backsolve'"):
        h(lambda t, y: net(y), torch.ones(3, 2), solver=torchode_solver(adjoint="backsolve"))
    with pytest.raises(ValueError, match="adjoint_params holds 1 other tensor"):
        h(TimeMLP(), torch.ones(3, 2), solver=torchode_solver(adjoint="backsolve"), mechanism="rescale")
    with pytest.raises(ValueError, match="same leading .batch. size"):
        h(TupleField(), (torch.ones(3, 2), torch.ones(2, 1), torch.ones(3, 1)), solver=torchode_solver(batched=True))
    with pytest.raises(ValueError, match="step_method must be one of"):
        h(TimeMLP(), torch.ones(3, 2), solver=torchode_solver("rk45"))
    with pytest.raises(ValueError, match="torchode did not finish"):
        h(TimeMLP(), torch.ones(3, 2), solver=torchode_solver(max_steps=2, atol=1e-12, rtol=1e-12))
    with pytest.raises(TypeError, match="transform must be a zuko FreeFormJacobianTransform"):
        learnable_ffjt(net, h)


def test_missing_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchode", None)  # import torchode now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'torch-tempopt\[torchode\]'"):
        torchode_solver()(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))


class RowField(nn.Module):
    """A field on (batch, 2) rows that takes t as a scalar or one time per row (torchode's batched solves)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.dim() == 1:  # one row, under BacksolveAdjoint's vmap
            return self(t, y[None])[0]
        tt = t.to(y).reshape(-1, 1).expand(y.shape[0], 1)
        return self.net(torch.cat([y, tt], dim=1))


class DynField(TimeMLP):
    """TimeMLP with the args keyword torchdyn's own calls pass."""

    def forward(self, t: torch.Tensor, y: torch.Tensor, args=None) -> torch.Tensor:
        return super().forward(t, y)
