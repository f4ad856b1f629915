"""CoordinateDescentStepper: compare to vanilla, regulariser, clip, modes, checkpoints, bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from fields import TimeMLP
from torch import nn

from torch_tempopt import CoordinateDescentStepper, LearnableHorizon


class Flow(nn.Module):
    """A two-block toy flow, each block with its own horizon."""

    def __init__(self) -> None:
        super().__init__()
        self.f1, self.f2 = TimeMLP(), TimeMLP()
        self.h1, self.h2 = LearnableHorizon(T0=0.5), LearnableHorizon(T0=0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = dict(rtol=1e-6, atol=1e-6)
        return self.h2(self.f2, self.h1(self.f1, x, **kw), **kw)


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).sum(1).mean()


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.split(".")[-1] not in ("T", "t0")]


def _make(seed: int = 0, **kw) -> tuple[Flow, CoordinateDescentStepper]:
    torch.manual_seed(seed)
    model = Flow()
    return model, CoordinateDescentStepper(torch.optim.Adam(_weights(model), lr=1e-2), model, **kw)


def _train(model: nn.Module, opt: torch.optim.Optimizer, iters: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        x = torch.randn(8, 2, generator=g)
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()


def test_compare_to_vanilla_with_lr_and_alpha_zero():
    model, opt = _make(lr=0.0, alpha=0.0)
    torch.manual_seed(0)
    ref = Flow()
    ref_opt = torch.optim.Adam(_weights(ref), lr=1e-2)
    _train(model, opt, 5)
    _train(ref, ref_opt, 5)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert model.h1.T.item() == 0.5 and model.h2.T.item() == 0.8


def test_alpha_shrinks_T_without_loss_gradient():
    h = LearnableHorizon(T0=0.5)
    w = nn.Parameter(torch.zeros(()))
    opt = CoordinateDescentStepper(torch.optim.SGD([w], lr=0.1), [h], lr=0.01, alpha=0.1)
    for k in range(5):
        h.T.grad = torch.zeros(())
        opt.step()
        assert h.T.item() == pytest.approx(0.5 - 0.01 * (k + 1), abs=1e-7)


def test_one_adam_step_moves_T_by_lr_against_gradient_sign():
    for g in (3.7, -0.02):
        h = LearnableHorizon(T0=0.5)
        opt = CoordinateDescentStepper(torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=0.1), [h], lr=0.01, alpha=0.0)
        h.T.grad = torch.tensor(g)
        opt.step()
        assert h.T.item() == pytest.approx(0.5 - 0.01 * (1 if g > 0 else -1), abs=1e-7)
        assert h.T.grad.item() == g  # dL/dT is left as it was (the regulariser is not added in place)


@pytest.mark.parametrize("sign", [+1, -1])
def test_clip_holds_at_both_bounds(sign):
    h = LearnableHorizon(T0=0.5, eps=0.1)
    opt = CoordinateDescentStepper(torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=0.1), [h], lr=0.2, alpha=0.0)
    for _ in range(10):
        h.T.grad = torch.tensor(-sign * 100.0)
        opt.step()
        assert h.bounds[0] <= h.T.item() <= h.bounds[1]
    assert h.T.item() == pytest.approx(h.bounds[1] if sign > 0 else h.bounds[0])
    assert opt.stats["horizons"][0]["clipped"] and opt.stats["horizons"][0]["clip_count"] >= 1


@pytest.mark.parametrize("reset", [True, False])
def test_reset_at_bound_releases_T_when_gradient_turns(reset):
    """Pushed to the upper bound for a while, then the gradient turns inward."""
    h = LearnableHorizon(T0=0.5, eps=0.1)
    opt = CoordinateDescentStepper(
        torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=0.1), [h], lr=0.05, alpha=0.0, reset_at_bound=reset
    )
    for _ in range(30):
        h.T.grad = torch.tensor(-1.0)
        opt.step()
    assert h.T.item() == pytest.approx(0.9)
    h.T.grad = torch.tensor(0.5)
    opt.step()
    if reset:
        assert h.T.item() == pytest.approx(0.9 - 0.05, abs=1e-6)
    else:
        assert h.T.item() == pytest.approx(0.9)  # Adam's momentum still points outward


def test_finds_horizons_and_removes_them_from_the_weight_optimizer():
    torch.manual_seed(0)
    model = Flow()
    inner = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    _train(model, inner, 1)
    assert model.h1.T in inner.state
    with pytest.warns(UserWarning, match="removed 2 horizon parameter"):
        opt = CoordinateDescentStepper(inner, model)
    assert [h for h in opt.horizons] == [model.h1, model.h2]
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.h1.T) not in ids and id(model.h2.T) not in ids
    assert model.h1.T not in inner.state
    assert {id(p) for g in opt.horizon_optimizer.param_groups for p in g["params"]} == {id(model.h1.T), id(model.h2.T)}
    # a list of horizons, with duplicates, works too
    opt2 = CoordinateDescentStepper(torch.optim.Adam(_weights(model)), [model.h1, model.h1, model.h2])
    assert len(opt2.horizons) == 2


def test_learned_t0_is_stepped_and_kept_below_T():
    h = LearnableHorizon(T0=1.0, t0=0.0, learn_t0=True)
    opt = CoordinateDescentStepper(torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=0.1), [h], lr=0.1, alpha=0.0)
    for _ in range(30):
        h.T.grad = torch.tensor(1.0)  # push T down
        h.t0.grad = torch.tensor(-1.0)  # push t0 up
        opt.step()
        assert h.t0.item() <= h.T.item() - h.eps.item() + 1e-9
    assert h.T.item() == pytest.approx(h.bounds[0])


def test_nonfinite_T_gradient_is_skipped_counted_and_warned_once():
    model, opt = _make()
    _train(model, opt, 1)
    T1, T2 = model.h1.T.item(), model.h2.T.item()
    w = [p.clone() for p in _weights(model)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            _loss(model, torch.randn(8, 2)).backward()
            model.h1.T.grad = torch.tensor(float("nan"))
            opt.step()
    assert sum("NaN or infinite" in str(r.message) for r in rec) == 1
    assert model.h1.T.item() == T1 and model.h2.T.item() != T2
    assert opt.stats["horizons"][0]["nonfinite"] == 3 and opt.stats["horizons"][1]["nonfinite"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(w, _weights(model)))  # weights still stepped


def test_skip_nonfinite_skips_the_whole_step():
    model, opt = _make(skip_nonfinite=True)
    _train(model, opt, 1)
    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    _loss(model, torch.randn(8, 2)).backward()
    next(iter(_weights(model))).grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert opt.stats["skipped_steps"] == 1


def test_nonfinite_weight_gradient_warns_without_skip():
    model, opt = _make()
    opt.zero_grad()
    _loss(model, torch.randn(8, 2)).backward()
    next(iter(_weights(model))).grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skip_nonfinite=True"):
        opt.step()


def test_exact_mode_uses_gradient_at_updated_weights():
    x = torch.randn(8, 2)
    model, opt = _make(mode="exact", alpha=0.0, lr=1e-2)
    ref = copy.deepcopy(model)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, x)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(calls) == 2
    # the reference: step the weights, then take dL/dT at the new weights
    ref_opt = torch.optim.Adam(_weights(ref), lr=1e-2)
    _loss(ref, x).backward()
    ref_opt.step()
    ref.zero_grad()
    _loss(ref, x).backward()
    for a, b in zip(_weights(model), _weights(ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for h, hr in ((model.h1, ref.h1), (model.h2, ref.h2)):
        assert opt.stats["horizons"][[model.h1, model.h2].index(h)]["dLdT"] == pytest.approx(hr.T.grad.item(), rel=1e-12)
        assert h.T.item() == pytest.approx(hr.T.item() - 1e-2 * torch.sign(hr.T.grad).item(), abs=1e-7)


def test_joint_mode_steps_T_with_the_weight_optimizer_without_clip():
    h = LearnableHorizon(T0=0.5)
    w = nn.Parameter(torch.zeros(()))
    opt = CoordinateDescentStepper(torch.optim.SGD([w], lr=0.1), [h], mode="joint")
    assert opt.horizon_optimizer is None
    assert any(p is h.T for g in opt.param_groups for p in g["params"])
    for _ in range(10):
        h.T.grad = torch.tensor(-1.0)
        opt.step()
    assert h.T.item() == pytest.approx(1.5)  # past the clip at 0.9: no clip in joint mode


def test_state_dict_round_trip_continues_bitwise():
    model, opt = _make(seed=3)
    _train(model, opt, 3, seed=5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, 4, seed=6)

    fresh, fresh_opt = _make(seed=99)
    fresh.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    _train(fresh, fresh_opt, 4, seed=6)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_opt.stats == opt.stats
    assert fresh.h1.bounds == model.h1.bounds


def test_state_dict_restores_bounds():
    model, opt = _make()
    sd = copy.deepcopy(opt.state_dict())
    other = Flow()
    other.h1 = LearnableHorizon(T0=2.0, eps=0.5)
    other_opt = CoordinateDescentStepper(torch.optim.Adam(_weights(other), lr=1e-2), other)
    other_opt.load_state_dict(sd)
    assert other.h1.bounds == model.h1.bounds


def test_lr_scheduler_and_param_groups_touch_weights_only():
    model, opt = _make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 2)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert opt.horizon_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    assert "CoordinateDescentStepper(mode='alternate'" in repr(opt)


def test_zero_grad_clears_horizons():
    model, opt = _make()
    _loss(model, torch.randn(4, 2)).backward()
    opt.zero_grad()
    assert model.h1.T.grad is None and all(p.grad is None for p in _weights(model))
    _loss(model, torch.randn(4, 2)).backward()
    opt.zero_grad(set_to_none=False)
    assert model.h1.T.grad.item() == 0.0


def test_custom_horizon_optimizer():
    model = Flow()
    q = torch.optim.SGD([model.h1.T, model.h2.T], lr=0.1)
    opt = CoordinateDescentStepper(torch.optim.Adam(_weights(model)), model, horizon_optimizer=q, alpha=0.0)
    assert opt.horizon_optimizer is q
    opt2 = CoordinateDescentStepper(torch.optim.Adam(_weights(model)), model,
                                    horizon_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.3))
    assert opt2.horizon_optimizer.param_groups[0]["lr"] == 0.3
    model.h1.T.grad = torch.tensor(1.0)
    opt.step()
    assert model.h1.T.item() == pytest.approx(0.4)


def test_unused_horizon_is_left_alone():
    model, opt = _make()
    opt.zero_grad()
    model.h1(model.f1, torch.randn(4, 2)).sum().backward()  # h2 not used
    opt.step()
    assert model.h2.T.item() == 0.8 and opt.stats["horizons"][1]["dLdT"] is None


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr="0.1"), TypeError, "lr"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(alpha=float("inf")), ValueError, "alpha"),
        (dict(alpha=None), TypeError, "alpha"),
        (dict(mode="sometimes"), ValueError, "mode"),
        (dict(horizon_optimizer=3), TypeError, "horizon_optimizer"),
        (dict(horizon_optimizer=lambda ps: 3), TypeError, "horizon_optimizer"),
        (dict(reset_at_bound="yes"), TypeError, "reset_at_bound"),
        (dict(skip_nonfinite=1), TypeError, "skip_nonfinite"),
    ],
)
def test_constructor_rejects_bad_input(kwargs, exc, name):
    model = Flow()
    with pytest.raises(exc, match=name):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), model, **kwargs)


def test_rejects_bad_wiring():
    model = Flow()
    with pytest.raises(TypeError, match="optimizer"):
        CoordinateDescentStepper([p for p in model.parameters()], model)
    with pytest.raises(ValueError, match="no LearnableHorizon"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no LearnableHorizon"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), [])
    with pytest.raises(TypeError, match=r"horizons\[1\]"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), [model.h1, model.f1])
    with pytest.raises(TypeError, match="horizons"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), 3)
    with pytest.raises(ValueError, match="horizon_optimizer"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), model, horizon_optimizer=torch.optim.SGD([model.h1.T], lr=1))
    with pytest.raises(ValueError, match="horizon_optimizer"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), model, mode="joint",
                                 horizon_optimizer=lambda ps: torch.optim.SGD(ps, lr=1))
    opt = CoordinateDescentStepper(torch.optim.Adam(_weights(model)), model)
    with pytest.raises(TypeError, match="already"):
        CoordinateDescentStepper(opt, model)
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"state": {}})


def test_exact_mode_without_closure_is_refused():
    model, opt = _make(mode="exact")
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="closure"):
        opt.step(closure=3)
