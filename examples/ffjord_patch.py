r"""Run upstream FFJORD (rtqichen/ffjord) with a learnable end time T per CNF block, without editing it.

Usage::

    python examples/ffjord_patch.py --ffjord PATH [--tempopt-lr 1e-2 --tempopt-alpha 0.1 \
        --tempopt-eps 0.1 --tempopt-mode alternate --tempopt-off] -- train_toy.py <upstream args>

(likewise ``train_cnf.py`` and ``train_tabular.py``). The script runs unchanged
from the checkout (``runpy``, with ``sys.argv`` set and the checkout as working
directory and first entry of ``sys.path``), so relative paths such as the default
``--save experiments/cnf`` land inside the checkout: pass an absolute ``--save``.
``tempopt.csv`` (``iteration,block,T,dLdT,nfe_forward,nfe_backward``, one row per
iteration and block) is written into that ``--save`` directory.

Verified on rtqichen/ffjord commit 994864ad (2020-09-22) with python 3.11, torch 2.13,
torchdiffeq 0.2.5, numpy 2, matplotlib 3.11. Every name below is checked to exist,
with the parameters it is called with, before anything is patched; a checkout that
does not match stops with :class:`FFJORDLayoutError` (a ``SystemExit`` on the
command line) naming what is missing.

What is patched, and why (all undone when :func:`patched` exits):

``lib.layers.cnf.CNF.__init__`` (wrapped)
    After upstream's constructor, gives the block a :class:`~torch_tempopt.LearnableHorizon`
    with T0 = ``sqrt_end_time**2`` (the block's own T, e.g. ``--time_length``) and turns
    ``sqrt_end_time`` into a buffer if ``--train_T True`` made it a parameter, so no
    form of T is in ``model.parameters()``: not in the weight optimizer, not in
    ``clip_grad_norm_(model.parameters())``, not in weight decay or LR warm-up. The
    horizon is kept outside the module tree (state_dict keys are unchanged); T is
    mirrored into ``sqrt_end_time`` after every step, so upstream's ``CNF Time`` /
    ``Total Time`` logs and checkpoints show the learned T, and an unpatched upstream
    model loading the checkpoint integrates to that T.
``lib.layers.cnf.CNF.forward`` (replaced when ``integration_times`` is None, upstream otherwise)
    Upstream builds ``torch.tensor([0.0, sqrt_end_time**2])`` (cnf.py:42), which copies
    the value and cuts T out of the graph: with ``--train_T True`` T never moves (its
    grad is None). The patched forward integrates the same states with the same
    solver settings (``odeint_adjoint``, training/test tolerances, regularisation
    states, ``reverse``) through the horizon, which adds
    :math:`dL/dT = \langle dL/dy(T), F(T, y(T)) \rangle`. Its direct mechanism evaluates
    F at a detached T, so upstream's ``t = torch.tensor(t)`` copy in
    ``ODEfunc.forward`` (odefunc.py:288), which makes the adjoint's own time gradient
    wrong when T is the start of the solve (``reverse=True``), does not matter: the
    gradient is right in both directions. Calls with explicit ``integration_times``
    (``save_trajectory``) run upstream's forward unchanged.
``torch.optim.Adam`` (``train_toy.py``, ``train_cnf.py``) / ``lib.custom_optimizers.Adam`` (``train_tabular.py``)
    The optimizer class the script calls is replaced by a factory that builds it
    over the weights and returns it wrapped in a
    :class:`~torch_tempopt.CoordinateDescentStepper` (param_groups, state,
    state_dict are the weight optimizer's, so ``update_lr`` warm-up and checkpoints
    work). Calls over other parameters return the plain class.

Runtime shims for the current stack, each only where needed:

* ``sys.modules['six']``: a stub if ``six`` is not installed (``train_misc.py:1``).
* ``matplotlib.cm.get_cmap`` and ``matplotlib.axes.Axes.set_axis_bgcolor`` (removed in
  matplotlib 3.9 / 2.2; ``lib/visualize_flow.py:54``, ``diagnostics/viz_toy.py:84-85``).
* ``torch.load``: checkpoints pickle ``argparse.Namespace``, refused by torch >= 2.6's
  ``weights_only=True``; allowed through ``torch.serialization.safe_globals``.
* ``diagnostics.viz_toy.trajectory_to_video`` (``train_toy.py`` only, if ``ffmpeg`` is
  not on PATH): a no-op instead of a ``FileNotFoundError`` after training.
  ``--tempopt-skip-trajectory`` also skips ``save_trajectory`` (101 frames, minutes on CPU).
* ``numpy.mean`` (``train_cnf.py`` only, if CUDA is available): its validation does
  ``np.mean`` over a list of CUDA tensors (train_cnf.py:403), which numpy 2 cannot convert;
  such lists are moved to the CPU first.
* A warnings filter for the "To copy construct from a tensor" warning of
  ``odefunc.py:288``, which the patch makes harmless.

Example:
    >>> from examples.ffjord_patch import patched  # doctest: +SKIP
    >>> with patched("/path/to/ffjord", lr=1e-2, alpha=0.1) as session:  # doctest: +SKIP
    ...     session.run(["--data", "8gaussians", "--niters", "300", "--save", "/tmp/run"])

References:
    | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models (Grathwohl et al., 2019)
    | https://github.com/rtqichen/ffjord
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

if __package__ in (None, ""):  # run as a file: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

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

__all__ = ["FFJORDLayoutError", "PatchSession", "SCRIPTS", "VERIFIED_COMMIT", "main", "patched"]

#: The upstream commit the patch was checked against.
VERIFIED_COMMIT = "994864ad0517db3549717c25170f9b71e96788b1"

#: Per known script: the optimizer class it builds (module, name) and its ``--save`` default.
SCRIPTS: dict[str, tuple[str, str, str]] = {
    "train_toy.py": ("torch.optim", "Adam", "experiments/cnf"),
    "train_cnf.py": ("torch.optim", "Adam", "experiments/cnf"),
    "train_tabular.py": ("lib.custom_optimizers", "Adam", "experiments/cnf"),
}

CNF_INIT = ("self", "odefunc", "T", "train_T", "regularization_fns", "solver", "atol", "rtol")
CNF_FORWARD = ("self", "z", "logpz", "integration_times", "reverse")
CNF_ATTRS = (
    "sqrt_end_time", "odefunc", "nreg", "regularization_states", "solver", "atol", "rtol",
    "test_solver", "test_atol", "test_rtol", "solver_options",
)  # fmt: skip
OPTIMIZER_PARAMS = ("params", "lr")


class FFJORDLayoutError(UpstreamLayoutError):
    """The FFJORD checkout lacks a name or signature the patch relies on."""


def _error(checkout: Path) -> Callable[[str], UpstreamLayoutError]:
    return layout_error(FFJORDLayoutError, "ffjord_patch", f"rtqichen/ffjord@{VERIFIED_COMMIT[:8]}", checkout)


def _patch_cnf(cnf_module: Any, registry: Registry, patcher: Patcher, error: Callable[[str], Exception]) -> None:
    CNF = cnf_module.CNF
    original_init, original_forward = CNF.__init__, CNF.forward

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        require_attrs(self, CNF_ATTRS, "lib.layers.cnf.CNF (after __init__)", error)
        s = self.sqrt_end_time
        if isinstance(s, torch.nn.Parameter):  # --train_T True: upstream's T, never trained; keep it a mirror only
            del self._parameters["sqrt_end_time"]
            self.register_buffer("sqrt_end_time", s.detach().clone())
        registry.add(self, float((s * s).item()), f"CNF block {len(registry.blocks)}")

    @functools.wraps(original_forward)
    def forward(self: Any, z: torch.Tensor, logpz: Any = None, integration_times: Any = None, reverse: bool = False) -> Any:
        block = registry.block_of(self)
        if integration_times is not None or block is None:
            return original_forward(self, z, logpz, integration_times, reverse)
        registry.adopt_loaded(block, self)
        registry.check_wired(block, self.training)
        _logpz = torch.zeros(z.shape[0], 1).to(z) if logpz is None else logpz
        self.odefunc.before_odeint()
        if self.training:
            state = (z, _logpz) + tuple(z.new_zeros(()) for _ in range(self.nreg))
            func = registry.counting(block, self.odefunc)
            kwargs = dict(atol=self.atol, rtol=self.rtol, method=self.solver, options=self.solver_options)
        else:  # upstream: no regularisation states and no solver options at test time
            state = (z, _logpz)
            func = self.odefunc
            kwargs = dict(atol=self.test_atol, rtol=self.test_rtol, method=self.test_solver)
        out = block.horizon(func, state, solver=cnf_module.odeint, reverse=reverse, **kwargs)
        z_t, logpz_t = out[:2]
        self.regularization_states = tuple(out[2:])
        return (z_t, logpz_t) if logpz is not None else z_t

    patcher.setattr(CNF, "__init__", __init__, "lib.layers.cnf.CNF.__init__")
    patcher.setattr(CNF, "forward", forward, "lib.layers.cnf.CNF.forward")


def _cpu_mean(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def mean(a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, (list, tuple)) and a and all(isinstance(x, torch.Tensor) for x in a):
            a = [x.detach().cpu() for x in a]
        return original(a, *args, **kwargs)

    return mean


@contextlib.contextmanager
def patched(
    ffjord_dir: str | Path,
    *,
    script: str | None = "train_toy.py",
    lr: float = 1e-2,
    alpha: float = 0.1,
    eps: float = 0.1,
    mode: str = "alternate",
    off: bool = False,
    skip_trajectory: bool = False,
    strict: bool = True,
) -> Iterator[PatchSession]:
    r"""Patches an FFJORD checkout for temporal optimization; restores every name on exit.

    Arguments:
        ffjord_dir: The checkout (the directory holding ``lib/layers/cnf.py``).
        script: The script to prepare for (``train_toy.py``, ``train_cnf.py``,
            ``train_tabular.py``; another name patches ``torch.optim.Adam``), or None
            to patch only the CNF (library use).
        lr: Adam's learning rate for T.
        alpha: The temporal regulariser's weight.
        eps: The clip margin of T.
        mode: ``"alternate"`` or ``"joint"``.
        off: The baseline: the same patch with T fixed.
        skip_trajectory: Skip ``train_toy.py``'s final ``save_trajectory``.
        strict: Raise if a CNF trains with a learnable T before an optimizer over it was built.

    Returns:
        A context manager yielding a :class:`~examples._upstream_common.PatchSession`.

    Raises:
        FFJORDLayoutError: If the checkout lacks a patched name or its signature differs.
        ValueError: If an option is out of range.

    """
    options = TempoptOptions(lr=lr, alpha=alpha, eps=eps, mode=mode, off=off)
    checkout = Path(ffjord_dir).expanduser().resolve()
    error = _error(checkout)
    if not (checkout / "lib" / "layers" / "cnf.py").is_file():
        raise error("lib/layers/cnf.py is missing (is --ffjord the root of an FFJORD checkout?)")
    registry = Registry(options, error, mirror=True, strict=strict)
    patcher = Patcher()
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_process(checkout))
        stack.callback(patcher.restore)
        stack.callback(lambda: registry.stepper.close() if registry.stepper is not None else None)
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning, module=r"lib\.layers\.odefunc")
        apply_stack_shims(patcher, stack)

        cnf_module = import_upstream("lib.layers.cnf", checkout, error)
        require_attrs(cnf_module, ("CNF", "odeint"), "lib.layers.cnf", error)
        require_params(cnf_module.CNF.__init__, CNF_INIT, "lib.layers.cnf.CNF.__init__", error)
        require_params(cnf_module.CNF.forward, CNF_FORWARD, "lib.layers.cnf.CNF.forward", error)
        if not callable(cnf_module.odeint):
            raise error("lib.layers.cnf.odeint is not callable")

        name = Path(script).name if script is not None else None
        if name is not None:
            module_name, class_name, _ = SCRIPTS.get(name, ("torch.optim", "Adam", ""))
            module = torch.optim if module_name == "torch.optim" else import_upstream(module_name, checkout, error)
            require_attrs(module, (class_name,), module_name, error)
            original = getattr(module, class_name)
            require_params(original, OPTIMIZER_PARAMS, f"{module_name}.{class_name}", error)
            label = f"{module_name}.{class_name}"
            registry.optimizer_names.append(label)
            patcher.setattr(module, class_name, optimizer_factory(original, registry, label), label)
        if name == "train_toy.py":
            viz = import_upstream("diagnostics.viz_toy", checkout, error)
            require_attrs(viz, ("save_trajectory", "trajectory_to_video"), "diagnostics.viz_toy", error)
            if skip_trajectory:
                patcher.setattr(viz, "save_trajectory", lambda *a, **k: None, "diagnostics.viz_toy.save_trajectory")
            if skip_trajectory or shutil.which("ffmpeg") is None:
                patcher.setattr(viz, "trajectory_to_video", lambda *a, **k: None, "diagnostics.viz_toy.trajectory_to_video")
        if name == "train_cnf.py" and torch.cuda.is_available():
            import numpy

            patcher.setattr(numpy, "mean", _cpu_mean(numpy.mean), "numpy.mean")
        _patch_cnf(cnf_module, registry, patcher, error)
        default_save = SCRIPTS.get(name or "", ("", "", "experiments/cnf"))[2]
        yield PatchSession(checkout, script, registry, patcher.names, checkout_commit(checkout), default_save)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``ffjord_patch.py --ffjord PATH [--tempopt-*] -- SCRIPT [upstream args]``."""
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "ffjord_patch.py"
    example = f"python examples/{prog} --ffjord ../ffjord -- train_toy.py --data 8gaussians --save /tmp/run"
    ours, script, theirs = split_cli(argv, prog, example)
    parser = argparse.ArgumentParser(prog=prog, description="Run an FFJORD script with a learnable end time per CNF block.")
    parser.add_argument("--ffjord", type=Path, required=True, help="the FFJORD checkout (verified on 994864ad)")
    add_tempopt_arguments(parser)
    parser.add_argument("--tempopt-skip-trajectory", action="store_true", help="train_toy.py: skip the final save_trajectory")
    ns = parser.parse_args(ours)
    try:
        TempoptOptions(lr=ns.tempopt_lr, alpha=ns.tempopt_alpha, eps=ns.tempopt_eps, mode=ns.tempopt_mode, off=ns.tempopt_off)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    try:
        with patched(
            ns.ffjord, script=script, lr=ns.tempopt_lr, alpha=ns.tempopt_alpha, eps=ns.tempopt_eps,
            mode=ns.tempopt_mode, off=ns.tempopt_off, skip_trajectory=ns.tempopt_skip_trajectory,
        ) as session:  # fmt: skip
            if session.commit is not None and session.commit != VERIFIED_COMMIT:
                print(f"{prog}: checkout at {session.commit[:8]}, verified on {VERIFIED_COMMIT[:8]}; names checked OK.", file=sys.stderr)
            session.run(theirs, csv_path=ns.tempopt_csv)
    except (UpstreamLayoutError, TempoptConfigError) as e:
        raise SystemExit(f"{prog}: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
