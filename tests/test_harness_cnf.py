"""benchmarks.harness.cnf: divergence estimators, RNODE integrands, layers, CNF blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

from benchmarks.harness.cnf import (
    CNF,
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashConv2d,
    ConcatSquashLinear,
    ConvODEnet,
    FlatODEnet,
    ODEfunc,
    ODEnet,
    SequentialFlow,
    bits_per_dim_and_reg,
    build_image_model,
    build_toy_model,
    end_times,
    flow_matching_loss,
    network_parameters,
    nfe,
    nll_and_reg,
    sample,
    standard_normal_logprob,
)
from benchmarks.harness.data import load_digits_split
from torch_tempopt import CoordinateDescentStepper

TIGHT = {"method": "dopri5", "rtol": 1e-9, "atol": 1e-10}


def _state(func: ODEfunc, z: Tensor) -> tuple[Tensor, ...]:
    return (z, z.new_zeros(z.shape[0]), *(z.new_zeros(z.shape[0]) for _ in func.reg_names))


def _jacobians(net: nn.Module, t: float, z: Tensor) -> Tensor:
    """Per-sample Jacobians of net(t, .), brute force, shape (batch, d, d)."""
    flat = z.reshape(z.shape[0], -1)

    def single(zi: Tensor) -> Tensor:
        return net(t, zi.reshape(1, *z.shape[1:])).reshape(-1)

    return torch.stack([torch.autograd.functional.jacobian(single, zi) for zi in flat])


# ----------------------------------------------------------------------------- layers


LAYERS = {
    "concat": lambda: (ConcatLinear(3, 4), torch.randn(5, 3)),
    "concatsquash": lambda: (ConcatSquashLinear(3, 4), torch.randn(5, 3)),
    "concat-conv": lambda: (ConcatConv2d(2, 3), torch.randn(5, 2, 4, 4)),
    "concatsquash-conv": lambda: (ConcatSquashConv2d(2, 3), torch.randn(5, 2, 4, 4)),
    "flat-mlp": lambda: (FlatODEnet((2, 3, 3), (8,)), torch.randn(5, 2, 3, 3)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layers_take_a_scalar_time_or_one_per_sample(kind: str) -> None:
    layer, x = LAYERS[kind]()
    scalar = layer(0.3, x)
    assert layer(torch.tensor(0.3), x).shape == scalar.shape
    torch.testing.assert_close(layer(torch.full((5, 1), 0.3), x), scalar, rtol=1e-12, atol=1e-12)
    t = torch.linspace(0.1, 0.9, 5)[:, None]
    per_sample = layer(t, x)
    for i in range(5):  # row i sees its own time, as a batch of one at that scalar time would
        torch.testing.assert_close(
            per_sample[i : i + 1], layer(float(t[i]), x[i : i + 1]), rtol=1e-12, atol=1e-12
        )
    assert not torch.allclose(per_sample, scalar)


def test_flat_mlp_on_images_is_the_mlp_on_the_flattened_vector() -> None:
    net = FlatODEnet((2, 3, 3), (8,), "concatsquash")
    z = torch.randn(4, 2, 3, 3)
    flat = ODEnet(18, (8,), "concatsquash", "softplus")
    flat.load_state_dict(net.state_dict())
    torch.testing.assert_close(net(0.3, z), flat(0.3, z.reshape(4, 18)).reshape(4, 2, 3, 3))
    func = ODEfunc(net, "exact")
    _, neg_div = func(0.3, _state(func, z))
    torch.testing.assert_close(-neg_div, _jacobians(net, 0.3, z).diagonal(dim1=1, dim2=2).sum(1))
    with pytest.raises(ValueError, match="net must be one of"):
        build_image_model(hidden=(4,), net="transformer")


# ----------------------------------------------------------------------------- ODEfunc


@pytest.mark.parametrize("layer_type", ["concatsquash", "concat"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "softplus"])
def test_exact_divergence_and_integrands_equal_brute_force(
    layer_type: str, nonlinearity: str
) -> None:
    net = ODEnet(3, (16, 16), layer_type, nonlinearity)
    func = ODEfunc(net, "exact", kinetic=2.0, jacobian=3.0)
    assert func.reg_names == ("kinetic", "jacobian")
    z = torch.randn(5, 3)
    dz, neg_div, kinetic, frobenius = func(torch.tensor(0.3), _state(func, z))
    jac = _jacobians(net, 0.3, z)
    f = net(0.3, z)
    torch.testing.assert_close(dz, f)
    torch.testing.assert_close(-neg_div, jac.diagonal(dim1=1, dim2=2).sum(1))
    # RNODE's integrands (cfinlay/ffjord-rnode): 0.5 mean_i f_i^2 and |J|_F^2 / d; raw
    # (coefficients weigh them in CNF)
    torch.testing.assert_close(kinetic, 0.5 * f.pow(2).sum(1) / 3)
    torch.testing.assert_close(frobenius, jac.pow(2).sum((1, 2)) / 3)


@pytest.mark.parametrize("layer_type", ["concat", "concatsquash"])
def test_exact_divergence_on_images(layer_type: str) -> None:
    net = ConvODEnet(2, (4,), layer_type)
    func = ODEfunc(net, "exact")
    z = torch.randn(2, 2, 3, 3)
    _, neg_div = func(0.7, _state(func, z))
    torch.testing.assert_close(-neg_div, _jacobians(net, 0.7, z).diagonal(dim1=1, dim2=2).sum(1))


def test_hutchinson_with_given_probe_by_hand() -> None:
    net = ODEnet(3, (16,))
    func = ODEfunc(net, "hutchinson", kinetic=1.0, jacobian=1.0)
    z = torch.randn(4, 3)
    probe = torch.randn(4, 3)
    func.before_odeint(noise=probe)
    _, neg_div, kinetic, frobenius = func(0.2, _state(func, z))
    jac = _jacobians(net, 0.2, z)
    eps_j = torch.einsum("bi,bij->bj", probe, jac)  # eps^T J
    torch.testing.assert_close(-neg_div, (eps_j * probe).sum(1))
    torch.testing.assert_close(frobenius, eps_j.pow(2).mean(1))
    torch.testing.assert_close(kinetic, 0.5 * net(0.2, z).pow(2).mean(1))


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_agrees_with_exact_in_expectation(noise: str) -> None:
    net = ODEnet(3, (16, 16))
    exact = ODEfunc(net, "exact", jacobian=1.0)
    hutch = ODEfunc(net, "hutchinson", noise, jacobian=1.0)
    # Samples do not interact, so 20000 copies of one point give 20000 independent probes.
    copies = 20000
    z = torch.randn(1, 3).expand(copies, 3)
    with torch.no_grad():
        _, neg_div, frobenius = exact(0.4, _state(exact, z[:1]))
        hutch.before_odeint()
        _, neg_est, frob_est = hutch(0.4, _state(hutch, z))
    if noise == "rademacher":
        assert set(hutch._probe.unique().tolist()) == {-1.0, 1.0}
    for estimate, target in ((neg_est, neg_div), (frob_est, frobenius)):
        stderr = estimate.std() / math.sqrt(copies)
        assert abs(estimate.mean() - target[0]) < 5 * stderr + 1e-12, (
            estimate.mean(),
            target[0],
            stderr,
        )


def test_probe_is_held_between_before_odeint_calls() -> None:
    func = ODEfunc(ODEnet(2, (8,)), "hutchinson", jacobian=1.0)
    state = _state(func, torch.randn(6, 2))
    func.before_odeint()
    first = func(0.1, state)
    again = func(0.1, state)  # same probe: the field is deterministic within a solve
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    func.before_odeint()
    redrawn = func(0.1, state)
    assert torch.equal(first[0], redrawn[0]) and not torch.equal(first[1], redrawn[1])
    func.before_odeint(noise=torch.ones(5, 2))
    with pytest.raises(ValueError, match="before_odeint"):
        func(0.1, state)


def test_probe_drawn_once_per_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = []
    original = torch.randint_like
    monkeypatch.setattr(
        torch, "randint_like", lambda *a, **k: draws.append(1) or original(*a, **k)
    )
    model = build_toy_model(
        (8, 8),
        divergence="hutchinson",
        jacobian=0.1,
        solver_kwargs=TIGHT,
        adjoint=True,
        count=True,
    )
    x = torch.randn(16, 2)
    nll, regs = nll_and_reg(model, x)
    (nll + regs["jacobian"]).backward()
    counts = nfe(model)
    assert len(draws) == 1  # one probe for the forward solve and the adjoint solve
    assert counts["forward"] > 6 and counts["backward"] > 6
    model(x)
    assert len(draws) == 2


def test_divergence_graph_only_when_grad_enabled() -> None:
    net = ODEnet(2, (8,))
    for divergence in ("exact", "hutchinson"):
        func = ODEfunc(net, divergence, kinetic=1.0, jacobian=1.0)
        state = _state(func, torch.randn(3, 2))
        func.before_odeint()
        with torch.no_grad():
            out = func(0.0, state)
        assert not any(o.requires_grad for o in out)
        out = func(0.0, state)
        assert all(o.requires_grad for o in out)
        # create_graph: the divergence is differentiable w.r.t. the weights (FFJORD's loss needs
        # it).
        for integrand in (out[1], out[3]):
            (grad,) = torch.autograd.grad(
                integrand.sum(), net.layers[0].linear.weight, retain_graph=True
            )
            assert grad.abs().sum() > 0


def test_regularisers_are_a_configuration() -> None:
    func = ODEfunc(ODEnet(2, (8,)))
    assert func.reg_names == () and func.reg_coeffs == {}
    assert len(func(0.0, _state(func, torch.randn(3, 2)))) == 2
    assert ODEfunc(ODEnet(2, (8,)), jacobian=0.5).reg_names == ("jacobian",)
    with pytest.raises(ValueError, match="regs"):
        func(0.0, (torch.randn(3, 2), torch.zeros(3), torch.zeros(3)))
    for kwargs, word in (
        ({"divergence": "approx"}, "divergence"),
        ({"noise": "uniform"}, "noise"),
        ({"kinetic": -1.0}, "kinetic"),
    ):
        with pytest.raises(ValueError, match=word):
            ODEfunc(ODEnet(2, (8,)), **kwargs)
    with pytest.raises(ValueError, match="layer_type"):
        ODEnet(2, (8,), layer_type="hyper")
    with pytest.raises(ValueError, match="nonlinearity"):
        ODEnet(2, (8,), nonlinearity="relu")


# --------------------------------------------------------------------------- CNF on a linear field


class _Spiral(nn.Module):
    """f(z) = A z with A = [[a, -b], [b, a]]: closed forms.

    z(t) = e^{at} R(bt) z, tr A = 2a, |f|^2 = (a^2 + b^2) |z|^2.
    """

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return torch.stack(
            [self.a * z[:, 0] - self.b * z[:, 1], self.b * z[:, 0] + self.a * z[:, 1]], dim=1
        )


def test_cnf_closed_form_on_a_linear_field() -> None:
    a, b, T = -0.4, 1.3, 0.5
    block = CNF(ODEfunc(_Spiral(a, b), "exact", kinetic=0.5), T0=T, solver_kwargs=TIGHT)
    z = torch.randn(7, 2)
    out = block(z)
    c, s = math.cos(b * T), math.sin(b * T)
    expected = math.exp(a * T) * torch.stack(
        [c * z[:, 0] - s * z[:, 1], s * z[:, 0] + c * z[:, 1]], dim=1
    )
    torch.testing.assert_close(out.z, expected, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(out.logp, torch.full((7,), -2 * a * T), rtol=1e-7, atol=1e-8)
    # integral of |f|^2 dt
    kinetic = (a * a + b * b) / (2 * a) * math.expm1(2 * a * T) * z.pow(2).sum(1)
    # coefficient 0.5 times RNODE's integrand 0.5 |f|^2 / d with d = 2
    torch.testing.assert_close(out.regs["kinetic"], 0.5 * kinetic / 4, rtol=1e-7, atol=1e-8)
    # A (B, 1) logp works too; reverse integration returns to z with a positive penalty of the same
    # size.
    torch.testing.assert_close(block(z, torch.zeros(7, 1)).logp.reshape(-1), out.logp)
    back = block(out.z, out.logp, reverse=True)
    torch.testing.assert_close(back.z, z, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(back.logp, torch.zeros(7), rtol=0, atol=1e-8)
    torch.testing.assert_close(back.regs["kinetic"], out.regs["kinetic"], rtol=1e-6, atol=1e-8)


def test_toflow_time_gradient_matches_closed_form() -> None:
    # nll = |z(T)|^2 / 2 + log(2 pi) - 2 a T, so dnll/dT = mean(a e^{2aT} |z|^2) - 2a.
    a, b, T = -0.4, 1.3, 0.5
    block = CNF(ODEfunc(_Spiral(a, b), "exact"), T0=T, solver_kwargs=TIGHT)
    z = torch.randn(7, 2)
    nll, regs = nll_and_reg(block, z)
    assert regs == {}
    nll.backward()
    expected = (a * math.exp(2 * a * T) * z.pow(2).sum(1)).mean() - 2 * a
    torch.testing.assert_close(block.horizon.T.grad, expected, rtol=1e-6, atol=1e-8)
    assert block.odefunc.diffeq.a.grad is not None and block.odefunc.diffeq.b.grad is not None


def test_toflow_time_gradient_matches_finite_differences() -> None:
    block = build_toy_model((8, 8), solver_kwargs=TIGHT).chain[0]
    x = torch.randn(8, 2)
    nll, _ = nll_and_reg(block, x)
    nll.backward()
    h, values = 1e-4, []
    with torch.no_grad():
        for T in (0.5 + h, 0.5 - h):
            block.horizon.T.fill_(T)
            values.append(nll_and_reg(block, x)[0])
    torch.testing.assert_close(
        block.horizon.T.grad, (values[0] - values[1]) / (2 * h), rtol=1e-5, atol=1e-7
    )


# ----------------------------------------------------------------------------- the time modes


@pytest.mark.parametrize("adjoint", [False, True])
def test_ffjord_frozen_T_is_a_plain_odeint_solve(adjoint: bool) -> None:
    model = build_toy_model(
        (8,), time_mode="fixed", kinetic=0.1, solver_kwargs=TIGHT, adjoint=adjoint
    )
    block, x = model.chain[0], torch.randn(5, 2)
    assert not block.horizon.T.requires_grad and block.horizon.budget is None
    out = block(x)
    (out.z.sum() + out.logp.sum() + out.regs["kinetic"].sum()).backward()
    assert block.horizon.T.grad is None
    grads = [p.grad.clone() for p in network_parameters(model)]
    model.zero_grad()
    solver = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    z, logp, kinetic = solver(
        block.odefunc, _state(block.odefunc, x), torch.tensor([0.0, 0.5]), **TIGHT
    )
    assert torch.equal(out.z, z[-1]) and torch.equal(out.logp, logp[-1])
    torch.testing.assert_close(out.regs["kinetic"], 0.1 * kinetic[-1], rtol=0, atol=0)
    (z[-1].sum() + logp[-1].sum() + 0.1 * kinetic[-1].sum()).backward()
    for a, b in zip(grads, (p.grad for p in network_parameters(model))):
        assert torch.equal(a, b)


def test_steer_draws_T_per_training_solve_restores_it_and_is_deterministic_at_eval() -> None:
    T0 = 0.5
    model = build_toy_model((8,), time_mode="steer", T0=T0, solver_kwargs=TIGHT)
    fixed = build_toy_model((8,), time_mode="fixed", T0=T0, solver_kwargs=TIGHT)
    fixed.load_state_dict(model.state_dict())
    block, x = model.chain[0], torch.randn(4, 2)
    assert not block.horizon.T.requires_grad
    torch.manual_seed(3)
    trained = model(x).z
    assert end_times(model) == [T0]
    torch.manual_seed(3)
    T = T0 + (T0 - 0.25) * (2 * float(torch.rand(())) - 1)  # U[0.25, 2 T0 - 0.25]
    assert 0.25 <= T <= 2 * T0 - 0.25 and T != T0
    with torch.no_grad():
        fixed.chain[0].horizon.T.fill_(T)
    torch.testing.assert_close(trained, fixed(x).z, rtol=1e-12, atol=1e-12)
    model.eval()
    with torch.no_grad():
        fixed.chain[0].horizon.T.fill_(T0)
    torch.manual_seed(3)
    first = model(x).z
    assert torch.equal(first, model(x).z) and torch.equal(first, fixed(x).z)
    # A failing training solve restores T too.
    model.train()
    block.odefunc.diffeq = _Failing()
    with pytest.raises(RuntimeError, match="field failed"):
        model(x)
    assert end_times(model) == [T0]


class _Failing(nn.Module):
    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        raise RuntimeError("field failed")


@pytest.mark.parametrize("time_mode", ["learn", "fixed", "steer"])
def test_every_parameter_gets_a_gradient(time_mode: str) -> None:
    model = build_toy_model(
        (8,), num_blocks=2, kinetic=0.1, time_mode=time_mode, solver_kwargs=TIGHT
    )
    nll, regs = nll_and_reg(model, torch.randn(8, 2))
    (nll + sum(regs.values())).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    learned = time_mode == "learn"
    for block in model.chain:
        assert (
            block.horizon.T.requires_grad is learned
            and (block.horizon.T.grad is not None) is learned
        )
    horizon_ids = {id(block.horizon.T) for block in model.chain}
    assert all(id(p) not in horizon_ids for p in network_parameters(model))
    assert len(network_parameters(model)) + 2 * learned == sum(
        p.requires_grad for p in model.parameters()
    )


def test_coordinate_descent_step_moves_T_only_in_learn_mode() -> None:
    for time_mode, moves in (("learn", True), ("steer", False)):
        model = build_toy_model((8,), time_mode=time_mode, solver_kwargs=TIGHT)
        weights = torch.optim.Adam(network_parameters(model), lr=1e-3)
        stepper = CoordinateDescentStepper(weights, model) if moves else weights
        nll, _ = nll_and_reg(model, torch.randn(16, 2))
        nll.backward()
        stepper.step()
        (T,) = end_times(model)
        assert (T != 0.5) is moves and 0.1 <= T <= 0.9


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("time_mode", ["fixed", "learn"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_budget_blocks_take_4N_evaluations(time_mode: str, adjoint: bool) -> None:
    model = build_toy_model(
        (8,),
        num_blocks=2,
        time_mode=time_mode,
        solver_kwargs=TIGHT,
        adjoint=adjoint,
        budget=3,
        count=True,
    )
    nll, _ = nll_and_reg(model, torch.randn(5, 2))
    # whatever solver_kwargs say
    assert nfe(model, reset=True) == {
        "forward": 2 * 4 * 3,
        "backward": 0,
    }
    nll.backward()
    # odeint or odeint_adjoint: a budget backpropagates through its steps (0.4), no evaluation in
    # backward.
    assert nfe(model) == {"forward": 0, "backward": 0}
    assert all((b.horizon.T.grad is not None) == (time_mode == "learn") for b in model.chain)


def test_budget_block_matches_an_rk4_solve_and_scores_adaptively() -> None:
    model = build_toy_model((8,), time_mode="fixed", solver_kwargs=TIGHT, budget=3, count=True)
    block, x = model.chain[0], torch.randn(5, 2)
    state = _state(block.odefunc, x)
    grid = torch.linspace(0, 0.5, 4)
    rk4 = torchdiffeq.odeint(block.odefunc, state, grid, method="rk4")
    torch.testing.assert_close(block(x).z, rk4[0][-1], rtol=1e-12, atol=1e-12)
    exact = block.eval()(x)  # eval(): the horizon's reference, the block's own solver settings
    torch.testing.assert_close(
        exact.z, torchdiffeq.odeint(block.odefunc, state, grid[[0, -1]], **TIGHT)[0][-1]
    )
    assert not torch.equal(exact.z, rk4[0][-1])


def test_the_loss_never_moves_the_placement() -> None:
    model = build_toy_model((8,), solver_kwargs=TIGHT, budget=2)
    horizon = model.chain[0].horizon
    # the reference: the call's TIGHT
    assert horizon.budget.reference is None and horizon.T.requires_grad
    # TO-FLOW learns T on a budget too
    assert horizon.budget.reference_for(model.chain[0].solver_kwargs) == TIGHT
    # a buffer: no optimizer holds it
    assert all(p is not horizon.budget.placement for p in model.parameters())
    before = horizon.budget.placement.clone()
    nll, _ = nll_and_reg(model, torch.randn(5, 2))
    nll.backward()
    assert torch.equal(horizon.budget.placement, before)


# ----------------------------------------------------------------------------- flow matching


class _Recorder(nn.Module):
    """A field that returns zeros and records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls.append((t, x))
        return self.w * x


