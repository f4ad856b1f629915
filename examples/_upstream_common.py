"""Shared machinery of the upstream patches (FFJORD, RNODE, OT-Flow): reversible patching, shims and logging.

The three patch modules (:mod:`examples.ffjord_patch`, :mod:`examples.rnode_patch`,
:mod:`examples.otflow_patch`) run someone else's training script unchanged on
disk. What they share lives here:

* :class:`Patcher` sets attributes (and ``sys.modules`` entries) and undoes every
  one of them, in reverse order, when the patch is left.
* :func:`isolated_process` saves and restores what a script run changes in the
  process: ``sys.argv``, ``sys.path``, the working directory, the checkout's
  modules in ``sys.modules``, the root logger's handlers, torch's default dtype
  and ``cudnn.benchmark``.
* :func:`apply_stack_shims` adds the runtime shims for the current stack (a
  ``six`` stub, matplotlib's removed ``cm.get_cmap`` / ``Axes.set_axis_bgcolor``,
  ``torch.load(weights_only=True)`` accepting ``argparse.Namespace``).
* :class:`Registry` holds one :class:`~torch_tempopt.LearnableHorizon` per
  upstream block, and :func:`optimizer_factory` stands in for the optimizer class
  that the script calls: it builds the optimizer over the weights only and wraps
  it in a :class:`LoggingStepper`, which steps T and writes ``tempopt.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import math
import os
import runpy
import sys
import types
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torch_tempopt import CoordinateDescentStepper, LearnableHorizon
from torch_tempopt.nfe import NFECounter

__all__ = [
    "layout_error",
    "CSV_COLUMNS",
    "Block",
    "LoggingStepper",
    "PATCH_MODES",
    "PatchSession",
    "Patcher",
    "Registry",
    "TempoptConfigError",
    "TempoptOptions",
    "UpstreamLayoutError",
    "add_tempopt_arguments",
    "apply_stack_shims",
    "checkout_commit",
    "import_upstream",
    "isolated_process",
    "optimizer_factory",
    "require_attrs",
    "require_params",
    "run_script",
    "save_dir_from_argv",
    "split_cli",
    "top_level_names",
]

#: The columns of ``tempopt.csv``: one row per optimizer step and block.
CSV_COLUMNS = ("iteration", "block", "T", "dLdT", "nfe_forward", "nfe_backward")

#: The stepper modes usable with unmodified scripts (``"exact"`` needs a closure; upstream calls ``step()``).
PATCH_MODES = ("alternate", "joint")

# Captured at import, before any patch: the time optimizer Q is always a plain torch Adam.
_TORCH_ADAM = torch.optim.Adam


class UpstreamLayoutError(RuntimeError):
    """The upstream checkout lacks a name, or a signature, that a patch relies on."""


class TempoptConfigError(ValueError):
    """A ``--tempopt-*`` setting does not fit the upstream model (e.g. ``eps`` >= a block's T0)."""


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class TempoptOptions:
    """The ``--tempopt-*`` settings of a patch.

    Arguments:
        lr: Adam's learning rate for T (the paper: 1e-2).
        alpha: The temporal regulariser's weight (the paper: 0.1).
        eps: The clip margin: T stays in ``[eps, 2 T0 - eps]`` (the paper: 0.1).
        mode: ``"alternate"`` (Algorithm 1) or ``"joint"`` (T in the weight optimizer, an ablation).
        off: The baseline: the same patch with T fixed at T0 (no dL/dT, no extra evaluation).

    """

    lr: float = 1e-2
    alpha: float = 0.1
    eps: float = 0.1
    mode: str = "alternate"
    off: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "alpha", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"--tempopt-{name} must be a number, got {value!r}.")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--tempopt-{name} must be a finite number >= 0, got {value}.")
        if self.eps <= 0:
            raise ValueError(f"--tempopt-eps must be > 0, got {self.eps}; the paper uses 0.1.")
        if self.mode == "exact":
            raise ValueError(
                "--tempopt-mode exact needs optimizer.step(closure), and the upstream scripts call optimizer.step() "
                "without one; use --tempopt-mode alternate (the paper's Algorithm 1)."
            )
        if self.mode not in PATCH_MODES:
            raise ValueError(f"--tempopt-mode must be one of {PATCH_MODES}, got {self.mode!r}.")
        if not isinstance(self.off, bool):
            raise TypeError(f"off must be True or False, got {self.off!r}.")


