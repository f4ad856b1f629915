"""Counting evaluations of a vector field (NFE), split into forward and backward passes."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["NFECounter", "count_nfe", "in_backward"]


def in_backward() -> bool:
    r"""Whether the caller runs inside an autograd backward pass.

    The adjoint method and :class:`~torch_tempopt.LearnableHorizon`'s time
    gradient evaluate the field from within ``backward``; everything else is
    the forward pass.
    """
    # No public torch API tells a backward pass apart: _current_autograd_node is the engine's own
    # record of the node it runs, checked on the torch versions tests/test_gradients.py pins.
    return torch._C._current_autograd_node() is not None


class NFECounter(nn.Module):
    r"""Wraps a vector field ``func(t, y)`` and counts its evaluations.

    Evaluations made inside an autograd backward pass (the adjoint solve of
    ``torchdiffeq.odeint_adjoint``, the one extra evaluation that
    :class:`~torch_tempopt.LearnableHorizon` makes for dL/dT) are counted in
    :attr:`nfe_backward`, all others in :attr:`nfe_forward`.

    If ``func`` is an :class:`~torch.nn.Module` it becomes a submodule, so
    ``parameters()`` (used by ``odeint_adjoint``) sees its parameters; other
    attributes (``before_odeint``, ...) are forwarded to ``func``.

    Arguments:
        func: The vector field, a callable ``func(t, y)``.

    Example:
        >>> import torch
        >>> f = count_nfe(lambda t, y: -y)
        >>> _ = f(torch.tensor(0.0), torch.ones(2))
        >>> f.nfe_forward, f.nfe_backward
        (1, 0)

    """

    nfe_forward: int
    nfe_backward: int

    def __init__(self, func: Callable[..., Any]) -> None:
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}.")
        super().__init__()
        self.func = func
        self.nfe_forward = 0
        self.nfe_backward = 0

    @property
    def nfe(self) -> int:
        """Total number of evaluations, forward and backward."""
        return self.nfe_forward + self.nfe_backward

    def reset(self) -> None:
        """Sets both counters to zero."""
        self.nfe_forward = 0
        self.nfe_backward = 0

    def forward(self, t: torch.Tensor, y: Any) -> Any:  # noqa: D102
        if in_backward():
            self.nfe_backward += 1
        else:
            self.nfe_forward += 1
        return self.func(t, y)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            func = self.__dict__.get("_modules", {}).get("func", self.__dict__.get("func"))
            if func is None or name.startswith("__"):
                raise
            return getattr(func, name)

    def extra_repr(self) -> str:
        return f"nfe_forward={self.nfe_forward}, nfe_backward={self.nfe_backward}"


def count_nfe(func: Callable[..., Any]) -> NFECounter:
    r"""Returns ``func`` wrapped in an :class:`NFECounter` (or ``func`` itself if it is one).

    Arguments:
        func: A vector field ``func(t, y)``.

    Returns:
        The counting wrapper, to be passed wherever ``func`` was.

    Example:
        >>> import torch, torchdiffeq
        >>> f = count_nfe(lambda t, y: -y)
        >>> _ = torchdiffeq.odeint(f, torch.ones(1), torch.tensor([0.0, 1.0]), method="rk4",
        ...                        options=dict(step_size=0.5))
        >>> f.nfe_forward
        8

    """
    if isinstance(func, NFECounter):
        return func
    return NFECounter(func)
