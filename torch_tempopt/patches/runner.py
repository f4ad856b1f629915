"""The patches' runner: a reversible patch of an unchanged checkout, ``tempopt.csv``, the CLI.

A patch (:mod:`~torch_tempopt.patches.ffjord`, :mod:`~torch_tempopt.patches.rnode`,
:mod:`~torch_tempopt.patches.otflow`, :mod:`~torch_tempopt.patches.enf`) is an :class:`Upstream`:
the commit it was checked against, its scripts with the optimizer classes they build, and an
``install`` function that patches the few names a :class:`~torch_tempopt.LearnableHorizon` needs,
through :meth:`Patch.set`. :class:`Patch` does the rest:

* it puts the checkout first on ``sys.path`` with fresh modules, and on exit restores every patched
  name (:attr:`Patch.names`), ``sys.argv``, ``sys.path``, ``sys.modules``, the working directory,
  the warnings filters, the root logger, the default dtype and ``cudnn.benchmark``;
* it replaces the script's optimizer classes by factories that wrap the weight optimizer in a
  :class:`~torch_tempopt.CoordinateDescentStepper` (which takes T out of it); each step also
  averages dL/dT over distributed ranks (FFJORD's T sits outside the DDP module) and appends a row
  per block to ``tempopt.csv``;
* it checks each name before patching it; a checkout that differs stops with a :class:`PatchError`
  naming the name and the commit the patch was checked against.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import math
import os
import runpy
import subprocess
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch_tempopt import (
    Budget,
    BudgetGuard,
    CoordinateDescentStepper,
    LearnableHorizon,
    NFECounter,
)
from torch_tempopt.budget import GRADIENTS

__all__ = ["CSV_COLUMNS", "Patch", "PatchError", "Upstream", "importable", "main"]

#: The columns of ``tempopt.csv``: one row per optimizer step and block.
CSV_COLUMNS = ("iteration", "block", "T", "dLdT", "nfe_forward", "nfe_backward")


class PatchError(RuntimeError):
    """A checkout that does not match its patch, or a setting that does not fit the model."""


@dataclass(frozen=True)
class Upstream:
    """The specification of a patch: what it patches in which repository.

    Arguments:
        name: The short name, also the command line's option for the checkout (``--ffjord``).
        repo: The GitHub repository, ``owner/name``.
        commit: The commit the patch was checked against.
        marker: A file every checkout has, relative to its root.
        scripts: Per script, its ``--save`` default and the optimizer classes it builds (dotted
            names); another script is treated as the first one.
        install: Patches the checkout through :meth:`Patch.set` (the optimizer classes aside).
        flags: The patch's own switches, keyword -> help (``--tempopt-KEYWORD`` on the command
            line).
        select: The parts of the state the guard compares (default: a tuple's first two).

    """

    name: str
    repo: str
    commit: str
    marker: str
    scripts: dict[str, tuple[str, tuple[str, ...]]]
    install: Callable[[Patch], None]
    flags: dict[str, str] = field(default_factory=dict)
    select: Callable[[Any], Any] | None = None


class Patch:
    """A checkout patched for temporal optimization; a context manager that undoes it all on exit.

    Arguments:
        upstream: The patch's specification.
        checkout: The checkout's root directory.
        script: The script that :meth:`run` runs (its optimizer classes are patched), or None:
            the model only.
        lr: Adam's learning rate for T.
        alpha: The weight of the temporal regulariser.
        eps: The clip margin: T stays in ``[eps, 2 T0 - eps]``.
        budget: Solve each block on this many rk4 steps in training (``LearnableHorizon(...,
            budget=Budget(N, gradient=gradient))``); upstream's adaptive solver settings are its
            reference (else dopri5 at 1e-5), which scores the model in ``eval()`` and which the
            stepper's guard checks the steps against.
        gradient: How a budget's steps are differentiated: ``"backprop"`` through the steps
            (whatever solver upstream calls), ``"checkpoint"`` (each step recomputed in backward),
            or ``"adjoint"`` (upstream's ``odeint_adjoint`` on the same steps, 0.3's way).
        guard: Check a budget against the reference and grow it (the stepper's
            :class:`~torch_tempopt.BudgetGuard`); False keeps N fixed steps, as a fixed-grid
            recipe (RNODE's rk4 grid) trains.
        off: The baseline: the same patch with T fixed at T0.
        learn_T: Learn T on a budget too (without a budget T is learned unless ``off``).
        flags: The upstream's own switches (:attr:`Upstream.flags`).

    Attributes:
        names: What is patched, as dotted names.
        horizons: One horizon per upstream block, in construction order (the ``block`` column).
        owners: The upstream module of each horizon.
        stepper: The stepper around the script's weight optimizer, once the script built it.
        commit: The checkout's git commit, or None.
        after_step: Called after every step of the stepper.
        csv_path: Where :meth:`run` writes ``tempopt.csv``.

    """

    def __init__(
        self,
        upstream: Upstream,
        checkout: str | Path,
        *,
        script: str | None = None,
        lr: float = 1e-2,
        alpha: float = 0.0,
        eps: float = 0.1,
        budget: int | None = None,
        gradient: str = "backprop",
        guard: bool = True,
        off: bool = False,
        learn_T: bool = False,
        **flags: bool,
    ) -> None:
        unknown = sorted(set(flags) - set(upstream.flags))
        if unknown:
            raise TypeError(
                f"{upstream.name}_patch has no option {unknown[0]!r}; "
                f"its own are {sorted(upstream.flags)}."
            )
        self.upstream, self.script, self.flags = upstream, script, flags
        self.checkout = Path(checkout).expanduser().resolve()
        if off and learn_T:
            raise ValueError("off and learn_T contradict each other; pass one of them.")
        self.lr, self.alpha, self.eps, self.budget, self.off, self.learn_T = (
            lr,
            alpha,
            eps,
            budget,
            off,
            learn_T,
        )
        self.gradient, self.guard = gradient, guard
        self.iterations = 0
        self.names: list[str] = []
        self.horizons: list[LearnableHorizon] = []
        self.owners: list[nn.Module] = []
        self.after_step: list[Callable[[], None]] = []
        self.stepper: CoordinateDescentStepper | None = None
        self.commit = _git_commit(self.checkout)
        self.csv_path: Path | None = None
        self._resumed = False
        self._counters: dict[int, list[NFECounter]] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Patch:
        if not (self.checkout / self.upstream.marker).is_file():
            raise self.error(f"{self.upstream.marker} is missing (is it the root of a checkout?)")
        try:
            self._isolate()
            # checkpoints pickle args
            self._stack.enter_context(torch.serialization.safe_globals([argparse.Namespace]))
            self.upstream.install(self)
            for dotted in self._script()[1] if self.script is not None else ():
                self._wrap_optimizer(dotted)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    # ------------------------------------------------------------------ for the specifications
    def error(self, detail: str) -> PatchError:
        """A :class:`PatchError`: the checkout differs from the one the patch was checked on."""
        up = self.upstream
        return PatchError(
            f"{up.name}_patch (checked against {up.repo}@{up.commit[:8]}) does not recognise the "
            f"checkout {self.checkout}: {detail}."
        )

    def load(self, name: str) -> types.ModuleType:
        """Imports the module ``name`` (the checkout's modules come first)."""
        try:
            return importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - whatever breaks, the message names the module
            raise self.error(f"cannot import {name} ({type(e).__name__}: {e})") from e

    def require(self, obj: Any, *names: str) -> None:
        """Raises a :class:`PatchError` naming the attributes of ``names`` that ``obj`` lacks."""
        missing = [n for n in names if not hasattr(obj, n)]
        if missing:
            raise self.error(f"{_dotted(obj)} has no {', '.join(missing)}")

    def signature(self, func: Callable[..., Any], expected: str) -> None:
        """Raises a :class:`PatchError` unless ``func``'s parameters start with ``expected``."""
        params = list(inspect.signature(func).parameters)
        if params[: expected.count(",") + 1] != expected.split(", "):
            raise self.error(
                f"{_dotted(func)} has parameters ({', '.join(params)}), expected ({expected}, ...)"
            )

    def set(self, owner: Any, name: str, value: Any) -> None:
        """Sets ``owner.name = value`` until exit."""
        own = vars(owner)
        undo = (
            functools.partial(setattr, owner, name, own[name])
            if name in own
            else functools.partial(delattr, owner, name)
        )
        self._stack.callback(undo)
        setattr(owner, name, value)
        self.names.append(f"{_dotted(owner)}.{name}")

    def stub(self, name: str, **attrs: Any) -> None:
        """Puts an empty module ``name`` holding ``attrs`` in ``sys.modules`` until exit."""
        module = types.ModuleType(name)
        # torch._dynamo calls find_spec on modules
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        vars(module).update(attrs)
        self.provide(name, module, "stub")

    def provide(self, name: str, module: types.ModuleType, what: str = "stand-in") -> None:
        """Puts ``module`` in ``sys.modules`` as ``name`` until exit (then what was there)."""
        before = sys.modules.get(name)
        sys.modules[name] = module
        if before is None:
            self._stack.callback(sys.modules.pop, name, None)
        else:
            self._stack.callback(sys.modules.__setitem__, name, before)
        self.names.append(f"sys.modules[{name!r}] ({what})")

    def horizon(self, owner: nn.Module, T0: float) -> LearnableHorizon:
        """A new horizon for the upstream block ``owner`` whose end time is ``T0``."""
        try:
            learn = False if self.off else (True if self.learn_T else None)
            budget = None if self.budget is None else Budget(self.budget, gradient=self.gradient)
            horizon = LearnableHorizon(T0, eps=self.eps, budget=budget, learn_T=learn)
        except (TypeError, ValueError) as e:
            raise PatchError(
                f"block {len(self.horizons)} (T0={T0:.6g}) does not fit the --tempopt-* "
                f"settings: {e}"
            ) from e
        self.horizons.append(horizon)
        self.owners.append(owner)
        return horizon

    def count(self, horizon: LearnableHorizon, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func``, its evaluations counted into ``horizon``'s next row if gradients are on."""
        if not torch.is_grad_enabled():
            return func
        counter = NFECounter(func)
        self._counters.setdefault(id(horizon), []).append(counter)
        return counter

    # ------------------------------------------------------------------ running
    def run(self, argv: Sequence[str]) -> None:
        """Runs the script as ``__main__``, arguments ``argv``; ``tempopt.csv`` goes in ``--save``.

        Raises:
            PatchError: If the script returned without a step of the patched optimizer.

        """
        if self.script is None:
            raise ValueError(
                "script is None; name the script to run when patching, e.g. script='train_toy.py'."
            )
        path = self.checkout / self.script
        if not path.is_file():
            raise self.error(f"the script {self.script} does not exist")
        save, optimizers = self._script()
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--save", default=save)
        parser.add_argument("--resume", default=None)
        known = parser.parse_known_args(list(argv))[0]
        self.csv_path, self._resumed = (
            self.checkout / known.save / "tempopt.csv",
            known.resume is not None,
        )
        sys.argv[:] = [str(path), *argv]
        os.chdir(self.checkout)
        runpy.run_path(str(path), run_name="__main__")
        if optimizers and not (self.stepper and self.iterations):
            raise PatchError(
                f"{self.script} returned without stepping its blocks through "
                f"{' or '.join(optimizers)}, so T was not trained (a script that catches its own "
                "exceptions, like RNODE's train.py, printed a traceback above)."
            )

    def _script(self) -> tuple[str, tuple[str, ...]]:
        scripts = self.upstream.scripts
        return scripts.get(Path(self.script or "").name, next(iter(scripts.values())))

    def _isolate(self) -> None:
        """Puts the checkout first on ``sys.path``, modules fresh; restores the process on exit."""
        tops = {p.stem for p in self.checkout.iterdir() if p.is_dir() or p.suffix == ".py"}
        saved = {
            k: sys.modules.pop(k) for k in [k for k in sys.modules if k.split(".")[0] in tops]
        }
        root = logging.getLogger()
        argv, path, cwd, handlers, level = (
            list(sys.argv),
            list(sys.path),
            os.getcwd(),
            list(root.handlers),
            root.level,
        )
        dtype, benchmark = torch.get_default_dtype(), torch.backends.cudnn.benchmark

        def restore() -> None:
            for k in [k for k in sys.modules if k.split(".")[0] in tops]:
                del sys.modules[k]
            sys.modules.update(saved)
            sys.argv[:], sys.path[:] = argv, path
            os.chdir(cwd)
            for handler in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(handler)
                handler.close()
            root.setLevel(level)
            torch.set_default_dtype(dtype)
            torch.backends.cudnn.benchmark = benchmark

        self._stack.callback(restore)
        self._stack.enter_context(warnings.catch_warnings())
        # upstream's docstrings, under -W error
        warnings.filterwarnings("ignore", message="invalid escape sequence")
        sys.path[:] = [str(self.checkout)] + [p for p in path if p != ""]

    def _stepper(
        self, optimizer: Optimizer, horizons: list[LearnableHorizon]
    ) -> CoordinateDescentStepper:
        """The stepper around the script's weight optimizer; its step hooks write ``tempopt.csv``.

        A row per block and step: ``iteration``, ``block``, ``T`` (used in this step's solve),
        ``dLdT`` (the loss's, without the regulariser; empty when T is fixed) and the NFE of this
        step's training solves (the guard's evaluations are its own, in ``stepper.guard.stats``).
        """
        budgeted = [h for h in horizons if h.budget is not None]
        guard = (
            bool(budgeted) and self.guard and BudgetGuard(budgeted, select=self.upstream.select)
        )
        stepper = CoordinateDescentStepper(
            optimizer, horizons, lr=self.lr, alpha=self.alpha, guard=guard
        )
        rows: list[list[Any]] = []

        def before(opt: Optimizer, args: Any, kwargs: Any) -> None:
            for h in horizons:
                if h.T.grad is not None:
                    _mean_over_ranks(h.T.grad)
                counters = self._counters.pop(id(h), [])
                rows.append(
                    [
                        self.horizons.index(h),
                        f"{h.T.item():.9g}",
                        "" if h.T.grad is None else f"{h.T.grad.item():.9g}",
                        sum(c.nfe_forward for c in counters),
                        sum(c.nfe_backward for c in counters),
                    ]
                )

        def after(opt: Optimizer, args: Any, kwargs: Any) -> None:
            self.iterations += 1
            # a rerun into the same --save starts afresh
            fresh = self.iterations == 1 and not self._resumed
            _write_csv(self.csv_path, [[self.iterations, *row] for row in rows], fresh=fresh)
            rows.clear()
            for hook in self.after_step:  # after the row is written: a hook may stop the run
                hook()

        stepper.register_step_pre_hook(before)
        stepper.register_step_post_hook(after)
        return stepper

    def _wrap_optimizer(self, dotted: str) -> None:
        """Replaces the optimizer class ``dotted`` by a factory that wraps it in the stepper."""
        module_name, _, name = dotted.rpartition(".")
        module = self.load(module_name)
        self.require(module, name)
        original, patch = getattr(module, name), self

        def build(params: Any, *args: Any, **kwargs: Any) -> Optimizer:
            optimizer = original(params, *args, **kwargs)
            given = {id(p) for group in optimizer.param_groups for p in group["params"]}
            times = {id(p) for h in patch.horizons for p in h.parameters()}
            mine = [
                h
                for h, owner in zip(patch.horizons, patch.owners)
                if any(id(p) in given and id(p) not in times for p in owner.parameters())
            ]
            if not mine:  # not over the blocks' weights (e.g. the stepper's own Adam for T)
                return optimizer
            patch.stepper = patch._stepper(optimizer, mine)
            return patch.stepper

        build.__name__ = build.__qualname__ = name
        build.__doc__ = (
            f"{dotted}, wrapped in a CoordinateDescentStepper when it holds a block's weights."
        )
        build.__wrapped__ = original  # type: ignore[attr-defined]
        self.set(module, name, build)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _mean_over_ranks(grad: Tensor) -> None:
    if _distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(grad)
        grad /= torch.distributed.get_world_size()


def _write_csv(path: Path | None, rows: list[list[Any]], fresh: bool) -> None:
    """Appends ``rows`` to ``tempopt.csv``, or starts it anew, header first, if fresh or absent."""
    if path is None or (_distributed() and torch.distributed.get_rank() != 0):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = fresh or not path.exists()
    with open(path, "w" if fresh else "a", newline="") as f:
        writer = csv.writer(f)
        if fresh:
            writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)


def _dotted(obj: Any) -> str:
    """``obj``'s dotted name (an instance's: its class's)."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    obj = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{obj.__module__}.{obj.__qualname__}"


def _git_commit(checkout: Path) -> str | None:
    """The commit of the git checkout ``checkout`` (None if it is not the root of one)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.splitlines()
    return (
        lines[1]
        if out.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == checkout
        else None
    )


def importable(name: str) -> bool:
    """Whether the top-level module ``name`` can be imported."""
    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------- the command line
def main(upstream: Upstream, argv: Sequence[str] | None = None) -> int:
    """The command line ``NAME_patch.py --NAME PATH [--tempopt-*] -- SCRIPT [its arguments]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"{upstream.name}_patch.py"
    head = argv[: argv.index("--")] if "--" in argv else argv
    if "-h" in head or "--help" in head:
        _parser(upstream, prog).print_help()
        return 0
    if "--" not in argv or argv[-1] == "--":
        raise SystemExit(
            f"{prog}: separate the patch's options from the upstream script with --, e.g. "
            f"{prog} --{upstream.name} PATH -- {next(iter(upstream.scripts))} --save /tmp/run"
        )
    i = argv.index("--")
    ns = _parser(upstream, prog).parse_args(argv[:i])
    options = {k[len("tempopt_") :]: v for k, v in vars(ns).items() if k.startswith("tempopt_")}
    try:
        with Patch(upstream, getattr(ns, upstream.name), script=argv[i + 1], **options) as patch:
            # the command's folder must not shadow the checkout
            here = str(Path(sys.argv[0]).resolve().parent)
            sys.path[:] = [p for p in sys.path if p != here or p == str(patch.checkout)]
            if patch.commit not in (None, upstream.commit):
                print(
                    f"{prog}: the checkout is at {patch.commit[:8]}, "
                    f"the patch was checked against {upstream.commit[:8]}; its names match.",
                    file=sys.stderr,
                )
            patch.run(argv[i + 2 :])
    except PatchError as e:
        raise SystemExit(f"{prog}: {e}") from None
    return 0


def _parser(upstream: Upstream, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Run a {upstream.repo} script, unchanged on disk, "
        "with a learnable end time per block.",
    )
    parser.add_argument(
        f"--{upstream.name}",
        type=Path,
        required=True,
        help=f"the checkout (checked against {upstream.commit[:8]})",
    )
    parser.add_argument(
        "--tempopt-lr", type=_number(), default=1e-2, help="Adam's learning rate for T (1e-2)"
    )
    parser.add_argument(
        "--tempopt-alpha",
        type=_number(),
        default=0.0,
        help="the regulariser alpha * |T - t0| (0: off; TO-FLOW's paper: 0.1)",
    )
    parser.add_argument(
        "--tempopt-eps",
        type=_number(positive=True),
        default=0.1,
        help="the clip margin: T stays in [eps, 2 T0 - eps] (0.1)",
    )
    parser.add_argument(
        "--tempopt-budget",
        type=_steps,
        default=None,
        metavar="N",
        help="train each block on N rk4 steps, guarded; upstream's adaptive settings are "
        "the reference that scores the model in eval() (else dopri5 at 1e-5)",
    )
    parser.add_argument(
        "--tempopt-gradient",
        choices=GRADIENTS,
        default="backprop",
        help="on a budget: backprop through the steps (default), checkpoint (each step "
        "recomputed in backward: less memory), or adjoint (upstream's odeint_adjoint on the "
        "steps)",
    )
    parser.add_argument(
        "--tempopt-no-guard",
        dest="tempopt_guard",
        action="store_false",
        help="on a budget: N fixed steps, never checked or grown (a fixed-grid recipe)",
    )
    parser.add_argument(
        "--tempopt-off",
        action="store_true",
        help="the baseline: the same patch with T fixed at T0",
    )
    parser.add_argument(
        "--tempopt-learn-T",
        dest="tempopt_learn_T",
        action="store_true",
        help="learn T on a budget too (a budget keeps T fixed unless asked)",
    )
    for key, text in upstream.flags.items():
        parser.add_argument(
            f"--tempopt-{key.replace('_', '-')}",
            dest=f"tempopt_{key}",
            action="store_true",
            help=text,
        )
    return parser


def _number(positive: bool = False) -> Callable[[str], float]:
    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}"
            )
        return value

    return number


def _steps(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of steps >= 1, got {text}")
    return int(text)
