r"""Reference code for the ``torch_tempopt`` examples: data sets and an FFJORD-style CNF.

The package is not part of the library's import path: it depends on scikit-learn.

``examples.data``
    Seeded 2-D toy densities, the 8x8 digits split, dequantization, the logit
    transform and bits per dimension.
``examples.cnf``
    ODE networks, an :class:`~examples.cnf.ODEfunc` with exact or Hutchinson
    divergence and RNODE regularisers, and CNF blocks whose end time is a
    :class:`torch_tempopt.LearnableHorizon`.
"""

from __future__ import annotations

__all__: list[str] = []
