r"""The reference continuous normalizing flow (FFJORD style), solved through its horizon.

A block transports :math:`z(t_0) = x` along :math:`\dot z = f(z, t)` to :math:`z(T)` while
integrating :math:`\frac{d}{dt} \log p(z(t)) = -\operatorname{tr} \partial f / \partial z`. Every
block integrates through its horizon: TO-FLOW learns T, FFJORD and RNODE freeze it, STEER draws it
at random in training, and ``budget=N`` solves on N rk4 steps. As in FFJORD, ``block(x, logpx)``
returns :math:`z(T)` and ``logpx`` :math:`+ \int -\operatorname{tr} J \, dt`, so from zeros
:math:`\log p(x) = \log \mathcal{N}(z(T)) - \Delta` (:func:`nll_and_reg`).

References:
    | FFJORD (Grathwohl et al., 2019, https://arxiv.org/abs/1810.01367); RNODE (Finlay et al.,
      2020, https://arxiv.org/abs/2002.02798); STEER (Ghosh et al., 2020,
      https://arxiv.org/abs/2006.10711); TO-FLOW (Du et al., 2022,
      https://arxiv.org/abs/2203.10335); flow matching (Lipman et al., 2023,
      https://arxiv.org/abs/2210.02747).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torchdiffeq
from torch import Tensor, nn

from torch_tempopt import LearnableHorizon, count_nfe
from torch_tempopt.budget import DEFAULT_REFERENCE

from .data import bits_per_dim, dequantize, logit_transform

__all__ = [
    "CNF",
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
    "flow_matching_loss",
    "network_parameters",
    "nfe",
    "nll_and_reg",
    "sample",
    "standard_normal_logprob",
]

TIME_MODES = ("learn", "fixed", "steer")


def _choose(options: dict[str, Any], value: str, argument: str) -> Any:
    if value not in options:
        raise ValueError(f"{argument} must be one of {sorted(options)}, got {value!r}.")
    return options[value]


def _time_as(t: Tensor | float, x: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------- layers (FFJORD's)


class ConcatLinear(nn.Module):
    """``W [t, x] + b``: the time as one more input."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        return self.linear(
            torch.cat([_time_as(t, x).reshape(-1, 1).expand(x.shape[0], 1), x], dim=1)
        )


class ConcatSquashLinear(nn.Module):
    r"""FFJORD's time-gated layer :math:`(W x + b) \odot \sigma(g_1 t + g_0) + h t`."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        tt = _time_as(t, x).reshape(-1, 1)  # a scalar time, or one per sample (flow matching)
        return self.linear(x) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class ConcatConv2d(nn.Module):
    """A 3x3 convolution with the time as one more input channel."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in + 1, dim_out, kernel_size, padding=kernel_size // 2)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        tt = _time_as(t, x).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([tt, x], dim=1))


class ConcatSquashConv2d(nn.Module):
    """A convolution with FFJORD's time gate and time bias per output channel."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size, padding=kernel_size // 2)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        tt = _time_as(t, x).reshape(-1, 1)
        gate, bias = torch.sigmoid(self.hyper_gate(tt)), self.hyper_bias(tt)
        return self.conv(x) * gate.reshape(*gate.shape, 1, 1) + bias.reshape(*bias.shape, 1, 1)


_NONLINEARITIES = {"tanh": nn.Tanh, "softplus": nn.Softplus}


class ODEnet(nn.Module):
    """A time-conditioned MLP (``conv=False``) or CNN on ``dim`` features or channels."""

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        layer_type: str = "concatsquash",
        nonlinearity: str = "tanh",
        conv: bool = False,
    ) -> None:
        super().__init__()
        kinds = (
            {"concatsquash": ConcatSquashConv2d, "concat": ConcatConv2d}
            if conv
            else {"concatsquash": ConcatSquashLinear, "concat": ConcatLinear}
        )
        layer = _choose(kinds, layer_type, "layer_type")
        widths = [dim, *hidden, dim]
        if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(
                "hidden and the data dimension must be positive ints, "
                f"got {dim} and {tuple(hidden)}."
            )
        self.layers = nn.ModuleList(layer(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = _choose(_NONLINEARITIES, nonlinearity, "nonlinearity")()

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            x = self.activation(x) if i < len(self.layers) - 1 else x
        return x


def ConvODEnet(
    channels: int,
    hidden: Sequence[int] = (64, 64, 64),
    layer_type: str = "concat",  # noqa: N802
    nonlinearity: str = "softplus",
) -> ODEnet:
    """FFJORD's image net: :class:`ODEnet` with convolutions."""
    return ODEnet(channels, hidden, layer_type, nonlinearity, conv=True)


