"""Faults: solver failures name the horizon, non-finite steps are all-or-nothing, mixed precision and GradScaler."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from fields import TimeMLP
from torch import nn

from torch_tempopt import CoordinateDescentStepper, LearnableHorizon
from torch_tempopt.nfe import in_backward

RK4 = dict(method="rk4", options=dict(step_size=0.125))


class Block(nn.Module):
    def __init__(self, field: nn.Module | None = None, T0: float = 0.5, **solver: object) -> None:
        super().__init__()
        self.field = field if field is not None else TimeMLP(2, 8)
        self.horizon = LearnableHorizon(T0=T0)
        self.solver = solver or RK4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizon(self.field, x, **self.solver)


class Model(nn.Module):
    def __init__(self, **kw: object) -> None:
        super().__init__()
        self.block = Block(**kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def weights(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.endswith(("horizon.T", "horizon.t0"))]


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 1).pow(2).sum(1).mean()


# ------------------------------------------------------------------ (a) solver failures


class Blowup(nn.Module):
    """dy/dt = y^2 from y0 = 1: y = 1 / (1 - t) blows up at t = 1; an adaptive solver's step underflows there."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.scale * y**2


def test_step_size_underflow_keeps_its_type_and_gets_a_note_naming_the_horizon() -> None:
    model = Model(field=Blowup(), T0=0.5, method="dopri5", rtol=1e-4, atol=1e-4)
    stepper = CoordinateDescentStepper(torch.optim.SGD(weights(model), lr=0.0), model, lr=1e-3, alpha=0.0)
    x = torch.ones(4, 1)
    for _ in range(2):  # fine below t = 1
        stepper.zero_grad()
        model(x).mean().backward()
        stepper.step()
    with torch.no_grad():
        model.block.horizon.T.fill_(1.5)
    with pytest.raises(AssertionError, match="underflow in dt") as info:
        model(x)
    (note,) = info.value.__notes__
    assert "LearnableHorizon 'block.horizon' (forward, t0=0 -> T=1.5, bounds [0.1, 0.9], after 2 optimizer steps)" in note
    assert "the solve failed" in note
    for remedy in ("rtol/atol", "min_step", "method='rk4'", "activation", "skip_nonfinite=True"):
        assert remedy in note, remedy
    # pytest.raises(match=...) sees the notes too, and the direction is named.
    with pytest.raises(AssertionError, match=r"reverse, T=1.5 -> t0=0"):
        model.block.horizon(Blowup(), -x, reverse=True, rtol=1e-4, atol=1e-4)


def test_other_solver_errors_are_annotated_without_remedies() -> None:
    def broken(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise KeyError("a bug in the field")

    horizon = LearnableHorizon(T0=0.5)
    with pytest.raises(KeyError, match="a bug in the field") as info:
        horizon(broken, torch.ones(2))
    assert info.value.__notes__ == ["LearnableHorizon (forward, t0=0 -> T=0.5, bounds [0.1, 0.9]): the solve failed."]


def test_field_failure_in_the_backward_pass_names_the_horizon() -> None:
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if in_backward():
            raise RuntimeError("the field broke in backward")
        return -y

    horizon = LearnableHorizon(T0=0.5)
    y = horizon(field, torch.ones(2), **RK4)
    with pytest.raises(RuntimeError, match="broke in backward") as info:
        y.sum().backward()
    assert any("LearnableHorizon (forward" in n and "computing dL/dT in the backward pass" in n for n in info.value.__notes__)


def test_empty_state_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="y0 has no elements"):
        LearnableHorizon()(lambda t, y: -y, torch.ones(0, 2))


# ------------------------------------------------------------------ (b) non-finite: all or nothing


def snapshot(model: nn.Module, stepper: CoordinateDescentStepper) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(stepper.state_dict())


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


CASES = [
    (mode, where, skip)
    for mode, where, skip in itertools.product(("alternate", "exact", "joint"), ("weights", "time", "exact-time"), (True, False))
    if where != "exact-time" or mode == "exact"  # the second evaluation exists in exact mode only
]


