r"""A learnable integration interval [t0, T] that replaces an ``odeint`` call, optionally on a budget of steps."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Tuple, Union

import torch
import torchdiffeq
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._checks import check_state, flag, real, stacklevel, whole

__all__ = ["FIXED_GRID_METHODS", "LearnableHorizon"]

State = Union[Tensor, Tuple[Tensor, ...]]
Parts = Tuple[Tensor, ...]
Ends = Tuple[Tensor, Tensor]
Select = Callable[[State], Sequence[Tensor]]
Solver = Callable[..., Any]

#: torchdiffeq's fixed-grid methods a budget can use, with their order of accuracy.
FIXED_GRID_METHODS = {
    "euler": 1,
    "midpoint": 2,
    "heun2": 2,
    "heun3": 3,
    "rk4": 4,
    "explicit_adams": 4,
    "implicit_adams": 4,
    "fixed_adams": 4,
}

#: The reference of a budget unless one is given: the accurate adaptive solve that scores a CNF.
DEFAULT_REFERENCE = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}

# The keyword arguments that choose a solve; on a budget the horizon chooses it.
_SOLVE_KEYS = ("method", "rtol", "atol", "options")
_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")


def _reference(reference: Any) -> dict[str, Any]:
    """The reference's odeint settings (those not given are torchdiffeq's); adaptive only."""
    if not isinstance(reference, dict) or not set(reference) <= set(_SOLVE_KEYS):
        raise TypeError(
            f"reference must be a dict of {_SOLVE_KEYS}, e.g. dict(method='dopri8'), "
            f"got {reference!r}."
        )
    if reference.get("method", "dopri5") not in _ADAPTIVE:
        raise ValueError(
            f"reference's method must be one of torchdiffeq's adaptive {_ADAPTIVE} (it scores the "
            f"model and guards the budget), got {reference['method']!r}."
        )
    return dict(reference)


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32, so that T is not rounded to a half-precision grid."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python < 3.11
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


def sample_and_log_density(y: State) -> tuple[Tensor, ...]:
    """The parts that a budget's error compares by default: a tuple's first two, or the tensor."""
    return tuple(y[:2]) if isinstance(y, (tuple, list)) else (y,)


@dataclass(frozen=True)
class _Call:
    """A call's field and initial state, the state kept as a tuple of parts."""

    func: Callable[..., Any]
    is_tuple: bool
    parts: Parts
    reverse: bool

    def pack(self, parts: Sequence[Tensor]) -> State:
        return tuple(parts) if self.is_tuple else parts[0]

    def evaluate(self, t: Tensor, ys: Sequence[Tensor]) -> tuple[Any, ...]:
        """``func(t, y)`` on detached inputs, in grad mode (CNF fields take their trace by autograd)."""
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
    def forward(ctx: Any, call: _Call, sign: float, t: Tensor, *y: Tensor) -> Parts:
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
                    _add_note(error, "torch_tempopt: the field failed at F(t, y(t)), for dL/dt.")
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


def _with_time_grad(call: _Call, sign: float, t: Tensor, y: Parts) -> Parts:
    """``y``, attached to ``t``'s gradient if ``t`` is learned and gradients are on."""
    if torch.is_grad_enabled() and t.requires_grad:
        return _TimeGrad.apply(call, sign, t, *y)
    return y


def _normal(solve: dict[str, Any]) -> dict[str, Any]:
    """Solve settings with torchdiffeq's defaults filled in, to compare two of them."""
    return {"method": "dopri5", "rtol": 1e-7, "atol": 1e-9, "options": None, **solve}


def _place(s: Tensor, start: Tensor, end: Tensor) -> list[Tensor]:
    """Times ``start + s (end - start)``, exactly ``start`` where ``s == 0`` and ``end`` where ``s == 1``.

    A list of 0-dim tensors, so that an end that does not require grad gets no time gradient (nor
    an evaluation).
    """
    t = start + s * (end - start)
    return [start if v == 0 else end if v == 1 else t[i] for i, v in enumerate(s.tolist())]


