r"""The reference continuous normalizing flow (FFJORD style) with a learnable end time.

A CNF block transports samples :math:`z(t_0) = x` along :math:`\dot z = f(z, t)` to
:math:`z(T)` while integrating the instantaneous change of variables
:math:`\frac{d}{dt} \log p(z(t)) = -\operatorname{tr} \frac{\partial f}{\partial z}`.
Here the end time :math:`T` of every block is held by a
:class:`torch_tempopt.LearnableHorizon`, so TO-FLOW, FFJORD (fixed :math:`T`) and
STEER (random :math:`T` during training) are three configurations of one model,
and RNODE is a fourth (non-zero ``kinetic``/``jacobian`` coefficients).

Conventions, as in FFJORD: ``block(x, logpx)`` returns :math:`z(T)` and
``logpx`` :math:`+ \int_{t_0}^{T} -\operatorname{tr} J \, dt`; starting from zeros,
:math:`\log p(x) = \log \mathcal{N}(z(T)) - \Delta`, which is what
:func:`nll_and_reg` computes. Log-densities are per sample, of shape ``(batch,)``.

References:
    | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
    | Grathwohl et al., 2019 (https://arxiv.org/abs/1810.01367)

    | How to train your neural ODE: the world of Jacobian and kinetic regularization (RNODE)
    | Finlay et al., 2020 (https://arxiv.org/abs/2002.02798)

    | STEER: Simple Temporal Regularization For Neural ODEs
    | Ghosh et al., 2020 (https://arxiv.org/abs/2006.10711)

    | TO-FLOW: Efficient Continuous Normalizing Flows with Temporal Optimization adjoint
      with Moving Speed
    | Du et al., 2022 (https://arxiv.org/abs/2203.10335)
"""

from __future__ import annotations

__all__ = [
    "CNF",
    "DEFAULT_SOLVER_KWARGS",
    "TIME_MODES",
    "ConcatConv2d",
    "ConcatLinear",
    "ConcatSquashConv2d",
    "ConcatSquashLinear",
    "ConvODEnet",
    "FlatODEnet",
    "FlowOutput",
    "ODEfunc",
    "ODEnet",
    "SequentialFlow",
    "bits_per_dim_and_reg",
    "build_image_model",
    "build_toy_model",
    "end_times",
    "network_parameters",
    "nfe",
    "nll_and_reg",
    "sample",
    "standard_normal_logprob",
    "time_parameters",
]

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torchdiffeq
from torch import Tensor, nn

from torch_tempopt import LearnableHorizon, count_nfe

from .data import bits_per_dim, dequantize, logit_transform

DEFAULT_SOLVER_KWARGS: dict[str, Any] = {"method": "dopri5", "atol": 1e-5, "rtol": 1e-5}
"""FFJORD's solver settings: dopri5 with absolute and relative tolerances 1e-5."""

TIME_MODES: tuple[str, ...] = ("learn", "fixed", "steer")
"""How the builders treat the end time: TO-FLOW, FFJORD and STEER."""


def _choose(options: dict[str, Any], value: str, argument: str) -> Any:
    """Looks ``value`` up in ``options`` or raises a ValueError naming ``argument``."""
    if value not in options:
        raise ValueError(f"{argument} must be one of {tuple(options)}, got {value!r}.")
    return options[value]


def _time_as(t: Tensor | float, x: Tensor) -> Tensor:
    """The time ``t`` as a tensor of ``x``'s dtype and device (keeping its graph)."""
    return torch.as_tensor(t, dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------- layers


class ConcatLinear(nn.Module):
    r"""A linear layer that sees the time as one more input: :math:`W [t, x] + b`.

    Arguments:
        dim_in: The input features.
        dim_out: The output features.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Applies the layer.

        Arguments:
            t: The time, a scalar.
            x: The input, of shape ``(batch, dim_in)``.

        Returns:
            The output, of shape ``(batch, dim_out)``.
        """
        tt = _time_as(t, x).expand(x.shape[0], 1)
        return self.linear(torch.cat([tt, x], dim=1))


class ConcatSquashLinear(nn.Module):
    r"""FFJORD's time-gated linear layer.

    .. math:: (W x + b) \odot \sigma(g_1 t + g_0) + h t

    Arguments:
        dim_in: The input features.
        dim_out: The output features.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Applies the layer.

        Arguments:
            t: The time, a scalar.
            x: The input, of shape ``(batch, dim_in)``.

        Returns:
            The output, of shape ``(batch, dim_out)``.
        """
        tt = _time_as(t, x).reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class ConcatConv2d(nn.Module):
    r"""A convolution that sees the time as one more input channel, constant over the image.

    Arguments:
        dim_in: The input channels.
        dim_out: The output channels.
        kernel_size: The kernel size; the padding keeps the spatial size for odd kernels.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in + 1, dim_out, kernel_size, padding=kernel_size // 2)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Applies the layer.

        Arguments:
            t: The time, a scalar.
            x: The input, of shape ``(batch, dim_in, height, width)``.

        Returns:
            The output, of shape ``(batch, dim_out, height, width)``.
        """
        tt = _time_as(t, x).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([tt, x], dim=1))