@pytest.mark.parametrize("mode, where, skip", CASES)
def test_a_nonfinite_gradient_never_half_applies_a_step(mode: str, where: str, skip: bool) -> None:
    torch.manual_seed(0)
    model = Model()
    stepper = CoordinateDescentStepper(torch.optim.Adam(weights(model), lr=1e-2), model, mode=mode, skip_nonfinite=skip)
    x = torch.randn(8, 2)
    calls: list[int] = []
    armed = []

    def closure() -> torch.Tensor:
        calls.append(1)
        stepper.zero_grad()
        loss = loss_of(model, x)
        loss.backward()
        bad = {"weights": 1, "time": 1, "exact-time": 2}[where]
        if armed and len(calls) == bad:  # poison one gradient, in the first or (exact mode) the second evaluation
            target = weights(model)[0] if where == "weights" else model.block.horizon.T
            target.grad.view(-1)[0] = float("nan")
        return loss

    stepper.step(closure)  # a warm-up step, so that Adam has state to corrupt
    calls.clear()
    armed.append(True)
    model_before, stepper_before = snapshot(model, stepper)
    if mode == "exact" and where == "time" and not skip:
        stepper.step(closure)  # exact mode discards the first dL/dT: the one at the updated weights is finite
        assert stepper.stats["steps"] == 2 and stepper.stats["horizons"][0]["nonfinite"] == 0
        return
    with pytest.warns(RuntimeWarning):
        stepper.step(closure)
    T_after = model.block.horizon.T.detach().clone()
    weights_moved = any(not torch.equal(p, model_before[n]) for n, p in model.state_dict().items() if "horizon" not in n)
    if skip:  # the whole step is skipped: weights, T and both optimizers as before
        assert_same(model.state_dict(), model_before)
        state = stepper.state_dict()
        assert_same(state["optimizer"], stepper_before["optimizer"])
        assert_same(state["horizon_optimizer"], stepper_before["horizon_optimizer"])
        assert stepper.stats["skipped_steps"] == 1 and stepper.stats["steps"] == 1
    else:
        assert torch.isfinite(T_after)  # T is protected whatever happens
        if where == "weights":
            assert not torch.isfinite(weights(model)[0]).all()  # reaches the weights, with a warning
        elif mode == "joint":
            assert torch.equal(T_after, model_before["block.horizon.T"]) and weights_moved
        else:  # a non-finite dL/dT: the weight step stands, T's is skipped and counted
            assert torch.equal(T_after, model_before["block.horizon.T"]) and weights_moved
            assert stepper.stats["horizons"][0]["nonfinite"] == 1


# ------------------------------------------------------------------ (c) mixed precision


def test_autocast_bfloat16_keeps_T_and_its_gradient_float32() -> None:
    torch.manual_seed(0)
    model = Model().float()
    x = torch.randn(16, 2, dtype=torch.float32)
    reference = copy.deepcopy(model)
    loss_of(reference, x).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, x)
    loss.backward()
    T = model.block.horizon.T
    assert T.dtype == T.grad.dtype == torch.float32
    assert T.grad.item() == pytest.approx(reference.block.horizon.T.grad.item(), rel=5e-2, abs=1e-3)
    assert model.block.horizon.T_init.dtype == torch.float64  # bounds are never rounded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_state_gets_a_float32_time_grid(dtype: torch.dtype) -> None:
    horizon = LearnableHorizon(T0=0.5123).float()
    y = horizon(lambda t, y: -y, torch.ones(3, dtype=dtype), **RK4)
    assert y.dtype == dtype
    y.float().sum().backward()
    exact = -3 * torch.exp(torch.tensor(-0.5123)).item()  # dL/dT = <1, -y(T)>
    assert horizon.T.grad.dtype == torch.float32
    assert horizon.T.grad.item() == pytest.approx(exact, rel=1e-2)


