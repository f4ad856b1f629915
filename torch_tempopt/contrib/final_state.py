r"""Integrators that return only the final state, with their own argument orders, as odeint-like
solvers.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._common import State, chain, check_call, pack, parts_of

__all__ = ["final_state_solver"]

_SLOTS = ("func", "y0", "t0", "t1", "tspan")
_FIELDS = ("t, y", "y, t")


def _signature(signature: Any) -> tuple[str, ...]:
    """The names of ``integrate``'s positional arguments, checked."""
    if not isinstance(signature, str):
        raise TypeError(
            "signature must be a string such as 'y0, func, tspan', "
            f"got {type(signature).__name__}."
        )
    names = tuple(s.strip() for s in signature.split(","))
    given = set(names)
    if not (
        given <= set(_SLOTS)
        and len(given) == len(names)
        and "y0" in given
        and ("tspan" in given or {"t0", "t1"} <= given)
    ):
        raise ValueError(
            "signature must name y0 and the times (tspan, or t0 and t1), optionally func, "
            f"each once, from {_SLOTS}; got {signature!r}."
        )
    return names


def _final(out: Any, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``integrate``'s result as parts, checked against the structure of the state."""
    parts = parts_of(out)
    if len(parts) != len(like) or any(
        not isinstance(p, Tensor) or p.shape != q.shape for p, q in zip(parts, like)
    ):
        got = [tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__ for p in parts]
        raise ValueError(
            "integrate must return the final state with y0's shapes "
            f"{[tuple(q.shape) for q in like]}, "
            f"got {got}; wrap it to drop a trajectory or extra outputs."
        )
    return parts


def final_state_solver(
    integrate: Callable[..., Any],
    *,
    signature: str = "func, y0, t0, t1",
    field: str = "t, y",
    **kwargs: Any,
) -> Callable[..., State]:
    r"""Makes a solver with odeint's signature from an integrator that returns only the final
    state.

    ``integrate`` is called once per interval of the grid with its positional
    arguments in the order of ``signature`` and ``kwargs`` as keywords; the
    final states are stacked as odeint's, ``[y0, y1, ...]``. Each call gets
    fresh time tensors, so an integrator may advance them in place.

    Arguments:
        integrate: The integrator, differentiable in the state and its field's parameters.
        signature: ``integrate``'s positional arguments in order, from ``func``
            (the field), ``y0``, ``t0``, ``t1`` (0-dim tensors) and ``tspan``
            (``[t0, t1]``). Leave ``func`` out for an integrator that brings its
            own field; the horizon's ``func`` must then compute that same field.
        field: How ``integrate`` calls the field: ``"t, y"`` (odeint) or
            ``"y, t"`` (OT-Flow's ``odefun(x, t, net)``; arguments after these two are ignored).
        kwargs: Keyword arguments of ``integrate`` (``nt=8``); those of a call are added to them.

    Returns:
        A solver ``solver(func, y0, t, **kwargs)``.

    Raises:
        TypeError: If ``integrate`` is not callable or ``signature`` is not a string.
        ValueError: For a malformed ``signature`` or ``field``, or (when called)
            an ``integrate`` that returns something else than the final state.

    Example:
        OT-Flow's ``integrate(x, net, tspan, nt)`` calls its field as ``odefun(x, t, net)``;
        here explicit Euler with the field as an argument:

        >>> import torch
        >>> from torch_tempopt import LearnableHorizon
        >>> def integrate(x, odefun, tspan, nt):
        ...     h, t = (tspan[1] - tspan[0]) / nt, tspan[0]
        ...     for _ in range(nt):
        ...         x, t = x + h * odefun(x, t), t + h
        ...     return x
        >>> solver = final_state_solver(
        ...     integrate, signature="y0, func, tspan", field="y, t", nt=1000
        ... )
        >>> horizon = LearnableHorizon(T0=0.5)
        >>> y = horizon(lambda t, y: -y, torch.ones(3), solver=solver)
        >>> y[-1].sum().backward()
        >>> round(horizon.T.grad.item(), 2)  # <dL/dy(T), F> = 3 * (-exp(-0.5)) = -1.8196
        -1.82

    """
    if not callable(integrate):
        raise TypeError(f"integrate must be callable, got {type(integrate).__name__}.")
    names = _signature(signature)
    order = ", ".join(s.strip() for s in field.split(",")) if isinstance(field, str) else None
    if order not in _FIELDS:
        raise ValueError(
            f"field must be 't, y' or 'y, t' (how integrate calls its field), got {field!r}."
        )

    def solve(func: Callable[..., Any], y0: State, t: Tensor, **call_kwargs: Any) -> State:
        is_tuple, parts = check_call(func, y0, t)
        fn = func if order == "t, y" else (lambda y, s, *_, **__: func(s, y))
        options = {**kwargs, **call_kwargs}

        def step(y: tuple[Tensor, ...], a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
            slots = {
                "func": fn,
                "y0": pack(is_tuple, y),
                "t0": a.clone(),
                "t1": b.clone(),
                "tspan": torch.stack([a, b]),
            }
            return _final(integrate(*(slots[s] for s in names), **options), y)

        return chain(step, is_tuple, parts, t)

    return solve
