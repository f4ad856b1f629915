r"""Run OT-Flow's scripts (EmoryMLIP/OT-Flow), unchanged on disk, with a learnable end time.

Usage::

    python examples/otflow_patch.py --otflow PATH [--tempopt-lr 1e-2] [--tempopt-alpha 0.1]
        [--tempopt-eps 0.1] [--tempopt-budget N] [--tempopt-off]
        -- trainToyOTflow.py <its arguments>

(likewise ``trainLargeOTflow.py`` and ``trainMnistOTflow.py``; the ``evaluate*`` scripts evaluate a
patched checkpoint at its T). ``tempopt.csv`` goes into the script's ``--save`` directory. Checked
against EmoryMLIP/OT-Flow@4d66618e2a2f4d8e8ce080cf1b3c769c78b2590d. OT-Flow has no odeint:
``OTFlowProblem(x, Phi, tspan, nt)`` takes ``nt`` classic RK4 steps of ``(tspan[1] - tspan[0]) /
nt``, the scripts hard-code ``tspan = [0, 1]``, and its field ``odefun(x, t, net, alph)`` builds
``[x, t]`` with ``pad(value=t)``, which takes a Python number only.

Patched until the patch exits, each name checked first:

``src.Phi.Phi.__init__``
    Gives the potential a submodule ``horizon`` with T0 = 1, the hard-coded end: ``net.to(prec)``
    casts T and checkpoints hold ``horizon.T``.
``src.OTFlowProblem.OTFlowProblem``
    On the span ``[0, 1]`` it integrates the same state ``[x; l; v; r]`` over ``[0, T]`` through
    the horizon and returns the same ``(Jc, [L, C, R])``. The solver is upstream's own ``stepRK4``
    scheme, ``nt`` steps, made odeint-like by :func:`torch_tempopt.contrib.final_state_solver`; the
    horizon adds :math:`dJ/dT = \langle dJ/dz(T), F(T, z(T)) \rangle` (one more evaluation). With
    ``--tempopt-budget N`` it is N rk4 steps of torchdiffeq instead (dJ/dT is then the exact
    derivative of that discrete solve); the reference, which scores the model in ``eval()`` and
    which the guard checks the steps against, is dopri5 at 1e-5 (not upstream's fixed steps),
    comparing the sample ``x`` and the log-density ``l`` only, per dimension. Other spans run
    upstream's function.
``src.OTFlowProblem.integrate``
    Sampling and plots: the span ``[0, 1]`` (``[1, 0]``) becomes ``[0, T]`` (``[T, 0]``).
``torch.optim.Adam``
    Returns Adam wrapped in a :class:`~torch_tempopt.CoordinateDescentStepper`, which takes
    ``horizon.T`` out of it: the scripts' LR drop over ``optim.param_groups`` acts on the weights
    only.

The field is :func:`odefun`, a re-implementation of upstream's ``src.OTFlowProblem.odefun`` that
takes a tensor ``t`` (upstream's ``pad(value=t)`` takes a Python number only);
``tests/test_upstream_real.py`` checks it against upstream's at float times on a real checkout.
Shims for a headless CPU, each only where needed: stubs of ``h5py`` and of the repository's
``datasets`` package (which imports h5py and pandas; only the large data sets use it), and
``matplotlib.use`` mapping TkAgg to Agg without a display.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from torch_tempopt import LearnableHorizon
from torch_tempopt.budget import DEFAULT_REFERENCE
from torch_tempopt.contrib.final_state import final_state_solver

from .runner import Patch, Upstream, importable
from .runner import main as _main

__all__ = ["COMMIT", "OTFLOW", "main", "odefun", "patched"]

COMMIT = "4d66618e2a2f4d8e8ce080cf1b3c769c78b2590d"
T0 = 1.0  # the end of the span [0, 1] that the scripts hard-code


def odefun(x: Tensor, t: Tensor | float, net: nn.Module, alph: Sequence[float]) -> Tensor:
    r"""OT-Flow's field of the state :math:`[x; l; v; r]` (eq. 2, 5, 7) at a tensor or float ``t``.

    With :math:`(\nabla\Phi, \operatorname{tr} H)` = ``net.trHess([x, t])``: :math:`\dot x =
    -\nabla_x\Phi/\alpha_0`, :math:`\dot l = -\operatorname{tr} H/\alpha_0`, :math:`\dot v = |\dot
    x|^2/2`, :math:`\dot r = |\alpha_0 \dot v - \partial_t\Phi|`.
    """
    d = x.shape[1] - 3
    grad, trace = net.trHess(
        torch.cat([x[:, :d], torch.as_tensor(t).to(x).expand(x.shape[0], 1)], dim=1)
    )
    dx = -grad[:, :d] / alph[0]
    dv = 0.5 * dx.pow(2).sum(1, keepdim=True)
    return torch.cat(
        [dx, -trace.unsqueeze(1) / alph[0], dv, (alph[0] * dv - grad[:, -1:]).abs()], dim=1
    )


def install(patch: Patch) -> None:
    """Patches an OT-Flow checkout: potential, problem, integrator, and the headless shims."""
    ot, phi = patch.load("src.OTFlowProblem"), patch.load("src.Phi")
    patch.require(ot, "OTFlowProblem", "integrate", "stepRK4", "stepRK1", "C")
    patch.require(phi, "Phi")
    patch.signature(ot.OTFlowProblem, "x, Phi, tspan, nt, stepper, alph")
    patch.signature(ot.integrate, "x, net, tspan, nt, stepper, alph, intermediates")
    patch.signature(ot.stepRK4, "odefun, z, Phi, alph, t0, t1")
    patch.signature(phi.Phi.__init__, "self, nTh, m, d")
    _headless(patch)
    init = phi.Phi.__init__

    @functools.wraps(init)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        patch.require(self, "trHess")
        self.horizon = patch.horizon(self, T0)

    patch.set(phi.Phi, "__init__", __init__)
    patch.set(ot, "OTFlowProblem", _problem(patch, ot))
    patch.set(ot, "integrate", _integrate(ot.integrate))


def _learned(net: Any, tspan: Any) -> tuple[LearnableHorizon, bool] | None:
    """``net``'s horizon and whether ``tspan`` runs backwards, if it is the fixed ``[0, 1]``."""
    horizon = getattr(net, "horizon", None)
    try:
        a, b = (float(v) for v in tspan)
    except (TypeError, ValueError):
        return None
    return (
        (horizon, a > b) if isinstance(horizon, LearnableHorizon) and {a, b} == {0.0, T0} else None
    )


