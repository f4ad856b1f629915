r"""Data-parallel TO-FLOW training of FFJORD's toy CNF with DistributedDataParallel.

Two processes on the CPU (gloo), from the repository root::

    torchrun --nproc_per_node 2 examples/ddp_train.py --data 8gaussians --iters 1000 --out runs/ddp

On GPUs the backend is nccl and each process uses ``cuda:LOCAL_RANK`` (``--backend`` overrides
the choice). The model is FFJORD's toy CNF, written out below so that this file stands alone: one
block, a concat-squash MLP field with tanh, the log-density integrated with the exact trace or
Hutchinson's estimator, and a learnable end time. It is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` and stepped by
:class:`torch_tempopt.CoordinateDescentStepper`::

    ddp = DistributedDataParallel(model)
    stepper = CoordinateDescentStepper(Adam(model.field.parameters()), ddp)

Nothing else changes: T is a parameter used in the forward pass, so DDP all-reduces
(averages) dL/dT with the weights' gradients and every rank takes the same horizon step.

Every rank draws the same global batch of ``--batch-size`` points from one seeded
generator and keeps its own contiguous share, so a run on N processes follows the
single-process run on the whole batch (up to the order of floating-point sums, and the
Hutchinson probes, which are drawn per rank). At the end the ranks compare their T and
weights bitwise; rank 0 prints a summary and, with ``--out``, writes ``metrics.json``
(per-iteration mean loss over the ranks, final T, the comparison, timings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torchdiffeq
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from torch_tempopt import CoordinateDescentStepper, LearnableHorizon

__all__ = ["CNF", "TOY_DATASETS", "build_parser", "main", "toy_sample", "train"]

FIXED_GRID = ("euler", "midpoint", "rk4")
ADAPTIVE = ("dopri5", "bosh3", "adaptive_heun")


# --------------------------------------------------------------------------- FFJORD's 2-D toy sets


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    return (np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + rng.standard_normal((n, 2))) / 5.0


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = np.pi / 4.0 * rng.integers(0, 8, size=n)
    centres = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centres + 0.5 * rng.standard_normal((n, 2))) / 1.414


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    radial = 1.0 + 0.3 * rng.standard_normal(n)
    tangential = 0.1 * rng.standard_normal(n)
    angle = 2.0 * np.pi * (np.arange(n) % 5) / 5 + 0.25 * np.exp(radial)
    cos, sin = np.cos(angle), np.sin(angle)
    points = np.stack([radial * cos + tangential * sin, tangential * cos - radial * sin], axis=1)
    return 2.0 * points[rng.permutation(n)]


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    outer = np.linspace(0.0, 2.0 * np.pi, n // 2, endpoint=False)
    inner = np.linspace(0.0, 2.0 * np.pi, n - n // 2, endpoint=False)
    points = np.concatenate(
        [
            np.stack([np.cos(outer), np.sin(outer)], axis=1),
            0.5 * np.stack([np.cos(inner), np.sin(inner)], axis=1),
        ]
    )
    return 3.0 * (points + 0.08 * rng.standard_normal((n, 2)))[rng.permutation(n)]


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    upper, lower = np.linspace(0.0, np.pi, n // 2), np.linspace(0.0, np.pi, n - n // 2)
    points = np.concatenate(
        [
            np.stack([np.cos(upper), np.sin(upper)], axis=1),
            np.stack([1.0 - np.cos(lower), 0.5 - np.sin(lower)], axis=1),
        ]
    )
    points = points + 0.1 * rng.standard_normal((n, 2))
    return 2.0 * points[rng.permutation(n)] + np.array([-1.0, -0.2])


def _two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    angle = np.sqrt(rng.random(n)) * 3.0 * np.pi
    arm = np.stack([-np.cos(angle) * angle, np.sin(angle) * angle], axis=1) + 0.5 * rng.random(
        (n, 2)
    )
    sign = np.where(np.arange(n) < n // 2, 1.0, -1.0)[:, None]
    return (sign * arm / 3.0 + 0.1 * rng.standard_normal((n, 2)))[rng.permutation(n)]


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = 4.0 * rng.random(n) - 2.0
    x2 = rng.random(n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], axis=1)


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    counts = (n // 4, n // 4, n // 4, n - 3 * (n // 4))
    rings = []
    for count, radius in zip(counts, (1.0, 0.75, 0.5, 0.25)):
        angle = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
        rings.append(radius * np.stack([np.cos(angle), np.sin(angle)], axis=1))
    return 3.0 * np.concatenate(rings)[rng.permutation(n)] + 0.08 * rng.standard_normal((n, 2))


_TOY: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "swissroll": _swissroll, "8gaussians": _eight_gaussians, "pinwheel": _pinwheel,
    "circles": _circles, "moons": _moons, "2spirals": _two_spirals,
    "checkerboard": _checkerboard, "rings": _rings,
}  # fmt: skip
TOY_DATASETS = tuple(_TOY)


def toy_sample(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` float32 points of one of FFJORD's 2-D toy sets, all the randomness from ``rng``."""
    return np.ascontiguousarray(_TOY[name](n, rng), dtype=np.float32)


