"""Budget: step counts per gradient mode, eval() scoring with the reference, the discrete and
continuous dL/dT, placement, fit, the guard."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch
import torchdiffeq
from fields import Pulse, Stiff, TimeMLP, TupleField
from torch import nn

from torch_tempopt import (
    Budget,
    BudgetGuard,
    CoordinateDescentStepper,
    LearnableHorizon,
    count_nfe,
)
from torch_tempopt.budget import DEFAULT_REFERENCE, GRADIENTS

ODEINT, ADJOINT = torchdiffeq.odeint, torchdiffeq.odeint_adjoint
STAGES = {"euler": 1, "midpoint": 2, "heun3": 3, "rk4": 4}
REF = dict(rtol=1e-10, atol=1e-10)


def _loss(out) -> torch.Tensor:
    parts = out if isinstance(out, tuple) else (out,)
    return sum((0.5 + i) * (p[-1].pow(2).sum() + p[-1].sin().sum()) for i, p in enumerate(parts))


def _skewed(h: LearnableHorizon, seed: int = 0) -> LearnableHorizon:
    n = h.budget.steps
    with torch.no_grad():
        h.budget.placement[:n] = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return h


def _grid(h: LearnableHorizon, reverse: bool) -> torch.Tensor:
    t0, T = h.t0.detach(), h.T.detach()
    grid = t0 + h.budget.fractions().detach() * (T - t0)
    return grid.flip(0) if reverse else grid


def _ends(h: LearnableHorizon, reverse: bool = False) -> torch.Tensor:
    """The ``t`` of Budget.error and Budget.fit for a horizon's interval."""
    t = torch.stack([h.t0, h.T]).detach()
    return t.flip(0) if reverse else t


# ----------------------------------------------------------------------------- the solve
@pytest.mark.parametrize("method", sorted(STAGES))
def test_evaluations_per_solve_are_stages_times_budget(method):
    """Backprop through the steps (the default): N k evaluations forward, none in backward,
    whatever the solver.
    """
    torch.manual_seed(0)
    func = count_nfe(TimeMLP())
    y0 = torch.randn(4, 2)
    n, k = 5, STAGES[method]
    h = LearnableHorizon(
        T0=0.7,
        learn_T=True,
        learn_t0=True,
        budget=Budget(n, method=method, reference=dict(rtol=1e-9)),
    )
    # the call may name any adaptive solve (a call that reads the same with and without a budget):
    # the steps stay N
    _loss(h(func, y0, method="dopri5", rtol=1e-9)).backward()
    assert (func.nfe_forward, func.nfe_backward) == (
        n * k,
        0,
    )  # the grid is in the graph, nothing extra
    for reverse in (
        False,
        True,
    ):  # odeint_adjoint named, as FFJORD names it: still backprop through the steps
        func.reset()
        _loss(h(func, y0, solver=ADJOINT, reverse=reverse)).backward()
        assert (func.nfe_forward, func.nfe_backward) == (n * k, 0)
    func.reset()
    with torch.no_grad():
        h(func, y0, times=[0.0, 0.3, 1.0])  # 0.3 is not on the uniform grid: one more step
    assert (func.nfe_forward, func.nfe_backward) == ((n + 1) * k, 0)


@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
@pytest.mark.parametrize("method", sorted(STAGES))
def test_the_adjoint_on_the_steps_is_opt_in_and_evaluates_as_in_0_3(method, solver):
    """Budget(n, gradient="adjoint"): the adjoint solved backward on the same steps, whatever
    solver the call names.
    """
    torch.manual_seed(0)
    func = count_nfe(TimeMLP())
    y0 = torch.randn(4, 2)
    n, k = 5, STAGES[method]
    h = LearnableHorizon(T0=0.7, learn_T=True, budget=Budget(n, method=method, gradient="adjoint"))
    _loss(h(func, y0, solver=solver)).backward()
    assert (func.nfe_forward, func.nfe_backward) == (
        n * k,
        n * k + 1,
    )  # the adjoint's own steps, and dL/dT
    func.reset()
    h.t0.requires_grad_(True)
    _loss(h(func, y0, solver=solver, reverse=True)).backward()
    assert (func.nfe_forward, func.nfe_backward) == (n * k, n * k + 2)  # dL/dT and dL/dt0
    func.reset()
    with torch.no_grad():
        h(func, y0, solver=solver, times=[0.0, 0.3, 1.0])
    assert (func.nfe_forward, func.nfe_backward) == ((n + 1) * k, 0)


