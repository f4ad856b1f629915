"""Plumbing shared by the adapters: argument checks, optional imports, one solve per interval of
the grid.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

from .._checks import check_state

__all__ = ["State", "chain", "check_call", "pack", "parts_of", "require"]

State = Union[Tensor, "tuple[Tensor, ...]"]


def require(backend: str, user: str) -> ModuleType:
    """Imports the optional ``backend``, or raises an ImportError naming the extra that installs
    it.
    """
    try:
        return importlib.import_module(backend)
    except ImportError as error:
        raise ImportError(
            f"{user} needs {backend}, which is not installed; "
            f"pip install 'torch-tempopt[{backend}]'."
        ) from error


def pack(is_tuple: bool, parts: Sequence[Tensor]) -> State:
    return tuple(parts) if is_tuple else parts[0]


def parts_of(y: Any) -> tuple[Any, ...]:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def check_call(func: Any, y0: Any, t: Any) -> tuple[bool, tuple[Tensor, ...]]:
    """Checks odeint's arguments ``(func, y0, t)``; returns ``(is_tuple, parts)`` of ``y0``."""
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}.")
    is_tuple, parts = check_state("y0", y0)
    if not isinstance(t, Tensor) or not t.is_floating_point():
        got = f"dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"t must be a floating-point tensor of times, got {got}.")
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"t must be 1-D with at least two times, got shape {tuple(t.shape)}.")
    if t.requires_grad:
        raise ValueError(
            "t must not require grad: integrate through LearnableHorizon, which supplies dL/dt, "
            "or pass t.detach()."
        )
    return is_tuple, parts


def chain(
    step: Callable[[tuple[Tensor, ...], Tensor, Tensor], tuple[Tensor, ...]],
    is_tuple: bool,
    parts: tuple[Tensor, ...],
    t: Tensor,
) -> State:
    """Solves interval by interval with ``step(y, t_a, t_b) -> y_b``; stacks the states at every
    time of ``t``.
    """
    rows = [parts]
    for a, b in zip(t[:-1], t[1:]):
        rows.append(step(rows[-1], a, b))
    return pack(is_tuple, [torch.stack(column) for column in zip(*rows)])
