"""Faults: failing solves keep their exception and get a note naming the cause; bad input is
refused by name.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torchdiffeq
from fields import TimeMLP
from helpers import assert_same
from torch import nn

from torch_tempopt import Budget, CoordinateDescentStepper, LearnableHorizon
from torch_tempopt.nfe import in_backward

RK4 = dict(method="rk4", options=dict(step_size=0.125))
ADVICE = "if the step size collapsed, loosen rtol/atol"


def _notes(info: pytest.ExceptionInfo) -> str:
    return "\n".join(getattr(info.value, "__notes__", []))


# ------------------------------------------------------------------ (a) failing solves
def test_step_size_underflow_keeps_its_type_and_gets_tolerance_advice() -> None:
    """dy/dt = y^2 from y0 = 1 blows up at t = 1: an adaptive solve to T = 1.5 collapses
    its step.
    """
    horizon = LearnableHorizon(T0=1.5)
    with pytest.raises(AssertionError, match="underflow in dt") as info:
        horizon(lambda t, y: y**2, torch.ones(3), rtol=1e-4, atol=1e-4)
    (note,) = info.value.__notes__
    assert note.startswith("LearnableHorizon(T=1.5, t0=0, bounds=(0.1, 2.9)): the solve failed; ")
    for remedy in ("loosen rtol/atol", "budget=N"):
        assert remedy in note, remedy
    with pytest.raises(
        AssertionError, match=ADVICE
    ):  # backwards from T too (y0 = -1 blows up going back)
        horizon(lambda t, y: y**2, -torch.ones(3), reverse=True, rtol=1e-4, atol=1e-4)
    with pytest.raises(
        AssertionError, match="max_num_steps exceeded"
    ) as info:  # too many steps: the same advice
        LearnableHorizon(T0=0.5)(lambda t, y: -y, torch.ones(3), options=dict(max_num_steps=2))
    assert ADVICE in _notes(info)


def _bad_shape(t, y):
    return -y[:2]


def _bad_parts(t, y):
    return y[0], y[1]


def _nan_field(t, y):
    return y * float("nan")


def _broken(t, y):
    raise KeyError("a bug in the field")


def _failing_solver(func, y0, t, **kwargs):
    raise ValueError("the solver broke")


CAUSES = [  # (field, y0, call kwargs, exception type, the cause named in the note)
    (
        lambda t, y: -y,
        torch.tensor([1.0, float("nan")]),
        {},
        AssertionError,
        "y0 holds NaN or inf values.",
    ),
    (
        lambda t, y: tuple(-p for p in y),
        (torch.ones(2), torch.tensor([float("inf")])),
        {},
        AssertionError,
        "y0[1] holds NaN or inf values.",
    ),
    (_bad_shape, torch.ones(3), {}, RuntimeError, "func returned [(2,)] for a state of [(3,)]"),
    (_bad_shape, torch.ones(3), RK4, RuntimeError, "func returned [(2,)] for a state of [(3,)]"),
    (
        _bad_parts,
        (torch.ones(3), torch.ones(2), torch.ones(1)),
        {},
        RuntimeError,
        "func returned [(3,), (2,)] for a state of [(3,), (2,), (1,)]",
    ),
    (
        lambda t, y: -y,
        torch.ones(3, dtype=torch.float16),
        {},
        AssertionError,
        "y0 is torch.float16, too coarse for error control",
    ),
    (_nan_field, torch.ones(3), {}, AssertionError, "func(t0, y0) is not finite at t=0."),
    (_broken, torch.ones(3), {}, KeyError, "func fails at t=0: KeyError."),
    (
        lambda t, y: -y,
        torch.ones(3),
        dict(solver=_failing_solver),
        ValueError,
        "y0 and func(t0, y0) are finite and well shaped",
    ),
]


@pytest.mark.parametrize("field, y0, kwargs, exc, cause", CAUSES)
def test_a_failing_solve_gets_a_note_naming_its_cause_and_not_the_tolerance_advice(
    field, y0, kwargs, exc, cause
) -> None:
    horizon = LearnableHorizon(T0=1.5)
    with pytest.raises(exc) as info:
        horizon(field, y0, **kwargs)
    assert cause in _notes(info)
    # the conditional step-size advice only follows inputs that were checked and found fine (no
    # guess by message)
    assert (ADVICE in _notes(info)) == ("finite and well shaped" in cause)
    assert _notes(info).startswith("LearnableHorizon(T=1.5")


def test_a_failing_budgeted_solve_gets_a_note() -> None:
    horizon = LearnableHorizon(T0=0.5, budget=Budget(3, method="midpoint"))
    for mode in (
        horizon.train,
        horizon.eval,
    ):  # the budget's steps, then the reference's adaptive solve
        mode()
        with pytest.raises(RuntimeError) as info:
            horizon(_bad_shape, torch.ones(3))
        assert _notes(info).startswith(
            "LearnableHorizon(T=0.5, t0=0, bounds=(0.1, 0.9), budget=3): the solve failed; "
            "func returned [(2,)]"
        )


def test_field_failure_in_the_backward_extra_evaluation_gets_a_note() -> None:
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if in_backward():
            raise RuntimeError("the field broke in backward")
        return -y

    horizon = LearnableHorizon(T0=0.5)
    y = horizon(field, torch.ones(2), **RK4)
    with pytest.raises(RuntimeError, match="broke in backward") as info:
        y[-1].sum().backward()
    assert "the field failed at F(t, y(t)), for dL/dt" in _notes(info)


def test_empty_state_is_refused_by_name() -> None:
    for y0 in (torch.ones(0, 2), (torch.ones(0), torch.ones(0, 3))):
        with pytest.raises(ValueError, match="^y0 has no elements"):
            LearnableHorizon()(lambda t, y: y, y0)


# ------------------------------------------------------------------ (b) bad input
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
        (dict(T0=np.bool_(True)), TypeError, "T0"),
        (dict(T0=None), TypeError, "T0"),
        (dict(T0=torch.ones(2)), TypeError, "T0"),
        (dict(T0=1.0, learn_t0=1), TypeError, "learn_t0"),
        (dict(T0=1.0, learn_t0="yes"), TypeError, "learn_t0"),
        (dict(budget=0), ValueError, "budget"),
        (dict(budget=-3), ValueError, "budget"),
        (dict(budget=2.5), TypeError, "budget"),
        (dict(budget=True), TypeError, "budget"),
        (dict(budget="4"), TypeError, "budget"),
        (dict(budget=4.0), TypeError, "budget"),
        (dict(budget=dict(steps=4)), TypeError, "budget"),
    ],
)
def test_constructor_rejects_bad_input(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name} must"):
        LearnableHorizon(**kwargs)


@pytest.mark.parametrize(
    "keyword, value", [("method", "midpoint"), ("reference", dict(rtol=1e-9)), ("max_budget", 8)]
)
def test_constructor_refuses_the_budget_keywords_of_0_3(keyword, value):
    with pytest.raises(
        TypeError, match=keyword
    ):  # they are Budget's now: budget=Budget(4, method=...)
        LearnableHorizon(budget=4, **{keyword: value})


@pytest.mark.parametrize(
    "args, kwargs, exc, name",
    [
        ((0,), {}, ValueError, "steps"),
        ((-3,), {}, ValueError, "steps"),
        ((2.5,), {}, TypeError, "steps"),
        ((True,), {}, TypeError, "steps"),
        (("4",), {}, TypeError, "steps"),
        ((None,), {}, TypeError, "steps"),
        ((9,), dict(max_steps=8), ValueError, "steps"),
        ((4,), dict(method="dopri5"), ValueError, "method"),
        ((4,), dict(method="Euler"), ValueError, "method"),
        ((4,), dict(method=None), ValueError, "method"),
        ((4,), dict(gradient="adjoint_"), ValueError, "gradient"),
        ((4,), dict(gradient=None), ValueError, "gradient"),
        ((4,), dict(max_steps=0), ValueError, "max_steps"),
        ((4,), dict(max_steps=8.0), TypeError, "max_steps"),
        ((4,), dict(max_steps=np.bool_(True)), TypeError, "max_steps"),
        ((4,), dict(reference="dopri8"), TypeError, "reference"),
        ((4,), dict(reference=dict(step_size=0.1)), TypeError, "reference"),
        ((4,), dict(reference=dict(method="rk4")), ValueError, "reference"),
    ],
)
def test_budget_rejects_bad_input(args, kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}('s method)? must"):
        Budget(*args, **kwargs)


def test_budget_settings_are_checked_on_every_write():
    budget = Budget(4, reference=dict(method="dopri8", rtol=1e-7), max_steps=8)
    for bad, exc in (
        (0, ValueError),
        (9, ValueError),
        (1.0, TypeError),
        (None, TypeError),
        (True, TypeError),
    ):
        with pytest.raises(exc, match="^steps must"):
            budget.steps = bad
    for bad, exc in (
        ("x", TypeError),
        (dict(method="rk4"), ValueError),
        (dict(solver="odeint"), TypeError),
        ([("method", "dopri5")], TypeError),
    ):
        with pytest.raises(exc, match="^reference"):
            budget.reference = bad
    assert budget.steps == 4 and budget.reference == dict(
        method="dopri8", rtol=1e-7
    )  # a refused write changes nothing
    budget.reference = None
    assert budget.reference is None


def test_constructor_accepts_tensor_int_and_numpy():
    assert LearnableHorizon(T0=torch.tensor(2), t0=1, eps=0.5).bounds == (1.5, 2.5)
    assert LearnableHorizon(T0=np.float32(2.0), t0=np.int8(1), eps=np.float64(0.5)).bounds == (
        1.5,
        2.5,
    )


@pytest.mark.parametrize(
    "y0, kwargs, exc, name",
    [
        (torch.ones(2, dtype=torch.long), {}, TypeError, "y0"),
        ((torch.ones(2), torch.ones(2, dtype=torch.int32)), {}, TypeError, r"y0\[1\]"),
        ((), {}, TypeError, "y0"),
        ([1.0, 2.0], {}, TypeError, r"y0\[0\]"),
        (None, {}, TypeError, "y0"),
        (np.ones(2), {}, TypeError, "y0"),
        (torch.ones(2), dict(times=[0.5, 1.0]), ValueError, "times"),
        (torch.ones(2), dict(times=[0.0, 1.5]), ValueError, "times"),
        (torch.ones(2), dict(times=[-0.1, 0.5]), ValueError, "times"),
        (torch.ones(2), dict(times=[0.0, 0.5, 0.2]), ValueError, "times"),
        (torch.ones(2), dict(times=[0.0, 0.5, 0.5]), ValueError, "times"),
        (torch.ones(2), dict(times=[]), ValueError, "times"),
        (torch.ones(2), dict(times=[0.0]), ValueError, "times"),
        (torch.ones(2), dict(times=[[0.0, 0.5]]), ValueError, "times"),
        (torch.ones(2), dict(times=[0.0, float("nan")]), ValueError, "times"),
        (torch.ones(2), dict(times="0.5"), TypeError, "times"),
        (torch.ones(2), dict(t=torch.tensor([0.0, 1.0])), TypeError, "t must not"),
        (torch.ones(2), dict(reverse="yes"), TypeError, "reverse"),
        (torch.ones(2), dict(reverse=1), TypeError, "reverse"),
        (torch.ones(2), dict(solver=3), TypeError, "solver"),
    ],
)
def test_call_rejects_bad_input(y0, kwargs, exc, name):
    for budget in (None, 2):
        h = LearnableHorizon(T0=0.5, budget=budget)
        with pytest.raises(exc, match=f"^{name}"):
            h(lambda t, y: y, y0, **kwargs)


def test_call_rejects_non_callable_func():
    with pytest.raises(TypeError, match="^func must be callable"):
        LearnableHorizon()(None, torch.ones(2))


def test_budget_methods_reject_bad_input():
    budgeted = LearnableHorizon(T0=0.5, budget=2)
    budget = budgeted.budget
    f, y0, t = (lambda t, y: -y), torch.ones(2), torch.tensor([0.0, 0.5])
    with pytest.raises(TypeError, match="^solver must be torchdiffeq's odeint or odeint_adjoint"):
        budgeted(f, y0, solver=lambda func, y, t, **kw: torchdiffeq.odeint(func, y, t, **kw))
    with pytest.raises(ValueError, match="^steps must be at least 0"):
        budget.fit(f, y0, t, steps=-1)
    with pytest.raises(TypeError, match="^lr must be a real number"):
        budget.fit(f, y0, t, lr="fast")
    for bad in ([0.0, 0.0], [0.0, 0.5, 1.0], [0.5], [[0.0, 0.5]]):
        with pytest.raises(ValueError, match="^t must hold a start and an end"):
            budget.error(f, y0, torch.tensor(bad))
    with pytest.raises(TypeError, match=r"^y0\[0\] must be a floating-point tensor"):
        budget.error(f, [1, 2], t)
    with pytest.raises(TypeError, match="^func must be callable"):
        budget.error(None, y0, t)
    with pytest.raises(TypeError, match="^select must return a tuple"):
        budget.error(f, y0, t, select=lambda y: y)
    assert budget.steps == 2 and budget.placement.eq(0).all()


# -------------------------------------------------------- (c) non-finite gradients: all or nothing
class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.field = TimeMLP(2, 8)
        self.horizon = LearnableHorizon(T0=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizon(self.field, x, **RK4)[-1]


CASES = list(itertools.product(("weights", "time"), (True, False)))


@pytest.mark.parametrize("where, skip", CASES)
def test_a_nonfinite_gradient_never_half_applies_a_step(where: str, skip: bool) -> None:
    torch.manual_seed(0)
    model = Model()
    stepper = CoordinateDescentStepper(
        torch.optim.Adam(model.field.parameters(), lr=1e-2), model, skip_nonfinite=skip
    )
    x = torch.randn(8, 2)
    calls: list[int] = []
    armed = []

    def closure() -> torch.Tensor:
        calls.append(1)
        stepper.zero_grad()
        loss = (model(x) - 1).pow(2).sum(1).mean()
        loss.backward()
        if armed:
            target = next(model.field.parameters()) if where == "weights" else model.horizon.T
            target.grad.view(-1)[0] = float("nan")
        return loss

    stepper.step(closure)  # a warm-up step, so that Adam has state to corrupt
    calls.clear()
    armed.append(True)
    model_before, stepper_before = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(stepper.state_dict()),
    )
    with pytest.warns(RuntimeWarning):
        stepper.step(closure)
    T_after = model.horizon.T.detach().clone()
    weights_moved = any(
        not torch.equal(p, model_before[n])
        for n, p in model.state_dict().items()
        if "horizon" not in n
    )
    if skip:  # the whole step is skipped: weights, T and both optimizers as before
        assert_same(model.state_dict(), model_before)
        state = stepper.state_dict()
        assert_same(state["optimizer"], stepper_before["optimizer"])
        assert_same(state["horizon_optimizer"], stepper_before["horizon_optimizer"])
        assert stepper.stats["skipped_steps"] == 1 and stepper.stats["steps"] == 1
    else:
        assert torch.isfinite(T_after)  # T is protected whatever happens
        if where == "weights":
            assert not torch.isfinite(
                next(model.field.parameters())
            ).all()  # reaches the weights, with a warning
        else:  # a non-finite dL/dT: the weight step stands, T's is skipped and counted
            assert torch.equal(T_after, model_before["horizon.T"]) and weights_moved
            assert stepper.stats["horizons"][0]["nonfinite"] == 1


# ------------------------------------------------------------------ (d) mixed precision
def test_autocast_bfloat16_keeps_T_and_its_gradient_float32() -> None:
    torch.manual_seed(0)
    model = Model().float()
    x = torch.randn(16, 2, dtype=torch.float32)
    reference = copy.deepcopy(model)
    (reference(x) - 1).pow(2).sum(1).mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (model(x) - 1).pow(2).sum(1).mean()
    loss.backward()
    T = model.horizon.T
    assert T.dtype == T.grad.dtype == torch.float32
    assert T.grad.item() == pytest.approx(reference.horizon.T.grad.item(), rel=5e-2, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_state_gets_a_float32_time_grid(dtype: torch.dtype) -> None:
    horizon = LearnableHorizon(T0=0.5123).float()
    y = horizon(lambda t, y: -y, torch.ones(3, dtype=dtype), **RK4)
    assert y.dtype == dtype
    y[-1].float().sum().backward()
    exact = -3 * np.exp(-0.5123)  # dL/dT = <1, -y(T)>
    assert horizon.T.grad.dtype == torch.float32
    assert horizon.T.grad.item() == pytest.approx(exact, rel=1e-2)


def _scaled_run(scale: float | None, steps: int = 3) -> tuple[Model, CoordinateDescentStepper]:
    """The GradScaler recipe of the stepper's docstring: unscale the weights and T before
    the step.
    """
    torch.manual_seed(0)
    model = Model().float()
    stepper = CoordinateDescentStepper(
        torch.optim.Adam(model.field.parameters(), lr=1e-2), model, lr=1e-2
    )
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 2, generator=g, dtype=torch.float32)
        stepper.zero_grad()
        loss = (model(x) - 1).pow(2).sum(1).mean()
        if scaler is None:
            loss.backward()
            stepper.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(stepper)
            scaler.unscale_(stepper.horizon_optimizer)
            scaler.step(stepper)
            scaler.update()
    return model, stepper


def test_grad_scaler_recipe_matches_the_unscaled_run_bitwise() -> None:
    plain, plain_stepper = _scaled_run(None)
    scaled, scaled_stepper = _scaled_run(2.0**12)  # powers of two scale exactly
    assert_same(scaled.state_dict(), plain.state_dict())
    assert scaled_stepper.stats == plain_stepper.stats and plain_stepper.stats["steps"] == 3
