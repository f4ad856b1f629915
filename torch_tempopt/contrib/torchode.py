r"""torchode's solvers with odeint's signature (``pip install 'torch-tempopt[torchode]'``; tested
with torchode 1.0.1).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._common import State, check_call, pack, parts_of, require

__all__ = ["torchode_solver"]

_ADJOINTS = ("autodiff", "backsolve")


class _Flat(nn.Module):
    """``func(t, y)`` on the whole state flattened into one row, as torchode integrates it (a batch
    of one problem).
    """

    def __init__(
        self, func: Callable[..., Any], is_tuple: bool, parts: tuple[Tensor, ...]
    ) -> None:
        super().__init__()
        self.func, self.is_tuple = (
            func,
            is_tuple,
        )  # a module func becomes a submodule: the backsolve adjoint finds it
        self.shapes = [p.shape for p in parts]

    def unpack(self, flat: Tensor) -> State:
        pieces = flat.split([math.prod(s) for s in self.shapes], dim=-1)
        return pack(
            self.is_tuple, [q.reshape(*flat.shape[:-1], *s) for q, s in zip(pieces, self.shapes)]
        )

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        # (1,) and (1, n) from AutoDiffAdjoint, () and (n,) under BacksolveAdjoint's vmap.
        out = parts_of(self.func(t.reshape(()), self.unpack(y.reshape(-1))))
        return torch.cat([o.reshape(-1) for o in out]).reshape(y.shape)


def torchode_solver(
    func: Callable[..., Any],
    y0: State,
    t: Tensor,
    *,
    method: str = "dopri5",
    atol: float = 1e-7,
    rtol: float = 1e-7,
    adjoint: str = "autodiff",
) -> State:
    r"""Solves :math:`dy/dt = f(t, y)` with torchode and returns the solution at every time of
    ``t``.

    The whole state is one torchode problem, so ``func`` is called as by
    odeint. ``adjoint="backsolve"`` (``BacksolveAdjoint``) returns no time
    gradient; :class:`~torch_tempopt.LearnableHorizon` supplies :math:`dL/dT`
    (and :math:`dL/dt_0`) itself.

    Arguments:
        func: The field ``func(t, y)``; an :class:`~torch.nn.Module` for ``"backsolve"``,
            which differentiates only the parameters of the module it integrates.
        y0: The initial state, a floating tensor or a tuple of them.
        t: A detached 1-D grid of at least two times, increasing or decreasing.
        method: A step method registered in torchode: ``"dopri5"``, ``"tsit5"``, ``"heun"``.
        atol: The absolute tolerance of the PID step-size controller.
        rtol: The relative tolerance of the PID step-size controller.
        adjoint: ``"autodiff"`` (``AutoDiffAdjoint``: backpropagate through the
            steps) or ``"backsolve"`` (``BacksolveAdjoint``: solve the adjoint equation backwards).

    Returns:
        The solution with the structure of ``y0``, each part stacked on a leading dimension of
        ``len(t)``.

    Raises:
        ImportError: If torchode is not installed.
        TypeError: For a non-callable ``func`` (a non-module one with ``"backsolve"``), a
            non-floating ``y0`` or ``t``.
        ValueError: For an unknown ``method`` or ``adjoint``, or a ``t`` that is not 1-D or
            requires grad.
        RuntimeError: If torchode stops before the end of ``t``.

    Example:
        >>> import pytest; _ = pytest.importorskip("torchode")
        >>> import torch
        >>> from torch_tempopt import LearnableHorizon
        >>> class Decay(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.rate = torch.nn.Parameter(torch.ones(()))
        ...     def forward(self, t, y):
        ...         return -self.rate * y
        >>> horizon = LearnableHorizon(T0=0.5)
        >>> y = horizon(Decay(), torch.ones(3), solver=torchode_solver, adjoint="backsolve")
        >>> y[-1].sum().backward()
        >>> round(horizon.T.grad.item(), 4)  # <dL/dy(T), F> = 3 * (-exp(-0.5))
        -1.8196

    """
    to = require("torchode", "torchode_solver")
    from torchode.interface import METHODS

    if adjoint not in _ADJOINTS:
        raise ValueError(f"adjoint must be one of {_ADJOINTS}, got {adjoint!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of torchode's {sorted(METHODS)}, got {method!r}.")
    is_tuple, parts = check_call(func, y0, t)
    if adjoint == "backsolve" and not isinstance(func, nn.Module):
        raise TypeError(
            f"func must be an nn.Module with adjoint='backsolve', got {type(func).__name__}: "
            "BacksolveAdjoint differentiates only the parameters of the module it integrates."
        )
    field = _Flat(func, is_tuple, parts)
    term = to.ODETerm(field)
    stepper, control = (
        METHODS[method](term=term),
        to.PIDController(atol, rtol, 0.2, 0.5, 0.0, term=term),
    )
    engine = (
        to.AutoDiffAdjoint(stepper, control)
        if adjoint == "autodiff"
        else to.BacksolveAdjoint(term, stepper, control)
    )
    flat = torch.cat([p.reshape(-1) for p in parts])[None]
    sol = engine.solve(to.InitialValueProblem(y0=flat, t_eval=t[None]))
    if int(sol.status[0]) != 0:
        raise RuntimeError(
            "torchode stopped before the end of t with status "
            f"{to.Status(int(sol.status[0])).name}."
        )
    return field.unpack(sol.ys[0])
