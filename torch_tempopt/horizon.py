r"""A learnable integration interval [t0, T] that replaces an ``odeint`` call, optionally on a budget of steps."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Sequence, Union

import torch
import torchdiffeq
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._checks import check_state, flag, real, whole

__all__ = ["FIXED_GRID_METHODS", "LearnableHorizon"]

State = Union[Tensor, "tuple[Tensor, ...]"]

#: torchdiffeq's fixed-grid methods a budget can use, with their order of accuracy.
FIXED_GRID_METHODS = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4,
                      "explicit_adams": 4, "implicit_adams": 4, "fixed_adams": 4}

# Keyword arguments that configure an adaptive solve: on a budget they define the reference, not the solve.
_ADAPTIVE_KEYS = ("method", "options", "rtol", "atol", "adjoint_method", "adjoint_options", "adjoint_rtol", "adjoint_atol")
_STEP_FAILURE = re.compile(r"underflow in dt|max_num_steps|step size|maximum number of")


def _pack(is_tuple: bool, parts: Sequence[Tensor]) -> State:
    return tuple(parts) if is_tuple else parts[0]


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32, so that T is not rounded to a half-precision grid."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python < 3.11
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


def _evaluate(func: Callable[..., Any], is_tuple: bool, t: Tensor, ys: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``func(t, y)`` without a graph; a field that needs grad mode from outside gets it on a second try."""
    y = _pack(is_tuple, [p.detach() for p in ys])
    try:
        with torch.no_grad():
            f = func(t.detach(), y)
    except RuntimeError as error:
        if "grad" not in str(error):
            raise
        with torch.enable_grad():
            f = func(t.detach(), y)
    return tuple(f) if isinstance(f, (tuple, list)) else (f,)


class _TimeGrad(torch.autograd.Function):
    r"""Identity on the state ``y`` at time ``t``; sends ``sign * <dL/dy, F(t, y)>`` to ``t``.

    At the end of a solve (sign +1) this is :math:`dL/dT`, at its start (sign -1)
    :math:`dL/dt_0 = -\langle a(t_0), F(t_0, y_0) \rangle`: one evaluation of the field.
    """

    @staticmethod
    def forward(ctx: Any, func: Callable[..., Any], is_tuple: bool, sign: float, t: Tensor, *y: Tensor) -> tuple[Tensor, ...]:
        ctx.func, ctx.is_tuple, ctx.sign = func, is_tuple, sign
        ctx.save_for_backward(t, *y)
        return tuple(p.clone() for p in y)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        t, *y = ctx.saved_tensors
        grad_t = None
        if ctx.needs_input_grad[3]:
            grad_t = torch.zeros_like(t)
            if any(bool(g.any()) for g in grads):
                try:
                    f = _evaluate(ctx.func, ctx.is_tuple, t, y)
                except Exception as error:
                    _add_note(error, "torch_tempopt: the field failed at the one evaluation F(t, y(t)) that dL/dt needs.")
                    raise
                for fi, g in zip(f, grads):
                    acc = torch.promote_types(torch.promote_types(fi.dtype, g.dtype), t.dtype)
                    grad_t = grad_t + torch.sum(fi.to(acc) * g.to(acc)).to(t.dtype)
                grad_t = ctx.sign * grad_t
        return (None, None, None, grad_t, *grads)


def _diagnose(func: Callable[..., Any], is_tuple: bool, y: Sequence[Tensor], t: Tensor, error: BaseException) -> str:
    """One look at the likely cause of a failed solve."""
    name = (lambda i: f"y0[{i}]") if is_tuple else (lambda i: "y0")
    for i, p in enumerate(y):
        if not bool(torch.isfinite(p).all()):
            return f"{name(i)} holds NaN or inf values."
        if p.dtype in (torch.float16, torch.bfloat16):
            return f"{name(i)} is {p.dtype}, too coarse for a solver's error control; integrate in float32 or float64."
    try:
        f = _evaluate(func, is_tuple, t, y)
    except Exception as e:  # the field itself fails, and the traceback above shows where
        return f"func fails at t={t.item():.6g}: {type(e).__name__}."
    if len(f) != len(y) or any(not isinstance(a, Tensor) or a.shape != b.shape for a, b in zip(f, y)):
        got = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in f]
        return f"func returned {got} for a state of {[tuple(p.shape) for p in y]}; it must return a tangent of the same structure."
    if not all(bool(torch.isfinite(a).all()) for a in f):
        return f"func(t0, y0) is not finite at t={t.item():.6g}."
    if _STEP_FAILURE.search(str(error)):
        return ("the step size collapsed: loosen rtol/atol, bound the step with options=dict(min_step=...), "
                "or solve on a fixed budget (LearnableHorizon(..., budget=N)).")
    return "y0 and func(t0, y0) look fine; see the error above."


