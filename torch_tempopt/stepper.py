"""Coordinate descent on network weights and integration horizons (TO-FLOW, Algorithm 1)."""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import flag, real, stacklevel
from .guard import BudgetGuard, Horizons, find_horizons
from .horizon import LearnableHorizon

__all__ = ["CoordinateDescentStepper"]


def _finite(tensors: Iterable[Tensor | None]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def _of_p(name: str, doc: str) -> Any:
    """A property that reads and sets the wrapped optimizer's attribute ``name``."""
    return property(
        lambda self: getattr(self.optimizer, name),
        lambda self, value: setattr(self.optimizer, name, value),
        doc=doc,
    )


class CoordinateDescentStepper(Optimizer):
    r"""Wraps a weight optimizer P; steps the horizons' time parameters with their own optimizer Q.

    Each :meth:`step` updates the weights with P, lets its ``guard`` check the budgets, then
    steps every learned T (and t0) with Q from the gradient of the loss plus the temporal
    regulariser :math:`\alpha |T - t_0|` (eq. 15-16), and clips T into the horizon's bounds
    (eq. 17). At a bound the clipped horizon's Q state is cleared if ``reset_at_bound``, so
    momentum cannot hold T there. The time parameters are removed from P's ``param_groups``
    (with their state) if they were in it, so weight decay, LR schedules and clipping over
    ``param_groups`` never touch T.

    The stepper behaves as P: ``param_groups``, ``state`` and ``defaults`` are P's (LR schedulers
    and ``GradScaler`` act on the weights), step and state-dict hooks run as on any optimizer, and
    :meth:`state_dict` round-trips P, Q, the guard and :attr:`stats`; :meth:`add_param_group`
    leaves time parameters out as the constructor does, and the stepper deep-copies and pickles.
    A P that needs a closure in every step (LBFGS) is refused. With a ``GradScaler``,
    unscale T too: ``scaler.unscale_(stepper.horizon_optimizer)`` before ``scaler.step(stepper)``.

    The defaults never make a model worse than the unmodified one: ``alpha = 0`` (T follows the
    loss alone), and on a budget T is not learned unless asked (:class:`LearnableHorizon`
    ``learn_T``). The paper's settings are ``alpha=0.1`` (with ``lr=1e-2`` and the horizon's
    ``eps=0.1``).

    A non-finite dL/dT never reaches T: that update is skipped, counted in :attr:`stats` and
    warned about once; with ``skip_nonfinite=True`` a non-finite gradient anywhere skips the
    whole step.

    Arguments:
        optimizer: The weight optimizer P.
        horizons: A module (its :class:`LearnableHorizon` submodules are found) or a list.
        lr: The learning rate of the default Q, ``Adam``.
        alpha: The temporal regularisation strength, >= 0, in the loss's units per unit of time.
        horizon_optimizer: A factory of Q, called with :attr:`time_parameters`
            (``lambda ps: torch.optim.SGD(ps, lr=0.1)``). Default: Adam at ``lr``.
        reset_at_bound: Clear a clipped horizon's Q state.
        skip_nonfinite: Skip the whole step if any gradient is NaN or infinite.
        guard: A :class:`BudgetGuard`, ``True`` for one with its defaults over the horizons with
            a budget (if any), or ``False`` for none.
        rollback: When the guard grows or retires a budget, put the weights, the time parameters
            and P's and Q's states back as they were at its last passed check, so that what was
            learned on a solve the check would have refused is not kept. It keeps a copy of them.

    Example:
        >>> import torch
        >>> horizon = LearnableHorizon(T0=0.5)
        >>> net = torch.nn.Linear(2, 2)
        >>> opt = CoordinateDescentStepper(torch.optim.Adam(net.parameters(), lr=1e-3), [horizon])
        >>> y = horizon(lambda t, y: net(y), torch.ones(4, 2))
        >>> y[-1].pow(2).sum().backward()
        >>> opt.step(); opt.zero_grad()
        >>> horizon.T.item() != 0.5
        True

    """

    def __init__(
        self,
        optimizer: Optimizer,
        horizons: Horizons,
        *,
        lr: float = 1e-2,
        alpha: float = 0.0,
        horizon_optimizer: Callable[[list], Optimizer] | None = None,
        reset_at_bound: bool = True,
        skip_nonfinite: bool = False,
        guard: BudgetGuard | bool = True,
        rollback: bool = True,
    ) -> None:
        if isinstance(optimizer, CoordinateDescentStepper) or not isinstance(optimizer, Optimizer):
            got = type(optimizer).__name__
            raise TypeError(
                f"optimizer must be a plain torch.optim.Optimizer over the weights, got {got}."
            )
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise TypeError(
                f"optimizer {type(optimizer).__name__} needs a closure in every step, which "
                "would re-evaluate the loss for T too; use a first-order optimizer such as Adam."
            )
        self.optimizer = optimizer
        # what Optimizer.__init__ sets up besides P's groups: the hooks
        Optimizer.__setstate__(self, {})
        self.lr, self.alpha = real("lr", lr), real("alpha", alpha)
        for name, value in (("lr", self.lr), ("alpha", self.alpha)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        self.reset_at_bound = flag("reset_at_bound", reset_at_bound)
        self.skip_nonfinite = flag("skip_nonfinite", skip_nonfinite)
        self._horizons = find_horizons(horizons)
        ps = [p for _, h in self._horizons for p in (h.T, h.t0)]
        self.time_parameters = [p for p in ps if isinstance(p, nn.Parameter) and p.requires_grad]
        for group in optimizer.param_groups:  # silently, by design: T is not a weight
            group["params"] = self._weights(group["params"])
        self.horizon_optimizer = self._build_q(horizon_optimizer)
        self.guard = self._build_guard(guard)
        self.rollback, self._kept = flag("rollback", rollback), None
        self._warned: set[str] = set()
        rows = [
            {"name": n, "T": h.T.item(), "dLdT": None, "clip_count": 0, "nonfinite": 0}
            for n, h in self._horizons
        ]
        self.stats: dict[str, Any] = {"steps": 0, "skipped_steps": 0, "rollbacks": 0}
        self.stats["horizons"] = rows

    def _build_q(self, factory: Any) -> Optimizer | None:
        if not self.time_parameters:
            return None
        if factory is None:
            return torch.optim.Adam(self.time_parameters, lr=self.lr)
        q = factory(list(self.time_parameters)) if callable(factory) else factory
        if isinstance(factory, Optimizer) or not isinstance(q, Optimizer):
            raise TypeError(
                "horizon_optimizer must be a factory params -> Optimizer, e.g. "
                f"lambda ps: torch.optim.SGD(ps, lr=0.1), got {type(factory).__name__}."
            )
        return q

    def _build_guard(self, guard: Any) -> BudgetGuard | None:
        if isinstance(guard, BudgetGuard):
            return guard
        budgeted = {n: h for n, h in self._horizons if h.budget is not None}
        if not flag("guard", guard):  # the user declined a guard: nothing to warn of
            for h in budgeted.values():
                h.budget.warn_unguarded = False  # type: ignore[union-attr]
        return BudgetGuard(budgeted) if guard and budgeted else None

    @property
    def horizons(self) -> list[LearnableHorizon]:
        """The horizons, in the order of ``stats["horizons"]``."""
        return [h for _, h in self._horizons]

    param_groups = _of_p("param_groups", "P's param groups (the weights only).")
    state = _of_p("state", "P's state.")
    defaults = _of_p("defaults", "P's defaults.")

    def _weights(self, params: Any) -> list[Tensor]:
        """``params`` without the time parameters, whose state P then drops."""
        params = [params] if isinstance(params, Tensor) else list(params)
        ids = {id(p) for p in self.time_parameters}
        for p in params:
            if id(p) in ids:
                self.optimizer.state.pop(p, None)
        return [p for p in params if id(p) not in ids]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group to P, without the time parameters (as at construction)."""
        self.optimizer.add_param_group(
            {**param_group, "params": self._weights(param_group["params"])}
        )

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__  # Optimizer's would keep P's groups only, which are properties here

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of the weights and of the time parameters."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.time_parameters:
            p.grad = None if set_to_none or p.grad is None else p.grad.zero_()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel())

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Steps the weights with P, the guard, then the time parameters with Q.

        Arguments:
            closure: Re-evaluates the loss and calls ``backward``, as for any optimizer.

        Returns:
            The closure's loss, if a closure was given.

        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weights = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        if self.skip_nonfinite and not (
            _finite(weights) and _finite(p.grad for p in self.time_parameters)
        ):
            self.stats["skipped_steps"] += 1
            self._warn_once(
                "skip", "CoordinateDescentStepper skipped a step with a NaN or inf gradient."
            )
            return loss
        if not _finite(weights):
            self._warn_once(
                "weights",
                "CoordinateDescentStepper: a weight gradient is NaN or inf and reaches the weight "
                "optimizer; pass skip_nonfinite=True to skip such steps.",
            )
        self.optimizer.step()
        if self.guard is None or not self._guard_step(self.guard):
            self._step_horizons()  # not on the gradient of a step that was rolled back
        self.stats["steps"] += 1
        return loss

    def _guard_step(self, guard: BudgetGuard) -> bool:
        """The guard's step; keeps what passed a check, rolls back to it after a growth."""
        checks, events = guard.stats["checks"], len(guard.stats["events"])
        guard.step()
        if not self.rollback or guard.stats["checks"] == checks:
            return False
        weights = [p for g in self.optimizer.param_groups for p in g["params"]]
        params = weights + self.time_parameters
        if len(guard.stats["events"]) == events:  # passed: keep it
            parts = [self.optimizer, self.horizon_optimizer]
            states = [None if q is None else copy.deepcopy(q.state_dict()) for q in parts]
            self._kept = ([p.detach().clone() for p in params], states, guard.stats["steps"] - 1)
            return False
        if self._kept is not None:
            values, states, step = self._kept
            with torch.no_grad():
                for p, v in zip(params, values):
                    p.copy_(v)
            for q, state in zip([self.optimizer, self.horizon_optimizer], states):
                if q is not None:
                    q.load_state_dict(copy.deepcopy(state))
            guard.stats["events"][-1]["rolled_back_to"] = step
            self.stats["rollbacks"] = self.stats.get("rollbacks", 0) + 1  # 0.4's stats had none
        return self._kept is not None

    def _step_horizons(self) -> None:
        if self.horizon_optimizer is None:
            return
        learned = [h for _, h in self._horizons if h.T.requires_grad]
        if learned and all(h.T.grad is None for h in learned):
            self._warn_once(
                "none",
                "CoordinateDescentStepper.step found no dL/dT on any horizon; T stays put. Call "
                "the horizons in the forward pass whose loss you backpropagate.",
            )
        for k, (name, h) in enumerate(self._horizons):
            s = self.stats["horizons"][k]
            for p in (h.T, h.t0):
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    p.grad = None
                    s["nonfinite"] += 1
                    self._warn_once(
                        f"time{k}",
                        f"CoordinateDescentStepper: dL/dT of horizon {name or k!r} is NaN or inf; "
                        "its update was skipped (stats['horizons'][i]['nonfinite']).",
                    )
            s["dLdT"] = None if h.T.grad is None else h.T.grad.item()  # the loss's, unregularised
            if self.alpha and h.T.grad is not None:
                direction = torch.sign(h.T.detach() - h.t0.detach())
                h.T.grad = h.T.grad + self.alpha * direction
                if h.learn_t0 and h.t0.grad is not None:
                    h.t0.grad = h.t0.grad - self.alpha * direction
        self.horizon_optimizer.step()
        for k, (_, h) in enumerate(self._horizons):
            s = self.stats["horizons"][k]
            if h.clip_():
                s["clip_count"] += 1
                if self.reset_at_bound:
                    for p in (h.T, h.t0):
                        self.horizon_optimizer.state.pop(p, None)
            s["T"] = h.T.item()
            if h.learn_t0:
                s["t0"] = h.t0.item()

    def _parts(self) -> dict[str, Any]:
        return dict(
            optimizer=self.optimizer, horizon_optimizer=self.horizon_optimizer, guard=self.guard
        )

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The state of P, Q, the guard, :attr:`stats` and the rollback point (T, budgets and
        placements: the model's).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = {k: None if v is None else v.state_dict() for k, v in self._parts().items()}
        state["stats"], state["kept"] = copy.deepcopy(self.stats), copy.deepcopy(self._kept)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state = post_hook(self, state) or state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Loads what :meth:`state_dict` returned, or a state dict of P alone (load the model
        first).
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        if not isinstance(state_dict, dict) or not ({"optimizer", "stats"} <= set(state_dict)):
            self.optimizer.load_state_dict(state_dict)  # a plain optimizer's (an unpatched run's)
        else:
            for key, part in self._parts().items():
                if part is not None and state_dict.get(key) is not None:
                    part.load_state_dict(state_dict[key])
            self.stats = copy.deepcopy(state_dict["stats"])
            self._kept = copy.deepcopy(state_dict.get("kept"))  # the rollback point, since 0.5
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        return (
            f"CoordinateDescentStepper(alpha={self.alpha}, optimizer={type(self.optimizer).__name__}, "  # noqa: E501 (one message, one line)
            f"guard={self.guard!r}, horizons=[{', '.join(repr(h) for h in self.horizons)}])"
        )