class FlatODEnet(ODEnet):
    """An :class:`ODEnet` MLP on the flattened image, FFJORD's tabular net (cheap on the CPU)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        hidden: Sequence[int] = (128, 128),
        layer_type: str = "concatsquash",
        nonlinearity: str = "softplus",
    ) -> None:
        super().__init__(math.prod(image_shape), hidden, layer_type, nonlinearity)
        self.image_shape = tuple(image_shape)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        return super().forward(t, x.reshape(x.shape[0], -1)).reshape(x.shape)


# --------------------------------------------------------------------------- dynamics


def _vjp(output: Tensor, inputs: Tensor, cotangent: Tensor, create_graph: bool) -> Tensor:
    if not output.requires_grad:
        return torch.zeros_like(inputs)
    (grad,) = torch.autograd.grad(
        output, inputs, cotangent, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(inputs) if grad is None else grad


class ODEfunc(nn.Module):
    r"""The augmented dynamics of ``(z, logp, *regs)``: :math:`(f, -\operatorname{tr} J, \ldots)`.

    RNODE's integrands (present when their coefficient is positive, in the order of
    :attr:`reg_names`) are its own: :math:`\frac{1}{2d}\|f\|^2` (kinetic) and
    :math:`\frac{1}{d}\|\varepsilon^\top J\|^2` (jacobian). ``divergence="exact"`` takes one
    backward pass per dimension; ``"hutchinson"`` one probe, drawn at the first evaluation after
    :meth:`before_odeint` and then held fixed, so adaptive solvers see a deterministic field.
    The divergence graph is built only when grad mode is on (not under ``no_grad`` or in the
    forward pass of an adjoint solve).
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
        _choose({"exact": 0, "hutchinson": 0}, divergence, "divergence")
        _choose({"rademacher": 0, "gaussian": 0}, noise, "noise")
        if kinetic < 0 or jacobian < 0:
            raise ValueError(f"kinetic and jacobian must be >= 0, got {kinetic} and {jacobian}.")
        self.diffeq, self.divergence, self.noise = diffeq, divergence, noise
        self.kinetic, self.jacobian = float(kinetic), float(jacobian)
        self._probe: Tensor | None = None

    @property
    def reg_coeffs(self) -> dict[str, float]:
        """The active regularisers and their coefficients, in state order."""
        return {n: c for n, c in (("kinetic", self.kinetic), ("jacobian", self.jacobian)) if c > 0}

    @property
    def reg_names(self) -> tuple[str, ...]:
        return tuple(self.reg_coeffs)

    def before_odeint(self, noise: Tensor | None = None) -> None:
        """Starts a solve: holds ``noise`` as the probe, or draws one at the next evaluation."""
        self._probe = noise

    def forward(self, t: Tensor | float, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        z, logp, *regs = state
        names = self.reg_names
        if len(regs) != len(names):
            raise ValueError(
                f"state must be (z, logp, *regs) with regs for {names}, "
                f"got {len(regs)} extra entries."
            )
        create_graph, batch = torch.is_grad_enabled(), z.shape[0]
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = self.diffeq(t, z)
            div, frobenius = (
                self._exact(dz, z, create_graph, "jacobian" in names)
                if self.divergence == "exact"
                else self._hutchinson(dz, z, create_graph)
            )
        integrands = {
            "kinetic": 0.5 * dz.pow(2).reshape(batch, -1).mean(dim=1),
            "jacobian": frobenius,
        }
        # type: ignore[union-attr]
        out = (
            dz,
            -div.reshape(logp.shape),
            *(integrands[n].reshape(r.shape) for n, r in zip(names, regs)),
        )
        return out if create_graph else tuple(o.detach() for o in out)

    def _exact(
        self, dz: Tensor, z: Tensor, create_graph: bool, frobenius: bool
    ) -> tuple[Tensor, Tensor | None]:
        flat = dz.reshape(z.shape[0], -1)
        div, squares, ones = (
            flat.new_zeros(z.shape[0]),
            flat.new_zeros(z.shape[0]),
            flat.new_ones(z.shape[0]),
        )
        for i in range(flat.shape[1]):
            # row i of each Jacobian
            row = _vjp(flat[:, i], z, ones, create_graph).reshape(z.shape[0], -1)
            div = div + row[:, i]
            squares = squares + row.pow(2).sum(dim=1) if frobenius else squares
        return div, squares / flat.shape[1] if frobenius else None

    def _hutchinson(self, dz: Tensor, z: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
        if self._probe is None:
            self._probe = (
                torch.randn_like(z)
                if self.noise == "gaussian"
                else torch.randint_like(z, 0, 2) * 2 - 1
            )
        if self._probe.shape != z.shape:
            raise ValueError(
                f"the Hutchinson probe has shape {tuple(self._probe.shape)} "
                f"but z has {tuple(z.shape)}; "
                "call before_odeint() at the start of each solve."
            )
        probe = self._probe.to(dtype=z.dtype, device=z.device)
        row = _vjp(dz, z, probe, create_graph)  # probe^T J
        return (row * probe).reshape(z.shape[0], -1).sum(dim=1), row.pow(2).reshape(
            z.shape[0], -1
        ).mean(dim=1)


# --------------------------------------------------------------------------- flows


class FlowOutput(NamedTuple):
    """``z``, ``logp`` (the input plus the integral of ``-tr J``), the weighted RNODE penalties."""

    z: Tensor
    logp: Tensor
    regs: dict[str, Tensor]


def _core(field: nn.Module) -> ODEfunc:
    for m in field.modules():
        if isinstance(m, ODEfunc):
            return m
    raise TypeError(
        f"CNF needs an ODEfunc (possibly wrapped by count_nfe), got {type(field).__name__}."
    )


class CNF(nn.Module):
    r"""One CNF block; ``self.horizon`` replaces FFJORD's ``odeint`` call, the only solve path.

    Arguments:
        odefunc: An :class:`ODEfunc`, possibly wrapped by :func:`torch_tempopt.count_nfe`.
        T0: The initial (TO-FLOW) or fixed (FFJORD) end time.
        time_mode: ``"learn"`` (TO-FLOW), ``"fixed"`` (FFJORD, RNODE: T frozen) or ``"steer"``
            (T frozen at ``T0``, drawn from :math:`U[T_0 - b, T_0 + b]` per training solve,
            :math:`b = T_0 - 0.25`).
        solver_kwargs: The solver settings (default dopri5 at 1e-5); with a budget, its reference
        (the call's). adjoint: Solve with :func:`torchdiffeq.odeint_adjoint`. budget: Solve on this
        many rk4 steps (:class:`~torch_tempopt.LearnableHorizon` ``budget``). eps: The horizon's
        clip margin.
    """

    def __init__(
        self,
        odefunc: nn.Module,
        T0: float = 0.5,
        time_mode: str = "learn",
        solver_kwargs: dict[str, Any] | None = None,
        *,
        adjoint: bool = False,
        budget: int | None = None,
        eps: float = 0.1,
    ) -> None:
        super().__init__()
        _choose(dict.fromkeys(TIME_MODES), time_mode, "time_mode")
        if time_mode == "steer" and T0 <= 0.25:
            raise ValueError(
                f"STEER draws T from [0.25, 2 T0 - 0.25]: it needs T0 > 0.25, got {T0}."
            )
        _core(odefunc)
        self.odefunc, self.time_mode, self.adjoint = odefunc, time_mode, adjoint
        self.solver_kwargs = dict(DEFAULT_REFERENCE if solver_kwargs is None else solver_kwargs)
        self.horizon = LearnableHorizon(
            T0=T0, eps=eps, budget=budget, learn_T=time_mode == "learn"
        )

    def forward(self, z: Tensor, logpz: Tensor | None = None, reverse: bool = False) -> FlowOutput:
        """Transports ``z`` from t0 to T (back if ``reverse``); see :class:`FlowOutput`."""
        core = _core(self.odefunc)
        core.before_odeint()
        batch = z.shape[0]
        logpz = z.new_zeros(batch) if logpz is None else logpz
        if logpz.shape not in ((batch,), (batch, 1)):
            raise ValueError(
                f"logpz must have shape ({batch},) or ({batch}, 1), got {tuple(logpz.shape)}."
            )
        state = (z, logpz, *(z.new_zeros(batch) for _ in core.reg_names))
        solver = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        steer = self.time_mode == "steer" and self.training
        T = self.horizon.T.item()
        if steer:  # STEER: a random end time for this solve
            self.horizon.T.data.fill_(T + (T - 0.25) * (2.0 * float(torch.rand(())) - 1.0))
        try:
            state_t = self.horizon(
                self.odefunc, state, solver=solver, reverse=reverse, **self.solver_kwargs
            )
        finally:
            if steer:
                self.horizon.T.data.fill_(T)
        z_t, logp_t, *regs_t = (s[-1] for s in state_t)
        sign = -1.0 if reverse else 1.0
        return FlowOutput(
            z_t, logp_t, {n: sign * c * r for (n, c), r in zip(core.reg_coeffs.items(), regs_t)}
        )


class SequentialFlow(nn.Module):
    """CNF blocks in order (reversed when ``reverse``); log-densities chain, penalties add up."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.chain = nn.ModuleList(blocks)

    def forward(self, x: Tensor, logpx: Tensor | None = None, reverse: bool = False) -> FlowOutput:
        regs: dict[str, Tensor] = {}
        for block in reversed(self.chain) if reverse else self.chain:
            x, logpx, r = block(x, logpx, reverse=reverse)
            for name, value in r.items():
                regs[name] = regs[name] + value if name in regs else value
        return FlowOutput(x, x.new_zeros(x.shape[0]) if logpx is None else logpx, regs)


# --------------------------------------------------------------------------- helpers


def horizons(model: nn.Module) -> list[LearnableHorizon]:
    return [m for m in model.modules() if isinstance(m, LearnableHorizon)]


def network_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters outside the horizons: the weight optimizer's."""
    inside = {id(p) for h in horizons(model) for p in h.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in inside]


def end_times(model: nn.Module) -> list[float]:
    return [float(h.T.detach()) for h in horizons(model)]


def nfe(model: nn.Module, reset: bool = False) -> dict[str, int]:
    """The forward and backward evaluation counts of the counted fields in ``model`` (or reset)."""
    counts = {"forward": 0, "backward": 0}
    for m in model.modules():
        if hasattr(m, "nfe_forward") and hasattr(m, "nfe_backward"):
            counts["forward"] += int(m.nfe_forward)
            counts["backward"] += int(m.nfe_backward)
            if reset:
                m.reset()
    return counts


def standard_normal_logprob(z: Tensor) -> Tensor:
    """The log-density of N(0, I) per sample.

    Example:
        >>> round(standard_normal_logprob(torch.zeros(1, 2)).item(), 6)
        -1.837877

    """
    return -0.5 * (z.pow(2) + math.log(2.0 * math.pi)).reshape(z.shape[0], -1).sum(dim=1)


def nll_and_reg(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean negative log-likelihood (nats) of ``x`` and the mean weighted RNODE penalties."""
    z, delta_logp, regs = model(x, x.new_zeros(x.shape[0]))
    logpx = standard_normal_logprob(z) - delta_logp.reshape(-1)
    return -logpx.mean(), {name: value.mean() for name, value in regs.items()}


def to_logit_space(
    model: nn.Module, levels: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Dequantized grey levels in the flow's logit space, and that map's log-determinant."""
    dtype = next(model.parameters()).dtype
    return logit_transform(dequantize(levels, generator, dtype=dtype), 1e-6)


def bits_per_dim_and_reg(
    model: nn.Module, levels: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bits per dimension of integer images under a flow on logit space, and the penalties."""
    y, logdet = to_logit_space(model, levels, generator)
    nll_y, regs = nll_and_reg(model, y)
    return bits_per_dim(-nll_y + logdet.mean(), y[0].numel()), regs


@torch.no_grad()
def sample(
    model: nn.Module, shape: Sequence[int], generator: torch.Generator | None = None
) -> FlowOutput:
    """Samples by integrating the flow backwards from N(0, I); ``logp`` is the model's log p(x)."""
    p = next(model.parameters())
    z = torch.randn(tuple(shape), generator=generator, dtype=p.dtype, device=p.device)
    return model(z, standard_normal_logprob(z), reverse=True)


def flow_matching_loss(model: nn.Module, x: Tensor) -> Tensor:
    r"""Conditional flow matching on the model's single block, by Meta's ``flow_matching`` library.

    Its ``AffineProbPath`` with the conditional-OT scheduler draws :math:`x_\tau = \tau x + (1 -
    \tau) \varepsilon` (noise at :math:`\tau = 0`, data at 1) and the velocity :math:`x -
    \varepsilon`. The harness's CNF has the data at :math:`t_0` and the noise at T, so :math:`s = 1
    - \tau` with :math:`s \sim U[0, 1]` per sample, and the field at :math:`t = t_0 + s (T - t_0)`
    regresses :math:`(\varepsilon - x) / (T - t_0)`; no ODE is solved. The model is then scored
    like any CNF (:func:`nll_and_reg`).
    """
    try:
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler
    except ImportError:
        raise ImportError(
            "flow matching trains with Meta's library: pip install flow-matching."
        ) from None
    blocks = [m for m in model.modules() if isinstance(m, CNF)]
    if len(blocks) != 1:
        raise ValueError(
            f"flow matching trains one CNF block, the model has {len(blocks)}; use --num-blocks 1."
        )
    net, h = _core(blocks[0].odefunc).diffeq, blocks[0].horizon
    t0, T = float(h.t0.detach()), float(h.T.detach())
    eps = torch.randn_like(x)
    s = torch.rand(x.shape[0], 1, dtype=x.dtype, device=x.device)
    path = AffineProbPath(scheduler=CondOTScheduler()).sample(t=1 - s.reshape(-1), x_0=eps, x_1=x)
    v = net(t0 + s * (T - t0), path.x_t)
    return (v + path.dx_t / (T - t0)).pow(2).reshape(x.shape[0], -1).sum(1).mean()


# --------------------------------------------------------------------------- builders


def _build(
    make_net: Callable[[], nn.Module],
    num_blocks: int,
    *,
    divergence: str,
    noise: str,
    kinetic: float,
    jacobian: float,
    count: bool,
    **cnf_kwargs: Any,
) -> SequentialFlow:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}.")
    blocks = []
    for _ in range(num_blocks):
        field: nn.Module = ODEfunc(make_net(), divergence, noise, kinetic, jacobian)
        blocks.append(CNF(count_nfe(field) if count else field, **cnf_kwargs))
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
    count: bool = False,
    **cnf_kwargs: Any,
) -> SequentialFlow:
    """FFJORD's toy model: ``num_blocks`` CNF blocks on R^dim of concat-squash MLPs.

    ``cnf_kwargs`` go to :class:`CNF`.
    """
    return _build(
        lambda: ODEnet(dim, tuple(hidden), layer_type, nonlinearity),
        num_blocks,
        divergence=divergence,
        noise=noise,
        kinetic=kinetic,
        jacobian=jacobian,
        count=count,
        T0=T0,
        **cnf_kwargs,
    )


def build_image_model(
    channels: int = 1,
    hidden: Sequence[int] = (64, 64, 64),
    num_blocks: int = 2,
    divergence: str = "hutchinson",
    kinetic: float = 0.0,
    jacobian: float = 0.0,
    T0: float = 1.0,
    *,
    noise: str = "rademacher",
    layer_type: str = "concat",
    nonlinearity: str = "softplus",
    net: str = "conv",
    image_shape: Sequence[int] = (1, 8, 8),
    count: bool = False,
    **cnf_kwargs: Any,
) -> SequentialFlow:
    """A single-scale image CNF on logit space (8x8 digits): FFJORD's conv net, or an MLP.

    ``net="mlp"`` takes the flat image.
    """
    _choose({"conv": 0, "mlp": 0}, net, "net")

    def make_net() -> nn.Module:
        if net == "mlp":
            return FlatODEnet(image_shape, tuple(hidden), layer_type, nonlinearity)
        return ConvODEnet(channels, tuple(hidden), layer_type, nonlinearity)

    return _build(
        make_net,
        num_blocks,
        divergence=divergence,
        noise=noise,
        kinetic=kinetic,
        jacobian=jacobian,
        count=count,
        T0=T0,
        **cnf_kwargs,
    )
