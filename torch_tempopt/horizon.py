"""A learnable integration horizon [t0, T] for any odeint-style solver."""

from __future__ import annotations

import inspect
import math
import re
import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torchdiffeq
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._checks import as_real, check_state

__all__ = ["LearnableHorizon", "MECHANISMS", "load_state_dict_adding_horizons"]

State = Union[Tensor, "tuple[Tensor, ...]"]
Solver = Callable[..., Any]

#: The ways :class:`LearnableHorizon` can make T differentiable.
MECHANISMS = ("direct", "rescale")


def _pack(is_tuple: bool, parts: Sequence[Tensor]) -> State:
    return tuple(parts) if is_tuple else parts[0]


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the time grid for a state of ``dtype``: at least float32, so T is not rounded to 8 bits."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _add_note(error: BaseException, note: str) -> None:
    """PEP 678 ``add_note``, also on Python < 3.11 (where tracebacks do not print the notes)."""
    notes = getattr(error, "__notes__", None)
    if isinstance(notes, list) and note in notes:
        return
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python < 3.11
        error.__notes__ = [*(notes or []), note]  # type: ignore[attr-defined]


# Failures that a different step control can fix: torchdiffeq's asserts ("underflow in dt", "max_num_steps
# exceeded", "non-finite values in state") and their kin in other backends.
_STEP_FAILURES = re.compile(r"underflow|max_num_steps|non-finite|\bnan\b|\binf\b|step ?size|maximum number of")

_REMEDIES = (
    "Possible remedies: loosen the tolerances (rtol/atol); bound the step from below with "
    "options=dict(min_step=...) (torchdiffeq's adaptive solvers) or use a fixed grid (method='rk4', "
    "options=dict(step_size=...)); a smoother activation (tanh or softplus rather than relu) or regularised "
    "dynamics (weight decay, RNODE's kinetic penalty); a narrower range for T (a larger eps, or a smaller T0); "
    "if the state went NaN/inf, lower the learning rates and pass skip_nonfinite=True to CoordinateDescentStepper."
)


def _is_step_failure(error: BaseException) -> bool:
    return isinstance(error, (AssertionError, FloatingPointError)) or bool(_STEP_FAILURES.search(str(error).lower()))


def _field_dot(func: Callable[..., Any], is_tuple: bool, t: Tensor, ys: Sequence[Tensor], gs: Sequence[Tensor]) -> Tensor:
    r"""Returns :math:`\sum_i \langle g_i, F_i(t, y) \rangle`, evaluating ``func`` once."""
    t, y = t.detach(), _pack(is_tuple, [y.detach() for y in ys])
    # Only the value of F is needed. Fields that differentiate internally (FFJORD's divergence) switch
    # grad mode on themselves and then skip building a graph for second derivatives; a field that
    # relies on grad mode being on from outside gets it on the second try.
    try:
        with torch.no_grad():
            f = func(t, y)
    except RuntimeError as error:
        if "does not require grad" not in str(error) and "grad_fn" not in str(error):
            raise
        with torch.enable_grad():
            f = func(t, y)
    fs = tuple(f) if is_tuple else (f,)
    if len(fs) != len(gs):
        raise ValueError(
            f"func returned {len(fs)} tensor(s) for a state of {len(gs)}: the field must return "
            "a tangent with the same structure as y."
        )
    total = torch.zeros((), dtype=t.dtype, device=t.device)
    for fi, gi in zip(fs, gs):
        acc = torch.promote_types(torch.promote_types(fi.dtype, gi.dtype), t.dtype)
        total = total + torch.sum(fi.detach().to(acc) * gi.to(acc)).to(t.dtype)
    return total


def _field_dot_noted(settings: tuple[Any, ...], t: Tensor, ys: Sequence[Tensor], gs: Sequence[Tensor], what: str) -> Tensor:
    """:func:`_field_dot`, adding the horizon's description to any error of the field."""
    func, is_tuple, describe = settings
    try:
        return _field_dot(func, is_tuple, t, ys, gs)
    except Exception as error:
        _add_note(error, f"{describe()}: the field failed while computing {what} in the backward pass.")
        raise


