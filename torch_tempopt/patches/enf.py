r"""Run E-NF's DW-4/LJ-13 script (vgsatorras/en_flows), unchanged on disk, through a horizon.

E-NF is E(n) Equivariant Normalizing Flows (Satorras et al., 2021).

Usage::

    python examples/enf_patch.py --enf PATH [--tempopt-budget N | --tempopt-off] [--tempopt-*]
        -- main_dw4_lj13.py --data dw4 --model egnn_dynamics ... [--save DIR]

The script runs in the checkout; ``tempopt.csv`` goes into ``--save`` (its parser ignores the
option; default ``outputs/tempopt`` in the checkout). Checked against
vgsatorras/en_flows@2fd18bf1db59184e6bdb9709fc3c02fa85fafec2 with python 3.11, torch 2.13,
torchdiffeq 0.2.5 and numpy 2.

Patched until the patch exits, each name checked first:

``flows.ffjord.FFJORD.__init__``
    Gives each flow a :class:`~torch_tempopt.LearnableHorizon` with T0 = ``int_time[-1]`` (1),
    outside the module tree (upstream's parameters and state-dict keys). After every step T is
    mirrored into ``int_time[-1]`` and ``inv_int_time[0]``, so ``reverse`` (sampling) integrates
    the learned T.
``flows.ffjord.odeint``
    (``torchdiffeq.odeint_adjoint``) ``FFJORD.forward`` calls ``odeint(self.odefunc, (x, ldj, reg),
    self.int_time, method, rtol, atol)``; that call goes to ``horizon(odefunc, state,
    solver=odeint, ...)``, which returns the same ``[y(0), y(T)]`` per part, so ``zt[-1]`` runs
    unchanged. On a budget the call's adaptive settings (dopri5 at 1e-4 in training) become the
    reference. E-NF never calls ``flow.eval()``: its ``test()`` runs in train mode under
    ``torch.no_grad()``; so the horizon trains on the budget only with gradients on, and ``test()``
    gets the reference, i.e. upstream's own test solve (dopri5 at ``flow.rtol``/``atol``, exact
    trace).
``torch.optim.AdamW``
    Returns AdamW wrapped in a :class:`~torch_tempopt.CoordinateDescentStepper` (its guard on a
    budget).

Shim: a no-op ``wandb`` stub (``init``, ``save``, ``log``), unless ``--tempopt-keep-wandb``. DW-4's
data file ``dw4_experiment/data/dw4-dataidx.npy`` (a pickled object array ``[data, idx]``, ``data``
a float32 torch tensor of shape (N, 8); E-NF trains on the first ``--n_data``, validates and tests
on the last 2 x 1000) is in upstream's git tree but may be absent from a copy; ``python -m
benchmarks.enf_dw4 DIR`` (in this project's source tree) writes one from the project's
parallel-tempering reference.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from torch_tempopt import LearnableHorizon

from .runner import Patch, Upstream, importable
from .runner import main as _main

__all__ = ["COMMIT", "ENF", "main", "patched"]

COMMIT = "2fd18bf1db59184e6bdb9709fc3c02fa85fafec2"
_KEY = "_tempopt_flow"  # on a flow's odefunc: the flow, for the routed odeint


def install(patch: Patch) -> None:
    """Patches an E-NF checkout: the FFJORD flow's constructor and odeint, and the wandb stub."""
    ffjord = patch.load("flows.ffjord")
    patch.require(ffjord, "FFJORD", "ODEfunc", "odeint")
    patch.require(ffjord.FFJORD, "forward", "set_integration_time", "set_odeint", "atol", "rtol")
    patch.signature(
        ffjord.FFJORD.__init__, "self, dynamics, trace_method, ode_regularization, hutch_noise"
    )
    patch.signature(ffjord.ODEfunc.forward, "self, t, state")
    if not patch.flags.get("keep_wandb") or not importable("wandb"):
        patch.stub("wandb", init=_nothing, save=_nothing, log=_nothing)
    patch.set(ffjord.FFJORD, "__init__", _init(patch, ffjord.FFJORD.__init__))
    patch.set(ffjord, "odeint", _route(patch, ffjord.odeint))


