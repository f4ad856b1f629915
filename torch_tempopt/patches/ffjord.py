r"""Run FFJORD's scripts (rtqichen/ffjord), unchanged on disk, with a learnable end time per block.

Usage::

    python examples/ffjord_patch.py --ffjord PATH [--tempopt-lr 1e-2] [--tempopt-alpha 0.1]
        [--tempopt-eps 0.1] [--tempopt-budget N] [--tempopt-off] [--tempopt-skip-trajectory]
        -- train_toy.py <its arguments>

(likewise ``train_cnf.py`` and ``train_tabular.py``). The script runs in the checkout, so give it
an absolute ``--save``; ``tempopt.csv`` goes there. Checked against
rtqichen/ffjord@994864ad0517db3549717c25170f9b71e96788b1 with python 3.11, torch 2.13, torchdiffeq
0.2.5, numpy 2 and matplotlib 3.11. Upstream's ``--train_T`` never trains T: ``CNF.forward`` builds
its grid with ``torch.tensor([0.0, sqrt_end_time**2])``, which cuts T out of the graph. This patch
makes T learn.

Patched until the patch exits, each name checked first:

``lib.layers.cnf.CNF.__init__``
    Gives each block ``self.horizon``, a :class:`~torch_tempopt.LearnableHorizon` with T0 =
    ``sqrt_end_time**2``, outside the module tree (the state dict keeps upstream's keys).
    ``sqrt_end_time``, a parameter under ``--train_T True``, becomes a buffer that mirrors T after
    every step, so upstream's ``CNF Time`` log and its checkpoints show the learned T, and
    ``load_state_dict`` (``--resume``) reads T back from it. On a budget the block's state dict
    also holds ``tempopt_budget`` and ``tempopt_placement`` (a grown budget and a fitted placement
    survive ``--resume``; an unpatched checkpoint loads without them). The horizon follows its
    block's ``train()``/``eval()``: upstream's validation is scored with the adaptive reference,
    not the budget.
``lib.layers.cnf.odeint``
    Upstream's forward calls ``odeint(self.odefunc, state, [0, T], **settings)`` (``[T, 0]``
    reversed); such a call becomes ``self.horizon(self.odefunc, state, solver=odeint, reverse=...,
    **settings)``, which returns the same ``[y(t0), y(T)]``, so upstream's next line ``state_t =
    tuple(s[1] for s in state_t)`` runs unchanged. The horizon adds :math:`dL/dT = \langle
    dL/dy(T), F(T, y(T)) \rangle` (one evaluation of the field, in the backward pass). Other grids
    (``save_trajectory``'s) go to upstream's odeint. Per-state tolerance lists (RNODE's) get scalar
    adjoint tolerances, which torchdiffeq >= 0.1 needs for the larger adjoint state.
``torch.optim.Adam`` (``train_tabular.py``: ``lib.custom_optimizers.Adam``)
    Returns the optimizer wrapped in a :class:`~torch_tempopt.CoordinateDescentStepper`, whose
    ``param_groups`` and ``state`` are the weights', so ``update_lr`` warm-up,
    ``clip_grad_norm_(model.parameters())`` and checkpoints work and never touch T.

Shims for today's stack, each only where needed: a ``six`` stub (``train_misc.py``), matplotlib's
removed ``cm.get_cmap`` and ``Axes.set_axis_bgcolor`` (the toy plots), a no-op
``trajectory_to_video`` without ffmpeg, and ``numpy.mean`` over a list of CUDA tensors
(``train_cnf.py``'s validation on a GPU), and, for ``train_cnf.py`` where torchvision cannot be
imported (PyPI's wheels pair with torch's CUDA build), the parts of torchvision it uses from
:mod:`torch_tempopt.patches.torchvision_cpu` (an IDX reader for MNIST, area ``Resize``, PNG
``save_image``; upstream's log says so).
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy
import torch
from torch import nn

from .runner import Patch, Upstream, importable
from .runner import main as _main

__all__ = ["COMMIT", "FFJORD", "install_cnf", "main", "patched"]

COMMIT = "994864ad0517db3549717c25170f9b71e96788b1"
_KEY = "_tempopt_cnf"  # on a block's odefunc: the block, for the routed odeint
_BUDGET = ("tempopt_budget", "tempopt_placement")  # a budgeted block's extra state-dict keys


def install_cnf(patch: Patch, forward: str) -> None:
    """Patches ``lib.layers.cnf`` (FFJORD's, RNODE's): a horizon per block, odeint routed to it."""
    cnf = patch.load("lib.layers.cnf")
    patch.require(cnf, "CNF", "odeint")
    patch.signature(
        cnf.CNF.__init__, "self, odefunc, T, train_T, regularization_fns, solver, atol, rtol"
    )
    patch.signature(cnf.CNF.forward, forward)
    if not importable("six"):
        patch.stub("six", iteritems=lambda d, **kw: iter(d.items(**kw)))
    patch.set(cnf.CNF, "__init__", _init(patch, cnf.CNF.__init__))
    patch.set(cnf, "odeint", _route(patch, cnf.odeint))


def _init(patch: Patch, init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        patch.require(self, "sqrt_end_time", "odefunc")
        s = self.sqrt_end_time.detach().clone()
        # --train_T True: a parameter that upstream never trains
        self._parameters.pop("sqrt_end_time", None)
        self.register_buffer("sqrt_end_time", s)
        horizon = patch.horizon(self, float(s) ** 2)
        vars(self)["horizon"] = (
            horizon  # outside the module tree: upstream's parameters and state-dict keys
        )
        vars(self.odefunc)[_KEY] = self  # (DataParallel's replicas copy it)
        self.register_load_state_dict_post_hook(_read_T)
        if horizon.budget is not None:  # checkpoints keep the budget and its placement too
            self.register_state_dict_post_hook(_save_budget)
            self.register_load_state_dict_pre_hook(_load_budget)
        patch.after_step.append(functools.partial(_write_T, self))

    return __init__


def _write_T(cnf: nn.Module) -> None:
    cnf.sqrt_end_time.copy_(cnf.horizon.T.detach().sqrt())


def _read_T(cnf: nn.Module, incompatible_keys: Any) -> None:
    with torch.no_grad():
        cnf.horizon.T.fill_(float(cnf.sqrt_end_time) ** 2)


def _save_budget(cnf: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    state[prefix + _BUDGET[0]] = cnf.horizon.budget.n_steps.detach().clone()
    state[prefix + _BUDGET[1]] = cnf.horizon.budget.placement.detach().clone()


def _load_budget(cnf: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Reads the budget and placement back (an unpatched or unbudgeted checkpoint has neither)."""
    n, placement = (state.pop(prefix + key, None) for key in _BUDGET)
    if n is not None and placement is not None:
        with torch.no_grad():
            cnf.horizon.budget.placement.copy_(placement)
            cnf.horizon.budget.n_steps.copy_(n)