def test_flow_matching_loss_by_hand() -> None:
    model = build_toy_model((8,), T0=0.8, time_mode="fixed", solver_kwargs=TIGHT)
    core = model.chain[0].odefunc
    core.diffeq = _Recorder()
    x = torch.randn(6, 2)
    torch.manual_seed(4)
    loss = flow_matching_loss(model, x)
    torch.manual_seed(4)
    eps, s = torch.randn_like(x), torch.rand(6, 1)
    ((t, xs),) = core.diffeq.calls
    torch.testing.assert_close(t, 0.8 * s)
    torch.testing.assert_close(xs, (1 - s) * x + s * eps)
    torch.testing.assert_close(loss, ((eps - x) / 0.8).pow(2).sum(1).mean())


@pytest.mark.parametrize("image", [False, True])
def test_flow_matching_loss_trains_the_field_and_not_T(image: bool) -> None:
    if image:
        model = build_image_model(
            hidden=(4,), num_blocks=1, net="mlp", image_shape=(1, 3, 3), solver_kwargs=TIGHT
        )
        x = torch.randn(8, 1, 3, 3)
    else:
        model = build_toy_model((16,), time_mode="learn", solver_kwargs=TIGHT)
        x = torch.randn(32, 2)
    opt = torch.optim.Adam(network_parameters(model), lr=1e-2)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)  # the same noise and times every step: a fixed objective
        loss = flow_matching_loss(model, x)
        opt.zero_grad()
        loss.backward()
        for i, p in enumerate(network_parameters(model)):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), i
        assert model.chain[0].horizon.T.grad is None  # no ODE solve, no dL/dT
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_flow_matching_refuses_several_blocks() -> None:
    with pytest.raises(ValueError, match="one CNF block, the model has 2"):
        flow_matching_loss(build_toy_model((8,), num_blocks=2), torch.randn(4, 2))


