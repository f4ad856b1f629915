"""Argument checks shared by the public classes: one sentence naming the argument, the value and
the fix.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_state", "flag", "keep_float32", "real", "stacklevel", "whole"]


def stacklevel() -> int:
    """The ``stacklevel`` that points the caller's warning at the first frame outside this package
    and torch.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_OURS):
        frame, level = frame.f_back, level + 1
    return level


_OURS = ("torch_tempopt.", "torch.")


def keep_float32(module: Any, names: tuple[str, ...], apply: Any) -> Any:
    """Runs ``apply()`` (a module's ``_apply``) but keeps ``names`` in float32 if it
    halves them.
    """
    before = {n: getattr(module, n).detach() for n in names}
    apply()
    for n, old in before.items():
        p = getattr(module, n)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = old.to(device=p.device, dtype=torch.float32)
    return module


def real(name: str, value: Any) -> float:
    """Returns ``value`` (a Python, NumPy or one-element tensor real) as a finite float."""
    if (
        isinstance(value, Tensor)
        and value.numel() == 1
        and not value.is_complex()
        and value.dtype != torch.bool
    ):
        value = value.detach().item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return float(value)


def flag(name: str, value: Any) -> bool:
    """Returns ``value`` (a Python or NumPy bool) as a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def whole(name: str, value: Any, minimum: int = 1) -> int:
    """Returns ``value`` (a Python or NumPy integer) as an int of at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}.") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return value


def check_state(name: str, y: Any) -> tuple[bool, tuple[Tensor, ...]]:
    """Returns ``(is_tuple, parts)`` for a floating tensor or a non-empty tuple of them."""
    is_tuple = isinstance(y, (tuple, list))
    parts = tuple(y) if is_tuple else (y,)
    if is_tuple and not parts:
        raise TypeError(
            f"{name} must be a floating tensor or a non-empty tuple of them, got an empty {type(y).__name__}."  # noqa: E501 (one message, one line)
        )
    for i, p in enumerate(parts):
        where = f"{name}[{i}]" if is_tuple else name
        if not isinstance(p, Tensor) or not p.is_floating_point():
            got = f"dtype {p.dtype}" if isinstance(p, Tensor) else type(p).__name__
            raise TypeError(
                f"{where} must be a floating-point tensor, got {got}; convert it with torch.as_tensor(..., dtype=torch.float32)."  # noqa: E501 (one message, one line)
            )
    return is_tuple, parts