def add_tempopt_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the shared ``--tempopt-*`` flags to a patch's command line."""
    parser.add_argument("--tempopt-lr", type=float, default=1e-2, help="Adam learning rate for T (default 1e-2)")
    parser.add_argument("--tempopt-alpha", type=float, default=0.1, help="temporal regulariser alpha*|T| (default 0.1)")
    parser.add_argument("--tempopt-eps", type=float, default=0.1, help="clip margin: T in [eps, 2*T0-eps] (default 0.1)")
    parser.add_argument("--tempopt-mode", default="alternate", choices=PATCH_MODES, help="update scheme (default alternate)")
    parser.add_argument("--tempopt-off", action="store_true", help="baseline: the same patch with T fixed at T0")
    parser.add_argument("--tempopt-csv", type=Path, default=None, help="where to write tempopt.csv (default: the script's --save dir)")


def split_cli(argv: Sequence[str], prog: str, example: str) -> tuple[list[str], str, list[str]]:
    """Splits ``[ours..] -- script [theirs..]``; exits with a usage message when ``--`` or the script is missing."""
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit(f"{prog}: separate the patch's options from the upstream script with --, e.g.\n  {example}")
    i = argv.index("--")
    ours, rest = argv[:i], argv[i + 1 :]
    if not rest:
        raise SystemExit(f"{prog}: name the upstream script after --, e.g.\n  {example}")
    return ours, rest[0], rest[1:]


