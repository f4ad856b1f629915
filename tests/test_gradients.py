"""Gradients on a budget: exact through the steps (against finite differences), bitwise like a
hand-written loop over torchdiffeq's odeint, the same with each step recomputed (and less memory),
the adjoint as an opt-in."""

from __future__ import annotations

import copy

import pytest
import torch
import torchdiffeq
from fields import TimeMLP, TupleField

from torch_tempopt import Budget, CoordinateDescentStepper, LearnableHorizon, count_nfe
from torch_tempopt.nfe import in_backward

ODEINT, ADJOINT = torchdiffeq.odeint, torchdiffeq.odeint_adjoint


def _loss(out) -> torch.Tensor:
    parts = out if isinstance(out, tuple) else (out,)
    return sum((0.5 + i) * (p[-1].pow(2).sum() + p[-1].sin().sum()) for i, p in enumerate(parts))


def _problem(tuple_state: bool, steps: int, gradient: str, seed: int = 0):
    torch.manual_seed(seed)
    if tuple_state:
        func, y0 = TupleField(), (torch.randn(6, 2), torch.zeros(6, 1), torch.zeros(6, 1))
    else:
        func, y0 = TimeMLP(), torch.randn(6, 2)
    with torch.no_grad():  # a field far from the identity, so that a few steps are far from exact
        for p in func.parameters():
            p.mul_(3.0)
    budget = Budget(steps, gradient=gradient)
    budget.warn_unguarded = False
    h = LearnableHorizon(T0=0.9, t0=0.2, learn_T=True, learn_t0=True, budget=budget)
    with torch.no_grad():
        budget.placement[:steps] = torch.randn(
            steps, generator=torch.Generator().manual_seed(seed)
        )
    return func, y0, h


def _fd_check(func, y0, h, reverse: bool, step: float = 1e-5) -> list[float]:
    """Relative errors of dL/dT, dL/dt0 and a random directional derivative in the weights."""

    def loss() -> torch.Tensor:
        return _loss(h(func, y0, solver=ADJOINT, reverse=reverse, method="dopri5", rtol=1e-9))

    weights = list(func.parameters())
    direction = [torch.randn_like(w) for w in weights]
    func.zero_grad(), h.zero_grad()
    loss().backward()
    exact = [
        h.T.grad.item(),
        h.t0.grad.item(),
        sum((w.grad * d).sum() for w, d in zip(weights, direction)).item(),
    ]
    moves = [
        [(h.T, torch.ones_like(h.T))],
        [(h.t0, torch.ones_like(h.t0))],
        list(zip(weights, direction)),
    ]
    errors = []
    for g, move in zip(exact, moves):
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in move:
                    p.add_(sign * step * d)
                values.append(loss().item())
                for p, d in move:
                    p.sub_(sign * step * d)
        fd = (values[0] - values[1]) / (2 * step)
        errors.append(abs(g - fd) / max(abs(fd), 1e-3))
    return errors


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_budgeted_gradients_equal_finite_differences_of_the_budgeted_loss(
    steps, reverse, tuple_state, gradient
):
    # odeint_adjoint is named, as FFJORD, RNODE and E-NF name it: the budget still differentiates
    # its own steps
    func, y0, h = _problem(tuple_state, steps, gradient)
    errors = _fd_check(func, y0, h, reverse)
    assert max(errors) < 1e-6, errors


def test_the_adjoint_on_the_same_steps_is_an_opt_in_with_an_approximate_gradient():
    func, y0, h = _problem(True, 2, "adjoint")
    errors = _fd_check(func, y0, h, reverse=False)
    assert max(errors) > 1e-4, (
        errors
    )  # the adjoint of the ODE on 2 steps, not the derivative of the 2-step solve
    assert max(errors) < 0.5, errors  # but a gradient of the same problem


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_each_gradient_mode_evaluates_the_field_as_documented(gradient):
    func, y0, h = _problem(False, 3, gradient)
    counter = count_nfe(func)
    h.t0.requires_grad_(False)
    _loss(h(counter, y0, solver=ADJOINT)).backward()
    n, k = 3, 4
    backward = {"backprop": 0, "checkpoint": n * k, "adjoint": n * k + 1}[
        gradient
    ]  # adjoint: + dL/dT
    assert (counter.nfe_forward, counter.nfe_backward) == (n * k, backward)


def _train(h, func, y0, optimizer, iterations: int = 5) -> list[torch.Tensor]:
    for _ in range(iterations):
        optimizer.zero_grad()
        _loss(h(func, y0)).backward()
        optimizer.step()
    return [p.detach().clone() for p in func.parameters()]


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_budgeted_training_is_a_hand_written_loop_over_odeint(gradient):
    # backprop: bitwise; checkpoint: the same gradient summed in another order (recomputed in
    # backward)
    torch.manual_seed(3)
    func, y0 = TimeMLP(), torch.randn(16, 2)
    vanilla = copy.deepcopy(func)
    h = LearnableHorizon(T0=1.3, budget=Budget(2, gradient=gradient))
    stepper = CoordinateDescentStepper(
        torch.optim.Adam(func.parameters(), lr=1e-2), h, guard=False
    )
    ours = _train(h, func, y0, stepper)
    grid = torch.tensor([0.0, 0.65, 1.3])  # the uniform 2-step grid on [0, T]
    adam = torch.optim.Adam(vanilla.parameters(), lr=1e-2)
    for _ in range(5):
        adam.zero_grad()
        _loss(ODEINT(vanilla, y0, grid, method="rk4")[[0, -1]]).backward()
        adam.step()
    for a, b in zip(ours, vanilla.parameters()):
        if gradient == "backprop":
            assert torch.equal(a, b.detach())
        else:
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


