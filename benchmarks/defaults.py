"""Do the library's defaults ever make a model worse than not adopting? Three codebases, three T0.

Each codebase trains the same 2-D CNF on 8gaussians (same seed, batch order and iterations) four
ways:

* ``plain``: the unmodified code (its own ``odeint`` call and Adam);
* ``defaults``: the README's adoption lines at the library's defaults (``LearnableHorizon(T0)``
  and ``CoordinateDescentStepper(Adam, model)``: T learned from the loss alone, alpha = 0);
* ``paper``: the same with TO-FLOW's regulariser, ``alpha=0.1`` (the paper's settings);
* ``budget2``: ``LearnableHorizon(T0, budget=2)`` at its defaults (2 rk4 steps, T fixed, guard on).

and scores every final model the same way: the NLL of 5,000 held-out points by the scoring solve
(dopri5 at 1e-5, ``eval()``). The codebases: ``torchdiffeq`` (a CNF of one's own on
``odeint_adjoint``), ``zuko`` (a field on ``zuko.nn.MLP`` solved by ``zuko.utils.odeint``, through
``torch_tempopt.contrib.zuko_solver`` once adopted; no budget: a budget solves with torchdiffeq)
and ``ffjord`` (upstream's ``train_toy.py`` run unchanged, ``--ffjord PATH``, through
``torch_tempopt.patches.ffjord`` in ``benchmarks.defaults_ffjord``; ``plain`` runs the script
without the patch). One thread, one run at a time; upstream's runs go to ``runs/defaults``::

    python -m benchmarks.defaults --ffjord .upstream/ffjord   # results/defaults.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from benchmarks.harness.data import toy_sample
from benchmarks.scoring import SOLVE
from benchmarks.writer import RESULTS, ROOT, command, write, write_markdown
from torch_tempopt import CoordinateDescentStepper, LearnableHorizon

__all__ = ["CONFIGS", "Field", "main", "markdown", "run_ffjord", "run_own"]

CONFIGS = ("plain", "defaults", "paper", "budget2")
#: the scoring solve's tolerances, which every codebase trains with too
TOL = {"rtol": SOLVE["rtol"], "atol": SOLVE["atol"]}


class Field(nn.Module):
    """(dz/dt, dlogp/dt) of a time-conditioned MLP with the exact trace (2-D)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, t: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = state[0]
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1)], 1))
            div = sum(
                torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i]
                for i in range(2)
            )
        return dz, -div[:, None]


def _net(codebase: str) -> nn.Module:
    if codebase == "zuko":
        import zuko

        return zuko.nn.MLP(3, 2, hidden_features=(64, 64), activation=nn.Tanh)
    return nn.Sequential(
        nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    )


Solve = Callable[[nn.Module, tuple], tuple]


def _zuko(config: str, T0: float) -> tuple[Solve, LearnableHorizon | None]:
    import zuko

    from torch_tempopt.contrib import zuko_solver

    if config == "plain":

        def plain(field: nn.Module, state: tuple) -> tuple:  # zuko calls f(t, *state)
            f = lambda t, z, d: field(t, (z, d))  # noqa: E731
            phi = tuple(field.parameters())
            return tuple(zuko.utils.odeint(f, state, 0.0, T0, phi=phi, **TOL))

        return plain, None
    horizon = LearnableHorizon(T0=T0)
    solver = zuko_solver

    def adopted(field: nn.Module, state: tuple) -> tuple:
        return tuple(s[-1] for s in horizon(field, state, solver=solver, **TOL))

    return adopted, horizon


def _solve(codebase: str, config: str, T0: float) -> tuple[Solve, LearnableHorizon | None]:
    """The model's solve ``solve(field, state) -> (z(T), dlogp)``, and its horizon once adopted."""
    from torchdiffeq import odeint_adjoint

    if codebase == "zuko":
        return _zuko(config, T0)
    if config == "plain":

        def plain(field: nn.Module, state: tuple) -> tuple:
            grid = torch.tensor([0.0, T0])
            return tuple(s[-1] for s in odeint_adjoint(field, state, grid, **TOL))

        return plain, None
    horizon = LearnableHorizon(T0=T0, budget=2 if config == "budget2" else None)

    def adopted(field: nn.Module, state: tuple) -> tuple:
        return tuple(s[-1] for s in horizon(field, state, solver=odeint_adjoint, **TOL))

    return adopted, horizon


def _nll(solve: Solve, field: nn.Module, x: torch.Tensor) -> torch.Tensor:
    z, dlogp = solve(field, (x, x.new_zeros(x.shape[0], 1)))
    logpz = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi)
    return -(logpz - dlogp[:, 0]).mean()


def run_own(
    codebase: str, config: str, T0: float, iters: int, seed: int, test: torch.Tensor
) -> dict[str, Any]:
    """Trains and scores one configuration of an in-process codebase (torchdiffeq or zuko)."""
    torch.manual_seed(seed)
    field = Field(_net(codebase))
    solve, horizon = _solve(codebase, config, T0)
    model = nn.ModuleDict({"field": field, **({} if horizon is None else {"horizon": horizon})})
    adam = torch.optim.Adam(field.parameters(), lr=1e-3)
    alpha = 0.1 if config == "paper" else 0.0
    opt = adam if horizon is None else CoordinateDescentStepper(adam, model, alpha=alpha)
    rng, start = np.random.default_rng(seed), time.process_time()
    for _ in range(iters):
        x = torch.from_numpy(toy_sample("8gaussians", 100, rng)).float()
        opt.zero_grad()
        _nll(solve, field, x).backward()
        opt.step()
    cpu = time.process_time() - start
    model.eval()  # a budgeted horizon scores with its reference: the scoring solve
    with torch.no_grad():
        nll = float(torch.stack([_nll(solve, field, c) for c in test.split(1000)]).mean())
    return {
        "test_nll": nll,
        "T": None if horizon is None else horizon.T.item(),
        "cpu_seconds": cpu,
    }


