"""LearnableHorizon: odeint's contract, time gradients against finite differences, closed forms and
gradcheck.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchdiffeq
from fields import Linear, TimeMLP, TupleField
from torch.func import functional_call

from torch_tempopt import Budget, LearnableHorizon, count_nfe

TOL = dict(rtol=1e-11, atol=1e-11)
ODEINT, ADJOINT = torchdiffeq.odeint, torchdiffeq.odeint_adjoint

SOLVERS = {
    "odeint-dopri5": dict(solver=ODEINT, method="dopri5", **TOL),
    "adjoint-dopri5": dict(solver=ADJOINT, method="dopri5", **TOL),
    "odeint-rk4-grid": dict(solver=ODEINT, method="rk4", options=dict(step_size=5e-3)),
    "adjoint-rk4-grid": dict(solver=ADJOINT, method="rk4", options=dict(step_size=5e-3)),
}


def _loss(out) -> torch.Tensor:
    """A loss on the far end of every part of the state, weighted differently per part."""
    parts = out if isinstance(out, tuple) else (out,)
    w = [1.0, -0.7, 0.3, 0.2]
    return sum(w[i] * (p[-1].pow(2).sum() + p[-1].sin().sum()) for i, p in enumerate(parts))


def _trajectory_loss(out) -> torch.Tensor:
    """A loss on every row after the first, each row weighted differently."""
    w = torch.arange(1.0, out[0].shape[0])
    return sum((p[1:] * w.view(-1, *[1] * (p.dim() - 1))).sin().sum() for p in out)


def _grad_and_fd(h, func, y0, which="T", step=1e-4, loss=_loss, **kw):
    """The horizon's d loss / d ``which`` and the central finite difference."""
    param = getattr(h, which)
    x = param.item()
    h.zero_grad()
    loss(h(func, y0, **kw)).backward()
    g = param.grad.item()
    vals = []
    for sgn in (+1, -1):
        with torch.no_grad():
            param.fill_(x + sgn * step)
            vals.append(loss(h(func, y0, **kw)).item())
    with torch.no_grad():
        param.fill_(x)
    return g, (vals[0] - vals[1]) / (2 * step)


def _tuple_state(n: int = 5, device=None) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(n, 2, device=device),
        torch.zeros(n, 1, device=device),
        torch.zeros(n, 1, device=device),
    )


# ----------------------------------------------------------------------------- odeint's contract
CONTRACT = {
    "dopri5": dict(method="dopri5", rtol=1e-9, atol=1e-9),
    "rk4-step": dict(method="rk4", options=dict(step_size=0.05)),
    "euler": dict(method="euler", options=dict(step_size=0.1)),
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("tuple_state", [False, True])
@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_output_is_what_odeint_returns_on_t0_T(name, solver, tuple_state, reverse, device):
    torch.manual_seed(0)
    func = (TupleField() if tuple_state else TimeMLP()).to(device)
    y0 = _tuple_state(device=device) if tuple_state else torch.randn(5, 2, device=device)
    h = LearnableHorizon(T0=0.7, t0=0.1).to(device)
    out = h(func, y0, solver=solver, reverse=reverse, **CONTRACT[name])
    t = torch.tensor([0.7, 0.1] if reverse else [0.1, 0.7], device=device)
    ref = solver(func, y0, t, **CONTRACT[name])
    if tuple_state:
        assert isinstance(out, tuple) and len(out) == 3
        for a, b in zip(out, ref):
            assert torch.equal(a, b)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
def test_times_are_odeints_t(solver, reverse):
    torch.manual_seed(1)
    func = TupleField()
    y0 = _tuple_state(3)
    h = LearnableHorizon(T0=0.8, t0=0.1, learn_t0=True)
    s = np.array([0.0, 0.25, 0.5, 1.0])  # a NumPy array is accepted as odeint's t would be
    out = h(func, y0, solver=solver, times=s, reverse=reverse, **TOL)
    start, end = (0.8, 0.1) if reverse else (0.1, 0.8)
    t = start + torch.as_tensor(s) * (end - start)
    ref = solver(func, y0, t, **TOL)
    for a, b in zip(out, ref):
        assert a.shape == (4, *b.shape[1:])
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0][0], y0[0])  # row 0 is y0 itself
    for which in ("T", "t0"):  # every point of the trajectory moves with T and t0
        g, fd = _grad_and_fd(
            h,
            func,
            y0,
            which=which,
            loss=_trajectory_loss,
            solver=solver,
            times=s,
            reverse=reverse,
            **TOL,
        )
        assert abs(g - fd) < 1e-6 * abs(fd), (which, g, fd)