def _route(patch: Patch, odeint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(odeint)
    def routed(func: Any, y0: Any, t: torch.Tensor, **kwargs: Any) -> Any:
        cnf = vars(func).get(_KEY) if isinstance(func, nn.Module) else None
        if cnf is None or not _spans(t, cnf):
            return odeint(func, y0, t, **kwargs)
        # RNODE's per-state tolerances: scalars for the adjoint
        if isinstance(kwargs.get("rtol"), (list, tuple)):
            kwargs = {
                "adjoint_rtol": kwargs["rtol"][0],
                "adjoint_atol": kwargs["atol"][0],
                **kwargs,
            }
        # outside the module tree: it follows its block's mode
        # on a budget, upstream's adaptive settings (in eval its test's) are the reference
        horizon = cnf.horizon.train(cnf.training)
        return horizon(
            patch.count(horizon, func), y0, solver=odeint, reverse=bool(t[0] > t[-1]), **kwargs
        )

    return routed


def _spans(t: torch.Tensor, cnf: nn.Module) -> bool:
    """Whether ``t`` is the grid ``[0, sqrt_end_time**2]`` (or reversed) of upstream's forward."""
    if len(t) != 2:
        return False
    lo, hi = sorted(t.detach().tolist())
    return lo == 0.0 and math.isclose(hi, float(cnf.sqrt_end_time) ** 2, rel_tol=1e-6)


def install(patch: Patch) -> None:
    """Patches an FFJORD checkout: the CNF blocks, and the shims its scripts need."""
    install_cnf(patch, "self, z, logpz, integration_times, reverse")
    _matplotlib(patch)
    script = Path(patch.script or "").name
    skip = patch.flags.get("skip_trajectory", False)
    if script == "train_toy.py" and (skip or shutil.which("ffmpeg") is None):
        viz = patch.load("diagnostics.viz_toy")
        patch.require(viz, "save_trajectory", "trajectory_to_video")
        if skip:
            patch.set(viz, "save_trajectory", _skipped)
        patch.set(viz, "trajectory_to_video", _nothing)
    # its validation: np.mean over CUDA tensors
    if script == "train_cnf.py" and torch.cuda.is_available():
        patch.set(numpy, "mean", _cpu_mean(numpy.mean))
    # PyPI's torchvision with a CPU-only torch
    if script == "train_cnf.py" and not _torchvision_imports():
        from . import torchvision_cpu

        for name, module in torchvision_cpu.modules().items():
            patch.provide(name, module)


def _torchvision_imports() -> bool:
    """Whether torchvision imports (PyPI's wheel beside a CPU torch is found but fails to)."""
    if not importable("torchvision"):
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # its compiled parts belong to another torch build
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        return False
    return True


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _skipped(*args: Any, **kwargs: Any) -> None:
    """``save_trajectory`` under ``--tempopt-skip-trajectory`` (after "Plotting trajectory")."""
    logging.getLogger().info("ffjord_patch: --tempopt-skip-trajectory: no trajectory was plotted.")


def _matplotlib(patch: Patch) -> None:
    """For the toy plots: ``cm.get_cmap`` (gone in matplotlib 3.9), ``Axes.set_axis_bgcolor``."""
    if not importable("matplotlib"):
        return
    import matplotlib.axes
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        patch.set(matplotlib.cm, "get_cmap", _get_cmap)
    if not hasattr(matplotlib.axes.Axes, "set_axis_bgcolor"):
        patch.set(matplotlib.axes.Axes, "set_axis_bgcolor", matplotlib.axes.Axes.set_facecolor)


def _get_cmap(name: Any = None, lut: int | None = None) -> Any:
    import matplotlib

    cmap = matplotlib.colormaps.get_cmap(name)
    return cmap if lut is None else cmap.resampled(lut)


def _cpu_mean(mean: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(mean)
    def cpu_mean(a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, list) and a and all(isinstance(x, torch.Tensor) for x in a):
            a = [x.detach().cpu() for x in a]
        return mean(a, *args, **kwargs)

    return cpu_mean


#: The specification: three scripts, each with its ``--save`` default and its optimizer class.
FFJORD = Upstream(
    name="ffjord",
    repo="rtqichen/ffjord",
    commit=COMMIT,
    marker="lib/layers/cnf.py",
    install=install,
    scripts={
        "train_toy.py": ("experiments/cnf", ("torch.optim.Adam",)),
        "train_cnf.py": ("experiments/cnf", ("torch.optim.Adam",)),
        "train_tabular.py": ("experiments/cnf", ("lib.custom_optimizers.Adam",)),
    },
    flags={
        "skip_trajectory": "train_toy.py: skip its final save_trajectory and video "
        "(101 frames, minutes on a CPU)"
    },
)
patched = functools.partial(Patch, FFJORD)
main = functools.partial(_main, FFJORD)