# --------------------------------------------------------------------------- FFJORD's toy CNF


class ConcatSquashLinear(nn.Module):
    r"""FFJORD's time-gated layer :math:`(W x + b) \odot \sigma(g_1 t + g_0) + h t`."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1)
        return self.linear(x) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class Field(nn.Module):
    """The dynamics of ``(z, logp)``: a concat-squash MLP ``f`` and ``-tr(df/dz)``, exact or
    Hutchinson.
    """

    def __init__(self, hidden: Sequence[int], divergence: str) -> None:
        super().__init__()
        widths = [2, *hidden, 2]
        self.layers = nn.ModuleList(
            ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:])
        )
        self.divergence = divergence
        self.probe: Tensor | None = (
            None  # Hutchinson's: drawn at a solve's first evaluation, then held
        )

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z, logp = state
        create_graph = torch.is_grad_enabled()  # off in an adjoint's forward solve
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = z
            for i, layer in enumerate(self.layers):
                dz = layer(t, dz)
                dz = torch.tanh(dz) if i < len(self.layers) - 1 else dz
            if self.divergence == "exact":  # one backward pass per dimension
                div = z.new_zeros(z.shape[0])
                for i in range(z.shape[1]):
                    div = div + _vjp(dz[:, i], z, torch.ones_like(dz[:, i]), create_graph)[:, i]
            else:
                if self.probe is None:
                    self.probe = torch.randint_like(z, 0, 2) * 2 - 1
                div = (_vjp(dz, z, self.probe, create_graph) * self.probe).sum(dim=1)
        out = (dz, -div.reshape(logp.shape))
        return out if create_graph else (out[0].detach(), out[1].detach())


def _vjp(y: Tensor, z: Tensor, v: Tensor, create_graph: bool) -> Tensor:
    (grad,) = torch.autograd.grad(
        y, z, v, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(z) if grad is None else grad


class CNF(nn.Module):
    """One CNF block whose solve runs through a :class:`~torch_tempopt.LearnableHorizon` (T
    learned).
    """

    def __init__(
        self,
        hidden: Sequence[int],
        divergence: str,
        T0: float,
        solver_kwargs: dict[str, Any],
        adjoint: bool = False,
        eps: float = 0.1,
        budget: int | None = None,
    ) -> None:
        super().__init__()
        self.field = Field(hidden, divergence)
        self.solver_kwargs, self.adjoint = solver_kwargs, adjoint
        # on a budget, the call's solver_kwargs are the reference: what eval() solves with
        self.horizon = LearnableHorizon(T0=T0, eps=eps, budget=budget, learn_T=True)

    def forward(self, x: Tensor) -> Tensor:
        """The mean negative log-likelihood of ``x`` under N(0, I) transported from t0 to T."""
        self.field.probe = None
        solver = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        state = self.horizon(
            self.field, (x, x.new_zeros(x.shape[0])), solver=solver, **self.solver_kwargs
        )
        z, delta_logp = (s[-1] for s in state)
        logpz = -0.5 * (z.pow(2) + math.log(2.0 * math.pi)).sum(dim=1)
        return -(logpz - delta_logp).mean()


# --------------------------------------------------------------------------- training


def build_parser() -> argparse.ArgumentParser:
    """The command line (``torchrun ... examples/ddp_train.py --help``)."""
    p = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N examples/ddp_train.py",
        description="Data-parallel TO-FLOW on a 2-D toy set with DistributedDataParallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", choices=TOY_DATASETS, default="8gaussians")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument(
        "--batch-size", type=int, default=100, help="global batch, split evenly over the ranks"
    )
    p.add_argument("--hidden", default="64,64,64")
    p.add_argument("--divergence", choices=("exact", "hutchinson"), default="exact")
    p.add_argument("--T0", type=float, default=0.5)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the weights")
    p.add_argument("--tempopt-lr", type=float, default=1e-2, help="Adam learning rate of T")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--solver", choices=ADAPTIVE + FIXED_GRID, default="dopri5")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--step-size", type=float, default=None, help="for fixed-grid solvers")
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="N rk4 steps per solve, guarded (placement fitted)",
    )
    p.add_argument("--adjoint", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--find-unused-parameters", action="store_true", help="DDP's option (not needed for T)"
    )
    p.add_argument(
        "--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl with CUDA"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default=None, help="directory for metrics.json (rank 0)")
    return p


def _solver_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.solver in FIXED_GRID:
        if args.step_size is None:
            raise ValueError(f"--solver {args.solver} is a fixed-grid method: give --step-size.")
        return {"method": args.solver, "options": {"step_size": args.step_size}}
    return {"method": args.solver, "rtol": args.rtol, "atol": args.atol}


def _digest(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(args: argparse.Namespace) -> dict[str, Any] | None:
    """Trains in the process group set up by torchrun; returns the metrics on rank 0 (``None``
    elsewhere).
    """
    if args.backend == "auto":
        args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.batch_size % world:
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by the {world} processes."
        )
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    dist.init_process_group(args.backend, timeout=timedelta(minutes=5))
    try:
        torch.manual_seed(
            args.seed
        )  # the same initialisation everywhere (DDP broadcasts rank 0's anyway)
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
        model = CNF(
            hidden,
            args.divergence,
            args.T0,
            _solver_kwargs(args),
            args.adjoint,
            args.eps,
            args.budget,
        ).to(device)
        ddp = DistributedDataParallel(
            model,
            device_ids=[local_rank] if device.type == "cuda" else None,
            find_unused_parameters=args.find_unused_parameters,
        )
        stepper = CoordinateDescentStepper(
            torch.optim.Adam(model.field.parameters(), lr=args.lr),
            ddp,
            lr=args.tempopt_lr,
            alpha=args.alpha,
        )
        torch.manual_seed(args.seed + 1 + rank)  # Hutchinson probes: independent per rank
        rng = np.random.default_rng(args.seed)  # the global batches: the same stream on every rank
        share = args.batch_size // world
        losses: list[float] = []
        start = time.perf_counter()
        for it in range(1, args.iters + 1):
            batch = toy_sample(args.data, args.batch_size, rng)[rank * share : (rank + 1) * share]
            x = torch.as_tensor(batch, device=device)

            def closure(x: torch.Tensor = x) -> torch.Tensor:
                stepper.zero_grad()
                nll = ddp(x)
                nll.backward()
                return nll

            loss = closure()
            stepper.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
            if rank == 0 and (it % max(args.log_every, 1) == 0 or it == args.iters):
                print(
                    f"iter {it:6d}  loss {losses[-1]:.4f}  T {model.horizon.T.item():.4f}",
                    flush=True,
                )
        seconds = time.perf_counter() - start

        # Every rank must hold the same T and weights, bit for bit.
        T = [float(model.horizon.T.detach())]
        mine = {
            "T": [repr(t) for t in T],
            "weights": _digest([*model.parameters(), *model.buffers()]),
        }
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank != 0:
            # Wait for rank 0 to finish writing: a rank that tears down its process group while
            # another still uses it makes gloo abort that other process at exit (SIGABRT).
            dist.barrier()
            return None
        metrics = {
            "world_size": world,
            "backend": args.backend,
            "iters": args.iters,
            "loss": losses,
            "T": T,
            "T_equal_across_ranks": all(e["T"] == mine["T"] for e in everyone),
            "weights_equal_across_ranks": all(e["weights"] == mine["weights"] for e in everyone),
            "stats": stepper.stats,
            "seconds": seconds,
            "config": vars(args),
        }
        if args.out is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        dist.barrier()
        return metrics
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line, trains, and prints the summary on rank 0."""
    if "RANK" not in os.environ:
        raise SystemExit(
            "examples/ddp_train.py runs under torchrun, e.g.: "
            "torchrun --nproc_per_node 2 examples/ddp_train.py --iters 100"
        )
    metrics = train(build_parser().parse_args(argv))
    if metrics is not None:
        summary = {k: metrics[k] for k in ("world_size", "backend", "iters", "T", "seconds")}
        summary.update(
            final_loss=metrics["loss"][-1] if metrics["loss"] else None,
            ranks_equal=metrics["T_equal_across_ranks"] and metrics["weights_equal_across_ranks"],
        )
        print(json.dumps(summary))
        if not summary["ranks_equal"]:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
