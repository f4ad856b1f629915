"""Coordinate descent on network weights and integration horizons (TO-FLOW, Algorithm 1), with a budget guard."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Iterable, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import flag, real, whole
from .horizon import FIXED_GRID_METHODS, LearnableHorizon

__all__ = ["CoordinateDescentStepper"]

Horizons = Union[nn.Module, Iterable[LearnableHorizon]]


def _find_horizons(horizons: Any) -> list[tuple[str, LearnableHorizon]]:
    if isinstance(horizons, nn.Module):
        found = [(n, m) for n, m in horizons.named_modules() if isinstance(m, LearnableHorizon)]
    elif isinstance(horizons, Iterable) and not isinstance(horizons, (str, bytes, Tensor)):
        found = []
        for i, h in enumerate(horizons):
            if not isinstance(h, LearnableHorizon):
                raise TypeError(f"horizons[{i}] must be a LearnableHorizon, got {type(h).__name__}.")
            found.append((str(i), h))
    else:
        raise TypeError(f"horizons must be a module holding LearnableHorizon submodules or a list of them, got {type(horizons).__name__}.")
    unique = list({id(h): (n, h) for n, h in reversed(found)}.values())[::-1]
    if not unique:
        raise ValueError("horizons holds no LearnableHorizon; replace the model's odeint call with one before wrapping the optimizer.")
    return unique


def _finite(tensors: Iterable[Tensor | None]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def _all_reduce(t: Tensor, op: str) -> Tensor:
    """Max or mean over the ranks of an initialised process group (a no-op otherwise)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t


