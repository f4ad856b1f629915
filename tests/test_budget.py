"""LearnableHorizon(budget=N): step counts, eval() scoring, the discrete and continuous dL/dT, placement, fit, the guard."""

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

from torch_tempopt import BudgetGuard, CoordinateDescentStepper, LearnableHorizon, count_nfe

ODEINT, ADJOINT = torchdiffeq.odeint, torchdiffeq.odeint_adjoint
STAGES = {"euler": 1, "midpoint": 2, "heun3": 3, "rk4": 4}
REF = dict(rtol=1e-10, atol=1e-10)


def _loss(out) -> torch.Tensor:
    parts = out if isinstance(out, tuple) else (out,)
    return sum((0.5 + i) * (p[-1].pow(2).sum() + p[-1].sin().sum()) for i, p in enumerate(parts))


def _skewed(h: LearnableHorizon, seed: int = 0) -> LearnableHorizon:
    with torch.no_grad():
        h.placement[: h.budget] = torch.randn(h.budget, generator=torch.Generator().manual_seed(seed))
    return h


def _grid(h: LearnableHorizon, reverse: bool) -> torch.Tensor:
    t0, T = h.t0.detach(), h.T.detach()
    grid = t0 + h.fractions().detach() * (T - t0)
    return grid.flip(0) if reverse else grid


# ----------------------------------------------------------------------------- the solve
@pytest.mark.parametrize("method", sorted(STAGES))
def test_evaluations_per_solve_are_stages_times_budget(method):
    torch.manual_seed(0)
    func = count_nfe(TimeMLP())
    y0 = torch.randn(4, 2)
    n, k = 5, STAGES[method]
    h = LearnableHorizon(T0=0.7, learn_T=True, learn_t0=True, budget=n, method=method, reference=dict(rtol=1e-9))
    # the call may name the reference (a call that reads the same with and without a budget): the steps stay N
    _loss(h(func, y0, method="dopri5", rtol=1e-9)).backward()
    assert (func.nfe_forward, func.nfe_backward) == (n * k, 0)  # odeint: the grid is in the graph, nothing extra
    func.reset()
    h.t0.requires_grad_(False)
    _loss(h(func, y0, solver=ADJOINT)).backward()
    assert (func.nfe_forward, func.nfe_backward) == (n * k, n * k + 1)  # the adjoint's own steps, and dL/dT
    func.reset()
    h.t0.requires_grad_(True)
    _loss(h(func, y0, solver=ADJOINT, reverse=True)).backward()
    assert (func.nfe_forward, func.nfe_backward) == (n * k, n * k + 2)  # dL/dT and dL/dt0
    func.reset()
    with torch.no_grad():
        h(func, y0, times=[0.0, 0.3, 1.0])  # 0.3 is not on the uniform grid: one more step
    assert (func.nfe_forward, func.nfe_backward) == ((n + 1) * k, 0)


@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
@pytest.mark.parametrize("reverse", [False, True])
def test_output_is_odeint_on_the_explicit_grid(reverse, solver):
    torch.manual_seed(1)
    func, y0 = TupleField(), (torch.randn(3, 2), torch.zeros(3, 1), torch.zeros(3, 1))
    h = _skewed(LearnableHorizon(T0=0.9, t0=0.1, budget=4))
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
    u = h.fractions().detach()
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
    h = LearnableHorizon(T0=0.6, budget=2, reference=REF)
    exact = ODEINT(func, y0, torch.tensor([0.0, 0.6]), **REF)
    steps = ODEINT(func, y0, torch.tensor([0.0, 0.3, 0.6]), method="rk4")[[0, -1]]
    assert torch.equal(h(func, y0), steps)  # train(): the budget
    assert torch.equal(h.eval()(func, y0), exact)  # eval(): the reference, like dropout off
    with h.budgeted():  # cheap sampling from a model in eval()
        assert torch.equal(h(func, y0), steps)
    with h.train().budgeted(False):
        assert torch.equal(h(func, y0), exact)
    assert torch.equal(h(func, y0), steps)


def test_call_settings_must_be_the_reference():
    h = LearnableHorizon(T0=0.6, budget=2)  # reference: dopri5 at 1e-5
    func, y0 = TimeMLP(), torch.randn(3, 2)
    h(func, y0, rtol=1e-5, atol=1e-5)  # the same solve named again (dopri5 is torchdiffeq's default)
    with pytest.raises(ValueError, match=r"differ from the budget's reference=.*pass reference="):
        h(func, y0, method="rk4", options=dict(step_size=0.1))
    with pytest.raises(ValueError, match="reference goes with a budget; pass budget=N"):
        LearnableHorizon(reference=REF)