def test_ffjord_indexing_idiom_gives_the_final_state_of_the_whole_batch():
    """FFJORD: ``state_t = odeint(...); z_t, logp_t = tuple(s[1] for s in state_t)``."""
    torch.manual_seed(2)
    func = TupleField()
    for batch in (2, 5):
        y0 = _tuple_state(batch)
        h = LearnableHorizon(T0=0.6)
        state_t = h(func, y0, **TOL)
        z_t, logp_t, kin_t = tuple(s[1] for s in state_t)
        ref = ODEINT(func, y0, torch.tensor([0.0, 0.6]), **TOL)
        for got, want, part in zip((z_t, logp_t, kin_t), ref, y0):
            assert got.shape == part.shape  # the whole batch at T, not row 1 of an end state
            assert torch.equal(got, want[-1])
        # The regression: with an end state only, s[1] was the second sample; the leading dim is 2
        # (time).
        assert all(s.shape == (2, *p.shape) for s, p in zip(state_t, y0))


def test_output_structure_dtype_device_follow_y0(device):
    h = LearnableHorizon(T0=0.5).to(device)  # float64 by the test default
    y32 = torch.randn(3, 2, dtype=torch.float32, device=device)
    out = h(TimeMLP().float().to(device), y32)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2) and out.device == y32.device
    out[-1].sum().backward()
    assert h.T.grad is not None and h.T.grad.dtype == h.T.dtype == torch.float64
    tup = h(TupleField().to(device), _tuple_state(3, device))
    assert isinstance(tup, tuple) and [p.shape for p in tup] == [(2, 3, 2), (2, 3, 1), (2, 3, 1)]
    lst = h(TupleField().to(device), list(_tuple_state(3, device)))
    assert isinstance(lst, tuple) and len(lst) == 3


# ----------------------------------------------------------------------------- dL/dT, dL/dt0
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_dLdT_and_dLdt0_match_finite_differences(name, reverse, device):
    torch.manual_seed(1)
    func = TimeMLP().to(device)
    y0 = torch.randn(6, 2, device=device)
    h = LearnableHorizon(T0=0.4567, t0=-0.1, learn_t0=True).to(device)
    for which in ("T", "t0"):
        g, fd = _grad_and_fd(h, func, y0, which=which, reverse=reverse, **SOLVERS[name])
        assert abs(g - fd) < 1e-6 * abs(fd), (which, g, fd)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", ["odeint-dopri5", "adjoint-dopri5", "odeint-rk4-grid"])
def test_tuple_state_three_parts(name, reverse, device):
    torch.manual_seed(2)
    func = TupleField().to(device)
    h = LearnableHorizon(T0=0.8, t0=0.1, learn_t0=True).to(device)
    y0 = _tuple_state(device=device)
    for which in ("T", "t0"):
        g, fd = _grad_and_fd(h, func, y0, which=which, reverse=reverse, **SOLVERS[name])
        assert abs(g - fd) < 1e-6 * abs(fd), (which, g, fd)


@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
def test_closed_form_linear_ode(solver, device):
    """y(T) = expm(A (T - t0)) y0, so dL/dT = c^T A expm(A (T - t0)) y0 = -dL/dt0."""
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], device=device)
    func = Linear(A.clone()).to(device)
    y0 = torch.tensor([[1.0, -2.0]], device=device)
    c = torch.tensor([0.3, 1.7], device=device)
    T, t0 = 1.3, 0.2
    h = LearnableHorizon(T0=T, t0=t0, learn_t0=True).to(device)
    (h(func, y0, solver=solver, **TOL)[-1] @ c).sum().backward()
    dT = (c @ A @ torch.linalg.matrix_exp(A * (T - t0)) @ y0[0]).item()
    assert h.T.grad.item() == pytest.approx(dT, rel=1e-8)
    assert h.t0.grad.item() == pytest.approx(-dT, rel=1e-8)


