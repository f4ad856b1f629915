"""Worker processes of tests/test_distributed.py: DDP training of a tiny horizon model on the gloo backend."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from fields import TimeMLP
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torch_tempopt import CoordinateDescentStepper, LearnableHorizon

WORLD = 2
BATCH = 8  # the global batch; each rank takes BATCH // WORLD rows
STEPS = 3
SCENARIOS = {
    # name: (mode, find_unused_parameters, budget)
    "alternate": ("alternate", False, None),
    "alternate-find-unused": ("alternate", True, None),
    "exact": ("exact", False, None),
    "budget": ("alternate", False, 4),  # a learned placement, stepped by the guard on every step
}
# The guard checks every step and would raise rather than grow (a placement changing shape breaks DDP);
# guard_tol is far above the 4-step error, so it steps the placement instead.
GUARD = dict(guard_every=1, guard_action="raise", guard_tol=10.0)


class Tiny(nn.Module):
    """A time-conditioned MLP field integrated over a learnable horizon, with a learned t0 too (and a budget)."""

    def __init__(self, budget: int | None = None) -> None:
        super().__init__()
        self.field = TimeMLP(2, 8)
        # euler: an error (1e-3) far above the reference's, whose noise would otherwise steer the placement
        self.horizon = LearnableHorizon(T0=0.5, t0=0.0, learn_t0=True, budget=budget, method="euler")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.horizon.budget is None:
            return self.horizon(self.field, x, method="rk4", options=dict(step_size=0.125))[-1]
        return self.horizon(self.field, x, rtol=1e-10, atol=1e-10)[-1]  # the guard's reference settings


def build(seed: int = 0, budget: int | None = None) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(budget)


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 2, generator=g) for _ in range(steps)]


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 1.0).pow(2).sum(1).mean()


def train(model: nn.Module, inner: Tiny, mode: str, data: list[torch.Tensor]) -> dict[str, object]:
    """STEPS steps of CoordinateDescentStepper on ``model`` (DDP or plain); returns the per-step records."""
    weights = [p for n, p in inner.named_parameters() if not n.startswith("horizon.")]
    stepper = CoordinateDescentStepper(torch.optim.Adam(weights, lr=1e-2), model, lr=5e-2, alpha=0.1, mode=mode, **GUARD)
    losses, t_grads = [], []
    for x in data:
        def closure(x: torch.Tensor = x) -> torch.Tensor:
            stepper.zero_grad()
            loss = loss_of(model, x)
            loss.backward()
            return loss

        if mode == "exact":
            loss = stepper.step(closure)
        else:
            loss = closure()
            t_grads.append(torch.stack([inner.horizon.T.grad.clone(), inner.horizon.t0.grad.clone()]))
            stepper.step()
        losses.append(loss.detach())
    return {
        "state": {k: v.detach().clone() for k, v in inner.state_dict().items()},
        "losses": torch.stack(losses),
        "t_grads": torch.stack(t_grads) if t_grads else None,
        "stats": stepper.stats,
    }


def worker(rank: int, port: int, out: str) -> None:
    """One rank: every scenario in turn, results saved to ``out/rank{rank}.pt``."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for name, (mode, find_unused, budget) in SCENARIOS.items():
            # Different seeds per rank: DDP must broadcast rank 0's initial weights and T.
            inner = build(seed=rank, budget=budget)
            ddp = DistributedDataParallel(inner, find_unused_parameters=find_unused)
            results[name] = train(ddp, inner, mode, [x[shard] for x in batches()])
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears down gloo while another still uses it (that aborts the other)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover - run by torch.multiprocessing
    raise SystemExit(f"{os.path.basename(__file__)} is imported by tests/test_distributed.py, not run.")
