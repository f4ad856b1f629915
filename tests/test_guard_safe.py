"""The guard a user can leave on: the spread tolerance (importance weights' units), checks that
come sooner as errors grow, and the ceiling at which a budget is retired and training goes on as
the call asks.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

from torch_tempopt import Budget, BudgetGuard, CoordinateDescentStepper, LearnableHorizon

REF = dict(rtol=1e-9, atol=1e-9)


class Scaled(nn.Module):
    """(dx/dt, dlogp/dt) = (-a x, a * w(x)): the log-density's error differs between samples as
    w does, while its mean stays small.
    """

    def __init__(self, a: float = 1.0, w: float = 1.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.w = w

    def forward(
        self, t: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        x, _ = state
        return -self.a * x, self.a * self.w * torch.sin(3 * x).sum(1, keepdim=True) * t


def _batch(n: int = 64, dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.zeros(
        n, 1, dtype=torch.float64
    )


def _horizon(steps: int = 2, **kw) -> LearnableHorizon:
    return LearnableHorizon(T0=1.0, budget=Budget(steps, reference=REF, **kw))


def test_check_reports_the_spread_and_what_each_solve_costs():
    field, (x, logp) = Scaled(a=3.0, w=20.0), _batch()
    check = Budget(2, reference=REF).check(field, (x, logp), torch.tensor([0.0, 1.0]), steps=0)
    out = Budget(2).error(field, (x, logp), torch.tensor([0.0, 1.0]), **REF)
    torch.testing.assert_close(check.before, out)  # the same errors as error()
    with torch.no_grad():
        rk4 = torchdiffeq.odeint(field, (x, logp), torch.tensor([0.0, 0.5, 1.0]), method="rk4")
        ref = torchdiffeq.odeint(field, (x, logp), torch.tensor([0.0, 1.0]), **REF)
    assert check.spread == pytest.approx(float((rk4[1][-1] - ref[1][-1]).std()), rel=1e-9)
    assert check.step_nfe == 4 and check.reference_nfe > 8  # rk4: four evaluations a step
    single = Budget(2, reference=REF).check(lambda t, y: -y, x, torch.tensor([0.0, 1.0]))
    assert math.isnan(single.spread)  # no log-density: nothing to spread


def test_the_spread_tolerance_grows_a_budget_whose_mean_error_is_within_tol():
    """An error of the log-density that is small on average per dimension but differs between
    samples by more than `spread` nats grows the budget; without `spread` it does not.
    """
    field, state = Scaled(a=3.0, w=0.7), _batch(dim=32)
    budget = Budget(2, reference=REF)
    check = budget.check(field, state, torch.tensor([0.0, 1.0]), steps=0)
    assert check.before.max() < 0.025 and check.spread > 0.2  # the case this test is about
    for spread, grown in ((0.2, True), (None, False)):
        h = _horizon()
        h(field, state)
        guard = BudgetGuard([h], spread=spread, fit_steps=0)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            guard.step()
        assert (h.budget.steps > 2) is grown and len(seen) == int(grown)
        if grown:
            assert "spreads" in str(seen[0].message) and guard.stats["events"][0]["spread"] > 0.2


def _checked_at(guard: BudgetGuard, h: LearnableHorizon, field: nn.Module, state, steps: int):
    at = []
    for _ in range(steps):
        h(field, state)
        before = guard.stats["checks"]
        guard.step()
        if guard.stats["checks"] > before:
            at.append(guard.stats["steps"] - 1)
    return at


def test_checks_double_their_spacing_up_to_every():
    field, state = Scaled(a=1.0, w=1.0), _batch()
    h = _horizon()
    guard = BudgetGuard([h], every=100, fit_steps=0)
    assert _checked_at(guard, h, field, state, 300) == [0, 1, 3, 7, 15, 31, 63, 127, 227]


def test_checks_come_sooner_when_the_error_grows():
    field, state = Scaled(a=1.0, w=1.0), _batch()
    h = _horizon()
    guard = BudgetGuard([h], every=100, fit_steps=0)
    assert _checked_at(guard, h, field, state, 64)[-1] == 63  # next at 127 while steady
    with torch.no_grad():
        field.a.fill_(1.7)  # the field stiffens: the error grows, still under tol
    at = _checked_at(guard, h, field, state, 64)
    ratio = [e / guard.tol for e in guard.stats["errors"][0]]
    assert at == [127] and max(ratio) < 1 and h.budget.steps == 2
    assert guard.stats["next_check"] < 127 + 64 + 1  # sooner than twice the last wait


def test_a_grown_budget_is_checked_again_soon():
    field, state = Scaled(a=8.0, w=1.0), _batch()
    h = _horizon()
    guard = BudgetGuard([h], every=100, fit_steps=0)
    h(field, state)
    with pytest.warns(RuntimeWarning, match="grown"):
        guard.step()
    assert h.budget.steps > 2 and guard.stats["next_check"] == 1  # the grown budget, next step


def test_a_budget_that_would_cost_the_reference_is_retired_and_trains_as_the_call_asks():
    field, state = Scaled(a=5.0, w=1000.0), _batch()
    h = LearnableHorizon(T0=1.0, budget=Budget(2, reference=dict(rtol=1e-3, atol=1e-3)))
    model = nn.ModuleDict({"field": field, "h": h})
    stepper = CoordinateDescentStepper(torch.optim.SGD(field.parameters(), lr=1e-12), model)
    out = h(field, state)
    out[1][-1].mean().backward()
    with pytest.warns(RuntimeWarning, match="retired") as seen:
        stepper.step()
    assert len(seen) == 1 and h.budget.retired and h.budget.steps == 2
    message = str(seen[0].message)  # retired by cost, well within max_steps
    cost, reference = (
        float(w)
        for w in re.findall(r"cost (\d+) evaluations against the reference's (\d+)", message)[0]
    )
    assert reference <= cost < 4 * h.budget.max_steps
    assert stepper.guard.stats["events"][-1]["budget"] == [2, "retired"]
    # from now on training is training without the budget: the call's own solve, bitwise
    kwargs = dict(method="dopri5", rtol=1e-6, atol=1e-6)
    got = h(field, state, solver=torchdiffeq.odeint_adjoint, **kwargs)
    plain = LearnableHorizon(T0=1.0, learn_T=False)
    want = plain(field, state, solver=torchdiffeq.odeint_adjoint, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    checks = stepper.guard.stats["checks"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no more warnings, no more checks
        for _ in range(3):
            stepper.zero_grad()
            h(field, state)[1][-1].mean().backward()
            stepper.step()
    assert stepper.guard.stats["checks"] == checks


def test_retirement_is_in_the_state_dict_and_an_old_state_dict_loads_unretired():
    h = _horizon()
    h.budget.retired.fill_(True)
    fresh = _horizon()
    fresh.load_state_dict(h.state_dict())
    assert fresh.budget.retired and "retired=True" in repr(fresh.budget)
    old = {k: v for k, v in h.state_dict().items() if not k.endswith("retired")}  # 0.4's keys
    again = _horizon()
    again.budget.retired.fill_(True)
    again.load_state_dict(old)
    assert not again.budget.retired


def test_action_raise_still_raises_and_spread_is_checked():
    field, state = Scaled(a=40.0, w=1.0), _batch()
    h = _horizon()
    h(field, state)
    with pytest.raises(RuntimeError, match="action='grow'"):
        BudgetGuard([h], action="raise").step()
    assert not h.budget.retired
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="spread must be > 0"):
            BudgetGuard([h], spread=bad)


def test_the_schedule_survives_a_state_dict_round_trip():
    field, state = Scaled(a=1.0, w=1.0), _batch()
    h = _horizon()
    guard = BudgetGuard([h], every=50, fit_steps=0)
    h(field, state)
    guard.step()
    again = BudgetGuard([h], every=50, fit_steps=0)
    again.load_state_dict(guard.state_dict())
    assert again.stats["next_check"] == 1 and again.stats["steps"] == 1


def _stepper(field: nn.Module, h: LearnableHorizon, **kw) -> CoordinateDescentStepper:
    model = nn.ModuleDict({"field": field, "h": h})
    return CoordinateDescentStepper(torch.optim.Adam(field.parameters(), lr=1e-2), model, **kw)


def _train_step(stepper: CoordinateDescentStepper, h: LearnableHorizon, field, state) -> None:
    stepper.zero_grad()
    x, logp = h(field, state)
    (x[-1].pow(2).mean() + logp[-1].mean()).backward()
    stepper.step()


def test_a_growth_rolls_the_weights_and_the_optimizer_back_to_the_last_passed_check():
    field, state = Scaled(a=1.0, w=1.0), _batch()
    h = _horizon()
    stepper = _stepper(field, h)
    kept = []
    for _ in range(3):  # checks at steps 0 and 1 pass; step 2 is not a check
        _train_step(stepper, h, field, state)
        kept.append((field.a.detach().clone(), copy.deepcopy(stepper.optimizer.state_dict())))
    field.w = 500.0  # the log-density's error explodes before the check at step 3
    with pytest.warns(RuntimeWarning, match="grown"):
        _train_step(stepper, h, field, state)
    assert stepper.guard.stats["events"][-1]["rolled_back_to"] == 1
    assert stepper.stats["rollbacks"] == 1 and torch.equal(field.a.detach(), kept[1][0])
    adam = stepper.optimizer.state_dict()["state"][0]
    assert adam["step"] == kept[1][1]["state"][0]["step"] == 2
    assert torch.equal(adam["exp_avg"], kept[1][1]["state"][0]["exp_avg"])


def test_a_resumed_run_rolls_back_as_the_uninterrupted_one():
    def run(resume_at: int | None) -> tuple[torch.Tensor, list]:
        field, state = Scaled(a=1.0, w=1.0), _batch()
        h = _horizon()
        stepper = _stepper(field, h)
        for k in range(8):  # passed checks at 0, 1 and 3; the error explodes before step 7
            if k == resume_at:  # a fresh process: new objects, the saved states loaded
                saved = copy.deepcopy((field.state_dict(), h.state_dict(), stepper.state_dict()))
                field, h = Scaled(a=3.0, w=1.0), _horizon()
                stepper = _stepper(field, h)
                field.load_state_dict(saved[0]), h.load_state_dict(saved[1])
                stepper.load_state_dict(saved[2])
            field.w = 500.0 if k >= 4 else 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                _train_step(stepper, h, field, state)
        return field.a.detach(), stepper.guard.stats["events"]

    a, events = run(None)
    assert events[-1]["rolled_back_to"] == 3
    for at in (2, 5):  # resumed before and after the last passed check
        b, resumed = run(at)
        assert torch.equal(a, b) and resumed == events


def test_rollback_false_keeps_what_was_learned():
    field, state = Scaled(a=1.0, w=1.0), _batch()
    h = _horizon()
    stepper = _stepper(field, h, rollback=False)
    for _ in range(3):
        _train_step(stepper, h, field, state)
    field.w = 500.0
    before = field.a.detach().clone()
    with pytest.warns(RuntimeWarning, match="grown"):
        _train_step(stepper, h, field, state)
    assert "rolled_back_to" not in stepper.guard.stats["events"][-1]
    assert stepper.stats["rollbacks"] == 0 and not torch.equal(field.a.detach(), before)


def test_a_0_4_guard_state_dict_loads_and_the_guard_goes_on():
    field, state = Scaled(a=1.0, w=1.0), _batch()
    h = _horizon()
    old = {"stats": dict(steps=250, checks=3, nfe=120, seconds=0.5, events=[], errors=[[0.01]])}
    guard = BudgetGuard([h], every=100, fit_steps=0)
    guard.load_state_dict(old)  # 0.4's stats: no schedule, spreads, ratios or trend
    h(field, state)
    guard.step()  # due at once (next_check 0), then on the new schedule
    assert guard.stats["checks"] == 4 and guard.stats["next_check"] == 251
    worst = max(max(guard.stats["errors"][0]) / guard.tol, guard.stats["spreads"][0] / 0.2)
    assert guard.stats["ratios"][0] == pytest.approx(worst)
