"""LearnableHorizon: time gradients against finite differences, closed forms and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from fields import Linear, TimeMLP, TupleField
from torch.func import functional_call

from torch_tempopt import LearnableHorizon, count_nfe

TOL = dict(rtol=1e-11, atol=1e-11)

SOLVERS = {
    "odeint-dopri5": dict(solver=torchdiffeq.odeint, method="dopri5", **TOL),
    "adjoint-dopri5": dict(solver=torchdiffeq.odeint_adjoint, method="dopri5", **TOL),
    "odeint-rk4-grid": dict(solver=torchdiffeq.odeint, method="rk4", options=dict(step_size=1e-3)),
    "adjoint-rk4-grid": dict(solver=torchdiffeq.odeint_adjoint, method="rk4", options=dict(step_size=1e-3)),
}
ADAPTIVE = {"odeint-dopri5", "adjoint-dopri5"}


def _set(h: LearnableHorizon, T: float | None = None, t0: float | None = None) -> None:
    with torch.no_grad():
        if T is not None:
            h.T.fill_(T)
        if t0 is not None:
            h.t0.fill_(t0)


def _loss(out) -> torch.Tensor:
    parts = out if isinstance(out, tuple) else (out,)
    w = [1.0, -0.7, 0.3, 0.2]
    return sum(w[i] * (p.pow(2).sum() + p.sin().sum()) for i, p in enumerate(parts))


def _grad_and_fd(h, func, y0, which="T", step=1e-4, **kw):
    """Analytic d loss / d which (via the horizon) and the central finite difference."""
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


@pytest.mark.parametrize("mechanism", ["direct", "rescale"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_dLdT_matches_finite_differences(name, reverse, mechanism, device):
    torch.manual_seed(1)
    func = TimeMLP().to(device)
    y0 = torch.randn(6, 2, device=device)
    h = LearnableHorizon(T0=0.4567).to(device)
    g, fd = _grad_and_fd(h, func, y0, reverse=reverse, mechanism=mechanism, **SOLVERS[name])
    rel = abs(g - fd) / abs(fd)
    assert rel < (1e-5 if name in ADAPTIVE else 1e-6), (g, fd, rel)


# Every torchdiffeq method, against a tight dopri5 reference. Finite differences are too noisy for the
# low-order interpolants (bosh3, dopri8 at 1e-12 still moves 1e-7 in value), so the reference is the gradient.
METHODS = {
    "dopri8": (dict(rtol=1e-10, atol=1e-10), 1e-5),
    "dopri5": (dict(rtol=1e-10, atol=1e-10), 1e-6),
    "bosh3": (dict(rtol=1e-9, atol=1e-9), 2e-5),
    "fehlberg2": (dict(rtol=1e-9, atol=1e-9), 1e-5),
    "adaptive_heun": (dict(rtol=1e-7, atol=1e-7), 1e-5),
    "euler": (dict(options=dict(step_size=1e-3)), 1e-3),
    "midpoint": (dict(options=dict(step_size=1e-3)), 1e-6),
    "heun2": (dict(options=dict(step_size=1e-3)), 1e-6),
    "heun3": (dict(options=dict(step_size=1e-3)), 1e-6),
    "rk4": (dict(options=dict(step_size=1e-3)), 1e-6),
    "explicit_adams": (dict(options=dict(step_size=1e-3)), 1e-5),
    "implicit_adams": (dict(options=dict(step_size=1e-3)), 1e-5),
    "fixed_adams": (dict(options=dict(step_size=1e-3)), 1e-5),
    "scipy_solver": (dict(options=dict(solver="RK45"), rtol=1e-10, atol=1e-10), 1e-6),
}


@pytest.mark.filterwarnings("ignore:The following arguments have no effect")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_torchdiffeq_method(method, reverse):
    if method == "scipy_solver" and reverse:
        pytest.skip("scipy's solver is not differentiable: a start-time gradient needs dL/dy0 from the backend")
    torch.manual_seed(11)
    func = TimeMLP()
    y0 = torch.randn(6, 2)

    def dLdT(**kw):
        h = LearnableHorizon(T0=0.4567)
        _loss(h(func, y0, reverse=reverse, **kw)).backward()
        return h.T.grad.item()

    ref = dLdT(method="dopri5", rtol=1e-12, atol=1e-12)
    kw, tol = METHODS[method]
    assert dLdT(method=method, **kw) == pytest.approx(ref, rel=tol)


@pytest.mark.parametrize("mechanism", ["direct", "rescale"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", ["odeint-dopri5", "adjoint-dopri5", "odeint-rk4-grid"])
def test_tuple_state_three_parts(name, reverse, mechanism, device):
    torch.manual_seed(2)
    func = TupleField().to(device)
    z = torch.randn(5, 2, device=device)
    y0 = (z, torch.zeros(5, 1, device=device), torch.zeros(5, 1, device=device))
    h = LearnableHorizon(T0=0.8, t0=0.1, learn_t0=True).to(device)
    for which in ("T", "t0"):
        g, fd = _grad_and_fd(h, func, y0, which=which, reverse=reverse, mechanism=mechanism, **SOLVERS[name])
        assert abs(g - fd) / abs(fd) < 1e-5, (which, g, fd)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", ["odeint-dopri5", "adjoint-dopri5", "odeint-rk4-grid"])
def test_dLdt0_matches_finite_differences(name, reverse, device):
    torch.manual_seed(3)
    func = TimeMLP().to(device)
    y0 = torch.randn(4, 2, device=device)
    h = LearnableHorizon(T0=0.9, t0=-0.2, learn_t0=True).to(device)
    g, fd = _grad_and_fd(h, func, y0, which="t0", reverse=reverse, **SOLVERS[name])
    assert abs(g - fd) / abs(fd) < 1e-5, (g, fd)


@pytest.mark.parametrize("mechanism", ["direct", "rescale"])
@pytest.mark.parametrize("solver", [torchdiffeq.odeint, torchdiffeq.odeint_adjoint])
def test_closed_form_linear_ode(solver, mechanism, device):
    """y(T) = expm(A (T - t0)) y0, so dL/dT = c^T A expm(A (T - t0)) y0 = -dL/dt0."""
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], device=device)
    func = Linear(A.clone()).to(device)
    y0 = torch.tensor([[1.0, -2.0]], device=device)
    c = torch.tensor([0.3, 1.7], device=device)
    T, t0 = 1.3, 0.2
    h = LearnableHorizon(T0=T, t0=t0, learn_t0=True).to(device)
    (h(func, y0, solver=solver, mechanism=mechanism, **TOL) @ c).sum().backward()
    E = torch.linalg.matrix_exp(A * (T - t0))
    dT = c @ A @ E @ y0[0]
    assert h.T.grad.item() == pytest.approx(dT.item(), rel=1e-8, abs=1e-9)
    assert h.t0.grad.item() == pytest.approx(-dT.item(), rel=1e-8, abs=1e-9)


def test_closed_form_time_dependent_field(device):
    """dy/dt = t y: y(T) = y0 exp((T^2 - t0^2) / 2), dL/dT = T y(T) for L = y(T)."""
    h = LearnableHorizon(T0=1.1, t0=0.3, learn_t0=True).to(device)
    y0 = torch.tensor([0.7], device=device)
    y = h(lambda t, y: t * y, y0, **TOL)
    y.sum().backward()
    yT = 0.7 * math.exp((1.1**2 - 0.3**2) / 2)
    assert y.item() == pytest.approx(yT, rel=1e-9)
    assert h.T.grad.item() == pytest.approx(1.1 * yT, rel=1e-9)
    assert h.t0.grad.item() == pytest.approx(-0.3 * yT, rel=1e-9)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mechanism", ["direct", "rescale"])
def test_gradcheck(reverse, mechanism, device):
    torch.manual_seed(4)
    func = TimeMLP(hidden=8).to(device)
    h = LearnableHorizon(T0=0.6, t0=0.1, learn_t0=True).to(device)

    def fn(T, t0, y0):
        return functional_call(h, {"T": T, "t0": t0}, (func, y0), dict(reverse=reverse, mechanism=mechanism, **TOL))

    inputs = (
        torch.tensor(0.6, device=device, requires_grad=True),
        torch.tensor(0.1, device=device, requires_grad=True),
        torch.randn(3, 2, device=device, requires_grad=True),
    )
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-5, atol=1e-5, rtol=1e-4)


def _time_dropping_solver(func, y0, t, **kw):
    """A backend that loses any time gradient (like torchode's BacksolveAdjoint)."""
    assert not t.requires_grad, "the horizon must hand the backend a detached grid"
    return torchdiffeq.odeint(func, y0, t.detach(), **kw)


@pytest.mark.parametrize("reverse", [False, True])
def test_no_double_counting(reverse):
    """A backend that differentiates time itself gives the same dL/dT as one that drops it."""
    torch.manual_seed(5)
    func = TimeMLP()
    y0 = torch.randn(4, 2)
    grads = []
    for solver in (torchdiffeq.odeint, torchdiffeq.odeint_adjoint, _time_dropping_solver):
        h = LearnableHorizon(T0=0.5, learn_t0=True)
        _loss(h(func, y0, solver=solver, reverse=reverse, **TOL)).backward()
        grads.append((h.T.grad.item(), h.t0.grad.item()))
    for g in grads[1:]:
        assert g == pytest.approx(grads[0], rel=1e-9)
    # and both channels of a naive torch.stack([t0, T]) grid would have added a second copy:
    h = LearnableHorizon(T0=0.5)
    _loss(h(func, y0, **TOL)).backward()
    T = torch.tensor(0.5, requires_grad=True)
    _loss(torchdiffeq.odeint(func, y0, torch.stack([torch.tensor(0.0), T]), **TOL)[-1]).backward()
    assert h.T.grad.item() == pytest.approx(T.grad.item(), rel=1e-6)


def test_direct_and_rescale_agree():
    torch.manual_seed(6)
    func = TupleField()
    y0 = (torch.randn(7, 2), torch.zeros(7, 1), torch.zeros(7, 1))
    out = {}
    for mech in ("direct", "rescale"):
        h = LearnableHorizon(T0=0.7, t0=0.05, learn_t0=True)
        func.zero_grad()
        _loss(h(func, y0, mechanism=mech, **TOL)).backward()
        out[mech] = [h.T.grad.item(), h.t0.grad.item()] + [p.grad.clone() for p in func.parameters()]
    d, r = out["direct"], out["rescale"]
    assert d[0] == pytest.approx(r[0], rel=1e-7)
    assert d[1] == pytest.approx(r[1], rel=1e-7)
    for a, b in zip(d[2:], r[2:]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_fixed_step_taylor_remainder_is_second_order():
    """|L(T + h) - L(T) - h dL/dT| = O(h^2) on a fixed rk4 grid."""
    torch.manual_seed(7)
    func = TimeMLP()
    y0 = torch.randn(5, 2)
    hz = LearnableHorizon(T0=0.5)
    kw = dict(method="rk4", options=dict(step_size=0.01))
    _loss(hz(func, y0, **kw)).backward()
    g = hz.T.grad.item()
    with torch.no_grad():
        L0 = _loss(hz(func, y0, **kw)).item()
        steps = [0.04, 0.02, 0.01, 0.005]
        rems = []
        for s in steps:
            hz.T.fill_(0.5 + s)
            rems.append(abs(_loss(hz(func, y0, **kw)).item() - L0 - s * g))
    slopes = [math.log(rems[i] / rems[i + 1]) / math.log(2) for i in range(len(steps) - 1)]
    assert all(1.8 < s < 2.2 for s in slopes), slopes


def test_extra_nfe_is_one_evaluation_per_learned_end():
    torch.manual_seed(8)
    func = count_nfe(TimeMLP())
    y0 = torch.randn(4, 2)
    h = LearnableHorizon(T0=0.5)
    _loss(h(func, y0, rtol=1e-6, atol=1e-6)).backward()
    ours = (func.nfe_forward, func.nfe_backward)
    func.reset()
    _loss(torchdiffeq.odeint(func, y0, torch.tensor([0.0, 0.5]), rtol=1e-6, atol=1e-6)[-1]).backward()
    assert ours == (func.nfe_forward, func.nfe_backward + 1)
    # reverse direction with T learned: the extra evaluation is at the start of the solve
    func.reset()
    _loss(h(func, y0, reverse=True, rtol=1e-6, atol=1e-6)).backward()
    rev = func.nfe_backward
    func.reset()
    _loss(torchdiffeq.odeint(func, y0, torch.tensor([0.5, 0.0]), rtol=1e-6, atol=1e-6)[-1]).backward()
    assert rev == func.nfe_backward + 1
    # no grad: nothing extra at all
    func.reset()
    with torch.no_grad():
        h(func, y0, rtol=1e-6, atol=1e-6)
    assert func.nfe_backward == 0


def test_adjoint_weight_gradients_unchanged_by_learning_T():
    """Detaching t keeps odeint_adjoint's step control: weights get the fixed-T gradients."""
    torch.manual_seed(9)
    func = count_nfe(TimeMLP())
    y0 = torch.randn(4, 2)
    h = LearnableHorizon(T0=0.5)
    _loss(h(func, y0, solver=torchdiffeq.odeint_adjoint, rtol=1e-5, atol=1e-5)).backward()
    ours = [p.grad.clone() for p in func.parameters()]
    nfe = func.nfe_backward
    func.zero_grad()
    func.reset()
    t = torch.tensor([0.0, 0.5])
    _loss(torchdiffeq.odeint_adjoint(func, y0, t, rtol=1e-5, atol=1e-5)[-1]).backward()
    for a, p in zip(ours, func.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0)
    assert nfe == func.nfe_backward + 1


@pytest.mark.parametrize("reverse", [False, True])
def test_times_returns_trajectory_with_gradients(reverse):
    torch.manual_seed(10)
    func = TimeMLP()
    y0 = torch.randn(3, 2)
    h = LearnableHorizon(T0=0.8, t0=0.1, learn_t0=True)
    s = torch.tensor([0.25, 0.5, 1.0])
    traj = h(func, y0, times=s, reverse=reverse, **TOL)
    assert traj.shape == (3, 3, 2)
    start, end = (0.8, 0.1) if reverse else (0.1, 0.8)
    ref = torchdiffeq.odeint(func, y0, torch.tensor([start, *(start + s * (end - start)).tolist()]), **TOL)[1:]
    torch.testing.assert_close(traj, ref, rtol=1e-9, atol=1e-9)
    for which in ("T", "t0"):
        g, fd = _grad_and_fd(h, func, y0, which=which, times=s, reverse=reverse, **TOL)
        assert abs(g - fd) / abs(fd) < 1e-5
    with_zero = h(func, y0, times=[0.0, 1.0], **TOL)
    torch.testing.assert_close(with_zero[0], y0)


def test_output_structure_dtype_device_follow_y0():
    h = LearnableHorizon(T0=0.5)  # float64 by the test default
    y32 = torch.randn(3, 2, dtype=torch.float32)
    out = h(TimeMLP().float(), y32)
    assert out.dtype == torch.float32 and out.shape == (3, 2)
    out.sum().backward()
    assert h.T.grad is not None and h.T.grad.dtype == h.T.dtype
    tup = h(TupleField(), (torch.randn(3, 2), torch.zeros(3, 1), torch.zeros(3, 1)))
    assert isinstance(tup, tuple) and [p.shape for p in tup] == [(3, 2), (3, 1), (3, 1)]
    lst = h(TupleField(), [torch.randn(3, 2), torch.zeros(3, 1), torch.zeros(3, 1)])
    assert isinstance(lst, tuple)


def test_every_parameter_gets_a_gradient():
    func = TupleField()
    h = LearnableHorizon(T0=0.5, learn_t0=True)
    _loss(h(func, (torch.randn(3, 2), torch.zeros(3, 1), torch.zeros(3, 1)))).backward()
    for name, p in [*func.named_parameters(), *h.named_parameters()]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_repr_bounds_state_dict_and_dtype_casts():
    h = LearnableHorizon(T0=0.5, t0=0.0, eps=0.1)
    assert h.bounds == pytest.approx((0.1, 0.9))
    r = repr(h)
    assert "T=0.5" in r and "bounds=[0.1, 0.9]" in r
    assert isinstance(h.T, torch.nn.Parameter) and h.T.dim() == 0
    assert "t0" in dict(h.named_buffers()) and "t0" not in dict(h.named_parameters())
    h2 = LearnableHorizon(T0=1.0, learn_t0=True)
    assert "t0" in dict(h2.named_parameters()) and "(learned)" in repr(h2)
    with torch.no_grad():
        h.T.fill_(0.3)
    other = LearnableHorizon(T0=0.7, eps=0.2)
    other.load_state_dict(h.state_dict())
    assert other.T.item() == pytest.approx(0.3) and other.bounds == pytest.approx((0.1, 0.9))
    h.float()
    assert h.T.dtype == torch.float32
    assert h.bounds == (0.1, 0.9)  # bounds are not rounded by dtype casts


def test_clip_keeps_T_and_learned_t0_in_bounds():
    h = LearnableHorizon(T0=1.0, t0=0.0, eps=0.1, learn_t0=True)
    with torch.no_grad():
        h.T.fill_(5.0)
        h.t0.fill_(-5.0)
    assert h.clip_()
    assert h.T.item() == pytest.approx(1.9) and h.t0.item() == pytest.approx(-0.9)
    with torch.no_grad():
        h.T.fill_(0.2)
        h.t0.fill_(0.5)
    h.clip_()
    assert h.T.item() >= h.bounds[0] and h.t0.item() <= h.T.item() - 0.1 + 1e-12
    assert not h.clip_()


def test_custom_solver_with_odeint_signature():
    calls = []

    def euler(func, y0, t, *, step=1e-3):
        calls.append(t.clone())
        ys = [y0]
        for a, b in zip(t[:-1], t[1:]):
            y, n = ys[-1], max(1, int(abs(b - a) / step))
            dt = (b - a) / n
            for i in range(n):
                y = y + dt * func(a + i * dt, y)
            ys.append(y)
        return torch.stack(ys)

    h = LearnableHorizon(T0=0.5)
    y = h(lambda t, y: -y, torch.ones(2), solver=euler, step=1e-4)
    y.sum().backward()
    assert calls and not calls[0].requires_grad
    assert h.T.grad.item() == pytest.approx(-2 * math.exp(-0.5), rel=1e-3)


def test_solver_returning_only_final_state_is_refused():
    h = LearnableHorizon(T0=0.5)
    with pytest.raises(ValueError, match="solution at every time"):
        h(lambda t, y: -y, torch.ones(3), solver=lambda f, y0, t: y0)


def test_rescale_with_adjoint_needs_module_or_adjoint_params():
    h = LearnableHorizon(T0=0.5)
    net = TimeMLP()
    with pytest.raises(ValueError, match="adjoint_params"):
        h(lambda t, y: net(t, y), torch.ones(2, 2), solver=torchdiffeq.odeint_adjoint, mechanism="rescale")
    out = h(lambda t, y: net(t, y), torch.ones(2, 2), solver=torchdiffeq.odeint_adjoint, mechanism="rescale",
            adjoint_params=tuple(net.parameters()))
    out.sum().backward()
    assert h.T.grad is not None and all(p.grad is not None for p in net.parameters())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(T0=0.5, t0=0.5), ValueError, "T0"),
        (dict(T0=0.2, t0=0.5), ValueError, "T0"),
        (dict(T0=1.0, eps=0.0), ValueError, "eps"),
        (dict(T0=1.0, eps=-0.1), ValueError, "eps"),
        (dict(T0=1.0, eps=1.0), ValueError, "eps"),
        (dict(T0=1.0, eps=2.0), ValueError, "eps"),
        (dict(T0=float("nan")), ValueError, "T0"),
        (dict(T0=float("inf")), ValueError, "T0"),
        (dict(T0=1.0, t0=float("-inf")), ValueError, "t0"),
        (dict(T0=1.0, eps=float("nan")), ValueError, "eps"),
        (dict(T0="1.0"), TypeError, "T0"),
        (dict(T0=True), TypeError, "T0"),
        (dict(T0=None), TypeError, "T0"),
        (dict(T0=torch.ones(2)), TypeError, "T0"),
        (dict(T0=1.0, learn_t0=1), TypeError, "learn_t0"),
    ],
)
def test_constructor_rejects_bad_input(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        LearnableHorizon(**kwargs)


def test_constructor_accepts_tensor_and_int():
    h = LearnableHorizon(T0=torch.tensor(2), t0=1, eps=0.5)
    assert h.bounds == (1.5, 2.5)


@pytest.mark.parametrize(
    "y0, kwargs, exc, name",
    [
        (torch.ones(2, dtype=torch.long), {}, TypeError, "y0"),
        ((torch.ones(2), torch.ones(2, dtype=torch.int32)), {}, TypeError, r"y0\[1\]"),
        ((), {}, TypeError, "y0"),
        ([1.0, 2.0], {}, TypeError, r"y0\[0\]"),
        (None, {}, TypeError, "y0"),
        (torch.ones(2), dict(times=[0.5, 1.5]), ValueError, "times"),
        (torch.ones(2), dict(times=[-0.1, 0.5]), ValueError, "times"),
        (torch.ones(2), dict(times=[0.5, 0.2]), ValueError, "times"),
        (torch.ones(2), dict(times=[]), ValueError, "times"),
        (torch.ones(2), dict(times=[[0.5]]), ValueError, "times"),
        (torch.ones(2), dict(times=[float("nan")]), ValueError, "times"),
        (torch.ones(2), dict(mechanism="magic"), ValueError, "mechanism"),
        (torch.ones(2), dict(t=torch.tensor([0.0, 1.0])), TypeError, "t must not"),
        (torch.ones(2), dict(reverse="yes"), TypeError, "reverse"),
        (torch.ones(2), dict(solver=3), TypeError, "solver"),
    ],
)
def test_call_rejects_bad_input(y0, kwargs, exc, name):
    h = LearnableHorizon(T0=0.5)
    with pytest.raises(exc, match=name):
        h(lambda t, y: y, y0, **kwargs)


def test_call_rejects_non_callable_func():
    with pytest.raises(TypeError, match="func"):
        LearnableHorizon()(None, torch.ones(2))


def test_field_that_needs_grad_mode_from_outside():
    """A gradient field F = -grad U that relies on the caller's grad mode still gets dL/dT."""

    def field(t, y):
        if not y.requires_grad:
            y = y.detach().requires_grad_(True)
        (g,) = torch.autograd.grad((y.pow(4).sum() * (1 + t)), y, create_graph=True)
        return -g

    h = LearnableHorizon(T0=0.3)
    y0 = torch.tensor([[0.8, -0.5]])
    _loss(h(field, y0, **TOL)).backward()
    vals = []
    for T in (0.3 + 1e-4, 0.3 - 1e-4):  # with grad mode on: this field cannot run without it
        vals.append(_loss(torchdiffeq.odeint(field, y0, torch.tensor([0.0, T]), **TOL)[-1]).item())
    fd = (vals[0] - vals[1]) / 2e-4
    assert h.T.grad.item() == pytest.approx(fd, rel=1e-5)
