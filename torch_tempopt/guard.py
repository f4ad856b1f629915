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
    coarse.

    Every ``every`` calls of :meth:`step` (the first included), each horizon's
    :class:`~torch_tempopt.Budget` is checked on the batch of its last training call
    (:attr:`Budget.last_input`): :meth:`Budget.fit` solves the reference once, measures the error
    per dimension (:meth:`Budget.error`) and fits the placement ``fit_steps`` Adam steps. Above
    ``tol`` the budget grows to the number of steps the method's order says brings the error under
    it (``action="grow"``, at most its ``max_steps``), or :meth:`step` raises
    (``"raise"``). Its work is in :attr:`stats`: checks, evaluations of the field, seconds, the
    last errors and every growth. A field that counts its own evaluations counts the guard's too.

    Under ``torch.distributed`` the worst error is taken over the ranks and rank 0's placement is
    broadcast, so every rank keeps the same budget and steps.

    Arguments:
        horizons: A module (its :class:`LearnableHorizon` submodules with a budget) or a list.
        every: Check every this many steps (0: never).
        tol: The largest error allowed, per dimension of the sample (nats per dimension for a
            log-density).
        action: ``"grow"`` or ``"raise"``.
        select: The parts of the state to compare, ``select(state) -> tuple of tensors``; default
            a tuple's first two (a CNF's sample and log-density). For a state in one tensor, e.g.
            OT-Flow's ``[x, l, v, r]``: ``lambda z: (z[..., :-3], z[..., -3:-2])``.
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
        if self.tol <= 0:
            raise ValueError(f"tol must be > 0, got {self.tol}.")
        if select is not None and not callable(select):
            raise TypeError(
                f"select must be callable as select(state), got {type(select).__name__}."
            )
        self.action, self.select, self._budgets = action, select, found
        for _, b in found:
            b.warn_unguarded = False
        self.stats: dict[str, Any] = dict(steps=0, checks=0, nfe=0, seconds=0.0, events=[])
        self.stats["errors"] = [None] * len(found)

    @property
    def budgets(self) -> list[Budget]:
        """The guarded budgets, in the order of ``stats["errors"]``."""
        return [b for _, b in self._budgets]

    def step(self) -> None:
        """Counts a training step; on check steps checks every budget that has been trained."""
        due = self.every > 0 and self.stats["steps"] % self.every == 0
        self.stats["steps"] += 1
        for k, (_, b) in enumerate(self._budgets):
            if due and b.last_input is not None:
                self.check(k)

    def check(self, k: int) -> Tensor:
        """Checks budget ``k`` on its last training batch now; grows it or raises.

        Returns:
            The errors before this check's fitting, one per selected part.

        """
        name, b = self._budgets[k]
        func, y0, t, settings = b.last_input  # type: ignore[misc]
        counter, start = NFECounter(func), time.perf_counter()
        fit = dict(steps=self.fit_steps, lr=self.fit_lr, select=self.select)
        err, _ = b.fit(counter, y0, t, **fit, **settings)
        worst = err.max().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.broadcast(b.placement, 0)
        self.stats["checks"] += 1
        self.stats["errors"][k] = err.tolist()
        self.stats["nfe"] += counter.nfe
        self.stats["seconds"] += time.perf_counter() - start
        if not (math.isfinite(worst.item()) and worst.item() <= self.tol):
            self._grow(name, b, worst.item(), err.tolist())
        return err

    def _grow(self, name: str, b: Budget, worst: float, err: list[float]) -> None:
        n, order = b.steps, FIXED_GRID_METHODS[b.method]
        new = (
            math.ceil(n * (worst / self.tol) ** (1 / order)) if math.isfinite(worst) else math.inf
        )
        new = max(n + 1, new)
        message = (
            f"horizon {name!r}: the {n}-step {b.method} solve is {worst:.3g} per dimension from "
            f"its reference (tol={self.tol}) at step {self.stats['steps'] - 1}"
        )
        if self.action == "raise" or new > b.max_steps:
            raise RuntimeError(
                f"{message}; raise the budget (max_steps={b.max_steps}), raise tol, or solve "
                "adaptively (budget=None)."
            )
        b.steps = int(new)
        event = dict(step=self.stats["steps"] - 1, horizon=name, error=err, budget=[n, b.steps])
        self.stats["events"].append(event)
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
        self.stats = copy.deepcopy(state_dict["stats"])

    def __repr__(self) -> str:
        return (
            f"BudgetGuard(every={self.every}, tol={self.tol}, action={self.action!r}, "
            f"horizons={[n for n, _ in self._budgets]})"
        )
