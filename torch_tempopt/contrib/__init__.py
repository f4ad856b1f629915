r"""Optional adapters that give other ODE solvers odeint's signature, for ``horizon(func, y0,
solver=...)``.

:class:`~torch_tempopt.LearnableHorizon` accepts any ``solver(func, y0, t,
**kwargs)`` that returns the solution at every time of ``t`` stacked on a
leading dimension (a tuple of such tensors for a tuple state). It hands the
solver a *detached* 1-D grid of at least two times, increasing or decreasing,
replaces row 0 by ``y0`` itself and adds :math:`dL/dT` (and :math:`dL/dt_0`)
itself: a solver only differentiates the state and its field's parameters.

* :func:`zuko_solver`: ``zuko.utils.odeint`` (``pip install 'torch-tempopt[zuko]'``).
* :func:`torchode_solver`: torchode's ``AutoDiffAdjoint`` and ``BacksolveAdjoint``
  (``pip install 'torch-tempopt[torchode]'``).
* :func:`final_state_solver`: an integrator that returns only the final state,
  with other argument orders (OT-Flow's ``integrate(x, net, tspan, nt)``).

Importing this package imports neither zuko nor torchode: an adapter imports its
backend when called.
"""

from .final_state import final_state_solver
from .torchode import torchode_solver
from .zuko import zuko_solver

__all__ = ["final_state_solver", "torchode_solver", "zuko_solver"]
