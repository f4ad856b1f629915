"""Argument checks shared by the public classes: early, explanatory errors."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["as_real", "check_state"]


def as_real(name: str, value: object) -> float:
    r"""Returns ``value`` as a finite Python float, or raises.

    Arguments:
        name: The argument's name, quoted in the error message.
        value: A real number or a 0-dim real tensor.

    Raises:
        TypeError: If ``value`` is not a real number (``bool`` is refused too).
        ValueError: If ``value`` is NaN or infinite (or beyond the range of a float).

    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a real number or a one-element real tensor, "
                f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}."
            )
        try:
            value = value.detach().item()
        except (RuntimeError, NotImplementedError) as error:  # e.g. a meta tensor, which holds no value
            raise TypeError(f"{name} must hold a value, got a tensor on device {value.device}: {error}") from error
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}.")
    try:
        value = float(value)
    except OverflowError:  # an int or Fraction beyond the float range
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}. Pass a finite number.")
    return value


def check_state(name: str, y: object) -> tuple[bool, tuple[torch.Tensor, ...]]:
    r"""Checks that ``y`` is a floating tensor or a non-empty tuple/list of them.

    Returns:
        ``(is_tuple, tensors)``.

    Raises:
        TypeError: Naming ``name`` and what was found instead.

    """
    if isinstance(y, torch.Tensor):
        parts: tuple[torch.Tensor, ...] = (y,)
        is_tuple = False
    elif isinstance(y, (tuple, list)):
        if len(y) == 0:
            raise TypeError(f"{name} must be a floating tensor or a non-empty tuple of them, got an empty {type(y).__name__}.")
        parts = tuple(y)
        is_tuple = True
    else:
        raise TypeError(
            f"{name} must be a floating-point tensor or a tuple of them, got {type(y).__name__}. "
            "Convert it with torch.as_tensor(..., dtype=torch.float32)."
        )
    for i, p in enumerate(parts):
        where = f"{name}[{i}]" if is_tuple else name
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where} must be a tensor, got {type(p).__name__}.")
        if not p.is_floating_point():
            raise TypeError(
                f"{where} must be a floating-point tensor, got dtype {p.dtype}. "
                f"Cast it first, e.g. {where}.float() or {where}.double()."
            )
    return is_tuple, parts