class ConcatSquashConv2d(nn.Module):
    r"""A convolution with FFJORD's time gate and time bias per output channel.

    .. math:: (k * x + b) \odot \sigma(g_1 t + g_0) + h t

    Arguments:
        dim_in: The input channels.
        dim_out: The output channels.
        kernel_size: The kernel size; the padding keeps the spatial size for odd kernels.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size, padding=kernel_size // 2)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Applies the layer.

        Arguments:
            t: The time, a scalar.
            x: The input, of shape ``(batch, dim_in, height, width)``.

        Returns:
            The output, of shape ``(batch, dim_out, height, width)``.
        """
        tt = _time_as(t, x).reshape(1, 1)
        gate = torch.sigmoid(self.hyper_gate(tt)).reshape(1, -1, 1, 1)
        bias = self.hyper_bias(tt).reshape(1, -1, 1, 1)
        return self.conv(x) * gate + bias


_LINEAR_LAYERS: dict[str, type[nn.Module]] = {"concatsquash": ConcatSquashLinear, "concat": ConcatLinear}
_CONV_LAYERS: dict[str, type[nn.Module]] = {"concatsquash": ConcatSquashConv2d, "concat": ConcatConv2d}
_NONLINEARITIES: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus}


class _TimeConditionedStack(nn.Module):
    """Time-conditioned layers with a nonlinearity between them (none after the last)."""

    def __init__(self, layers: Sequence[nn.Module], nonlinearity: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.activation = _choose(_NONLINEARITIES, nonlinearity, "nonlinearity")()

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Evaluates the velocity :math:`f(x, t)`.

        Arguments:
            t: The time, a scalar.
            x: The state.

        Returns:
            The velocity, shaped like ``x``.
        """
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            if i < last:
                x = self.activation(x)
        return x


def _widths(dim: int, hidden: Sequence[int], argument: str) -> list[int]:
    """``[dim, *hidden, dim]`` after checking that every width is a positive int."""
    widths = [dim, *hidden, dim]
    if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
        raise ValueError(f"{argument} and the data dimension must be positive ints, got {dim} and {tuple(hidden)}.")
    return widths


class ODEnet(_TimeConditionedStack):
    r"""A time-conditioned MLP :math:`f(z, t): \mathbb{R}^d \to \mathbb{R}^d` (FFJORD's toy net).

    Arguments:
        dim: The data dimension :math:`d`.
        hidden_dims: The hidden widths, e.g. FFJORD's ``(64, 64, 64)``.
        layer_type: ``"concatsquash"`` (:class:`ConcatSquashLinear`) or ``"concat"``
            (:class:`ConcatLinear`).
        nonlinearity: ``"tanh"`` or ``"softplus"``, between layers.

    Raises:
        ValueError: For an unknown ``layer_type`` or ``nonlinearity``, or non-positive widths.

    Example:
        >>> net = ODEnet(2, (16, 16))
        >>> net(0.5, torch.zeros(3, 2)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64, 64),
        layer_type: str = "concatsquash",
        nonlinearity: str = "tanh",
    ) -> None:
        layer = _choose(_LINEAR_LAYERS, layer_type, "layer_type")
        widths = _widths(dim, hidden_dims, "hidden_dims")
        super().__init__([layer(a, b) for a, b in zip(widths[:-1], widths[1:])], nonlinearity)


class ConvODEnet(_TimeConditionedStack):
    r"""A time-conditioned CNN on images that keeps the shape ``(C, H, W)`` (3x3 kernels).

    Arguments:
        channels: The image channels :math:`C`.
        hidden_channels: The hidden channel counts, e.g. ``(64, 64, 64)``.
        layer_type: ``"concat"`` (:class:`ConcatConv2d`, FFJORD's image default) or
            ``"concatsquash"`` (:class:`ConcatSquashConv2d`).
        nonlinearity: ``"softplus"`` or ``"tanh"``, between layers.

    Raises:
        ValueError: For an unknown ``layer_type`` or ``nonlinearity``, or non-positive widths.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: Sequence[int] = (64, 64, 64),
        layer_type: str = "concat",
        nonlinearity: str = "softplus",
    ) -> None:
        layer = _choose(_CONV_LAYERS, layer_type, "layer_type")
        widths = _widths(channels, hidden_channels, "hidden_channels")
        super().__init__([layer(a, b) for a, b in zip(widths[:-1], widths[1:])], nonlinearity)


class FlatODEnet(ODEnet):
    r"""An :class:`ODEnet` on flattened images: ``(B, C, H, W) -> (B, C*H*W) -> MLP -> (B, C, H, W)``.

    FFJORD's tabular models (MINIBOONE, 43 dimensions) are MLPs of this kind; an 8x8 image
    is a 64-dimensional vector, and the MLP costs a fraction of a convolution on the CPU.

    Arguments:
        shape: The image shape ``(C, H, W)``.
        hidden_dims: The hidden widths.
        layer_type: ``"concatsquash"`` or ``"concat"``.
        nonlinearity: ``"tanh"`` or ``"softplus"``.

    Raises:
        ValueError: For a shape that is not three positive ints, or as :class:`ODEnet`.

    Example:
        >>> net = FlatODEnet((1, 8, 8), (32,))
        >>> net(0.5, torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(
        self,
        shape: Sequence[int],
        hidden_dims: Sequence[int] = (256, 256),
        layer_type: str = "concatsquash",
        nonlinearity: str = "softplus",
    ) -> None:
        shape = tuple(shape)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape):
            raise ValueError(f"shape must be three positive ints (C, H, W), got {shape!r}.")
        dim = shape[0] * shape[1] * shape[2]
        super().__init__(dim, hidden_dims, layer_type, nonlinearity)
        self.shape = shape

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Evaluates the velocity on ``x`` of shape ``(batch, C, H, W)``."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (batch, *{self.shape}), got {tuple(x.shape)}.")
        return super().forward(t, x.reshape(x.shape[0], -1)).reshape(x.shape)