def test_reference_is_checked_and_completed():
    assert LearnableHorizon(budget=2, reference=dict(rtol=1e-3)).reference == {"rtol": 1e-3}  # as odeint reads it
    assert LearnableHorizon(budget=2).reference == {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}
    with pytest.raises(ValueError, match="reference's method must be one of torchdiffeq's adaptive.*got 'euler'"):
        LearnableHorizon(budget=2, reference=dict(method="euler"))  # a fixed-step reference scores nothing honestly
    with pytest.raises(ValueError, match="got 'bogus'"):
        LearnableHorizon(budget=2, reference=dict(method="bogus"))
    with pytest.raises(TypeError, match="reference must be a dict of .*got 'dopri5'"):
        LearnableHorizon(budget=2, reference="dopri5")
    with pytest.raises(TypeError, match="reference must be a dict of .*'step_size'"):
        LearnableHorizon(budget=2, reference=dict(step_size=0.1))


def test_select_must_return_parts():
    h = LearnableHorizon(T0=0.6, budget=2)
    func, y0 = TimeMLP(dim=4), torch.randn(16, 4)
    assert h.error(func, y0, select=lambda s: (s[..., :3],)).shape == (1,)
    with pytest.raises(TypeError, match="select must return a tuple of tensors"):
        h.error(func, y0, select=lambda s: s[..., :3])


# ----------------------------------------------------------------------------- dL/dT on a budget
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_odeint_dLdT_is_the_derivative_of_what_is_computed(n, reverse):
    torch.manual_seed(3)
    func, y0 = TimeMLP(), torch.randn(4, 2)
    h = _skewed(LearnableHorizon(T0=0.7, t0=0.1, learn_T=True, learn_t0=True, budget=n), seed=n)
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


def _dLdT_both(n: int, reverse: bool) -> tuple[float, float, float]:
    """dL/dT with odeint (discrete) and odeint_adjoint, and the continuous formula computed by hand."""
    torch.manual_seed(4)
    func, y0 = TimeMLP(), torch.randn(4, 2)
    h = LearnableHorizon(T0=0.7, t0=0.1, budget=n, learn_T=True)
    _loss(h(func, y0, reverse=reverse)).backward()
    discrete, h.T.grad = h.T.grad.item(), None
    y0 = y0.clone().requires_grad_()
    out = h(func, y0, reverse=reverse, solver=ADJOINT)
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
    return discrete, h.T.grad.item(), formula


@pytest.mark.parametrize("reverse", [False, True])
def test_adjoint_dLdT_is_the_continuous_formula_within_h4_of_the_discrete(reverse):
    ns = [4, 8, 16, 32]
    gaps = []
    for n in ns:
        discrete, adjoint, formula = _dLdT_both(n, reverse)
        assert adjoint == pytest.approx(formula, rel=1e-12, abs=1e-14)
        gaps.append(abs(adjoint - discrete))
    x, y = torch.tensor(ns, dtype=torch.float64).log(), torch.tensor(gaps).log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
    assert -4.3 < slope.item() < -3.7, gaps  # rk4: the two derivatives differ by O(h^4)


# ----------------------------------------------------------------------------- placement
def test_fractions_increase_from_exactly_0_to_exactly_1():
    h = LearnableHorizon(budget=7)
    torch.testing.assert_close(h.fractions(), torch.linspace(0, 1, 8), rtol=0, atol=1e-15)
    for n in range(1, 13):  # a cumulative sum of the step lengths alone ends at 1 +- 2e-16 for most of these
        h.set_budget(n)
        for scale in (0.0, 1.0, 10.0, 40.0):
            _skewed(h, seed=n)
            with torch.no_grad():
                h.placement.mul_(scale)
            u = h.fractions()
            assert u[0].item() == 0.0 and u[-1].item() == 1.0 and u.shape == (n + 1,)
            assert bool((u[1:] >= u[:-1]).all())