class _Entry(torch.autograd.Function):
    r"""Identity on the initial state; sends dL/dt_start = -<a(t_start), F(t_start, y0)> to t_start."""

    @staticmethod
    def forward(ctx: Any, settings: tuple[Any, ...], t_start: Tensor, *y0: Tensor) -> tuple[Tensor, ...]:
        ctx.settings = settings
        ctx.save_for_backward(t_start, *y0)
        return tuple(y.clone() for y in y0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        t_start, *y0 = ctx.saved_tensors
        grad_t = None
        if ctx.needs_input_grad[1]:
            if all(g is None or not torch.any(g) for g in grads):
                grad_t = torch.zeros_like(t_start)
            else:
                gs = [torch.zeros_like(y) if g is None else g for y, g in zip(y0, grads)]
                grad_t = -_field_dot_noted(ctx.settings, t_start, y0, gs, "dL/dt at the start time")
        return (None, grad_t, *grads)


class _Exit(torch.autograd.Function):
    r"""Identity on the solution at ``grid``; sends dL/dt_i = <dL/dy(t_i), F(t_i, y(t_i))> to the grid."""

    @staticmethod
    def forward(ctx: Any, settings: tuple[Any, ...], grid: Tensor, *sol: Tensor) -> tuple[Tensor, ...]:
        ctx.settings = settings
        ctx.save_for_backward(grid, *sol)
        return tuple(y.clone() for y in sol)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        grid, *sol = ctx.saved_tensors
        grad_grid = None
        if ctx.needs_input_grad[1]:
            grad_grid = torch.zeros_like(grid)
            for i in range(grid.shape[0]):
                gs = [torch.zeros_like(y[i]) if g is None else g[i] for y, g in zip(sol, grads)]
                if any(torch.any(g) for g in gs):
                    grad_grid[i] = _field_dot_noted(ctx.settings, grid[i], [y[i] for y in sol], gs, "dL/dT")
        return (None, grad_grid, *grads)


class _RescaledField(nn.Module):
    r"""The field of s in [0, 1]: G(s, y) = (t_end - t_start) F(t_start + s (t_end - t_start), y).

    The end points are read from the horizon at every call, so that
    ``odeint_adjoint`` can differentiate G with respect to them.
    """

    def __init__(self, func: Callable[..., Any], horizon: LearnableHorizon, reverse: bool, like: Tensor) -> None:
        super().__init__()
        self.func = func
        self.__dict__["horizon"] = horizon  # not a submodule: its parameters stay its own
        self.reverse = reverse
        self.dtype = _time_dtype(like.dtype)
        self.device = like.device

    def forward(self, s: Tensor, y: Any) -> Any:
        start, end = self.horizon._endpoints(self.reverse, self.dtype, self.device)
        span = end - start
        f = self.func(start + s * span, y)
        if isinstance(f, tuple):
            return tuple(span * fi for fi in f)
        return span * f


def _accepts(solver: Solver, name: str) -> bool:
    try:
        params = inspect.signature(solver).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _module_params(func: Any) -> tuple[Tensor, ...]:
    return tuple(func.parameters()) if isinstance(func, nn.Module) else ()


class LearnableHorizon(nn.Module):
    r"""Integrates an ODE over [t0, T] with T (and optionally t0) learnable.

    A drop-in for a call ``odeint(func, y0, torch.tensor([t0, T]), **kwargs)``:
    ``horizon(func, y0, **kwargs)`` returns the state at the far end of the
    interval, and the end time receives the gradient

    .. math:: \frac{dL}{dT} = \left\langle \frac{dL}{dy(T)}, F(T, y(T)) \right\rangle ,

    since :math:`dy(T)/dT = F(T, y(T))` (TO-FLOW, eq. 12-13). When ``t0`` is
    learned it receives :math:`dL/dt_0 = -\langle dL/dy(t_0), F(t_0, y_0) \rangle`.

    By default (``mechanism="direct"``) the solver gets a *detached* time grid
    and this module adds the time gradient itself, at the cost of one extra
    evaluation of ``func`` per learned end point in the backward pass. The
    gradient is therefore the same whatever the backend does with time: it is
    never counted twice by backends that differentiate time themselves
    (``torchdiffeq``) and is not lost by those that drop it.

    ``mechanism="rescale"`` instead integrates :math:`s \in [0, 1]` with the
    field :math:`(T - t_0) F(t_0 + s (T - t_0), y)`, so the solver's own
    differentiation produces the time gradient. It needs a backend that
    differentiates its field's parameters (``odeint``, ``odeint_adjoint``: the
    horizon's parameters are added to ``adjoint_params``), changes the
    adaptive step control (tolerances now apply per unit of s) and reads
    ``t`` through the graph, so ``torch.tensor(t)`` copies in the field cut it.

    Arguments:
        T0: The initial end time, > ``t0``.
        t0: The initial start time.
        eps: The clipping margin of eq. 17: :meth:`clip_` keeps T in
            ``[t0 + eps, 2 * T0 - t0 - eps]`` (from the initial T0 and t0).
        learn_t0: Whether ``t0`` is a learnable parameter too.

    Attributes:
        T: The end time, a 0-dim :class:`~torch.nn.Parameter`.
        t0: The start time, a 0-dim buffer, or a parameter if ``learn_t0``.

    Example:
        >>> import torch
        >>> horizon = LearnableHorizon(T0=0.5)
        >>> y = horizon(lambda t, y: -y, torch.ones(3))
        >>> y.sum().backward()
        >>> round(horizon.T.grad.item(), 4)  # <dL/dy(T), F> = 3 * (-exp(-0.5))
        -1.8196

    References:
        | TO-FLOW: Efficient Continuous Normalizing Flows with Temporal Optimization adjoint with Moving Speed (Du et al., 2022)
        | https://arxiv.org/abs/2203.10335

    """

    T: nn.Parameter
    t0: Tensor
    T_init: Tensor
    t0_init: Tensor
    eps: Tensor

    def __init__(
        self,
        T0: float | Tensor = 1.0,
        t0: float | Tensor = 0.0,
        *,
        eps: float | Tensor = 0.1,
        learn_t0: bool = False,
    ) -> None:
        super().__init__()
        T0_ = as_real("T0", T0)
        t0_ = as_real("t0", t0)
        eps_ = as_real("eps", eps)
        if not isinstance(learn_t0, bool):
            raise TypeError(f"learn_t0 must be True or False, got {learn_t0!r}.")
        if T0_ <= t0_:
            raise ValueError(
                f"T0 must be greater than t0, got T0={T0_} and t0={t0_}. "
                "The horizon integrates forward from t0 to T; use reverse=True in the call to integrate backwards."
            )
        if eps_ <= 0:
            raise ValueError(f"eps must be positive, got eps={eps_}. The paper uses eps=0.1.")
        if eps_ >= T0_ - t0_:
            raise ValueError(
                f"eps={eps_} leaves an empty clip interval [t0 + eps, 2*T0 - t0 - eps] = "
                f"[{t0_ + eps_}, {2 * T0_ - t0_ - eps_}] for T0={T0_}, t0={t0_}. "
                f"Choose eps < T0 - t0 = {T0_ - t0_}."
            )
        if not math.isfinite(2 * T0_ - t0_) or not math.isfinite(2 * t0_ - T0_):
            raise ValueError(
                f"T0={T0_} and t0={t0_} are too large: the clip interval [t0 + eps, 2*T0 - t0 - eps] overflows. "
                "Rescale time so that T0 and t0 are moderate numbers (e.g. T0=1, t0=0)."
            )
        dtype = torch.get_default_dtype()
        min_eps = 64 * torch.finfo(dtype).eps * max(abs(T0_), abs(t0_), T0_ - t0_)
        if eps_ < min_eps:
            raise ValueError(
                f"eps={eps_} is below the resolution of {dtype} at T0={T0_}, t0={t0_}: T could be clipped to within "
                f"rounding distance of t0, an interval no solver can resolve. Choose eps >= {min_eps:.3g}."
            )
        T = torch.tensor(T0_, dtype=dtype)
        t0_t = torch.tensor(t0_, dtype=dtype)
        if not (torch.isfinite(T) and torch.isfinite(t0_t) and T > t0_t):
            raise ValueError(
                f"T0={T0_} and t0={t0_} are not distinct finite numbers in the default dtype {dtype} "
                f"(they round to T0={T.item()} and t0={t0_t.item()}). Widen the gap T0 - t0, or create the horizon "
                "under torch.set_default_dtype(torch.float64)."
            )
        self.T = nn.Parameter(T)
        if learn_t0:
            self.t0 = nn.Parameter(t0_t)
        else:
            self.register_buffer("t0", t0_t)
        self.register_buffer("T_init", torch.tensor(T0_, dtype=torch.float64))
        self.register_buffer("t0_init", torch.tensor(t0_, dtype=torch.float64))
        self.register_buffer("eps", torch.tensor(eps_, dtype=torch.float64))
        self.learn_t0 = learn_t0
        # Context for error messages, set by CoordinateDescentStepper: the horizon's name in the model and
        # the number of steps taken so far. Plain attributes: not part of the state dict.
        self._context_name: str | None = None
        self._context_steps: int | None = None

    def _apply(self, fn: Any, recurse: bool = True) -> LearnableHorizon:
        # ``.float()``/``.half()`` must not round the bounds: keep those buffers float64.
        bounds = {k: self._buffers[k] for k in ("T_init", "t0_init", "eps")}
        super()._apply(fn, recurse)
        for k, v in bounds.items():
            moved = fn(v)
            self._buffers[k] = v.to(device=moved.device) if moved.dtype != v.dtype else moved
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        r"""The clip interval :math:`[t_0 + \varepsilon, 2 T_0 - t_0 - \varepsilon]` of eq. 17."""
        T0, t0, eps = self.T_init.item(), self.t0_init.item(), self.eps.item()
        return (t0 + eps, 2 * T0 - t0 - eps)

    @property
    def t0_bounds(self) -> tuple[float, float]:
        r"""The clip interval of a learned t0, :math:`[2 t_0 - T_0 + \varepsilon, T_0 - \varepsilon]`
        (eq. 17 mirrored about the initial t0); :meth:`clip_` also keeps ``t0 <= T - eps``.
        """
        T0, t0, eps = self.T_init.item(), self.t0_init.item(), self.eps.item()
        return (2 * t0 - T0 + eps, T0 - eps)

    @torch.no_grad()
    def clip_(self) -> bool:
        r"""Clips T (and a learned t0) into the bounds, in place.

        Returns:
            Whether anything was moved.

        """
        lo, hi = self.bounds
        before = self.T.clone()
        self.T.clamp_(lo, hi)
        moved = bool(before != self.T)
        if self.learn_t0:
            lo0, hi0 = self.t0_bounds
            hi0 = min(hi0, self.T.item() - self.eps.item())
            before0 = self.t0.clone()
            self.t0.clamp_(lo0, hi0)
            moved = moved or bool(before0 != self.t0)
        return moved

    def parameters_of_time(self) -> list[nn.Parameter]:
        """The learnable time parameters: ``[T]``, or ``[T, t0]`` if ``learn_t0``."""
        params = [self.T]
        if self.learn_t0:
            assert isinstance(self.t0, nn.Parameter)
            params.append(self.t0)
        return params

    def describe(self, reverse: bool = False) -> str:
        """A one-line description for messages: name, interval, direction, bounds and training step.

        The name and the step count are set by :class:`~torch_tempopt.CoordinateDescentStepper`
        (the horizon's path in the model, and ``stats["steps"]``, the optimizer steps taken so far).

        Arguments:
            reverse: Describe the reverse (sampling) direction, from T back to t0.

        Returns:
            E.g. ``"LearnableHorizon 'chain.0.horizon' (forward, t0=0 -> T=0.5123, bounds [0.1, 0.9], after 12 optimizer steps)"``.

        Example:
            >>> LearnableHorizon(T0=0.5).describe()
            'LearnableHorizon (forward, t0=0 -> T=0.5, bounds [0.1, 0.9])'

        """
        name = getattr(self, "_context_name", None)
        steps = getattr(self, "_context_steps", None)
        T, t0 = f"{self.T.detach().item():.6g}", f"{self.t0.detach().item():.6g}"
        path = f"T={T} -> t0={t0}" if reverse else f"t0={t0} -> T={T}"
        lo, hi = self.bounds
        parts = [f"{'reverse' if reverse else 'forward'}, {path}", f"bounds [{lo:.6g}, {hi:.6g}]"]
        if steps is not None:
            parts.append(f"after {steps} optimizer steps")
        label = "LearnableHorizon" + (f" {name!r}" if name else "")
        return f"{label} ({', '.join(parts)})"

    def _endpoints(self, reverse: bool, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        T = self.T.to(dtype=dtype, device=device)
        t0 = self.t0.to(dtype=dtype, device=device)
        return (T, t0) if reverse else (t0, T)

    def forward(
        self,
        func: Callable[..., Any],
        y0: State,
        *,
        solver: Solver = torchdiffeq.odeint,
        reverse: bool = False,
        times: Tensor | Sequence[float] | None = None,
        mechanism: str = "direct",
        **solver_kwargs: Any,
    ) -> State:
        r"""Integrates ``func`` from t0 to T (from T to t0 if ``reverse``).

        Arguments:
            func: The vector field ``func(t, y)``, returning a tangent with the
                structure of ``y``.
            y0: The initial state, a floating tensor or a tuple of them.
            solver: Any callable with odeint's signature ``solver(func, y0, t, **kw)``
                that returns the solution at every time of ``t``
                (``torchdiffeq.odeint``, ``torchdiffeq.odeint_adjoint``, ...).
            reverse: Integrate from T back to t0 (sampling direction).
            times: Increasing points in [0, 1] of the interval, measured from
                the start of the integration. If given, the trajectory at those
                points is returned, with a leading time dimension.
            mechanism: ``"direct"`` (default) or ``"rescale"``, see the class docs.
            solver_kwargs: Passed to ``solver`` (``rtol``, ``atol``, ``method``,
                ``options``, ``adjoint_params``, ...).

        Returns:
            The state at the far end (or the trajectory at ``times``), with the
            structure of ``y0``.

        Raises:
            TypeError: If ``func``/``solver`` are not callable, ``y0`` is not a
                floating tensor or a tuple of them, or ``t`` is passed.
            ValueError: If ``mechanism`` is unknown, ``y0`` is empty, or ``times``
                is not an increasing sequence in [0, 1] of distinguishable points.

        An exception raised by the solver or the field (e.g. torchdiffeq's
        ``AssertionError: underflow in dt``) propagates unchanged, same type
        and traceback, with a note (PEP 678 ``add_note``) naming this horizon
        (:meth:`describe`: its name and step count when a
        :class:`~torch_tempopt.CoordinateDescentStepper` drives it, t0, T and
        the direction) and, for step-size failures, possible remedies. So
        ``except AssertionError`` keeps working, and the note is printed
        under the original message. Field errors in this module's backward
        pass (the extra evaluation for dL/dT) get such a note too; failures
        inside an adjoint backend's backward solve do not pass through here.

        """
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}.")
        if not callable(solver):
            raise TypeError(f"solver must be callable as solver(func, y0, t, **kwargs), got {type(solver).__name__}.")
        if not isinstance(reverse, bool):
            raise TypeError(f"reverse must be True or False, got {reverse!r}.")
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}.")
        if "t" in solver_kwargs:
            raise TypeError(
                "t must not be passed: the horizon builds the time grid from its own t0 and T. "
                "Use times= (points in [0, 1] of the interval) for a trajectory."
            )
        is_tuple, parts = check_state("y0", y0)
        if all(p.numel() == 0 for p in parts):
            raise ValueError(
                f"y0 has no elements (shape {tuple(parts[0].shape)}): there is nothing to integrate, and adaptive "
                "solvers fail on an empty state. Skip the call for an empty batch."
            )
        like = parts[0]
        tdtype = _time_dtype(like.dtype)
        start, end = self._endpoints(reverse, tdtype, like.device)

        s = torch.tensor([0.0, 1.0], dtype=tdtype, device=like.device)
        skip_first = True
        if times is not None:
            s, skip_first = self._check_times(times, s)

        if mechanism == "rescale":
            return self._solve_rescaled(func, is_tuple, parts, s, skip_first, times is None, solver, reverse, solver_kwargs)

        # The end points are start and end themselves, so that a fixed end point gets no (zero) gradient
        # path and costs no evaluation of the field in the backward pass.
        grid = torch.cat([start[None], start + s[1:-1] * (end - start), end[None]]) if s[-1] == 1 else start + s * (end - start)
        if times is not None:
            self._check_resolved(grid.detach(), s, start.detach().item(), end.detach().item())
        track = torch.is_grad_enabled() and (start.requires_grad or end.requires_grad)
        settings = (func, is_tuple, lambda: self.describe(reverse))
        y_in: tuple[Tensor, ...] = parts
        if track and start.requires_grad:
            y_in = _Entry.apply(settings, start, *parts)
        sol = self._call_solver(solver, func, _pack(is_tuple, y_in), grid.detach(), reverse, solver_kwargs)
        sol_parts = self._check_solution(sol, is_tuple, len(parts), grid.shape[0])
        if times is None:
            sol_parts = tuple(p[-1:] for p in sol_parts)
            grid = end[None]
        elif skip_first:
            sol_parts = tuple(p[1:] for p in sol_parts)
            grid = grid[1:]
        if track and grid.requires_grad:
            sol_parts = _Exit.apply(settings, grid, *sol_parts)
        if times is None:
            sol_parts = tuple(p[0] for p in sol_parts)
        return _pack(is_tuple, sol_parts)

    def _solve_rescaled(
        self,
        func: Callable[..., Any],
        is_tuple: bool,
        parts: tuple[Tensor, ...],
        s: Tensor,
        skip_first: bool,
        final_only: bool,
        solver: Solver,
        reverse: bool,
        solver_kwargs: dict[str, Any],
    ) -> State:
        field = _RescaledField(func, self, reverse, parts[0])
        kwargs = dict(solver_kwargs)
        if _accepts(solver, "adjoint_params"):
            user = kwargs.get("adjoint_params")
            if user is None and not isinstance(func, nn.Module):
                raise ValueError(
                    "func must be an nn.Module, or adjoint_params must be given, for mechanism='rescale' with an "
                    "adjoint solver: otherwise the field's parameters would get no gradient. Pass "
                    "adjoint_params=tuple(model.parameters()) (or () if the field has none)."
                )
            base = tuple(user) if user is not None else _module_params(func)
            kwargs["adjoint_params"] = base + tuple(self.parameters_of_time())
        sol = self._call_solver(solver, field, _pack(is_tuple, parts), s, reverse, kwargs)
        sol_parts = self._check_solution(sol, is_tuple, len(parts), s.shape[0])
        if final_only:
            sol_parts = tuple(p[-1] for p in sol_parts)
        elif skip_first:
            sol_parts = tuple(p[1:] for p in sol_parts)
        return _pack(is_tuple, sol_parts)

    def _call_solver(
        self, solver: Solver, func: Callable[..., Any], y0: State, t: Tensor, reverse: bool, kwargs: dict[str, Any]
    ) -> Any:
        """Calls the solver; an exception gets a note naming this horizon (and remedies), and is re-raised."""
        try:
            return solver(func, y0, t, **kwargs)
        except Exception as error:
            note = f"{self.describe(reverse)}: the solve failed."
            if _is_step_failure(error):
                note += " " + _REMEDIES
            _add_note(error, note)
            raise

    @staticmethod
    def _check_times(times: Tensor | Sequence[float], like: Tensor) -> tuple[Tensor, bool]:
        try:
            s = torch.as_tensor(times, dtype=like.dtype, device=like.device).detach()
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"times must be a 1-D sequence of floats in [0, 1], got {times!r}.") from e
        if s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"times must be a non-empty 1-D sequence of points in [0, 1], got shape {tuple(s.shape)}.")
        if not torch.isfinite(s).all() or s.min() < 0 or s.max() > 1:
            raise ValueError(
                f"times must lie in [0, 1] (fractions of the interval from its start), got {s.tolist()}. "
                "Rescale absolute times t with (t - t0) / (T - t0)."
            )
        if s.numel() > 1 and not (s[1:] > s[:-1]).all():
            raise ValueError(f"times must be strictly increasing, got {s.tolist()}.")
        if s[0] == 0:
            return s, False
        return torch.cat([s.new_zeros(1), s]), True

    @staticmethod
    def _check_resolved(grid: Tensor, s: Tensor, start: float, end: float) -> None:
        """Refuses points of ``times`` that coincide, or nearly, once placed on the interval."""
        tiny = 64 * torch.finfo(grid.dtype).eps * max(abs(start), abs(end), abs(end - start))
        gaps = (grid[1:] - grid[:-1]).abs()
        if bool((gaps <= tiny).any()):
            raise ValueError(
                f"times has points too close together to be resolved on the interval from {start:.6g} to {end:.6g} "
                f"in {grid.dtype} (with the start 0 included: {s.tolist()}): consecutive points must differ by "
                f"more than {tiny:.3g} in time. Merge or drop the coinciding points."
            )

    @staticmethod
    def _check_solution(sol: Any, is_tuple: bool, n: int, steps: int) -> tuple[Tensor, ...]:
        parts = tuple(sol) if is_tuple else (sol,)
        if len(parts) != n or not all(isinstance(p, Tensor) and p.dim() >= 1 and p.shape[0] == steps for p in parts):
            raise ValueError(
                "solver must return the solution at every time of t, stacked along a leading dimension, "
                f"with the structure of y0 ({n} tensor(s), leading size {steps}); got {type(sol).__name__}. "
                "Wrap solvers that return only the final state."
            )
        return parts

    def extra_repr(self) -> str:
        lo, hi = self.bounds
        t0 = f"{self.t0.item():.4g}" + (" (learned)" if self.learn_t0 else "")
        return f"T={self.T.item():.4g}, t0={t0}, bounds=[{lo:.4g}, {hi:.4g}]"


