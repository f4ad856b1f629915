r"""A learnable integration interval [t0, T] that replaces an ``odeint`` call, optionally on a
budget of steps.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
import torchdiffeq
from torch import Tensor, nn

from ._checks import flag, keep_float32, real, whole
from ._solve import Call, Ends, Parts, Solver, State, adaptive, add_note
from .budget import SOLVE_KEYS, Budget

__all__ = ["LearnableHorizon"]

# 0.3 kept the budget's buffers on the horizon; their keys in a 0.3 state dict, loaded into 0.4's
# Budget.
_V03_KEYS = ("placement", "n_steps")


class LearnableHorizon(nn.Module):
    r"""Integrates an ODE over [t0, T] with T (and optionally t0) learnable: a drop-in for
    ``odeint``.

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

    **On a budget** (``budget=N`` or a :class:`~torch_tempopt.Budget`) the module's mode decides
    the solve, as it does for dropout: in ``train()`` exactly N fixed steps, differentiated
    through the steps (the budget's ``gradient``), whatever ``solver`` the call names; in
    ``eval()`` the budget's reference, by default the call's own adaptive solve, so a model is
    scored as it would be without the budget (:meth:`budgeted` overrides the mode, e.g. to
    sample cheaply). The steps are placed by the budget's placement (uniform at first), which
    :class:`~torch_tempopt.BudgetGuard` fits to the reference, never to the loss. Through the
    steps dL/dT is the exact derivative of the discrete solution; with ``gradient="adjoint"``
    it is the continuous formula above.

    Arguments:
        T0: The initial end time, > ``t0``.
        t0: The initial start time.
        eps: The clip margin of eq. 17: :meth:`clip_` keeps T in
            ``[t0 + eps, 2 * T0 - t0 - eps]``.
        learn_T: Whether T is learned (``requires_grad``); default: without a budget only
            (on a budget T is nearly a gauge freedom and a learned T fights the steps).
        learn_t0: Whether ``t0`` is a parameter too.
        budget: Train on this many rk4 steps, or on a :class:`~torch_tempopt.Budget` (its method,
            reference, gradient and capacity); ``None``: the solver's own steps.

    Attributes:
        T: The end time, a 0-dim parameter.
        t0: The start time, a 0-dim buffer, or a parameter if ``learn_t0``.
        budget: The :class:`~torch_tempopt.Budget` (a submodule), or ``None``: whether a horizon
            has a budget is ``horizon.budget is not None``.
        T_init: The initial end time ``T0``.
        t0_init: The initial start time.

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
    budget: Budget | None

    def __init__(
        self,
        T0: float | Tensor = 1.0,
        t0: float | Tensor = 0.0,
        *,
        eps: float = 0.1,
        learn_T: bool | None = None,
        learn_t0: bool = False,
        budget: int | Budget | None = None,
    ) -> None:
        super().__init__()
        T0_, t0_, eps_ = real("T0", T0), real("t0", t0), real("eps", eps)
        if T0_ <= t0_:
            raise ValueError(
                f"T0 must be greater than t0, got T0={T0_} and t0={t0_}; use reverse=True."
            )
        if not 0 < eps_ < T0_ - t0_:
            raise ValueError(f"eps must lie in (0, T0 - t0) = (0, {T0_ - t0_}), got {eps_}.")
        if budget is not None and not isinstance(budget, Budget):
            budget = Budget(whole("budget", budget))
        learn_T = budget is None if learn_T is None else flag("learn_T", learn_T)
        self.T = nn.Parameter(torch.tensor(T0_), requires_grad=learn_T)
        if flag("learn_t0", learn_t0):
            self.t0 = nn.Parameter(torch.tensor(t0_))
        else:
            self.register_buffer("t0", torch.tensor(t0_))
        self.T_init, self.t0_init, self.eps, self.learn_t0 = T0_, t0_, eps_, bool(learn_t0)
        self.budget = budget
        self._use_budget: bool | None = None

    # ------------------------------------------------------------------ time parameters
    @property
    def bounds(self) -> tuple[float, float]:
        """The clip interval of T, ``(t0 + eps, 2 * T0 - t0 - eps)`` from the initial values."""
        return self.t0_init + self.eps, 2 * self.T_init - self.t0_init - self.eps

    @torch.no_grad()
    def clip_(self) -> bool:
        """Clips T into :attr:`bounds`, a learned t0 into ``[2 t0 - T0 + eps, min(T0, T) - eps]``.

        Returns:
            Whether T or t0 moved.

        """
        before = (self.T.item(), self.t0.item())
        self.T.clamp_(*self.bounds)
        if self.learn_t0:
            low = 2 * self.t0_init - self.T_init + self.eps
            self.t0.clamp_(low, min(self.T_init, self.T.item()) - self.eps)
        return before != (self.T.item(), self.t0.item())

    @contextlib.contextmanager
    def budgeted(self, enabled: bool = True) -> Iterator[None]:
        """Within the block, solves on the budget (``enabled``) or with the reference, whatever the
        mode.

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
                adapters); on a budget, torchdiffeq's two, which solve its reference.
            reverse: Integrate from T back to t0 (the sampling direction): ``[T, t0]``.
            times: Increasing fractions of the interval from the start of the integration,
                beginning with 0, to return the solution at (as odeint's ``t``); default
                ``[0, 1]``. On a budget, a point that is not on the grid adds a step.
            kwargs: Passed to ``solver`` (``method``, ``rtol``, ``atol``, ``options``,
                ``adjoint_params``, ...). On a budget, the first four are its reference's unless
                the budget names one, and a training solve takes only ``adjoint_*`` ones, with
                ``gradient="adjoint"``.

        Returns:
            The solution with the structure of ``y0``, each part with a leading dimension of
            ``len(times)`` (2 by default).

        Raises:
            TypeError: For a non-callable ``func``/``solver``, a non-floating ``y0``, a ``t``
                argument, or a budget with another solver than torchdiffeq's.
            ValueError: For an empty ``y0``, or ``times`` that are not increasing fractions in
                [0, 1] beginning with 0.

        A failing solve keeps its exception, with a note that names the likely cause: a
        non-finite or half-precision ``y0``, a field that fails or returns the wrong structure.

        """
        c = self._call(func, y0, reverse, solver, kwargs)
        s, ends = self._times(times, c), self._ends(c)
        try:
            return c.pack(self._solve(c, s, ends, solver, kwargs))
        except Exception as error:
            budget = "" if self.budget is None else f", budget={self.budget.steps}"
            name = f"{type(self).__name__}({self.extra_repr()}{budget})"
            add_note(error, f"{name}: the solve failed; {c.diagnose(ends[c.reverse])}")
            raise

    def _solve(self, c: Call, s: Tensor, ends: Ends, solver: Solver, kwargs: dict) -> Parts:
        training = self.training if self._use_budget is None else self._use_budget
        if self.budget is None or (training and self.budget.retired):  # as the call asks
            return adaptive(c, s, ends, solver, kwargs)
        if training:
            return self.budget.solve(c, s, ends, kwargs)
        odeint = solver is torchdiffeq.odeint  # which takes no adjoint_* settings
        other = {k: v for k, v in kwargs.items() if k not in SOLVE_KEYS}
        other = {k: v for k, v in other.items() if not (odeint and k.startswith("adjoint_"))}
        return adaptive(c, s, ends, solver, {**other, **self.budget.reference_for(kwargs)})

    def _call(self, func: Any, y0: Any, reverse: Any, solver: Any, kwargs: dict) -> Call:
        if not callable(solver):
            raise TypeError(f"solver must be callable like odeint, got {type(solver).__name__}.")
        if self.budget is not None and solver not in (
            torchdiffeq.odeint,
            torchdiffeq.odeint_adjoint,
        ):
            raise TypeError(
                "solver must be torchdiffeq's odeint or odeint_adjoint on a budget, "
                f"got {solver!r}."
            )
        if "t" in kwargs:
            raise TypeError(
                "t must not be passed: the horizon builds [t0, T]; use times= instead."
            )
        return Call.of(func, y0, reverse)

    def _times(self, times: Any, c: Call) -> Tensor:
        dtype, device = c.time_dtype(), c.parts[0].device
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

    def _ends(self, c: Call) -> Ends:
        """t0 and T in the state's time dtype and device."""
        dtype, device = c.time_dtype(), c.parts[0].device
        return self.t0.to(dtype=dtype, device=device), self.T.to(dtype=dtype, device=device)

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LearnableHorizon:
        apply = lambda: super(LearnableHorizon, self)._apply(fn, recurse)  # noqa: E731
        return keep_float32(self, ("T", "t0"), apply)  # .half() keeps time in float32

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for key in _V03_KEYS:
            if prefix + key in state_dict:
                state_dict[f"{prefix}budget.{key}"] = state_dict.pop(prefix + key)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (
            f"T={self.T.item():.4g}, t0={self.t0.item():.4g}, "
            f"bounds=({self.bounds[0]:.4g}, {self.bounds[1]:.4g})"
        )