@pytest.mark.parametrize("reverse", [False, True])
def test_closed_form_time_dependent_field(reverse, device):
    """dy/dt = t y: y(T) = y0 exp((T^2 - t0^2) / 2); forward L = y(T): dL/dT = T y(T), dL/dt0 = -t0
    y(T).
    """
    h = LearnableHorizon(T0=1.1, t0=0.3, learn_t0=True).to(device)
    y0 = torch.tensor([0.7], device=device)
    y = h(lambda t, y: t * y, y0, reverse=reverse, **TOL)[-1]
    y.sum().backward()
    sign = -1 if reverse else 1  # backwards from y(T) = 0.7: y(t0) = 0.7 exp(-(T^2 - t0^2) / 2)
    end = 0.7 * math.exp(sign * (1.1**2 - 0.3**2) / 2)
    assert y.item() == pytest.approx(end, rel=1e-9)
    assert h.T.grad.item() == pytest.approx(sign * 1.1 * end, rel=1e-9)
    assert h.t0.grad.item() == pytest.approx(-sign * 0.3 * end, rel=1e-9)


# gradcheck on (T, y0) for every torchdiffeq method: (solver settings, finite-difference step,
# atol). The finite difference of an adaptive solve is noisy (a perturbation changes the accepted
# steps, the value jumps by about the tolerance), so the low-order methods take a larger step and a
# looser atol; on a step_size grid the last, partial step makes the discrete dy(T)/dT differ from
# F(T, y(T)) by O(h^p), hence euler's finer grid and looser atol. Excluded: scipy_solver (not
# differentiable) and fixed_adams (an alias of implicit_adams).
GRADCHECK = {
    "dopri5": (dict(rtol=1e-12, atol=1e-12), 1e-4, 1e-7),
    "dopri8": (dict(rtol=1e-12, atol=1e-12), 1e-2, 2e-6),
    "bosh3": (dict(rtol=1e-10, atol=1e-10), 1e-2, 3e-5),
    "fehlberg2": (dict(rtol=1e-9, atol=1e-9), 1e-2, 1e-5),
    "adaptive_heun": (dict(rtol=1e-7, atol=1e-7), 1e-2, 5e-6),
    "euler": (dict(options=dict(step_size=1e-3)), 1e-6, 5e-5),
    "midpoint": (dict(options=dict(step_size=1e-2)), 1e-6, 1e-6),
    "heun2": (dict(options=dict(step_size=1e-2)), 1e-6, 1e-6),
    "heun3": (dict(options=dict(step_size=1e-2)), 1e-6, 1e-6),
    "rk4": (dict(options=dict(step_size=1e-2)), 1e-6, 1e-6),
    "explicit_adams": (dict(options=dict(step_size=1e-2)), 1e-6, 2e-6),
    "implicit_adams": (dict(options=dict(step_size=1e-2)), 1e-6, 2e-6),
}


def _gradcheck(method: str, solver=ODEINT, reverse: bool = False) -> bool:
    torch.manual_seed(4)
    func = TimeMLP(hidden=4)
    kw, eps, atol = GRADCHECK[method]
    h = LearnableHorizon(T0=0.35, t0=0.1)

    def fn(T, y0):
        return functional_call(
            h, {"T": T}, (func, y0), dict(solver=solver, reverse=reverse, method=method, **kw)
        )

    inputs = (torch.tensor(0.35, requires_grad=True), torch.randn(1, 2, requires_grad=True))
    return torch.autograd.gradcheck(fn, inputs, eps=eps, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(GRADCHECK))
def test_gradcheck_every_method(method):
    assert _gradcheck(method)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_gradcheck_both_directions_and_backends(method, solver, reverse):
    assert _gradcheck(method, solver, reverse)


def test_gradcheck_learned_t0_and_tuple_state():
    torch.manual_seed(5)
    func = TupleField(hidden=4)
    h = LearnableHorizon(T0=0.6, t0=0.1, learn_t0=True)

    def fn(T, t0, z):
        return functional_call(
            h, {"T": T, "t0": t0}, (func, (z, torch.zeros(2, 1), torch.zeros(2, 1))), dict(**TOL)
        )

    inputs = (
        torch.tensor(0.6, requires_grad=True),
        torch.tensor(0.1, requires_grad=True),
        torch.randn(2, 2, requires_grad=True),
    )
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-4, atol=1e-7, rtol=1e-5)