def load_state_dict_adding_horizons(model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> dict[str, str]:
    r"""Loads a checkpoint saved before ``model`` had its horizons, e.g. to switch TO-FLOW on mid-training.

    Every :class:`LearnableHorizon` of ``model`` whose entries (``T``, ``t0``,
    ``T_init``, ``t0_init``, ``eps``) are missing from ``state_dict`` keeps the
    values it was constructed with, and the rest of ``model`` is loaded as by
    ``model.load_state_dict(state_dict, strict=strict)``. **Construct the new
    horizons with the end time the checkpoint was trained with** (``T0=0.5`` for
    an FFJORD toy model): that is where T starts. What was initialised is
    returned and reported in one :class:`UserWarning`. A checkpoint that already
    holds the horizons loads exactly as with ``load_state_dict``, without warning.

    To continue the optimizer too, pass the old (plain) optimizer's state dict to
    :meth:`CoordinateDescentStepper.load_state_dict
    <torch_tempopt.CoordinateDescentStepper.load_state_dict>`: it loads it into the
    weight optimizer and starts the horizon optimizer fresh.

    Arguments:
        model: The model, holding :class:`LearnableHorizon` submodules.
        state_dict: Its state from before the horizons were added.
        strict: Whether every other key must match, as in :meth:`torch.nn.Module.load_state_dict`.

    Returns:
        For each horizon initialised from its constructor values, its name in
        ``model`` mapped to its description (T, t0, bounds); empty if none was.

    Raises:
        TypeError: If ``model`` is not a module or ``state_dict`` not a mapping.
        ValueError: If ``strict`` and keys other than the horizons' are missing
            or unexpected (nothing is loaded then).

    Example:
        >>> import torch
        >>> old = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> new = torch.nn.Sequential(torch.nn.Linear(2, 2), LearnableHorizon(T0=0.5))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # it warns that horizon '1' starts from its constructor values
        ...     added = load_state_dict_adding_horizons(new, old.state_dict())
        >>> added
        {'1': 'T=0.5, t0=0, bounds [0.1, 0.9]'}
        >>> torch.equal(new[0].weight, old[0].weight)
        True

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module holding LearnableHorizon submodules, got {type(model).__name__}.")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping from names to tensors (model.state_dict()), got {type(state_dict).__name__}.")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}.")
    current = model.state_dict()
    horizons = [(name, h) for name, h in model.named_modules() if isinstance(h, LearnableHorizon)]
    horizon_keys = {(f"{name}." if name else "") + key: name for name, h in horizons for key in h.state_dict()}
    missing = [k for k in current if k not in state_dict]
    unexpected = [k for k in state_dict if k not in current]
    others = [k for k in missing if k not in horizon_keys]
    if strict and (others or unexpected):
        raise ValueError(
            "state_dict does not match model apart from its horizons: "
            f"missing {others or 'nothing'}, unexpected {unexpected or 'nothing'}. Nothing was loaded. "
            "Pass strict=False to load the matching entries anyway."
        )
    filled = dict(state_dict)
    keys: dict[str, list[str]] = {}
    for key in missing:
        name = horizon_keys.get(key)
        if name is not None:
            filled[key] = current[key]
            keys.setdefault(name, []).append(key.rsplit(".", 1)[-1])
    model.load_state_dict(filled, strict=strict)
    added: dict[str, str] = {}
    by_name = dict(horizons)
    for name, entries in keys.items():
        horizon = by_name[name]
        lo, hi = horizon.bounds
        text = f"T={horizon.T.item():.6g}, t0={horizon.t0.item():.6g}, bounds [{lo:.6g}, {hi:.6g}]"
        if len(entries) < len(horizon.state_dict()):
            text += f" (only {', '.join(entries)} initialised)"
        added[name] = text
    if added:
        listed = "; ".join(f"{name or '<model>'!r}: {text}" for name, text in added.items())
        warnings.warn(
            f"load_state_dict_adding_horizons: {len(added)} horizon(s) absent from the checkpoint start from "
            f"their constructor values: {listed}.",
            UserWarning,
            stacklevel=2,
        )
    return added