def _child(checkout: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.defaults_ffjord", *args]
    return subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)


def run_ffjord(
    checkout: Path, config: str, T0: float, iters: int, seed: int, test: np.ndarray, work: Path
) -> dict[str, Any]:
    """Upstream's train_toy.py (patched, or not for ``plain``) in a fresh process, then scored."""
    work.mkdir(parents=True, exist_ok=True)
    save, test_file = work / f"ffjord-{config}-T{T0:g}", work / "test.npy"
    np.save(test_file, test)
    flags = ["--niters", str(iters), "--val_freq", str(iters), "--viz_freq", str(10 * iters),
             "--test_batch_size", "100"]  # fmt: skip
    start = time.time()
    run = ["--config", config, "--T0", str(T0), "--save", str(save), "--seed", str(seed)]
    done = _child(checkout, ["train", "--checkout", str(checkout), *run, "--", *flags])
    if done.returncode != 0:
        raise RuntimeError(f"train_toy.py ({config}, T0={T0}) failed:\n{done.stderr[-3000:]}")
    seconds = time.time() - start
    scored = _child(
        checkout,
        ["score", "--checkout", str(checkout), "--save", str(save), "--test", str(test_file)],
    )
    if scored.returncode != 0:
        raise RuntimeError(f"scoring {save} failed:\n{scored.stderr[-3000:]}")
    return {**json.loads(scored.stdout.strip().splitlines()[-1]), "wall_seconds": seconds}


def _cost(row: dict[str, Any]) -> float:
    return row.get("cpu_seconds", row.get("wall_seconds", float("nan")))


def _line(codebase: str, T0: float, got: dict[str, dict[str, Any]]) -> str:
    cells = " | ".join(f"{got[c]['test_nll']:.4f}" if c in got else "n/a" for c in CONFIGS)
    diff = got["defaults"]["test_nll"] - got["plain"]["test_nll"]
    b2 = "n/a | n/a"
    if "budget2" in got:
        worse = got["budget2"]["test_nll"] - got["plain"]["test_nll"]
        b2 = f"{worse:+.4f} | {_cost(got['budget2']) / _cost(got['plain']):.2f}"
    return f"| {codebase} | {T0:g} | {cells} | {diff:+.4f} | {got['defaults']['T']:.3f} | {b2} |"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table of every codebase and T0, and its caption."""
    head = " | ".join(f"{c} NLL" for c in CONFIGS)
    lines = [
        f"| codebase | T0 | {head} | defaults - plain | T (defaults) | budget2 - plain | "
        "budget2 cost (x plain) |",
        "|---|---|" + "---|" * (len(CONFIGS) + 4),
    ]
    for key in sorted({(r["codebase"], r["T0"]) for r in rows}):
        got = {r["config"]: r for r in rows if (r["codebase"], r["T0"]) == key}
        lines.append(_line(*key, got))
    return "\n".join(lines) + (
        f"\n\n8gaussians, {meta['iters']} iterations of batch 100 (upstream FFJORD: "
        f"{meta['ffjord_iters']}), seed {meta['seed']}, 1 thread; test NLL (nats) of 5,000 "
        "held-out points by dopri5 at 1e-5. `defaults - plain` < 0 means adopting at the defaults "
        "did better. `plain`: the unmodified solve at T0; `defaults`: the horizon and stepper at "
        "their defaults (T learned, alpha 0, no budget); `paper`: TO-FLOW's settings (alpha "
        "0.1); `budget2`: 2 rk4 steps, T fixed, guard on. Cost is CPU seconds of training "
        "(upstream FFJORD: wall seconds of the training process, its start and upstream's own "
        "final validation included; scoring excluded), including the guard's reference solves. "
        "`--render` rewrites this table from the JSON."
    )


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    test = toy_sample("8gaussians", 5000, 12345)
    rows = []
    for codebase in args.codebases:
        if codebase == "ffjord" and args.ffjord is None:
            print("ffjord: skipped (no --ffjord checkout)", flush=True)
            continue
        for T0 in args.T0:
            for config in CONFIGS:
                if codebase == "zuko" and config == "budget2":
                    continue  # a budget solves with torchdiffeq
                if codebase == "ffjord":
                    row = run_ffjord(args.ffjord.resolve(), config, T0, args.ffjord_iters,
                                     args.seed, test, args.runs)  # fmt: skip
                else:
                    points = torch.from_numpy(test).float()
                    row = run_own(codebase, config, T0, args.iters, args.seed, points)
                rows.append({"codebase": codebase, "T0": T0, "config": config, **row})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ffjord", type=Path, default=None, help="an rtqichen/ffjord checkout (else skipped)"
    )
    p.add_argument("--T0", type=float, nargs="+", default=[0.5, 1.0, 10.0])
    p.add_argument("--codebases", nargs="+", default=["torchdiffeq", "zuko", "ffjord"])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--ffjord-iters", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="defaults")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "defaults", help="upstream's runs")
    p.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads((args.out / f"{args.name}.json").read_text())
        meta = saved.get("meta", saved)  # results before 0.4 kept the settings under "meta"
        record = {"command": meta["command"], "machine": saved.get("machine", meta)}
        write_markdown(args.out, args.name, markdown(saved["rows"], meta), record)
        return 0
    torch.set_num_threads(1)
    rows = _rows(args)
    meta = {"iters": args.iters, "ffjord_iters": args.ffjord_iters, "seed": args.seed}
    write(
        args.out,
        args.name,
        {**meta, "rows": rows},
        markdown(rows, meta),
        command("defaults", argv),
    )
    print((args.out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
