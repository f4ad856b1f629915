"""A guard for step budgets: checks each budgeted solve against its adaptive reference, grows or
raises.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any, Iterable, Mapping, Union

import torch
from torch import Tensor, nn

from ._checks import real, stacklevel, whole
from .budget import FIXED_GRID_METHODS, Budget, Select
from .horizon import LearnableHorizon
from .nfe import NFECounter

__all__ = ["BudgetGuard", "find_horizons"]

Horizons = Union[nn.Module, Iterable[LearnableHorizon]]


def find_horizons(horizons: Any) -> list[tuple[str, LearnableHorizon]]:
    """The named :class:`LearnableHorizon` submodules of a module, or a list of horizons, each
    once.
    """
    if isinstance(horizons, nn.Module):
        found = [(n, m) for n, m in horizons.named_modules() if isinstance(m, LearnableHorizon)]
    elif isinstance(horizons, Iterable) and not isinstance(horizons, (str, bytes, Tensor)):
        found = []
        named = horizons.items() if isinstance(horizons, Mapping) else enumerate(horizons)
        for i, h in named:
            if not isinstance(h, LearnableHorizon):
                raise TypeError(
                    f"horizons[{i!r}] must be a LearnableHorizon, got {type(h).__name__}."
                )
            found.append((str(i), h))
    else:
        raise TypeError(
            f"horizons must be a module holding LearnableHorizon submodules or a list of them, "
            f"got {type(horizons).__name__}."
        )
    unique = list({id(h): (n, h) for n, h in reversed(found)}.values())[::-1]
    if not unique:
        raise ValueError(
            "horizons holds no LearnableHorizon; replace the model's odeint call with one."
        )
    return unique


class BudgetGuard:
    r"""Checks budgeted horizons against their adaptive reference; grows a budget that is too
    coarse, and retires one that would cost as much as the reference.

    Each check solves a budget's last training batch (:attr:`Budget.last_input`) with the
    reference once (:meth:`Budget.check`), measures two errors and fits the placement
    ``fit_steps`` Adam steps:

    * the mean absolute error per dimension of the sample and of the log-density (nats per
      dimension: the units of a likelihood in bits/dim), against ``tol``;
    * the spread of the log-density's error over the batch, its standard deviation in nats, against
      ``spread``: the units of importance weights, which an error that differs by ``s`` nats
      between samples changes by a factor ``exp(s)`` (an effective sample size by about
      ``exp(-s**2)``).

    Above either, the budget grows to the number of steps the method's order says brings the
    error under it (``action="grow"``) or :meth:`step` raises (``"raise"``). Growth has a ceiling:
    a budget whose steps would cost as many evaluations as the reference solve (or more than its
    ``max_steps``) is retired (:attr:`Budget.retired`), with one warning: from then on it trains
    as the call asks, so adopting a budget never costs more than not adopting it, and a run is
    never ended by the guard.

    Checks come at the first step, then at steps 1, 3, 7, ...: each wait at most twice the last,
    up to ``every``; sooner when the errors grow (half-way to where their trend since the last
    check meets the tolerance), and one step after a growth, to check the grown budget. Its work is
    in :attr:`stats`: checks, evaluations of the field, seconds, the last errors and spreads, and
    every event (growth, retirement). A field that counts its own evaluations counts the guard's
    too.

    Under ``torch.distributed`` the worst error is taken over the ranks and rank 0's placement is
    broadcast, so every rank keeps the same budget and steps.

    Arguments:
        horizons: A module (its :class:`LearnableHorizon` submodules with a budget) or a list.
        every: The most steps between two checks (0: never check).
        tol: The largest mean error per dimension of the sample and of the log-density.
        spread: The largest standard deviation over the batch of the log-density's error, in
            nats (``None``: not checked, for a loss that takes no importance weights and reads
            log-densities only on average, such as maximum likelihood).
        action: ``"grow"`` or ``"raise"``.
        select: The parts of the state to compare, ``select(state) -> tuple of tensors``; default
            a tuple's first two (a CNF's sample and log-density; the second part is the one whose
            spread is checked). For a state in one tensor, e.g. OT-Flow's ``[x, l, v, r]``:
            ``lambda z: (z[..., :-3], z[..., -3:-2])``.
        fit_steps: Adam steps on the placement per check (0: the steps stay where they are).
        fit_lr: Their learning rate.

    Example:
        >>> import torch
        >>> horizon = LearnableHorizon(T0=1.0, budget=4)
        >>> guard = BudgetGuard([horizon], every=1)
        >>> _ = horizon(lambda t, y: -y, torch.ones(8, 2))  # a training call: the guard's batch
        >>> guard.step()  # four rk4 steps of exp(-t) are well within tol: no growth
        >>> guard.stats["checks"], horizon.budget.steps, guard.stats["nfe"] > 0
        (1, 4, True)

    """

    def __init__(
        self,
        horizons: Horizons,
        *,
        every: int = 100,
        tol: float = 0.025,
        spread: float | None = 0.2,
        action: str = "grow",
        select: Select | None = None,
        fit_steps: int = 1,
        fit_lr: float = 0.05,
    ) -> None:
        found = [(n, h.budget) for n, h in find_horizons(horizons) if h.budget is not None]
        if not found:
            raise ValueError(
                "horizons holds no horizon with a budget; construct one with budget=N."
            )
        if action not in ("grow", "raise"):
            raise ValueError(f"action must be 'grow' or 'raise', got {action!r}.")
        self.every, self.fit_steps = whole("every", every, 0), whole("fit_steps", fit_steps, 0)
        self.tol, self.fit_lr = real("tol", tol), real("fit_lr", fit_lr)
        self.spread = None if spread is None else real("spread", spread)
        for name, value in (("tol", self.tol), ("spread", self.spread)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}.")
        if select is not None and not callable(select):
            raise TypeError(
                f"select must be callable as select(state), got {type(select).__name__}."
            )
        self.action, self.select, self._budgets = action, select, found
        for _, b in found:
            b.warn_unguarded = False
        self.stats: dict[str, Any] = self._fresh_stats()

    def _fresh_stats(self) -> dict[str, Any]:
        n = len(self._budgets)
        stats = dict(steps=0, checks=0, nfe=0, seconds=0.0, events=[], next_check=0)
        return stats | {k: [None] * n for k in ("errors", "spreads", "ratios", "trend")}

    @property
    def budgets(self) -> list[Budget]:
        """The guarded budgets, in the order of ``stats["errors"]``."""
        return [b for _, b in self._budgets]

    def step(self) -> None:
        """Counts a training step; on check steps checks every budget that trains on its steps."""
        step, due = (
            self.stats["steps"],
            self.every > 0 and self.stats["steps"] >= self.stats["next_check"],
        )
        self.stats["steps"] += 1
        if not due:
            return
        waits = [self.every]
        for k, (_, b) in enumerate(self._budgets):
            if b.last_input is not None and not b.retired:
                events = len(self.stats["events"])
                self.check(k)
                waits.append(self._wait(k, step, grown=len(self.stats["events"]) > events))
        self.stats["next_check"] = step + max(1, min(waits))

    def check(self, k: int) -> Tensor:
        """Checks budget ``k`` on its last training batch now; grows it, retires it or raises.

        Returns:
            The errors before this check's fitting, one per selected part.

        """
        name, b = self._budgets[k]
        func, y0, t, settings = b.last_input  # type: ignore[misc]
        counter, start = NFECounter(func), time.perf_counter()
        fit = dict(steps=self.fit_steps, lr=self.fit_lr, select=self.select)
        check = b.check(counter, y0, t, **fit, **settings)
        worst = torch.stack([check.before.max() / self.tol, self._spread_ratio(check.spread)])
        worst = worst.max().to(torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.broadcast(b.placement, 0)
        self.stats["checks"] += 1
        self.stats["errors"][k], self.stats["spreads"][k] = check.before.tolist(), check.spread
        self.stats["ratios"][k] = worst.item()  # over the ranks: every rank keeps one schedule
        self.stats["nfe"] += counter.nfe
        self.stats["seconds"] += time.perf_counter() - start
        if not (math.isfinite(worst.item()) and worst.item() <= 1):
            self._grow(k, worst.item(), check)
        return check.before

    def _spread_ratio(self, spread: float) -> Tensor:
        ok = self.spread is None or math.isnan(spread)  # nan: no log-density, or a batch of one
        return torch.tensor(0.0 if ok else spread / self.spread, dtype=torch.float64)  # type: ignore[operator]

    def _wait(self, k: int, step: int, grown: bool) -> int:
        """Steps to the next check of budget ``k``: at most twice the last wait (one step after a
        growth), at most ``every``, and half-way to where the error's trend meets its tolerance.
        """
        ratio = self.stats["ratios"][k]  # the worst error over its tolerance, at this check
        last, self.stats["trend"][k] = self.stats["trend"][k], (step, ratio)
        if grown:  # the grown budget is checked at the next step
            self.stats["trend"][k] = None
            return 1
        wait = 1 if last is None else 2 * (step - last[0])
        if last is not None and math.isfinite(ratio) and ratio > last[1]:
            wait = min(wait, int((1 - ratio) * (step - last[0]) / (ratio - last[1]) / 2))
        return min(self.every, max(1, wait))

    def _grow(self, k: int, ratio: float, check: Any) -> None:
        name, b = self._budgets[k]
        n, order, step = b.steps, FIXED_GRID_METHODS[b.method], self.stats["steps"] - 1
        new = max(n + 1, math.ceil(n * ratio ** (1 / order))) if math.isfinite(ratio) else math.inf
        message = (
            f"horizon {name!r}: the {n}-step {b.method} solve is {check.before.max().item():.3g} "
            f"per dimension (tol={self.tol}) and spreads {check.spread:.3g} nats "
            f"(spread={self.spread}) from its reference at step {step}"
        )
        if self.action == "raise":
            raise RuntimeError(
                f"{message}; raise the budget or tol, or pass action='grow' to grow it."
            )
        event = dict(step=step, horizon=name, error=check.before.tolist(), spread=check.spread)
        if new > b.max_steps or new * check.step_nfe >= check.reference_nfe:
            b.retired.fill_(True)
            self.stats["events"].append({**event, "budget": [n, "retired"]})
            warnings.warn(
                f"{message}: {new} steps would cost {new * check.step_nfe:.0f} evaluations "
                f"against the reference's {check.reference_nfe}, so the budget is retired and "
                "this horizon trains as its call asks from now on.",
                RuntimeWarning,
                stacklevel=stacklevel(),
            )
            return
        b.steps = int(new)
        self.stats["events"].append({**event, "budget": [n, b.steps]})
        warnings.warn(
            f"{message}: budget grown to {b.steps} steps.",
            RuntimeWarning,
            stacklevel=stacklevel(),
        )

    def state_dict(self) -> dict[str, Any]:
        """The guard's :attr:`stats` (the budgets and placements are in the model's state dict)."""
        return {"stats": copy.deepcopy(self.stats)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what :meth:`state_dict` returned."""
        if not isinstance(state_dict, dict) or "stats" not in state_dict:
            raise ValueError("state_dict must come from BudgetGuard.state_dict().")
        self.stats = self._fresh_stats() | copy.deepcopy(state_dict["stats"])  # 0.4's had fewer

    def __repr__(self) -> str:
        return (
            f"BudgetGuard(every={self.every}, tol={self.tol}, action={self.action!r}, "
            f"horizons={[n for n, _ in self._budgets]})"
        )
