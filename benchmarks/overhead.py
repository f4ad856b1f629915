"""Cost of LearnableHorizon against the bare odeint call it replaces, at the same fixed T.

An FFJORD-style 2-D CNF (concat-squash MLP 64-64-64, exact trace, dopri5 at rtol=atol=1e-5,
batch 1000): forward + backward of ``LearnableHorizon(T0=T)(func, state)`` against
``odeint(func, state, torch.tensor([0.0, T]))``, which return the same ``[y(0), y(T)]`` per part;
the loss reads the last row of each. Interleaved pair by pair (the order inside a pair
alternates), 1 thread, median over the pairs. Also the NFE of each (forward and backward).
The target: a time ratio <= 1.03 and exactly one extra evaluation of the field per solve.

Run from the repository root::

    python -m benchmarks.overhead               # writes benchmarks/results/overhead.{json,md}
    python -m benchmarks.overhead --pairs 10    # quicker

``--pretrain N`` first fits the model N iterations on 8gaussians (with T fixed), so the field is
less trivial and the solves take more steps than at initialisation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchdiffeq

from benchmarks.harness.cnf import ODEfunc, ODEnet, standard_normal_logprob
from benchmarks.harness.data import toy_sample
from benchmarks.scoring import SOLVE
from benchmarks.writer import RESULTS, command, write
from torch_tempopt import LearnableHorizon, count_nfe

__all__ = ["main", "markdown", "measure"]

Timed = Callable[[], tuple[float, int, int]]


def _loss(z: torch.Tensor, dlogp: torch.Tensor) -> torch.Tensor:
    return -(standard_normal_logprob(z) - dlogp.reshape(-1)).mean()


def _pretrain(
    func: torch.nn.Module, args: argparse.Namespace, grid: torch.Tensor, kw: dict
) -> None:
    """Fits the field ``args.pretrain`` iterations on 8gaussians, T fixed."""
    opt = torch.optim.Adam(func.parameters(), lr=1e-3)
    for i in range(args.pretrain):
        xb = torch.as_tensor(toy_sample("8gaussians", args.batch, 10_000 + i))
        z, dlogp = (
            s[-1] for s in torchdiffeq.odeint(func, (xb, xb.new_zeros(len(xb))), grid, **kw)
        )
        opt.zero_grad()
        _loss(z, dlogp).backward()
        opt.step()


def _interleave(bare: Timed, ours: Timed, pairs: int) -> dict[str, Any]:
    """Times ``pairs`` pairs, the order inside a pair alternating; the last pair's NFE."""
    times_bare, times_ours, ratios = [], [], []
    nfe_bare = nfe_ours = (0, 0)
    for i in range(pairs):
        first, second = (bare, ours) if i % 2 == 0 else (ours, bare)
        a, b = first(), second()
        rb, ro = (a, b) if first is bare else (b, a)
        times_bare.append(rb[0])
        times_ours.append(ro[0])
        ratios.append(ro[0] / rb[0])
        nfe_bare, nfe_ours = rb[1:], ro[1:]
    return {
        "median_seconds_bare": statistics.median(times_bare),
        "median_seconds_horizon": statistics.median(times_ours),
        "median_ratio": statistics.median(ratios),
        "ratio_of_medians": statistics.median(times_ours) / statistics.median(times_bare),
        "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
        "nfe_bare": {"forward": nfe_bare[0], "backward": nfe_bare[1]},
        "nfe_horizon": {"forward": nfe_ours[0], "backward": nfe_ours[1]},
        "extra_evaluations": (nfe_ours[0] + nfe_ours[1]) - (nfe_bare[0] + nfe_bare[1]),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The horizon's solve against odeint's at the same T: times, NFE, equal outputs, dL/dT."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    func = count_nfe(ODEfunc(ODEnet(2, (64, 64, 64), "concatsquash", "tanh"), divergence="exact"))
    horizon = LearnableHorizon(T0=args.T)
    x = torch.as_tensor(toy_sample("8gaussians", args.batch, args.seed))
    kw = dict(method=SOLVE["method"], rtol=args.tol, atol=args.tol)
    grid = torch.tensor([0.0, args.T])
    if args.pretrain:
        _pretrain(func, args, grid, kw)

    def bare() -> tuple[float, int, int]:
        func.reset()
        func.zero_grad()
        t = time.perf_counter()
        z, dlogp = (s[-1] for s in torchdiffeq.odeint(func, (x, x.new_zeros(len(x))), grid, **kw))
        _loss(z, dlogp).backward()
        return time.perf_counter() - t, func.nfe_forward, func.nfe_backward

    def ours() -> tuple[float, int, int]:
        func.reset()
        func.zero_grad()
        horizon.zero_grad()
        t = time.perf_counter()
        z, dlogp = (s[-1] for s in horizon(func, (x, x.new_zeros(len(x))), **kw))
        _loss(z, dlogp).backward()
        return time.perf_counter() - t, func.nfe_forward, func.nfe_backward

    with torch.no_grad():  # the drop-in returns what odeint returns, bit for bit
        y0 = (x, x.new_zeros(len(x)))
        pairs = zip(torchdiffeq.odeint(func, y0, grid, **kw), horizon(func, y0, **kw))
        same = all(torch.equal(a, b) for a, b in pairs)
    for _ in range(args.warmup):
        bare()
        ours()
    result = _interleave(bare, ours, args.pairs)
    return {**result, "dLdT": horizon.T.grad.item(), "outputs_equal": same}


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The table and its caption."""
    bare, ours, iqr = result["nfe_bare"], result["nfe_horizon"], result["ratio_iqr"]
    return (
        "| solve | median fwd+bwd (s) | NFE fwd | NFE bwd |\n|---|---|---|---|\n"
        f"| `odeint(func, y0, torch.tensor([0, T]))` | {result['median_seconds_bare']:.4f} | "
        f"{bare['forward']} | {bare['backward']} |\n"
        f"| `LearnableHorizon(T0=T)(func, y0)` | {result['median_seconds_horizon']:.4f} | "
        f"{ours['forward']} | {ours['backward']} |\n\n"
        f"Median time ratio {result['median_ratio']:.3f} (IQR {iqr[0]:.3f}-{iqr[1]:.3f}) over "
        f"{args.pairs} interleaved pairs; {result['extra_evaluations']} extra evaluation(s) of "
        f"the field per solve. Batch {args.batch}, dopri5 rtol=atol={args.tol}, 1 thread."
    )


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", type=int, default=30, help="timed pairs (>= 30 for the README figure)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--T", type=float, default=0.5)
    parser.add_argument("--tol", type=float, default=SOLVE["rtol"], help="dopri5's rtol = atol")
    parser.add_argument(
        "--pretrain", type=int, default=0, help="fit the field this many iterations first"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = measure(args)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    name = "overhead" if not args.pretrain else f"overhead_pretrain{args.pretrain}"
    data = {"benchmark": "overhead", "config": config, **result}
    record = write(args.out, name, data, markdown(result, args), command("overhead", argv))
    print((args.out / f"{name}.md").read_text())
    return record


if __name__ == "__main__":
    main()
