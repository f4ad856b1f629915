"""The solves behind a horizon: adaptive ones with the time gradient added, and solves on a grid of
steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Tuple, Union

import torch
import torchdiffeq
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._checks import check_state, flag

__all__ = ["Call", "adaptive", "add_note", "on_grid", "place"]

State = Union[Tensor, Tuple[Tensor, ...]]
Parts = Tuple[Tensor, ...]
Ends = Tuple[Tensor, Tensor]
Solver = Callable[..., Any]


def add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python < 3.11
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Call:
    """A call's field and initial state, the state kept as a tuple of parts."""

    func: Callable[..., Any]
    is_tuple: bool
    parts: Parts
    reverse: bool

    @classmethod
    def of(cls, func: Any, y0: Any, reverse: Any) -> Call:
        """The call of ``func`` from ``y0``, its arguments checked."""
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}.")
        c = cls(func, *check_state("y0", y0), flag("reverse", reverse))
        if all(p.numel() == 0 for p in c.parts):
            raise ValueError("y0 has no elements; skip the solve for an empty batch.")
        return c

    def time_dtype(self) -> torch.dtype:
        """The state's dtype, at least float32, so that T is not rounded to a
        half-precision grid.
        """
        dtype = self.parts[0].dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def pack(self, parts: Sequence[Tensor]) -> State:
        return tuple(parts) if self.is_tuple else parts[0]

    def unpack(self, y: Any) -> Parts:
        return tuple(y) if self.is_tuple and isinstance(y, (tuple, list)) else (y,)

    def evaluate(self, t: Tensor, ys: Sequence[Tensor]) -> tuple[Any, ...]:
        """``func(t, y)`` on detached inputs, in grad mode (CNF fields take their trace by
        autograd).
        """
        with torch.enable_grad():
            f = self.func(t.detach(), self.pack([p.detach() for p in ys]))
        f = tuple(f) if isinstance(f, (tuple, list)) else (f,)
        return tuple(a.detach() if isinstance(a, Tensor) else a for a in f)

    def diagnose(self, t: Tensor) -> str:
        """One look at the likely cause of a failed solve, after it failed."""
        for i, p in enumerate(self.parts):
            name = f"y0[{i}]" if self.is_tuple else "y0"
            if not bool(torch.isfinite(p).all()):
                return f"{name} holds NaN or inf values."
            if p.dtype in (torch.float16, torch.bfloat16):
                return f"{name} is {p.dtype}, too coarse for error control; solve in float32."
        try:
            f = self.evaluate(t, self.parts)
        except Exception as e:  # the field itself fails, and the traceback above shows where
            return f"func fails at t={t.item():.6g}: {type(e).__name__}."
        if [getattr(a, "shape", None) for a in f] != [p.shape for p in self.parts]:
            got = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in f]
            want = [tuple(p.shape) for p in self.parts]
            return f"func returned {got} for a state of {want}; it must return the same structure."
        if not all(bool(torch.isfinite(a).all()) for a in f):
            return f"func(t0, y0) is not finite at t={t.item():.6g}."
        return (
            "y0 and func(t0, y0) are finite and well shaped; if the step size collapsed, loosen "
            "rtol/atol or solve on a budget (LearnableHorizon(..., budget=N))."
        )


