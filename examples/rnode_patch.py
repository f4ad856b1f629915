r"""Run RNODE (cfinlay/ffjord-rnode) with a learnable end time T per CNF block, without editing it.

Usage::

    python examples/rnode_patch.py --rnode PATH [--tempopt-lr 1e-2 --tempopt-alpha 0.1 \
        --tempopt-eps 0.1 --tempopt-mode alternate --tempopt-off] -- train.py <upstream args>

RNODE is FFJORD with kinetic-energy and Jacobian-norm regularisers, integrated as
extra per-sample ODE states, and a fixed-grid RK4 solver (``--solver rk4 --step_size
0.25``) in training. ``tempopt.csv`` (``iteration,block,T,dLdT,nfe_forward,nfe_backward``)
goes into the script's ``--save`` directory.

Verified against cfinlay/ffjord-rnode commit 02c6e2ce (``lib/layers/cnf.py``,
``train.py``, ``train_misc.py``, ``lib/odenvp.py``) read through a source index, and run
here only against our stand-ins (``tests/standins/rnode``): upstream ``train.py``
cannot run on a CPU (below). Every patched name is checked, with its parameters,
before anything is patched; a checkout that does not match stops with
:class:`RNODELayoutError` naming what is missing.

What is patched, and why (all undone when :func:`patched` exits):

``lib.layers.cnf.CNF.__init__`` (wrapped)
    As for FFJORD: a :class:`~torch_tempopt.LearnableHorizon` per block with T0 =
    ``sqrt_end_time**2`` (``--time_length``, 1.0 by default), kept outside the module tree;
    ``sqrt_end_time`` becomes a buffer if ``--train_T True`` made it a parameter (DDP
    would otherwise also complain about a parameter without gradient) and mirrors T.
``lib.layers.cnf.CNF.forward`` (replaced when ``integration_times`` is None)
    RNODE's ``forward(z, logpz=None, reg_states=tuple(), integration_times=None,
    reverse=False)`` returns ``(z, logp, reg_states)`` and passes the per-sample
    regularisation states on from block to block. It builds its grid with
    ``torch.tensor([0.0, T])`` (cnf.py:45), which cuts T out of the graph. The patched
    forward keeps RNODE's conventions (zero ``[N]`` states if the count does not match,
    per-state tolerances ``[atol, atol] + [1e20] * nreg`` for dopri5/bosh3, test solver
    options) and integrates through the horizon, so
    :math:`dL/dT = \sum_i \langle dL/dy_i(T), F_i(T, y(T)) \rangle` includes the
    regularisers' integrands at T (their states are part of y). With ``--solver rk4
    --step_size 0.25`` torchdiffeq takes ``ceil(T / 0.25)`` steps, so the NFE moves in
    steps of 4 as T crosses multiples of 0.25. (RNODE already commented out FFJORD's
    ``torch.tensor(t)`` copy in ``ODEfunc.forward``.)
``torch.optim.Adam`` or ``torch.optim.SGD`` (whichever ``--optimizer`` selects)
    Replaced by a factory that builds it over the weights and wraps it in a
    :class:`~torch_tempopt.CoordinateDescentStepper`, so ``update_lr`` warm-up and
    ``clip_grad_norm_(model.parameters())`` never touch T. Under DDP the stepper
    averages dL/dT over the ranks itself (DDP reduces only the model's parameters).

Runtime shims: the ``six`` stub, matplotlib renames and ``torch.load`` with
``argparse.Namespace`` of :func:`~examples._upstream_common.apply_stack_shims`; and, inside
the patched forward, scalar ``adjoint_atol``/``adjoint_rtol`` next to RNODE's per-state
tolerance lists: torchdiffeq >= 0.1 reuses the lists for the larger adjoint state and
fails in the backward pass ("If using tupled rtol it must have the same length as the
tuple y0"), with or without temporal optimization.

Where RNODE's ``train.py`` itself stops on this stack (not patched; see docs/adoption/rnode.md):

* It hard-codes CUDA: ``create_model(...).cuda()``, ``torch.tensor(...).float().cuda()`` for
  the metrics, ``storage.cuda(args.local_rank)`` on resume: it needs a GPU.
* It calls ``dist_utils.sum_tensor`` (``dist.all_reduce``) every iteration even without
  ``--distributed``: a process group must exist, e.g. ``torchrun --nproc_per_node=1 train.py
  --distributed ...`` (``torch.distributed.launch`` passes ``--local-rank``, which its parser
  does not know).
* Its ``__main__`` catches every exception and prints the traceback to stdout, exiting 0.
  The patch therefore checks after the run that the script made optimizer steps, and
  raises :class:`RNODELayoutError` otherwise ("look for the traceback in its output").

References:
    | How to train your neural ODE: the world of Jacobian and kinetic regularization (Finlay et al., 2020)
    | https://github.com/cfinlay/ffjord-rnode
"""

from __future__ import annotations

import contextlib
import functools
import sys
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

__all__ = ["RNODELayoutError", "SCRIPTS", "VERIFIED_COMMIT", "main", "patched"]