# ----------------------------------------------------------------------------- models


def test_toy_model_round_trip_and_log_density() -> None:
    model = build_toy_model((16, 16), num_blocks=2, kinetic=0.1, jacobian=0.1, solver_kwargs=TIGHT)
    x = torch.randn(8, 2)
    z, delta, regs = model(x)
    assert set(regs) == {"kinetic", "jacobian"} and all(bool((r > 0).all()) for r in regs.values())
    log_px = standard_normal_logprob(z) - delta
    back, log_px_back, regs_back = model(z, standard_normal_logprob(z), reverse=True)
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(log_px_back, log_px, rtol=1e-6, atol=1e-7)
    for name in regs:
        torch.testing.assert_close(regs_back[name], regs[name], rtol=1e-5, atol=1e-7)


def test_toy_model_adjoint_matches_direct() -> None:
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(1)
        model = build_toy_model((8, 8), kinetic=0.1, solver_kwargs=TIGHT, adjoint=adjoint)
        nll, regs = nll_and_reg(model, torch.randn(8, 2))
        (nll + sum(regs.values())).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for direct, adjoint in zip(*grads):
        torch.testing.assert_close(adjoint, direct, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_and_repr() -> None:
    model = build_toy_model((8,), num_blocks=2, solver_kwargs=TIGHT, budget=2)
    with torch.no_grad():
        model.chain[1].horizon.T.fill_(0.6)
    model.chain[1].horizon.budget.steps = 3
    clone = build_toy_model((8,), num_blocks=2, solver_kwargs=TIGHT, budget=2)
    clone.load_state_dict(model.state_dict())
    assert end_times(clone) == [0.5, 0.6] and [b.horizon.budget.steps for b in clone.chain] == [
        2,
        3,
    ]
    x = torch.randn(4, 2)
    torch.testing.assert_close(clone(x).z, model(x).z)
    text = repr(model)
    assert "CNF(" in text and "T=0.6" in text and "Budget(steps=3" in text
    assert torch.equal(SequentialFlow([])(x).logp, torch.zeros(4))


def test_cnf_rejects_bad_configuration() -> None:
    with pytest.raises(TypeError, match="ODEfunc"):
        CNF(ODEnet(2, (8,)))
    with pytest.raises(ValueError, match="T0"):
        CNF(ODEfunc(ODEnet(2, (8,))), T0=0.0)
    with pytest.raises(ValueError, match="T0 > 0.25, got 0.2"):
        CNF(ODEfunc(ODEnet(2, (8,))), T0=0.2, time_mode="steer")
    with pytest.raises(ValueError, match="logpz"):
        CNF(ODEfunc(ODEnet(2, (8,))))(torch.randn(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="time_mode"):
        build_toy_model((8,), time_mode="random")
    with pytest.raises(ValueError, match="num_blocks"):
        build_toy_model((8,), num_blocks=0)
    with pytest.raises(ValueError, match="hidden"):
        ODEnet(2, (8, 0))


def test_image_model_bits_per_dim_and_sampling() -> None:
    model = build_image_model(hidden=(8,), num_blocks=2, kinetic=0.01, budget=4, count=True)
    train, _ = load_digits_split()
    bpd, regs = bits_per_dim_and_reg(model, train[:4], torch.Generator().manual_seed(0))
    assert bpd.dim() == 0 and math.isfinite(bpd.item()) and bpd.item() > 0
    (bpd + sum(regs.values())).backward()
    assert all(p.grad is not None for p in network_parameters(model))
    assert nfe(model, reset=True)["forward"] == 2 * 4 * 4  # 2 blocks x 4 rk4 steps x 4 stages
    assert nfe(model) == {"forward": 0, "backward": 0}
    x, log_px, _ = sample(model, (2, 1, 8, 8), torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and log_px.shape == (2,) and not x.requires_grad