@pytest.mark.parametrize("method", sorted(STAGES))
def test_checkpointed_steps_are_recomputed_once_in_backward(method):
    """Budget(n, gradient="checkpoint"): each step is evaluated again in backward, N k, and dL/dt
    costs nothing more.
    """
    torch.manual_seed(0)
    func = count_nfe(TimeMLP())
    y0 = torch.randn(4, 2)
    n, k = 5, STAGES[method]
    h = LearnableHorizon(
        T0=0.7, learn_T=True, learn_t0=True, budget=Budget(n, method=method, gradient="checkpoint")
    )
    for solver, reverse in ((ODEINT, False), (ADJOINT, True)):
        func.reset()
        _loss(h(func, y0, solver=solver, reverse=reverse)).backward()
        assert (func.nfe_forward, func.nfe_backward) == (n * k, n * k)
    func.reset()
    with torch.no_grad():
        h(func, y0, times=[0.0, 0.3, 1.0])
    assert (func.nfe_forward, func.nfe_backward) == ((n + 1) * k, 0)


@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gradient", GRADIENTS)
def test_output_is_odeint_on_the_explicit_grid(reverse, solver, gradient):
    torch.manual_seed(1)
    func, y0 = TupleField(), (torch.randn(3, 2), torch.zeros(3, 1), torch.zeros(3, 1))
    h = _skewed(LearnableHorizon(T0=0.9, t0=0.1, budget=Budget(4, gradient=gradient)))
    out = h(func, y0, solver=solver, reverse=reverse)
    ref = ODEINT(func, y0, _grid(h, reverse), method="rk4")
    for a, b in zip(out, ref):
        assert a.shape == (2, *b.shape[1:])
        torch.testing.assert_close(a, b[[0, -1]], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("reverse", [False, True])
def test_times_off_the_grid_add_steps(reverse):
    torch.manual_seed(2)
    func, y0 = TimeMLP(), torch.randn(3, 2)
    h = _skewed(LearnableHorizon(T0=0.9, t0=0.1, budget=3))
    s = torch.tensor([0.0, 0.3, 0.65, 1.0])
    out = h(func, y0, times=s, reverse=reverse)
    u = h.budget.fractions().detach()
    wanted = (1 - s).flip(0) if reverse else s
    v = torch.sort(torch.cat([u, wanted[1:-1]])).values
    grid = 0.1 + v * 0.8
    ref = ODEINT(func, y0, grid.flip(0) if reverse else grid, method="rk4")
    rows = [int(torch.nonzero(v == w)) for w in wanted]
    rows = [len(v) - 1 - r for r in rows][::-1] if reverse else rows
    assert out.shape == (4, 3, 2)
    torch.testing.assert_close(out, ref[rows], rtol=1e-13, atol=1e-13)


def test_eval_scores_with_the_reference_and_budgeted_overrides_the_mode():
    func, y0 = TimeMLP(), torch.randn(3, 2)
    h = LearnableHorizon(T0=0.6, budget=Budget(2, reference=REF))
    exact = ODEINT(func, y0, torch.tensor([0.0, 0.6]), **REF)
    steps = ODEINT(func, y0, torch.tensor([0.0, 0.3, 0.6]), method="rk4")[[0, -1]]
    assert torch.equal(h(func, y0), steps)  # train(): the budget
    assert torch.equal(h.eval()(func, y0), exact)  # eval(): the reference, like dropout off
    with h.budgeted():  # cheap sampling from a model in eval()
        assert torch.equal(h(func, y0), steps)
    with h.train().budgeted(False):
        assert torch.equal(h(func, y0), exact)
    assert torch.equal(h(func, y0), steps)


# a call's settings, and the reference that a budget without one of its own takes from them
CALLS = {
    "none": ({}, {}),  # torchdiffeq's own defaults: dopri5 at rtol=1e-7, atol=1e-9
    "dopri8": (
        dict(method="dopri8", rtol=1e-9, atol=1e-9),
        dict(method="dopri8", rtol=1e-9, atol=1e-9),
    ),
    "rtol-only": (
        dict(rtol=1e-3),
        dict(rtol=1e-3),
    ),  # as odeint reads it: dopri5 at rtol=1e-3, its default atol
    "bosh3-options": (
        dict(method="bosh3", options=dict(max_num_steps=500)),
        dict(method="bosh3", options=dict(max_num_steps=500)),
    ),
    "rk4-grid": (
        dict(method="rk4", options=dict(step_size=0.1)),
        DEFAULT_REFERENCE,
    ),  # a fixed grid: dopri5 at 1e-5
    "euler": (dict(method="euler"), DEFAULT_REFERENCE),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_calls_adaptive_settings_are_the_reference(name):
    """0.3 refused a call whose settings differed from the reference; 0.4 scores with them (unless
    the budget names one).
    """
    settings, reference = CALLS[name]
    assert Budget(2).reference_for(settings) == reference
    assert Budget(2, reference=REF).reference_for(settings) == REF  # an explicit reference wins
    func, y0 = TimeMLP(), torch.randn(3, 2)
    h = LearnableHorizon(T0=0.6, budget=2)
    steps = ODEINT(func, y0, torch.tensor([0.0, 0.3, 0.6]), method="rk4")[[0, -1]]
    assert torch.equal(
        h(func, y0, **settings), steps
    )  # train(): the budget's steps, whatever the call names
    t = torch.tensor([0.0, 0.6])
    assert torch.equal(h.eval()(func, y0, **settings), ODEINT(func, y0, t, **reference))
    with h.budgeted():
        assert torch.equal(h(func, y0, **settings), steps)
    h.budget.reference = REF
    assert torch.equal(h(func, y0, **settings), ODEINT(func, y0, t, **REF))


def test_the_call_solves_the_reference_with_its_own_solver():
    """In eval() the reference is solved by the solver the call names, with the call's other
    settings.
    """
    torch.manual_seed(0)
    func, y0 = count_nfe(TimeMLP()), torch.randn(3, 2)
    h = LearnableHorizon(T0=0.6, learn_T=True, budget=2).eval()
    _loss(
        h(func, y0, solver=ADJOINT, rtol=1e-8, atol=1e-8, adjoint_rtol=1e-4, adjoint_atol=1e-4)
    ).backward()
    forward, backward = func.nfe_forward, func.nfe_backward
    func.reset()
    _loss(
        ADJOINT(
            func,
            y0,
            torch.tensor([0.0, 0.6]),
            rtol=1e-8,
            atol=1e-8,
            adjoint_rtol=1e-4,
            adjoint_atol=1e-4,
        )
    ).backward()
    assert (forward, backward) == (
        func.nfe_forward,
        func.nfe_backward + 1,
    )  # the adjoint's solve, and dL/dT


def test_the_guard_checks_against_the_recorded_calls_settings():
    torch.manual_seed(0)
    func, y0 = TimeMLP(), torch.randn(6, 2)
    with torch.no_grad():
        for p in func.parameters():
            p.mul_(3.0)

    def checked(budget: Budget, **settings) -> list[float]:
        h = LearnableHorizon(T0=0.8, budget=budget)
        guard = BudgetGuard([h], every=1, tol=10.0, fit_steps=0)
        h(func, y0, **settings)  # a training call: recorded, with its settings, for the guard
        assert h.budget.last_input.settings == settings and torch.equal(h.budget.last_input.y0, y0)
        guard.step()
        return guard.stats["errors"][0]

    t = torch.tensor([0.0, 0.8])
    loose, tight = dict(method="bosh3", rtol=1e-3, atol=1e-3), dict(method="dopri8", **REF)
    expected = {
        name: Budget(2).error(func, y0, t, **kw).tolist()
        for name, kw in (("loose", loose), ("tight", tight))
    }
    assert expected["loose"] != expected["tight"]  # the check below can tell the two apart
    assert checked(Budget(2), **loose) == expected["loose"]
    assert checked(Budget(2), **tight) == expected["tight"]
    assert (
        checked(Budget(2, reference=tight), **loose) == expected["tight"]
    )  # the budget's reference wins
    fixed = Budget(2).error(func, y0, t, **DEFAULT_REFERENCE).tolist()
    assert checked(Budget(2), method="rk4", options=dict(step_size=0.1)) == fixed


@pytest.mark.parametrize("reverse", [False, True])
def test_the_recorded_batch_is_the_last_training_call_and_error_solves_in_its_direction(reverse):
    torch.manual_seed(0)
    func, y0 = TimeMLP(), torch.randn(5, 2)
    h = LearnableHorizon(T0=0.8, t0=0.1, learn_T=True, budget=2)
    assert h.budget.last_input is None
    with torch.no_grad():
        h(func, y0)  # no gradients: not a training call
    h.eval()(func, y0.requires_grad_())  # the reference's solve: not a budgeted call
    assert h.budget.last_input is None
    out = h.train()(func, y0, reverse=reverse, rtol=1e-9, atol=1e-9)
    f, x, t, settings = h.budget.last_input
    assert (
        f is func
        and torch.equal(x, y0)
        and not x.requires_grad
        and settings == dict(rtol=1e-9, atol=1e-9)
    )
    assert t.tolist() == ([0.8, 0.1] if reverse else [0.1, 0.8]) and not t.requires_grad
    err = h.budget.error(f, x, t, **settings)
    ref = ODEINT(func, y0.detach(), t, rtol=1e-9, atol=1e-9)[-1]
    torch.testing.assert_close(
        err, ((out[-1] - ref).abs().sum() / y0.numel())[None], rtol=1e-12, atol=0
    )


def test_reference_is_checked_and_completed():
    assert Budget(2, reference=dict(rtol=1e-3)).reference == {"rtol": 1e-3}  # as odeint reads it
    assert Budget(2).reference is None  # the call's: Budget.reference_for
    assert DEFAULT_REFERENCE == {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}
    assert Budget(2).reference_for(dict(rtol=1e-3, adjoint_rtol=1e-2, adjoint_params=())) == {
        "rtol": 1e-3
    }
    with pytest.raises(
        ValueError, match="reference's method must be one of torchdiffeq's adaptive.*got 'euler'"
    ):
        Budget(2, reference=dict(method="euler"))  # a fixed-step reference scores nothing honestly
    with pytest.raises(ValueError, match="got 'bogus'"):
        Budget(2, reference=dict(method="bogus"))
    with pytest.raises(TypeError, match="reference must be None or a dict of .*got 'dopri5'"):
        Budget(2, reference="dopri5")
    with pytest.raises(TypeError, match="reference must be None or a dict of .*'step_size'"):
        Budget(2, reference=dict(step_size=0.1))
    budget, given = Budget(2), dict(method="dopri8")
    budget.reference = given
    # the budget keeps a copy: a later change of the caller's dict is not its reference
    given["method"] = "euler"
    assert budget.reference == {"method": "dopri8"}
    with pytest.raises(ValueError, match="got 'rk4'"):
        budget.reference = dict(method="rk4")
    assert budget.reference == {"method": "dopri8"}


def test_select_must_return_parts():
    budget, t = Budget(2), torch.tensor([0.0, 0.6])
    func, y0 = TimeMLP(dim=4), torch.randn(16, 4)
    assert budget.error(func, y0, t, select=lambda s: (s[..., :3],)).shape == (1,)
    with pytest.raises(TypeError, match="select must return a tuple of tensors"):
        budget.error(func, y0, t, select=lambda s: s[..., :3])


# ----------------------------------------------------------------------------- dL/dT on a budget
@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_odeint_dLdT_is_the_derivative_of_what_is_computed(n, reverse, gradient):
    torch.manual_seed(3)
    func, y0 = TimeMLP(), torch.randn(4, 2)
    h = _skewed(
        LearnableHorizon(
            T0=0.7, t0=0.1, learn_T=True, learn_t0=True, budget=Budget(n, gradient=gradient)
        ),
        seed=n,
    )
    _loss(h(func, y0, reverse=reverse)).backward()
    for p in (h.T, h.t0):
        x, vals = p.item(), []
        with torch.no_grad():
            for s in (1e-4, -1e-4):
                p.fill_(x + s)
                vals.append(_loss(h(func, y0, reverse=reverse)).item())
            p.fill_(x)
        fd = (vals[0] - vals[1]) / 2e-4
        assert abs(p.grad.item() - fd) < 1e-7 * abs(fd), (p.grad.item(), fd)


def _dLdT_both(n: int, reverse: bool) -> tuple[float, float, float, float]:
    """dL/dT through the steps (odeint, then odeint_adjoint named), with gradient="adjoint", and
    the continuous formula computed by hand."""
    torch.manual_seed(4)
    func, y0 = TimeMLP(), torch.randn(4, 2)
    discrete = []
    for solver in (ODEINT, ADJOINT):
        h = LearnableHorizon(T0=0.7, t0=0.1, budget=n, learn_T=True)
        _loss(h(func, y0, reverse=reverse, solver=solver)).backward()
        discrete.append(h.T.grad.item())
    h = LearnableHorizon(T0=0.7, t0=0.1, budget=Budget(n, gradient="adjoint"), learn_T=True)
    y0 = y0.clone().requires_grad_()
    out = h(func, y0, reverse=reverse)
    _loss(out).backward()
    T = h.T.detach()
    with torch.no_grad():
        if reverse:  # T is the start: -<a(T), F(T, y0)> with the adjoint a(T) = dL/dy0
            formula = -(y0.grad * func(T, y0)).sum().item()
        else:  # <dL/dy(T), F(T, y(T))>
            end = out[-1].detach().requires_grad_()
            with torch.enable_grad():
                (a,) = torch.autograd.grad(_loss(end[None]), end)
            formula = (a * func(T, end)).sum().item()
    return *discrete, h.T.grad.item(), formula


@pytest.mark.parametrize("reverse", [False, True])
def test_adjoint_dLdT_is_the_continuous_formula_within_h4_of_the_discrete(reverse):
    ns = [4, 8, 16, 32]
    gaps = []
    for n in ns:
        discrete, discrete_named_adjoint, adjoint, formula = _dLdT_both(n, reverse)
        assert (
            discrete_named_adjoint == discrete
        )  # naming odeint_adjoint does not change the gradient on a budget
        assert adjoint == pytest.approx(formula, rel=1e-12, abs=1e-14)
        gaps.append(abs(adjoint - discrete))
    x, y = torch.tensor(ns, dtype=torch.float64).log(), torch.tensor(gaps).log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
    assert -4.3 < slope.item() < -3.7, gaps  # rk4: the two derivatives differ by O(h^4)


# ----------------------------------------------------------------------------- placement
def test_fractions_increase_from_exactly_0_to_exactly_1():
    h = LearnableHorizon(budget=7)
    torch.testing.assert_close(h.budget.fractions(), torch.linspace(0, 1, 8), rtol=0, atol=1e-15)
    for n in range(
        1, 13
    ):  # a cumulative sum of the step lengths alone ends at 1 +- 2e-16 for most of these
        h.budget.steps = n
        for scale in (0.0, 1.0, 10.0, 40.0):
            _skewed(h, seed=n)
            with torch.no_grad():
                h.budget.placement.mul_(scale)
            u = h.budget.fractions()
            assert u[0].item() == 0.0 and u[-1].item() == 1.0 and u.shape == (n + 1,)
            assert bool((u[1:] >= u[:-1]).all())


def test_fit_steps_the_placement_down_the_finite_difference_gradient_of_the_error():
    torch.manual_seed(5)
    func, y0 = TupleField(), (torch.randn(4, 2), torch.zeros(4, 1), torch.zeros(4, 1))
    h = _skewed(LearnableHorizon(T0=0.8, budget=Budget(3, reference=REF)))
    b, t = h.budget, _ends(h)
    start, fd = b.placement[:3].clone(), []
    for i in range(3):
        vals = []
        for s in (1e-6, -1e-6):
            with torch.no_grad():
                b.placement[i] += s
                vals.append(b.error(func, y0, t).sum().item())
                b.placement[i] -= s
        fd.append((vals[0] - vals[1]) / 2e-6)
    before, after = b.fit(func, y0, t, steps=1, lr=1e-3)  # Adam's first step: -lr g / (|g| + 1e-8)
    g = torch.tensor(fd)
    want, step = -1e-3 * g / (g.abs() + 1e-8), b.placement[:3] - start
    # the logits are re-centred after fitting: compare the steps up to a common shift
    torch.testing.assert_close(step - step.mean(), want - want.mean(), rtol=0, atol=1e-8)
    assert after.sum() < before.sum() and h.T.grad is None  # fit moves nothing but the placement


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
def test_the_training_loss_never_reaches_the_placement(solver, gradient):
    func = TimeMLP()
    h = _skewed(LearnableHorizon(T0=0.8, budget=Budget(3, gradient=gradient), learn_T=True))
    before = h.budget.placement.clone()
    _loss(h(func, torch.randn(4, 2), solver=solver)).backward()
    assert not h.budget.placement.requires_grad and torch.equal(
        h.budget.placement, before
    )  # a buffer, fit() fits it
    assert [n for n, _ in h.named_parameters()] == ["T"] and h.T.grad.abs() > 0


def test_setting_steps_keeps_the_density_in_place():
    h = LearnableHorizon(budget=Budget(3, max_steps=16))
    b = h.budget
    old = b.placement
    b.steps = 5
    assert (
        b.placement is old and old.shape == (16,) and b.steps == 5 and b.max_steps == 16
    )  # no new tensor
    torch.testing.assert_close(
        b.fractions(), torch.linspace(0, 1, 6), rtol=0, atol=1e-7
    )  # uniform stays uniform
    _skewed(h)
    before = b.fractions().detach().double()
    b.steps = 10
    after = b.fractions().detach().double()
    torch.testing.assert_close(
        after[::2], before, rtol=0, atol=1e-6
    )  # old boundaries kept when doubling
    torch.testing.assert_close(
        after[1::2], (before[1:] + before[:-1]) / 2, rtol=0, atol=1e-6
    )  # halves
    with pytest.raises(ValueError, match="at most max_steps=16"):
        b.steps = 17
    assert b.steps == 10 and h.budget is b


def test_state_dict_with_a_larger_budget_loads():
    six = _skewed(LearnableHorizon(T0=0.8, budget=6))
    four = LearnableHorizon(T0=0.8, budget=4)
    four.load_state_dict(six.state_dict())
    assert four.budget.steps == 6 and torch.equal(four.budget.fractions(), six.budget.fractions())


def test_fit_learns_a_placement_that_beats_uniform():
    torch.manual_seed(6)
    func, y0 = Pulse(), torch.randn(8, 2)
    h = LearnableHorizon(T0=1.0, budget=Budget(4, reference=REF))
    b, t = h.budget, _ends(h)
    uniform = b.error(func, y0, t).detach()
    T = h.T.detach().clone()
    before, after = b.fit(func, y0, t, steps=60, lr=0.1)
    torch.testing.assert_close(before, uniform)
    assert after.item() < uniform.item() / 10, (uniform, after)
    torch.testing.assert_close(after, b.error(func, y0, t).detach())
    u = b.fractions().detach()
    assert (u[-1] - u[-2]) < 0.25 and (
        u[1] - u[0]
    ) > 0.25  # steps moved towards the pulse at t = 0.9
    assert torch.equal(h.T, T) and all(p.grad is None for p in func.parameters())


def test_one_step_has_nothing_to_fit_and_the_guard_grows_it():
    """budget=1 crashed the guard and fit in 0.2 (a single fraction is constant under
    the softmax).
    """
    func, y0 = Stiff(k=12.0), torch.randn(6, 2)
    h = LearnableHorizon(T0=1.0, budget=1)
    before, after = h.budget.fit(func, y0, _ends(h), steps=5)
    assert torch.equal(before, after) and torch.equal(
        h.budget.fractions(), torch.tensor([0.0, 1.0])
    )
    guard = BudgetGuard([h], every=1, tol=1e-2)
    h(func, y0)
    with pytest.warns(RuntimeWarning, match="the 1-step rk4 solve is"):
        guard.step()
    assert h.budget.steps > 1


def _trace_of_d_dimensions(
    t: torch.Tensor, state: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    z = state[
        0
    ]  # the sample stands still; each of its d dimensions adds 5 t^4 to the log-density's rate
    return torch.zeros_like(z), -z.shape[1] * 5 * t**4 * torch.ones_like(state[1])


@pytest.mark.parametrize("d", [2, 64, 784])
def test_the_error_is_per_dimension(d):
    """A tolerance means the same in 2-D and in 784-D: the log-density's error is divided by the
    dimension.
    """
    budget = Budget(2, reference=REF)
    y0 = (torch.randn(5, d), torch.zeros(5, 1))
    err = budget.error(_trace_of_d_dimensions, y0, torch.tensor([0.0, 1.0]))
    # torchdiffeq's rk4 (Kutta's 3/8 rule) on the integral of 5 t^4 over [0, 1] in 2 steps: 1/864
    # too much
    assert err[0].item() < 1e-14 and err[1].item() == pytest.approx(1 / 864, rel=1e-6)


def test_a_state_in_one_tensor_is_compared_where_select_says():
    """OT-Flow keeps [x, l, v, r] in one tensor: the guard compares x and l, not the cost
    integrals.
    """

    def field(t, z):
        return torch.cat(
            [
                -z[:, :2],
                -t * torch.ones_like(z[:, 2:3]),
                50 * torch.cos(40 * t) * torch.ones_like(z[:, 3:]),
            ],
            1,
        )

    budget, t = Budget(2, reference=REF), torch.tensor([0.0, 1.0])
    z0 = torch.randn(4, 5)
    everything = budget.error(field, z0, t)  # the whole tensor: the wild integrals dominate
    picked = budget.error(field, z0, t, select=lambda z: (z[..., :-3], z[..., -3:-2]))
    assert everything.shape == (1,) and picked.shape == (2,)
    assert picked.max() < 1e-3 < everything.item()


# ----------------------------------------------------------------------------- the guard
class Model(nn.Module):
    def __init__(self, field: nn.Module, budget: int = 2, method: str = "rk4", **kw) -> None:
        super().__init__()
        self.field = field
        budget = Budget(budget, method=method, reference=dict(rtol=1e-8, atol=1e-8), **kw)
        self.horizon = LearnableHorizon(T0=1.0, budget=budget)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizon(self.field, x)


def _build(
    k: float = 12.0, seed: int = 0, max_steps: int = 64, **kw
) -> tuple[Model, CoordinateDescentStepper]:
    torch.manual_seed(seed)
    model = Model(Stiff(k=k), max_steps=max_steps)
    guard = BudgetGuard(model, **{"every": 2, "tol": 1e-2, **kw})
    return model, CoordinateDescentStepper(
        torch.optim.Adam(model.field.parameters(), lr=1e-2), model, guard=guard
    )


def _train(
    model: Model, stepper: CoordinateDescentStepper, steps: int, seed: int = 1
) -> list[torch.Tensor]:
    """Steps of training; returns the placement after each."""
    g, placements = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        x = torch.randn(6, 2, generator=g)
        stepper.zero_grad()
        (model(x)[-1] - 1).pow(2).mean().backward()
        stepper.step()
        placements.append(
            model.horizon.budget.placement[: model.horizon.budget.steps].detach().clone()
        )
    return placements


def test_guard_grows_the_budget_of_a_stiff_field_and_shows_its_work():
    model, stepper = _build(k=12.0)
    field = count_nfe(model.field)
    model.field = field
    placement = model.horizon.budget.placement
    with pytest.warns(RuntimeWarning, match="budget grown to") as rec:
        _train(model, stepper, 1)
    assert len(rec) == 1 and "horizon 'horizon'" in str(rec[0].message)
    guard = stepper.guard
    (event,) = guard.stats["events"]
    assert event["step"] == 0 and event["horizon"] == "horizon" and event["budget"][0] == 2
    assert model.horizon.budget.steps == event["budget"][1] > 2 and event["error"][0] > 1e-2
    assert (
        model.horizon.budget.placement is placement
    )  # grown in place: nothing changes under an optimizer
    assert guard.budgets == [model.horizon.budget]
    assert guard.stats["checks"] == 1 and guard.stats["nfe"] > 0 and guard.stats["seconds"] > 0
    assert (
        field.nfe_forward == 8 + guard.stats["nfe"]
    )  # the step's 2 x 4 evaluations, and the guard's: all seen
    x = torch.randn(6, 2)
    assert (
        model.horizon.budget.error(model.field, x, _ends(model.horizon)).max().item() < 1e-2
    )  # it suffices


def test_guard_is_quiet_on_an_easy_field():
    model, stepper = _build(k=0.5, max_steps=2)  # a growth would raise: max_steps is the budget
    _train(model, stepper, 3)  # filterwarnings=error: no warning either
    assert stepper.guard.stats["events"] == [] and model.horizon.budget.steps == 2
    assert stepper.guard.stats["checks"] == 2 and stepper.guard.stats["errors"][0][0] < 1e-2


class _WithRegulariser(nn.Module):
    """An easy field whose third part, like RNODE's penalty integrals, a 2-step budget gets badly
    wrong.
    """

    def forward(
        self, t: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        z = state[0]
        return (
            -0.5 * z,
            -z.sum(1, keepdim=True),
            50.0 * torch.cos(40.0 * t) * torch.ones_like(state[2]),
        )


@pytest.mark.parametrize("select, grows", [(None, False), (lambda y: y, True)])
def test_guard_compares_the_sample_and_the_log_density_only_by_default(select, grows):
    h = LearnableHorizon(T0=1.0, budget=Budget(2, reference=dict(rtol=1e-8, atol=1e-8)))
    weight = nn.Parameter(torch.zeros(1))
    guard = BudgetGuard([h], every=1, select=select, fit_steps=0)
    stepper = CoordinateDescentStepper(torch.optim.SGD([weight], lr=0.0), [h], guard=guard)
    y0 = (torch.randn(4, 2), torch.zeros(4, 1), torch.zeros(4, 1))
    h(_WithRegulariser(), y0)  # a training call: the guard's batch
    with pytest.warns(RuntimeWarning, match="budget grown") if grows else contextlib.nullcontext():
        stepper.step()
    assert (h.budget.steps > 2) == grows and len(guard.stats["errors"][0]) == (3 if grows else 2)


def test_guard_action_raise_names_the_horizon():
    model, stepper = _build(k=12.0, action="raise")
    with pytest.raises(
        RuntimeError, match=r"horizon 'horizon': the 2-step rk4 solve is .*\(tol=0.01\)"
    ):
        _train(model, stepper, 1)
    assert model.horizon.budget.steps == 2


def test_max_steps_is_respected():
    model, stepper = _build(k=12.0, max_steps=8)
    with pytest.warns(RuntimeWarning, match="retired"):
        _train(model, stepper, 1)  # past max_steps the budget is retired, the run goes on
    assert model.horizon.budget.steps == 2 and model.horizon.budget.retired
    model, stepper = _build(k=12.0, max_steps=8, action="raise")
    with pytest.raises(RuntimeError, match="action='grow'"):
        _train(model, stepper, 1)
    model, stepper = _build(k=12.0, max_steps=64)
    with pytest.warns(RuntimeWarning):
        _train(model, stepper, 1)
    assert 8 < model.horizon.budget.steps <= 64


def test_training_goes_on_after_a_growth_and_an_old_graph_still_backpropagates():
    model, stepper = _build(k=12.0)
    with pytest.warns(RuntimeWarning, match="budget grown"):
        placements = _train(model, stepper, 5)
    assert not torch.equal(
        placements[1], placements[0]
    )  # the grown placement was fitted on the next check, one step after the growth
    out = model(torch.randn(6, 2))
    model.horizon.budget.steps += 3
    out[-1].sum().backward()
    stepper.step()


def test_placement_is_fitted_on_guard_steps_only():
    model, stepper = _build(k=0.5, every=3)
    placements = _train(model, stepper, 7)
    before = [torch.zeros(2)] + placements[:-1]
    moved = [not torch.equal(a, b) for a, b in zip(placements, before)]
    assert moved == [
        True,
        True,
        False,
        True,
        False,
        False,
        True,
    ]  # checks at 0, 1, 3, 6: waits 1, 2, 3


def test_fit_steps_0_keeps_the_placement_uniform():
    model, stepper = _build(k=0.5, every=1, fit_steps=0)
    placements = _train(model, stepper, 2)
    assert (
        all(torch.equal(p, torch.zeros(2)) for p in placements)
        and stepper.guard.stats["checks"] == 2
    )


def test_a_budget_without_a_guard_warns_once_naming_the_stepper():
    h = LearnableHorizon(T0=1.0, budget=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        h(lambda t, y: -y, torch.ones(3))
        h(lambda t, y: -y, torch.ones(3))
        with torch.no_grad():
            h.eval()(lambda t, y: -y, torch.ones(3))
    assert len(rec) == 1 and "CoordinateDescentStepper" in str(rec[0].message)
    assert h.budget.warn_unguarded  # it warned once and stays unguarded
    guarded = LearnableHorizon(T0=1.0, budget=2)
    BudgetGuard([guarded])
    assert not guarded.budget.warn_unguarded
    declined = LearnableHorizon(T0=1.0, budget=2)
    CoordinateDescentStepper(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0), [declined], guard=False
    )
    assert not declined.budget.warn_unguarded
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # stricter than the test configuration, which ignores this warning
        guarded(lambda t, y: -y, torch.ones(3))
        declined(lambda t, y: -y, torch.ones(3))


def test_guard_rejects_bad_input():
    with pytest.raises(ValueError, match="no horizon with a budget"):
        BudgetGuard([LearnableHorizon()])
    h = LearnableHorizon(budget=2)
    for kw, error in (
        (dict(action="shrink"), ValueError),
        (dict(tol=0.0), ValueError),
        (dict(every=-1), ValueError),
        (dict(select=3), TypeError),
        (dict(fit_steps=1.5), TypeError),
    ):
        with pytest.raises(error):
            BudgetGuard([h], **kw)


def test_resume_after_a_growth_is_bitwise_exact():
    model, stepper = _build(k=12.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _train(model, stepper, 3, seed=5)
        saved_model, saved_stepper = (
            copy.deepcopy(model.state_dict()),
            copy.deepcopy(stepper.state_dict()),
        )
        assert model.horizon.budget.steps > 2 and stepper.guard.stats["events"]
        _train(model, stepper, 4, seed=6)
        fresh, fresh_stepper = _build(k=12.0, seed=99)
        fresh.load_state_dict(saved_model)
        fresh_stepper.load_state_dict(saved_stepper)
        _train(fresh, fresh_stepper, 4, seed=6)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_stepper.stats == stepper.stats
    drop = lambda st: {k: v for k, v in st.items() if k != "seconds"}  # noqa: E731
    assert drop(fresh_stepper.guard.stats) == drop(stepper.guard.stats)
    assert math.isfinite(stepper.stats["horizons"][0]["T"])
