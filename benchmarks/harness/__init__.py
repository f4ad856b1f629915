r"""The benchmarks' harness: data sets, an FFJORD-style CNF, the training runner, figures.

It depends on scikit-learn and matplotlib and is not part of the library's import path; what a user
copies lives in ``examples/``.

``benchmarks.harness.data``
    Seeded 2-D toy densities, the 8x8 digits split, dequantization, the logit
    transform and bits per dimension.
``benchmarks.harness.cnf``
    ODE networks, an :class:`~benchmarks.harness.cnf.ODEfunc` with exact or Hutchinson
    divergence and RNODE regularisers, and CNF blocks whose end time is a
    :class:`torch_tempopt.LearnableHorizon`.
``benchmarks.harness.train``
    The training runner (``python -m benchmarks.harness.train``): methods, budgets,
    guard, checkpoints and exact resume, a CSV log per run.
``benchmarks.harness.plots``
    Figures from the runner's run directories.
"""

from __future__ import annotations

__all__: list[str] = []
