r"""E-NF's E(n)-equivariant EGNN dynamics as the harness CNF's vector field, for DW-4.

E-NF (E(n) Equivariant Normalizing Flows, Satorras et al., 2021,
https://arxiv.org/abs/2105.09016) models DW-4 (4 particles in 2-D) with a CNF whose field is
``egnn.models.EGNN_dynamics``: an EGNN over the fully connected particle graph whose coordinate
update, less the input and less its mean over particles, is the velocity, so the field is
equivariant to rotations, reflections and permutations of the particles and keeps the centre of
mass fixed. :func:`build_egnn_model` puts that field in one harness :class:`~.cnf.CNF` block
(exact divergence), with the interface of :func:`~.cnf.build_toy_model`'s models, so the
reverse-KL energy benchmark can train it as it trains the MLP field.

The upstream code is never copied into this project: it is imported at run time from the user's
checkout of vgsatorras/en_flows (its ``egnn`` and ``flows`` packages, loaded from the checkout's
directory by :mod:`importlib` and taken out of :data:`sys.modules` again, so that nothing of it is
left importable by name), named by the ``enf_dir`` argument or, by convention, the
:data:`ENF_ENV` environment variable. Checked against
vgsatorras/en_flows@2fd18bf1db59184e6bdb9709fc3c02fa85fafec2 (torch 2.13, torchdiffeq 0.2.5).

E-NF's DW-4 field (``main_dw4_lj13.py --data dw4 --model egnn_dynamics --n_layers 3 --nf 32``,
the README's command, and the script's defaults, as ``dw4_experiment/models.py`` builds it)::

    EGNN_dynamics(n_particles=4, n_dimension=2, hidden_nf=32, device=..., act_fn=SiLU(),
                  n_layers=3, recurrent=True, tanh=True, attention=True, condition_time=True,
                  mode="egnn_dynamics", agg="sum")

E-NF trains it with a Hutchinson trace; here the trace is exact (8 backward passes).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .cnf import SequentialFlow, _build

__all__ = ["COMMIT", "DW4_ARGS", "ENF_ENV", "EGNNNet", "build_egnn_model", "enf_dynamics_class"]

#: The en_flows commit this module was checked against.
COMMIT = "2fd18bf1db59184e6bdb9709fc3c02fa85fafec2"

#: The environment variable that, by convention (the tests, the benchmark commands), names the
#: directory of a checkout of vgsatorras/en_flows; :func:`build_egnn_model` takes the directory as
#: its ``enf_dir`` argument and reads no environment itself.
ENF_ENV = "TEMPOPT_ENF_DIR"

#: ``EGNN_dynamics``' arguments for DW-4 with ``--model egnn_dynamics`` (E-NF's README command and
#: ``main_dw4_lj13.py``'s defaults: ``--nf 32 --n_layers 3``, attention, tanh, time conditioning,
#: sum aggregation); ``act_fn`` (a fresh ``nn.SiLU()``) and ``device`` are added per model.
DW4_ARGS: dict[str, Any] = {
    "n_particles": 4,
    "n_dimension": 2,
    "hidden_nf": 32,
    "n_layers": 3,
    "recurrent": True,
    "tanh": True,
    "attention": True,
    "condition_time": True,
    "mode": "egnn_dynamics",
    "agg": "sum",
}

_PACKAGES = ("flows", "egnn")  # egnn.models imports flows.utils
_LOADED: dict[Path, type] = {}


_FILES = ("egnn/models.py", "egnn/gcl.py", "flows/__init__.py", "flows/utils.py")


def _checkout(enf_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(enf_dir).expanduser().resolve() if enf_dir else None
    if path is None or not all((path / f).is_file() for f in _FILES):
        raise ValueError(
            f"enf_dir must be a checkout of vgsatorras/en_flows (with {', '.join(_FILES)}), got "
            f"{str(enf_dir)!r}; clone https://github.com/vgsatorras/en_flows and pass its "
            f"directory (or set {ENF_ENV} to it)."
        )
    return path


def enf_dynamics_class(enf_dir: str | os.PathLike[str]) -> type:
    """``egnn.models.EGNN_dynamics`` of the checkout in ``enf_dir``, imported once per checkout.

    The checkout's ``flows`` and ``egnn`` packages are loaded from ``enf_dir`` (not from the module
    search path); whatever :data:`sys.modules` held under their names before is put back after.
    """
    path = _checkout(enf_dir)
    if path in _LOADED:
        return _LOADED[path]
    prefixes = tuple(f"{p}." for p in _PACKAGES)

    def ours(name: str) -> bool:
        return name in _PACKAGES or name.startswith(prefixes)

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    try:
        for package in _PACKAGES:
            spec = importlib.machinery.PathFinder.find_spec(package, [str(path)])
            if spec is None:
                raise ImportError(f"{package} is not a package in {path}")
            module = importlib.util.module_from_spec(spec)  # egnn has no __init__.py
            sys.modules[package] = module
            if spec.loader is not None:
                spec.loader.exec_module(module)
        models = importlib.import_module("egnn.models")
        cls = models.EGNN_dynamics
    except Exception as e:  # noqa: BLE001 - whatever breaks, the message names the checkout
        raise ImportError(
            f"cannot import egnn.models.EGNN_dynamics from the en_flows checkout {path} "
            f"({type(e).__name__}: {e}); this module was checked against en_flows@{COMMIT[:8]}."
        ) from e
    finally:
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
    _LOADED[path] = cls
    return cls


class EGNNNet(nn.Module):
    r"""E-NF's ``EGNN_dynamics`` as a harness field: ``net(t, x)`` on ``x`` of shape (batch, 8).

    ``x[b]`` is the particles' coordinates in E-NF's layout, ``(x_1, y_1, x_2, y_2, ...)`` (its
    ``view(batch * n_particles, n_dimension)``); the result is upstream's velocity, mean over
    particles removed, flattened the same way. ``t`` is a scalar (upstream multiplies the node
    features by it). The parameters are upstream's, under ``dynamics``. Upstream makes its node
    features at the default dtype and on the device it was built for; the call makes them match
    ``x`` (float32 or float64, any device) without changing upstream.

    Arguments:
        enf_dir: The directory of a checkout of vgsatorras/en_flows.
        **overrides: Replace entries of :data:`DW4_ARGS` (``hidden_nf``, ``n_layers``, ...).
    """

    def __init__(self, enf_dir: str | os.PathLike[str], **overrides: Any) -> None:
        super().__init__()
        unknown = sorted(set(overrides) - set(DW4_ARGS) - {"act_fn"})
        if unknown:
            raise TypeError(
                f"unknown EGNN_dynamics arguments {unknown}; known: {sorted(DW4_ARGS)}."
            )
        kwargs = {**DW4_ARGS, "act_fn": nn.SiLU(), **overrides}
        self.n_particles, self.n_dimension = int(kwargs["n_particles"]), int(kwargs["n_dimension"])
        self.dynamics = enf_dynamics_class(enf_dir)(device="cpu", **kwargs)

    @property
    def dim(self) -> int:
        return self.n_particles * self.n_dimension

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}.")
        dyn = self.dynamics
        if torch.device(dyn.device) != x.device:  # upstream's node features and edge cache
            dyn.device, dyn._edges_dict = x.device, {}
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.numel() != 1:
            raise ValueError(f"t must be a scalar, got shape {tuple(t.shape)}.")
        default = torch.get_default_dtype()
        if x.dtype != default:
            torch.set_default_dtype(x.dtype)  # upstream's torch.ones(...) node features
        try:
            vel = dyn(t.reshape(()), x)
        finally:
            if x.dtype != default:
                torch.set_default_dtype(default)
        return vel.reshape(x.shape)


def build_egnn_model(
    enf_dir: str | os.PathLike[str],
    *,
    T0: float = 1.0,
    count: bool = False,
    divergence: str = "exact",
    noise: str = "rademacher",
    kinetic: float = 0.0,
    jacobian: float = 0.0,
    egnn_kwargs: dict[str, Any] | None = None,
    **cnf_kwargs: Any,
) -> SequentialFlow:
    """One CNF block on R^8 (DW-4) of :class:`EGNNNet`, as :func:`~.cnf.build_toy_model` builds.

    ``model(z, logpz, reverse=True)`` returns ``(x, logq, regs)``; ``model.chain[0].horizon`` is
    the block's horizon; ``count=True`` wraps the field for :func:`~.cnf.nfe`. ``kinetic`` and
    ``jacobian`` are RNODE's coefficients, ``egnn_kwargs`` override :data:`DW4_ARGS`, and
    ``cnf_kwargs`` (``time_mode``, ``budget``, ``adjoint``, ``solver_kwargs``, ``eps``) go to
    :class:`~.cnf.CNF`.
    """
    _checkout(enf_dir)  # the one-sentence error before anything else
    return _build(
        lambda: EGNNNet(enf_dir, **(egnn_kwargs or {})),
        1,
        divergence=divergence,
        noise=noise,
        kinetic=kinetic,
        jacobian=jacobian,
        count=count,
        T0=T0,
        **cnf_kwargs,
    )
