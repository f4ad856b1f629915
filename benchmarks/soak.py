"""Soak test: a long TO-FLOW training of the toy CNF on a budget, checking bounds, values, memory.

The reference CNF of :mod:`benchmarks.harness.cnf` (concat-squash MLP 32-32, exact trace, batch 100
of 8gaussians) with a learnable end time, solved on ``--budget`` rk4 steps (a learned placement,
guarded against dopri5 every ``--guard-every`` steps; ``--budget 0`` solves adaptively), stepped by
:class:`torch_tempopt.CoordinateDescentStepper` (Adam on the weights, on T and on the placement,
the paper's alpha = 0.1, eps = 0.1), on 1 thread. Every iteration checks that

* T lies in its clip interval ``horizon.bounds`` (up to the float rounding of the bounds);
* the placement is finite and its step boundaries increase from 0 to 1 (after any growth of the
  budget);
* the loss, T and every weight are finite (no step was skipped);

and every ``--sample-every`` iterations it records the resident set size (``/proc/self/statm``
on Linux) and the peak RSS (``resource.getrusage``), without psutil. Memory is *flat* if the
RSS at the end exceeds the RSS at iteration 1000 by at most ``--max-growth-mb``.

Run from the repository root (about 10 minutes on one core with the defaults)::

    python -m benchmarks.soak                      # 20,000 iterations -> results/soak.{json,md}
    python -m benchmarks.soak --iters 300 --sample-every 100 --out /tmp/soak   # a quick check

The exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness.cnf import build_toy_model, end_times, network_parameters, nfe, nll_and_reg
from benchmarks.harness.data import TOY_DATASETS, toy_sample
from benchmarks.scoring import SOLVE
from benchmarks.writer import RESULTS, command, write
from torch_tempopt import BudgetGuard, CoordinateDescentStepper, LearnableHorizon

__all__ = ["build_parser", "main", "markdown", "peak_rss_bytes", "rss_bytes", "run"]

MIB = 1024 * 1024


def rss_bytes() -> int | None:
    """The current resident set size, from ``/proc/self/statm`` (Linux), or ``None`` elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--data", choices=TOY_DATASETS, default="8gaussians")
    p.add_argument("--hidden", default="32,32")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument(
        "--budget", type=int, default=4, help="rk4 steps per solve (0: adaptive dopri5)"
    )
    p.add_argument("--placement", choices=("learned", "uniform"), default="learned")
    p.add_argument("--guard-every", type=int, default=50)
    p.add_argument("--guard-tol", type=float, default=0.025)
    p.add_argument(
        "--tol",
        type=float,
        default=SOLVE["rtol"],
        help="dopri5's rtol = atol (the guard's reference)",
    )
    p.add_argument("--T0", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tempopt-lr", type=float, default=1e-2)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sample-every", type=int, default=1000, help="memory samples every K iterations"
    )
    p.add_argument(
        "--max-growth-mb", type=float, default=16.0, help="allowed RSS growth after iteration 1000"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def _within(h: LearnableHorizon) -> bool:
    lo, hi = h.bounds
    T = h.T.detach()
    # clamp_ rounds the float64 bounds to T's dtype: allow that rounding, nothing more.
    lo_r, hi_r = (torch.tensor(b, dtype=T.dtype).item() for b in (lo, hi))
    return min(lo, lo_r) <= T.item() <= max(hi, hi_r)


def _grid_ok(h: LearnableHorizon) -> bool:
    """No budget, or a finite placement whose step boundaries increase from 0 to 1."""
    if h.budget is None:
        return True
    u = h.budget.fractions().detach()
    return (
        bool(torch.isfinite(h.budget.placement).all())
        and u[0] == 0
        and u[-1] == 1
        and bool((u.diff() > 0).all())
    )


def _setup(args: argparse.Namespace) -> tuple[torch.nn.Module, CoordinateDescentStepper]:
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    model = build_toy_model(
        hidden=hidden,
        T0=args.T0,
        count=True,
        eps=args.eps,
        budget=args.budget or None,
        solver_kwargs={"method": SOLVE["method"], "rtol": args.tol, "atol": args.tol},
    )
    stepper = CoordinateDescentStepper(
        torch.optim.Adam(network_parameters(model), lr=args.lr),
        model,
        lr=args.tempopt_lr,
        alpha=args.alpha,
        guard=bool(args.budget)
        and BudgetGuard(
            model,
            every=args.guard_every,
            tol=args.guard_tol,
            fit_steps=int(args.placement == "learned"),
        ),
    )
    return model, stepper


def _check(
    it: int,
    value: float,
    model: torch.nn.Module,
    checks: dict[str, Any],
    T_range: list[list[float]],
) -> None:
    """Counts this iteration's failed checks; keeps the first failure's description."""
    problems = []
    if not math.isfinite(value):
        checks["nonfinite_loss"] += 1
        problems.append(f"loss {value}")
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        checks["nonfinite_parameters"] += 1
        problems.append("a parameter is NaN/inf")
    for k, h in enumerate(m for m in model.modules() if isinstance(m, LearnableHorizon)):
        T = h.T.item()
        T_range[0][k], T_range[1][k] = min(T_range[0][k], T), max(T_range[1][k], T)
        if not _within(h):
            checks["T_out_of_bounds"] += 1
            problems.append(f"T_{k}={T!r} outside {h.bounds}")
        if not _grid_ok(h):
            checks["bad_grid"] += 1
            problems.append(f"horizon {k}: placement not finite or fractions not increasing")
    if problems and checks["first_failure"] is None:
        checks["first_failure"] = {"iteration": it, "problems": problems}


def _sample(
    it: int, model: torch.nn.Module, losses: list[float], nfe_total: int, start: float
) -> dict[str, Any]:
    return {
        "iteration": it,
        "rss_mb": _mb(rss_bytes()),
        "peak_rss_mb": _mb(peak_rss_bytes()),
        "T": end_times(model),
        "budget": [
            h.budget.steps
            for h in model.modules()
            if isinstance(h, LearnableHorizon) and h.budget is not None
        ],
        "mean_loss": float(np.mean(losses)),
        "nfe_per_iteration": nfe_total / it,
        "wall_seconds": round(time.perf_counter() - start, 2),
    }


def _train(
    args: argparse.Namespace, model: torch.nn.Module, stepper: CoordinateDescentStepper
) -> dict[str, Any]:
    """The soak loop: checks every iteration, memory samples every ``--sample-every``."""
    n = len([m for m in model.modules() if isinstance(m, LearnableHorizon)])
    checks = {
        "T_out_of_bounds": 0,
        "bad_grid": 0,
        "nonfinite_loss": 0,
        "nonfinite_parameters": 0,
        "first_failure": None,
    }
    T_range, samples, losses, nfe_total = [[math.inf] * n, [-math.inf] * n], [], [], 0
    rng, bar = np.random.default_rng(args.seed), _bar(args)
    start, cpu0 = time.perf_counter(), time.process_time()
    for it in range(1, args.iters + 1):
        stepper.zero_grad()
        loss, _ = nll_and_reg(model, torch.as_tensor(toy_sample(args.data, args.batch, rng)))
        loss.backward()
        stepper.step()
        nfe_total += sum(nfe(model, reset=True).values())
        losses.append(loss.item())
        _check(it, losses[-1], model, checks, T_range)
        if it % args.sample_every == 0 or it == args.iters or it == min(1000, args.iters):
            samples.append(_sample(it, model, losses, nfe_total, start))
            losses = []
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "checks": checks,
        "T_range": T_range,
        "samples": samples,
        "nfe_total": nfe_total,
        "wall": time.perf_counter() - start,
        "cpu": time.process_time() - cpu0,
    }