class CoordinateDescentStepper(Optimizer):
    r"""Wraps a weight optimizer P; steps the horizons' time parameters with their own optimizer Q.

    Each :meth:`step` updates the weights with P, then every horizon's T with
    Q from the gradient of the loss plus the temporal regulariser
    :math:`\alpha |T - t_0|` (eq. 15-16), and clips T into the horizon's
    bounds (eq. 17). At a bound the clipped horizon's Q state is cleared if
    ``reset_at_bound``, so momentum cannot hold T there. The horizons are
    removed from P's ``param_groups`` (with their state) if they were in it:
    that is the design, so weight decay, LR schedules and clipping over
    ``param_groups`` never touch T. The stepper is an
    :class:`~torch.optim.Optimizer` whose ``param_groups`` and ``state`` are P's.

    **Budget guard.** Every ``guard_every`` steps, each horizon solving on a
    budget is compared, on the batch of its last call, with the adaptive
    reference that call's settings define (:meth:`LearnableHorizon.error` of
    the sample and the log-density: the first ``guard_parts`` parts). Above ``guard_tol`` the budget grows to the
    number of steps the method's order says brings the error back under the
    tolerance (``guard_action="grow"``, at most ``max_budget``) or the step
    raises (``"raise"``); otherwise a learned :attr:`~LearnableHorizon.placement`
    is stepped by Q (learning rate ``placement_lr``) down the gradient of that
    error, never of the loss. Checks and growths are in :attr:`stats`.

    A non-finite dL/dT never reaches T: that update is skipped, counted in
    :attr:`stats` and warned about once; with ``skip_nonfinite=True`` a
    non-finite gradient anywhere skips the whole step. Under
    ``DistributedDataParallel`` dL/dT is averaged with the weights' gradients,
    and the guard's errors and placement gradients are reduced over the ranks,
    so every rank takes the same step (a growing budget changes a learned
    placement's shape, which DDP does not allow: use ``guard_action="raise"``).

    With a ``torch.amp.GradScaler``, unscale T's gradient before the step:
    ``scaler.unscale_(stepper); scaler.unscale_(stepper.horizon_optimizer)``.

    Arguments:
        optimizer: The weight optimizer P.
        horizons: A module (its :class:`LearnableHorizon` submodules are found) or a list of horizons.
        lr: The learning rate of the default Q, ``Adam``.
        alpha: The temporal regularisation strength, >= 0.
        mode: ``"alternate"`` (Algorithm 1: the weights and T from one solve) or
            ``"exact"`` (dL/dT re-evaluated at the updated weights through ``closure``).
        horizon_optimizer: Q, an optimizer over exactly :attr:`time_parameters`,
            or a factory ``params -> Optimizer``. Default: Adam.
        reset_at_bound: Clear a clipped horizon's Q state.
        skip_nonfinite: Skip the whole step if any gradient is NaN or infinite.
        guard_every: Check budgets every this many steps (0: never).
        guard_tol: The largest mean absolute error allowed against the reference.
        guard_action: ``"grow"`` or ``"raise"``.
        max_budget: The largest budget ``"grow"`` may set before it raises.
        placement_lr: The learning rate of learned placements in the default Q.
        guard_parts: The guard compares the first this many parts of the state: a CNF's
            sample and log-density, not RNODE's regulariser integrals (``None``: all).

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

    def __init__(self, optimizer: Optimizer, horizons: Horizons, *, lr: float = 1e-2, alpha: float = 0.1,
                 mode: str = "alternate", horizon_optimizer: Optimizer | Callable[[list], Optimizer] | None = None,
                 reset_at_bound: bool = True, skip_nonfinite: bool = False, guard_every: int = 100,
                 guard_tol: float = 0.05, guard_action: str = "grow", max_budget: int = 64,
                 placement_lr: float = 0.05, guard_parts: int | None = 2) -> None:
        if isinstance(optimizer, CoordinateDescentStepper) or not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a plain torch.optim.Optimizer over the weights, got {type(optimizer).__name__}.")
        if mode not in ("alternate", "exact"):
            raise ValueError(f"mode must be 'alternate' or 'exact', got {mode!r}.")
        if guard_action not in ("grow", "raise"):
            raise ValueError(f"guard_action must be 'grow' or 'raise', got {guard_action!r}.")
        self.lr, self.alpha, self.guard_tol = real("lr", lr), real("alpha", alpha), real("guard_tol", guard_tol)
        self.placement_lr = real("placement_lr", placement_lr)
        for name in ("lr", "alpha", "placement_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.guard_tol <= 0:
            raise ValueError(f"guard_tol must be > 0, got {self.guard_tol}.")
        self.guard_every, self.max_budget = whole("guard_every", guard_every, 0), whole("max_budget", max_budget)
        self.guard_parts = None if guard_parts is None else whole("guard_parts", guard_parts)
        self.mode, self.guard_action = mode, guard_action
        self.reset_at_bound, self.skip_nonfinite = flag("reset_at_bound", reset_at_bound), flag("skip_nonfinite", skip_nonfinite)
        self.optimizer = optimizer
        self._horizons = _find_horizons(horizons)
        times = [p for _, h in self._horizons for p in (h.T, h.t0) if isinstance(p, nn.Parameter) and p.requires_grad]
        places = [h.placement for _, h in self._horizons if h.placement is not None and h.placement.requires_grad]
        self.time_parameters: list[nn.Parameter] = times + places
        ids = {id(p) for p in self.time_parameters}
        for group in optimizer.param_groups:  # silently, by design: T is not a weight
            for p in group["params"]:
                if id(p) in ids:
                    optimizer.state.pop(p, None)
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        self.horizon_optimizer = self._build_q(horizon_optimizer, times, places)
        # Where each learned placement sits in Q: a grown budget or a loaded checkpoint brings a new parameter.
        self._slots = [(k, gi, pi) for k, (_, h) in enumerate(self._horizons) if h.placement is not None
                       for gi, g in enumerate(getattr(self.horizon_optimizer, "param_groups", []))
                       for pi, p in enumerate(g["params"]) if p is h.placement]
        self._optimizer_step_pre_hooks: dict[int, Callable] = {}
        self._optimizer_step_post_hooks: dict[int, Callable] = {}
        self._warned: set[str] = set()
        self.stats: dict[str, Any] = {"steps": 0, "skipped_steps": 0, "guard_events": [], "horizons": [
            {"name": n, "T": h.T.item(), "dLdT": None, "clip_count": 0, "nonfinite": 0, "budget": h.budget, "error": None}
            for n, h in self._horizons]}

    def _build_q(self, q: Any, times: list[nn.Parameter], places: list[nn.Parameter]) -> Optimizer | None:
        if q is None:
            groups = [g for g in ({"params": times}, {"params": places, "lr": self.placement_lr}) if g["params"]]
            return torch.optim.Adam(groups, lr=self.lr) if groups else None
        if not isinstance(q, Optimizer):
            q = q(list(self.time_parameters)) if callable(q) else q
            if not isinstance(q, Optimizer):
                raise TypeError(f"horizon_optimizer must be an Optimizer or a factory returning one, got {type(q).__name__}.")
        if {id(p) for g in q.param_groups for p in g["params"]} != {id(p) for p in self.time_parameters}:
            raise ValueError(f"horizon_optimizer must hold exactly the {len(self.time_parameters)} time parameters "
                             "(stepper.time_parameters); build it from a factory instead.")
        return q

    def _follow_placements(self) -> None:
        """Puts each horizon's current placement where its previous one was in Q (its state too, if the shape holds)."""
        for k, gi, pi in self._slots:
            group, new = self.horizon_optimizer.param_groups[gi], self._horizons[k][1].placement  # type: ignore[union-attr]
            old = group["params"][pi]
            if new is not old and new is not None:
                state = self.horizon_optimizer.state.pop(old, None) or {}  # type: ignore[union-attr]
                if state and all(not isinstance(v, Tensor) or v.dim() == 0 or v.shape == new.shape for v in state.values()):
                    self.horizon_optimizer.state[new] = state  # type: ignore[union-attr]
                group["params"][pi] = new
                self.time_parameters = [new if p is old else p for p in self.time_parameters]

    @property
    def horizons(self) -> list[LearnableHorizon]:
        """The horizons, in the order of ``stats["horizons"]``."""
        return [h for _, h in self._horizons]

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """P's param groups (the weights only)."""
        return self.optimizer.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        """P's state."""
        return self.optimizer.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        """P's defaults."""
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group to P."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of the weights and of the time parameters."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.time_parameters:
            p.grad = None if set_to_none or p.grad is None else p.grad.zero_()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Steps the weights with P, checks the budgets, steps and clips the time parameters.

        Arguments:
            closure: Re-evaluates the loss and calls ``backward``; required in ``"exact"`` mode.

        Returns:
            The closure's loss, if a closure was given.

        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}.")
        if self.mode == "exact" and closure is None:
            raise ValueError("closure is required in mode='exact'; pass one that zeroes the gradients, computes the loss and calls backward().")
        self._follow_placements()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weights = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        if self.skip_nonfinite and not (_finite(weights) and _finite(p.grad for p in self.time_parameters)):
            return self._skip(loss)
        if not _finite(weights):
            self._warn_once("weights", "CoordinateDescentStepper: a weight gradient is NaN or inf and reaches the weight "
                            "optimizer; pass skip_nonfinite=True to skip such steps.")
        undo = self._undo() if self.mode == "exact" and self.skip_nonfinite else None
        self.optimizer.step()
        if self.mode == "exact":
            for p in self.time_parameters:
                p.grad = None
            with torch.enable_grad():
                closure()  # type: ignore[misc]
            if undo is not None and not _finite(p.grad for p in self.time_parameters):
                undo()  # dL/dT at the updated weights is not finite: the weight step is undone, the whole step skipped
                return self._skip(loss)
        self._guard()
        self._step_horizons()
        self.stats["steps"] += 1
        return loss

    def _skip(self, loss: Any) -> Any:
        self.stats["skipped_steps"] += 1
        self._warn_once("skip", "CoordinateDescentStepper skipped a step with a NaN or inf gradient (stats['skipped_steps']).")
        return loss

    def _undo(self) -> Callable[[], None]:
        """Returns a function that restores P's weights and state as they are now."""
        state = copy.deepcopy(self.optimizer.state_dict())
        saved = [(p, p.detach().clone()) for g in self.optimizer.param_groups for p in g["params"]]

        def undo() -> None:
            self.optimizer.load_state_dict(state)
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)

        return undo

    def _guard(self) -> None:
        """On check steps, compares budgeted solves with their reference: grows, raises, or sets the placement's gradient."""
        check = self.guard_every > 0 and self.stats["steps"] % self.guard_every == 0
        for k, (name, h) in enumerate(self._horizons):
            learned = h.placement is not None and any(h.placement is p for p in self.time_parameters)
            if learned:
                h.placement.grad = None  # the loss never steps the placement
            if not check or h.placement is None or h._last is None:
                continue
            func, is_tuple, parts, reverse, reference = h._last
            with torch.enable_grad() if learned else torch.no_grad():
                ref = h._reference(func, is_tuple, parts, reverse, reference)
                err = h._error(func, is_tuple, parts, reverse, ref)[: self.guard_parts]
            worst = _all_reduce(err.detach().max().clone(), "max").item()
            s = self.stats["horizons"][k]
            s["error"], n = err.detach().tolist(), h.budget
            if math.isfinite(worst) and worst <= self.guard_tol:
                if learned:
                    (g,) = torch.autograd.grad(err.sum(), h.placement)
                    h.placement.grad = _all_reduce(g, "mean")
                continue
            ratio = worst / self.guard_tol if math.isfinite(worst) else math.inf
            new = max(n + 1, math.ceil(n * ratio ** (1 / FIXED_GRID_METHODS[h.method]))) if math.isfinite(ratio) else math.inf
            message = (f"horizon {name or k!r}: the {n}-step {h.method} solve is {worst:.3g} from its adaptive reference "
                       f"(guard_tol={self.guard_tol}) at step {self.stats['steps']}")
            if self.guard_action == "raise" or new > self.max_budget:
                raise RuntimeError(f"{message}; raise the budget (at most max_budget={self.max_budget} here), raise "
                                   "guard_tol, or solve adaptively (budget=None).")
            h.set_budget(int(new))
            self._follow_placements()
            s["budget"] = h.budget
            self.stats["guard_events"].append({"step": self.stats["steps"], "horizon": name, "error": s["error"],
                                               "budget": [n, h.budget]})
            warnings.warn(f"{message}: budget grown to {h.budget} steps.", RuntimeWarning, stacklevel=3)

    def _step_horizons(self) -> None:
        if self.horizon_optimizer is None:
            return
        learned_T = [h for _, h in self._horizons if h.T.requires_grad and any(h.T is p for p in self.time_parameters)]
        if learned_T and all(h.T.grad is None for h in learned_T):
            self._warn_once("none", "CoordinateDescentStepper.step found no dL/dT on any horizon; T stays put. Call the "
                            "horizons in the forward pass whose loss you backpropagate, without detaching their output.")
        for k, (name, h) in enumerate(self._horizons):
            for p in (h.T, h.t0):
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    p.grad = None
                    self.stats["horizons"][k]["nonfinite"] += 1
                    self._warn_once(f"time{k}", f"CoordinateDescentStepper: dL/dT of horizon {name or k!r} is NaN or "
                                    "inf; its update was skipped (stats['horizons'][i]['nonfinite']).")
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
            s["T"], s["dLdT"] = h.T.item(), None if h.T.grad is None else h.T.grad.item()  # after the clip
            if h.learn_t0:
                s["t0"] = h.t0.item()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The state of P and Q and :attr:`stats` (the horizons' T and placement are in the model's state dict)."""
        q = None if self.horizon_optimizer is None else self.horizon_optimizer.state_dict()
        return {"optimizer": self.optimizer.state_dict(), "horizon_optimizer": q, "stats": copy.deepcopy(self.stats)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Loads what :meth:`state_dict` returned (load the model's state dict first)."""
        if not isinstance(state_dict, dict) or not {"optimizer", "horizon_optimizer", "stats"} <= set(state_dict):
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"state_dict must come from CoordinateDescentStepper.state_dict(), got {got}; "
                             "load a plain optimizer's state with stepper.optimizer.load_state_dict().")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if self.horizon_optimizer is not None and state_dict["horizon_optimizer"] is not None:
            self._follow_placements()
            self.horizon_optimizer.load_state_dict(state_dict["horizon_optimizer"])
        self.stats = copy.deepcopy(state_dict["stats"])

    def __repr__(self) -> str:
        return (f"CoordinateDescentStepper(mode={self.mode!r}, alpha={self.alpha}, optimizer={type(self.optimizer).__name__}, "
                f"horizons=[{', '.join(repr(h) for h in self.horizons)}])")
