r"""Adapters that give other ODE solvers odeint's signature, for :class:`~torch_tempopt.LearnableHorizon`.

:class:`~torch_tempopt.LearnableHorizon` accepts any ``solver`` with odeint's
signature, ``solver(func, y0, t, **kwargs)``, that returns the solution at every
time of ``t`` stacked on a leading dimension. It hands the solver a *detached*
time grid and attaches :math:`dL/dT = \langle dL/dy(T), F(T, y(T)) \rangle`
(and :math:`dL/dt_0 = -\langle dL/dy(t_0), F(t_0, y_0) \rangle`) itself, so the
time gradient is right whatever the backend does with time: it may drop it
(torchode's ``BacksolveAdjoint``), get its sign wrong (zuko 1.6's ``odeint`` for
the start time) or not have one at all. The backend only has to differentiate
the state and its field's parameters.

The adapters here build such a solver:

* :func:`fixed_grid_solver`: a fixed-step integrator from a one-step rule
  ``step(func, t, y, dt) -> y_next`` or a built-in name (``"euler"``,
  ``"midpoint"``, ``"rk4"``), with ``nt`` steps per interval or a ``step_size``.
* :func:`final_state_solver`: any integrator that returns only the final
  state, whatever the order of its arguments and of its field's arguments
  (OT-Flow's ``integrate(x, net, tspan, nt)``, which calls ``odefun(x, t, net)``).
* :func:`zuko_solver` (``pip install torch-tempopt[zuko]``): ``zuko.utils.odeint``,
  and :func:`learnable_ffjt` for ``zuko.flows.CNF`` / ``FreeFormJacobianTransform``.
* :func:`torchode_solver` (``pip install torch-tempopt[torchode]``):
  ``torchode``'s ``AutoDiffAdjoint`` and ``BacksolveAdjoint``.
* :func:`torchdyn_solver` (``pip install torch-tempopt[torchdyn]``):
  ``torchdyn``'s ``odeint`` and its adjoint sensitivities.

The protocol for another solver is small: a callable ``solver(func, y0, t, **kwargs)``
where ``func(t, y)`` is the field, ``y0`` a tensor or a tuple of tensors and ``t``
a 1-D tensor of increasing or decreasing times, that returns the states at all
of ``t`` (for a tuple state, a tuple of stacked tensors). The state at ``t[0]``
may be ``y0`` itself. The solver must differentiate the state (``dL/dy0`` feeds
a learned start time) and the field's parameters; it need not, and should not,
differentiate ``t``. The horizon evaluates ``func`` once more per learned end
point in the backward pass, so ``func`` must compute the same field as the one
the solver integrates.

Example:
    A solver that returns only the final state and calls its field as
    ``odefun(x, t, net)``, like OT-Flow's ``integrate(x, net, tspan, nt)``:

    >>> import torch
    >>> from torch_tempopt import LearnableHorizon
    >>> def integrate(x, odefun, tspan, nt):  # explicit Euler, the field called as odefun(x, t)
    ...     h = (tspan[1] - tspan[0]) / nt
    ...     t = tspan[0]
    ...     for _ in range(nt):
    ...         x, t = x + h * odefun(x, t), t + h
    ...     return x
    >>> solver = final_state_solver(integrate, signature="y0, func, tspan", field="y, t", nt=1000)
    >>> horizon = LearnableHorizon(T0=0.5)
    >>> y = horizon(lambda t, y: -y, torch.ones(3), solver=solver)
    >>> y.sum().backward()
    >>> round(horizon.T.grad.item(), 2)  # <dL/dy(T), F> = 3 * (-exp(-0.5)) = -1.8196
    -1.82

    Integrating from T back to t0 (the sampling direction) needs nothing more:
    ``horizon(func, z, solver=solver, reverse=True)``.

"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any, Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn

from ._checks import check_state
from .horizon import LearnableHorizon

__all__ = [
    "STEPS",
    "final_state_solver",
    "fixed_grid_solver",
    "learnable_ffjt",
    "torchdyn_solver",
    "torchode_solver",
    "zuko_solver",
]

State = Union[Tensor, "tuple[Tensor, ...]"]
Solver = Callable[..., State]
Field = Callable[[Tensor, Any], Any]

#: Versions the adapters were tested against (``tests/test_solvers.py``).
_TESTED = {"zuko": "1.6.0", "torchode": "1.0.1", "torchdyn": "1.0.6"}


def _require(module: str, extra: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs the optional dependency {module!r}, which is not installed. "
            f"Install it with: pip install 'torch-tempopt[{extra}]' (tested with {extra}=={_TESTED[extra]})."
        ) from e


# ----------------------------------------------------------------------------------------------------------------------
# Structure helpers: every adapter works on a tuple of tensors internally.


def _parts(y: Any) -> tuple[Tensor, ...]:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _pack(is_tuple: bool, parts: Sequence[Tensor]) -> State:
    return tuple(parts) if is_tuple else parts[0]


def _stack(is_tuple: bool, states: Sequence[Sequence[Tensor]]) -> State:
    return _pack(is_tuple, [torch.stack([s[i] for s in states]) for i in range(len(states[0]))])


def _check_call(func: Any, y0: Any, t: Any) -> tuple[bool, tuple[Tensor, ...], Tensor]:
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}.")
    is_tuple, parts = check_state("y0", y0)
    if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() < 2:
        raise ValueError(
            "t must be a 1-D tensor of at least two times (the horizon passes [t0, T] or [T, t0]), got "
            f"{type(t).__name__}{'' if not isinstance(t, Tensor) else ' of shape ' + str(tuple(t.shape))}."
        )
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}.")
    return is_tuple, parts, t


def _check_result(name: str, out: Any, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    parts = _parts(out)
    if len(parts) != len(like) or not all(
        isinstance(p, Tensor) and p.shape == q.shape for p, q in zip(parts, like)
    ):
        got = [tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__ for p in parts]
        raise ValueError(
            f"{name} must return the final state with the structure and shapes of y0 "
            f"({[tuple(q.shape) for q in like]}), got {got}. If it returns a trajectory or extra values, "
            "wrap it in a function that returns the final state only."
        )
    return parts


def _chain(step: Callable[[tuple[Tensor, ...], Tensor, Tensor], tuple[Tensor, ...]], is_tuple: bool,
           parts: tuple[Tensor, ...], t: Tensor) -> State:
    """Integrates interval by interval with ``step(y, t_a, t_b) -> y_b`` and stacks the states at all of t."""
    states = [parts]
    for i in range(t.shape[0] - 1):
        states.append(step(states[-1], t[i], t[i + 1]))
    return _stack(is_tuple, states)


def _field_params(func: Any, name: str) -> tuple[Tensor, ...]:
    if not isinstance(func, nn.Module):
        raise ValueError(
            f"func must be an nn.Module, or {name} must be given: the backend's adjoint differentiates only the "
            f"parameters it is handed. Pass {name}=tuple(model.parameters()) (or () if the field has none)."
        )
    return tuple(func.parameters())


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={value}.")
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {value!r} of type {type(value).__name__}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {name}={value}.")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------------
# Fixed-step grids.


def _add(y: tuple[Tensor, ...], h: Tensor, terms: Sequence[tuple[float, tuple[Tensor, ...]]]) -> tuple[Tensor, ...]:
    return tuple(yi + h * sum(c * k[i] for c, k in terms) for i, yi in enumerate(y))


def _euler(f: Callable[..., tuple[Tensor, ...]], t: Tensor, y: tuple[Tensor, ...], dt: Tensor) -> tuple[Tensor, ...]:
    return _add(y, dt, [(1.0, f(t, y))])


def _midpoint(f: Callable[..., tuple[Tensor, ...]], t: Tensor, y: tuple[Tensor, ...], dt: Tensor) -> tuple[Tensor, ...]:
    k1 = f(t, y)
    return _add(y, dt, [(1.0, f(t + dt / 2, _add(y, dt / 2, [(1.0, k1)])))])


def _rk4(f: Callable[..., tuple[Tensor, ...]], t: Tensor, y: tuple[Tensor, ...], dt: Tensor) -> tuple[Tensor, ...]:
    k1 = f(t, y)
    k2 = f(t + dt / 2, _add(y, dt / 2, [(1.0, k1)]))
    k3 = f(t + dt / 2, _add(y, dt / 2, [(1.0, k2)]))
    k4 = f(t + dt, _add(y, dt, [(1.0, k3)]))
    return _add(y, dt, [(1 / 6, k1), (1 / 3, k2), (1 / 3, k3), (1 / 6, k4)])


#: The built-in one-step rules of :func:`fixed_grid_solver`: explicit Euler,
#: the explicit midpoint rule and the classic fourth-order Runge-Kutta method.
STEPS = {"euler": _euler, "midpoint": _midpoint, "rk4": _rk4}


def fixed_grid_solver(
    step: str | Callable[[Field, Tensor, Any, Tensor], Any] = "rk4",
    *,
    nt: int | None = None,
    step_size: float | None = None,
) -> Solver:
    r"""Makes a fixed-step solver with odeint's signature from a one-step rule.

    Each interval :math:`[t_i, t_{i+1}]` of the time grid is cut into ``n``
    equal steps, ``n = nt`` or ``n = ceil(|t_{i+1} - t_i| / step_size)``. Equal
    steps (rather than a clipped last step) make the discrete solution a smooth
    function of T between the values of T where ``n`` changes.

    With the horizon, dL/dT is :math:`\langle dL/dy(T), F(T, y_h(T)) \rangle` at
    the discrete end state: it matches the derivative of the discrete solution
    up to the method's error (:math:`O(h^4)` for ``"rk4"``), which is how
    OT-Flow's fixed ``nt`` RK4 grid behaves with a learned T.

    Arguments:
        step: A name from :data:`STEPS` or a rule ``step(func, t, y, dt) -> y_next``
            that advances the state ``y`` (a tensor or a tuple of them, as given)
            from ``t`` to ``t + dt``; ``dt`` is negative when integrating backwards.
        nt: The number of equal steps per interval of the grid (for the
            horizon's default grid [t0, T]: in all, as OT-Flow's ``nt``).
        step_size: The largest step; each interval gets the fewest equal steps
            not longer than this. Exactly one of ``nt`` and ``step_size``.

    Returns:
        A solver ``solver(func, y0, t)`` that returns the states at all of ``t``.

    Raises:
        TypeError: If ``step`` is neither a known name nor callable, or ``nt``/
            ``step_size`` have the wrong type.
        ValueError: If not exactly one of ``nt`` and ``step_size`` is given, or
            one is not positive.

    Example:
        >>> import torch
        >>> from torch_tempopt import LearnableHorizon
        >>> horizon = LearnableHorizon(T0=1.0)
        >>> y = horizon(lambda t, y: -y, torch.ones(2), solver=fixed_grid_solver("rk4", nt=8))
        >>> round(y[0].item(), 5)  # exp(-1) = 0.36788
        0.36788

    """
    if isinstance(step, str):
        if step not in STEPS:
            raise ValueError(f"step must be one of {sorted(STEPS)} or a callable step(func, t, y, dt), got {step!r}.")
        rule = STEPS[step]
        builtin = True
    elif callable(step):
        rule = step
        builtin = False
    else:
        raise TypeError(f"step must be one of {sorted(STEPS)} or a callable step(func, t, y, dt), got {type(step).__name__}.")
    if (nt is None) == (step_size is None):
        raise ValueError(
            f"exactly one of nt and step_size must be given, got nt={nt!r} and step_size={step_size!r}. "
            "Use nt=8 for 8 steps per interval (OT-Flow's default), or step_size=0.05."
        )
    n_fixed = _positive_int("nt", nt) if nt is not None else None
    h_max = _positive_float("step_size", step_size) if step_size is not None else None

    def solve(func: Field, y0: State, t: Tensor) -> State:
        is_tuple, parts, t = _check_call(func, y0, t)

        if builtin:
            def f(s: Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                out = _parts(func(s, _pack(is_tuple, y)))
                if len(out) != len(y):
                    raise ValueError(f"func returned {len(out)} tensor(s) for a state of {len(y)}.")
                return out

            def advance(y: tuple[Tensor, ...], s: Tensor, dt: Tensor) -> tuple[Tensor, ...]:
                return rule(f, s, y, dt)
        else:
            def advance(y: tuple[Tensor, ...], s: Tensor, dt: Tensor) -> tuple[Tensor, ...]:
                return _check_result("step", rule(func, s, _pack(is_tuple, y), dt), y)

        def interval(y: tuple[Tensor, ...], ta: Tensor, tb: Tensor) -> tuple[Tensor, ...]:
            if n_fixed is not None:
                n = n_fixed
            else:
                assert h_max is not None
                n = max(1, math.ceil(abs((tb - ta).detach().item()) / h_max - 1e-9))
            dt = (tb - ta) / n
            for k in range(n):
                y = advance(y, ta + k * dt, dt)
            return y

        return _chain(interval, is_tuple, parts, t)

    solve.__doc__ = f"A fixed-step solver: {step if builtin else getattr(step, '__name__', 'step')}, " + (
        f"nt={nt}." if nt is not None else f"step_size={step_size}."
    )
    return solve


# ----------------------------------------------------------------------------------------------------------------------
# Solvers that return only the final state.

_SLOTS = ("func", "y0", "t0", "t1", "tspan")
_FIELD_ORDERS = ("t, y", "y, t")


def _parse_signature(signature: Any) -> tuple[str, ...]:
    if not isinstance(signature, str):
        raise TypeError(f"signature must be a string such as 'y0, func, tspan', got {type(signature).__name__}.")
    names = tuple(s.strip() for s in signature.split(","))
    bad = [s for s in names if s not in _SLOTS]
    if bad:
        raise ValueError(f"signature names unknown argument(s) {bad}: use names from {_SLOTS}, e.g. 'y0, func, tspan'.")
    if len(set(names)) != len(names):
        raise ValueError(f"signature names an argument twice: {signature!r}.")
    if "y0" not in names:
        raise ValueError(f"signature must place the initial state y0, got {signature!r}.")
    if "tspan" not in names and not {"t0", "t1"} <= set(names):
        raise ValueError(f"signature must place the times: tspan, or both t0 and t1; got {signature!r}.")
    return names


def final_state_solver(
    integrate: Callable[..., Any],
    *,
    signature: str = "func, y0, t0, t1",
    field: str = "t, y",
    **kwargs: Any,
) -> Solver:
    r"""Makes a solver with odeint's signature from one that returns only the final state.

    ``integrate`` is called once per interval of the time grid, with its
    positional arguments in the order named by ``signature`` and ``kwargs`` as
    keyword arguments; the states are stacked as odeint's are, ``[y0, y1, ...]``.
    For the horizon's default grid that is ``[y0, y(T)]`` (or ``[y(T), y(t0)]``
    with ``reverse=True``).

    Arguments:
        integrate: The integrator. It returns the state at the end of the
            interval, with the structure and shapes of ``y0``, and is
            differentiable in the state and its field's parameters.
        signature: The names of ``integrate``'s positional arguments in order,
            comma-separated, from ``func`` (the field), ``y0``, ``t0``, ``t1``
            (0-dim tensors) and ``tspan`` (the 1-D tensor ``[t0, t1]``). ``func``
            may be left out for an integrator that brings its own field (then
            the ``func`` handed to the horizon must compute that same field).
        field: How ``integrate`` calls the field it is handed: ``"t, y"``
            (odeint, zuko) or ``"y, t"`` (OT-Flow's ``odefun(x, t, net)``).
            Arguments it passes after these two are ignored.
        kwargs: Fixed keyword arguments of ``integrate`` (``nt=8``). Keyword
            arguments given to the solver at call time are added to them.

    Returns:
        A solver ``solver(func, y0, t, **kwargs)``.

    Raises:
        TypeError: If ``integrate`` is not callable or ``signature`` is not a string.
        ValueError: If ``signature`` or ``field`` is malformed, or (when called)
            ``integrate`` returns something other than the final state.

    Example:
        OT-Flow (https://github.com/EmoryMLIP/OT-Flow) integrates with
        ``integrate(x, net, tspan, nt)``, which steps its own ``odefun(x, t, net)``
        with RK4. Its field for the horizon is that same ``odefun``:

        ```python
        solver = final_state_solver(lambda x, tspan, nt: integrate(x, net, tspan, nt),
                                    signature="y0, tspan", nt=8)
        z = horizon(lambda t, x: odefun(x, t, net, alph=alph), x, solver=solver)
        ```

    """
    if not callable(integrate):
        raise TypeError(f"integrate must be callable, got {type(integrate).__name__}.")
    names = _parse_signature(signature)
    if not isinstance(field, str):
        raise TypeError(f"field must be one of {_FIELD_ORDERS}, got {type(field).__name__}.")
    order = ", ".join(s.strip() for s in field.split(","))
    if order not in _FIELD_ORDERS:
        raise ValueError(f"field must be one of {_FIELD_ORDERS} (how integrate calls its field), got {field!r}.")
    fixed = dict(kwargs)

    def solve(func: Field, y0: State, t: Tensor, **call_kwargs: Any) -> State:
        is_tuple, parts, t = _check_call(func, y0, t)
        fn: Any = func
        if order == "y, t":
            def fn(y: Any, s: Tensor, *_: Any, **__: Any) -> Any:
                return func(s, y)
        options = {**fixed, **call_kwargs}

        def interval(y: tuple[Tensor, ...], ta: Tensor, tb: Tensor) -> tuple[Tensor, ...]:
            # Fresh tensors: integrators such as OT-Flow's advance their time in place (tk += h).
            slots = {"func": fn, "y0": _pack(is_tuple, y), "t0": ta.clone(), "t1": tb.clone(),
                     "tspan": torch.stack([ta, tb]).clone()}
            return _check_result("integrate", integrate(*(slots[s] for s in names), **options), y)

        return _chain(interval, is_tuple, parts, t)

    return solve


# ----------------------------------------------------------------------------------------------------------------------
# zuko.


def _zuko_field(func: Field, is_tuple: bool) -> Callable[..., Any]:
    """The field as zuko calls it: f(t, x) for a tensor state, and f(t, *xs) for a sequence of tensors."""
    if not is_tuple:
        return func

    def f(t: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(func(t, tuple(xs)))

    return f


def zuko_solver(*, atol: float = 1e-6, rtol: float = 1e-5, phi: Iterable[Tensor] | None = None) -> Solver:
    r"""Makes a solver with odeint's signature from ``zuko.utils.odeint``.

    ``zuko.utils.odeint(f, x, t0, t1, phi, atol, rtol)`` integrates with an
    adaptive Dormand-Prince method and returns only the final state; its
    adaptive checkpoint adjoint differentiates ``x`` and the parameters ``phi``
    it is handed, and nothing else (a parameter left out gets no gradient).
    The solver chains one call per interval of the grid. zuko 1.6 returns
    :math:`+\langle a(t_0), f(t_0, x_0) \rangle` for :math:`dL/dt_0` (the sign
    is wrong), which matters in the sampling direction, where T is zuko's
    ``t0``; the horizon never hands zuko a time that requires grad, so it does
    not matter here.

    Arguments:
        atol: The absolute tolerance.
        rtol: The relative tolerance.
        phi: The parameters of the field. By default, ``func.parameters()`` if
            ``func`` is an :class:`~torch.nn.Module`; a field that is not must
            be given ``phi`` (``()`` if it has none). Parameters that do not
            require grad are dropped; every other one must be used by the field
            (zuko differentiates them without ``allow_unused``).

    Returns:
        A solver ``solver(func, y0, t, *, adjoint_params=None, atol=None, rtol=None)``;
        ``adjoint_params`` (torchdiffeq's name, which ``mechanism="rescale"``
        fills in) replaces ``phi`` for one call.

    Example:
        ```python
        net = torch.nn.Linear(2, 2)
        y = horizon(lambda t, y: net(y), x, solver=zuko_solver(atol=1e-7, rtol=1e-7, phi=net.parameters()))
        y = horizon(field, x, solver=zuko_solver())  # field an nn.Module: its parameters are phi
        ```

    """
    default_atol = _positive_float("atol", atol)
    default_rtol = _positive_float("rtol", rtol)
    fixed = None if phi is None else tuple(phi)
    if fixed is not None and not all(isinstance(p, Tensor) for p in fixed):
        raise TypeError("phi must be an iterable of tensors (the field's parameters).")

    def solve(
        func: Field,
        y0: State,
        t: Tensor,
        *,
        adjoint_params: Iterable[Tensor] | None = None,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> State:
        utils = _require("zuko.utils", "zuko", "zuko_solver")
        is_tuple, parts, t = _check_call(func, y0, t)
        if adjoint_params is not None:
            params = tuple(adjoint_params)
        elif fixed is not None:
            params = fixed
        else:
            params = _field_params(func, "phi")
        params = tuple(p for p in params if p.requires_grad)
        a = default_atol if atol is None else _positive_float("atol", atol)
        r = default_rtol if rtol is None else _positive_float("rtol", rtol)
        f = _zuko_field(func, is_tuple)

        def interval(y: tuple[Tensor, ...], ta: Tensor, tb: Tensor) -> tuple[Tensor, ...]:
            x = y if is_tuple else y[0]
            return _check_result("zuko.utils.odeint", utils.odeint(f, x, ta, tb, params, a, r), y)

        return _chain(interval, is_tuple, parts, t.detach())

    return solve


@functools.cache
def _zuko_ffjt_classes() -> tuple[type, type]:
    _require("zuko", "zuko", "learnable_ffjt")
    from zuko.lazy import LazyTransform
    from zuko.transforms import FreeFormJacobianTransform

    class HorizonFFJTransform(FreeFormJacobianTransform):
        r"""zuko's free-form Jacobian transformation over a :class:`LearnableHorizon`'s [t0, T].

        The forward map integrates t0 -> T (the density direction, as zuko's
        ``t0 -> t1``); :attr:`inv` integrates T -> t0 (sampling).
        """

        def __init__(self, base: Any, horizon: nn.Module, reverse: bool = False) -> None:
            start, end = (horizon.T, horizon.t0) if reverse else (horizon.t0, horizon.T)
            super().__init__(f=base.f, t0=start, t1=end, phi=base.phi, atol=base.atol, rtol=base.rtol, exact=base.exact)
            self.trace_scale = base.trace_scale
            self.horizon = horizon
            self.reverse = reverse

        def _solver(self) -> Solver:
            return zuko_solver(atol=self.atol, rtol=self.rtol, phi=self.phi)

        def _call(self, x: Tensor) -> Tensor:
            return self.horizon(self.f, x, solver=self._solver(), reverse=self.reverse)

        def _inverse(self, y: Tensor) -> Tensor:
            return self.horizon(self.f, y, solver=self._solver(), reverse=not self.reverse)

        @property
        def inv(self) -> HorizonFFJTransform:
            return HorizonFFJTransform(self, self.horizon, reverse=not self.reverse)

        def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
            # zuko 1.6's FreeFormJacobianTransform.call_and_ladj, with the horizon in place of odeint.
            timed = any(p.requires_grad for p in self.horizon.parameters_of_time())
            create_graph = torch.is_grad_enabled() and (x.requires_grad or bool(self.phi) or timed)
            if self.exact:
                eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
                eye = eye.expand(*x.shape, -1).movedim(-1, 0)
            else:
                eps = torch.randn_like(x)

            def f_aug(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
                with torch.enable_grad():
                    z = state[0].clone().requires_grad_()
                    dz = self.f(t, z)
                if self.exact:
                    jac = torch.autograd.grad(dz, z, eye, create_graph=create_graph, is_grads_batched=True)[0]
                    trace = torch.einsum("i...i", jac)
                else:
                    trace = (torch.autograd.grad(dz, z, eps, create_graph=create_graph)[0] * eps).sum(dim=-1)
                return dz, trace * self.trace_scale

            ladj = torch.zeros_like(x[..., 0])
            y, ladj = self.horizon(f_aug, (x, ladj), solver=self._solver(), reverse=self.reverse)
            return y, ladj * (1 / self.trace_scale)

    class LearnableFFJTransform(LazyTransform):
        r"""A lazy FFJ transformation (``zuko.flows.FFJTransform``) over a :class:`LearnableHorizon`."""

        def __init__(self, transform: nn.Module, horizon: nn.Module) -> None:
            super().__init__()
            self.transform = transform
            self.horizon = horizon

        def forward(self, c: Tensor | None = None) -> Any:
            return learnable_ffjt(self.transform(c), self.horizon)

    return HorizonFFJTransform, LearnableFFJTransform


def learnable_ffjt(transform: Any, horizon: nn.Module) -> Any:
    r"""Puts a zuko free-form Jacobian transformation on a learnable horizon.

    ``zuko.flows.CNF`` holds a lazy ``FFJTransform`` whose ``times`` buffer
    ``(0., 1.)`` becomes the ``t0, t1`` of a ``FreeFormJacobianTransform``;
    zuko differentiates those times itself, right for ``t1`` but with the
    wrong sign for ``t0`` (zuko 1.6), so a learned T would get the wrong
    gradient when sampling (``inv`` integrates from T). The returned
    transformation integrates over ``[horizon.t0, horizon.T]`` instead, through
    the horizon: ``log_prob`` (``call_and_ladj``, t0 -> T) and ``rsample``
    (``inv``, T -> t0) both give T (and a learned t0) the right gradient.
    The ``times`` buffer is ignored.

    Arguments:
        transform: A ``zuko.transforms.FreeFormJacobianTransform``, or a lazy
            transformation that builds one (``zuko.flows.FFJTransform``,
            ``flow.transform`` of a ``zuko.flows.CNF``).
        horizon: The :class:`~torch_tempopt.LearnableHorizon`.

    Returns:
        A ``FreeFormJacobianTransform`` subclass for a transformation; for a
        lazy one, a ``zuko.lazy.LazyTransform`` module holding ``transform`` and
        ``horizon`` as submodules (so ``CoordinateDescentStepper`` finds the
        horizon in the flow). Undo with ``flow.transform = flow.transform.transform``.

    Raises:
        TypeError: If ``transform`` is neither, or ``horizon`` is not a LearnableHorizon.

    Example:
        ```python
        flow = zuko.flows.CNF(features=2)
        horizon = LearnableHorizon(T0=1.0)
        flow.transform = learnable_ffjt(flow.transform, horizon)
        loss = -flow().log_prob(x).mean()   # density: t0 -> T
        x = flow().rsample((64,))           # sampling: T -> t0
        ```

    """
    if not isinstance(horizon, LearnableHorizon):
        raise TypeError(f"horizon must be a LearnableHorizon, got {type(horizon).__name__}.")
    ffjt, lazy = _zuko_ffjt_classes()
    from zuko.lazy import LazyTransform
    from zuko.transforms import FreeFormJacobianTransform

    if isinstance(transform, ffjt):
        return ffjt(transform, horizon, reverse=transform.reverse)
    if isinstance(transform, FreeFormJacobianTransform):
        return ffjt(transform, horizon)
    if isinstance(transform, LazyTransform):
        return lazy(transform, horizon)
    raise TypeError(
        "transform must be a zuko FreeFormJacobianTransform or a lazy transformation that builds one "
        f"(zuko.flows.FFJTransform, the .transform of a zuko.flows.CNF), got {type(transform).__name__}."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Flat states for torchode and torchdyn.


class _FlatField(nn.Module):
    r"""``func(t, y)`` on a flat state: rows of ``(batch, features)`` or one vector of all elements.

    ``func`` is a submodule when it is a module, so that backends that read the
    field's parameters (torchode's backsolve, torchdyn's adjoint) find them.
    """

    def __init__(self, func: Field, is_tuple: bool, parts: tuple[Tensor, ...], batched: bool, flip: bool = False) -> None:
        super().__init__()
        self.flip = flip  # integrate s = -t forwards: the field -F(-s, y)
        if isinstance(func, nn.Module):
            self.func = func
        else:
            self.__dict__["func"] = func
        self.is_tuple = is_tuple
        self.batched = batched
        self.shapes = [p.shape[1:] if batched else p.shape for p in parts]
        self.sizes = [math.prod(s) for s in self.shapes]

    def pack(self, parts: Sequence[Tensor]) -> Tensor:
        if self.batched:
            return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
        return torch.cat([p.reshape(-1) for p in parts])

    def unpack(self, flat: Tensor) -> State:
        lead = flat.shape[:-1]
        pieces = flat.split(self.sizes, dim=-1)
        return _pack(self.is_tuple, [p.reshape(*lead, *s) for p, s in zip(pieces, self.shapes)])

    def forward(self, t: Tensor, y: Tensor, *_: Any, **__: Any) -> Tensor:
        if self.flip:
            return -self._eval(-t, y)
        return self._eval(t, y)

    def _eval(self, t: Tensor, y: Tensor) -> Tensor:
        if self.batched:
            row = y.dim() == 1  # a single sample, under torchode's vmap
            z = y[None] if row else y
            out = self.pack(_parts(self.func(t, self.unpack(z))))
            return out[0] if row else out
        out = self.pack(_parts(self.func(t, self.unpack(y.reshape(-1)))))
        return out.reshape(y.shape)


def _own_params_only(adjoint_params: Iterable[Tensor] | None, field: nn.Module, backend: str) -> None:
    if adjoint_params is None:
        return
    own = {id(p) for p in field.parameters()}
    extra = [p for p in adjoint_params if id(p) not in own]
    if extra:
        raise ValueError(
            f"{backend} differentiates only the parameters of func (an nn.Module), but adjoint_params holds "
            f"{len(extra)} other tensor(s), e.g. the horizon's T with mechanism='rescale'. Use mechanism='direct' "
            "(the default), or make them parameters of func."
        )


# ----------------------------------------------------------------------------------------------------------------------
# torchode.

_ADJOINTS = ("autodiff", "backsolve")
_CONTROLLERS = ("pid", "integral", "fixed")


def torchode_solver(
    step_method: str | type = "dopri5",
    *,
    atol: float = 1e-7,
    rtol: float = 1e-7,
    controller: str = "pid",
    adjoint: str = "autodiff",
    dt0: float | None = None,
    max_steps: int | None = None,
    batched: bool = False,
) -> Solver:
    r"""Makes a solver with odeint's signature from ``torchode``.

    torchode solves a batch of independent problems, a ``(batch, features)``
    state with a time grid per sample. By default the whole state (all
    tensors of a tuple state, flattened and concatenated) is one sample, so
    ``func(t, y)`` gets a 0-dim ``t`` and ``y`` with ``y0``'s structure, exactly
    as from odeint. With ``batched=True`` each row of the leading dimension
    (shared by every tensor of the state) is its own problem with its own step
    sizes: ``func`` then gets ``t`` of shape ``(batch,)`` (or 0-dim, with a batch
    of one row, under the backsolve adjoint's vmap and in the horizon's extra
    evaluation) and must not mix rows.

    ``BacksolveAdjoint`` returns no gradient for the times (None); the horizon
    does not need one. It differentiates only the parameters of ``func``,
    which must then be an :class:`~torch.nn.Module` (or have none), and
    ``mechanism="rescale"`` is refused.

    Arguments:
        step_method: A method name registered in torchode (``"dopri5"``,
            ``"tsit5"``, ``"heun"``) or a step method class, called as
            ``cls(term=term)`` (``torchode.Euler``, with ``controller="fixed"``).
        atol: The absolute tolerance of an adaptive controller.
        rtol: The relative tolerance of an adaptive controller.
        controller: ``"pid"`` (torchode's default PID coefficients),
            ``"integral"`` or ``"fixed"`` (needs ``dt0``).
        adjoint: ``"autodiff"`` (backpropagate through the solver) or
            ``"backsolve"`` (solve the adjoint equation backwards).
        dt0: The initial (for ``"fixed"``: the constant) step size, > 0; its
            sign follows the direction of integration.
        max_steps: Stop after this many steps (then the solver raises).
        batched: Treat the leading dimension as a batch of problems.

    Returns:
        A solver ``solver(func, y0, t, *, adjoint_params=None)``.

    Raises:
        ValueError: For an unknown ``adjoint``/``controller``/``step_method``, a
            ``"fixed"`` controller without ``dt0``, or (when called) a failed solve.
        TypeError: For arguments of the wrong type.

    Example:
        ```python
        solver = torchode_solver("dopri5", atol=1e-6, rtol=1e-6, adjoint="backsolve")
        z = horizon(cnf_field, (x, logp), solver=solver)
        ```

    """
    if adjoint not in _ADJOINTS:
        raise ValueError(f"adjoint must be one of {_ADJOINTS}, got {adjoint!r}.")
    if controller not in _CONTROLLERS:
        raise ValueError(f"controller must be one of {_CONTROLLERS}, got {controller!r}.")
    if not isinstance(step_method, (str, type)):
        raise TypeError(f"step_method must be a torchode method name or class, got {type(step_method).__name__}.")
    atol = _positive_float("atol", atol)
    rtol = _positive_float("rtol", rtol)
    h0 = None if dt0 is None else _positive_float("dt0", dt0)
    if controller == "fixed" and h0 is None:
        raise ValueError("dt0 must be given with controller='fixed': it is the step size.")
    if max_steps is not None:
        _positive_int("max_steps", max_steps)
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be True or False, got {batched!r}.")

    def solve(func: Field, y0: State, t: Tensor, *, adjoint_params: Iterable[Tensor] | None = None) -> State:
        to = _require("torchode", "torchode", "torchode_solver")
        from torchode.interface import METHODS

        is_tuple, parts, t = _check_call(func, y0, t)
        if batched:
            rows = {p.shape[0] if p.dim() else None for p in parts}
            if len(rows) != 1 or None in rows:
                raise ValueError(
                    f"batched=True needs every tensor of y0 to have the same leading (batch) size, got shapes "
                    f"{[tuple(p.shape) for p in parts]}. Use batched=False to solve the state as one problem."
                )
        field = _FlatField(func, is_tuple, parts, batched)
        if adjoint == "backsolve":
            if not isinstance(func, nn.Module):
                raise ValueError(
                    "func must be an nn.Module for adjoint='backsolve': torchode's BacksolveAdjoint differentiates "
                    "only the parameters of the module it integrates (a closure's parameters would get no gradient)."
                )
            _own_params_only(adjoint_params, field, "torchode's BacksolveAdjoint")
        flat = field.pack(parts)
        if not batched:
            flat = flat[None]
        grid = t.detach().to(flat.dtype).expand(flat.shape[0], -1)
        term = to.ODETerm(field)
        if isinstance(step_method, str):
            if step_method not in METHODS:
                raise ValueError(f"step_method must be one of {sorted(METHODS)} or a torchode method class, got {step_method!r}.")
            method = METHODS[step_method](term=term)
        else:
            method = step_method(term=term)
        if controller == "pid":
            ctrl = to.PIDController(atol, rtol, 0.2, 0.5, 0.0, term=term)
        elif controller == "integral":
            ctrl = to.IntegralController(atol, rtol, term=term)
        else:
            ctrl = to.FixedStepController()
        direction = 1.0 if bool(t[-1] > t[0]) else -1.0
        step0 = None if h0 is None else torch.full((flat.shape[0],), direction * h0, dtype=flat.dtype, device=flat.device)
        if adjoint == "autodiff":
            engine = to.AutoDiffAdjoint(method, ctrl, max_steps=max_steps)
        else:
            engine = to.BacksolveAdjoint(term, method, ctrl)
        sol = engine.solve(to.InitialValueProblem(y0=flat, t_eval=grid), dt0=step0)
        if bool((sol.status != 0).any()):
            codes = sorted({to.Status(int(s)).name for s in sol.status.tolist() if s != 0})
            raise ValueError(f"torchode did not finish the solve: status {codes}. Raise max_steps or loosen atol/rtol.")
        ys = sol.ys  # (rows, times, features)
        if batched:
            traj = field.unpack(ys.transpose(0, 1))  # (times, rows, ...)
            return traj
        return field.unpack(ys[0])  # (times, ...)

    return solve


# ----------------------------------------------------------------------------------------------------------------------
# torchdyn.

_SENSITIVITIES = ("autograd", "adjoint")


def torchdyn_solver(
    solver: str | nn.Module = "dopri5",
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    sensitivity: str = "autograd",
    solver_adjoint: str | nn.Module | None = None,
    atol_adjoint: float = 1e-6,
    rtol_adjoint: float = 1e-6,
    nt: int = 1,
) -> Solver:
    r"""Makes a solver with odeint's signature from ``torchdyn``.

    With ``sensitivity="autograd"`` this calls ``torchdyn.numerics.odeint``;
    with ``"adjoint"`` it solves a ``torchdyn.core.ODEProblem`` (what
    ``NeuralODE`` does). ``"interpolated_adjoint"`` is not supported (torchdyn
    returns its own steps then, not the times asked for). The state is
    flattened into one vector (tuple states are concatenated). torchdyn's
    fixed-step methods step from one time of the grid to the next; ``nt``
    cuts each interval into ``nt`` equal steps.

    A ``NeuralODE(field, solver=..., sensitivity=..., atol=..., rtol=...)``
    call ``node(x, t_span)`` becomes
    ``horizon(field, x, solver=torchdyn_solver(solver, sensitivity=..., atol=..., rtol=...))``.
    The adjoint differentiates only the parameters of ``func`` (an
    :class:`~torch.nn.Module`), so ``mechanism="rescale"`` is refused with it.
    torchdyn integrates a decreasing grid by negating time, and its adjoint
    then evaluates the field at the negated times (wrong gradients for a
    time-dependent field, torchdyn 1.0.6); the adapter integrates
    :math:`s = -t` forwards with the field :math:`-F(-s, y)` itself instead.

    Arguments:
        solver: A torchdyn solver name (``"dopri5"``, ``"tsit5"``,
            ``"midpoint"``, ``"euler"``, ...) or solver module. torchdyn 1.0.6's
            ``"rk4"`` evaluates its stages at t, t + h/2, t + h/2 (its tableau's
            nodes are shifted), so it is first order for a time-dependent
            field; use :func:`fixed_grid_solver` for classic RK4.
        atol: The absolute tolerance (adaptive solvers only).
        rtol: The relative tolerance (adaptive solvers only).
        sensitivity: ``"autograd"`` or ``"adjoint"``.
        solver_adjoint: The solver of the adjoint equation (default: ``solver``).
        atol_adjoint: The absolute tolerance of the adjoint solve.
        rtol_adjoint: The relative tolerance of the adjoint solve.
        nt: Equal steps per interval of the grid handed to torchdyn.

    Returns:
        A solver ``solver(func, y0, t, *, adjoint_params=None)``.

    Raises:
        ValueError: For an unknown ``sensitivity``.
        TypeError: For arguments of the wrong type.

    """
    if sensitivity == "interpolated_adjoint":
        raise ValueError(
            "sensitivity='interpolated_adjoint' is not supported: torchdyn then returns the states at its own steps "
            "rather than at the times of t, and needs a (batch, features) state. Use 'adjoint' or 'autograd'."
        )
    if sensitivity not in _SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {_SENSITIVITIES}, got {sensitivity!r}.")
    if not isinstance(solver, (str, nn.Module)):
        raise TypeError(f"solver must be a torchdyn solver name or module, got {type(solver).__name__}.")
    atol = _positive_float("atol", atol)
    rtol = _positive_float("rtol", rtol)
    atol_adjoint = _positive_float("atol_adjoint", atol_adjoint)
    rtol_adjoint = _positive_float("rtol_adjoint", rtol_adjoint)
    _positive_int("nt", nt)

    def solve(func: Field, y0: State, t: Tensor, *, adjoint_params: Iterable[Tensor] | None = None) -> State:
        _require("torchdyn", "torchdyn", "torchdyn_solver")
        from torchdyn.numerics import odeint
        from torchdyn.numerics.solvers.ode import str_to_solver

        is_tuple, parts, t = _check_call(func, y0, t)
        # torchdyn reverses time itself, but its adjoint then evaluates the field at the negated times: integrate
        # s = -t forwards with the field -F(-s, y) instead.
        flip = bool(t[-1] < t[0])
        field = _FlatField(func, is_tuple, parts, batched=False, flip=flip)
        flat = field.pack(parts)
        grid = t.detach().to(flat.dtype)
        if flip:
            grid = -grid
        if nt > 1:
            s = torch.arange(nt, dtype=grid.dtype, device=grid.device) / nt
            grid = torch.cat([(grid[:-1, None] + s * (grid[1:] - grid[:-1])[:, None]).reshape(-1), grid[-1:]])
        step = str_to_solver(solver, flat.dtype) if isinstance(solver, str) else solver
        # torchdyn warns when tolerances other than odeint's defaults are set for a fixed-step method.
        defaults = dict(zip(("atol", "rtol"), odeint.__defaults__[:2]))
        tols = dict(atol=atol, rtol=rtol) if step.stepping_class == "adaptive" else defaults
        if sensitivity == "autograd":
            _, sol = odeint(field, flat, grid, solver=step, **tols)
        else:
            from torchdyn.core import ODEProblem

            if not isinstance(func, nn.Module):
                raise ValueError(
                    f"func must be an nn.Module for sensitivity={sensitivity!r}: torchdyn's adjoint differentiates "
                    "only the parameters of the module it integrates (a closure's parameters would get no gradient)."
                )
            _own_params_only(adjoint_params, field, "torchdyn's adjoint")
            if not any(True for _ in field.parameters()):
                # torchdyn would print a notice and add its own; a zero gradient is right for a field without any.
                field.register_parameter("_no_params", nn.Parameter(flat.new_zeros(1)))
            back = step
            if solver_adjoint is not None:
                # ODEProblem would build a named solver in float32 (its tableau rounded): build it in the state's dtype.
                back = str_to_solver(solver_adjoint, flat.dtype) if isinstance(solver_adjoint, str) else solver_adjoint
            adj_tols = dict(atol_adjoint=atol_adjoint, rtol_adjoint=rtol_adjoint)
            if back.stepping_class != "adaptive":
                adj_tols = {k + "_adjoint": v for k, v in defaults.items()}
            problem = ODEProblem(field, step, sensitivity=sensitivity, **adj_tols, **tols)
            problem.solver_adjoint = back
            _, sol = problem.odeint(flat, grid)
        sol = sol[::nt]
        return field.unpack(sol)

    return solve