# --------------------------------------------------------------------------- dynamics


def _vjp(output: Tensor, inputs: Tensor, cotangent: Tensor, create_graph: bool) -> Tensor:
    """``cotangent^T d output / d inputs``, zeros where ``output`` does not depend on ``inputs``."""
    if not output.requires_grad:
        return torch.zeros_like(inputs)
    (grad,) = torch.autograd.grad(
        output, inputs, cotangent, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(inputs) if grad is None else grad


class ODEfunc(nn.Module):
    r"""The augmented CNF dynamics: velocity, divergence and RNODE integrands.

    The state is a tuple ``(z, logp, *regs)`` and the derivative is

    .. math::
        \left( f(z, t), \; -\operatorname{tr} J, \;
        \tfrac{1}{2d}\|f(z, t)\|^2 \text{ (kinetic)}, \;
        \tfrac{1}{d}\|\varepsilon^\top J\|^2 \text{ (jacobian)} \right),
        \qquad J = \frac{\partial f}{\partial z}, \quad d = \dim z,

    where each regulariser is present only if its coefficient is positive, in the
    order of :attr:`reg_names`. Its integral over the block's interval is RNODE's
    penalty; the coefficient only weighs it (in :class:`CNF`), the integrand is raw.
    The integrands are RNODE's own (``quadratic_cost`` and ``divergence_approx`` in
    cfinlay/ffjord-rnode): means over the dimensions, the kinetic one halved, so that a
    coefficient means the same as RNODE's ``--kinetic-energy`` / ``--jacobian-norm2`` and
    the penalty has the per-dimension scale of a loss in bits/dim.

    ``divergence="exact"`` computes :math:`\operatorname{tr} J` with one
    backward pass per dimension (fine for low dimensions) and then the Frobenius
    integrand exactly, :math:`\|J\|_F^2`. ``divergence="hutchinson"`` uses one
    probe :math:`\varepsilon` with :math:`\mathbb{E}[\varepsilon \varepsilon^\top] = I`:
    :math:`\operatorname{tr} J \approx \varepsilon^\top J \varepsilon` and
    :math:`\|J\|_F^2 \approx \|\varepsilon^\top J\|^2`, both from one
    vector-Jacobian product. The probe is drawn once per solve: :meth:`before_odeint`
    clears it and the next evaluation draws it from torch's global RNG in the shape of
    ``z``; it then stays fixed, so the field is a deterministic function of
    ``(t, state)`` that adaptive solvers can integrate (redrawing it at each
    evaluation makes the field rough and the step count explode).

    The divergence graph is built (``create_graph=True``) only when gradients are
    enabled by the caller; under :func:`torch.no_grad` (evaluation, or the forward
    pass of an adjoint solve) the outputs come back detached.

    Samples must not interact (the exact divergence takes per-sample traces of the
    batch Jacobian's diagonal blocks).

    Arguments:
        diffeq: The velocity network, called as ``diffeq(t, z)``.
        divergence: ``"exact"`` or ``"hutchinson"``.
        noise: The Hutchinson probe distribution: ``"rademacher"`` or ``"gaussian"``.
        kinetic: RNODE's kinetic energy coefficient; the integrand is present if > 0.
        jacobian: RNODE's Frobenius norm coefficient; the integrand is present if > 0.

    Raises:
        ValueError: For an unknown ``divergence`` or ``noise``, or a negative coefficient.
    """

    def __init__(
        self,
        diffeq: nn.Module,
        divergence: str = "exact",
        noise: str = "rademacher",
        kinetic: float = 0.0,
        jacobian: float = 0.0,
    ) -> None:
        super().__init__()
        _choose({"exact": None, "hutchinson": None}, divergence, "divergence")
        _choose({"rademacher": None, "gaussian": None}, noise, "noise")
        if kinetic < 0 or jacobian < 0:
            raise ValueError(f"kinetic and jacobian must be >= 0, got {kinetic} and {jacobian}.")
        self.diffeq = diffeq
        self.divergence = divergence
        self.noise = noise
        self.kinetic = float(kinetic)
        self.jacobian = float(jacobian)
        self._probe: Tensor | None = None

    @property
    def reg_coeffs(self) -> dict[str, float]:
        """The active regularisers and their coefficients, in state order."""
        coeffs = {"kinetic": self.kinetic, "jacobian": self.jacobian}
        return {name: c for name, c in coeffs.items() if c > 0}

    @property
    def reg_names(self) -> tuple[str, ...]:
        """The names of the extra states after ``(z, logp)``, in order."""
        return tuple(self.reg_coeffs)

    def before_odeint(self, noise: Tensor | None = None) -> None:
        """Starts a new solve: sets the Hutchinson probe, or clears it to be redrawn.

        Arguments:
            noise: The probe to hold fixed during the solve, shaped like ``z``; if
                :py:`None`, the next evaluation draws one from torch's global RNG.
        """
        self._probe = noise

    def _draw_probe(self, z: Tensor) -> Tensor:
        """A Rademacher or Gaussian probe shaped like ``z``."""
        if self.noise == "gaussian":
            return torch.randn_like(z)
        return torch.randint_like(z, 0, 2) * 2 - 1

    def forward(self, t: Tensor | float, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Evaluates the augmented dynamics.

        Arguments:
            t: The time, a scalar.
            state: ``(z, logp, *regs)`` with ``z`` of shape ``(batch, ...)`` and one
                per-sample tensor for ``logp`` and each regulariser in :attr:`reg_names`.

        Returns:
            ``(dz, -div, *integrands)``, each shaped like its state.

        Raises:
            ValueError: If the state does not have one entry per active regulariser, or
                the probe set by :meth:`before_odeint` does not match ``z``.
        """
        z, logp, *regs = state
        names = self.reg_names
        if len(regs) != len(names):
            raise ValueError(
                f"state must be (z, logp, *regs) with regs for {names}, got {len(regs)} extra entries; "
                "build the initial state from ODEfunc.reg_names."
            )
        create_graph = torch.is_grad_enabled()
        batch = z.shape[0]
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.diffeq(t, z)
            if self.divergence == "exact":
                div, frobenius = self._exact(dz, z, create_graph, "jacobian" in names)
            else:
                div, frobenius = self._hutchinson(dz, z, create_graph)
        integrands: dict[str, Tensor] = {}
        if "kinetic" in names:
            integrands["kinetic"] = 0.5 * dz.pow(2).reshape(batch, -1).mean(dim=1)
        if frobenius is not None and "jacobian" in names:
            integrands["jacobian"] = frobenius
        out = (dz, -div.reshape(logp.shape), *(integrands[n].reshape(r.shape) for n, r in zip(names, regs)))
        if not create_graph:
            out = tuple(o.detach() for o in out)
        return out

    def _exact(self, dz: Tensor, z: Tensor, create_graph: bool, frobenius: bool) -> tuple[Tensor, Tensor | None]:
        """The trace (and squared Frobenius norm over the dimension) of each sample's Jacobian, row by row."""
        batch = z.shape[0]
        flat = dz.reshape(batch, -1)
        div = flat.new_zeros(batch)
        squares = flat.new_zeros(batch) if frobenius else None
        ones = flat.new_ones(batch)
        for i in range(flat.shape[1]):
            row = _vjp(flat[:, i], z, ones, create_graph).reshape(batch, -1)  # row i of each J
            div = div + row[:, i]
            if squares is not None:
                squares = squares + row.pow(2).sum(dim=1)
        return div, None if squares is None else squares / flat.shape[1]

    def _hutchinson(self, dz: Tensor, z: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
        r"""Hutchinson's trace estimate and :math:`\|\varepsilon^\top J\|^2 / d` with the held probe."""
        if self._probe is None:
            self._probe = self._draw_probe(z)
        probe = self._probe
        if probe.shape != z.shape:
            raise ValueError(
                f"the Hutchinson probe has shape {tuple(probe.shape)} but z has {tuple(z.shape)}; "
                "call before_odeint() at the start of each solve."
            )
        probe = probe.to(dtype=z.dtype, device=z.device)
        row = _vjp(dz, z, probe, create_graph)  # probe^T J
        batch = z.shape[0]
        div = (row * probe).reshape(batch, -1).sum(dim=1)
        return div, row.pow(2).reshape(batch, -1).mean(dim=1)


# --------------------------------------------------------------------------- flows


class FlowOutput(NamedTuple):
    """What a flow returns; unpacks as ``z, logp, regs``.

    Attributes:
        z: The transported samples.
        logp: The input ``logp`` plus the integral of ``-tr J`` along the solve, ``(batch,)``.
        regs: Per-sample RNODE penalties (coefficient times integral), by name.
    """

    z: Tensor
    logp: Tensor
    regs: dict[str, Tensor]


def _find_odefunc(module: nn.Module) -> ODEfunc:
    """The :class:`ODEfunc` inside ``module`` (itself, or wrapped e.g. by ``count_nfe``)."""
    for sub in module.modules():
        if isinstance(sub, ODEfunc):
            return sub
    raise TypeError(
        f"CNF needs an ODEfunc (possibly wrapped, e.g. by torch_tempopt.count_nfe), got {type(module).__name__}."
    )


class CNF(nn.Module):
    r"""One CNF block whose end time :math:`T` is a :class:`torch_tempopt.LearnableHorizon`.

    Three ways to treat :math:`T`:

    - TO-FLOW (``learn_T=True``): the horizon integrates and attaches
      :math:`\partial L / \partial T` to ``self.horizon.T``; step it with
      ``CoordinateDescentStepper(Adam(network_parameters(model)), model)``, which finds
      the horizons (keep ``T`` out of the weight optimizer: see :func:`network_parameters`).
    - FFJORD (``learn_T=False``): ``self.horizon.T`` is frozen at ``T0``
      (``requires_grad=False``) and the block integrates with plain
      :func:`torchdiffeq.odeint` over the detached grid :math:`[t_0, T_0]`.
    - STEER (``learn_T=False, steer_b=b``): in training mode each forward draws
      :math:`T \sim U[T_0 - b, T_0 + b]` from torch's global RNG; in evaluation mode
      :math:`T = T_0`. Ghosh et al. take :math:`b = T_0 - 0.25` (see
      :func:`build_toy_model`).

    ``forward(..., fixed_T=T)`` overrides all three for one call (a detached, plain
    :func:`torchdiffeq.odeint` solve to ``T``), e.g. to evaluate at another horizon.

    Arguments:
        odefunc: An :class:`ODEfunc`, possibly wrapped (e.g. by
            :func:`torch_tempopt.count_nfe`); the wrapper is what gets integrated.
        T0: The initial (TO-FLOW) or fixed (FFJORD) end time; FFJORD uses 0.5 on toy
            data and 1.0 on images.
        learn_T: Whether :math:`T` is learned.
        solver_kwargs: Keyword arguments of the solver, e.g. ``method``, ``atol``,
            ``rtol`` (default :data:`DEFAULT_SOLVER_KWARGS`).
        t0: The start time.
        steer_b: The half-width of STEER's sampling interval, in :math:`[0, T_0 - t_0)`.
        adjoint: Whether to solve with :func:`torchdiffeq.odeint_adjoint`.
        horizon_kwargs: More keyword arguments of :class:`~torch_tempopt.LearnableHorizon`
            (e.g. ``eps``).

    Raises:
        ValueError: If ``T0 <= t0``, if ``steer_b`` is out of range, or if it is given
            with ``learn_T=True``.
        TypeError: If ``odefunc`` holds no :class:`ODEfunc`.
    """

    def __init__(
        self,
        odefunc: nn.Module,
        T0: float = 0.5,
        learn_T: bool = True,
        solver_kwargs: dict[str, Any] | None = None,
        *,
        t0: float = 0.0,
        steer_b: float | None = None,
        adjoint: bool = False,
        horizon_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not T0 > t0:
            raise ValueError(f"T0 must be greater than t0, got T0={T0} and t0={t0}.")
        if steer_b is not None:
            if learn_T:
                raise ValueError("steer_b samples T at random, so it needs learn_T=False.")
            if not 0.0 <= steer_b < T0 - t0:
                raise ValueError(f"steer_b must be in [0, T0 - t0) = [0, {T0 - t0}), got {steer_b}.")
        _find_odefunc(odefunc)
        self.odefunc = odefunc
        self.horizon = LearnableHorizon(T0=T0, t0=t0, **(horizon_kwargs or {}))
        if not learn_T:
            self.horizon.T.requires_grad_(False)
        self.T0 = float(T0)
        self.t0 = float(t0)
        self.learn_T = learn_T
        self.steer_b = steer_b
        self.adjoint = adjoint
        self.solver_kwargs = dict(DEFAULT_SOLVER_KWARGS if solver_kwargs is None else solver_kwargs)

    def extra_repr(self) -> str:
        """The time settings, for :func:`repr`."""
        mode = "learn" if self.learn_T else ("steer" if self.steer_b is not None else "fixed")
        return f"T0={self.T0}, t0={self.t0}, mode={mode}, steer_b={self.steer_b}, adjoint={self.adjoint}"

    def _end_time(self) -> Tensor | float | None:
        """The end time of a plain solve, or :py:`None` to integrate with the horizon."""
        if self.learn_T:
            return None
        if self.steer_b is not None and self.training:
            u = float(torch.rand(()))
            return self.T0 + self.steer_b * (2.0 * u - 1.0)
        return self.horizon.T.detach()

    def forward(
        self,
        z: Tensor,
        logpz: Tensor | None = None,
        reverse: bool = False,
        *,
        fixed_T: Tensor | float | None = None,
    ) -> FlowOutput:
        r"""Transports ``z`` from :math:`t_0` to :math:`T` (or back, if ``reverse``).

        Arguments:
            z: The samples, of shape ``(batch, ...)``.
            logpz: Per-sample log-densities to update, ``(batch,)`` or ``(batch, 1)``;
                zeros if :py:`None`.
            reverse: Integrate from :math:`T` back to :math:`t_0` (sampling).
            fixed_T: If given, a detached end time for a plain
                :func:`torchdiffeq.odeint` solve, bypassing the horizon.

        Returns:
            ``(z, logp, regs)`` (:class:`FlowOutput`): ``logp`` is ``logpz`` plus the
            integral of :math:`-\operatorname{tr} J` in the direction of integration
            (forward from zeros it is :math:`\log p(z(T)) - \log p(x)`; reverse from
            :math:`\log \mathcal{N}(z)` it is :math:`\log p(x)`), and ``regs`` holds
            the penalties :math:`\lambda \int_{t_0}^{T} (\cdot) \, dt \ge 0` per sample,
            whichever the direction.

        Raises:
            ValueError: If ``logpz`` does not have one entry per sample.
        """
        core = _find_odefunc(self.odefunc)
        core.before_odeint()
        batch = z.shape[0]
        if logpz is None:
            logpz = z.new_zeros(batch)
        elif logpz.shape not in ((batch,), (batch, 1)):
            raise ValueError(f"logpz must have shape ({batch},) or ({batch}, 1), got {tuple(logpz.shape)}.")
        state = (z, logpz, *(z.new_zeros(batch) for _ in core.reg_names))
        end = self._end_time() if fixed_T is None else fixed_T
        if end is None:
            solver_kwargs = dict(self.solver_kwargs)
            if self.adjoint:
                solver_kwargs["solver"] = torchdiffeq.odeint_adjoint
            final = self.horizon(self.odefunc, state, reverse=reverse, **solver_kwargs)
        else:
            final = self._solve_to(state, end, reverse)
        z_out, logp_out, *reg_out = final
        sign = -1.0 if reverse else 1.0
        regs = {name: sign * coeff * r for (name, coeff), r in zip(core.reg_coeffs.items(), reg_out)}
        return FlowOutput(z_out, logp_out, regs)

    def _solve_to(self, state: tuple[Tensor, ...], end: Tensor | float, reverse: bool) -> tuple[Tensor, ...]:
        """Integrates with plain torchdiffeq over the detached grid ``[t0, end]``."""
        z = state[0]
        grid = torch.stack([_time_as(self.t0, z), _time_as(end, z)]).detach()
        if reverse:
            grid = grid.flip(0)
        solve = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        trajectory = solve(self.odefunc, state, grid, **self.solver_kwargs)
        return tuple(x[-1] for x in trajectory)


class SequentialFlow(nn.Module):
    r"""Flow blocks applied in order (in reverse order when ``reverse``), each with its own horizon.

    Every block is called as ``block(z, logp, reverse=..., fixed_T=...)`` and returns a
    :class:`FlowOutput`; the log-density updates chain and the penalties add up by name.

    Arguments:
        blocks: The blocks, e.g. :class:`CNF` instances.
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.chain = nn.ModuleList(blocks)

    def forward(
        self,
        x: Tensor,
        logpx: Tensor | None = None,
        reverse: bool = False,
        *,
        fixed_T: Tensor | float | None = None,
    ) -> FlowOutput:
        """Transports ``x`` through all blocks.

        Arguments:
            x: The samples, of shape ``(batch, ...)``.
            logpx: Per-sample log-densities to update; zeros if :py:`None`.
            reverse: Run the blocks backwards, last first (sampling).
            fixed_T: Passed to every block (see :meth:`CNF.forward`).

        Returns:
            ``(z, logp, regs)`` as for :meth:`CNF.forward`, with ``regs`` summed over blocks.
        """
        blocks = reversed(self.chain) if reverse else self.chain
        regs: dict[str, Tensor] = {}
        for block in blocks:
            x, logpx, block_regs = block(x, logpx, reverse=reverse, fixed_T=fixed_T)
            for name, value in block_regs.items():
                regs[name] = regs[name] + value if name in regs else value
        if logpx is None:  # no blocks
            logpx = x.new_zeros(x.shape[0])
        return FlowOutput(x, logpx, regs)


# --------------------------------------------------------------------------- helpers


def _horizons(model: nn.Module) -> list[LearnableHorizon]:
    """The horizons inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, LearnableHorizon)]


def time_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of all horizons in ``model`` (the end times).

    Arguments:
        model: A :class:`CNF`, :class:`SequentialFlow` or any module holding horizons.

    Returns:
        The horizon parameters that require gradients (empty for FFJORD and STEER).
    """
    return [p for h in _horizons(model) for p in h.parameters() if p.requires_grad]


def network_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` outside its horizons, for the weight optimizer.

    Arguments:
        model: A :class:`CNF`, :class:`SequentialFlow` or any module holding horizons.

    Returns:
        Every trainable parameter that is not held by a horizon.
    """
    in_horizons = {id(p) for h in _horizons(model) for p in h.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in in_horizons]


def end_times(model: nn.Module) -> list[float]:
    """The current end time :math:`T` of each horizon in ``model``, for logging.

    Arguments:
        model: A :class:`CNF`, :class:`SequentialFlow` or any module holding horizons.

    Returns:
        One float per horizon, in module order.
    """
    return [float(h.T.detach()) for h in _horizons(model)]


def nfe(model: nn.Module, reset: bool = False) -> dict[str, int]:
    """Sums the evaluation counts of the :func:`torch_tempopt.count_nfe` counters in ``model``.

    Arguments:
        model: A flow built with ``count=True`` (or holding counted fields).
        reset: Whether to reset the counters after reading them.

    Returns:
        ``{"forward": ..., "backward": ...}``, zeros if nothing is counted.
    """
    counts = {"forward": 0, "backward": 0}
    for module in model.modules():
        if hasattr(module, "nfe_forward") and hasattr(module, "nfe_backward"):
            counts["forward"] += int(module.nfe_forward)
            counts["backward"] += int(module.nfe_backward)
            if reset:
                module.reset()
    return counts


def standard_normal_logprob(z: Tensor) -> Tensor:
    r"""The log-density of :math:`\mathcal{N}(0, I)` per sample, summed over non-batch dimensions.

    Arguments:
        z: Samples, of shape ``(batch, ...)``.

    Returns:
        :math:`-\frac{1}{2} \sum_i (z_i^2 + \log 2\pi)`, of shape ``(batch,)``.

    Example:
        >>> round(standard_normal_logprob(torch.zeros(1, 2)).item(), 6)
        -1.837877
    """
    return -0.5 * (z.pow(2) + math.log(2.0 * math.pi)).reshape(z.shape[0], -1).sum(dim=1)


def nll_and_reg(model: nn.Module, x: Tensor, **forward_kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    r"""The negative log-likelihood of ``x`` in nats per sample, and the RNODE penalties.

    .. math:: -\log p(x) = -\log \mathcal{N}(z(T)) + \int_{t_0}^{T} -\operatorname{tr} J \, dt

    The training loss is ``nll + sum(regs.values())`` (plus TO-FLOW's temporal
    regulariser, which the library applies to :math:`T`).

    Arguments:
        model: A :class:`CNF` or :class:`SequentialFlow` (from :func:`build_toy_model`).
        x: Data, of shape ``(batch, ...)``.
        forward_kwargs: Passed to the model, e.g. ``fixed_T``.

    Returns:
        ``(nll, regs)``: the batch mean of :math:`-\log p(x)` and, by name, the batch
        means of the weighted penalties (empty without RNODE).
    """
    z, delta_logp, regs = model(x, x.new_zeros(x.shape[0]), **forward_kwargs)
    logpx = standard_normal_logprob(z) - delta_logp.reshape(-1)
    return -logpx.mean(), {name: value.mean() for name, value in regs.items()}


def bits_per_dim_and_reg(
    model: nn.Module,
    levels: Tensor,
    generator: torch.Generator | None = None,
    alpha: float = 1e-6,
    **forward_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Bits per dimension of integer images under a flow on logit space, and the penalties.

    Dequantizes (:func:`~examples.data.dequantize`), maps to logit space
    (:func:`~examples.data.logit_transform`), and converts
    :math:`\log p(x) = \log p_Y(y) + \log |\det \partial y / \partial x|` with
    :func:`~examples.data.bits_per_dim`.

    Arguments:
        model: A flow on logit space (e.g. from :func:`build_image_model`).
        levels: Grey levels 0..255, of shape ``(batch, C, H, W)``.
        generator: The generator of the dequantization noise.
        alpha: The logit squeeze.
        forward_kwargs: Passed to the model, e.g. ``fixed_T``.

    Returns:
        ``(bpd, regs)``: the batch mean of bits per dimension and the batch means of
        the weighted penalties.
    """
    dtype = next(model.parameters()).dtype
    y, logdet = logit_transform(dequantize(levels, generator, dtype=dtype), alpha)
    nll_y, regs = nll_and_reg(model, y, **forward_kwargs)
    log_px = -nll_y + logdet.mean()
    return bits_per_dim(log_px, y[0].numel()), regs


@torch.no_grad()
def sample(
    model: nn.Module,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    **forward_kwargs: Any,
) -> FlowOutput:
    r"""Draws samples by running the flow backwards from :math:`\mathcal{N}(0, I)`.

    Arguments:
        model: A :class:`CNF` or :class:`SequentialFlow`.
        shape: The sample shape, batch first, e.g. ``(64, 2)``.
        generator: The generator of the base samples.
        forward_kwargs: Passed to the model, e.g. ``fixed_T``.

    Returns:
        ``(x, logp, regs)`` where ``logp`` is the model's :math:`\log p(x)`.
    """
    parameter = next(model.parameters())
    z = torch.randn(tuple(shape), generator=generator, dtype=parameter.dtype, device=parameter.device)
    return model(z, standard_normal_logprob(z), reverse=True, **forward_kwargs)


# --------------------------------------------------------------------------- builders


def _build(
    make_net: Callable[[], nn.Module],
    num_blocks: int,
    *,
    divergence: str,
    noise: str,
    kinetic: float,
    jacobian: float,
    T0: float,
    time_mode: str,
    solver_kwargs: dict[str, Any] | None,
    adjoint: bool,
    count: bool,
    horizon_kwargs: dict[str, Any] | None = None,
) -> SequentialFlow:
    """``num_blocks`` CNF blocks with fresh nets and the given time treatment."""
    _choose(dict.fromkeys(TIME_MODES), time_mode, "time_mode")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}.")
    steer_b = T0 - 0.25 if time_mode == "steer" else None
    blocks = []
    for _ in range(num_blocks):
        field: nn.Module = ODEfunc(make_net(), divergence, noise, kinetic, jacobian)
        if count:
            field = count_nfe(field)
        blocks.append(
            CNF(
                field,
                T0=T0,
                learn_T=time_mode == "learn",
                solver_kwargs=solver_kwargs,
                steer_b=steer_b,
                adjoint=adjoint,
                horizon_kwargs=horizon_kwargs,
            )
        )
    return SequentialFlow(blocks)


def build_toy_model(
    hidden: Sequence[int] = (64, 64, 64),
    num_blocks: int = 1,
    divergence: str = "exact",
    kinetic: float = 0.0,
    jacobian: float = 0.0,
    T0: float = 0.5,
    *,
    dim: int = 2,
    noise: str = "rademacher",
    layer_type: str = "concatsquash",
    nonlinearity: str = "tanh",
    time_mode: str = "learn",
    solver_kwargs: dict[str, Any] | None = None,
    adjoint: bool = False,
    count: bool = False,
    horizon_kwargs: dict[str, Any] | None = None,
) -> SequentialFlow:
    r"""FFJORD's toy model: ``num_blocks`` CNF blocks on :math:`\mathbb{R}^2` with concat-squash MLPs.

    Arguments:
        hidden: The hidden widths of each block's :class:`ODEnet`.
        num_blocks: The number of CNF blocks, each with its own end time.
        divergence: ``"exact"`` (FFJORD's toy default) or ``"hutchinson"``.
        kinetic: RNODE's kinetic coefficient (0 disables it).
        jacobian: RNODE's Frobenius coefficient (0 disables it).
        T0: The initial or fixed end time; 0.5 as in FFJORD and the paper.
        dim: The data dimension.
        noise: The Hutchinson probe: ``"rademacher"`` or ``"gaussian"``.
        layer_type: ``"concatsquash"`` or ``"concat"``.
        nonlinearity: ``"tanh"`` or ``"softplus"``.
        time_mode: ``"learn"`` (TO-FLOW), ``"fixed"`` (FFJORD) or ``"steer"`` (STEER with
            :math:`b = T_0 - 0.25`).
        solver_kwargs: Solver settings (default :data:`DEFAULT_SOLVER_KWARGS`).
        adjoint: Whether to solve with the adjoint method.
        count: Whether to wrap each field with :func:`torch_tempopt.count_nfe` (read with
            :func:`nfe`).
        horizon_kwargs: More keyword arguments of each block's
            :class:`~torch_tempopt.LearnableHorizon` (e.g. ``eps``).

    Returns:
        A :class:`SequentialFlow`.

    Raises:
        ValueError: For unknown options or non-positive sizes.
    """
    return _build(
        lambda: ODEnet(dim, hidden, layer_type, nonlinearity),
        num_blocks,
        divergence=divergence,
        noise=noise,
        kinetic=kinetic,
        jacobian=jacobian,
        T0=T0,
        time_mode=time_mode,
        solver_kwargs=solver_kwargs,
        adjoint=adjoint,
        count=count,
        horizon_kwargs=horizon_kwargs,
    )


def build_image_model(
    channels: int = 1,
    hidden_channels: Sequence[int] = (64, 64, 64),
    num_blocks: int = 2,
    divergence: str = "hutchinson",
    kinetic: float = 0.0,
    jacobian: float = 0.0,
    T0: float = 1.0,
    *,
    noise: str = "rademacher",
    layer_type: str = "concat",
    nonlinearity: str = "softplus",
    time_mode: str = "learn",
    solver_kwargs: dict[str, Any] | None = None,
    adjoint: bool = False,
    count: bool = False,
    horizon_kwargs: dict[str, Any] | None = None,
    net: str = "conv",
    image_shape: Sequence[int] = (1, 8, 8),
) -> SequentialFlow:
    r"""A single-scale image CNF for small images (8x8 digits), FFJORD's image settings.

    The flow acts on logit space; use :func:`bits_per_dim_and_reg` for the loss. FFJORD's
    multiscale architecture (squeeze and factor-out) is not needed at 8x8, so the
    blocks simply follow one another at full resolution.

    Arguments:
        channels: The image channels.
        hidden_channels: The hidden channels of each block's :class:`ConvODEnet`.
        num_blocks: The number of CNF blocks, each with its own end time.
        divergence: ``"hutchinson"`` (FFJORD's image default) or ``"exact"``.
        kinetic: RNODE's kinetic coefficient (0 disables it).
        jacobian: RNODE's Frobenius coefficient (0 disables it).
        T0: The initial or fixed end time; 1.0 as in FFJORD and the paper.
        noise: The Hutchinson probe: ``"rademacher"`` or ``"gaussian"``.
        layer_type: ``"concat"`` or ``"concatsquash"``.
        nonlinearity: ``"softplus"`` or ``"tanh"``.
        time_mode: ``"learn"`` (TO-FLOW), ``"fixed"`` (FFJORD) or ``"steer"`` (STEER with
            :math:`b = T_0 - 0.25`).
        solver_kwargs: Solver settings (default :data:`DEFAULT_SOLVER_KWARGS`).
        adjoint: Whether to solve with the adjoint method.
        count: Whether to wrap each field with :func:`torch_tempopt.count_nfe`.
        horizon_kwargs: More keyword arguments of each block's
            :class:`~torch_tempopt.LearnableHorizon` (e.g. ``eps``).
        net: ``"conv"`` (:class:`ConvODEnet`, FFJORD's image net) or ``"mlp"``
            (:class:`FlatODEnet` on the flattened image, FFJORD's tabular net; then
            ``hidden_channels`` are the hidden widths).
        image_shape: ``(C, H, W)``, used by ``net="mlp"`` (``C`` must equal ``channels``).

    Returns:
        A :class:`SequentialFlow`.

    Raises:
        ValueError: For unknown options or non-positive sizes.
    """
    _choose({"conv": None, "mlp": None}, net, "net")
    if net == "mlp" and tuple(image_shape)[:1] != (channels,):
        raise ValueError(f"image_shape {tuple(image_shape)} must start with channels={channels}.")

    def make_net() -> nn.Module:
        if net == "mlp":
            return FlatODEnet(image_shape, hidden_channels, layer_type, nonlinearity)
        return ConvODEnet(channels, hidden_channels, layer_type, nonlinearity)

    return _build(
        make_net,
        num_blocks,
        divergence=divergence,
        noise=noise,
        kinetic=kinetic,
        jacobian=jacobian,
        T0=T0,
        time_mode=time_mode,
        solver_kwargs=solver_kwargs,
        adjoint=adjoint,
        count=count,
        horizon_kwargs=horizon_kwargs,
    )
