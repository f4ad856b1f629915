"""Coordinate descent on network weights and integration horizons (TO-FLOW, Algorithm 1)."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import as_real
from .horizon import LearnableHorizon

__all__ = ["CoordinateDescentStepper", "MODES"]

#: The update schemes of :class:`CoordinateDescentStepper`.
MODES = ("alternate", "exact", "joint")

Horizons = Union[nn.Module, Iterable[LearnableHorizon]]
HorizonOptimizer = Union[Optimizer, Callable[[list], Optimizer], None]


def _find_horizons(horizons: Any) -> list[tuple[str, LearnableHorizon]]:
    if isinstance(horizons, LearnableHorizon):
        found = [("", horizons)]
    elif isinstance(horizons, nn.Module):
        found = [(n, m) for n, m in horizons.named_modules() if isinstance(m, LearnableHorizon)]
    elif isinstance(horizons, Iterable) and not isinstance(horizons, (str, bytes, Tensor)):
        found = []
        for i, h in enumerate(horizons):
            if not isinstance(h, LearnableHorizon):
                raise TypeError(
                    f"horizons[{i}] must be a LearnableHorizon, got {type(h).__name__}. "
                    "Pass the model (its LearnableHorizon submodules are found) or a list of horizons."
                )
            found.append((str(i), h))
    else:
        raise TypeError(
            f"horizons must be an nn.Module holding LearnableHorizon submodules or an iterable of "
            f"LearnableHorizon, got {type(horizons).__name__}."
        )
    unique: dict[int, tuple[str, LearnableHorizon]] = {}
    for name, h in found:
        unique.setdefault(id(h), (name, h))
    if not unique:
        raise ValueError(
            "horizons holds no LearnableHorizon: replace the model's odeint call with a LearnableHorizon "
            "(self.horizon = LearnableHorizon(T0=...); self.horizon(func, y0, ...)) before wrapping the optimizer."
        )
    return list(unique.values())


def _all_finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class CoordinateDescentStepper(Optimizer):
    r"""Wraps a weight optimizer P and steps the horizons with their own optimizer Q.

    Each :meth:`step` first updates the weights with P, then every horizon's T
    with Q, using the gradient of the loss plus the temporal regulariser
    :math:`\alpha |T - t_0|` (eq. 15-16; :math:`\alpha |T|` for :math:`t_0 = 0`),
    and finally clips T into the horizon's bounds (eq. 17). The stepper is an
    :class:`~torch.optim.Optimizer` whose ``param_groups``, ``state`` and
    ``defaults`` are P's, so LR schedulers, warm-up code and gradient clipping
    over ``param_groups`` act on the weights only.

    Modes:
        * ``"alternate"``: Algorithm 1 of the paper. One solve per iteration;
          the weights and T are stepped from the gradients of that solve.
        * ``"exact"``: strict coordinate descent. After the weight step,
          dL/dT is re-evaluated at the updated weights by calling ``closure``
          (a second solve per iteration).
        * ``"joint"``: T is stepped by P together with the weights, with neither
          regulariser nor clip: what upstream FFJORD's ``--train_T`` was meant
          to do. For ablations.

    At a bound, a clipped horizon's Q state (Adam's moments) is cleared if
    ``reset_at_bound``, so momentum cannot hold T at the clip once its gradient
    points inward. A non-finite dL/dT never reaches T: that horizon's update is
    skipped, counted in :attr:`stats` and warned about once. With
    ``skip_nonfinite=True`` a non-finite gradient anywhere skips the whole step
    (weights and T), like AMP's ``GradScaler``; in ``"exact"`` mode a non-finite
    dL/dT at the updated weights also undoes the weight step (P's weights and
    state are copied before it), so a step is applied entirely or not at all.

    Mixed precision: under :func:`torch.autocast` T and dL/dT stay float32 (the
    time grid is at least float32). With a :class:`torch.amp.GradScaler`, call
    :meth:`attach_grad_scaler` once: ``scaler.step(stepper)`` unscales only
    ``param_groups`` (the weights), so the stepper unscales dL/dT itself (through
    ``scaler.unscale_`` on the horizon optimizer, so an overflow in dL/dT also
    backs the scale off) and skips the whole step if it overflowed.

    Distributed: the horizons' T are parameters used in the forward pass, so
    :class:`~torch.nn.parallel.DistributedDataParallel` all-reduces (averages)
    dL/dT together with the weights' gradients, also with
    ``find_unused_parameters=False``. Every rank then takes the same horizon step
    and T stays bitwise equal across ranks. Pass the DDP module (or the module it
    wraps) as ``horizons``. ``"exact"`` mode works too: its closure runs DDP's
    forward and backward twice per step (two all-reduces).

    Errors raised by a horizon's solve carry a note naming the horizon (its name
    in the model, interval, direction) and the number of steps taken
    (:meth:`LearnableHorizon.describe`), which the stepper keeps up to date.

    Arguments:
        optimizer: The weight optimizer P. Horizon parameters found in it are
            removed (with their state), with a warning.
        horizons: A module (all its :class:`LearnableHorizon` submodules are
            used) or an iterable of horizons.
        lr: The learning rate of the default Q, ``Adam(lr=lr)``.
        alpha: The temporal regularisation strength, >= 0.
        mode: ``"alternate"``, ``"exact"`` or ``"joint"``.
        horizon_optimizer: Q itself (an optimizer over exactly the horizons'
            time parameters) or a factory ``params -> Optimizer``. Default: Adam.
        reset_at_bound: Clear a horizon's Q state when it is clipped.
        skip_nonfinite: Skip the whole step if any gradient is NaN or infinite.

    Attributes:
        horizon_optimizer: Q (``None`` in ``"joint"`` mode).
        stats: Step counts and, per horizon, the last T, dL/dT, whether it was
            clipped and how often non-finite gradients were skipped.

    Example:
        >>> import torch
        >>> horizon = LearnableHorizon(T0=0.5)
        >>> net = torch.nn.Linear(2, 2)
        >>> opt = CoordinateDescentStepper(torch.optim.Adam(net.parameters(), lr=1e-3), [horizon])
        >>> y = horizon(lambda t, y: net(y), torch.ones(4, 2))
        >>> y.pow(2).sum().backward()
        >>> opt.step(); opt.zero_grad()
        >>> opt.stats["horizons"][0]["T"] != 0.5
        True

    """

    def __init__(
        self,
        optimizer: Optimizer,
        horizons: Horizons,
        *,
        lr: float = 1e-2,
        alpha: float = 0.1,
        mode: str = "alternate",
        horizon_optimizer: HorizonOptimizer = None,
        reset_at_bound: bool = True,
        skip_nonfinite: bool = False,
    ) -> None:
        if isinstance(optimizer, CoordinateDescentStepper):
            raise TypeError("optimizer is already a CoordinateDescentStepper; wrap the plain weight optimizer once.")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer over the model's weights, got {type(optimizer).__name__}."
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.lr = as_real("lr", lr)
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got lr={self.lr}. The paper uses lr=1e-2 for T.")
        self.alpha = as_real("alpha", alpha)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got alpha={self.alpha}. alpha=0 switches the temporal regulariser off.")
        for name, flag in (("reset_at_bound", reset_at_bound), ("skip_nonfinite", skip_nonfinite)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        self.mode = mode
        self.reset_at_bound = reset_at_bound
        self.skip_nonfinite = skip_nonfinite
        self.optimizer = optimizer
        self._horizons = _find_horizons(horizons)
        self._time_params: list[nn.Parameter] = [p for _, h in self._horizons for p in h.parameters_of_time()]
        # What Optimizer.__init__ would set up, without a param_groups of our own.
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._warned: set[str] = set()

        if mode == "joint":
            if horizon_optimizer is not None:
                raise ValueError("horizon_optimizer has no effect in mode='joint' (T is stepped by the weight optimizer); drop it.")
            self._add_time_params_to_p()
            self.horizon_optimizer: Optimizer | None = None
        else:
            self._remove_time_params_from_p()
            self.horizon_optimizer = self._build_q(horizon_optimizer)

        self._grad_scaler: Any = None
        self.stats: dict[str, Any] = self._fresh_stats()
        self._set_context()

    def _fresh_stats(self) -> dict[str, Any]:
        return {
            "steps": 0,
            "skipped_steps": 0,
            "horizons": [
                {"name": name, "T": h.T.item(), "dLdT": None, "clipped": False, "clip_count": 0, "nonfinite": 0}
                for name, h in self._horizons
            ],
        }

    def _set_context(self) -> None:
        """Tells each horizon its name and the step count, for its error messages."""
        for name, h in self._horizons:
            h._context_name = name or None
            h._context_steps = int(self.stats["steps"])

    # ------------------------------------------------------------------ wiring
    def _remove_time_params_from_p(self) -> None:
        ids = {id(p) for p in self._time_params}
        removed = 0
        for group in self.optimizer.param_groups:
            keep = [p for p in group["params"] if id(p) not in ids]
            for p in group["params"]:
                if id(p) in ids:
                    self.optimizer.state.pop(p, None)
                    removed += 1
            group["params"] = keep
        if removed:
            warnings.warn(
                f"CoordinateDescentStepper removed {removed} horizon parameter(s) from the wrapped optimizer "
                "(and their state): T is stepped by its own optimizer, without weight decay, warm-up or clipping.",
                UserWarning,
                stacklevel=3,
            )

    def _add_time_params_to_p(self) -> None:
        present = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [p for p in self._time_params if id(p) not in present]
        if missing:
            self.optimizer.add_param_group({"params": missing})

    def _build_q(self, horizon_optimizer: HorizonOptimizer) -> Optimizer:
        if horizon_optimizer is None:
            return torch.optim.Adam(self._time_params, lr=self.lr)
        if isinstance(horizon_optimizer, Optimizer):
            q = horizon_optimizer
        elif callable(horizon_optimizer):
            q = horizon_optimizer(list(self._time_params))
            if not isinstance(q, Optimizer):
                raise TypeError(f"horizon_optimizer(params) must return a torch.optim.Optimizer, got {type(q).__name__}.")
        else:
            raise TypeError(
                "horizon_optimizer must be None, a torch.optim.Optimizer over the horizons' time parameters, "
                f"or a factory params -> Optimizer; got {type(horizon_optimizer).__name__}."
            )
        got = {id(p) for g in q.param_groups for p in g["params"]}
        if got != {id(p) for p in self._time_params}:
            raise ValueError(
                "horizon_optimizer must hold exactly the horizons' time parameters "
                f"({len(self._time_params)}: every horizon's T, and t0 where learned), got {len(got)} parameter(s). "
                "Build it as e.g. torch.optim.SGD([h.T for h in horizons], lr=...), or pass a factory."
            )
        return q

    @property
    def horizons(self) -> list[LearnableHorizon]:
        """The horizons being optimised, in the order of :attr:`stats`."""
        return [h for _, h in self._horizons]

    # -------------------------------------------------------- optimizer facade
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The weight optimizer's param groups (T is not among them, except in ``"joint"`` mode)."""
        return self.optimizer.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The weight optimizer's state."""
        return self.optimizer.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        """The weight optimizer's defaults."""
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group to the weight optimizer."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of the weights and of the horizons."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self._time_params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def attach_grad_scaler(self, scaler: Any) -> None:
        r"""Makes :meth:`step` unscale dL/dT with ``scaler`` (a :class:`torch.amp.GradScaler`).

        ``scaler.step(stepper)`` unscales the gradients of ``param_groups``, which
        hold the weights only, so that LR schedulers and clipping never touch T.
        With the scaler attached, :meth:`step` calls ``scaler.unscale_`` on the
        horizon optimizer: dL/dT is divided by the scale, and an inf/NaN in it
        is recorded where ``scaler.update()`` looks, so the scale backs off. Such
        a step is skipped entirely (weights and T), as the scaler skips steps
        with non-finite weight gradients, and counted in
        ``stats["skipped_steps"]``. Not needed in ``"joint"`` mode, where T is in
        ``param_groups`` and the scaler unscales it with the weights.

        Between ``scaler.unscale_(stepper)`` (e.g. for gradient clipping) and
        ``scaler.step(stepper)``, dL/dT is still scaled: clip the weights only
        (``network_parameters(model)``), not ``model.parameters()``.

        Arguments:
            scaler: The :class:`torch.amp.GradScaler` used for the backward pass,
                or ``None`` to detach it.

        Raises:
            TypeError: If ``scaler`` does not look like a ``GradScaler``.
            ValueError: In ``"exact"`` mode, whose closure ``GradScaler.step`` refuses.

        Example:
            >>> import torch
            >>> horizon = LearnableHorizon(T0=0.5)
            >>> net = torch.nn.Linear(2, 2)
            >>> stepper = CoordinateDescentStepper(torch.optim.Adam(net.parameters(), lr=1e-3), [horizon])
            >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            >>> stepper.attach_grad_scaler(scaler)
            >>> loss = horizon(lambda t, y: net(y), torch.ones(4, 2)).pow(2).sum()
            >>> scaler.scale(loss).backward()
            >>> scaler.step(stepper); scaler.update()
            >>> abs(stepper.stats["horizons"][0]["dLdT"]) < 100  # unscaled
            True

        """
        if scaler is None:
            self._grad_scaler = None
            return
        needed = ("unscale_", "is_enabled", "get_scale", "update")
        if not all(callable(getattr(scaler, name, None)) for name in needed):
            raise TypeError(
                f"scaler must be a torch.amp.GradScaler (with {', '.join(needed)}), got {type(scaler).__name__}."
            )
        if self.mode == "exact":
            raise ValueError(
                "scaler cannot be used with mode='exact': GradScaler.step refuses closures, and exact mode needs one "
                "to re-evaluate dL/dT. Use mode='alternate' with AMP."
            )
        self._grad_scaler = scaler

    def _unscale_time_grads(self) -> bool:
        """Unscales dL/dT with the attached scaler; returns whether it overflowed."""
        scaler = self._grad_scaler
        if scaler is None or self.mode == "joint" or not scaler.is_enabled():
            return False
        if not any(p.grad is not None for p in self._time_params):
            return False
        assert self.horizon_optimizer is not None
        try:
            scaler.unscale_(self.horizon_optimizer)
        except RuntimeError as error:
            raise RuntimeError(
                "CoordinateDescentStepper could not unscale dL/dT: step() was called twice without scaler.update() "
                "in between. Call scaler.update() after every scaler.step(stepper)."
            ) from error
        return not _all_finite([p.grad for p in self._time_params if p.grad is not None])

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        r"""Steps the weights with P, then the horizons with Q, then clips T.

        Arguments:
            closure: Re-evaluates the loss and calls ``backward``. Optional in
                ``"alternate"`` and ``"joint"`` modes, required in ``"exact"``.

        Returns:
            The closure's loss, if a closure was given.

        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}.")
        if self.mode == "exact" and closure is None:
            raise ValueError(
                "closure is required in mode='exact': dL/dT is re-evaluated at the updated weights. "
                "Call step(closure) with a closure that zeroes the gradients, computes the loss, calls "
                "backward() and returns the loss, or use mode='alternate'."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if self._unscale_time_grads():
            # The scaler's overflow protocol: skip everything, the scale backs off in scaler.update().
            self.stats["skipped_steps"] += 1
            return loss
        weight_grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        time_grads = [p.grad for p in self._time_params if p.grad is not None]
        if not _all_finite(weight_grads):
            if self.skip_nonfinite:
                return self._skip_step(loss)
            self._warn_once(
                "weights",
                "CoordinateDescentStepper: a weight gradient is NaN or infinite and reaches the weight optimizer; "
                "pass skip_nonfinite=True to skip such steps.",
            )
        if self.skip_nonfinite and not _all_finite(time_grads):
            return self._skip_step(loss)

        if self.mode == "joint":
            saved = self._guard_time_grads()
            self.optimizer.step()
            self._restore_time_grads(saved)
            self._record(clipped=[False] * len(self._horizons))
            self.stats["steps"] += 1
            self._set_context()
            return loss

        snapshot = self._snapshot_weights() if self.mode == "exact" and self.skip_nonfinite else None
        self.optimizer.step()
        if self.mode == "exact":
            assert closure is not None
            for p in self._time_params:
                p.grad = None
            with torch.enable_grad():
                closure()
            if snapshot is not None and not _all_finite([p.grad for p in self._time_params if p.grad is not None]):
                self._restore_weights(snapshot)
                return self._skip_step(loss)
        self._step_horizons()
        self.stats["steps"] += 1
        self._set_context()
        return loss

    def _snapshot_weights(self) -> tuple[list[Tensor], dict[str, Any]]:
        """Copies of P's parameters and state, to undo a weight step."""
        params = [p.detach().clone() for g in self.optimizer.param_groups for p in g["params"]]
        return params, copy.deepcopy(self.optimizer.state_dict())

    def _restore_weights(self, snapshot: tuple[list[Tensor], dict[str, Any]]) -> None:
        params, state = snapshot
        with torch.no_grad():
            for p, saved in zip((p for g in self.optimizer.param_groups for p in g["params"]), params):
                p.copy_(saved)
        self.optimizer.load_state_dict(state)

    def _skip_step(self, loss: Any) -> Any:
        self.stats["skipped_steps"] += 1
        self._warn_once(
            "skip",
            "CoordinateDescentStepper: skipped a step with a NaN or infinite gradient (weights and T unchanged); "
            "stats['skipped_steps'] counts them.",
        )
        return loss

    def _guard_time_grads(self) -> dict[int, Tensor | None]:
        """Hides non-finite time gradients from the optimizer; returns the originals."""
        saved: dict[int, Tensor | None] = {}
        for k, (name, h) in enumerate(self._horizons):
            for p in h.parameters_of_time():
                saved[id(p)] = p.grad
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    p.grad = None
                    self.stats["horizons"][k]["nonfinite"] += 1
                    self._warn_once(
                        f"time{k}",
                        f"CoordinateDescentStepper: dL/dT of horizon {name or k!r} is NaN or infinite; its update "
                        "was skipped (counted in stats['horizons'][i]['nonfinite']).",
                    )
        return saved

    def _restore_time_grads(self, saved: dict[int, Tensor | None]) -> None:
        for p in self._time_params:
            p.grad = saved[id(p)]

    def _step_horizons(self) -> None:
        assert self.horizon_optimizer is not None
        saved = self._guard_time_grads()
        for _, h in self._horizons:
            if self.alpha == 0:
                continue
            direction = torch.sign(h.T.detach() - h.t0.detach())
            if h.T.grad is not None:
                h.T.grad = h.T.grad + self.alpha * direction
            if h.learn_t0 and h.t0.grad is not None:
                h.t0.grad = h.t0.grad - self.alpha * direction
        self.horizon_optimizer.step()
        self._restore_time_grads(saved)
        clipped = []
        for _, h in self._horizons:
            c = h.clip_()
            clipped.append(c)
            if c and self.reset_at_bound:
                for p in h.parameters_of_time():
                    self.horizon_optimizer.state.pop(p, None)
        self._record(clipped)

    def _record(self, clipped: list[bool]) -> None:
        for k, ((_, h), c) in enumerate(zip(self._horizons, clipped)):
            s = self.stats["horizons"][k]
            s["T"] = h.T.item()
            g = h.T.grad
            s["dLdT"] = None if g is None else g.item()
            s["clipped"] = c
            s["clip_count"] += int(c)
            if h.learn_t0:
                s["t0"] = h.t0.item()

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The state of P, Q, the horizons' bounds and :attr:`stats`."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "horizon_optimizer": None if self.horizon_optimizer is None else self.horizon_optimizer.state_dict(),
            "horizons": [
                {"T_init": h.T_init.clone(), "t0_init": h.t0_init.clone(), "eps": h.eps.clone()} for _, h in self._horizons
            ],
            "stats": copy.deepcopy(self.stats),
            "mode": self.mode,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Loads what :meth:`state_dict` returned, or a plain optimizer's state dict.

        A plain optimizer state (``{"state": ..., "param_groups": ...}``, saved
        before temporal optimization was switched on) goes to the weight
        optimizer; the horizon optimizer and :attr:`stats` start fresh, with a
        one-line :class:`UserWarning`. It must come from an optimizer over the
        same weights, without the horizons' T (see
        :func:`~torch_tempopt.load_state_dict_adding_horizons` for the model).

        Arguments:
            state_dict: A stepper's or a plain optimizer's state dict.

        Raises:
            TypeError: If ``state_dict`` is not a dict.
            ValueError: If it is neither kind, or does not fit this stepper.

        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict from state_dict(), got {type(state_dict).__name__}.")
        if "optimizer" not in state_dict and "state" in state_dict and "param_groups" in state_dict:
            self._load_plain_state_dict(state_dict)
            return
        if "optimizer" not in state_dict or "horizons" not in state_dict:
            raise ValueError(
                "state_dict is neither a CoordinateDescentStepper state (keys 'optimizer', 'horizons') nor a plain "
                f"optimizer state (keys 'state', 'param_groups'); got keys {sorted(map(str, state_dict))}."
            )
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(f"state_dict was saved in mode={state_dict['mode']!r}, this stepper has mode={self.mode!r}.")
        bounds = state_dict["horizons"]
        if len(bounds) != len(self._horizons):
            raise ValueError(f"state_dict holds {len(bounds)} horizon(s), this stepper has {len(self._horizons)}.")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if self.horizon_optimizer is not None and state_dict.get("horizon_optimizer") is not None:
            self.horizon_optimizer.load_state_dict(state_dict["horizon_optimizer"])
        with torch.no_grad():
            for (_, h), b in zip(self._horizons, bounds):
                for key in ("T_init", "t0_init", "eps"):
                    getattr(h, key).copy_(b[key])
        if "stats" in state_dict:
            self.stats = copy.deepcopy(state_dict["stats"])
        self._set_context()

    def _load_plain_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state_dict)
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"state_dict is a plain optimizer state that does not fit the weight optimizer ({error}). It must "
                "come from an optimizer over the same weights in the same order, without the horizons' T "
                "(e.g. Adam(network_parameters(model)))"
                + ("; in mode='joint' the weight optimizer holds T in an extra group, so load it before wrapping." if self.mode == "joint" else ".")
            ) from error
        if self.horizon_optimizer is not None:
            self.horizon_optimizer.state.clear()
        self.stats = self._fresh_stats()
        self._set_context()
        warnings.warn(
            "CoordinateDescentStepper.load_state_dict: loaded a plain optimizer state into the weight optimizer; "
            "the horizon optimizer and stats start fresh (temporal optimization starts here).",
            UserWarning,
            stacklevel=2,
        )

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        hs = ", ".join(f"T={h.T.item():.4g}" for _, h in self._horizons)
        q = type(self.horizon_optimizer).__name__ if self.horizon_optimizer is not None else None
        return (
            f"CoordinateDescentStepper(mode={self.mode!r}, alpha={self.alpha}, optimizer={type(self.optimizer).__name__}, "
            f"horizon_optimizer={q}, horizons=[{hs}])"
        )
