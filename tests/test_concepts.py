"""The time-rescaling argument of docs/concepts.md: over [0, T] and rescaled to [0, 1], dopri5
takes the same steps.
"""

from __future__ import annotations

import pytest

from benchmarks.rescaling import counts


@pytest.mark.parametrize("T", [0.25, 0.5, 1.0, 2.0])
def test_rescaled_solve_takes_the_same_steps_when_the_first_step_is_scaled(T: float) -> None:
    r = counts(T, first_step=0.01 * T)
    assert r["nfe_over_T"] == r["nfe_rescaled"]
    assert r["max_state_difference"] < 1e-12


def test_only_the_initial_step_heuristic_differs() -> None:
    """torchdiffeq's first-step heuristic does not scale with time: at small T the counts can
    differ.
    """
    small = counts(0.25)
    assert small["nfe_over_T"] != small["nfe_rescaled"] and small["max_state_difference"] < 1e-4
    assert counts(1.0)["nfe_over_T"] == counts(1.0)["nfe_rescaled"]