def _time_dropping_solver(func, y0, t, **kw):
    """A backend that would differentiate time itself, were t in the graph."""
    assert not t.requires_grad, "the horizon must hand the backend a detached grid"
    return ODEINT(func, y0, t, **kw)


@pytest.mark.parametrize("reverse", [False, True])
def test_no_double_counting(reverse):
    """dL/dT is torchdiffeq's own time gradient once, not twice: the backend gets a
    detached grid.
    """
    torch.manual_seed(5)
    func = TimeMLP()
    y0 = torch.randn(4, 2)
    grads = []
    for solver in (ODEINT, ADJOINT, _time_dropping_solver):
        h = LearnableHorizon(T0=0.5, learn_t0=True)
        _loss(h(func, y0, solver=solver, reverse=reverse, **TOL)).backward()
        grads.append((h.T.grad.item(), h.t0.grad.item()))
    for g in grads[1:]:
        assert g == pytest.approx(grads[0], rel=1e-9)
    # torchdiffeq's own time gradient, with t handed in the graph by hand
    T, t0 = torch.tensor(0.5, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    _loss(ODEINT(func, y0, torch.stack([T, t0] if reverse else [t0, T]), **TOL)).backward()
    assert grads[0] == pytest.approx((T.grad.item(), t0.grad.item()), rel=1e-6)  # once, not twice
    assert min(abs(T.grad.item()), abs(t0.grad.item())) > 1e-2


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
def test_one_extra_evaluation_per_learned_end_point(solver, reverse):
    torch.manual_seed(8)
    func = count_nfe(TimeMLP())
    y0 = torch.randn(4, 2)
    t = torch.tensor([0.5, 0.0] if reverse else [0.0, 0.5])
    _loss(solver(func, y0, t, rtol=1e-6, atol=1e-6)).backward()
    plain = (
        func.nfe_forward,
        func.nfe_backward,
    )  # odeint: no evaluation in backward; the adjoint: its own solve
    assert (plain[1] == 0) == (solver is ODEINT)
    for learn_t0, extra in ((False, 1), (True, 2)):
        func.reset()
        h = LearnableHorizon(T0=0.5, learn_t0=learn_t0)
        _loss(h(func, y0, solver=solver, reverse=reverse, rtol=1e-6, atol=1e-6)).backward()
        assert (func.nfe_forward, func.nfe_backward) == (plain[0], plain[1] + extra)
    func.reset()
    with torch.no_grad():
        h(func, y0, solver=solver, reverse=reverse, rtol=1e-6, atol=1e-6)
    assert (func.nfe_forward, func.nfe_backward) == (plain[0], 0)
    func.reset()  # a frozen T needs no extra evaluation either
    frozen = LearnableHorizon(T0=0.5).requires_grad_(False)
    _loss(
        frozen(func, y0.requires_grad_(), solver=solver, reverse=reverse, rtol=1e-6, atol=1e-6)
    ).backward()
    assert func.nfe_backward == plain[1]


def test_fixed_step_taylor_remainder_is_second_order():
    """|L(T + h) - L(T) - h dL/dT| = O(h^2) on a fixed rk4 grid: the slope of log remainder over
    log h is 2.
    """
    torch.manual_seed(7)
    func = TimeMLP()
    y0 = torch.randn(5, 2)
    hz = LearnableHorizon(T0=0.5)
    kw = dict(method="rk4", options=dict(step_size=0.01))
    _loss(hz(func, y0, **kw)).backward()
    g = hz.T.grad.item()
    steps = torch.tensor([0.04, 0.02, 0.01, 0.005])
    rems = []
    with torch.no_grad():
        L0 = _loss(hz(func, y0, **kw)).item()
        for s in steps.tolist():
            hz.T.fill_(0.5 + s)
            rems.append(abs(_loss(hz(func, y0, **kw)).item() - L0 - s * g))
    x, y = steps.log(), torch.tensor(rems).log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
    assert 1.9 < slope.item() < 2.1, (slope, rems)


@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
def test_weight_gradients_unchanged_by_learning_T(solver):
    torch.manual_seed(9)
    func = TimeMLP()
    y0 = torch.randn(4, 2)
    h = LearnableHorizon(T0=0.5, learn_t0=True)
    _loss(h(func, y0, solver=solver, rtol=1e-5, atol=1e-5)).backward()
    ours = [p.grad.clone() for p in func.parameters()]
    func.zero_grad()
    _loss(solver(func, y0, torch.tensor([0.0, 0.5]), rtol=1e-5, atol=1e-5)).backward()
    for a, p in zip(ours, func.parameters()):
        assert torch.equal(a, p.grad)


def test_every_parameter_gets_a_gradient():
    func = TupleField()
    for h in (
        LearnableHorizon(T0=0.5, learn_t0=True),
        LearnableHorizon(T0=0.5, learn_T=True, learn_t0=True, budget=3),
    ):
        func.zero_grad()
        _loss(h(func, _tuple_state(3))).backward()
        for name, p in [*func.named_parameters(), *h.named_parameters()]:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
        assert set(dict(h.named_parameters())) == {
            "T",
            "t0",
        }  # a budget's placement and size are buffers
        assert set(dict(h.named_buffers())) == (
            {"budget.placement", "budget.n_steps", "budget.retired"} if h.budget else set()
        )
    assert not LearnableHorizon(
        budget=2
    ).T.requires_grad  # on a budget T is fixed unless learn_T=True


def test_repr_bounds_and_parameters():
    h = LearnableHorizon(T0=0.5, t0=0.0, eps=0.1)
    assert h.bounds == pytest.approx((0.1, 0.9)) and isinstance(h.bounds[0], float)
    assert repr(h) == "LearnableHorizon(T=0.5, t0=0, bounds=(0.1, 0.9))"
    assert isinstance(h.T, torch.nn.Parameter) and h.T.dim() == 0
    assert "t0" in dict(h.named_buffers()) and "t0" not in dict(h.named_parameters())
    assert h.budget is None
    removed = (
        "placement",
        "n_steps",
        "set_budget",
        "max_budget",
        "fractions",
        "error",
        "fit",
        "reference",
        "method",
        "last_input",
        "guarded",
        "T0",
    )  # 0.3's horizon attributes, now the Budget's (T0: T_init)
    assert [name for name in removed if hasattr(h, name)] == []
    assert (h.T_init, h.t0_init) == (0.5, 0.0)
    h2 = LearnableHorizon(T0=1.0, learn_t0=True, budget=Budget(4, method="midpoint"))
    assert "t0" in dict(h2.named_parameters())
    assert repr(h2) == (
        "LearnableHorizon(\n  T=1, t0=0, bounds=(0.1, 1.9)\n"
        "  (budget): Budget(steps=4, method='midpoint', gradient='backprop')\n)"
    )
    assert "reference={'rtol': 1e-09}" in repr(
        LearnableHorizon(budget=Budget(2, reference=dict(rtol=1e-9)))
    )


def test_state_dict_round_trip():
    h = LearnableHorizon(T0=0.5, learn_t0=True, budget=3)
    with torch.no_grad():
        h.T.fill_(0.3)
        h.t0.fill_(-0.05)
        h.budget.placement[:3] = torch.tensor([0.2, -0.1, 0.4])
    assert set(h.state_dict()) == {
        "T",
        "t0",
        "budget.placement",
        "budget.n_steps",
        "budget.retired",
    }
    other = LearnableHorizon(T0=0.5, learn_t0=True, budget=3)
    other.load_state_dict(h.state_dict())
    for k, v in h.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    plain = LearnableHorizon(T0=0.7, eps=0.2)
    plain.load_state_dict(LearnableHorizon(T0=0.7, eps=0.2).state_dict())
    assert plain.bounds == pytest.approx(
        (0.2, 1.2)
    )  # bounds come from the constructor, not the checkpoint


def test_half_keeps_time_in_float32():
    h = LearnableHorizon(T0=0.5123, learn_t0=True, budget=2).half()
    assert h.T.dtype == h.t0.dtype == h.budget.placement.dtype == torch.float32
    assert h.T.item() == pytest.approx(0.5123, rel=1e-7)  # float16 would round it to 0.5122
    h.double()
    assert h.T.dtype == torch.float64
    y = LearnableHorizon(T0=0.5123).half()(
        lambda t, y: -y,
        torch.ones(3, dtype=torch.float16),
        method="rk4",
        options=dict(step_size=0.125),
    )
    assert y.dtype == torch.float16


def test_numpy_scalars_and_bools_are_accepted():
    h = LearnableHorizon(
        T0=np.float32(0.5),
        t0=np.float64(0.0),
        eps=np.float32(0.125),
        learn_t0=np.bool_(True),
        budget=np.int64(3),
    )
    assert (
        h.T.item() == 0.5
        and h.learn_t0 is True
        and h.budget.steps == 3
        and h.bounds == (0.125, 0.875)
    )
    h.budget.steps = np.int32(4)
    assert h.budget.steps == 4 and type(h.budget.steps) is int
    b = Budget(np.int64(2), max_steps=np.int32(8))
    assert (b.steps, b.max_steps) == (2, 8)
    y = h(lambda t, y: -y, torch.ones(2), reverse=np.True_, times=np.array([0.0, 0.5, 1.0]))
    assert y.shape == (3, 2)
    assert y[-1][0].item() == pytest.approx(
        math.exp(0.5), rel=1e-4
    )  # dy/dt = -y from T = 0.5 back to t0 = 0
    LearnableHorizon(T0=np.int64(2), t0=np.int32(1))


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
    assert h.clip_()
    assert h.T.item() == 0.2 and h.t0.item() == pytest.approx(0.1)  # t0 <= min(T0, T) - eps
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
    y[-1].sum().backward()
    assert calls and not calls[0].requires_grad
    assert h.T.grad.item() == pytest.approx(-2 * math.exp(-0.5), rel=1e-3)


def test_solver_returning_only_final_state_is_refused():
    h = LearnableHorizon(T0=0.5)
    with pytest.raises(ValueError, match="solution at each of the 2 times"):
        h(lambda t, y: -y, torch.ones(3), solver=lambda f, y0, t: y0)


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
    vals = [
        _loss(ODEINT(field, y0, torch.tensor([0.0, T]), **TOL)).item()
        for T in (0.3 + 1e-4, 0.3 - 1e-4)
    ]
    assert h.T.grad.item() == pytest.approx((vals[0] - vals[1]) / 2e-4, rel=1e-6)


class _GradPatternField(torch.nn.Module):
    """A CNF field in FFJORD's idiom: it makes its input require grad and differentiates through
    it.
    """

    def __init__(self, idiom: str) -> None:
        super().__init__()
        self.idiom = idiom
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
        ).double()

    def forward(self, t, state):
        z = state[0]
        with torch.enable_grad():
            if self.idiom == "ffjord":
                z.requires_grad_(True)
            else:
                z = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1)], dim=1))
            div = sum(
                torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i]
                for i in range(2)
            )
        return dz, -div[:, None]