def test_fit_steps_the_placement_down_the_finite_difference_gradient_of_the_error():
    torch.manual_seed(5)
    func, y0 = TupleField(), (torch.randn(4, 2), torch.zeros(4, 1), torch.zeros(4, 1))
    h = _skewed(LearnableHorizon(T0=0.8, budget=3, reference=REF))
    start, fd = h.placement[:3].clone(), []
    for i in range(3):
        vals = []
        for s in (1e-6, -1e-6):
            with torch.no_grad():
                h.placement[i] += s
                vals.append(h.error(func, y0).sum().item())
                h.placement[i] -= s
        fd.append((vals[0] - vals[1]) / 2e-6)
    before, after = h.fit(func, y0, steps=1, lr=1e-3)  # Adam's first step: -lr g / (|g| + 1e-8)
    g = torch.tensor(fd)
    want, step = -1e-3 * g / (g.abs() + 1e-8), h.placement[:3] - start
    # the logits are re-centred after fitting: compare the steps up to a common shift
    torch.testing.assert_close(step - step.mean(), want - want.mean(), rtol=0, atol=1e-8)
    assert after.sum() < before.sum() and h.T.grad is None  # fit moves nothing but the placement


@pytest.mark.parametrize("solver", [ODEINT, ADJOINT], ids=["odeint", "adjoint"])
def test_the_training_loss_never_reaches_the_placement(solver):
    func = TimeMLP()
    h = _skewed(LearnableHorizon(T0=0.8, budget=3, learn_T=True))
    before = h.placement.clone()
    _loss(h(func, torch.randn(4, 2), solver=solver)).backward()
    assert not h.placement.requires_grad and torch.equal(h.placement, before)  # a buffer, fitted by fit()
    assert [n for n, _ in h.named_parameters()] == ["T"] and h.T.grad.abs() > 0


def test_set_budget_keeps_the_density_in_place():
    h = LearnableHorizon(budget=3, max_budget=16)
    old = h.placement
    h.set_budget(5)
    assert h.placement is old and old.shape == (16,) and h.budget == 5  # no new tensor under an optimizer
    torch.testing.assert_close(h.fractions(), torch.linspace(0, 1, 6), rtol=0, atol=1e-7)  # uniform stays uniform
    _skewed(h)
    before = h.fractions().detach().double()
    h.set_budget(10)
    after = h.fractions().detach().double()
    torch.testing.assert_close(after[::2], before, rtol=0, atol=1e-6)  # old boundaries kept when doubling
    torch.testing.assert_close(after[1::2], (before[1:] + before[:-1]) / 2, rtol=0, atol=1e-6)  # halves
    with pytest.raises(ValueError, match="at most max_budget=16"):
        h.set_budget(17)


def test_state_dict_with_a_larger_budget_loads():
    six = _skewed(LearnableHorizon(T0=0.8, budget=6))
    four = LearnableHorizon(T0=0.8, budget=4)
    four.load_state_dict(six.state_dict())
    assert four.budget == 6 and torch.equal(four.fractions(), six.fractions())


def test_fit_learns_a_placement_that_beats_uniform():
    torch.manual_seed(6)
    func, y0 = Pulse(), torch.randn(8, 2)
    h = LearnableHorizon(T0=1.0, budget=4, reference=REF)
    uniform = h.error(func, y0).detach()
    T = h.T.detach().clone()
    before, after = h.fit(func, y0, steps=60, lr=0.1)
    torch.testing.assert_close(before, uniform)
    assert after.item() < uniform.item() / 10, (uniform, after)
    torch.testing.assert_close(after, h.error(func, y0).detach())
    u = h.fractions().detach()
    assert (u[-1] - u[-2]) < 0.25 and (u[1] - u[0]) > 0.25  # steps moved towards the pulse at t = 0.9
    assert torch.equal(h.T, T) and all(p.grad is None for p in func.parameters())


def test_one_step_has_nothing_to_fit_and_the_guard_grows_it():
    """budget=1 crashed the guard and fit in 0.2 (a single fraction is constant under the softmax)."""
    func, y0 = Stiff(k=12.0), torch.randn(6, 2)
    h = LearnableHorizon(T0=1.0, budget=1)
    before, after = h.fit(func, y0, steps=5)
    assert torch.equal(before, after) and torch.equal(h.fractions(), torch.tensor([0.0, 1.0]))
    guard = BudgetGuard([h], every=1, tol=1e-2)
    h(func, y0)
    with pytest.warns(RuntimeWarning, match="the 1-step rk4 solve is"):
        guard.step()
    assert h.budget > 1