#: The upstream commit the patch was checked against.
VERIFIED_COMMIT = "02c6e2ceb218d4ecae163c96bf72221c133932de"

#: Per known script: its ``--save`` default. ``train.py`` builds ``optim.Adam`` or ``optim.SGD`` (``--optimizer``).
SCRIPTS: dict[str, str] = {"train.py": "experiments/cnf"}

CNF_INIT = ("self", "odefunc", "T", "train_T", "regularization_fns", "solver", "atol", "rtol")
CNF_FORWARD = ("self", "z", "logpz", "reg_states", "integration_times", "reverse")
CNF_ATTRS = (
    "sqrt_end_time", "odefunc", "nreg", "solver", "atol", "rtol",
    "test_solver", "test_atol", "test_rtol", "solver_options", "test_solver_options",
)  # fmt: skip
ADAPTIVE = ("dopri5", "bosh3")  # RNODE's cnf.py: per-state tolerances, regularisers out of the step control


class RNODELayoutError(UpstreamLayoutError):
    """The RNODE checkout lacks a name or signature the patch relies on."""


def _error(checkout: Path) -> Callable[[str], UpstreamLayoutError]:
    return layout_error(RNODELayoutError, "rnode_patch", f"cfinlay/ffjord-rnode@{VERIFIED_COMMIT[:8]}", checkout)


def _patch_cnf(cnf_module: Any, registry: Registry, patcher: Patcher, error: Callable[[str], Exception]) -> None:
    CNF = cnf_module.CNF
    original_init, original_forward = CNF.__init__, CNF.forward

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        require_attrs(self, CNF_ATTRS, "lib.layers.cnf.CNF (after __init__)", error)
        s = self.sqrt_end_time
        if isinstance(s, torch.nn.Parameter):
            del self._parameters["sqrt_end_time"]
            self.register_buffer("sqrt_end_time", s.detach().clone())
        registry.add(self, float((s * s).item()), f"CNF block {len(registry.blocks)}")

    @functools.wraps(original_forward)
    def forward(
        self: Any, z: torch.Tensor, logpz: Any = None, reg_states: tuple = (), integration_times: Any = None, reverse: bool = False
    ) -> tuple[Any, Any, tuple]:
        block = registry.block_of(self)
        if integration_times is not None or block is None:
            return original_forward(self, z, logpz, reg_states, integration_times, reverse)
        registry.adopt_loaded(block, self)
        registry.check_wired(block, self.training)
        if len(reg_states) != self.nreg and self.training:
            reg_states = tuple(torch.zeros(z.size(0)).to(z) for _ in range(self.nreg))
        _logpz = torch.zeros(z.shape[0], 1).to(z) if logpz is None else logpz
        self.odefunc.before_odeint()
        if self.training:
            state = (z, _logpz) + tuple(reg_states)
            func = registry.counting(block, self.odefunc)
            kwargs = dict(atol=self.atol, rtol=self.rtol, method=self.solver, options=self.solver_options)
            if self.solver in ADAPTIVE:
                kwargs["atol"] = [self.atol, self.atol] + [1e20] * len(reg_states)
                kwargs["rtol"] = [self.rtol, self.rtol] + [1e20] * len(reg_states)
                if _accepts(cnf_module.odeint, "adjoint_rtol"):  # torchdiffeq >= 0.1: see _accepts' note
                    kwargs.update(adjoint_atol=self.atol, adjoint_rtol=self.rtol)
        else:
            state = (z, _logpz)
            func = self.odefunc
            kwargs = dict(atol=self.test_atol, rtol=self.test_rtol, method=self.test_solver, options=self.test_solver_options)
        out = block.horizon(func, state, solver=cnf_module.odeint, reverse=reverse, **kwargs)
        return out[0], out[1], tuple(out[2:])

    patcher.setattr(CNF, "__init__", __init__, "lib.layers.cnf.CNF.__init__")
    patcher.setattr(CNF, "forward", forward, "lib.layers.cnf.CNF.forward")


def _accepts(solver: Any, name: str) -> bool:
    """Whether ``solver`` takes the keyword ``name``.

    torchdiffeq >= 0.1's ``odeint_adjoint`` reuses ``rtol``/``atol`` for the adjoint system
    unless ``adjoint_rtol``/``adjoint_atol`` are given; RNODE's per-state lists then no
    longer match the (larger) adjoint state and the backward pass stops with "If using
    tupled rtol it must have the same length as the tuple y0". The patched forward passes
    the scalar tolerances for the adjoint solve.
    """
    import inspect

    try:
        return name in inspect.signature(solver).parameters
    except (TypeError, ValueError):
        return False


def _optimizer_choice(argv: Sequence[str]) -> str:
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--optimizer", default="adam")
    ns, _ = parser.parse_known_args(list(argv))
    return {"adam": "Adam", "sgd": "SGD"}.get(ns.optimizer, "Adam")


def _made_steps(session: PatchSession) -> None:
    stepper = session.registry.stepper
    if session.script and Path(session.script).name == "train.py" and (stepper is None or stepper.iterations == 0):
        raise RNODELayoutError(
            f"rnode_patch: {session.script} in {session.checkout} returned without a single optimizer step. RNODE's "
            "train.py catches every exception in main() and prints the traceback to stdout (exit code 0): look for "
            "it in the output above."
        )


