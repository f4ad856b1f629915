r"""``zuko.utils.odeint`` with odeint's signature (``pip install 'torch-tempopt[zuko]'``; tested
with zuko 1.6.0).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import Tensor, nn

from ._common import State, chain, check_call, pack, parts_of, require

__all__ = ["zuko_solver"]


def _phi(func: Any, phi: Iterable[Tensor] | None) -> tuple[Tensor, ...]:
    """The parameters zuko differentiates: ``phi``, or those of a module ``func``; only those that
    require grad.
    """
    if phi is None:
        if not isinstance(func, nn.Module):
            raise ValueError(
                "phi must be given when func is not an nn.Module "
                f"(got {type(func).__name__}): zuko differentiates only the parameters it is "
                "handed; pass phi=tuple(net.parameters()) or ()."
            )
        phi = func.parameters()
    params = tuple(phi)
    if not all(isinstance(p, Tensor) for p in params):
        raise TypeError(
            f"phi must be an iterable of tensors, got {[type(p).__name__ for p in params]}."
        )
    return tuple(p for p in params if p.requires_grad)


def zuko_solver(
    func: Callable[..., Any],
    y0: State,
    t: Tensor,
    *,
    phi: Iterable[Tensor] | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> State:
    r"""Solves :math:`dy/dt = f(t, y)` with ``zuko.utils.odeint`` and returns the solution at every
    time of ``t``.

    One adaptive Dormand-Prince solve per interval of ``t``, chained; zuko's
    adaptive checkpoint adjoint differentiates the state and ``phi``. zuko 1.6
    returns :math:`dL/dt_0` with the wrong sign, which does not matter here:
    :class:`~torch_tempopt.LearnableHorizon` never hands zuko a time that
    requires grad and supplies :math:`dL/dT` (and :math:`dL/dt_0`) itself.

    Arguments:
        func: The field ``func(t, y)``; ``y`` has the structure of ``y0``.
        y0: The initial state, a floating tensor or a tuple of them.
        t: A detached 1-D grid of at least two times, increasing or decreasing.
        phi: The field's parameters (default: ``func.parameters()`` if ``func``
            is an :class:`~torch.nn.Module`); those that require grad must be used by ``func``.
        atol: The absolute tolerance.
        rtol: The relative tolerance.

    Returns:
        The solution with the structure of ``y0``, each part stacked on a leading dimension of
        ``len(t)``.

    Raises:
        ImportError: If zuko is not installed.
        TypeError: For a non-callable ``func``, a non-floating ``y0`` or ``t``, or ``phi`` of
            non-tensors.
        ValueError: For a ``t`` that is not 1-D, or requires grad, or a closure ``func`` without
            ``phi``.

    Example:
        >>> import pytest; _ = pytest.importorskip("zuko")
        >>> import torch
        >>> from torch_tempopt import LearnableHorizon
        >>> horizon = LearnableHorizon(T0=0.5)
        >>> y = horizon(
        ...     lambda t, y: -y, torch.ones(3), solver=zuko_solver, phi=(), atol=1e-8, rtol=1e-8
        ... )
        >>> y[-1].sum().backward()
        >>> round(horizon.T.grad.item(), 4)  # <dL/dy(T), F> = 3 * (-exp(-0.5))
        -1.8196

    """
    require("zuko", "zuko_solver")
    from zuko.utils import odeint

    is_tuple, parts = check_call(func, y0, t)
    params = _phi(func, phi)

    def field(s: Tensor, *y: Tensor) -> Any:  # zuko calls f(t, *parts) for a sequence state
        return tuple(func(s, tuple(y))) if is_tuple else func(s, *y)

    def step(y: tuple[Tensor, ...], a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
        return parts_of(odeint(field, pack(is_tuple, y), a, b, params, atol, rtol))

    return chain(step, is_tuple, parts, t)
