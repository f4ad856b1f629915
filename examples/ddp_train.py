r"""Data-parallel TO-FLOW training of the reference toy CNF with DistributedDataParallel.

Two processes on the CPU (gloo), from the repository root::

    torchrun --nproc_per_node 2 examples/ddp_train.py --data 8gaussians --iters 1000 --out runs/ddp

On GPUs the backend is nccl and each process uses ``cuda:LOCAL_RANK`` (``--backend`` overrides
the choice). The model is :func:`benchmarks.harness.cnf.build_toy_model` with a learnable end time,
wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, and stepped by
:class:`torch_tempopt.CoordinateDescentStepper`::

    ddp = DistributedDataParallel(model)
    stepper = CoordinateDescentStepper(Adam(network_parameters(model)), ddp)

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
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script (torchrun examples/ddp_train.py): import from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from benchmarks.harness.cnf import build_toy_model, end_times, network_parameters, nll_and_reg  # noqa: E402
from benchmarks.harness.data import TOY_DATASETS, toy_sample  # noqa: E402
from torch_tempopt import CoordinateDescentStepper  # noqa: E402

__all__ = ["build_parser", "main", "train"]

FIXED_GRID = ("euler", "midpoint", "rk4")
ADAPTIVE = ("dopri5", "bosh3", "adaptive_heun")


def build_parser() -> argparse.ArgumentParser:
    """The command line (``torchrun ... examples/ddp_train.py --help``)."""
    p = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N examples/ddp_train.py",
        description="Data-parallel TO-FLOW on a 2-D toy set with DistributedDataParallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", choices=TOY_DATASETS, default="8gaussians")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100, help="global batch, split evenly over the ranks")
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
    p.add_argument("--budget", type=int, default=None, help="N rk4 steps per solve, guarded (placement fitted)")
    p.add_argument("--adjoint", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--find-unused-parameters", action="store_true", help="DDP's option (not needed for T)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl with CUDA")
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
    """Trains in the process group set up by torchrun; returns the metrics on rank 0 (``None`` elsewhere)."""
    if args.backend == "auto":
        args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes.")
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    dist.init_process_group(args.backend, timeout=timedelta(minutes=5))
    try:
        torch.manual_seed(args.seed)  # the same initialisation everywhere (DDP broadcasts rank 0's anyway)
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
        model = build_toy_model(
            hidden=hidden,
            divergence=args.divergence,
            T0=args.T0,
            solver_kwargs=_solver_kwargs(args),
            adjoint=args.adjoint,
            eps=args.eps,
            budget=args.budget,
        ).to(device)
        ddp = DistributedDataParallel(
            model,
            device_ids=[local_rank] if device.type == "cuda" else None,
            find_unused_parameters=args.find_unused_parameters,
        )
        stepper = CoordinateDescentStepper(
            torch.optim.Adam(network_parameters(model), lr=args.lr),
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
                nll, _ = nll_and_reg(ddp, x)
                nll.backward()
                return nll

            loss = closure()
            stepper.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
            if rank == 0 and (it % max(args.log_every, 1) == 0 or it == args.iters):
                T = ", ".join(f"{t:.4f}" for t in end_times(model))
                print(f"iter {it:6d}  loss {losses[-1]:.4f}  T {T}", flush=True)
        seconds = time.perf_counter() - start

        # Every rank must hold the same T and weights, bit for bit.
        mine = {"T": [repr(t) for t in end_times(model)], "weights": _digest([*model.parameters(), *model.buffers()])}
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
            "T": end_times(model),
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
            "examples/ddp_train.py runs under torchrun, e.g.: torchrun --nproc_per_node 2 examples/ddp_train.py --iters 100"
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
