"""Cost of LearnableHorizon against the bare odeint call it replaces, at the same fixed T.

An FFJORD-style 2-D CNF (concat-squash MLP 64-64-64, exact trace, dopri5 at rtol=atol=1e-5,
batch 1000): forward + backward of ``LearnableHorizon(T0=T)(func, state)`` against
``odeint(func, state, torch.tensor([0.0, T]))``, which return the same ``[y(0), y(T)]`` per part;
the loss reads the last row of each. Interleaved pair by pair (the order inside a pair
alternates), 1 thread, median over the pairs. Also the NFE of each (forward and backward).
The target: a time ratio <= 1.03 and exactly one extra evaluation of the field per solve.

Run from the repository root::

    python benchmarks/overhead.py               # writes benchmarks/results/overhead.{json,md}
    python benchmarks/overhead.py --pairs 10    # quicker

``--pretrain N`` first fits the model N iterations on 8gaussians (with T fixed), so the field is
less trivial and the solves take more steps than at initialisation.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchdiffeq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.cnf import ODEfunc, ODEnet, standard_normal_logprob  # noqa: E402
from benchmarks.harness.data import toy_sample  # noqa: E402
from torch_tempopt import LearnableHorizon, count_nfe  # noqa: E402


def _loss(z: torch.Tensor, dlogp: torch.Tensor) -> torch.Tensor:
    return -(standard_normal_logprob(z) - dlogp.reshape(-1)).mean()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=30, help="timed pairs (>= 30 for the README figure)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--T", type=float, default=0.5)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--pretrain", type=int, default=0, help="fit the field this many iterations first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    func = count_nfe(ODEfunc(ODEnet(2, (64, 64, 64), "concatsquash", "tanh"), divergence="exact"))
    horizon = LearnableHorizon(T0=args.T)
    x = torch.as_tensor(toy_sample("8gaussians", args.batch, args.seed))
    kw = dict(method="dopri5", rtol=args.tol, atol=args.tol)
    grid = torch.tensor([0.0, args.T])

    if args.pretrain:
        opt = torch.optim.Adam(func.parameters(), lr=1e-3)
        for i in range(args.pretrain):
            xb = torch.as_tensor(toy_sample("8gaussians", args.batch, 10_000 + i))
            z, dlogp = (s[-1] for s in torchdiffeq.odeint(func, (xb, xb.new_zeros(len(xb))), grid, **kw))
            opt.zero_grad()
            _loss(z, dlogp).backward()
            opt.step()

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
        same = all(torch.equal(a, b) for a, b in zip(torchdiffeq.odeint(func, y0, grid, **kw), horizon(func, y0, **kw)))
    for _ in range(args.warmup):
        bare()
        ours()
    times_bare, times_ours, ratios = [], [], []
    nfe_bare = nfe_ours = None
    for i in range(args.pairs):
        first, second = (bare, ours) if i % 2 == 0 else (ours, bare)
        a, b = first(), second()
        rb, ro = (a, b) if first is bare else (b, a)
        times_bare.append(rb[0])
        times_ours.append(ro[0])
        ratios.append(ro[0] / rb[0])
        nfe_bare, nfe_ours = rb[1:], ro[1:]

    result = {
        "benchmark": "overhead",
        "command": "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "median_seconds_bare": statistics.median(times_bare),
        "median_seconds_horizon": statistics.median(times_ours),
        "median_ratio": statistics.median(ratios),
        "ratio_of_medians": statistics.median(times_ours) / statistics.median(times_bare),
        "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
        "nfe_bare": {"forward": nfe_bare[0], "backward": nfe_bare[1]},
        "nfe_horizon": {"forward": nfe_ours[0], "backward": nfe_ours[1]},
        "extra_evaluations": (nfe_ours[0] + nfe_ours[1]) - (nfe_bare[0] + nfe_bare[1]),
        "dLdT": horizon.T.grad.item(),
        "outputs_equal": same,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "overhead" if not args.pretrain else f"overhead_pretrain{args.pretrain}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "| solve | median fwd+bwd (s) | NFE fwd | NFE bwd |\n|---|---|---|---|\n"
        f"| `odeint(func, y0, torch.tensor([0, T]))` | {result['median_seconds_bare']:.4f} | {nfe_bare[0]} | {nfe_bare[1]} |\n"
        f"| `LearnableHorizon(T0=T)(func, y0)` | {result['median_seconds_horizon']:.4f} | {nfe_ours[0]} | {nfe_ours[1]} |\n\n"
        f"Median time ratio {result['median_ratio']:.3f} (IQR {result['ratio_iqr'][0]:.3f}-{result['ratio_iqr'][1]:.3f}) "
        f"over {args.pairs} interleaved pairs; {result['extra_evaluations']} extra evaluation(s) of the field per solve. "
        f"Batch {args.batch}, dopri5 rtol=atol={args.tol}, 1 thread, {result['machine']['processor']}, torch {torch.__version__}.\n"
    )
    (args.out / f"{name}.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