def test_checkpointed_steps_give_the_same_solve_and_gradient_as_backprop():
    results = []
    for gradient in ("backprop", "checkpoint"):
        func, y0, h = _problem(True, 4, gradient, seed=5)
        out = h(func, y0, solver=ADJOINT)
        _loss(out).backward()
        grads = [h.T.grad, h.t0.grad, *[p.grad for p in func.parameters()]]
        results.append(([o.detach() for o in out], grads))
    (out_a, grad_a), (out_b, grad_b) = results
    for a, b in zip(out_a, out_b):
        assert torch.equal(a, b)
    for a, b in zip(grad_a, grad_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _saved_bytes(gradient: str, steps: int) -> int:
    func, y0, h = _problem(False, steps, gradient)
    y0 = torch.randn(512, 2)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[id(t)] = t.numel() * t.element_size()  # ids of live tensors: each counted once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = h(func, y0)
    del out
    return sum(seen.values())


def test_checkpoint_keeps_the_states_between_steps_only():
    backprop, checkpointed = _saved_bytes("backprop", 8), _saved_bytes("checkpoint", 8)
    assert checkpointed < backprop / 4, (checkpointed, backprop)


def test_in_backward_tells_the_backward_pass_from_the_forward_pass():
    # nfe.in_backward uses torch._C._current_autograd_node (no public API tells a backward pass
    # apart); checked on these torch versions: a new one must pass this test before it is added
    # here
    assert torch.__version__.split("+")[0].rsplit(".", 1)[0] in {"2.13"}
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(in_backward())
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(in_backward())
            return g

    Probe.apply(torch.ones(1, requires_grad=True)).sum().backward()
    assert seen == [False, True] and not in_backward()


class _TraceField(torch.nn.Module):
    """A CNF field that takes its exact trace by autograd inside its forward (FFJORD's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
        )

    def forward(self, t, state):
        z = state[0]
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = self.net(torch.cat([z, t.expand(len(z), 1)], 1))
            div = sum(
                torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i]
                for i in range(2)
            )
        return dz, -div[:, None]


def test_checkpoint_recomputes_each_step_once_for_a_field_that_takes_its_trace_by_autograd():
    torch.manual_seed(7)
    field, y0, grads = count_nfe(_TraceField()), (torch.randn(8, 2), torch.zeros(8, 1)), []
    for gradient in ("backprop", "checkpoint"):
        h = LearnableHorizon(T0=0.5, budget=Budget(3, gradient=gradient), learn_T=True)
        h.budget.warn_unguarded = False
        field.reset()
        field.zero_grad()
        _loss(h(field, y0, solver=ADJOINT)).backward()
        assert (field.nfe_forward, field.nfe_backward) == (12, 0 if gradient == "backprop" else 12)
        grads.append([h.T.grad, *[p.grad.clone() for p in field.parameters()]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_checkpoint_needs_the_parameters_of_a_plain_function():
    net = torch.nn.Linear(2, 2)
    h = LearnableHorizon(T0=0.5, budget=Budget(2, gradient="checkpoint"))
    h.budget.warn_unguarded = False
    with pytest.raises(TypeError, match="adjoint_params"):
        h(lambda t, y: net(y), torch.randn(4, 2))
    h(lambda t, y: net(y), torch.randn(4, 2), adjoint_params=tuple(net.parameters()))[
        -1
    ].sum().backward()
    assert net.weight.grad is not None
    h.eval()(
        lambda t, y: net(y), torch.randn(4, 2), adjoint_params=tuple(net.parameters())
    )  # odeint: dropped


def test_a_budgets_gradient_is_checked_on_every_write():
    budget = Budget(2)
    with pytest.raises(ValueError, match="^gradient must be one of"):
        budget.gradient = "adjont"
    assert budget.gradient == "backprop"
    budget.gradient = "checkpoint"
    assert budget.gradient == "checkpoint"


def test_fitting_the_placement_of_a_memory_bound_budget_gives_the_backprop_fit():
    placements = []
    for gradient in ("backprop", "checkpoint", "adjoint"):
        func, y0, h = _problem(True, 3, gradient, seed=9)
        h.budget.fit(
            func, y0, torch.tensor([0.2, 0.9]), steps=3, method="dopri5", rtol=1e-9, atol=1e-9
        )
        placements.append(h.budget.placement[:3].clone())
    for p in placements[1:]:
        torch.testing.assert_close(p, placements[0], rtol=1e-10, atol=1e-12)


def test_a_budgets_reference_cannot_be_changed_past_its_check():
    budget = Budget(2, reference=dict(method="dopri5", rtol=1e-6))
    budget.reference["method"] = "rk4"  # a copy: the budget's reference is unchanged
    assert budget.reference == {"method": "dopri5", "rtol": 1e-6}
    with pytest.raises(ValueError, match="^reference's method must be"):
        budget.reference = dict(method="rk4")
