"""Property-based tests on plausible bad inputs: they work or raise ValueError/TypeError naming the
argument.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torchdiffeq
from hypothesis import event, given, settings
from hypothesis import strategies as st

from torch_tempopt import Budget, LearnableHorizon
from torch_tempopt.budget import GRADIENTS

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)

# What a user plausibly passes where a real number is expected: floats (nan, inf too), ints, NumPy
# scalars, 0-dim tensors, and the odd bool, None or string.
reals = st.one_of(
    st.floats(-10, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.builds(np.float32, st.floats(-10, 10, width=32)),
    st.builds(lambda v: torch.tensor(v), st.floats(-10, 10)),
    st.sampled_from([True, None, "1.0", torch.ones(2)]),
)
flags = st.sampled_from([True, False, np.True_, np.False_, 1, None, "yes"])


def _mostly(valid: list, bad: list) -> st.SearchStrategy:
    """Each of ``valid`` three times as likely as each of ``bad``: some Budgets built from five
    arguments are valid.
    """
    return st.sampled_from([*valid, *valid, *valid, *bad])


counts = _mostly([1, 2, 3, 6, np.int64(4)], [0, -1, 2.0, True, None, "4"])
methods = _mostly(["rk4", "euler", "midpoint", "heun3"], ["dopri5", "Euler", None])
gradients = _mostly(list(GRADIENTS), ["Adjoint", None, True])
references = _mostly(
    [None, dict(rtol=1e-6), dict(method="dopri8")],
    [dict(method="rk4"), dict(step_size=0.1), "dopri5", [("rtol", 1e-6)]],
)
capacities = _mostly([1, 4, 8, 64, np.int32(6)], [0, 8.0, None])


def _budget(
    steps: Any, method: Any, gradient: Any, reference: Any, max_steps: Any
) -> Budget | Exception:
    """A Budget, or the ValueError/TypeError its constructor raised (to build the horizon's budget
    argument).
    """
    try:
        return Budget(
            steps, method=method, gradient=gradient, reference=reference, max_steps=max_steps
        )
    except (ValueError, TypeError) as error:
        return error


built = st.builds(_budget, counts, methods, gradients, references, capacities)
budgets = st.one_of(st.none(), counts, built)


def _names(error: Exception, *names: str) -> bool:
    return any(re.match(rf"{re.escape(n)}(\[\d+\])? (must|has no)", str(error)) for n in names)


BUDGET_ARGUMENTS = ("steps", "method", "gradient", "reference", "reference's method", "max_steps")


@SETTINGS
@given(
    steps=counts, method=methods, gradient=gradients, reference=references, max_steps=capacities
)
def test_budget_constructor(
    steps: Any, method: Any, gradient: Any, reference: Any, max_steps: Any
) -> None:
    b = _budget(steps, method, gradient, reference, max_steps)
    event("refused" if isinstance(b, Exception) else "built")
    if isinstance(b, Exception):
        assert _names(b, *BUDGET_ARGUMENTS), b
        return
    assert (
        1 <= b.steps <= b.max_steps == b.placement.shape[0] and len(b.fractions()) == b.steps + 1
    )
    assert (b.method, b.gradient) == (method, gradient) and b.reference == reference
    assert isinstance(repr(b), str) and list(b.parameters()) == []
    for new in (
        b.steps + 1,
        b.max_steps + 1,
        0,
        1.5,
    ):  # growing keeps a valid budget, or raises and changes nothing
        before = (b.steps, b.fractions().clone())
        try:
            b.steps = new
        except (ValueError, TypeError) as error:
            assert _names(error, "steps"), error
            assert b.steps == before[0] and torch.equal(b.fractions(), before[1])
            continue
        u = b.fractions()
        assert b.steps == new and u[0] == 0 and u[-1] == 1 and bool((u[1:] > u[:-1]).all())


@SETTINGS
@given(
    T0=reals, t0=reals, eps=st.one_of(reals, st.floats(1e-3, 1.0)), learn_t0=flags, budget=budgets
)
def test_horizon_constructor(T0: Any, t0: Any, eps: Any, learn_t0: Any, budget: Any) -> None:
    if isinstance(
        budget, Exception
    ):  # Budget refused its arguments: test_budget_constructor's case
        return
    try:
        h = LearnableHorizon(T0, t0, eps=eps, learn_t0=learn_t0, budget=budget)
    except (ValueError, TypeError) as error:
        assert _names(error, "T0", "t0", "eps", "learn_t0", "budget"), error
        return
    lo, hi = h.bounds
    assert math.isfinite(lo) and math.isfinite(hi) and lo < h.T.item() < hi
    assert h.t0.item() < h.T.item() and isinstance(repr(h), str)
    assert h.budget is None or (
        isinstance(h.budget, Budget) and h.budget.steps == len(h.budget.fractions()) - 1 >= 1
    )
    assert h.budget is budget or not isinstance(
        budget, Budget
    )  # a Budget is used as given, not copied


times = st.one_of(
    st.none(),
    st.lists(st.floats(0, 1), min_size=0, max_size=4),
    st.lists(st.floats(0, 1), min_size=1, max_size=3, unique=True).map(
        lambda v: [0.0, *sorted(set(v) - {0.0})]
    ),
    st.sampled_from([[0.0, 1.5], [0.0, float("nan")], "0.5", np.array([0.0, 0.5, 1.0])]),
)
states = st.sampled_from([
    torch.ones(3), (torch.ones(3), torch.zeros(3, 1)), torch.ones(3, dtype=torch.float32),
    torch.ones(3, dtype=torch.long),
    torch.ones(0), (), [torch.ones(2), 1.0], None,
])  # fmt: skip


@SETTINGS
@given(
    y0=states,
    reverse=flags,
    times=times,
    budget=st.sampled_from([None, 3, *GRADIENTS]),
    learn_t0=st.booleans(),
)
def test_horizon_call(y0: Any, reverse: Any, times: Any, budget: Any, learn_t0: bool) -> None:
    budget = Budget(3, gradient=budget) if isinstance(budget, str) else budget
    h = LearnableHorizon(T0=0.5, learn_T=True, learn_t0=learn_t0, budget=budget)

    def field(t: torch.Tensor, y: Any) -> Any:
        return tuple(-p for p in y) if isinstance(y, tuple) else -y

    try:
        solve = {} if budget else dict(method="rk4", options=dict(step_size=0.25))
        if (
            h.budget is not None and h.budget.gradient != "backprop"
        ):  # a plain function has no parameters to name
            solve = dict(solver=torchdiffeq.odeint_adjoint, adjoint_params=())
        out = h(field, y0, reverse=reverse, times=times, **solve)
    except (ValueError, TypeError) as error:
        assert _names(error, "y0", "reverse", "times"), error
        return
    parts = out if isinstance(out, tuple) else (out,)
    assert all(
        p.shape[0] == (2 if times is None else len(times)) and torch.isfinite(p).all()
        for p in parts
    )
    sum(p[-1].sum() for p in parts).backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in (h.T, h.t0) if p.requires_grad
    )