@pytest.mark.parametrize("idiom", ["ffjord", "requires-grad-or-detach"])
@pytest.mark.parametrize("reverse, learn_t0", [(True, False), (False, True)])
def test_a_learned_start_time_with_the_adjoint_and_a_field_that_needs_grad_of_its_input(
    idiom, reverse, learn_t0
):
    # The learned start time puts y0 in the graph; the adjoint's forward solve (under no_grad) must
    # still hand the field a state it can differentiate through, and the gradients equal backprop
    # through the solver.
    torch.manual_seed(0)
    field = _GradPatternField(idiom)
    z = torch.randn(6, 2, dtype=torch.float64)
    grads = []
    for solver in (torchdiffeq.odeint, torchdiffeq.odeint_adjoint):
        h = LearnableHorizon(T0=1.0, learn_t0=learn_t0).double()
        x, logq = h(
            field,
            (z, torch.zeros(6, 1, dtype=torch.float64)),
            reverse=reverse,
            solver=solver,
            rtol=1e-10,
            atol=1e-10,
        )
        (x[-1].pow(2).sum() + logq[-1].sum()).backward()
        grads.append(
            [h.T.grad.clone(), *(p.grad.clone() for p in field.parameters())]
            + ([h.t0.grad.clone()] if learn_t0 else [])
        )
        field.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
