"""Property-based tests on plausible bad inputs: they work or raise ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_tempopt import LearnableHorizon

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)

# What a user plausibly passes where a real number is expected: floats (nan, inf too), ints, NumPy scalars,
# 0-dim tensors, and the odd bool, None or string.
reals = st.one_of(
    st.floats(-10, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.builds(np.float32, st.floats(-10, 10, width=32)),
    st.builds(lambda v: torch.tensor(v), st.floats(-10, 10)),
    st.sampled_from([True, None, "1.0", torch.ones(2)]),
)
flags = st.sampled_from([True, False, np.True_, np.False_, 1, None, "yes"])
budgets = st.one_of(st.none(), st.integers(-1, 6), st.builds(np.int64, st.integers(0, 6)), st.sampled_from([2.0, True]))


def _names(error: Exception, *names: str) -> bool:
    return any(re.match(rf"{re.escape(n)}(\[\d+\])? (must|has no)", str(error)) for n in names)


@SETTINGS
@given(T0=reals, t0=reals, eps=st.one_of(reals, st.floats(1e-3, 1.0)), learn_t0=flags, budget=budgets)
def test_horizon_constructor(T0: Any, t0: Any, eps: Any, learn_t0: Any, budget: Any) -> None:
    try:
        h = LearnableHorizon(T0, t0, eps=eps, learn_t0=learn_t0, budget=budget)
    except (ValueError, TypeError) as error:
        assert _names(error, "T0", "t0", "eps", "learn_t0", "budget"), error
        return
    lo, hi = h.bounds
    assert math.isfinite(lo) and math.isfinite(hi) and lo < h.T.item() < hi
    assert h.t0.item() < h.T.item() and isinstance(repr(h), str)
    assert h.budget is None or h.budget == len(h.fractions()) - 1 >= 1


times = st.one_of(
    st.none(),
    st.lists(st.floats(0, 1), min_size=0, max_size=4),
    st.lists(st.floats(0, 1), min_size=1, max_size=3, unique=True).map(lambda v: [0.0, *sorted(set(v) - {0.0})]),
    st.sampled_from([[0.0, 1.5], [0.0, float("nan")], "0.5", np.array([0.0, 0.5, 1.0])]),
)
states = st.sampled_from([
    torch.ones(3), (torch.ones(3), torch.zeros(3, 1)), torch.ones(3, dtype=torch.float32), torch.ones(3, dtype=torch.long),
    torch.ones(0), (), [torch.ones(2), 1.0], None,
])  # fmt: skip


@SETTINGS
@given(y0=states, reverse=flags, times=times, budget=st.sampled_from([None, 3]), learn_t0=st.booleans())
def test_horizon_call(y0: Any, reverse: Any, times: Any, budget: Any, learn_t0: bool) -> None:
    h = LearnableHorizon(T0=0.5, learn_T=True, learn_t0=learn_t0, budget=budget)

    def field(t: torch.Tensor, y: Any) -> Any:
        return tuple(-p for p in y) if isinstance(y, tuple) else -y

    try:
        solve = {} if budget else dict(method="rk4", options=dict(step_size=0.25))
        out = h(field, y0, reverse=reverse, times=times, **solve)
    except (ValueError, TypeError) as error:
        assert _names(error, "y0", "reverse", "times"), error
        return
    parts = out if isinstance(out, tuple) else (out,)
    assert all(p.shape[0] == (2 if times is None else len(times)) and torch.isfinite(p).all() for p in parts)
    sum(p[-1].sum() for p in parts).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (h.T, h.t0) if p.requires_grad)
