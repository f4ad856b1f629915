"""Property-based tests: any arguments either work or raise ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
import re
import warnings
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import torchdiffeq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from torch_tempopt import CoordinateDescentStepper, LearnableHorizon

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
# Anything a user might pass where a real number is expected.
reals = st.one_of(
    finite,
    st.floats(),  # nan, inf, subnormals, 1e308
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.fractions(),
    st.builds(np.float32, finite),
    st.builds(np.float64, st.floats()),
    st.builds(lambda v, d: torch.tensor(v, dtype=d), finite, st.sampled_from([torch.float32, torch.float64, torch.int64])),
    st.builds(lambda v: torch.tensor([v, v]), finite),
    st.builds(lambda v: torch.tensor(v, dtype=torch.bool), st.booleans()),
    st.builds(lambda v: torch.tensor(v, dtype=torch.complex64), finite),
    st.just(torch.empty(0)),
)
junk_flags = st.one_of(st.integers(0, 1), st.none(), st.just("yes"))
# Mostly valid, sometimes not: so that most examples get past the argument checks.
flags = st.one_of(st.booleans(), st.booleans(), st.booleans(), junk_flags)


def names_argument(error: Exception, *names: str) -> bool:
    text = str(error)
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_0-9])", text) for n in names)


def expect_clean(error: Exception, *names: str) -> None:
    event(f"{type(error).__name__}: {str(error)[:60]}")
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    assert names_argument(error, *names), f"{type(error).__name__} names none of {names}: {error}"


def as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


# ------------------------------------------------------------------ LearnableHorizon(...)


@SETTINGS
@given(T0=st.one_of(reals, finite), t0=st.one_of(reals, finite), eps=st.one_of(reals, st.floats(1e-6, 1.0)), learn_t0=flags)
def test_horizon_constructor(T0: Any, t0: Any, eps: Any, learn_t0: Any) -> None:
    try:
        h = LearnableHorizon(T0, t0, eps=eps, learn_t0=learn_t0)
    except Exception as error:  # noqa: BLE001 - the property is about which exceptions
        expect_clean(error, "T0", "t0", "eps", "learn_t0")
        return
    lo, hi = h.bounds
    assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
    assert torch.isfinite(h.T) and h.T > h.t0
    assert lo <= h.T.item() <= hi
    assert isinstance(repr(h), str) and h.describe()


# ------------------------------------------------------------------ horizon(func, y0, ...)


def _field(t: torch.Tensor, y: Any) -> Any:
    if isinstance(y, tuple):
        return tuple(-(1 + t) * part for part in y)
    return -(1 + t) * y


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(0.5))

    def forward(self, t: torch.Tensor, y: Any) -> Any:
        if isinstance(y, tuple):
            return tuple(-self.rate * part for part in y)
        return -self.rate * y


dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64])
shapes = st.sampled_from([(), (0,), (3,), (2, 2), (0, 2)])
tensors = st.builds(lambda d, s: torch.ones(s, dtype=d) * 0.5 if d != torch.bool else torch.ones(s, dtype=d), dtypes, shapes)
states = st.one_of(
    tensors,
    tensors,
    st.lists(tensors, min_size=0, max_size=3).map(tuple),
    st.lists(tensors, min_size=1, max_size=3).map(tuple),
    st.lists(tensors, min_size=1, max_size=2),
    st.none(),
    st.floats(),
    st.text(max_size=2),
)
times = st.one_of(
    st.none(),
    st.lists(st.floats(-0.5, 1.5), min_size=0, max_size=4),
    st.lists(st.floats(0, 1), min_size=1, max_size=4, unique=True).map(sorted),
    st.just([[0.5]]),
    st.just("0.5"),
    st.just([0.0, float("nan")]),
)
solvers = st.sampled_from(
    [
        ("odeint", dict(method="rk4", options=dict(step_size=0.25))),
        ("odeint", dict(method="dopri5", rtol=1e-3, atol=1e-3)),
        ("odeint", dict(method="euler", options=dict(step_size=0.25))),
        ("adjoint", dict(method="rk4", options=dict(step_size=0.25))),
        ("odeint", dict(method="no-such-method")),
        ("not-callable", {}),
        ("odeint", dict(t=torch.tensor([0.0, 1.0]))),
    ]
)
CALL_ARGS = ("func", "y0", "reverse", "times", "mechanism", "solver", "t", "method", "adjoint_params")


@SETTINGS
@given(
    T0=st.floats(0.2, 2.0),
    t0=st.floats(-1.0, 0.1),
    learn_t0=st.booleans(),
    module_field=st.booleans(),
    y0=states,
    reverse=st.one_of(st.booleans(), st.sampled_from([True, False, 1, None])),
    times=times,
    mechanism=st.sampled_from(["direct", "rescale", "direct", "rescale", "nope", 3]),
    solver=solvers,
)
def test_horizon_call(
    T0: float, t0: float, learn_t0: bool, module_field: bool, y0: Any, reverse: Any, times: Any, mechanism: Any, solver: Any
) -> None:
    h = LearnableHorizon(T0, t0, eps=0.05, learn_t0=learn_t0)
    func = Field() if module_field else _field
    name, kwargs = solver
    backend = {"odeint": torchdiffeq.odeint, "adjoint": torchdiffeq.odeint_adjoint, "not-callable": 3}[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = h(func, y0, solver=backend, reverse=reverse, times=times, mechanism=mechanism, **kwargs)
    except Exception as error:  # noqa: BLE001
        expect_clean(error, *CALL_ARGS)
        return
    parts = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(p.float()).all() for p in parts)
    loss = sum(p.float().sum() for p in parts)
    if loss.requires_grad:
        loss.backward()
        for p in h.parameters_of_time():
            assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad)


# ------------------------------------------------------------------ CoordinateDescentStepper(...) and step()


def _q(choice: str, h: LearnableHorizon, other: nn.Parameter) -> Any:
    return {
        "none": None,
        "sgd": torch.optim.SGD(h.parameters_of_time(), lr=0.1),
        "factory": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "bad-factory": lambda ps: 3,
        "wrong-params": torch.optim.SGD([other], lr=0.1),
        "junk": "adam",
    }[choice]


grads = st.one_of(st.none(), finite, st.floats(), st.floats(min_value=-3e38, max_value=3e38))


@SETTINGS
@given(
    lr=st.one_of(st.floats(0, 10), st.floats(0, 10), reals),
    alpha=st.one_of(st.floats(0, 10), st.floats(0, 10), reals),
    mode=st.sampled_from(["alternate", "exact", "joint"] * 3 + ["bogus", None]),
    q=st.sampled_from(["none", "sgd", "factory"] * 2 + ["bad-factory", "wrong-params", "junk"]),
    reset_at_bound=flags,
    skip_nonfinite=flags,
    learn_t0=st.booleans(),
    steps=st.lists(st.tuples(grads, grads, grads, st.floats(-1, 1)), min_size=1, max_size=4),
)
def test_stepper_constructor_and_steps(
    lr: Any, alpha: Any, mode: Any, q: str, reset_at_bound: Any, skip_nonfinite: Any, learn_t0: bool, steps: list
) -> None:
    h = LearnableHorizon(T0=0.5, learn_t0=learn_t0)
    w = nn.Parameter(torch.zeros(2))
    try:
        stepper = CoordinateDescentStepper(
            torch.optim.Adam([w], lr=1e-2),
            [h],
            lr=lr,
            alpha=alpha,
            mode=mode,
            horizon_optimizer=_q(q, h, w),
            reset_at_bound=reset_at_bound,
            skip_nonfinite=skip_nonfinite,
        )
    except Exception as error:  # noqa: BLE001
        expect_clean(error, "lr", "alpha", "mode", "horizon_optimizer", "reset_at_bound", "skip_nonfinite")
        return
    lo, hi = h.bounds
    for g_w, g_T, g_t0, jump in steps:
        with torch.no_grad():  # move T anywhere in its interval first
            h.T.copy_(torch.tensor(lo + (hi - lo) * (jump + 1) / 2))

        def closure(g_w: Any = g_w, g_T: Any = g_T, g_t0: Any = g_t0) -> torch.Tensor:
            stepper.zero_grad()
            w.grad = None if g_w is None else torch.full_like(w, g_w)
            h.T.grad = None if g_T is None else torch.full_like(h.T, g_T)
            if learn_t0:
                h.t0.grad = None if g_t0 is None else torch.full_like(h.t0, g_t0)
            return torch.zeros(())

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the non-finite warnings are wanted here
            if stepper.mode == "exact":
                stepper.step(closure)
            else:
                closure()
                stepper.step()
        if stepper.mode != "joint":  # joint mode is the unclipped ablation
            assert torch.isfinite(h.T)
            tol = 1e-6 * max(1.0, abs(hi))
            assert lo - tol <= h.T.item() <= hi + tol
            if learn_t0:
                assert torch.isfinite(h.t0) and h.t0.item() <= h.T.item()
    sd = stepper.state_dict()
    stepper.load_state_dict(sd)
    assert isinstance(repr(stepper), str)


def test_as_real_edge_cases() -> None:
    """What the property tests found: huge ints/fractions overflow float(), meta tensors hold no value."""
    for bad in (10**400, Fraction(10**400, 3)):
        with pytest.raises(ValueError, match="T0 must be finite"):
            LearnableHorizon(T0=bad)
    with pytest.raises(TypeError, match="T0 must hold a value"):
        LearnableHorizon(T0=torch.tensor(1.0, device="meta"))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with pytest.raises(ValueError, match="T0=1e\\+39 and t0=0.0 are not distinct finite numbers in the default dtype"):
            LearnableHorizon(T0=1e39, eps=1e38)
        with pytest.raises(ValueError, match="eps=0.1 is below the resolution of torch.float32"):
            LearnableHorizon(T0=1e7, eps=0.1)
    finally:
        torch.set_default_dtype(old)
    with pytest.raises(ValueError, match="times has points too close together"):
        LearnableHorizon(T0=1.0)(lambda t, y: -y, torch.ones(1), times=[1e-300, 0.5])
    with pytest.raises(ValueError, match="times has points too close together"):
        LearnableHorizon(T0=1.0)(lambda t, y: -y, torch.ones(1), times=[1e-17], reverse=True)  # 1 - 1e-17 == 1
    with pytest.raises(ValueError, match="overflows"):
        LearnableHorizon(T0=1e308, t0=-1e308)
    assert as_float(LearnableHorizon(T0=np.float32(0.75)).T) == 0.75