class _TimeGrad(torch.autograd.Function):
    r"""Identity on the state ``y`` at time ``t``; sends ``sign * <dL/dy, F(t, y)>`` to ``t``.

    At the end of a solve (sign +1) this is :math:`dL/dT`, at its start (sign -1)
    :math:`dL/dt_0 = -\langle a(t_0), F(t_0, y_0) \rangle`: one evaluation of the field.
    """

    @staticmethod
    def forward(ctx: Any, call: Call, sign: float, t: Tensor, *y: Tensor) -> Parts:
        ctx.call, ctx.sign = call, sign
        ctx.save_for_backward(t, *y)
        return tuple(p.clone() for p in y)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        t, *y = ctx.saved_tensors
        grad_t = None
        if ctx.needs_input_grad[2]:
            grad_t = torch.zeros_like(t)
            if any(bool(g.any()) for g in grads):
                try:
                    f = ctx.call.evaluate(t, y)
                except Exception as error:
                    add_note(error, "torch_tempopt: the field failed at F(t, y(t)), for dL/dt.")
                    raise
                for fi, g in zip(f, grads):
                    acc = torch.promote_types(torch.promote_types(fi.dtype, g.dtype), t.dtype)
                    grad_t = grad_t + torch.sum(fi.to(acc) * g.to(acc)).to(t.dtype)
                grad_t = ctx.sign * grad_t
        return (None, None, grad_t, *grads)


class _NoGradState(nn.Module):
    """``func``, handed detached states when grad mode is off (as in an adjoint's forward solve).

    A field that makes its input require grad (FFJORD's pattern) is then never handed a no-grad
    view of a state that requires grad, as a learned start time makes ``y0``.
    """

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func = func

    def forward(self, t: Tensor, y: State) -> Any:
        if not torch.is_grad_enabled():
            y = tuple(p.detach() for p in y) if isinstance(y, tuple) else y.detach()
        return self.func(t, y)


def _with_time_grad(call: Call, sign: float, t: Tensor, y: Parts) -> Parts:
    """``y``, attached to ``t``'s gradient if ``t`` is learned and gradients are on."""
    if torch.is_grad_enabled() and t.requires_grad:
        return _TimeGrad.apply(call, sign, t, *y)
    return y


def place(s: Tensor, start: Tensor, end: Tensor) -> list[Tensor]:
    """Times ``start + s (end - start)``, exactly ``start`` where ``s == 0`` and ``end``
    where ``s == 1``.

    A list of 0-dim tensors, so that an end that does not require grad gets no time gradient (nor
    an evaluation).
    """
    t = start + s * (end - start)
    return [start if v == 0 else end if v == 1 else t[i] for i, v in enumerate(s.tolist())]


def _solve(solver: Solver, c: Call, y: Parts, t: Tensor, kw: dict) -> Parts:
    """``solver`` from ``y`` over ``t``, its output checked to be the solution at every time."""
    func = _NoGradState(c.func) if isinstance(c.func, nn.Module) else c.func
    out = c.unpack(solver(func, c.pack(y), t, **kw))
    if [getattr(q, "shape", None) for q in out] != [(t.numel(), *p.shape) for p in y]:
        got = [tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__ for q in out]
        raise ValueError(
            f"solver must return the solution at each of the {t.numel()} times stacked on a "
            f"leading dimension, got {got}; wrap a solver that returns only the final state."
        )
    return out


def _assemble(c: Call, sol: Parts, grid: Sequence[Tensor]) -> Parts:
    """Stacks ``y0`` and the solution at ``grid[1:]``, with dL/dt at every point in the graph."""
    rows = [c.parts] + [
        _with_time_grad(c, 1.0, grid[i], tuple(q[i] for q in sol)) for i in range(1, len(grid))
    ]
    return tuple(torch.stack([r[k] for r in rows]) for k in range(len(c.parts)))


def adaptive(c: Call, s: Tensor, ends: Ends, solver: Solver, kw: dict) -> Parts:
    """``solver`` at the fractions ``s`` of ``ends`` on a detached grid, dL/dt added by the
    horizon.
    """
    start, end = ends[::-1] if c.reverse else ends
    grid = place(s, start, end)
    y = _with_time_grad(c, -1.0, start, c.parts)
    return _assemble(c, _solve(solver, c, y, torch.stack(grid).detach(), kw), grid)


