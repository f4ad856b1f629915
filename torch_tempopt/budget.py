r"""A budget of fixed steps for the training solve, with the adaptive reference it is checked
against.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torchdiffeq
from torch import Tensor, nn

from ._checks import keep_float32, real, stacklevel, whole
from ._solve import Call, Ends, Parts, State, adaptive, on_grid
from .nfe import NFECounter

__all__ = ["DEFAULT_REFERENCE", "FIXED_GRID_METHODS", "GRADIENTS", "Budget"]

Select = Callable[[State], Sequence[Tensor]]

#: torchdiffeq's fixed-grid methods a budget can use, with their order of accuracy.
FIXED_GRID_METHODS = dict(
    euler=1, midpoint=2, heun2=2, heun3=3, rk4=4, explicit_adams=4, implicit_adams=4, fixed_adams=4
)

#: The reference when a call names no adaptive solve of its own (a fixed-step call).
DEFAULT_REFERENCE = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}

#: How a budgeted solve is differentiated (:class:`Budget`'s ``gradient``).
GRADIENTS = ("backprop", "checkpoint", "adjoint")

# The keyword arguments of odeint that choose a solve.
_NO_PARAMS: dict[str, Any] = {"adjoint_params": ()}
SOLVE_KEYS = ("method", "rtol", "atol", "options")
_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")


def sample_and_log_density(y: State) -> tuple[Tensor, ...]:
    """The parts that a budget's error compares by default: a tuple's first two, or the tensor."""
    return tuple(y[:2]) if isinstance(y, (tuple, list)) else (y,)


def _per_dimension(out: Sequence[Tensor], ref: Sequence[Tensor]) -> Tensor:
    """Mean absolute differences per item and per dimension of the first part (the sample)."""
    first = out[0]
    items = first.shape[0] if first.dim() > 1 else 1
    scale = items * max(first.numel() // max(items, 1), 1)
    return torch.stack([(a - b).abs().sum() / scale for a, b in zip(out, ref)])


class Check(NamedTuple):
    """What :meth:`Budget.fit` measured: its errors before and after fitting, the spread (nats) of
    the log-density's error over the batch before fitting (``nan`` without a second part), and the
    evaluations of the reference solve and of one budgeted step.
    """

    before: Tensor
    after: Tensor
    spread: float
    reference_nfe: int
    step_nfe: float


def _spread(out: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """The standard deviation over items of the second part's error (a log-density's, in nats)."""
    if len(out) < 2 or out[1].dim() == 0 or out[1].shape[0] < 2:
        return math.nan
    d = (out[1] - ref[1]).detach().reshape(out[1].shape[0], -1).sum(1)
    return float(d.std())


class Batch(NamedTuple):
    """A budgeted training call, as :meth:`Budget.fit` takes it:
    ``fit(func, y0, t, **settings)``.
    """

    func: Callable[..., Any]
    y0: State
    t: Tensor
    settings: dict[str, Any]


class Budget(nn.Module):
    r"""A budget of fixed steps for a :class:`~torch_tempopt.LearnableHorizon`'s training solves.

    In ``train()`` a horizon with a budget solves on exactly ``steps`` steps of ``method`` (rk4: 4
    evaluations a step), placed by :attr:`placement` (uniform at first), and differentiates them as
    ``gradient`` says:

    * ``"backprop"`` (default): backpropagates through the steps, the exact gradient of the loss
      that was computed (discretize-then-optimize); activations of every step are kept.
    * ``"checkpoint"``: the same gradient, each step recomputed in the backward pass: the memory of
      one step and the states between steps, for one more forward pass of the field.
    * ``"adjoint"``: torchdiffeq's ``odeint_adjoint`` on the same steps (the call's ``adjoint_*``
      settings apply): the least memory, and an approximate gradient on a coarse grid.

    Whatever the call's ``solver``, a training solve on a budget is one of these three. Every
    other solve, in ``eval()`` and in the checks of :class:`~torch_tempopt.BudgetGuard`, is the
    reference: ``reference`` if given, else the call's own adaptive settings (``method``,
    ``rtol``, ``atol``, ``options``, as they stand in the call: a call that names none is solved
    as ``odeint`` solves it, dopri5 at rtol 1e-7, atol 1e-9), else, for a call on a fixed grid,
    :data:`DEFAULT_REFERENCE`. So adopting a budget changes the training solves only.

    Arguments:
        steps: The number of steps of a training solve.
        method: A fixed-grid torchdiffeq method (:data:`FIXED_GRID_METHODS`).
        reference: The adaptive odeint settings to score and check against; default: the call's.
        gradient: ``"backprop"``, ``"checkpoint"`` or ``"adjoint"``.
        max_steps: The most steps the budget may grow to (the capacity of :attr:`placement`).

    Attributes:
        placement: ``max_steps`` logits of the step lengths, the first :attr:`steps` in use (a
            buffer: uniform at 0).
        retired: Whether training solves as the call asks, the budget's ceiling reached (a buffer,
            set by :class:`~torch_tempopt.BudgetGuard` when the budget would cost as much as the
            reference solve): then training on this horizon is training without it.
        last_input: The last training call with gradients, ``Batch(func, y0, t, settings)``
            (``y0`` detached), which :class:`~torch_tempopt.BudgetGuard` checks; ``None`` before.
        warn_unguarded: Whether training on this budget warns once that no guard checks it;
            cleared by a :class:`~torch_tempopt.BudgetGuard` over it, or by
            ``CoordinateDescentStepper(..., guard=False)``.

    Example:
        >>> import torch
        >>> from torch_tempopt import Budget
        >>> budget = Budget(2)
        >>> err = budget.error(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), rtol=1e-9)
        >>> bool(err < 1e-3)  # two rk4 steps of exp(-t): 3e-4 from exp(-1)
        True

    """

    placement: Tensor
    n_steps: Tensor
    retired: Tensor

    def __init__(
        self,
        steps: int,
        *,
        method: str = "rk4",
        reference: dict[str, Any] | None = None,
        gradient: str = "backprop",
        max_steps: int = 64,
    ) -> None:
        super().__init__()
        n, capacity = whole("steps", steps), whole("max_steps", max_steps)
        if n > capacity:
            raise ValueError(f"steps must be at most max_steps={capacity}, got {n}.")
        if method not in FIXED_GRID_METHODS:
            raise ValueError(
                f"method must be one of {sorted(FIXED_GRID_METHODS)}, got {method!r}."
            )
        self.register_buffer("placement", torch.zeros(capacity))
        self.register_buffer("n_steps", torch.tensor(n))
        self.register_buffer("retired", torch.tensor(False))
        self.method, self.gradient, self.reference = method, gradient, reference
        self.last_input: Batch | None = None
        self.warn_unguarded, self._warned = True, False

    @property
    def gradient(self) -> str:
        """How a training solve is differentiated: ``"backprop"``, ``"checkpoint"`` or
        ``"adjoint"``.
        """
        return self._gradient

    @gradient.setter
    def gradient(self, value: str) -> None:
        if value not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {value!r}.")
        self._gradient = value

    @property
    def reference(self) -> dict[str, Any] | None:
        """The adaptive odeint settings of every solve but training's; ``None``: the call's."""
        return None if self._reference is None else dict(self._reference)  # writes are checked

    @reference.setter
    def reference(self, value: dict[str, Any] | None) -> None:
        if value is not None and (
            not isinstance(value, dict) or not set(value) <= set(SOLVE_KEYS)
        ):
            raise TypeError(
                f"reference must be None or a dict of {SOLVE_KEYS}, e.g. dict(method='dopri8'), "
                f"got {value!r}."
            )
        if value is not None and value.get("method", "dopri5") not in _ADAPTIVE:
            raise ValueError(
                f"reference's method must be one of torchdiffeq's adaptive {_ADAPTIVE} (it scores "
                f"the model and guards the budget), got {value['method']!r}."
            )
        self._reference = None if value is None else dict(value)

    @property
    def steps(self) -> int:
        """The number of steps of a training solve; setting it keeps the placement's density."""
        return int(self.n_steps)

    @steps.setter
    def steps(self, value: int) -> None:
        n, m = whole("steps", value), self.steps
        if n > self.max_steps:
            raise ValueError(f"steps must be at most max_steps={self.max_steps}, got {n}.")
        with torch.no_grad():
            old = self.fractions().to(torch.float64)
            pos = torch.linspace(0, m, n + 1, dtype=old.dtype, device=old.device)
            i = pos.floor().clamp(max=m - 1).long()
            logits = (old[i] + (pos - i) * (old[i + 1] - old[i])).diff().clamp_min(1e-6).log()
            self.placement.zero_()[:n] = logits - logits.mean()
            self.n_steps.fill_(n)

    @property
    def max_steps(self) -> int:
        """The capacity of :attr:`placement`: the most :attr:`steps` can grow to."""
        return self.placement.shape[0]

    def fractions(self, logits: Tensor | None = None) -> Tensor:
        """The N + 1 step boundaries as fractions of the interval, from 0 to 1 (increasing)."""
        logits = self.placement[: self.steps] if logits is None else logits
        c = torch.cumsum(torch.softmax(logits, 0), 0)
        return torch.cat([c.new_zeros(1), c[:-1], c.new_ones(1)])

    def reference_for(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The reference's odeint settings for a call with these keyword arguments."""
        if self.reference is not None:
            return dict(self.reference)
        given = {k: settings[k] for k in SOLVE_KEYS if k in settings}
        return given if given.get("method", "dopri5") in _ADAPTIVE else dict(DEFAULT_REFERENCE)

    # ------------------------------------------------------------------ solving
    def solve(self, c: Call, s: Tensor, ends: Ends, settings: dict[str, Any]) -> Parts:
        """A training solve (the horizon's): at fractions ``s`` of ``ends``, recorded for the
        guard.
        """
        if torch.is_grad_enabled():
            t = torch.stack(ends[::-1] if c.reverse else ends).detach()
            self.last_input = Batch(c.func, c.pack([p.detach() for p in c.parts]), t, settings)
            if self.warn_unguarded and not self._warned:
                self._warned = True
                warnings.warn(
                    "a horizon trains on a budget without a guard, so its steps are never checked against the "  # noqa: E501 (one message, one line)
                    "reference: wrap the optimizer in CoordinateDescentStepper, or call "
                    "BudgetGuard(model).step() after each optimizer step (or pass guard=False).",
                    RuntimeWarning,
                    stacklevel=stacklevel(),
                )
        u = self.fractions().detach().to(s)
        return on_grid(c, s, ends, u, self.method, self.gradient, settings)

    def error(
        self, func: Any, y0: State, t: Tensor, *, select: Select | None = None, **settings: Any
    ) -> Tensor:
        r"""The difference at ``t[-1]`` between this budget's solve and the reference's.

        Both solves run without gradients from ``y0`` over ``t = [start, end]`` (decreasing to
        integrate backward), the reference with :meth:`reference_for` ``(settings)``.
        ``select(state)`` picks the parts to compare (default: a tuple's first two, a CNF's sample
        and log-density; the whole of a tensor). Each part's error is its mean absolute
        difference per item, divided by the number of dimensions of the first part (the sample),
        so a log-density's error is in nats per dimension and a tolerance means the same in 2-D
        and in 784-D.

        Returns:
            One value per selected part.

        """
        return self.fit(func, y0, t, steps=0, select=select, **settings)[0]

    def fit(
        self,
        func: Callable[..., Any],
        y0: State,
        t: Tensor,
        *,
        steps: int = 100,
        lr: float = 0.05,
        select: Select | None = None,
        **settings: Any,
    ) -> tuple[Tensor, Tensor]:
        r"""Fits :attr:`placement` to the reference on ``y0`` (e.g. a trained model's batch).

        Minimises the sum of :meth:`error` with Adam for ``steps`` steps; the reference is solved
        once. One step has no placement to fit (its only fraction is 1).

        Returns:
            :meth:`error` before and after, detached.

        """
        check = self.check(func, y0, t, steps=steps, lr=lr, select=select, **settings)
        return check.before, check.after

    def check(
        self,
        func: Callable[..., Any],
        y0: State,
        t: Tensor,
        *,
        steps: int = 1,
        lr: float = 0.05,
        select: Select | None = None,
        **settings: Any,
    ) -> Check:
        """:meth:`fit`, with the spread of the log-density's error and what each solve costs."""
        counter = NFECounter(func)
        c, ends = self._call(counter, y0, t)
        steps, lr, pick, n = whole("steps", steps, 0), real("lr", lr), select, self.steps
        pick = pick or sample_and_log_density
        with torch.no_grad():
            s = ends[0].new_tensor([0.0, 1.0])
            ref = adaptive(c, s, ends, torchdiffeq.odeint, self.reference_for(settings))
            ref = pick(c.pack([q[-1] for q in ref]))
        reference_nfe = counter.nfe
        if not isinstance(ref, (tuple, list)):
            raise TypeError(f"select must return a tuple of tensors, e.g. (z,), got {type(ref)}.")
        logits = self.placement[:n].detach().clone().requires_grad_(True)
        opt, before, spread = torch.optim.Adam([logits], lr=lr), None, math.nan
        for _ in range(steps if n > 1 else 0):
            with torch.enable_grad():
                err, spread = self._error(c, ends, pick, ref, logits)
                (logits.grad,) = torch.autograd.grad(err.sum(), logits)
            before = err.detach() if before is None else before
            opt.step()
        with torch.no_grad():
            self.placement[:n] = logits - logits.mean()
            counter.reset()
            after, last = self._error(c, ends, pick, ref, logits)
        spread = last if before is None else spread
        before = after if before is None else before
        return Check(before, after, spread, reference_nfe, counter.nfe / n)

    def _call(self, func: Any, y0: Any, t: Any) -> tuple[Call, Ends]:
        t = torch.as_tensor(t).detach()
        if t.shape != (2,) or t[0] == t[1]:
            raise ValueError(f"t must hold a start and an end that differ, got {t.tolist()}.")
        c = Call.of(func, y0, bool(t[0] > t[1]))
        t = t.to(dtype=c.time_dtype(), device=c.parts[0].device)
        return c, (t.min(), t.max())

    def _error(
        self, c: Call, ends: Ends, pick: Select, ref: Sequence[Tensor], logits: Tensor
    ) -> tuple[Tensor, float]:
        u, s = self.fractions(logits).to(ends[0]), ends[0].new_tensor([0.0, 1.0])
        # differentiated in the steps' times only; a budget that bounds memory bounds its fit's too
        bound = "backprop" if self.gradient == "backprop" else "checkpoint"
        out = on_grid(c, s, ends, u, self.method, bound, _NO_PARAMS)
        out = pick(c.pack([q[-1] for q in out]))
        return _per_dimension(out, ref).to(ends[0].dtype), _spread(out, ref)

    # ------------------------------------------------------------------ module plumbing
    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        state_dict.setdefault(prefix + "retired", torch.tensor(False))  # 0.3 and 0.4 had none
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Budget:
        return keep_float32(self, ("placement",), lambda: super(Budget, self)._apply(fn, recurse))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "last_input": None}

    def extra_repr(self) -> str:
        text = f"steps={self.steps}, method={self.method!r}, gradient={self.gradient!r}"
        text += ", retired=True" if self.retired else ""
        return text + ("" if self.reference is None else f", reference={self.reference}")