@contextlib.contextmanager
def patched(
    rnode_dir: str | Path,
    *,
    script: str | None = "train.py",
    optimizer: str = "Adam",
    lr: float = 1e-2,
    alpha: float = 0.1,
    eps: float = 0.1,
    mode: str = "alternate",
    off: bool = False,
    strict: bool = True,
) -> Iterator[PatchSession]:
    """Patches an RNODE checkout for temporal optimization; restores every name on exit.

    Arguments:
        rnode_dir: The checkout (the directory holding ``lib/layers/cnf.py``).
        script: The script to prepare for (``train.py``), or None to patch only the CNF.
        optimizer: The ``torch.optim`` class the script builds: ``"Adam"`` or ``"SGD"``
            (the command line reads it from the script's ``--optimizer``).
        lr: Adam's learning rate for T.
        alpha: The temporal regulariser's weight.
        eps: The clip margin of T.
        mode: ``"alternate"`` or ``"joint"``.
        off: The baseline: the same patch with T fixed.
        strict: Raise if a CNF trains with a learnable T before an optimizer over it was built.

    Returns:
        A context manager yielding a :class:`~examples._upstream_common.PatchSession`.

    Raises:
        RNODELayoutError: If the checkout lacks a patched name or its signature differs.
        ValueError: If an option is out of range or ``optimizer`` is not Adam/SGD.

    """
    options = TempoptOptions(lr=lr, alpha=alpha, eps=eps, mode=mode, off=off)
    if optimizer not in ("Adam", "SGD"):
        raise ValueError(f"optimizer must be 'Adam' or 'SGD' (train.py's --optimizer adam/sgd), got {optimizer!r}.")
    checkout = Path(rnode_dir).expanduser().resolve()
    error = _error(checkout)
    if not (checkout / "lib" / "layers" / "cnf.py").is_file():
        raise error("lib/layers/cnf.py is missing (is --rnode the root of an ffjord-rnode checkout?)")
    registry = Registry(options, error, mirror=True, strict=strict)
    patcher = Patcher()
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated_process(checkout))
        stack.callback(patcher.restore)
        stack.callback(lambda: registry.stepper.close() if registry.stepper is not None else None)
        apply_stack_shims(patcher, stack)

        cnf_module = import_upstream("lib.layers.cnf", checkout, error)
        require_attrs(cnf_module, ("CNF", "odeint"), "lib.layers.cnf", error)
        require_params(cnf_module.CNF.__init__, CNF_INIT, "lib.layers.cnf.CNF.__init__", error)
        require_params(cnf_module.CNF.forward, CNF_FORWARD, "lib.layers.cnf.CNF.forward", error)
        if not callable(cnf_module.odeint):
            raise error("lib.layers.cnf.odeint is not callable")
        if script is not None:
            original = getattr(torch.optim, optimizer)
            require_params(original, ("params", "lr"), f"torch.optim.{optimizer}", error)
            label = f"torch.optim.{optimizer}"
            registry.optimizer_names.append(label)
            patcher.setattr(torch.optim, optimizer, optimizer_factory(original, registry, label), label)
        _patch_cnf(cnf_module, registry, patcher, error)
        default_save = SCRIPTS.get(Path(script).name if script else "", "experiments/cnf")
        yield PatchSession(checkout, script, registry, patcher.names, checkout_commit(checkout), default_save, _made_steps)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``rnode_patch.py --rnode PATH [--tempopt-*] -- train.py [upstream args]``."""
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "rnode_patch.py"
    example = f"torchrun --nproc_per_node=1 examples/{prog} --rnode ../ffjord-rnode -- train.py --distributed --save /tmp/run"
    ours, script, theirs = split_cli(argv, prog, example)
    parser = argparse.ArgumentParser(prog=prog, description="Run RNODE's train.py with a learnable end time per CNF block.")
    parser.add_argument("--rnode", type=Path, required=True, help="the ffjord-rnode checkout (verified on 02c6e2ce)")
    add_tempopt_arguments(parser)
    ns = parser.parse_args(ours)
    try:
        TempoptOptions(lr=ns.tempopt_lr, alpha=ns.tempopt_alpha, eps=ns.tempopt_eps, mode=ns.tempopt_mode, off=ns.tempopt_off)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    try:
        with patched(
            ns.rnode, script=script, optimizer=_optimizer_choice(theirs), lr=ns.tempopt_lr, alpha=ns.tempopt_alpha,
            eps=ns.tempopt_eps, mode=ns.tempopt_mode, off=ns.tempopt_off,
        ) as session:  # fmt: skip
            if session.commit is not None and session.commit != VERIFIED_COMMIT:
                print(f"{prog}: checkout at {session.commit[:8]}, verified on {VERIFIED_COMMIT[:8]}; names checked OK.", file=sys.stderr)
            session.run(theirs, csv_path=ns.tempopt_csv)
    except (UpstreamLayoutError, TempoptConfigError) as e:
        raise SystemExit(f"{prog}: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