def save_dir_from_argv(argv: Sequence[str], default: str) -> str:
    """The ``--save`` directory the upstream script will use, parsed as argparse would (abbreviations included)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--save", default=default)
    ns, _ = parser.parse_known_args(list(argv))
    return str(ns.save)


# ----------------------------------------------------------------------------------------------- patching
class Patcher:
    """Sets attributes and ``sys.modules`` entries, and undoes them all in reverse order.

    Attributes:
        names: What was patched, as dotted labels, in order.

    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.names: list[str] = []

    def setattr(self, obj: Any, name: str, value: Any, label: str) -> None:
        """Sets ``obj.name = value``; on :meth:`restore` puts back the old value, or deletes the name if it was absent."""
        own = vars(obj)
        had = name in own
        old = own.get(name)
        setattr(obj, name, value)

        def undo() -> None:
            if had:
                setattr(obj, name, old)
            elif name in vars(obj):
                delattr(obj, name)

        self._undo.append(undo)
        self.names.append(label)

    def set_module(self, name: str, module: types.ModuleType, label: str) -> None:
        """Puts ``module`` in ``sys.modules[name]`` until :meth:`restore`."""
        had = name in sys.modules
        old = sys.modules.get(name)
        sys.modules[name] = module

        def undo() -> None:
            if had:
                sys.modules[name] = old  # type: ignore[assignment]
            else:
                sys.modules.pop(name, None)

        self._undo.append(undo)
        self.names.append(label)

    def call_on_restore(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` on :meth:`restore`, in reverse order with the other undos."""
        self._undo.append(fn)

    def restore(self) -> None:
        """Undoes everything, last patch first; runs every undo even if one fails."""
        errors: list[BaseException] = []
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as e:  # noqa: BLE001 - all undos must run
                errors.append(e)
        if errors:
            raise errors[0]


def require_attrs(obj: Any, names: Sequence[str], where: str, error: Callable[[str], Exception]) -> None:
    """Raises ``error(...)`` naming the first of ``names`` that ``obj`` lacks."""
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise error(f"{where} has no attribute(s) {', '.join(missing)}")


def require_params(func: Any, expected: Sequence[str], where: str, error: Callable[[str], Exception]) -> None:
    """Raises ``error(...)`` unless ``func``'s parameters start with ``expected``, in that order."""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError) as e:
        raise error(f"{where} has no inspectable signature ({e})") from e
    if params[: len(expected)] != list(expected):
        raise error(f"{where} has parameters ({', '.join(params)}), expected them to start with ({', '.join(expected)})")


def import_upstream(name: str, checkout: Path, error: Callable[[str], Exception]) -> types.ModuleType:
    """Imports ``name`` from the checkout (which must be first on ``sys.path``); wraps any failure in ``error``."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - whatever breaks, the message must say which module
        raise error(f"cannot import {name} ({type(e).__name__}: {e})") from e
    where = Path(getattr(module, "__file__", "") or "").resolve()
    if checkout.resolve() not in where.parents:
        raise error(f"{name} was imported from {where}, not from the checkout {checkout}")
    return module


def checkout_commit(checkout: Path) -> str | None:
    """The commit a git checkout is at (read from ``.git``), or None."""
    git = checkout / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (checkout / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        return None
    return None


def top_level_names(checkout: Path) -> set[str]:
    """The importable top-level names a checkout provides (packages, namespace packages and modules)."""
    names = set()
    for entry in checkout.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names.add(entry.name)
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names.add(entry.stem)
    return names


@contextlib.contextmanager
def isolated_process(checkout: Path) -> Iterator[None]:
    """Puts the checkout first on ``sys.path`` with fresh modules; restores the process state afterwards.

    Modules of the checkout's top-level names that are already loaded (from
    another checkout, a stand-in, or an unrelated package of the same name)
    are set aside and put back on exit, so two checkouts never share ``lib``.
    """
    names = top_level_names(checkout)
    here = Path(__file__).resolve().parent

    def ours(module_name: str) -> bool:
        return module_name.split(".", 1)[0] in names

    saved_argv, saved_path, saved_cwd = list(sys.argv), list(sys.path), os.getcwd()
    saved_modules = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved_modules:
        del sys.modules[k]
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_dtype = torch.get_default_dtype()
    saved_cudnn = torch.backends.cudnn.benchmark
    sys.path[:] = [str(checkout)] + [p for p in saved_path if p not in ("", str(here))]
    try:
        yield
    finally:
        sys.argv[:] = saved_argv
        sys.path[:] = saved_path
        os.chdir(saved_cwd)
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved_modules)
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(saved_level)
        torch.set_default_dtype(saved_dtype)
        torch.backends.cudnn.benchmark = saved_cudnn


def run_script(checkout: Path, script: str, argv: Sequence[str], error: Callable[[str], Exception]) -> None:
    """Runs ``checkout/script`` as ``__main__`` with ``sys.argv`` set and the checkout as working directory."""
    path = (checkout / script).resolve()
    if not path.is_file():
        raise error(f"the script {script} does not exist in {checkout}")
    sys.argv[:] = [str(path), *argv]
    os.chdir(checkout)
    runpy.run_path(str(path), run_name="__main__")


class PatchSession:
    """What a patch's ``patched(...)`` yields: the registry of horizons, the patched names and a script runner.

    Arguments:
        checkout: The upstream directory.
        script: The script the patch was prepared for, or None (library use).
        registry: The blocks, their horizons and (once built) the stepper.
        names: The patched names, as dotted labels (filled while patching).
        commit: The checkout's git commit, if it is a git checkout.
        default_save: The script's ``--save`` default, where ``tempopt.csv`` goes.
        after_run: Extra checks after the script returned (e.g. that it made an optimizer step).

    """

    def __init__(
        self,
        checkout: Path,
        script: str | None,
        registry: Registry,
        names: list[str],
        commit: str | None,
        default_save: str,
        after_run: Callable[[PatchSession], None] | None = None,
    ) -> None:
        self.checkout = checkout
        self.script = script
        self.registry = registry
        self.names = names
        self.commit = commit
        self.default_save = default_save
        self.after_run = after_run

    @property
    def horizons(self) -> list[LearnableHorizon]:
        """The horizons of the blocks built so far, in construction order."""
        return [b.horizon for b in self.registry.blocks]

    @property
    def stepper(self) -> LoggingStepper | None:
        """The stepper, once the script built its optimizer."""
        return self.registry.stepper

    def run(self, argv: Sequence[str], csv_path: str | Path | None = None) -> None:
        """Runs the script with ``argv``; ``tempopt.csv`` goes to ``csv_path`` or the script's ``--save`` dir.

        Raises:
            UpstreamLayoutError: If blocks were built with a learnable T but no optimizer over them went
                through the patch (T was not trained), or if ``after_run`` finds a problem.

        """
        if self.script is None:
            raise ValueError("script is None: pass script='...' to patched() to run a script.")
        save = save_dir_from_argv(argv, self.default_save)
        self.registry.csv_path = Path(csv_path) if csv_path is not None else self.checkout / save / "tempopt.csv"
        run_script(self.checkout, self.script, argv, self.registry.error)
        learnable = [b for b in self.registry.blocks if b.horizon.T.requires_grad]
        if learnable and self.registry.stepper is None:
            raise self.registry.error(
                f"{self.script} built {len(learnable)} block(s) with a learnable T but no optimizer over them through "
                f"{' / '.join(self.registry.optimizer_names) or 'a patched optimizer'}; T was not trained"
            )
        if self.after_run is not None:
            self.after_run(self)


# ----------------------------------------------------------------------------------------------- shims
def _get_cmap(name: Any = None, lut: int | None = None) -> Any:
    import matplotlib

    cmap = matplotlib.colormaps[name or matplotlib.rcParams["image.cmap"]]
    return cmap if lut is None else cmap.resampled(lut)


def apply_stack_shims(patcher: Patcher, stack: contextlib.ExitStack, *, six: bool = True, matplotlib: bool = True) -> None:
    """Adds the runtime shims for the current stack, each only where it is needed, all undone on exit.

    * ``six``: FFJORD's ``train_misc.py`` does ``import six`` (for ``six.iteritems``);
      a stub with a ``ModuleSpec`` (torch._dynamo calls ``find_spec`` on modules) if it is not installed.
    * ``matplotlib.cm.get_cmap`` (removed in matplotlib 3.9) and ``Axes.set_axis_bgcolor``
      (removed in 2.2), used by FFJORD's ``diagnostics/viz_toy.py`` and ``lib/visualize_flow.py``.
    * ``torch.load``: torch >= 2.6 loads with ``weights_only=True``, which refuses the
      ``argparse.Namespace`` that every upstream checkpoint pickles as ``'args'``;
      :func:`torch.serialization.safe_globals` allows exactly that class, keeping the safe loader.
    * Warnings filter: "invalid escape sequence" (Deprecation/SyntaxWarning when Python compiles
      upstream docstrings such as FFJORD's ``lib/custom_optimizers.py:7``), which ``-W error`` or
      pytest's ``filterwarnings = error`` would turn into a ``SyntaxError`` at import.
    """
    stack.enter_context(warnings.catch_warnings())
    for category in (DeprecationWarning, SyntaxWarning):
        warnings.filterwarnings("ignore", message="invalid escape sequence", category=category)
    if six and importlib.util.find_spec("six") is None:
        stub = types.ModuleType("six")
        stub.__spec__ = importlib.machinery.ModuleSpec("six", None)
        stub.iteritems = lambda d, **kw: iter(d.items(**kw))  # type: ignore[attr-defined]
        stub.itervalues = lambda d, **kw: iter(d.values(**kw))  # type: ignore[attr-defined]
        stub.iterkeys = lambda d, **kw: iter(d.keys(**kw))  # type: ignore[attr-defined]
        stub.string_types = (str,)  # type: ignore[attr-defined]
        stub.PY2, stub.PY3 = False, True  # type: ignore[attr-defined]
        patcher.set_module("six", stub, "sys.modules['six'] (stub)")
    if matplotlib and importlib.util.find_spec("matplotlib") is not None:
        import matplotlib.axes
        import matplotlib.cm

        if not hasattr(matplotlib.cm, "get_cmap"):
            patcher.setattr(matplotlib.cm, "get_cmap", _get_cmap, "matplotlib.cm.get_cmap")
        if not hasattr(matplotlib.axes.Axes, "set_axis_bgcolor"):
            patcher.setattr(
                matplotlib.axes.Axes, "set_axis_bgcolor", matplotlib.axes.Axes.set_facecolor, "matplotlib.axes.Axes.set_axis_bgcolor"
            )
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is not None:
        stack.enter_context(safe_globals([argparse.Namespace]))
        patcher.names.append("torch.serialization.safe_globals([argparse.Namespace])")


# ----------------------------------------------------------------------------------------------- horizons
@dataclass
class Block:
    """One upstream block (a CNF, or OT-Flow's potential) and its horizon.

    Attributes:
        index: The block's number, in construction order (the ``block`` column of ``tempopt.csv``).
        horizon: Its :class:`~torch_tempopt.LearnableHorizon`.
        owner: A weak reference to the upstream module.
        last_sqrt: The value last written to (or read from) the owner's ``sqrt_end_time``, if it has one.
        counters: The NFE counters of this iteration's solves.

    """

    index: int
    horizon: LearnableHorizon
    owner: weakref.ReferenceType
    last_sqrt: float | None = None
    counters: list[NFECounter] = field(default_factory=list)


class Registry:
    """The horizons of one patch session, the stepper that steps them, and their NFE counts.

    Arguments:
        options: The ``--tempopt-*`` settings.
        error: Builds the patch's layout error from a message.
        mirror: Whether each owner keeps ``sqrt_end_time`` (FFJORD, RNODE): it is then
            written after every step (so upstream's ``CNF Time`` log and checkpoints show
            the learned T) and read back when it changed (``load_state_dict``).
        strict: Whether :meth:`check_wired` raises (a training pass with a learnable T
            before any optimizer over it was built).

    """

    def __init__(self, options: TempoptOptions, error: Callable[[str], Exception], *, mirror: bool, strict: bool = True) -> None:
        self.options = options
        self.strict = strict
        self.error = error
        self.mirror = mirror
        self.blocks: list[Block] = []
        self.stepper: LoggingStepper | None = None
        self.csv_path: Path | None = None
        self.optimizer_names: list[str] = []

    def add(self, owner: nn.Module, T0: float, what: str) -> Block:
        """Creates the horizon of a new block, owned (weakly) by ``owner``."""
        try:
            horizon = LearnableHorizon(T0=T0, eps=self.options.eps)
        except ValueError as e:
            raise TempoptConfigError(f"{what} has T0={T0:.6g}: {e} Lower --tempopt-eps below T0.") from e
        if self.options.off:
            horizon.T.requires_grad_(False)
        block = Block(len(self.blocks), horizon, weakref.ref(owner))
        if self.mirror:
            block.last_sqrt = float(owner.sqrt_end_time.item())
        owner.__dict__["_tempopt_block"] = (id(self), block.index)
        self.blocks.append(block)
        return block

    def block_of(self, module: Any) -> Block | None:
        """The block of ``module`` (or of a DataParallel replica of it) in this session, or None."""
        tag = getattr(module, "__dict__", {}).get("_tempopt_block")
        if tag is None or tag[0] != id(self):
            return None
        return self.blocks[tag[1]]

    def adopt_loaded(self, block: Block, module: nn.Module) -> None:
        """Reads T back from ``module.sqrt_end_time`` if it changed since last written (a loaded checkpoint)."""
        if not self.mirror:
            return
        s = float(module.sqrt_end_time.item())
        if s != block.last_sqrt:
            with torch.no_grad():
                block.horizon.T.fill_(s * s)
            block.last_sqrt = s

    def sync_to_owners(self) -> None:
        """Writes every horizon's T to its owner's ``sqrt_end_time`` (as ``sqrt(T)``)."""
        if not self.mirror:
            return
        with torch.no_grad():
            for block in self.blocks:
                owner = block.owner()
                if owner is None:
                    continue
                buf = owner.sqrt_end_time
                buf.copy_(block.horizon.T.detach().sqrt().to(dtype=buf.dtype, device=buf.device))
                block.last_sqrt = float(buf.item())

    def counting(self, block: Block, func: Callable[..., Any]) -> NFECounter:
        """Wraps ``func`` in a fresh NFE counter that is summed into this iteration's row of ``block``."""
        counter = NFECounter(func)
        block.counters.append(counter)
        return counter

    def take_nfe(self, block: Block) -> tuple[int, int]:
        """This iteration's forward and backward NFE of ``block``; clears them."""
        f = sum(c.nfe_forward for c in block.counters)
        b = sum(c.nfe_backward for c in block.counters)
        block.counters.clear()
        return f, b

    def check_wired(self, block: Block, training: bool) -> None:
        """Raises if a block trains with a learnable T but no optimizer was intercepted (T would never move)."""
        if self.strict and self.stepper is None and training and torch.is_grad_enabled() and block.horizon.T.requires_grad:
            names = " or ".join(self.optimizer_names) or "the patched optimizer"
            raise self.error(
                f"block {block.index} runs a training forward pass before any optimizer over its weights was built "
                f"through {names}, so T would never be stepped. Build the optimizer over model.parameters() with "
                "one of those (as the upstream scripts do), or use --tempopt-off."
            )


def _flatten_params(params: Any) -> tuple[list[Any], list[Tensor]]:
    """``params`` as a list of groups (dicts or tensors) and the flat list of tensors in it."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors or of param-group dicts, got a single tensor.")
    items = list(params)
    flat: list[Tensor] = []
    for item in items:
        if isinstance(item, dict):
            group = item.get("params", [])
            flat.extend([group] if isinstance(group, Tensor) else list(group))
        else:
            flat.append(item)
    return items, flat


def _without(items: list[Any], drop: set[int]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            group = item.get("params", [])
            group = [group] if isinstance(group, Tensor) else list(group)
            out.append({**item, "params": [p for p in group if id(p) not in drop]})
        elif id(item) not in drop:
            out.append(item)
    return out


def optimizer_factory(original: type, registry: Registry, label: str) -> Callable[..., Optimizer]:
    """A stand-in for the optimizer class ``original`` that the upstream script calls.

    Called over parameters of patched blocks, it builds ``original`` over those
    parameters minus every horizon's time parameters, and returns it wrapped in
    a :class:`LoggingStepper` over those blocks' horizons. Called over anything
    else, it returns a plain ``original`` instance.
    """
    signature = inspect.signature(original)

    def factory(params: Any, *args: Any, **kwargs: Any) -> Optimizer:
        items, flat = _flatten_params(params)
        time_ids = {id(p) for b in registry.blocks for p in b.horizon.parameters_of_time()}
        given = {id(p) for p in flat}
        blocks = []
        for b in registry.blocks:
            owner = b.owner()
            if owner is not None and any(id(p) in given for p in owner.parameters() if id(p) not in time_ids):
                blocks.append(b)
        optimizer = original(_without(items, time_ids), *args, **kwargs)
        if not blocks:
            return optimizer
        if registry.stepper is not None:
            raise registry.error(
                f"a second optimizer over the blocks' weights was built through {label}; the patch wraps one. "
                "Build one weight optimizer per run."
            )
        opts = registry.options
        stepper = LoggingStepper(
            optimizer,
            [b.horizon for b in blocks],
            registry=registry,
            blocks=blocks,
            lr=opts.lr,
            alpha=opts.alpha,
            mode=opts.mode,
            horizon_optimizer=None if opts.mode == "joint" else (lambda ps: _TORCH_ADAM(ps, lr=opts.lr)),
        )
        registry.stepper = stepper
        return stepper

    factory.__name__ = getattr(original, "__name__", "factory")
    factory.__qualname__ = getattr(original, "__qualname__", factory.__name__)
    factory.__doc__ = f"torch_tempopt patch of {label}: builds it over the weights and wraps it to step T.\n\n{original.__doc__ or ''}"
    factory.__wrapped__ = original  # type: ignore[attr-defined]
    factory.__signature__ = signature  # type: ignore[attr-defined]
    return factory


def _average_over_ranks(params: list[Tensor]) -> None:
    """Averages the gradients of ``params`` over a ``torch.distributed`` process group, if one runs.

    DDP only reduces the gradients of the model's parameters; T is not one of them.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world <= 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


class LoggingStepper(CoordinateDescentStepper):
    """A :class:`~torch_tempopt.CoordinateDescentStepper` that also writes ``tempopt.csv`` and mirrors T upstream.

    Each :meth:`step` averages dL/dT over distributed ranks (if any), steps the
    weights and T, writes T to the owners' ``sqrt_end_time``, and appends one row
    per block to the registry's CSV: ``iteration, block, T`` (the T of this
    iteration's solve, before the update), ``dLdT`` (the loss gradient, without
    the regulariser; empty when T is fixed), ``nfe_forward, nfe_backward``.

    Arguments:
        optimizer: The weight optimizer (without the time parameters).
        horizons: The horizons of ``blocks``, in the same order.
        registry: The session's :class:`Registry`.
        blocks: The blocks whose horizons are stepped.
        kwargs: Passed to :class:`~torch_tempopt.CoordinateDescentStepper`.

    """

    def __init__(self, optimizer: Optimizer, horizons: list[LearnableHorizon], *, registry: Registry, blocks: list[Block], **kwargs: Any) -> None:
        super().__init__(optimizer, horizons, **kwargs)
        self._registry = registry
        self._blocks = blocks
        self._iteration = 0
        self._csv_file: Any = None
        self._csv_writer: Any = None

    @property
    def iterations(self) -> int:
        """How many times :meth:`step` was called (the ``iteration`` column)."""
        return self._iteration

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        used = [b.horizon.T.item() for b in self._blocks]
        _average_over_ranks([p for b in self._blocks for p in b.horizon.parameters_of_time()])
        loss = super().step(closure)
        self._registry.sync_to_owners()
        self._iteration += 1
        self._write_rows(used)
        return loss

    def _write_rows(self, used: list[float]) -> None:
        rows = []
        for k, block in enumerate(self._blocks):
            nfe_f, nfe_b = self._registry.take_nfe(block)
            dldt = self.stats["horizons"][k]["dLdT"]
            rows.append([self._iteration, block.index, f"{used[k]:.9g}", "" if dldt is None else f"{dldt:.9g}", nfe_f, nfe_b])
        path = self._registry.csv_path
        if path is None:
            return
        if self._csv_file is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not path.exists() or path.stat().st_size == 0
            self._csv_file = open(path, "a", newline="")  # noqa: SIM115 - closed by close()
            self._csv_writer = csv.writer(self._csv_file)
            if fresh:
                self._csv_writer.writerow(CSV_COLUMNS)
        self._csv_writer.writerows(rows)
        self._csv_file.flush()

    def close(self) -> None:
        """Closes ``tempopt.csv``."""
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
            self._csv_writer = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Loads a stepper state, or a plain optimizer state (an unpatched upstream checkpoint) into the weights' optimizer."""
        if isinstance(state_dict, dict) and "optimizer" in state_dict and "horizons" in state_dict:
            super().load_state_dict(state_dict)
        else:
            self.optimizer.load_state_dict(state_dict)


def layout_error(cls: type[UpstreamLayoutError], patch: str, verified: str, checkout: Path) -> Callable[[str], UpstreamLayoutError]:
    """A factory of ``cls`` errors saying that ``patch`` (verified on ``verified``, ``owner/repo@commit``)
    does not recognise ``checkout``, with the missing detail appended."""

    def make(detail: str) -> UpstreamLayoutError:
        return cls(f"{patch} (verified on {verified}) does not recognise the checkout {checkout}: {detail}.")

    return make
