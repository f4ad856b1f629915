r"""Run OT-Flow (EmoryMLIP/OT-Flow) with a learnable end time T, without editing it.

Usage::

    python examples/otflow_patch.py --otflow PATH [--tempopt-lr 1e-2 --tempopt-alpha 0.1 \
        --tempopt-eps 0.1 --tempopt-T0 1.0 --tempopt-mechanism direct --tempopt-off] \
        -- trainToyOTflow.py <upstream args>

(likewise ``trainLargeOTflow.py``, ``trainMnistOTflow.py`` and the ``evaluate*`` scripts,
whose checkpoints then carry T). ``tempopt.csv`` goes into the script's ``--save`` directory.

OT-Flow has no ``odeint``: ``OTFlowProblem(x, Phi, tspan, nt, stepper, alph)`` integrates
its own fixed-step RK4 with ``nt`` steps of ``h = (tspan[1] - tspan[0]) / nt``, and the
training scripts hard-code ``tspan = [0, 1]`` (``trainToyOTflow.py:81``). Its field
``odefun(x, t, net, alph)`` builds the space-time input with ``pad(..., value=t)``,
which takes a Python float only: a tensor T raises ``TypeError`` (OTFlowProblem.py:176).

Verified on EmoryMLIP/OT-Flow commit 4d66618e (2023-03-08). Every patched name is
checked, with its parameters, before anything is patched; a checkout that does not
match stops with :class:`OTFlowLayoutError` naming what is missing.

What is patched, and why (all undone when :func:`patched` exits):

``src.Phi.Phi.__init__`` (wrapped)
    Gives the potential network a :class:`~torch_tempopt.LearnableHorizon` submodule
    ``horizon`` (T0 = ``--tempopt-T0``, default 1.0, the hard-coded end), so ``net.to(prec)``
    casts T and checkpoints (``state_dict``) carry it under ``horizon.T``.
``src.OTFlowProblem.OTFlowProblem``
    When called with the hard-coded span ``[t0, T0]`` and gradients on (training), it
    integrates the same state ``[x; l; v; r]`` (zeros appended) over ``[t0, T]`` through the
    horizon, with :func:`fixed_step_solver` (``nt`` RK4 or Euler steps, OT-Flow's scheme),
    and returns the same ``(Jc, [L, C, R])``. ``mechanism="direct"`` (default) calls
    upstream's ``odefun`` at Python-float times and adds
    :math:`dJ/dT = \langle dJ/dz(T), F(T, z(T)) \rangle` (one extra evaluation);
    ``"rescale"`` integrates :math:`s \in [0, 1]` with the field :math:`T F(sT, z)`, which is
    OT-Flow's own discretisation, so dJ/dT is the exact gradient of the discrete
    objective; it needs a tensor ``t`` in the field, so it uses :func:`odefun_tensor_t`, our
    tensor-safe version of ``odefun``. Without gradients (validation) or with another
    span it calls upstream's function, with the learned T as a float.
``src.OTFlowProblem.integrate``
    Sampling and plots: a span ``[t0, T0]`` or ``[T0, t0]`` becomes ``[t0, T]`` / ``[T, t0]``
    (floats); upstream's function does the rest.
``torch.optim.Adam``
    Replaced by a factory that builds Adam over the network's weights (not T) and wraps it
    in a :class:`~torch_tempopt.CoordinateDescentStepper`; the scripts' LR drop loops over
    its ``param_groups``, i.e. over the weights only.

Runtime shims for a headless CPU (each only where needed): ``sys.modules['h5py']`` (a stub,
if not installed) and the repository's ``datasets`` package (a stub, if pandas or h5py is
missing: ``src/plotter.py:14-15`` imports both, only the large data sets use them);
``matplotlib.use`` mapping ``'TkAgg'`` to ``'Agg'`` without a display (``src/plotter.py:2-4``);
``torch.load`` with ``argparse.Namespace`` as for FFJORD.

The adapter :func:`fixed_step_solver` has odeint's signature ``solver(func, y0, t, *, nt,
stepper)``: a thin wrapper of :func:`torch_tempopt.solvers.fixed_grid_solver` that hands
detached times to OT-Flow's field as Python floats.

References:
    | OT-Flow: Fast and Accurate Continuous Normalizing Flows via Optimal Transport (Onken et al., 2021)
    | https://github.com/EmoryMLIP/OT-Flow
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import math
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

if __package__ in (None, ""):  # run as a file: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor

from examples._upstream_common import (
    Patcher,
    PatchSession,
    Registry,
    TempoptConfigError,
    TempoptOptions,
    UpstreamLayoutError,
    add_tempopt_arguments,
    apply_stack_shims,
    checkout_commit,
    import_upstream,
    isolated_process,
    layout_error,
    optimizer_factory,
    require_attrs,
    require_params,
    split_cli,
)
from torch_tempopt.solvers import fixed_grid_solver

__all__ = [
    "MECHANISMS",
    "OTFlowLayoutError",
    "SCRIPTS",
    "VERIFIED_COMMIT",
    "fixed_step_solver",
    "main",
    "odefun_tensor_t",
    "patched",
]

#: The upstream commit the patch was checked against.
VERIFIED_COMMIT = "4d66618e2a2f4d8e8ce080cf1b3c769c78b2590d"

#: Per known script: its ``--save`` default (all build ``torch.optim.Adam``).
SCRIPTS: dict[str, str] = {
    "trainToyOTflow.py": "experiments/cnf/toy",
    "trainLargeOTflow.py": "experiments/cnf/large",
    "trainMnistOTflow.py": "experiments/cnf/large",
    "evaluateToyOTflow.py": "image/",
    "evaluateLargeOTflow.py": "experiments/cnf/large",
}

#: How the horizon makes T differentiable here (see the module docstring).
MECHANISMS = ("direct", "rescale")

PROBLEM_PARAMS = ("x", "Phi", "tspan", "nt", "stepper", "alph")
INTEGRATE_PARAMS = ("x", "net", "tspan", "nt", "stepper", "alph", "intermediates")
ODEFUN_PARAMS = ("x", "t", "net", "alph")
PHI_INIT = ("self", "nTh", "m", "d")


class OTFlowLayoutError(UpstreamLayoutError):
    """The OT-Flow checkout lacks a name or signature the patch relies on."""


def _error(checkout: Path) -> Callable[[str], UpstreamLayoutError]:
    return layout_error(OTFlowLayoutError, "otflow_patch", f"EmoryMLIP/OT-Flow@{VERIFIED_COMMIT[:8]}", checkout)


# ----------------------------------------------------------------------------------------------- the adapter
def fixed_step_solver(
    func: Callable[[Any, Tensor], Tensor], y0: Tensor, t: Tensor, *, nt: int, stepper: str = "rk4", **unused: Any
) -> Tensor:
    r"""Integrates ``func(t, y)`` with OT-Flow's fixed-step scheme, with odeint's signature.

    Between consecutive times of ``t`` it takes ``nt`` steps of ``h = (t_{i+1} - t_i) / nt``
    (so the step shrinks and grows with the interval; the count is fixed), RK4 or Euler.
    Times that do not require gradients are handed to ``func`` as Python floats, as OT-Flow does.

    Arguments:
        func: The field ``func(t, y)``.
        y0: The initial state, a floating tensor.
        t: The times, a 1-D tensor of two or more entries.
        nt: The number of steps per interval, >= 1.
        stepper: ``"rk4"`` or ``"rk1"`` (Euler).
        unused: Solver options of other backends (``rtol``, ``atol``, ...), ignored.

    Returns:
        The solution at every time of ``t``, stacked along a new leading dimension.

    Raises:
        TypeError: If ``y0`` is not a floating tensor or ``nt`` not an int.
        ValueError: If ``nt < 1``, ``stepper`` is unknown or ``t`` has fewer than two times.

    Example:
        >>> import torch
        >>> y = fixed_step_solver(lambda t, y: -y, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 1.0]), nt=8)
        >>> round(y[-1].item(), 6)  # RK4 with h = 1/8: (1 - h + h^2/2 - h^3/6 + h^4/24)^8 = 0.3678803; exp(-1) = 0.3678794
        0.36788

    """
    if not isinstance(y0, Tensor) or not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor (OT-Flow's state [x; l; v; r]), got {type(y0).__name__}.")
    if isinstance(nt, bool) or not isinstance(nt, int):
        raise TypeError(f"nt must be an int (the number of steps), got {nt!r}.")
    if nt < 1:
        raise ValueError(f"nt must be >= 1, got nt={nt}.")
    if stepper not in ("rk4", "rk1"):
        raise ValueError(f"stepper must be 'rk4' or 'rk1', got {stepper!r}.")
    if t.dim() != 1 or t.shape[0] < 2:
        raise ValueError(f"t must be a 1-D tensor of at least two times, got shape {tuple(t.shape)}.")
    solve = fixed_grid_solver("rk4" if stepper == "rk4" else "euler", nt=nt)

    def field(s: Tensor, y: Tensor) -> Tensor:  # OT-Flow's odefun pads [x, t] with a float t
        return func(s if s.requires_grad else s.item(), y)

    return solve(field, y0, t)


def odefun_tensor_t(x: Tensor, t: Any, net: Any, alph: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    r"""OT-Flow's field for the state :math:`[x; l; v; r]`, accepting a tensor ``t`` (kept in the graph).

    Our own implementation of the equations of OT-Flow's ``odefun`` (eq. 2, 5, 7 of the
    paper): with :math:`(\nabla\Phi, \operatorname{tr} H) = ` ``net.trHess([x, t])``,
    :math:`\dot x = -\nabla_x\Phi/\alpha_0`, :math:`\dot l = -\operatorname{tr} H/\alpha_0`,
    :math:`\dot v = |\dot x|^2/2`, :math:`\dot r = |-\partial_t\Phi + \alpha_0 \dot v|`.
    Upstream's builds ``[x, t]`` with ``pad(value=t)``, which needs a float.
    """
    nex, d_extra = x.shape
    d = d_extra - 3
    tcol = t.to(x).expand(nex, 1) if isinstance(t, Tensor) else x.new_full((nex, 1), float(t))
    grad_phi, tr_h = net.trHess(torch.cat([x[:, :d], tcol], dim=1))
    dx = -(1.0 / alph[0]) * grad_phi[:, :d]
    dl = -(1.0 / alph[0]) * tr_h.unsqueeze(1)
    dv = 0.5 * torch.sum(dx.pow(2), 1, keepdim=True)
    dr = torch.abs(-grad_phi[:, -1].unsqueeze(1) + alph[0] * dv)
    return torch.cat((dx, dl, dv, dr), 1)


def _as_float(t: Any) -> float:
    return t if isinstance(t, float) else float(t.detach()) if isinstance(t, Tensor) else float(t)


def _span(tspan: Any) -> tuple[float, float] | None:
    try:
        a, b = (_as_float(v) for v in tspan)
    except (TypeError, ValueError):
        return None
    return a, b


# ----------------------------------------------------------------------------------------------- patches
def _patch(ot_module: Any, phi_module: Any, registry: Registry, patcher: Patcher, T0: float, mechanism: str, error: Callable[[str], Exception]) -> None:
    Phi = phi_module.Phi
    original_init = Phi.__init__
    original_problem, original_integrate = ot_module.OTFlowProblem, ot_module.integrate

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        require_attrs(self, ("trHess", "alph", "d"), "src.Phi.Phi (after __init__)", error)
        block = registry.add(self, T0, f"Phi network {len(registry.blocks)}")
        self.horizon = block.horizon

    def learned(net: Any, tspan: Any) -> tuple[Any, bool] | None:
        """The block of ``net`` and whether ``tspan`` is the reversed default span, if it is a default span."""
        block = registry.block_of(net)
        span = _span(tspan)
        if block is None or span is None:
            return None
        t0, T_init = float(block.horizon.t0_init), float(block.horizon.T_init)
        if math.isclose(span[0], t0, abs_tol=1e-12) and math.isclose(span[1], T_init, rel_tol=1e-12):
            return block, False
        if math.isclose(span[1], t0, abs_tol=1e-12) and math.isclose(span[0], T_init, rel_tol=1e-12):
            return block, True
        return None

    @functools.wraps(original_problem)
    def OTFlowProblem(x: Tensor, Phi: Any, tspan: Any, nt: int, stepper: str = "rk4", alph: Any = (1.0, 1.0, 1.0)) -> Any:
        found = learned(Phi, tspan)
        if found is None or found[1]:
            return original_problem(x, Phi, tspan, nt, stepper=stepper, alph=alph)
        block = found[0]
        horizon = block.horizon
        if not torch.is_grad_enabled():
            return original_problem(x, Phi, [float(horizon.t0), horizon.T.item()], nt, stepper=stepper, alph=alph)
        registry.check_wired(block, True)
        if mechanism == "rescale":

            def field(t: Any, z: Tensor) -> Tensor:
                return odefun_tensor_t(z, t, Phi, alph=alph)
        else:

            def field(t: Any, z: Tensor) -> Tensor:
                return ot_module.odefun(z, _as_float(t), Phi, alph=alph)

        z0 = torch.cat([x, x.new_zeros(x.shape[0], 3)], dim=1)
        z = horizon(registry.counting(block, field), z0, solver=fixed_step_solver, mechanism=mechanism, nt=nt, stepper=stepper)
        costs = [torch.mean(z[:, -2]), torch.mean(ot_module.C(z)), torch.mean(z[:, -1])]
        return sum(c * a for c, a in zip(costs, alph)), costs

    @functools.wraps(original_integrate)
    def integrate(
        x: Tensor, net: Any, tspan: Any, nt: int, stepper: str = "rk4", alph: Any = (1.0, 1.0, 1.0), intermediates: bool = False
    ) -> Any:
        found = learned(net, tspan)
        if found is not None:
            horizon = found[0].horizon
            t0, T = float(horizon.t0), horizon.T.item()
            tspan = [T, t0] if found[1] else [t0, T]
        return original_integrate(x, net, tspan, nt, stepper=stepper, alph=alph, intermediates=intermediates)

    patcher.setattr(Phi, "__init__", __init__, "src.Phi.Phi.__init__")
    patcher.setattr(ot_module, "OTFlowProblem", OTFlowProblem, "src.OTFlowProblem.OTFlowProblem")
    patcher.setattr(ot_module, "integrate", integrate, "src.OTFlowProblem.integrate")


def _headless_shims(patcher: Patcher) -> None:
    def stub(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        return module

    if importlib.util.find_spec("h5py") is None:
        patcher.set_module("h5py", stub("h5py"), "sys.modules['h5py'] (stub)")
    if importlib.util.find_spec("pandas") is None or importlib.util.find_spec("h5py") is None:
        patcher.set_module("datasets", stub("datasets"), "sys.modules['datasets'] (stub of the repository's package)")
    if importlib.util.find_spec("matplotlib") is not None and not os.environ.get("DISPLAY"):
        import matplotlib

        use = matplotlib.use

        @functools.wraps(use)
        def headless_use(backend: str, *args: Any, **kwargs: Any) -> Any:
            return use("Agg" if str(backend).lower() == "tkagg" else backend, *args, **kwargs)

        patcher.setattr(matplotlib, "use", headless_use, "matplotlib.use")


@contextlib.contextmanager
def patched(
    otflow_dir: str | Path,
    *,
    script: str | None = "trainToyOTflow.py",
    lr: float = 1e-2,
    alpha: float = 0.1,
    eps: float = 0.1,
    mode: str = "alternate",
    off: bool = False,
    T0: float = 1.0,
    mechanism: str = "direct",
    strict: bool = True,
) -> Iterator[PatchSession]:
    """Patches an OT-Flow checkout for temporal optimization; restores every name on exit.

    Arguments:
        otflow_dir: The checkout (the directory holding ``src/OTFlowProblem.py``).
        script: The script to prepare for, or None to patch only the model and the problem.
        lr: Adam's learning rate for T.
        alpha: The temporal regulariser's weight.
        eps: The clip margin of T.
        mode: ``"alternate"`` or ``"joint"``.
        off: The baseline: the same patch with T fixed.
        T0: The initial end time: the span ``[0, T0]`` the scripts hard-code (1.0).
        mechanism: ``"direct"`` or ``"rescale"`` (see the module docstring).
        strict: Raise if the problem is evaluated with gradients before an optimizer over the network was built.

    Returns:
        A context manager yielding a :class:`~examples._upstream_common.PatchSession`.

    Raises:
        OTFlowLayoutError: If the checkout lacks a patched name or its signature differs.
        ValueError: If an option is out of range.

    """
    options = TempoptOptions(lr=lr, alpha=alpha, eps=eps, mode=mode, off=off)
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}.")
    if isinstance(T0, bool) or not isinstance(T0, (int, float)) or not math.isfinite(T0) or T0 <= eps:
        raise ValueError(f"T0 must be a number greater than eps={eps}, got {T0!r}; OT-Flow's scripts integrate to 1.0.")
    checkout = Path(otflow_dir).expanduser().resolve()
    error = _error(checkout)
    if not (checkout / "src" / "OTFlowProblem.py").is_file():
        raise error("src/OTFlowProblem.py is missing (is --otflow the root of an OT-Flow checkout?)")
    registry = Registry(options, error, mirror=False, strict=strict)
    patcher = Patcher()
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_process(checkout))
        stack.callback(patcher.restore)
        stack.callback(lambda: registry.stepper.close() if registry.stepper is not None else None)
        apply_stack_shims(patcher, stack, six=False)
        _headless_shims(patcher)

        ot_module = import_upstream("src.OTFlowProblem", checkout, error)
        phi_module = import_upstream("src.Phi", checkout, error)
        require_attrs(ot_module, ("OTFlowProblem", "integrate", "odefun", "C"), "src.OTFlowProblem", error)
        require_attrs(phi_module, ("Phi",), "src.Phi", error)
        require_params(ot_module.OTFlowProblem, PROBLEM_PARAMS, "src.OTFlowProblem.OTFlowProblem", error)
        require_params(ot_module.integrate, INTEGRATE_PARAMS, "src.OTFlowProblem.integrate", error)
        require_params(ot_module.odefun, ODEFUN_PARAMS, "src.OTFlowProblem.odefun", error)
        require_params(phi_module.Phi.__init__, PHI_INIT, "src.Phi.Phi.__init__", error)
        if script is not None:
            original = torch.optim.Adam
            require_params(original, ("params", "lr"), "torch.optim.Adam", error)
            registry.optimizer_names.append("torch.optim.Adam")
            patcher.setattr(torch.optim, "Adam", optimizer_factory(original, registry, "torch.optim.Adam"), "torch.optim.Adam")
        _patch(ot_module, phi_module, registry, patcher, float(T0), mechanism, error)
        default_save = SCRIPTS.get(Path(script).name if script else "", "experiments/cnf")
        yield PatchSession(checkout, script, registry, patcher.names, checkout_commit(checkout), default_save)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``otflow_patch.py --otflow PATH [--tempopt-*] -- SCRIPT [upstream args]``."""
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "otflow_patch.py"
    example = f"python examples/{prog} --otflow ../OT-Flow -- trainToyOTflow.py --data 8gaussians --save /tmp/run"
    ours, script, theirs = split_cli(argv, prog, example)
    parser = argparse.ArgumentParser(prog=prog, description="Run an OT-Flow script with a learnable end time.")
    parser.add_argument("--otflow", type=Path, required=True, help="the OT-Flow checkout (verified on 4d66618e)")
    add_tempopt_arguments(parser)
    parser.add_argument("--tempopt-T0", type=float, default=1.0, help="initial end time; the scripts hard-code 1.0")
    parser.add_argument("--tempopt-mechanism", default="direct", choices=MECHANISMS, help="how T gets its gradient")
    ns = parser.parse_args(ours)
    try:
        TempoptOptions(lr=ns.tempopt_lr, alpha=ns.tempopt_alpha, eps=ns.tempopt_eps, mode=ns.tempopt_mode, off=ns.tempopt_off)
        if not ns.tempopt_T0 > ns.tempopt_eps:
            raise ValueError(f"--tempopt-T0 must be greater than --tempopt-eps, got {ns.tempopt_T0} <= {ns.tempopt_eps}.")
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    try:
        with patched(
            ns.otflow, script=script, lr=ns.tempopt_lr, alpha=ns.tempopt_alpha, eps=ns.tempopt_eps,
            mode=ns.tempopt_mode, off=ns.tempopt_off, T0=ns.tempopt_T0, mechanism=ns.tempopt_mechanism,
        ) as session:  # fmt: skip
            if session.commit is not None and session.commit != VERIFIED_COMMIT:
                print(f"{prog}: checkout at {session.commit[:8]}, verified on {VERIFIED_COMMIT[:8]}; names checked OK.", file=sys.stderr)
            session.run(theirs, csv_path=ns.tempopt_csv)
    except (UpstreamLayoutError, TempoptConfigError) as e:
        raise SystemExit(f"{prog}: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