def _init(patch: Patch, init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        patch.require(self, "int_time", "inv_int_time", "odefunc")
        if self.int_time.tolist()[0] != 0.0 or len(self.int_time) != 2:
            raise patch.error(f"FFJORD.int_time is {self.int_time.tolist()}, expected [0, T]")
        # outside the module tree
        vars(self)["horizon"] = patch.horizon(self, float(self.int_time[-1]))
        vars(self.odefunc)[_KEY] = self
        vars(self).update(_tempopt_clock=None, _tempopt_cpu=0.0, _tempopt_steps=0, _tempopt_said=0)
        patch.after_step.append(functools.partial(_write_T, self))

    return __init__


@torch.no_grad()
def _write_T(flow: nn.Module) -> None:
    """After a step: T into upstream's grids, and the step's CPU time since its forward solve."""
    if flow._tempopt_clock is not None:
        flow._tempopt_cpu += time.process_time() - flow._tempopt_clock
        flow._tempopt_clock, flow._tempopt_steps = None, flow._tempopt_steps + 1
    if len(flow.int_time) == 2:
        flow.int_time[-1] = flow.horizon.T.detach()
        flow.inv_int_time[0] = flow.horizon.T.detach()


def _route(patch: Patch, odeint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(odeint)
    def routed(func: Any, y0: Any, t: torch.Tensor, **kwargs: Any) -> Any:
        flow = vars(func).get(_KEY) if isinstance(func, nn.Module) else None
        if flow is None or not (
            t is flow.int_time or (len(t) == 2 and torch.equal(t, flow.int_time))
        ):
            # other grids (reverse_chain's), other fields (reverse's dynamics)
            return odeint(func, y0, t, **kwargs)
        # E-NF's test() runs in train mode under no_grad: the budget only where upstream trains
        training = flow.training and torch.is_grad_enabled()
        horizon: LearnableHorizon = flow.horizon.train(training)
        if training and flow._tempopt_clock is None:
            flow._tempopt_clock = time.process_time()
        # the first test solve after training
        elif not training and flow._tempopt_said != flow._tempopt_steps:
            flow._tempopt_said = flow._tempopt_steps
            guard = getattr(patch.stepper, "guard", None)
            checks = (
                f", budget {horizon.budget}, guard {guard.stats['checks']} checks "
                f"{guard.stats['nfe']} NFE"
                if guard
                else ""
            )
            print(
                f"enf_patch.py: {flow._tempopt_steps} training steps, {flow._tempopt_cpu:.1f} "
                f"CPU s in them (forward, backward, step; T = {horizon.T.item():.4f}{checks})",
                file=sys.stderr,
                flush=True,
            )
        # on a budget, the call's adaptive settings (training's or test's) are the reference
        return horizon(patch.count(horizon, func), y0, solver=odeint, **kwargs)

    return routed


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


#: The specification: the DW-4/LJ-13 script, its ``--save`` default and its optimizer class.
ENF = Upstream(
    name="enf",
    repo="vgsatorras/en_flows",
    commit=COMMIT,
    marker="flows/ffjord.py",
    install=install,
    scripts={"main_dw4_lj13.py": ("outputs/tempopt", ("torch.optim.AdamW",))},
    flags={"keep_wandb": "use the installed wandb (default: a no-op stub, so runs stay offline)"},
)
patched = functools.partial(Patch, ENF)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line ``enf_patch.py [--tempopt-seed S] --enf PATH [...] -- SCRIPT ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    if "--tempopt-write-dw4" in argv[:cut]:
        raise SystemExit(
            "enf_patch.py: --tempopt-write-dw4 moved to the benchmarks: python -m "
            "benchmarks.enf_dw4 DIR [--samples N] [--seed S], in this project's source tree."
        )
    parser = argparse.ArgumentParser(prog="enf_patch.py", add_help=False)
    parser.add_argument(
        "--tempopt-seed",
        type=int,
        default=None,
        metavar="S",
        help="seed torch, numpy and random before the script (E-NF seeds nothing)",
    )
    ns, rest = parser.parse_known_args(argv[:cut])
    if ns.tempopt_seed is not None:
        torch.manual_seed(ns.tempopt_seed)
        np.random.seed(ns.tempopt_seed)
        random.seed(ns.tempopt_seed)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
    return _main(ENF, rest + argv[cut:])