class _Step(torch.autograd.Function):
    """One fixed-grid step from ``y`` at ``a`` to ``b``, recomputed in the backward pass (``*phi``:
    the field's parameters), so that only the states between steps are kept.
    """

    @staticmethod
    def forward(ctx: Any, c: Call, method: str, a: Tensor, b: Tensor, *args: Tensor) -> Parts:
        ctx.c, ctx.method = c, method
        ctx.save_for_backward(a, b, *args)
        return _step(c, method, a, b, args[: len(c.parts)])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        a, b, *args = ctx.saved_tensors
        n = len(ctx.c.parts)
        with torch.enable_grad():
            ins = [x.detach().requires_grad_(True) for x in (a, b, *args[:n])]
            out = _step(ctx.c, ctx.method, ins[0], ins[1], ins[2:])
            pairs = [(o, g) for o, g in zip(out, grads) if o.requires_grad]
            got = torch.autograd.grad(
                [o for o, _ in pairs], [*ins, *args[n:]], [g for _, g in pairs], allow_unused=True
            )
        return (
            None,
            None,
            *[g if need else None for g, need in zip(got, ctx.needs_input_grad[2:])],
        )


def _step(c: Call, method: str, a: Tensor, b: Tensor, y: Sequence[Tensor]) -> Parts:
    return tuple(
        q[-1] for q in _solve(torchdiffeq.odeint, c, y, torch.stack([a, b]), {"method": method})
    )


def _stepwise(c: Call, grid: Sequence[Tensor], method: str, kw: dict) -> Parts:
    """``odeint`` on ``grid`` one step at a time, each step recomputed in the backward pass."""
    if "adjoint_params" in kw:
        phi = tuple(kw["adjoint_params"])
    elif isinstance(c.func, nn.Module):
        phi = tuple(p for p in c.func.parameters() if p.requires_grad)
    else:
        raise TypeError(
            "gradient='checkpoint' needs func to be an nn.Module, or the call's adjoint_params= "
            "to name the parameters it uses."
        )
    rows = [c.parts]
    for a, b in zip(grid[:-1], grid[1:]):
        rows.append(_Step.apply(c, method, a, b, *rows[-1], *phi))
    return tuple(torch.stack([r[k] for r in rows]) for k in range(len(c.parts)))


def on_grid(
    c: Call, s: Tensor, ends: Ends, u: Tensor, method: str, gradient: str, kw: dict
) -> Parts:
    """The solve on the steps at fractions ``u`` of ``ends``, returning the points ``s`` asked for.

    ``gradient``: ``"backprop"`` differentiates the steps (the grid in the graph), ``"checkpoint"``
    too with each step recomputed in backward, ``"adjoint"`` solves torchdiffeq's adjoint backward
    on the same steps (``kw``'s ``adjoint_*`` settings apply), dL/dt added by the horizon.
    """
    wanted = (1 - s).flip(0) if c.reverse else s  # the points asked for, increasing from t0
    extra = wanted[~(wanted[:, None] == u.detach()[None, :]).any(1)]
    v = torch.sort(torch.cat([u, extra])).values
    idx = torch.searchsorted(v.detach(), wanted)
    grid = place(v, *ends)
    if c.reverse:
        grid, idx = grid[::-1], (v.numel() - 1 - idx).flip(0)
    if gradient == "adjoint":
        adjoint = {k: w for k, w in kw.items() if k.startswith("adjoint_")}
        y = _with_time_grad(c, -1.0, grid[0], c.parts)
        t = torch.stack(grid).detach()
        sol = _solve(torchdiffeq.odeint_adjoint, c, y, t, {"method": method, **adjoint})
        return _assemble(c, tuple(q[idx] for q in sol), [grid[i] for i in idx.tolist()])
    if gradient == "checkpoint":
        sol = _stepwise(c, grid, method, kw)
    else:
        sol = _solve(torchdiffeq.odeint, c, c.parts, torch.stack(grid), {"method": method})
    return tuple(torch.cat([p[None], q[idx[1:]]]) for p, q in zip(c.parts, sol))