def _scaler_run(scaler: torch.amp.GradScaler | None, steps: int = 3, attach: bool = True) -> tuple[Model, CoordinateDescentStepper]:
    torch.manual_seed(0)
    model = Model().float()
    stepper = CoordinateDescentStepper(torch.optim.Adam(weights(model), lr=1e-2), model, lr=1e-2)
    if scaler is not None and attach:
        stepper.attach_grad_scaler(scaler)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 2, generator=g, dtype=torch.float32)
        stepper.zero_grad()
        loss = loss_of(model, x)
        if scaler is None:
            loss.backward()
            stepper.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(stepper)
            scaler.update()
    return model, stepper


def test_grad_scaler_unscales_dLdT_and_matches_the_unscaled_run_bitwise() -> None:
    plain, plain_stepper = _scaler_run(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled, scaled_stepper = _scaler_run(scaler)
    assert_same(scaled.state_dict(), plain.state_dict())  # powers of two scale exactly
    assert scaled_stepper.stats == plain_stepper.stats
    # Without attach_grad_scaler, dL/dT stays scaled: the regulariser is swamped and T goes elsewhere.
    unattached, stepper = _scaler_run(torch.amp.GradScaler("cpu", init_scale=2.0**12), attach=False)
    assert stepper.stats["horizons"][0]["dLdT"] == pytest.approx(2.0**12 * plain_stepper.stats["horizons"][0]["dLdT"], rel=1e-3)


def test_grad_scaler_overflow_in_dLdT_skips_the_step_and_backs_the_scale_off() -> None:
    torch.manual_seed(0)
    model = Model().float()
    stepper = CoordinateDescentStepper(torch.optim.Adam(weights(model), lr=1e-2), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    stepper.attach_grad_scaler(scaler)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 2, dtype=torch.float32)
    scaler.scale(loss_of(model, x)).backward()
    model.block.horizon.T.grad.fill_(float("inf"))  # only dL/dT overflows
    scaler.step(stepper)
    scaler.update()
    assert_same(model.state_dict(), before)
    assert stepper.stats["skipped_steps"] == 1 and stepper.stats["steps"] == 0
    assert scaler.get_scale() == 2.0**7
    # An overflow in the weights: the scaler skips the stepper itself.
    stepper.zero_grad()
    scaler.scale(loss_of(model, x)).backward()
    weights(model)[0].grad.view(-1)[0] = float("nan")
    scaler.step(stepper)
    scaler.update()
    assert_same(model.state_dict(), before)
    assert scaler.get_scale() == 2.0**6
    # A clean step goes through.
    stepper.zero_grad()
    scaler.scale(loss_of(model, x)).backward()
    scaler.step(stepper)
    scaler.update()
    assert stepper.stats["steps"] == 1 and model.block.horizon.T.item() != 0.5


def test_autocast_and_grad_scaler_together() -> None:
    torch.manual_seed(0)
    model = Model().float()
    stepper = CoordinateDescentStepper(torch.optim.Adam(weights(model), lr=1e-2), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    stepper.attach_grad_scaler(scaler)
    for _ in range(2):
        stepper.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, torch.randn(16, 2, dtype=torch.float32))
        scaler.scale(loss).backward()
        scaler.unscale_(stepper)  # e.g. to clip the weights' gradients: dL/dT is unscaled in step()
        torch.nn.utils.clip_grad_norm_(weights(model), 10.0)
        scaler.step(stepper)
        scaler.update()
    T = model.block.horizon.T
    assert stepper.stats["steps"] == 2 and T.dtype == torch.float32 and torch.isfinite(T)
    assert abs(stepper.stats["horizons"][0]["dLdT"]) < 100  # unscaled


def test_attach_grad_scaler_rejects_bad_input() -> None:
    model = Model()
    stepper = CoordinateDescentStepper(torch.optim.Adam(weights(model)), model)
    with pytest.raises(TypeError, match="scaler"):
        stepper.attach_grad_scaler(object())
    exact = CoordinateDescentStepper(torch.optim.Adam(weights(model)), model, mode="exact")
    with pytest.raises(ValueError, match="exact"):
        exact.attach_grad_scaler(torch.amp.GradScaler("cpu"))
    stepper.attach_grad_scaler(torch.amp.GradScaler("cpu"))
    stepper.attach_grad_scaler(None)  # detaches
