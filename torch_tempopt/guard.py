"""A guard for step budgets: checks each budgeted solve against its adaptive reference, grows or raises."""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any, Iterable, Mapping, Union

import torch
from torch import Tensor, nn

from ._checks import real, stacklevel, whole
from .horizon import FIXED_GRID_METHODS, LearnableHorizon, Select
from .nfe import NFECounter

__all__ = ["BudgetGuard", "find_horizons"]

Horizons = Union[nn.Module, Iterable[LearnableHorizon]]


def find_horizons(horizons: Any) -> list[tuple[str, LearnableHorizon]]:
    """The named :class:`LearnableHorizon` submodules of a module, or a list of horizons, each once."""
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
    r"""Checks budgeted horizons against their adaptive reference; grows a budget that is too coarse.

    Every ``every`` calls of :meth:`step` (the first included), each horizon with a budget is
    checked on the batch of its last training call (:attr:`LearnableHorizon.last_input`):
    :meth:`LearnableHorizon.fit` solves the reference once, measures the error per dimension
    (:meth:`LearnableHorizon.error`) and fits the placement ``fit_steps`` Adam steps. Above ``tol``
    the budget grows to the number of steps the method's order says brings the error under it
    (``action="grow"``, at most the horizon's ``max_budget``), or :meth:`step` raises
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
        >>> guard.stats["checks"], horizon.budget, guard.stats["nfe"] > 0
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
        found = [(n, h) for n, h in find_horizons(horizons) if h.budget is not None]
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
        self.action, self.select, self._horizons = action, select, found
        for _, h in found:
            h.guarded = True
        self.stats: dict[str, Any] = dict(steps=0, checks=0, nfe=0, seconds=0.0, events=[])
        self.stats["errors"] = [None] * len(found)

    @property
    def horizons(self) -> list[LearnableHorizon]:
        """The guarded horizons, in the order of ``stats["errors"]``."""
        return [h for _, h in self._horizons]

    def step(self) -> None:
        """Counts a training step; on check steps checks every horizon that has been called."""
        due = self.every > 0 and self.stats["steps"] % self.every == 0
        self.stats["steps"] += 1
        for k, (_, h) in enumerate(self._horizons):
            if due and h.last_input is not None:
                self.check(k)

    def check(self, k: int) -> Tensor:
        """Checks horizon ``k`` on its last training batch now; grows its budget or raises.

        Returns:
            The errors before this check's fitting, one per selected part.

        """
        name, h = self._horizons[k]
        func, y0, reverse = h.last_input  # type: ignore[misc]
        counter, start = NFECounter(func), time.perf_counter()
        err, _ = h.fit(
            counter, y0, steps=self.fit_steps, lr=self.fit_lr, reverse=reverse, select=self.select
        )
        worst = err.max().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.broadcast(h.placement, 0)  # type: ignore[arg-type]
        self.stats["checks"] += 1
        self.stats["errors"][k] = err.tolist()
        self.stats["nfe"] += counter.nfe
        self.stats["seconds"] += time.perf_counter() - start
        if not (math.isfinite(worst.item()) and worst.item() <= self.tol):
            self._grow(name, h, worst.item(), err.tolist())
        return err

    def _grow(self, name: str, h: LearnableHorizon, worst: float, err: list[float]) -> None:
        n, order = h.budget or 1, FIXED_GRID_METHODS[h.method]
        new = (
            math.ceil(n * (worst / self.tol) ** (1 / order)) if math.isfinite(worst) else math.inf
        )
        new = max(n + 1, new)
        message = (
            f"horizon {name!r}: the {n}-step {h.method} solve is {worst:.3g} per dimension from its "
            f"reference (tol={self.tol}) at step {self.stats['steps'] - 1}"
        )
        if self.action == "raise" or new > (h.max_budget or 0):
            raise RuntimeError(
                f"{message}; raise the budget (max_budget={h.max_budget}), raise tol, or solve "
                "adaptively (budget=None)."
            )
        h.set_budget(int(new))
        event = dict(step=self.stats["steps"] - 1, horizon=name, error=err, budget=[n, h.budget])
        self.stats["events"].append(event)
        warnings.warn(
            f"{message}: budget grown to {h.budget} steps.",
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
            f"horizons={[n for n, _ in self._horizons]})"
        )
