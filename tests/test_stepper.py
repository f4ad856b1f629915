"""CoordinateDescentStepper: compare to vanilla, regulariser, clip, modes, checkpoints, wiring and
bad input.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from fields import TimeMLP
from helpers import assert_same
from torch import nn

from torch_tempopt import BudgetGuard, CoordinateDescentStepper, LearnableHorizon


class Flow(nn.Module):
    """A two-block toy flow, each block with its own horizon."""

    def __init__(self) -> None:
        super().__init__()
        self.f1, self.f2 = TimeMLP(), TimeMLP()
        self.h1, self.h2 = LearnableHorizon(T0=0.5), LearnableHorizon(T0=0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = dict(rtol=1e-6, atol=1e-6)
        return self.h2(self.f2, self.h1(self.f1, x, **kw)[-1], **kw)[-1]


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).sum(1).mean()


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [
        p for n, p in model.named_parameters() if n.split(".")[-1] not in ("T", "t0", "placement")
    ]


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


def _lone(h: LearnableHorizon, **kw) -> CoordinateDescentStepper:
    """A stepper over one horizon and a dummy weight."""
    return CoordinateDescentStepper(
        torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=0.1), [h], **kw
    )


def test_compare_to_vanilla_with_lr_and_alpha_zero():
    model, opt = _make(lr=0.0, alpha=0.0)
    torch.manual_seed(0)
    ref = Flow()
    ref_opt = torch.optim.Adam(_weights(ref), lr=1e-2)
    _train(model, opt, 5)
    _train(ref, ref_opt, 5)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    assert model.h1.T.item() == 0.5 and model.h2.T.item() == 0.8


def test_alpha_shrinks_T_without_loss_gradient():
    h = LearnableHorizon(T0=0.5)
    opt = _lone(h, lr=0.01, alpha=0.1)
    for k in range(5):
        h.T.grad = torch.zeros(())
        opt.step()
        assert h.T.item() == pytest.approx(0.5 - 0.01 * (k + 1), abs=1e-7)


@pytest.mark.parametrize("g", [3.7, -0.02])
def test_one_adam_step_moves_T_by_lr_against_gradient_sign(g):
    h = LearnableHorizon(T0=0.5)
    opt = _lone(h, lr=0.01, alpha=0.0)
    h.T.grad = torch.tensor(g)
    opt.step()
    assert h.T.item() == pytest.approx(0.5 - 0.01 * np.sign(g), abs=1e-7)
    assert h.T.grad.item() == g  # dL/dT is left as it was
    assert opt.stats["horizons"][0]["dLdT"] == g and opt.stats["horizons"][0]["T"] == h.T.item()


@pytest.mark.parametrize("sign", [+1, -1])
def test_clip_holds_at_both_bounds(sign):
    h = LearnableHorizon(T0=0.5, eps=0.1)
    opt = _lone(h, lr=0.2, alpha=0.0)
    for _ in range(10):
        h.T.grad = torch.tensor(-sign * 100.0)
        opt.step()
        assert h.bounds[0] <= h.T.item() <= h.bounds[1]
        assert opt.stats["horizons"][0]["T"] == h.T.item()  # recorded after the clip
    assert h.T.item() == pytest.approx(h.bounds[1] if sign > 0 else h.bounds[0])
    assert opt.stats["horizons"][0]["clip_count"] >= 8


@pytest.mark.parametrize("reset", [True, False])
def test_reset_at_bound_releases_T_when_gradient_turns(reset):
    """Pushed to the upper bound for a while, then the gradient turns inward."""
    h = LearnableHorizon(T0=0.5, eps=0.1)
    opt = _lone(h, lr=0.05, alpha=0.0, reset_at_bound=reset)
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


def test_finds_horizons_and_removes_them_from_the_weight_optimizer_silently():
    torch.manual_seed(0)
    model = Flow()
    inner = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    _train(model, inner, 1)
    assert model.h1.T in inner.state
    opt = CoordinateDescentStepper(inner, model)  # filterwarnings = error: no warning
    assert opt.horizons == [model.h1, model.h2]
    assert [s["name"] for s in opt.stats["horizons"]] == ["h1", "h2"]
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert (
        id(model.h1.T) not in ids
        and id(model.h2.T) not in ids
        and len(ids) == len(_weights(model))
    )
    assert model.h1.T not in inner.state and model.h2.T not in inner.state
    assert {id(p) for p in opt.time_parameters} == {id(model.h1.T), id(model.h2.T)}
    assert {id(p) for g in opt.horizon_optimizer.param_groups for p in g["params"]} == {
        id(model.h1.T),
        id(model.h2.T),
    }
    # a list of horizons, with duplicates, works too
    opt2 = CoordinateDescentStepper(
        torch.optim.Adam(_weights(model)), [model.h1, model.h1, model.h2]
    )
    assert opt2.horizons == [model.h1, model.h2]


def test_learned_t0_is_stepped_and_kept_below_T():
    h = LearnableHorizon(T0=1.0, t0=0.0, learn_t0=True)
    opt = _lone(h, lr=0.1, alpha=0.0)
    assert [p is q for p, q in zip(opt.time_parameters, (h.T, h.t0))] == [True, True]
    t0s = []
    for _ in range(30):
        h.T.grad = torch.tensor(1.0)  # push T down
        h.t0.grad = torch.tensor(-1.0)  # push t0 up
        opt.step()
        t0s.append(h.t0.item())
        assert h.t0.item() <= h.T.item() - h.eps + 1e-9
    assert t0s[0] == pytest.approx(0.1) and max(t0s) > 0.3  # stepped up until T came down on it
    assert h.T.item() == pytest.approx(h.bounds[0]) and h.t0.item() == pytest.approx(
        h.bounds[0] - h.eps
    )
    assert opt.stats["horizons"][0]["t0"] == h.t0.item()


def test_alpha_pulls_a_learned_t0_towards_T():
    h = LearnableHorizon(T0=1.0, t0=0.0, learn_t0=True)
    opt = _lone(h, lr=0.01, alpha=1.0)
    h.T.grad, h.t0.grad = torch.zeros(()), torch.zeros(())
    opt.step()
    assert h.T.item() == pytest.approx(0.99) and h.t0.item() == pytest.approx(0.01)


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
    assert [str(r.message) for r in rec if "NaN or inf" in str(r.message)] == [
        "CoordinateDescentStepper: dL/dT of horizon 'h1' is NaN or inf; its update was skipped "
        "(stats['horizons'][i]['nonfinite'])."
    ]
    assert len(rec) == 1 and rec[0].category is RuntimeWarning
    assert model.h1.T.item() == T1 and model.h2.T.item() != T2
    assert (
        opt.stats["horizons"][0]["nonfinite"] == 3 and opt.stats["horizons"][1]["nonfinite"] == 0
    )
    assert any(not torch.equal(a, b) for a, b in zip(w, _weights(model)))  # weights still stepped


def test_skip_nonfinite_skips_the_whole_step():
    model, opt = _make(skip_nonfinite=True)
    _train(model, opt, 1)
    before, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for bad in ("weight", "T"):
        opt.zero_grad()
        _loss(model, torch.randn(8, 2)).backward()
        target = _weights(model)[0] if bad == "weight" else model.h2.T
        target.grad.view(-1)[0] = float("inf")
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            opt.step()
        assert [str(r.message) for r in rec] == (  # warned once in all
            ["CoordinateDescentStepper skipped a step with a NaN or inf gradient."]
            if bad == "weight" else [])  # fmt: skip
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert opt.stats["skipped_steps"] == 2 and opt.stats["steps"] == state["stats"]["steps"] == 1
    assert_same(opt.state_dict()["optimizer"], state["optimizer"])
    assert_same(opt.state_dict()["horizon_optimizer"], state["horizon_optimizer"])


def test_nonfinite_weight_gradient_warns_without_skip():
    model, opt = _make()
    opt.zero_grad()
    _loss(model, torch.randn(8, 2)).backward()
    _weights(model)[0].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skip_nonfinite=True"):
        opt.step()
    assert opt.stats["steps"] == 1 and torch.isnan(_weights(model)[0]).any()
    assert torch.isfinite(model.h1.T)


def test_closure_is_called_once_as_by_any_optimizer():
    x, calls = torch.randn(8, 2), []
    model, opt = _make()

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, x)
        loss.backward()
        return loss

    assert opt.step(closure).item() > 0 and len(calls) == 1 and model.h1.T.item() != 0.5
    with pytest.raises(TypeError, match="closure"):
        opt.step(closure=3)


def test_step_and_state_dict_hooks_run_as_on_the_wrapped_optimizer():
    """0.2 raised 'cannot create weak reference to dict' on register_step_pre_hook."""
    model, opt = _make()
    seen = []
    handles = [
        opt.register_step_pre_hook(
            lambda o, a, k: seen.append(("pre", o is opt, model.h1.T.grad is not None))
        ),
        opt.register_step_post_hook(
            lambda o, a, k: seen.append(("post", o is opt, opt.stats["steps"]))
        ),
        opt.register_state_dict_pre_hook(lambda o: seen.append(("sd_pre", o is opt))),
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "mine": 1}),
        opt.register_load_state_dict_pre_hook(
            lambda o, sd: {k: v for k, v in sd.items() if k != "mine"}
        ),
        opt.register_load_state_dict_post_hook(lambda o: seen.append(("load_post", o is opt))),
    ]
    _train(model, opt, 1)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert state["mine"] == 1
    assert seen == [("pre", True, True), ("post", True, 1), ("sd_pre", True), ("load_post", True)]
    for handle in handles:
        handle.remove()
    _train(model, opt, 1)
    assert len(seen) == 4


def _scheduled(wrapped: bool, learn: bool, scale: bool) -> tuple[Flow, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Flow()
    for h in (model.h1, model.h2):
        h.T.requires_grad_(learn)
    opt = torch.optim.Adam(_weights(model), lr=1e-2)
    opt = CoordinateDescentStepper(opt, model) if wrapped else opt
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scale)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(_loss(model, torch.randn(8, 2, generator=g))).backward()
        if wrapped and learn and scale:
            scaler.unscale_(opt.horizon_optimizer)  # T's gradient, before scaler.step(stepper)
        scaler.step(opt)
        scaler.update()
        sched.step()
    return model, opt


def test_lr_scheduler_and_grad_scaler_act_as_on_the_plain_optimizer():
    """A scheduler and a GradScaler over the stepper step the weights exactly as over the plain
    optimizer.
    """
    plain, p_opt = _scheduled(False, False, True)
    ours, o_opt = _scheduled(True, False, True)
    for a, b in zip(_weights(plain), _weights(ours)):
        assert torch.equal(a, b)
    assert (
        o_opt.param_groups[0]["lr"] == p_opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    )  # 3 steps of 1 / (k + 1)
    scaled, s_opt = _scheduled(True, True, True)
    unscaled, _ = _scheduled(True, True, False)
    assert s_opt.horizon_optimizer.param_groups[0]["lr"] == 1e-2  # the schedule never touches T
    for a, b in zip(scaled.parameters(), unscaled.parameters()):
        torch.testing.assert_close(
            a, b, rtol=1e-6, atol=1e-7
        )  # T unscaled: the same steps as without AMP
    assert scaled.h1.T.item() != 0.5


def test_state_dict_round_trip_continues_bitwise():
    model, opt = _make(seed=3)
    _train(model, opt, 3, seed=5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert set(saved_opt) == {"optimizer", "horizon_optimizer", "guard", "stats", "kept"}
    _train(model, opt, 4, seed=6)

    fresh, fresh_opt = _make(seed=99)
    fresh.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    _train(fresh, fresh_opt, 4, seed=6)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    assert fresh_opt.stats == opt.stats and opt.stats["steps"] == 7


def test_lr_scheduler_and_param_groups_touch_weights_only():
    model, opt = _make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 2)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert opt.horizon_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra]})
    assert opt.optimizer.param_groups[-1]["params"] == [extra]
    assert repr(opt).startswith(
        "CoordinateDescentStepper(alpha=0.0, optimizer=Adam, guard=None, horizons=["
    )


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
    seen = []

    def factory(ps):
        seen.append(ps)
        return torch.optim.SGD(ps, lr=0.1)

    opt = CoordinateDescentStepper(
        torch.optim.Adam(_weights(model)), model, horizon_optimizer=factory
    )
    assert opt.horizon_optimizer.param_groups[0]["lr"] == 0.1
    assert [p is q for p, q in zip(seen[0], (model.h1.T, model.h2.T))] == [True, True]
    model.h1.T.grad = torch.tensor(1.0)
    opt.step()
    assert model.h1.T.item() == pytest.approx(0.4)
    with pytest.raises(
        TypeError, match="horizon_optimizer must be a factory params -> Optimizer.*got SGD"
    ):
        CoordinateDescentStepper(
            torch.optim.Adam(_weights(model)),
            model,
            horizon_optimizer=torch.optim.SGD([model.h1.T, model.h2.T], lr=1),
        )


def test_unused_horizon_is_left_alone():
    model, opt = _make()
    opt.zero_grad()
    model.h1(model.f1, torch.randn(4, 2))[-1].sum().backward()  # h2 not used
    opt.step()  # no warning: h1 has its dL/dT
    assert model.h2.T.item() == 0.8 and opt.stats["horizons"][1]["dLdT"] is None
    assert model.h1.T.item() != 0.5 and opt.stats["horizons"][0]["dLdT"] is not None


def test_a_step_without_any_dLdT_warns_once():
    model, opt = _make()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            _loss(model, torch.randn(4, 2)).backward()
            model.h1.T.grad = model.h2.T.grad = None  # e.g. the output was detached
            opt.step()
    assert len(rec) == 1 and rec[0].category is RuntimeWarning
    assert "found no dL/dT on any horizon" in str(rec[0].message)
    assert model.h1.T.item() == 0.5 and model.h2.T.item() == 0.8


def test_frozen_T_gives_no_time_parameters_and_no_warning():
    torch.manual_seed(0)
    model = Flow()
    for h in (model.h1, model.h2):
        h.T.requires_grad_(False)
    opt = CoordinateDescentStepper(torch.optim.Adam(_weights(model), lr=1e-2), model)
    assert opt.time_parameters == [] and opt.horizon_optimizer is None
    w = [p.clone() for p in _weights(model)]
    _train(model, opt, 2)  # filterwarnings = error: no "found no dL/dT" warning
    assert model.h1.T.item() == 0.5 and model.h1.T.grad is None
    assert all(not torch.equal(a, b) for a, b in zip(w, _weights(model)))
    assert opt.state_dict()["horizon_optimizer"] is None


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
        (dict(horizon_optimizer=3), TypeError, "horizon_optimizer"),
        (dict(horizon_optimizer=lambda ps: 3), TypeError, "horizon_optimizer"),
        (dict(reset_at_bound="yes"), TypeError, "reset_at_bound"),
        (dict(skip_nonfinite=1), TypeError, "skip_nonfinite"),
        (dict(guard="yes"), TypeError, "guard"),
    ],
)
def test_constructor_rejects_bad_input(kwargs, exc, name):
    model = Flow()
    with pytest.raises(exc, match=rf"^{name} must"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), model, **kwargs)


def test_constructor_accepts_numpy_types():
    model = Flow()
    opt = CoordinateDescentStepper(
        torch.optim.Adam(_weights(model)), model, lr=np.float32(0.5), alpha=np.float64(0.0),
        reset_at_bound=np.bool_(False), skip_nonfinite=np.True_, guard=np.False_,
    )  # fmt: skip
    assert (opt.lr, opt.alpha, opt.reset_at_bound, opt.skip_nonfinite, opt.guard) == (
        0.5,
        0.0,
        False,
        True,
        None,
    )
    assert type(opt.lr) is float and type(opt.skip_nonfinite) is bool
    model.h1.T.grad = torch.tensor(1.0)
    opt.step()
    assert model.h1.T.item() == pytest.approx(0.1)  # lr 0.5 from 0.5, clipped at the bound 0.1


def test_rejects_bad_wiring():
    model = Flow()
    with pytest.raises(TypeError, match="^optimizer must be a plain torch.optim.Optimizer"):
        CoordinateDescentStepper([p for p in model.parameters()], model)
    with pytest.raises(ValueError, match="^horizons holds no LearnableHorizon"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="^horizons holds no LearnableHorizon"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), [])
    with pytest.raises(TypeError, match=r"^horizons\[1\] must be a LearnableHorizon"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), [model.h1, model.f1])
    with pytest.raises(TypeError, match="^horizons must be"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), 3)
    with pytest.raises(TypeError, match="^horizons must be"):
        CoordinateDescentStepper(torch.optim.Adam(_weights(model)), "h1")
    opt = CoordinateDescentStepper(torch.optim.Adam(_weights(model)), model)
    with pytest.raises(TypeError, match="^optimizer must be a plain"):
        CoordinateDescentStepper(opt, model)
    with pytest.raises(
        ValueError, match="parameter groups"
    ):  # a plain optimizer's state goes to the weights' one
        opt.load_state_dict({"state": {}, "param_groups": []})
    opt.load_state_dict(opt.optimizer.state_dict())


# ------------------------------------------------------------- behaves like the optimizer it wraps
def test_add_param_group_keeps_time_parameters_out():
    model = Flow()
    opt = CoordinateDescentStepper(torch.optim.SGD(model.f1.parameters(), lr=0.1), model)
    opt.add_param_group({"params": [*model.f2.parameters(), model.h1.T], "lr": 1.0})
    assert all(p is not model.h1.T for g in opt.param_groups for p in g["params"])
    assert len(opt.param_groups[1]["params"]) == len(list(model.f2.parameters()))
    model.h1.T.grad = torch.tensor(float("nan"))
    with pytest.warns(RuntimeWarning, match="is NaN or inf; its update was skipped"):
        opt.step()
    assert model.h1.T.item() == 0.5  # neither P nor Q moved it


def test_optimizer_that_needs_a_closure_is_refused():
    model = Flow()
    with pytest.raises(TypeError, match="optimizer LBFGS needs a closure in every step.*Adam"):
        CoordinateDescentStepper(torch.optim.LBFGS(_weights(model)), model)


def test_deepcopy_and_pickle_round_trip():
    import pickle

    model, opt = _make()
    _loss(model, torch.randn(8, 2)).backward()
    opt.step()
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert twin.state_dict()["stats"] == opt.state_dict()["stats"]
        assert_same(
            twin.state_dict()["optimizer"]["state"], opt.state_dict()["optimizer"]["state"]
        )


def test_guard_names_horizons_as_the_model_does():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = nn.ModuleDict({"h": LearnableHorizon(T0=0.5, budget=2)})

    model = Model()
    opt = CoordinateDescentStepper(torch.optim.Adam([nn.Parameter(torch.zeros(1))]), model)
    assert "flow.h" in repr(opt.guard) and opt.stats["horizons"][0]["name"] == "flow.h"
    assert (
        opt.guard.budgets == [model.flow["h"].budget] and not model.flow["h"].budget.warn_unguarded
    )


def test_declining_the_guard_does_not_warn():
    h, field = LearnableHorizon(T0=0.5, budget=2), TimeMLP()
    opt = CoordinateDescentStepper(torch.optim.Adam(field.parameters()), [h], guard=False)
    assert opt.guard is None and not h.budget.warn_unguarded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h(field, torch.randn(4, 2))[-1].sum().backward()
        opt.step()


def test_warnings_point_at_the_callers_line():
    h, field = LearnableHorizon(T0=0.5), TimeMLP()
    opt = CoordinateDescentStepper(torch.optim.Adam(field.parameters()), [h])
    h(field, torch.randn(4, 2))[-1].sum().backward()
    h.T.grad = torch.tensor(float("inf"))
    with pytest.warns(RuntimeWarning) as record:
        opt.step()
    assert record[0].filename == __file__
    budgeted = LearnableHorizon(T0=0.5, budget=2)
    with pytest.warns(RuntimeWarning, match="without a guard") as record:
        budgeted(field, torch.randn(4, 2))
    assert record[0].filename == __file__


def test_a_guard_growth_warning_points_at_the_callers_line():
    # Through the stepper (and torch's optimizer hook wrapper) and through the guard alone.
    for through_stepper in (True, False):
        h, field = LearnableHorizon(T0=1.0, budget=1), TimeMLP()
        guard = BudgetGuard([h], every=1, tol=1e-5)
        opt = CoordinateDescentStepper(torch.optim.Adam(field.parameters()), [h], guard=guard)
        h(field, torch.randn(4, 2))[-1].sum().backward()
        with pytest.warns(RuntimeWarning, match="budget grown") as record:
            opt.step() if through_stepper else guard.step()
        assert record[0].filename == __file__