def _bar(args: argparse.Namespace) -> Any:
    if not args.progress:
        return None
    from tqdm import tqdm

    # disable=None: no bar where stderr is not a terminal (a log file)
    return tqdm(total=args.iters, desc="soak", dynamic_ncols=True, file=sys.stderr, disable=None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, stepper = _setup(args)
    loop = _train(args, model, stepper)
    checks, samples = loop["checks"], loop["samples"]
    at_1k = {s["iteration"]: s for s in samples}.get(min(1000, args.iters))
    end = samples[-1]
    growth = None
    if at_1k is not None and at_1k["rss_mb"] is not None and end["rss_mb"] is not None:
        growth = round(end["rss_mb"] - at_1k["rss_mb"], 2)
    memory_flat = growth is None or growth <= args.max_growth_mb
    failures = (
        checks["T_out_of_bounds"]
        + checks["bad_grid"]
        + checks["nonfinite_loss"]
        + checks["nonfinite_parameters"]
    )
    stats = stepper.stats
    horizons = [m for m in model.modules() if isinstance(m, LearnableHorizon)]
    return {
        "passed": failures == 0 and stats["skipped_steps"] == 0 and memory_flat,
        "iterations": args.iters,
        "checks": {
            **checks,
            "skipped_steps": stats["skipped_steps"],
            "nonfinite_dLdT": [h["nonfinite"] for h in stats["horizons"]],
            "clip_counts": [h["clip_count"] for h in stats["horizons"]],
            "guard_events": len(stepper.guard.stats["events"]) if stepper.guard else 0,
            "memory_flat": memory_flat,
            "rss_growth_after_1k_mb": growth,
            "max_growth_mb": args.max_growth_mb,
        },
        "memory": {
            "rss_mb_at_1k": None if at_1k is None else at_1k["rss_mb"],
            "peak_rss_mb_at_1k": None if at_1k is None else at_1k["peak_rss_mb"],
            "rss_mb_at_end": end["rss_mb"],
            "peak_rss_mb_at_end": end["peak_rss_mb"],
        },
        "T": {
            "final": end_times(model),
            "min": loop["T_range"][0],
            "max": loop["T_range"][1],
            "bounds": [list(h.bounds) for h in horizons],
        },
        "budget": [None if h.budget is None else h.budget.steps for h in horizons],
        "fractions": [
            None if h.budget is None else h.budget.fractions().tolist() for h in horizons
        ],
        "nfe_per_iteration": loop["nfe_total"] / max(args.iters, 1),
        "wall_seconds": round(loop["wall"], 2),
        "cpu_seconds": round(loop["cpu"], 2),
        "ms_per_iteration": round(1000 * loop["wall"] / max(args.iters, 1), 3),
        "samples": samples,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def markdown(result: dict[str, Any]) -> str:
    c, m, T = result["checks"], result["memory"], result["T"]
    lines = [
        f"# Soak: {result['iterations']} iterations of TO-FLOW on the toy CNF",
        "",
        f"Result: **{'passed' if result['passed'] else 'FAILED'}** "
        f"({result['wall_seconds']} s wall, {result['ms_per_iteration']} ms/iteration, "
        f"{result['nfe_per_iteration']:.1f} NFE/iteration, 1 thread).",
        "",
        "| check | value |",
        "|---|---|",
        f"| T outside its bounds (iterations) | {c['T_out_of_bounds']} |",
        f"| placement not finite or not increasing (iterations) | {c['bad_grid']} |",
        "| non-finite loss / parameters (iterations) | "
        f"{c['nonfinite_loss']} / {c['nonfinite_parameters']} |",
        f"| skipped steps, non-finite dL/dT | {c['skipped_steps']}, {c['nonfinite_dLdT']} |",
        f"| T range seen (bounds) | {T['min']} .. {T['max']} ({T['bounds']}) |",
        f"| clip events | {c['clip_counts']} |",
        f"| budget at the end (guard growths) | {result['budget']} ({c['guard_events']}) |",
        f"| RSS at 1k / end (MiB) | {m['rss_mb_at_1k']} / {m['rss_mb_at_end']} |",
        f"| peak RSS at 1k / end (MiB) | {m['peak_rss_mb_at_1k']} / {m['peak_rss_mb_at_end']} |",
        "| RSS growth after 1k (limit) | "
        f"{c['rss_growth_after_1k_mb']} MiB ({c['max_growth_mb']} MiB) |",
        "",
        "| iteration | RSS MiB | peak RSS MiB | T | budget | mean loss | NFE/iter | wall s |",
        "|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for s in result["samples"]:
        Ts = ", ".join(f"{t:.4f}" for t in s["T"])
        lines.append(
            f"| {s['iteration']} | {s['rss_mb']} | {s['peak_rss_mb']} | {Ts} | {s['budget']} | "
            f"{s['mean_loss']:.4f} | {s['nfe_per_iteration']:.1f} | {s['wall_seconds']} |"
        )
    cfg = result["config"]
    lines += [
        "",
        f"Config: data {cfg['data']}, hidden {cfg['hidden']}, batch {cfg['batch']}, budget "
        f"{cfg['budget']} rk4 steps ({cfg['placement']} placement, guard every "
        f"{cfg['guard_every']} at {cfg['guard_tol']} against dopri5 {cfg['tol']}), "
        f"T0 {cfg['T0']}, lr {cfg['lr']}, T lr {cfg['tempopt_lr']}, alpha {cfg['alpha']}, "
        f"eps {cfg['eps']}, seed {cfg['seed']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.iters <= 0 or args.sample_every <= 0 or args.budget < 0:
        raise SystemExit("--iters and --sample-every must be positive, --budget non-negative.")
    result = run(args)
    write(args.out, "soak", result, markdown(result), command("soak", argv))
    summary = {k: result[k] for k in ("passed", "iterations", "ms_per_iteration", "memory")}
    summary["T"] = result["T"]["final"]
    print(json.dumps(summary))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