def _problem(patch: Patch, ot: Any) -> Callable[..., Any]:
    original = ot.OTFlowProblem

    @functools.wraps(original)
    def OTFlowProblem(
        x: Tensor,
        Phi: nn.Module,
        tspan: Any,
        nt: int,
        stepper: str = "rk4",
        alph: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> tuple[Tensor, list[Tensor]]:
        found = _learned(Phi, tspan)
        if found is None or found[1]:
            return original(x, Phi, tspan, nt, stepper=stepper, alph=alph)
        horizon = found[0]
        field = patch.count(horizon, lambda t, z: odefun(z, t, Phi, alph))
        z0 = torch.cat([x, x.new_zeros(x.shape[0], 3)], dim=1)
        if horizon.budget is None:
            solver = final_state_solver(
                _scheme(ot),
                signature="y0, func, t0, t1",
                field="y, t",
                nt=nt,
                stepper=stepper,
                net=Phi,
                alph=alph,
            )
            z = horizon(field, z0, solver=solver)[-1]
        else:
            # N rk4 steps in training; in eval() and the guard's checks the reference, dopri5
            # at 1e-5
            z = horizon(field, z0, **DEFAULT_REFERENCE)[-1]
        costs = [z[:, -2].mean(), ot.C(z).mean(), z[:, -1].mean()]
        return sum(c * a for c, a in zip(costs, alph)), costs

    return OTFlowProblem


def _scheme(ot: Any) -> Callable[..., Tensor]:
    """OT-Flow's fixed steps (``stepRK4``, ``stepRK1``) from t0 to t1: a final-state integrator."""

    def integrate(
        z: Tensor,
        func: Callable[..., Tensor],
        t0: Tensor,
        t1: Tensor,
        *,
        nt: int,
        stepper: str,
        net: nn.Module,
        alph: Sequence[float],
    ) -> Tensor:
        step = ot.stepRK4 if stepper == "rk4" else ot.stepRK1
        z, tk, h = z.clone(), float(t0), (float(t1) - float(t0)) / nt  # stepRK1 updates z in place
        for _ in range(nt):
            z = step(func, z, net, alph, tk, tk + h)
            tk += h
        return z

    return integrate


def _integrate(original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    @functools.wraps(original)
    def integrate(
        x: Tensor,
        net: nn.Module,
        tspan: Any,
        nt: int,
        stepper: str = "rk4",
        alph: Sequence[float] = (1.0, 1.0, 1.0),
        intermediates: bool = False,
    ) -> Tensor:
        found = _learned(net, tspan)
        if found is not None:
            T = found[0].T.item()
            tspan = [T, 0.0] if found[1] else [0.0, T]
        return original(x, net, tspan, nt, stepper=stepper, alph=alph, intermediates=intermediates)

    return integrate


def _headless(patch: Patch) -> None:
    missing = [m for m in ("h5py", "pandas") if not importable(m)]
    if "h5py" in missing:
        patch.stub("h5py")
    if missing:
        patch.stub("datasets")
    if importable("matplotlib") and not os.environ.get("DISPLAY"):
        import matplotlib

        use = matplotlib.use
        patch.set(
            matplotlib,
            "use",
            functools.wraps(use)(
                lambda backend, *args, **kwargs: use(
                    "Agg" if str(backend).lower() == "tkagg" else backend, *args, **kwargs
                )
            ),
        )


#: The specification: the scripts, their ``--save`` defaults and optimizer classes.
OTFLOW = Upstream(
    name="otflow",
    repo="EmoryMLIP/OT-Flow",
    commit=COMMIT,
    marker="src/OTFlowProblem.py",
    install=install,
    # [x, l, v, r] in one tensor: the guard compares the sample and the log-density
    select=lambda z: (z[..., :-3], z[..., -3:-2]),
    scripts={
        "trainToyOTflow.py": ("experiments/cnf/toy", ("torch.optim.Adam",)),
        "trainLargeOTflow.py": ("experiments/cnf/large", ("torch.optim.Adam",)),
        "trainMnistOTflow.py": ("experiments/cnf/large", ("torch.optim.Adam",)),
        "evaluateToyOTflow.py": ("image/", ()),
        "evaluateLargeOTflow.py": ("experiments/cnf/large", ()),
    },
)
patched = functools.partial(Patch, OTFLOW)
main = functools.partial(_main, OTFLOW)
