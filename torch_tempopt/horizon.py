"""A learnable integration horizon [t0, T] for any odeint-style solver."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence, Union

import torch
import torchdiffeq
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._checks import as_real, check_state

__all__ = ["LearnableHorizon", "MECHANISMS"]

State = Union[Tensor, "tuple[Tensor, ...]"]
Solver = Callable[..., Any]

#: The ways :class:`LearnableHorizon` can make T differentiable.
MECHANISMS = ("direct", "rescale")


def _pack(is_tuple: bool, parts: Sequence[Tensor]) -> State:
    return tuple(parts) if is_tuple else parts[0]


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
        total = total + torch.sum(fi.detach() * gi).to(t.dtype)
    return total


class _Entry(torch.autograd.Function):
    r"""Identity on the initial state; sends dL/dt_start = -<a(t_start), F(t_start, y0)> to t_start."""

    @staticmethod
    def forward(ctx: Any, settings: tuple[Any, bool], t_start: Tensor, *y0: Tensor) -> tuple[Tensor, ...]:
        ctx.settings = settings
        ctx.save_for_backward(t_start, *y0)
        return tuple(y.clone() for y in y0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        func, is_tuple = ctx.settings
        t_start, *y0 = ctx.saved_tensors
        grad_t = None
        if ctx.needs_input_grad[1]:
            if all(g is None or not torch.any(g) for g in grads):
                grad_t = torch.zeros_like(t_start)
            else:
                gs = [torch.zeros_like(y) if g is None else g for y, g in zip(y0, grads)]
                grad_t = -_field_dot(func, is_tuple, t_start, y0, gs)
        return (None, grad_t, *grads)


class _Exit(torch.autograd.Function):
    r"""Identity on the solution at ``grid``; sends dL/dt_i = <dL/dy(t_i), F(t_i, y(t_i))> to the grid."""

    @staticmethod
    def forward(ctx: Any, settings: tuple[Any, bool], grid: Tensor, *sol: Tensor) -> tuple[Tensor, ...]:
        ctx.settings = settings
        ctx.save_for_backward(grid, *sol)
        return tuple(y.clone() for y in sol)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        func, is_tuple = ctx.settings
        grid, *sol = ctx.saved_tensors
        grad_grid = None
        if ctx.needs_input_grad[1]:
            grad_grid = torch.zeros_like(grid)
            for i in range(grid.shape[0]):
                gs = [torch.zeros_like(y[i]) if g is None else g[i] for y, g in zip(sol, grads)]
                if any(torch.any(g) for g in gs):
                    grad_grid[i] = _field_dot(func, is_tuple, grid[i], [y[i] for y in sol], gs)
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
        self.dtype = like.dtype
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
        dtype = torch.get_default_dtype()
        self.T = nn.Parameter(torch.tensor(T0_, dtype=dtype))
        if learn_t0:
            self.t0 = nn.Parameter(torch.tensor(t0_, dtype=dtype))
        else:
            self.register_buffer("t0", torch.tensor(t0_, dtype=dtype))
        self.register_buffer("T_init", torch.tensor(T0_, dtype=torch.float64))
        self.register_buffer("t0_init", torch.tensor(t0_, dtype=torch.float64))
        self.register_buffer("eps", torch.tensor(eps_, dtype=torch.float64))
        self.learn_t0 = learn_t0

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
            ValueError: If ``mechanism`` is unknown or ``times`` is not an
                increasing sequence in [0, 1].

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
        like = parts[0]
        start, end = self._endpoints(reverse, like.dtype, like.device)

        s = torch.tensor([0.0, 1.0], dtype=like.dtype, device=like.device)
        skip_first = True
        if times is not None:
            s, skip_first = self._check_times(times, like)

        if mechanism == "rescale":
            return self._solve_rescaled(func, is_tuple, parts, s, skip_first, times is None, solver, reverse, solver_kwargs)

        # The end points are start and end themselves, so that a fixed end point gets no (zero) gradient
        # path and costs no evaluation of the field in the backward pass.
        grid = torch.cat([start[None], start + s[1:-1] * (end - start), end[None]]) if s[-1] == 1 else start + s * (end - start)
        track = torch.is_grad_enabled() and (start.requires_grad or end.requires_grad)
        settings = (func, is_tuple)
        y_in: tuple[Tensor, ...] = parts
        if track and start.requires_grad:
            y_in = _Entry.apply(settings, start, *parts)
        sol = solver(func, _pack(is_tuple, y_in), grid.detach(), **solver_kwargs)
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
        sol = solver(field, _pack(is_tuple, parts), s, **kwargs)
        sol_parts = self._check_solution(sol, is_tuple, len(parts), s.shape[0])
        if final_only:
            sol_parts = tuple(p[-1] for p in sol_parts)
        elif skip_first:
            sol_parts = tuple(p[1:] for p in sol_parts)
        return _pack(is_tuple, sol_parts)

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
