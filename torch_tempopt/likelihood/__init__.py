r"""Log-likelihoods of a trained flow on a budget of rk4 steps, with the budget's error measured
against the adaptive reference on a few of the samples and reported with its uncertainty.

A continuous flow ``dx/dt = v(t, x)`` carries the data at ``t[0]`` to the noise at ``t[1]`` (a
flow-matching model: ``t = (1, 0)``; FFJORD's ODE: ``t = (0, T)``), and

.. math:: \log p(x) = \log p_0(z) + \int_{t_0}^{t_1} \nabla\cdot v \,dt .

:func:`log_likelihood` solves that on ``steps`` rk4 steps for every sample, with ``steps`` the
fewest for which the mean absolute error per sample, measured against the reference on ``check``
samples, is within ``tol`` bits per dimension with two standard errors to spare. Optional part:
import ``torch_tempopt.likelihood``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .._checks import real, stacklevel, whole
from ..budget import DEFAULT_REFERENCE, Budget
from ..horizon import LearnableHorizon
from ..nfe import NFECounter

__all__ = ["Likelihood", "log_likelihood"]

Velocity = Callable[[Tensor, Tensor], Tensor]


class Likelihood(NamedTuple):
    """What :func:`log_likelihood` measured.

    Attributes:
        log_p: ``log p(x)`` per sample, in nats (the budget's; the reference's where the budget
            could not meet ``tol``, ``steps`` then 0).
        steps: The rk4 steps of the budget (0: every sample was solved by the reference).
        error: The estimated mean of (reference - budget) log p per sample, in bits per dimension:
            the error of the mean bits/dim (positive: the budget's bits/dim are too high).
        abs_error: The estimated mean absolute error per sample, in bits per dimension.
        error_se: The standard error of ``error`` (from ``checked`` of the samples, with the
            finite-population correction): ``error +- 2 error_se`` covers the error of the mean
            over all samples about 95 % of the time.
        checked: How many samples were solved by the reference to measure the error.
        nfe: Evaluations of the field per sample, every solve included (the reference on the
            checked samples, the fit, the budget), each weighted by the samples it solved.
        reference_nfe: The reference's evaluations on the checked samples (per solve).

    """

    log_p: Tensor
    steps: int
    error: float
    abs_error: float
    error_se: float
    checked: int
    nfe: float
    reference_nfe: int


class _Divergence(nn.Module):
    """``(x, l[, e])`` -> ``(v, div v[, 0])``: the exact divergence, or Hutchinson's estimate with
    the probes ``e`` carried in the state (fixed per sample, the same in every solve).
    """

    def __init__(self, velocity: Velocity) -> None:
        super().__init__()
        self.velocity = velocity

    def forward(self, t: Tensor, state: Sequence[Tensor]) -> tuple[Tensor, ...]:
        need = torch.is_grad_enabled()  # a fit differentiates the solve in its steps' times
        with torch.enable_grad():
            x = state[0] if state[0].requires_grad else state[0].detach().requires_grad_(True)
            v = self.velocity(t, x)
            if len(state) == 3:
                e = state[2]
                (g,) = torch.autograd.grad(v, x, e, create_graph=need)
                div = (g * e).flatten(1).sum(1)
            else:
                flat, div = v.flatten(1), 0
                for i in range(flat.shape[1]):
                    (g,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=need,
                                               retain_graph=True)  # fmt: skip
                    div = div + g.flatten(1)[:, i]
        parts = (v, div) if len(state) == 2 else (v, div, torch.zeros_like(state[2]))
        return parts if need else tuple(q.detach() for q in parts)


def log_likelihood(
    velocity: Velocity,
    x: Tensor,
    log_p0: Callable[[Tensor], Tensor],
    *,
    t: Sequence[float] = (1.0, 0.0),
    tol: float = 0.01,
    check: int = 50,
    fit: Tensor | None = None,
    hutchinson: bool = False,
    reference: dict[str, Any] | None = None,
    max_steps: int = 64,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Likelihood:
    r"""``log p(x)`` per sample on the fewest rk4 steps within ``tol`` of the reference.

    ``check`` samples of ``x`` (chosen by ``generator``) are solved by the reference once; a
    budget of rk4 steps (2 at first, then as many as the error at hand predicts for rk4's fourth
    order) is solved on them until its mean absolute error per sample, plus two standard errors,
    is within ``tol``; then every other sample is solved on that budget. With ``fit`` (other
    samples, e.g. training data), each budget's step placement is first fitted to the reference on
    them (:meth:`~torch_tempopt.Budget.fit`); without, the steps are uniform. If no budget up to
    ``max_steps`` is within ``tol``, every sample is solved by the reference, with a warning.

    Arguments:
        velocity: The flow's field ``v(t, x)``, batched over the first dimension of ``x``.
        x: The samples, one per row (any trailing shape).
        log_p0: The log-density of the noise at ``t[1]``, per sample: ``log_p0(z) -> (N,)``.
        t: The times of the data and of the noise.
        tol: The error allowed per sample, in bits per dimension.
        check: How many samples the reference solves to measure the error.
        fit: Samples to fit the placement of the steps on (``None``: uniform steps).
        hutchinson: Estimate the divergence with one Rademacher probe per sample (one
            vector-Jacobian product per evaluation) instead of exactly (one per dimension).
        reference: The adaptive odeint settings of the reference (default: dopri5 at
            ``rtol = atol = 1e-5``).
        max_steps: The most rk4 steps to try.
        batch_size: Samples per solve (default: all at once).
        generator: Chooses the checked samples and draws the probes.

    Example:
        >>> import math, torch
        >>> from torch_tempopt.likelihood import log_likelihood
        >>> x = torch.randn(200, 2, dtype=torch.float64)
        >>> shrink = lambda t, x: -0.5 * x  # carries N(0, 1/e) at t = 1 to N(0, 1) at t = 0
        >>> log_p0 = lambda z: -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi)
        >>> out = log_likelihood(shrink, x, log_p0)
        >>> exact = -0.5 * math.e * x.pow(2).sum(1) - math.log(2 * math.pi) + 1
        >>> out.steps, bool((out.log_p - exact).abs().max() < 1e-3)
        (2, True)

    """
    n, tol_, t_ = _checked(x, t, tol)
    most, m = whole("max_steps", max_steps), min(whole("check", check, 2), n)
    size = n if batch_size is None else whole("batch_size", batch_size)
    solve = _Solver(velocity, x, log_p0, t_, reference, most, size, hutchinson, generator)
    order = torch.randperm(n, generator=generator).to(x.device)
    checked, rest = order[:m], order[m:]
    truth = solve(checked, False)
    reference_nfe, scale = int(round(solve.cost / m)), x[0].numel() * math.log(2)
    spare = math.sqrt(max(1 - m / n, 0.0) / m)  # the standard error's factor, finite population
    log_p = x.new_empty(n)
    steps = 2
    while steps <= most:
        solve.budget.steps = steps
        if fit is not None:
            solve.fit(fit)
        d = (truth - solve(checked, True)) / scale
        bound = float(d.abs().mean() + 2 * d.abs().std() * spare)
        if bound <= tol_:
            log_p[checked] = truth - d * scale
            log_p[rest] = solve(rest, True)
            se, mean, absolute = float(d.std()) * spare, float(d.mean()), float(d.abs().mean())
            return Likelihood(log_p, steps, mean, absolute, se, m, solve.cost / n, reference_nfe)
        predicted = math.ceil(steps * (bound / (0.5 * tol_)) ** 0.25)  # rk4: error ~ steps^-4
        steps = most + 1 if steps == most else min(max(steps + 1, predicted), most)
    warnings.warn(
        f"log_likelihood: no budget of up to {most} rk4 steps was within tol={tol_} bits/dim "
        "of the reference; every sample was solved by the reference.",
        stacklevel=stacklevel(),
    )
    log_p[checked], log_p[rest] = truth, solve(rest, False)
    return Likelihood(log_p, 0, 0.0, 0.0, 0.0, m, solve.cost / n, reference_nfe)


def _checked(x: Any, t: Sequence[float], tol: float) -> tuple[int, float, list[float]]:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(
            f"x must be a tensor of at least 2 samples, one per row, got {_shape(x)}."
        )
    t_ = [real("t", v) for v in t]
    if len(t_) != 2 or t_[0] == t_[1]:
        raise ValueError(f"t must hold the data's and the noise's times, which differ, got {t_}.")
    tol_ = real("tol", tol)
    if tol_ <= 0:
        raise ValueError(f"tol must be positive (bits per dimension), got {tol_}.")
    return x.shape[0], tol_, t_


class _Solver:
    """Solves samples of ``x`` (by index) on the budget or by the reference, in batches, and adds
    up the evaluations per sample solved (:attr:`cost`).
    """

    def __init__(
        self,
        velocity: Velocity,
        x: Tensor,
        log_p0: Callable[[Tensor], Tensor],
        t: list[float],
        reference: dict[str, Any] | None,
        most: int,
        size: int,
        hutchinson: bool,
        generator: torch.Generator | None,
    ) -> None:
        self.field, self.x, self.log_p0, self.t, self.size = (
            NFECounter(_Divergence(velocity)),
            x,
            log_p0,
            t,
            size,
        )
        self.hutchinson, self.generator = hutchinson, generator
        self.probes = _probes(x, generator) if hutchinson else None
        self.budget = Budget(2, reference=reference or DEFAULT_REFERENCE, max_steps=most)
        span = abs(t[0] - t[1])
        self.horizon = LearnableHorizon(T0=max(t), t0=min(t), eps=span / 2, budget=self.budget)
        self.horizon.to(x.dtype).eval()
        self.cost = 0.0

    def __call__(self, idx: Tensor, budgeted: bool) -> Tensor:
        out = [self.x.new_empty(0)]
        for part in idx.split(self.size) if idx.numel() else ():
            y0 = [self.x[part], self.x.new_zeros(part.numel())]
            y0 += [] if self.probes is None else [self.probes[part]]
            self.field.reset()
            with torch.no_grad(), self.horizon.budgeted(budgeted):
                solved = self.horizon(self.field, tuple(y0), reverse=self.t[0] > self.t[1])
            self.cost += self.field.nfe * part.numel()
            out.append(self.log_p0(solved[0][-1]) + solved[1][-1])
        return torch.cat(out)

    def fit(self, data: Tensor) -> None:
        """Fits the budget's placement to the reference on ``data``, its evaluations counted."""
        y0 = [data, data.new_zeros(data.shape[0])]
        y0 += [_probes(data, self.generator)] if self.hutchinson else []
        self.field.reset()
        pick = lambda y: (self.log_p0(y[0]) + y[1],)  # noqa: E731
        self.budget.fit(self.field, tuple(y0), torch.tensor(self.t), select=pick)
        self.cost += float(self.field.nfe * data.shape[0])


def _probes(x: Tensor, generator: torch.Generator | None) -> Tensor:
    signs = torch.randint(0, 2, x.shape, generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(x)


def _shape(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else repr(type(x))