def _trace_of_d_dimensions(t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    z = state[0]  # the sample stands still; each of its d dimensions adds 5 t^4 to the log-density's rate
    return torch.zeros_like(z), -z.shape[1] * 5 * t**4 * torch.ones_like(state[1])


@pytest.mark.parametrize("d", [2, 64, 784])
def test_the_error_is_per_dimension(d):
    """A tolerance means the same in 2-D and in 784-D: the log-density's error is divided by the dimension."""
    h = LearnableHorizon(T0=1.0, budget=2, reference=REF)
    y0 = (torch.randn(5, d), torch.zeros(5, 1))
    err = h.error(_trace_of_d_dimensions, y0)
    # torchdiffeq's rk4 (Kutta's 3/8 rule) on the integral of 5 t^4 over [0, 1] in 2 steps: 1/864 too much
    assert err[0].item() < 1e-14 and err[1].item() == pytest.approx(1 / 864, rel=1e-6)


def test_a_state_in_one_tensor_is_compared_where_select_says():
    """OT-Flow keeps [x, l, v, r] in one tensor: the guard compares x and l, not the cost integrals."""
    def field(t, z):
        return torch.cat([-z[:, :2], -t * torch.ones_like(z[:, 2:3]), 50 * torch.cos(40 * t) * torch.ones_like(z[:, 3:])], 1)

    h = LearnableHorizon(T0=1.0, budget=2, reference=REF)
    z0 = torch.randn(4, 5)
    everything = h.error(field, z0)  # the whole tensor: the wild integrals dominate
    picked = h.error(field, z0, select=lambda z: (z[..., :-3], z[..., -3:-2]))
    assert everything.shape == (1,) and picked.shape == (2,)
    assert picked.max() < 1e-3 < everything.item()


# ----------------------------------------------------------------------------- the guard
class Model(nn.Module):
    def __init__(self, field: nn.Module, budget: int = 2, method: str = "rk4", **kw) -> None:
        super().__init__()
        self.field = field
        self.horizon = LearnableHorizon(T0=1.0, budget=budget, method=method, reference=dict(rtol=1e-8, atol=1e-8),
                                        **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizon(self.field, x)


def _build(k: float = 12.0, seed: int = 0, max_budget: int = 64, **kw) -> tuple[Model, CoordinateDescentStepper]:
    torch.manual_seed(seed)
    model = Model(Stiff(k=k), max_budget=max_budget)
    guard = BudgetGuard(model, **{"every": 2, "tol": 1e-2, **kw})
    return model, CoordinateDescentStepper(torch.optim.Adam(model.field.parameters(), lr=1e-2), model, guard=guard)


def _train(model: Model, stepper: CoordinateDescentStepper, steps: int, seed: int = 1) -> list[torch.Tensor]:
    """Steps of training; returns the placement after each."""
    g, placements = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        x = torch.randn(6, 2, generator=g)
        stepper.zero_grad()
        (model(x)[-1] - 1).pow(2).mean().backward()
        stepper.step()
        placements.append(model.horizon.placement[: model.horizon.budget].detach().clone())
    return placements


def test_guard_grows_the_budget_of_a_stiff_field_and_shows_its_work():
    model, stepper = _build(k=12.0)
    field = count_nfe(model.field)
    model.field = field
    placement = model.horizon.placement
    with pytest.warns(RuntimeWarning, match="budget grown to") as rec:
        _train(model, stepper, 1)
    assert len(rec) == 1 and "horizon 'horizon'" in str(rec[0].message)
    guard = stepper.guard
    (event,) = guard.stats["events"]
    assert event["step"] == 0 and event["horizon"] == "horizon" and event["budget"][0] == 2
    assert model.horizon.budget == event["budget"][1] > 2 and event["error"][0] > 1e-2
    assert model.horizon.placement is placement  # grown in place: nothing changes under an optimizer
    assert guard.stats["checks"] == 1 and guard.stats["nfe"] > 0 and guard.stats["seconds"] > 0
    assert field.nfe_forward == 8 + guard.stats["nfe"]  # the step's 2 x 4 evaluations, and the guard's: all seen
    x = torch.randn(6, 2)
    assert model.horizon.error(model.field, x).max().item() < 1e-2  # the grown budget suffices


def test_guard_is_quiet_on_an_easy_field():
    model, stepper = _build(k=0.5, max_budget=2)  # a growth would raise: max_budget is the budget
    _train(model, stepper, 3)  # filterwarnings=error: no warning either
    assert stepper.guard.stats["events"] == [] and model.horizon.budget == 2
    assert stepper.guard.stats["checks"] == 2 and stepper.guard.stats["errors"][0][0] < 1e-2


class _WithRegulariser(nn.Module):
    """An easy field whose third part, like RNODE's penalty integrals, a 2-step budget gets badly wrong."""

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        z = state[0]
        return -0.5 * z, -z.sum(1, keepdim=True), 50.0 * torch.cos(40.0 * t) * torch.ones_like(state[2])


@pytest.mark.parametrize("select, grows", [(None, False), (lambda y: y, True)])
def test_guard_compares_the_sample_and_the_log_density_only_by_default(select, grows):
    h = LearnableHorizon(T0=1.0, budget=2, reference=dict(rtol=1e-8, atol=1e-8))
    weight = nn.Parameter(torch.zeros(1))
    guard = BudgetGuard([h], every=1, select=select, fit_steps=0)
    stepper = CoordinateDescentStepper(torch.optim.SGD([weight], lr=0.0), [h], guard=guard)
    y0 = (torch.randn(4, 2), torch.zeros(4, 1), torch.zeros(4, 1))
    h(_WithRegulariser(), y0)  # a training call: the guard's batch
    with pytest.warns(RuntimeWarning, match="budget grown") if grows else contextlib.nullcontext():
        stepper.step()
    assert (h.budget > 2) == grows and len(guard.stats["errors"][0]) == (3 if grows else 2)


def test_guard_action_raise_names_the_horizon():
    model, stepper = _build(k=12.0, action="raise")
    with pytest.raises(RuntimeError, match=r"horizon 'horizon': the 2-step rk4 solve is .*\(tol=0.01\)"):
        _train(model, stepper, 1)
    assert model.horizon.budget == 2


def test_max_budget_is_respected():
    model, stepper = _build(k=12.0, max_budget=8)
    with pytest.raises(RuntimeError, match="max_budget=8"):
        _train(model, stepper, 1)
    assert model.horizon.budget == 2
    model, stepper = _build(k=12.0, max_budget=64)
    with pytest.warns(RuntimeWarning):
        _train(model, stepper, 1)
    assert 8 < model.horizon.budget <= 64


def test_training_goes_on_after_a_growth_and_an_old_graph_still_backpropagates():
    model, stepper = _build(k=12.0)
    with pytest.warns(RuntimeWarning, match="budget grown"):
        placements = _train(model, stepper, 5)
    assert not torch.equal(placements[2], placements[1])  # the grown placement was fitted on the next check
    out = model(torch.randn(6, 2))
    model.horizon.set_budget(model.horizon.budget + 3)
    out[-1].sum().backward()
    stepper.step()


def test_placement_is_fitted_on_guard_steps_only():
    model, stepper = _build(k=0.5, every=3)
    placements = _train(model, stepper, 7)
    before = [torch.zeros(2)] + placements[:-1]
    moved = [not torch.equal(a, b) for a, b in zip(placements, before)]
    assert moved == [True, False, False, True, False, False, True]


def test_fit_steps_0_keeps_the_placement_uniform():
    model, stepper = _build(k=0.5, every=1, fit_steps=0)
    placements = _train(model, stepper, 2)
    assert all(torch.equal(p, torch.zeros(2)) for p in placements) and stepper.guard.stats["checks"] == 2


def test_a_budget_without_a_guard_warns_once_naming_the_stepper():
    h = LearnableHorizon(T0=1.0, budget=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        h(lambda t, y: -y, torch.ones(3))
        h(lambda t, y: -y, torch.ones(3))
        with torch.no_grad():
            h.eval()(lambda t, y: -y, torch.ones(3))
    assert len(rec) == 1 and "CoordinateDescentStepper" in str(rec[0].message)
    guarded = LearnableHorizon(T0=1.0, budget=2)
    BudgetGuard([guarded])
    guarded(lambda t, y: -y, torch.ones(3))  # filterwarnings=error: no warning


def test_guard_rejects_bad_input():
    with pytest.raises(ValueError, match="no horizon with a budget"):
        BudgetGuard([LearnableHorizon()])
    h = LearnableHorizon(budget=2)
    for kw, error in ((dict(action="shrink"), ValueError), (dict(tol=0.0), ValueError), (dict(every=-1), ValueError),
                      (dict(select=3), TypeError), (dict(fit_steps=1.5), TypeError)):
        with pytest.raises(error):
            BudgetGuard([h], **kw)


def test_resume_after_a_growth_is_bitwise_exact():
    model, stepper = _build(k=12.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _train(model, stepper, 3, seed=5)
        saved_model, saved_stepper = copy.deepcopy(model.state_dict()), copy.deepcopy(stepper.state_dict())
        assert model.horizon.budget > 2 and stepper.guard.stats["events"]
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
