"""Worker processes of tests/test_distributed.py: DDP training of a tiny horizon model on the gloo
backend.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from fields import TimeMLP
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torch_tempopt import Budget, BudgetGuard, CoordinateDescentStepper, LearnableHorizon

WORLD = 2
BATCH = 8  # the global batch; each rank takes BATCH // WORLD rows
STEPS = 3
SCENARIOS = {
    # name: (find_unused_parameters, the Budget's steps and gradient, the guard's settings)
    "plain": (False, None, None),
    "find-unused": (True, None, None),
    # T and t0 learned on a budget; the guard checks every step (far below its tol) and leaves the
    # steps uniform, so one process on the whole batch takes the very same steps.
    "budget": (False, dict(steps=4), dict(every=1, tol=10.0, fit_steps=0)),
    # The same with each step recomputed in backward (DDP's hooks see the recomputation), and with
    # the adjoint.
    "checkpoint": (
        False,
        dict(steps=4, gradient="checkpoint"),
        dict(every=1, tol=10.0, fit_steps=0),
    ),
    "adjoint": (False, dict(steps=4, gradient="adjoint"), dict(every=1, tol=10.0, fit_steps=0)),
    # One euler step and a tight tol: the guard grows the budget in place under DDP at the first
    # step, and fits the placement on each rank's half batch; rank 0's is broadcast, so the ranks
    # stay equal.
    "growth": (False, dict(steps=1), dict(every=1, tol=1e-2, fit_steps=1)),
}


class Tiny(nn.Module):
    """A time-conditioned MLP field integrated over a learnable horizon, with a learned t0 too (and
    a budget).
    """

    def __init__(self, budget: dict | None = None) -> None:
        super().__init__()
        self.field = TimeMLP(2, 8)
        # euler: an error (1e-3) far above the reference's, whose noise would otherwise steer the
        # placement
        reference = dict(rtol=1e-10, atol=1e-10)
        budget = None if budget is None else Budget(**budget, method="euler", reference=reference)
        self.horizon = LearnableHorizon(T0=0.5, t0=0.0, learn_T=True, learn_t0=True, budget=budget)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.horizon.budget is None:
            return self.horizon(self.field, x, method="rk4", options=dict(step_size=0.125))[-1]
        return self.horizon(self.field, x)[-1]


def build(seed: int = 0, budget: dict | None = None) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(budget)


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 2, generator=g) for _ in range(steps)]


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 1.0).pow(2).sum(1).mean()


def train(
    model: nn.Module, inner: Tiny, guard: dict | None, data: list[torch.Tensor]
) -> dict[str, object]:
    """STEPS steps of CoordinateDescentStepper on ``model`` (DDP or plain); returns the per-step
    records.
    """
    weights = [p for n, p in inner.named_parameters() if not n.startswith("horizon.")]
    budget_guard = False if guard is None else BudgetGuard(inner, **guard)
    stepper = CoordinateDescentStepper(
        torch.optim.Adam(weights, lr=1e-2), model, lr=5e-2, alpha=0.1, guard=budget_guard
    )
    losses, t_grads = [], []
    for x in data:
        stepper.zero_grad()
        loss = loss_of(model, x)
        loss.backward()
        t_grads.append(torch.stack([inner.horizon.T.grad.clone(), inner.horizon.t0.grad.clone()]))
        stepper.step()
        losses.append(loss.detach())
    return {
        "state": {k: v.detach().clone() for k, v in inner.state_dict().items()},
        "losses": torch.stack(losses),
        "t_grads": torch.stack(t_grads),
        "stats": stepper.stats,
        "guard": None
        if stepper.guard is None
        else {k: v for k, v in stepper.guard.stats.items() if k != "seconds"},
    }


def worker(rank: int, port: int, out: str) -> None:
    """One rank: every scenario in turn, results saved to ``out/rank{rank}.pt``."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for name, (find_unused, budget, guard) in SCENARIOS.items():
            # Different seeds per rank: DDP must broadcast rank 0's initial weights and T.
            inner = build(seed=rank, budget=budget)
            ddp = DistributedDataParallel(inner, find_unused_parameters=find_unused)
            results[name] = train(ddp, inner, guard, [x[shard] for x in batches()])
        torch.save(results, Path(out) / f"rank{rank}.pt")
        # no rank tears down gloo while another still uses it (that aborts the other)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover - run by torch.multiprocessing
    raise SystemExit(
        f"{os.path.basename(__file__)} is imported by tests/test_distributed.py, not run."
    )