def _place(s: Tensor, start: Tensor, end: Tensor) -> list[Tensor]:
    """Times ``start + s (end - start)``, exactly ``start`` where ``s == 0`` and ``end`` where ``s == 1``.

    A list of 0-dim tensors, so that an end that does not require grad gets no time gradient (nor an evaluation).
    """
    t = start + s * (end - start)
    return [start if v == 0 else end if v == 1 else t[i] for i, v in enumerate(s.tolist())]


class LearnableHorizon(nn.Module):
    r"""Integrates an ODE over [t0, T] with T (and optionally t0) learnable: a drop-in for ``odeint``.

    ``horizon(func, y0, **kwargs)`` returns what ``solver(func, y0,
    torch.tensor([t0, T]), **kwargs)`` returns: every part of the state with a
    leading time dimension holding the start and the end of the solve
    (``reverse=True``: ``[T, t0]``, the sampling direction). So
    ``z_t = odeint(f, z0, t)`` becomes ``z_t = horizon(f, z0)`` and the code after
    it does not change. The end time receives

    .. math:: \frac{dL}{dT} = \left\langle \frac{dL}{dy(T)}, F(T, y(T)) \right\rangle

    (TO-FLOW, eq. 12-13), a learned ``t0`` receives
    :math:`-\langle dL/dy(t_0), F(t_0, y_0) \rangle`: the solver gets a *detached*
    grid and the horizon adds the time gradient itself, with one extra
    evaluation of ``func`` per learned end point. It is therefore the same on
    every backend and never counted twice.

    **On a budget** (``budget=N``) the solve takes exactly N steps of the
    fixed-grid ``method`` (rk4: 4N evaluations), whatever the ``method`` and
    tolerances passed in the call, which then define the adaptive *reference*
    used by :meth:`error` and :meth:`fit`. The N steps are placed by
    :attr:`placement` (uniform at first; learned against the reference by
    :meth:`fit` or by :class:`~torch_tempopt.CoordinateDescentStepper`, never by
    the training loss). With ``solver=torchdiffeq.odeint`` the grid stays in the
    graph and dL/dT is the exact derivative of the discrete solution, at no
    extra evaluation; with ``torchdiffeq.odeint_adjoint``, whose weight
    gradients are the continuous adjoint on the same grid, it is the
    continuous formula above, like theirs.

    Arguments:
        T0: The initial end time, > ``t0``.
        t0: The initial start time.
        eps: The clip margin of eq. 17: :meth:`clip_` keeps T in
            ``[t0 + eps, 2 * T0 - t0 - eps]``.
        learn_t0: Whether ``t0`` is a parameter too.
        budget: Solve on this many fixed steps (``None``: the solver's own steps).
        method: The fixed-grid torchdiffeq method of the budget.

    Attributes:
        T: The end time, a 0-dim parameter (freeze it with ``T.requires_grad_(False)``).
        t0: The start time, a 0-dim buffer, or a parameter if ``learn_t0``.
        placement: With a budget, ``N`` logits of the step lengths (uniform at 0),
            else ``None``. ``placement.requires_grad_(False)`` keeps it uniform.

    Example:
        >>> import torch
        >>> horizon = LearnableHorizon(T0=0.5)
        >>> y = horizon(lambda t, y: -y, torch.ones(3))  # as odeint(f, y0, torch.tensor([0.0, 0.5]))
        >>> y.shape
        torch.Size([2, 3])
        >>> y[-1].sum().backward()
        >>> round(horizon.T.grad.item(), 4)  # <dL/dy(T), F> = 3 * (-exp(-0.5))
        -1.8196

    References:
        | TO-FLOW: Efficient Continuous Normalizing Flows with Temporal Optimization adjoint with Moving Speed
        | Du et al., 2022 (https://arxiv.org/abs/2203.10335)

    """

    T: nn.Parameter
    t0: Tensor
    placement: nn.Parameter | None

    def __init__(self, T0: float | Tensor = 1.0, t0: float | Tensor = 0.0, *, eps: float = 0.1,
                 learn_t0: bool = False, budget: int | None = None, method: str = "rk4") -> None:
        super().__init__()
        T0_, t0_, eps_ = real("T0", T0), real("t0", t0), real("eps", eps)
        if T0_ <= t0_:
            raise ValueError(f"T0 must be greater than t0, got T0={T0_} and t0={t0_}; integrate backwards with reverse=True.")
        if not 0 < eps_ < T0_ - t0_:
            raise ValueError(f"eps must lie in (0, T0 - t0) = (0, {T0_ - t0_}) for a non-empty clip interval, got {eps_}.")
        if method not in FIXED_GRID_METHODS:
            raise ValueError(f"method must be a fixed-grid torchdiffeq method, one of {sorted(FIXED_GRID_METHODS)}, got {method!r}.")
        self.T = nn.Parameter(torch.tensor(T0_))
        if flag("learn_t0", learn_t0):
            self.t0 = nn.Parameter(torch.tensor(t0_))
        else:
            self.register_buffer("t0", torch.tensor(t0_))
        self.T0, self.t0_init, self.eps, self.learn_t0, self.method = T0_, t0_, eps_, bool(learn_t0), method
        self.register_parameter("placement", None)
        if budget is not None:
            self.set_budget(budget)
        self._last: tuple[Any, ...] | None = None  # the last budgeted call in training, for the stepper's guard
        self._off = False  # inside adaptive()

    # ------------------------------------------------------------------ time parameters
    @property
    def bounds(self) -> tuple[float, float]:
        """The clip interval of T, ``(t0 + eps, 2 * T0 - t0 - eps)`` from the initial values."""
        return self.t0_init + self.eps, 2 * self.T0 - self.t0_init - self.eps

    @torch.no_grad()
    def clip_(self) -> bool:
        """Clips T into :attr:`bounds`, a learned t0 into ``[2 t0 - T0 + eps, min(T0, T) - eps]``; True if either moved."""
        before = (self.T.item(), self.t0.item())
        self.T.clamp_(*self.bounds)
        if self.learn_t0:
            self.t0.clamp_(2 * self.t0_init - self.T0 + self.eps, min(self.T0, self.T.item()) - self.eps)
        return before != (self.T.item(), self.t0.item())

    @property
    def budget(self) -> int | None:
        """The number of fixed steps per solve, or ``None`` for the solver's own steps."""
        return None if self.placement is None else self.placement.shape[0]

    @torch.no_grad()
    def set_budget(self, budget: int) -> None:
        """Sets the number of steps, keeping the learned placement's density of steps."""
        n = whole("budget", budget)
        if self.placement is None:
            self.placement = nn.Parameter(torch.zeros(n, dtype=self.T.dtype, device=self.T.device))
            return
        old, m = self.fractions().detach(), self.placement.shape[0]
        pos = torch.linspace(0, m, n + 1, dtype=old.dtype, device=old.device)
        i = pos.floor().clamp(max=m - 1).long()
        new = old[i] + (pos - i) * (old[i + 1] - old[i])
        logits = new.diff().clamp_min(1e-6).log()
        # A new parameter (the stepper follows it): a live graph may still hold the old one's shape.
        self.placement = nn.Parameter(logits - logits.mean(), requires_grad=self.placement.requires_grad)

    @contextlib.contextmanager
    def adaptive(self) -> Iterator[None]:
        """Within the block, solves with the call's own (adaptive) settings, ignoring the budget: to score a model.

        Example:
            >>> import torch
            >>> horizon = LearnableHorizon(T0=1.0, budget=2)
            >>> with horizon.adaptive():
            ...     y = horizon(lambda t, y: -y, torch.ones(1), rtol=1e-9, atol=1e-9)
            >>> round(y[-1].item(), 6)  # exp(-1), not the 2-step rk4 value 0.368171
            0.367879

        """
        self._off, before = True, self._off
        try:
            yield
        finally:
            self._off = before

    def fractions(self) -> Tensor:
        """The budget's N + 1 step boundaries as fractions of [t0, T], from 0 to 1 (increasing by construction)."""
        if self.placement is None:
            raise ValueError("fractions needs a budget; construct the horizon with budget=N or call set_budget(N).")
        c = torch.cumsum(torch.softmax(self.placement, 0), 0)
        return torch.cat([c.new_zeros(1), c[:-1], c.new_ones(1)])

    # ------------------------------------------------------------------ solving
    def forward(self, func: Callable[..., Any], y0: State, *, solver: Callable[..., Any] = torchdiffeq.odeint,
                reverse: bool = False, times: Tensor | Sequence[float] | None = None, **kwargs: Any) -> State:
        r"""Returns ``solver(func, y0, [t0, T], **kwargs)``: the solution at the start and the end.

        Arguments:
            func: The vector field ``func(t, y)``.
            y0: The initial state, a floating tensor or a tuple of them.
            solver: Any callable with odeint's signature that returns the solution
                at every time of ``t`` (``torchdiffeq.odeint``, ``odeint_adjoint``,
                :mod:`torch_tempopt.contrib` adapters); on a budget, torchdiffeq's two.
            reverse: Integrate from T back to t0 (the sampling direction): ``[T, t0]``.
            times: Increasing fractions of the interval from the start of the
                integration, beginning with 0, to return the solution at (as
                odeint's ``t``); default ``[0, 1]``. On a budget, a point that is
                not on the grid adds a step.
            kwargs: Passed to ``solver`` (``method``, ``rtol``, ``atol``, ``options``,
                ``adjoint_params``, ...). On a budget, the adaptive settings among
                them define the reference and are not passed to the budgeted solve.

        Returns:
            The solution with the structure of ``y0``, each part with a leading
            dimension of ``len(times)`` (2 by default).

        Raises:
            TypeError: For a non-callable ``func``/``solver``, a non-floating ``y0``,
                a ``t`` argument, or a budget with another solver than torchdiffeq's.
            ValueError: For an empty ``y0`` or ``times`` that are not increasing
                fractions in [0, 1] beginning with 0.

        A failing solve keeps its exception, with a note that names the likely
        cause: a non-finite or half-precision ``y0``, a field that fails or
        returns the wrong structure, or a collapsing step size.

        """
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}.")
        if not callable(solver):
            raise TypeError(f"solver must be callable as solver(func, y0, t, **kwargs), got {type(solver).__name__}.")
        reverse = flag("reverse", reverse)
        if "t" in kwargs:
            raise TypeError("t must not be passed: the horizon builds [t0, T] itself; use times= for more points.")
        is_tuple, parts = check_state("y0", y0)
        if all(p.numel() == 0 for p in parts):
            raise ValueError("y0 has no elements; skip the solve for an empty batch.")
        dtype, device = _time_dtype(parts[0].dtype), parts[0].device
        s = self._times(times, dtype, device)
        t0, T = self.t0.to(dtype=dtype, device=device), self.T.to(dtype=dtype, device=device)
        if self.placement is None or self._off:
            out = self._adaptive(func, is_tuple, parts, s, (T, t0) if reverse else (t0, T), solver, kwargs)
        else:
            if solver is not torchdiffeq.odeint and solver is not torchdiffeq.odeint_adjoint:
                raise TypeError(f"solver must be torchdiffeq.odeint or torchdiffeq.odeint_adjoint on a budget, got {solver!r}.")
            if torch.is_grad_enabled():
                ref = {k: v for k, v in kwargs.items() if k in ("method", "options", "rtol", "atol")}
                self._last = (func, is_tuple, tuple(p.detach() for p in parts), reverse, ref)
            out = self._budgeted(func, is_tuple, parts, s, t0, T, reverse, solver, kwargs, track=False)
            if torch.is_grad_enabled() and self.placement.requires_grad:  # a zero gradient, so DDP sees it used
                out = (out[0] + 0 * self.placement.sum().to(out[0].dtype), *out[1:])
        return _pack(is_tuple, out)

    def _times(self, times: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
        if times is None:
            return torch.tensor([0.0, 1.0], dtype=dtype, device=device)
        try:
            s = torch.as_tensor(times, dtype=dtype, device=device).detach()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"times must be a 1-D sequence of fractions in [0, 1], got {times!r}.") from None
        if s.dim() != 1 or s.numel() < 2 or s[0] != 0 or not bool(((s[1:] > s[:-1]) & (s[1:] <= 1)).all()):
            raise ValueError(f"times must be increasing fractions of the interval in [0, 1] beginning with 0, got {s.tolist()}.")
        return s

    def _adaptive(self, func: Callable[..., Any], is_tuple: bool, parts: tuple[Tensor, ...], s: Tensor,
                  ends: tuple[Tensor, Tensor], solver: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
        start, end = ends
        grid = _place(s, start, end)
        y = parts
        if torch.is_grad_enabled() and start.requires_grad:
            y = _TimeGrad.apply(func, is_tuple, -1.0, start, *parts)
        sol = self._solve(solver, func, is_tuple, y, torch.stack(grid).detach(), kwargs)
        return self._assemble(func, is_tuple, parts, sol, grid)

    def _budgeted(self, func: Callable[..., Any], is_tuple: bool, parts: tuple[Tensor, ...], s: Tensor, t0: Tensor,
                  T: Tensor, reverse: bool, solver: Callable[..., Any], kwargs: dict[str, Any], track: bool) -> tuple[Tensor, ...]:
        u = self.fractions().to(s)  # dtype and device of the state: a horizon may live elsewhere
        u = u if track else u.detach()
        wanted = (1 - s).flip(0) if reverse else s  # the points asked for, as increasing fractions from t0
        extra = wanted[~(wanted[:, None] == u.detach()[None, :]).any(1)]
        v = torch.sort(torch.cat([u, extra])).values
        idx = torch.searchsorted(v.detach(), wanted)
        grid = _place(v, t0, T)
        if reverse:
            grid, idx = grid[::-1], (v.numel() - 1 - idx).flip(0)
        kw = {k: v for k, v in kwargs.items() if k not in _ADAPTIVE_KEYS}
        kw["method"] = self.method
        if solver is torchdiffeq.odeint:  # backprop through the steps: the exact derivative of the discrete solution
            sol = self._solve(solver, func, is_tuple, parts, torch.stack(grid), kw)
            return tuple(torch.cat([p[None], q[idx[1:]]]) for p, q in zip(parts, sol))
        y, start = parts, T if reverse else t0
        if torch.is_grad_enabled() and start.requires_grad:
            y = _TimeGrad.apply(func, is_tuple, -1.0, start, *parts)
        sol = self._solve(solver, func, is_tuple, y, torch.stack(grid).detach(), kw)
        return self._assemble(func, is_tuple, parts, tuple(q[idx] for q in sol), [grid[i] for i in idx.tolist()])

    def _assemble(self, func: Callable[..., Any], is_tuple: bool, parts: tuple[Tensor, ...],
                  sol: tuple[Tensor, ...], grid: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Stacks ``y0`` and the solution at ``grid[1:]``, attaching dL/dt to every point of the grid in the graph."""
        rows = [parts]
        for i in range(1, len(grid)):
            y = tuple(q[i] for q in sol)
            if torch.is_grad_enabled() and grid[i].requires_grad:
                y = _TimeGrad.apply(func, is_tuple, 1.0, grid[i], *y)
            rows.append(y)
        return tuple(torch.stack([r[k] for r in rows]) for k in range(len(parts)))

    def _solve(self, solver: Callable[..., Any], func: Callable[..., Any], is_tuple: bool, y: Sequence[Tensor],
               t: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
        try:
            sol = solver(func, _pack(is_tuple, y), t, **kwargs)
        except Exception as error:
            _add_note(error, f"{self!r}: the solve failed; {_diagnose(func, is_tuple, y, t[0], error)}")
            raise
        out = tuple(sol) if is_tuple and isinstance(sol, (tuple, list)) else (sol,)
        if len(out) != len(y) or any(not isinstance(q, Tensor) or q.shape != (t.numel(), *p.shape) for q, p in zip(out, y)):
            got = [tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__ for q in out]
            raise ValueError(f"solver must return the solution at each of the {t.numel()} times stacked on a leading "
                             f"dimension, got {got}; wrap a solver that returns only the final state.")
        return out

    # ------------------------------------------------------------------ the budget against its reference
    def error(self, func: Callable[..., Any], y0: State, *, reverse: bool = False, **kwargs: Any) -> Tensor:
        r"""The mean absolute difference at the far end between the budgeted solve and an adaptive reference.

        The reference is ``torchdiffeq.odeint(func, y0, [t0, T], **kwargs)``
        (the call's adaptive settings: ``method``, ``rtol``, ``atol``, ``options``),
        solved without gradients; the budgeted solve backpropagates to
        :attr:`placement` when grad mode is on.

        Returns:
            One value per part of the state (e.g. the state and the log-density of a CNF).

        Example:
            >>> import torch
            >>> horizon = LearnableHorizon(T0=1.0, budget=2)
            >>> err = horizon.error(lambda t, y: -y, torch.ones(1), rtol=1e-9, atol=1e-9)
            >>> bool(err < 1e-3)  # two rk4 steps of exp(-t): 3e-4 from exp(-1)
            True

        """
        is_tuple, parts = check_state("y0", y0)
        return self._error(func, is_tuple, parts, flag("reverse", reverse), self._reference(func, is_tuple, parts, reverse, kwargs))

    def fit(self, func: Callable[..., Any], y0: State, *, steps: int = 100, lr: float = 0.05, reverse: bool = False,
            **kwargs: Any) -> tuple[Tensor, Tensor]:
        r"""Fits :attr:`placement` to an adaptive reference on ``y0`` (e.g. a trained model's held-out batch).

        Minimises the sum over parts of :meth:`error` with Adam for ``steps``
        steps; the reference is solved once. Nothing else is changed (a placement
        frozen with ``requires_grad_(False)`` is fitted all the same, and stays frozen).

        Returns:
            :meth:`error` before and after, detached.

        """
        is_tuple, parts = check_state("y0", y0)
        reverse = flag("reverse", reverse)
        if self.placement is None:
            raise ValueError("fit needs a budget; construct the horizon with budget=N or call set_budget(N).")
        ref = self._reference(func, is_tuple, parts, reverse, kwargs)
        p, frozen = self.placement, not self.placement.requires_grad
        opt, before = torch.optim.Adam([p.requires_grad_(True)], lr=real("lr", lr)), None
        try:
            for _ in range(whole("steps", steps, 0)):
                with torch.enable_grad():
                    err = self._error(func, is_tuple, parts, reverse, ref)
                    (p.grad,) = torch.autograd.grad(err.sum(), p)
                before = err.detach() if before is None else before
                opt.step()
        finally:
            p.grad = None
            p.requires_grad_(not frozen)
        with torch.no_grad():
            after = self._error(func, is_tuple, parts, reverse, ref)
        return (after if before is None else before), after

    def _reference(self, func: Callable[..., Any], is_tuple: bool, parts: tuple[Tensor, ...], reverse: bool,
                   kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
        if self.placement is None:
            raise ValueError("error needs a budget; construct the horizon with budget=N or call set_budget(N).")
        dtype, device = _time_dtype(parts[0].dtype), parts[0].device
        t0, T = self.t0.to(dtype=dtype, device=device), self.T.to(dtype=dtype, device=device)
        s = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
        ref = {k: v for k, v in kwargs.items() if k in ("method", "options", "rtol", "atol")}
        with torch.no_grad():
            return tuple(q[-1] for q in self._adaptive(func, is_tuple, parts, s, (T, t0) if reverse else (t0, T),
                                                       torchdiffeq.odeint, ref))

    def _error(self, func: Callable[..., Any], is_tuple: bool, parts: tuple[Tensor, ...], reverse: bool,
               ref: tuple[Tensor, ...]) -> Tensor:
        dtype, device = _time_dtype(parts[0].dtype), parts[0].device
        t0, T = self.t0.to(dtype=dtype, device=device).detach(), self.T.to(dtype=dtype, device=device).detach()
        s = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
        out = self._budgeted(func, is_tuple, parts, s, t0, T, reverse, torchdiffeq.odeint, {}, track=True)
        return torch.stack([(q[-1] - r).abs().mean().to(dtype) for q, r in zip(out, ref)])

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LearnableHorizon:
        before = [None if p is None else p.detach() for p in (self.T, self.t0, self.placement)]
        super()._apply(fn, recurse)
        for p, old in zip((self.T, self.t0, self.placement), before):  # .half() keeps time in float32, unrounded
            if p is not None and p.dtype in (torch.float16, torch.bfloat16):
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "placement")
        if isinstance(saved, Tensor) and saved.shape != getattr(self.placement, "shape", None):
            self.set_budget(saved.shape[0])  # a checkpoint taken after the guard grew the budget
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": None}

    def extra_repr(self) -> str:
        text = f"T={self.T.item():.4g}, t0={self.t0.item():.4g}, bounds=({self.bounds[0]:.4g}, {self.bounds[1]:.4g})"
        return text + ("" if self.placement is None else f", budget={self.budget}, method={self.method!r}")