def _per_dimension(out: Sequence[Tensor], ref: Sequence[Tensor]) -> Tensor:
    """Mean absolute differences per item and per dimension of the first part (the sample)."""
    first = out[0]
    items = first.shape[0] if first.dim() > 1 else 1
    scale = items * max(first.numel() // max(items, 1), 1)
    return torch.stack([(a - b).abs().sum() / scale for a, b in zip(out, ref)])


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

    **On a budget** (``budget=N``) the module's mode decides the solve, as it
    does for dropout: in ``train()`` exactly N steps of the fixed-grid
    ``method`` (rk4: 4N evaluations), in ``eval()`` the adaptive ``reference``,
    so a model is scored honestly (:meth:`budgeted` overrides the mode, e.g. to
    sample cheaply). A call's ``method``, ``rtol``, ``atol`` and ``options``, if
    given, must equal the reference: one solve, named once. The steps are placed by
    :attr:`placement` (uniform at first), which :meth:`fit` and
    :class:`~torch_tempopt.BudgetGuard` fit to the reference, never to the
    loss. With ``solver=torchdiffeq.odeint`` the grid stays in the graph and
    dL/dT is the exact derivative of the discrete solution; with
    ``odeint_adjoint`` it is the continuous formula above.

    Arguments:
        T0: The initial end time, > ``t0``.
        t0: The initial start time.
        eps: The clip margin of eq. 17: :meth:`clip_` keeps T in
            ``[t0 + eps, 2 * T0 - t0 - eps]``.
        learn_T: Whether T is learned (``requires_grad``); default: without a budget only
            (on a budget T is nearly a gauge freedom and a learned T fights the steps).
        learn_t0: Whether ``t0`` is a parameter too.
        budget: Solve on this many fixed steps in training (``None``: the solver's own steps).
        method: The fixed-grid torchdiffeq method of the budget.
        reference: The adaptive torchdiffeq settings of the budget's reference
            (``method``, ``rtol``, ``atol``, ``options``; those not given are torchdiffeq's, as in
            an odeint call); default :data:`DEFAULT_REFERENCE`.
        max_budget: The most steps the budget may grow to (the capacity of :attr:`placement`).

    Attributes:
        T: The end time, a 0-dim parameter.
        t0: The start time, a 0-dim buffer, or a parameter if ``learn_t0``.
        placement: With a budget, ``max_budget`` logits of the step lengths, the first
            :attr:`budget` in use (a buffer: uniform at 0), else ``None``.
        last_input: ``(func, y0, reverse)`` of the last budgeted solve in training with
            gradients (``y0`` detached), which :class:`~torch_tempopt.BudgetGuard` checks.
        guarded: Set by a :class:`~torch_tempopt.BudgetGuard` over this horizon; a budget
            trained without one warns once.

    Example:
        >>> import torch
        >>> horizon = LearnableHorizon(T0=0.5)
        >>> y = horizon(lambda t, y: -y, torch.ones(3))  # odeint(f, y0, torch.tensor([0.0, 0.5]))
        >>> y.shape
        torch.Size([2, 3])
        >>> y[-1].sum().backward()
        >>> round(horizon.T.grad.item(), 4)  # <dL/dy(T), F> = 3 * (-exp(-0.5))
        -1.8196

    References:
        | TO-FLOW: Efficient Continuous Normalizing Flows with Temporal Optimization adjoint
        | with Moving Speed, Du et al., 2022 (https://arxiv.org/abs/2203.10335)

    """

    T: nn.Parameter
    t0: Tensor
    placement: Tensor | None
    n_steps: Tensor | None

    def __init__(
        self,
        T0: float | Tensor = 1.0,
        t0: float | Tensor = 0.0,
        *,
        eps: float = 0.1,
        learn_T: bool | None = None,
        learn_t0: bool = False,
        budget: int | None = None,
        method: str = "rk4",
        reference: dict[str, Any] | None = None,
        max_budget: int = 64,
    ) -> None:
        super().__init__()
        T0_, t0_, eps_ = real("T0", T0), real("t0", t0), real("eps", eps)
        if T0_ <= t0_:
            raise ValueError(
                f"T0 must be greater than t0, got T0={T0_} and t0={t0_}; use reverse=True."
            )
        if not 0 < eps_ < T0_ - t0_:
            raise ValueError(f"eps must lie in (0, T0 - t0) = (0, {T0_ - t0_}), got {eps_}.")
        if method not in FIXED_GRID_METHODS:
            raise ValueError(
                f"method must be one of {sorted(FIXED_GRID_METHODS)}, got {method!r}."
            )
        learn_T = budget is None if learn_T is None else flag("learn_T", learn_T)
        self.T = nn.Parameter(torch.tensor(T0_), requires_grad=learn_T)
        if flag("learn_t0", learn_t0):
            self.t0 = nn.Parameter(torch.tensor(t0_))
        else:
            self.register_buffer("t0", torch.tensor(t0_))
        self.T0, self.t0_init, self.eps, self.learn_t0 = T0_, t0_, eps_, bool(learn_t0)
        if reference is not None and budget is None:
            raise ValueError("reference goes with a budget; pass budget=N, or drop reference.")
        n = None if budget is None else whole("budget", budget)
        capacity = whole("max_budget", max_budget)
        if n is not None and n > capacity:
            raise ValueError(f"budget must be at most max_budget={capacity}, got {n}.")
        self.register_buffer("placement", None if n is None else torch.zeros(capacity))
        self.register_buffer("n_steps", None if n is None else torch.tensor(n))
        self.method = method
        self.reference = None if n is None else _reference(reference or DEFAULT_REFERENCE)
        self.last_input: tuple[Any, State, bool] | None = None
        self.guarded, self._use_budget, self._warned = False, None, False

    # ------------------------------------------------------------------ time parameters
    @property
    def bounds(self) -> tuple[float, float]:
        """The clip interval of T, ``(t0 + eps, 2 * T0 - t0 - eps)`` from the initial values."""
        return self.t0_init + self.eps, 2 * self.T0 - self.t0_init - self.eps

    @torch.no_grad()
    def clip_(self) -> bool:
        """Clips T into :attr:`bounds`, a learned t0 into ``[2 t0 - T0 + eps, min(T0, T) - eps]``.

        Returns:
            Whether T or t0 moved.

        """
        before = (self.T.item(), self.t0.item())
        self.T.clamp_(*self.bounds)
        if self.learn_t0:
            low = 2 * self.t0_init - self.T0 + self.eps
            self.t0.clamp_(low, min(self.T0, self.T.item()) - self.eps)
        return before != (self.T.item(), self.t0.item())

    # ------------------------------------------------------------------ the budget
    @property
    def budget(self) -> int | None:
        """The number of fixed steps per training solve, or ``None`` for the solver's own steps."""
        return None if self.n_steps is None else int(self.n_steps)

    @property
    def max_budget(self) -> int | None:
        """The capacity of :attr:`placement`: the most steps :meth:`set_budget` accepts."""
        return None if self.placement is None else self.placement.shape[0]

    @torch.no_grad()
    def set_budget(self, budget: int) -> None:
        """Sets the number of steps in place, keeping the placement's density of steps."""
        if self.placement is None or self.n_steps is None:
            raise ValueError("set_budget needs a budget; construct the horizon with budget=N.")
        n, m = whole("budget", budget), self.budget or 1
        if n > self.placement.shape[0]:
            raise ValueError(
                f"budget must be at most max_budget={self.placement.shape[0]}, got {n}."
            )
        old = self.fractions().to(torch.float64)
        pos = torch.linspace(0, m, n + 1, dtype=old.dtype, device=old.device)
        i = pos.floor().clamp(max=m - 1).long()
        logits = (old[i] + (pos - i) * (old[i + 1] - old[i])).diff().clamp_min(1e-6).log()
        self.placement.zero_()[:n] = logits - logits.mean()
        self.n_steps.fill_(n)

    def fractions(self, logits: Tensor | None = None) -> Tensor:
        """The budget's N + 1 step boundaries as fractions of [t0, T], from 0 to 1 (increasing)."""
        if self.placement is None:
            raise ValueError("fractions needs a budget; construct the horizon with budget=N.")
        logits = self.placement[: self.budget] if logits is None else logits
        c = torch.cumsum(torch.softmax(logits, 0), 0)
        return torch.cat([c.new_zeros(1), c[:-1], c.new_ones(1)])

    @contextlib.contextmanager
    def budgeted(self, enabled: bool = True) -> Iterator[None]:
        """Within the block, solves on the budget (``enabled``) or with the reference, whatever the mode.

        Example:
            >>> import torch
            >>> horizon = LearnableHorizon(T0=1.0, budget=2).eval()
            >>> with torch.no_grad(), horizon.budgeted():  # cheap sampling from a model in eval()
            ...     y = horizon(lambda t, y: -y, torch.ones(1))
            >>> round(y[-1].item(), 6)  # the 2-step rk4 value, not exp(-1) = 0.367879
            0.368171

        """
        before, self._use_budget = self._use_budget, flag("enabled", enabled)
        try:
            yield
        finally:
            self._use_budget = before

    # ------------------------------------------------------------------ solving
    def forward(
        self,
        func: Callable[..., Any],
        y0: State,
        *,
        solver: Solver = torchdiffeq.odeint,
        reverse: bool = False,
        times: Tensor | Sequence[float] | None = None,
        **kwargs: Any,
    ) -> State:
        r"""Returns ``solver(func, y0, [t0, T], **kwargs)``: the solution at the start and the end.

        Arguments:
            func: The vector field ``func(t, y)``.
            y0: The initial state, a floating tensor or a tuple of them.
            solver: Any callable with odeint's signature that returns the solution at every time
                of ``t`` (``torchdiffeq.odeint``, ``odeint_adjoint``, :mod:`torch_tempopt.contrib`
                adapters); on a budget, torchdiffeq's two.
            reverse: Integrate from T back to t0 (the sampling direction): ``[T, t0]``.
            times: Increasing fractions of the interval from the start of the integration,
                beginning with 0, to return the solution at (as odeint's ``t``); default
                ``[0, 1]``. On a budget, a point that is not on the grid adds a step.
            kwargs: Passed to ``solver`` (``method``, ``rtol``, ``atol``, ``options``,
                ``adjoint_params``, ...). On a budget the first four may be given only as the
                ``reference`` (so that a call reads the same with and without a budget).

        Returns:
            The solution with the structure of ``y0``, each part with a leading dimension of
            ``len(times)`` (2 by default).

        Raises:
            TypeError: For a non-callable ``func``/``solver``, a non-floating ``y0``, a ``t``
                argument, or a budget with another solver than torchdiffeq's.
            ValueError: For an empty ``y0``, ``times`` that are not increasing fractions in
                [0, 1] beginning with 0, or solve settings on a budget that are not its reference.

        A failing solve keeps its exception, with a note that names the likely cause: a
        non-finite or half-precision ``y0``, a field that fails or returns the wrong structure.

        """
        c = self._call(func, y0, reverse)
        if not callable(solver):
            raise TypeError(f"solver must be callable like odeint, got {type(solver).__name__}.")
        if "t" in kwargs:
            raise TypeError(
                "t must not be passed: the horizon builds [t0, T]; use times= instead."
            )
        if all(p.numel() == 0 for p in c.parts):
            raise ValueError("y0 has no elements; skip the solve for an empty batch.")
        s, ends = self._times(times, c), self._ends(c, detach=False)
        if self.reference is None:
            return c.pack(self._adaptive(c, s, ends, solver, kwargs))
        kwargs = self._check_budget_call(solver, kwargs)
        if not (self.training if self._use_budget is None else self._use_budget):
            return c.pack(self._adaptive(c, s, ends, solver, {**kwargs, **self.reference}))
        if torch.is_grad_enabled():
            self._record(c)
        return c.pack(self._budgeted(c, s, ends, solver, kwargs, self.fractions().detach().to(s)))

    def _call(self, func: Any, y0: Any, reverse: Any) -> _Call:
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}.")
        return _Call(func, *check_state("y0", y0), flag("reverse", reverse))

    def _check_budget_call(self, solver: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's other keyword arguments; its solve settings, if any, must be the reference."""
        if solver is not torchdiffeq.odeint and solver is not torchdiffeq.odeint_adjoint:
            raise TypeError(
                f"solver must be torchdiffeq's odeint or odeint_adjoint, got {solver!r}."
            )
        given = {k: kwargs[k] for k in _SOLVE_KEYS if k in kwargs}
        if given and _normal(given) != _normal(self.reference or {}):
            raise ValueError(
                f"the call's {_normal(given)} (torchdiffeq's defaults filled in) differ from the "
                f"budget's reference={self.reference}, which "
                "scores the model in eval() and guards the steps; pass reference=... to the "
                "LearnableHorizon, or drop them from the call."
            )
        return {k: v for k, v in kwargs.items() if k not in _SOLVE_KEYS}

    def _record(self, c: _Call) -> None:
        """Keeps the training call for the guard; warns once if no guard will look at it."""
        self.last_input = (c.func, c.pack([p.detach() for p in c.parts]), c.reverse)
        if not self.guarded and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self!r} trains on a budget without a guard, so its steps are never checked "
                "against the reference: wrap the optimizer in CoordinateDescentStepper, or call "
                "BudgetGuard(model).step() after each optimizer step (or pass guard=False to it).",
                RuntimeWarning,
                stacklevel=stacklevel(),
            )

    def _times(self, times: Any, c: _Call) -> Tensor:
        dtype, device = _time_dtype(c.parts[0].dtype), c.parts[0].device
        if times is None:
            return torch.tensor([0.0, 1.0], dtype=dtype, device=device)
        try:
            s = torch.as_tensor(times, dtype=dtype, device=device).detach()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"times must be a 1-D sequence of fractions, got {times!r}.") from None
        ok = s.dim() == 1 and s.numel() >= 2 and s[0] == 0
        if not ok or not bool(((s[1:] > s[:-1]) & (s[1:] <= 1)).all()):
            raise ValueError(
                f"times must be increasing fractions in [0, 1] from 0, got {s.tolist()}."
            )
        return s

    def _ends(self, c: _Call, detach: bool) -> Ends:
        """t0 and T in the state's time dtype and device."""
        dtype, device = _time_dtype(c.parts[0].dtype), c.parts[0].device
        ends = [p.detach() if detach else p for p in (self.t0, self.T)]
        return tuple(p.to(dtype=dtype, device=device) for p in ends)  # type: ignore[return-value]

    def _adaptive(self, c: _Call, s: Tensor, ends: Ends, solver: Solver, kw: dict) -> Parts:
        start, end = ends[::-1] if c.reverse else ends
        grid = _place(s, start, end)
        y = _with_time_grad(c, -1.0, start, c.parts)
        return self._assemble(c, self._solve(solver, c, y, torch.stack(grid).detach(), kw), grid)

    def _budgeted(
        self, c: _Call, s: Tensor, ends: Ends, solver: Solver, kw: dict, u: Tensor
    ) -> Parts:
        """The solve on the steps at fractions ``u``, with the points ``s`` asked for."""
        wanted = (1 - s).flip(0) if c.reverse else s  # the points asked for, increasing from t0
        extra = wanted[~(wanted[:, None] == u.detach()[None, :]).any(1)]
        v = torch.sort(torch.cat([u, extra])).values
        idx = torch.searchsorted(v.detach(), wanted)
        grid = _place(v, *ends)
        if c.reverse:
            grid, idx = grid[::-1], (v.numel() - 1 - idx).flip(0)
        kw = {**kw, "method": self.method}
        if solver is torchdiffeq.odeint:  # backprop through the steps: the discrete derivative
            sol = self._solve(solver, c, c.parts, torch.stack(grid), kw)
            return tuple(torch.cat([p[None], q[idx[1:]]]) for p, q in zip(c.parts, sol))
        y = _with_time_grad(c, -1.0, grid[0], c.parts)
        sol = self._solve(solver, c, y, torch.stack(grid).detach(), kw)
        return self._assemble(c, tuple(q[idx] for q in sol), [grid[i] for i in idx.tolist()])

    def _assemble(self, c: _Call, sol: Parts, grid: Sequence[Tensor]) -> Parts:
        """Stacks ``y0`` and the solution at ``grid[1:]``, with dL/dt at every point in the graph."""
        rows = [c.parts]
        for i in range(1, len(grid)):
            rows.append(_with_time_grad(c, 1.0, grid[i], tuple(q[i] for q in sol)))
        return tuple(torch.stack([r[k] for r in rows]) for k in range(len(c.parts)))

    def _solve(self, solver: Solver, c: _Call, y: Parts, t: Tensor, kw: dict) -> Parts:
        try:
            func = _NoGradState(c.func) if isinstance(c.func, nn.Module) else c.func
            sol = solver(func, c.pack(y), t, **kw)
        except Exception as error:
            _add_note(error, f"{self!r}: the solve failed; {c.diagnose(t[0])}")
            raise
        out = tuple(sol) if c.is_tuple and isinstance(sol, (tuple, list)) else (sol,)
        if [getattr(q, "shape", None) for q in out] != [(t.numel(), *p.shape) for p in y]:
            got = [tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__ for q in out]
            raise ValueError(
                f"solver must return the solution at each of the {t.numel()} times stacked on a "
                f"leading dimension, got {got}; wrap a solver that returns only the final state."
            )
        return out

    # ------------------------------------------------------------------ the budget and its reference
    def error(
        self, func: Any, y0: State, *, reverse: bool = False, select: Select | None = None
    ) -> Tensor:
        r"""The difference at the far end between the budgeted solve and the adaptive reference.

        Both solves run without gradients. ``select(state)`` picks the parts to compare (default:
        a tuple's first two, a CNF's sample and log-density; the whole of a tensor). Each part's
        error is its mean absolute difference per item, divided by the number of dimensions of
        the first part (the sample), so the error of a log-density is in nats per dimension
        and a tolerance means the same in 2-D and in 784-D.

        Returns:
            One value per selected part.

        Example:
            >>> import torch
            >>> horizon = LearnableHorizon(T0=1.0, budget=2, reference=dict(rtol=1e-9, atol=1e-9))
            >>> err = horizon.error(lambda t, y: -y, torch.ones(1))
            >>> bool(err < 1e-3)  # two rk4 steps of exp(-t): 3e-4 from exp(-1)
            True

        """
        return self.fit(func, y0, steps=0, reverse=reverse, select=select)[0]

    def fit(
        self,
        func: Callable[..., Any],
        y0: State,
        *,
        steps: int = 100,
        lr: float = 0.05,
        reverse: bool = False,
        select: Select | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Fits :attr:`placement` to the reference on ``y0`` (e.g. a trained model's batch).

        Minimises the sum of :meth:`error` with Adam for ``steps`` steps; the reference is solved
        once. One step has no placement to fit (its only fraction is 1).

        Returns:
            :meth:`error` before and after, detached.

        """
        c, steps, lr = self._call(func, y0, reverse), whole("steps", steps, 0), real("lr", lr)
        if self.placement is None or self.reference is None:
            raise ValueError("fit needs a budget; construct the horizon with budget=N.")
        pick, n = select or sample_and_log_density, self.budget or 1
        with torch.no_grad():
            ref = self._adaptive(
                c,
                c.parts[0].new_tensor([0.0, 1.0]),
                self._ends(c, True),
                torchdiffeq.odeint,
                self.reference,
            )
            ref = pick(c.pack([q[-1] for q in ref]))
        if not isinstance(ref, (tuple, list)):
            raise TypeError(f"select must return a tuple of tensors, e.g. (z,), got {type(ref)}.")
        logits = self.placement[:n].detach().clone().requires_grad_(True)
        opt, before = torch.optim.Adam([logits], lr=lr), None
        for _ in range(steps if n > 1 else 0):
            with torch.enable_grad():
                err = self._error(c, pick, ref, logits)
                (logits.grad,) = torch.autograd.grad(err.sum(), logits)
            before = err.detach() if before is None else before
            opt.step()
        with torch.no_grad():
            self.placement[:n] = logits - logits.mean()
            after = self._error(c, pick, ref, logits)
        return (after if before is None else before), after

    def _error(self, c: _Call, pick: Select, ref: Sequence[Tensor], logits: Tensor) -> Tensor:
        t0, T = self._ends(c, detach=True)
        s, u = t0.new_tensor([0.0, 1.0]), self.fractions(logits).to(t0)
        out = self._budgeted(c, s, (t0, T), torchdiffeq.odeint, {}, u)
        return _per_dimension(pick(c.pack([q[-1] for q in out])), ref).to(t0.dtype)

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LearnableHorizon:
        before = [None if p is None else p.detach() for p in (self.T, self.t0, self.placement)]
        super()._apply(fn, recurse)
        # .half() keeps time in float32
        for p, old in zip((self.T, self.t0, self.placement), before):
            if p is not None and old is not None and p.dtype in (torch.float16, torch.bfloat16):
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "last_input": None}

    def extra_repr(self) -> str:
        text = f"T={self.T.item():.4g}, t0={self.t0.item():.4g}"
        text += f", bounds=({self.bounds[0]:.4g}, {self.bounds[1]:.4g})"
        return text + (
            "" if self.budget is None else f", budget={self.budget}, method={self.method!r}"
        )
