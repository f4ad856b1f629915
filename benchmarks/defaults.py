"""Do the library's defaults ever make a model worse than not adopting? Three codebases, T0 in {0.5, 1, 10}.

Each codebase trains the same 2-D CNF on 8gaussians (same seed, batch order and iterations) four ways:

* ``plain``: the unmodified code (its own ``odeint`` call and Adam);
* ``defaults``: the README's adoption lines at the library's defaults (``LearnableHorizon(T0)`` and
  ``CoordinateDescentStepper(Adam, model)``: T learned from the loss alone, alpha = 0);
* ``paper``: the same with TO-FLOW's regulariser, ``alpha=0.1`` (the paper's settings; 0.2's default);
* ``budget2``: ``LearnableHorizon(T0, budget=2)`` at its defaults (2 rk4 steps, T fixed, the guard on).

and scores every final model the same way: the NLL of 5,000 held-out points with dopri5 at 1e-5 (``eval()``).
The codebases: ``torchdiffeq`` (a CNF of one's own on ``odeint_adjoint``), ``zuko`` (a field on ``zuko.nn.MLP``
solved by ``zuko.utils.odeint``, through ``torch_tempopt.contrib.zuko_solver`` once adopted; no budget: a budget
solves with torchdiffeq) and ``ffjord`` (upstream's ``train_toy.py`` run unchanged, ``--ffjord PATH``, through
``torch_tempopt.patches.ffjord``; ``plain`` runs the script without the patch). One thread, one run at a time.

    python benchmarks/defaults.py --ffjord .upstream/ffjord        # benchmarks/results/defaults.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.data import toy_sample  # noqa: E402
from torch_tempopt import CoordinateDescentStepper, LearnableHorizon  # noqa: E402

CONFIGS = ("plain", "defaults", "paper", "budget2")
TOL = dict(rtol=1e-5, atol=1e-5)


class Field(nn.Module):
    """(dz/dt, dlogp/dt) of a time-conditioned MLP with the exact trace (2-D)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        z = state[0]
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1)], 1))
            div = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2))
        return dz, -div[:, None]


def _net(codebase: str) -> nn.Module:
    if codebase == "zuko":
        import zuko

        return zuko.nn.MLP(3, 2, hidden_features=(64, 64), activation=nn.Tanh)
    return nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))


def _solve(codebase: str, config: str, T0: float) -> tuple[Callable[..., Any], LearnableHorizon | None]:
    """The model's solve ``solve(field, state) -> (z(T), dlogp)``, and its horizon once adopted."""
    from torchdiffeq import odeint_adjoint

    if codebase == "zuko":
        import zuko

        from torch_tempopt.contrib import zuko_solver

        if config == "plain":
            def plain(field: nn.Module, state: tuple) -> tuple:  # zuko calls f(t, *state) for a tuple state
                f = lambda t, z, d: field(t, (z, d))  # noqa: E731
                return tuple(zuko.utils.odeint(f, state, 0.0, T0, phi=tuple(field.parameters()), **TOL))
            return plain, None
        horizon = LearnableHorizon(T0=T0)
        return (lambda field, state: tuple(s[-1] for s in horizon(field, state, solver=zuko_solver, **TOL))), horizon
    if config == "plain":
        return (lambda field, state: tuple(s[-1] for s in odeint_adjoint(
            field, state, torch.tensor([0.0, T0]), **TOL))), None
    horizon = LearnableHorizon(T0=T0, budget=2 if config == "budget2" else None)
    return (lambda field, state: tuple(s[-1] for s in horizon(field, state, solver=odeint_adjoint, **TOL))), horizon


def _nll(solve: Callable[..., Any], field: nn.Module, x: torch.Tensor) -> torch.Tensor:
    z, dlogp = solve(field, (x, x.new_zeros(x.shape[0], 1)))
    logpz = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi)
    return -(logpz - dlogp[:, 0]).mean()


def run_own(codebase: str, config: str, T0: float, iters: int, seed: int, test: torch.Tensor) -> dict[str, Any]:
    """Trains and scores one configuration of an in-process codebase (torchdiffeq or zuko)."""
    torch.manual_seed(seed)
    field = Field(_net(codebase))
    solve, horizon = _solve(codebase, config, T0)
    model = nn.ModuleDict({"field": field, **({} if horizon is None else {"horizon": horizon})})
    adam = torch.optim.Adam(field.parameters(), lr=1e-3)
    opt = adam if horizon is None else CoordinateDescentStepper(adam, model, alpha=0.1 if config == "paper" else 0.0)
    rng, start = np.random.default_rng(seed), time.process_time()
    for _ in range(iters):
        x = torch.from_numpy(toy_sample("8gaussians", 100, rng)).float()
        opt.zero_grad()
        _nll(solve, field, x).backward()
        opt.step()
    cpu = time.process_time() - start
    model.eval()  # a budgeted horizon scores with its reference, dopri5 at 1e-5
    with torch.no_grad():
        nll = float(torch.stack([_nll(solve, field, c) for c in test.split(1000)]).mean())
    return {"test_nll": nll, "T": None if horizon is None else horizon.T.item(), "cpu_seconds": cpu}


_UPSTREAM = r"""
import json, runpy, sys, types
import numpy, torch
checkout, config, T0, save, seed, argv = sys.argv[1:7]
sys.path[:0] = [checkout, {root!r}]
numpy.random.seed(int(seed)); torch.manual_seed(int(seed))
args = ["--data", "8gaussians", "--time_length", T0, "--save", save, *json.loads(argv)]
if config == "plain":  # upstream's script as it is; six is not installed here, so a stub (train_misc imports it)
    six = sys.modules.setdefault("six", types.ModuleType("six"))
    six.iteritems = lambda d, **kw: iter(d.items(**kw))
    import diagnostics.viz_toy as viz  # the final 101-frame trajectory plot is skipped, as the patched runs skip it
    viz.save_trajectory = viz.trajectory_to_video = lambda *a, **k: None
    sys.argv = ["train_toy.py", *args]
    runpy.run_path(checkout + "/train_toy.py", run_name="__main__")
else:
    from torch_tempopt.patches import ffjord as ffjord_patch
    flags = {{"alpha": 0.1}} if config == "paper" else {{"budget": 2}} if config == "budget2" else {{}}
    with ffjord_patch.patched(checkout, script="train_toy.py", skip_trajectory=True, **flags) as patch:
        patch.run(args)
"""

_SCORE = r"""
import json, sys
import numpy, torch
checkout, save, test = sys.argv[1:4]
sys.path[:0] = [checkout, {root!r}]
from torch_tempopt.patches import ffjord as ffjord_patch
with ffjord_patch.patched(checkout) as patch:
    import train_misc
    from lib.layers.odefunc import ODEfunc  # noqa: F401
    ckpt = torch.load(save + "/checkpt.pth", weights_only=False)
    args = ckpt["args"]
    model = train_misc.build_model_tabular(args, 2, [])
    train_misc.set_cnf_options(args, model)
    model.load_state_dict({{k: v for k, v in ckpt["state_dict"].items() if ".tempopt_" not in k}})  # scored adaptively
    model.eval()
    x = torch.from_numpy(numpy.load(test)).float()
    with torch.no_grad():
        total = 0.0
        for c in x.split(1000):
            z, delta = model(c, torch.zeros(c.shape[0], 1))
            logpz = -0.5 * z.pow(2).sum(1, keepdim=True) - numpy.log(2 * numpy.pi)
            total += float((logpz - delta).sum())
    print(json.dumps({{"test_nll": -total / x.shape[0], "T": patch.horizons[0].T.item()}}))
"""


def run_ffjord(checkout: Path, config: str, T0: float, iters: int, seed: int, test: np.ndarray,
               work: Path) -> dict[str, Any]:
    """Upstream's train_toy.py (patched, or not for ``plain``) in a fresh process, scored by dopri5 1e-5."""
    work.mkdir(parents=True, exist_ok=True)
    save, test_file = work / f"ffjord-{config}-T{T0:g}", work / "test.npy"
    np.save(test_file, test)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    argv = ["--niters", str(iters), "--val_freq", str(iters), "--viz_freq", str(10 * iters), "--test_batch_size", "100"]
    start = time.time()
    done = subprocess.run([sys.executable, "-c", _UPSTREAM.format(root=str(ROOT)), str(checkout), config, str(T0),
                           str(save), str(seed), json.dumps(argv)], cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"train_toy.py ({config}, T0={T0}) failed:\n{done.stderr[-3000:]}")
    seconds = time.time() - start
    scored = subprocess.run([sys.executable, "-c", _SCORE.format(root=str(ROOT)), str(checkout), str(save),
                             str(test_file)], cwd=checkout, env=env, capture_output=True, text=True)
    if scored.returncode != 0:
        raise RuntimeError(f"scoring {save} failed:\n{scored.stderr[-3000:]}")
    return {**json.loads(scored.stdout.strip().splitlines()[-1]), "wall_seconds": seconds}


def _cost(row: dict[str, Any]) -> float:
    return row.get("cpu_seconds", row.get("wall_seconds", float("nan")))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = " | ".join(f"{c} NLL" for c in CONFIGS)
    lines = [f"| codebase | T0 | {head} | defaults - plain | T (defaults) | budget2 - plain | budget2 cost (x plain) |",
             "|---|---|" + "---|" * (len(CONFIGS) + 4)]
    for key in sorted({(r["codebase"], r["T0"]) for r in rows}, key=lambda k: (k[0], k[1])):
        got = {r["config"]: r for r in rows if (r["codebase"], r["T0"]) == key}
        cells = [f"{got[c]['test_nll']:.4f}" if c in got else "n/a" for c in CONFIGS]
        diff = got["defaults"]["test_nll"] - got["plain"]["test_nll"]
        if "budget2" in got:
            b2 = f"{got['budget2']['test_nll'] - got['plain']['test_nll']:+.4f} | {_cost(got['budget2']) / _cost(got['plain']):.2f}"
        else:
            b2 = "n/a | n/a"
        lines.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(cells) + f" | {diff:+.4f} | {got['defaults']['T']:.3f} | {b2} |")
    return ("\n".join(lines) + f"\n\n8gaussians, {meta['iters']} iterations of batch 100 (upstream FFJORD: "
            f"{meta['ffjord_iters']}), seed {meta['seed']}, 1 thread; test NLL (nats) of 5,000 held-out points by "
            "dopri5 at 1e-5. `defaults - plain` < 0 means adopting at the defaults did better. `plain`: the "
            "unmodified solve at T0; `defaults`: the horizon and stepper at their defaults (T learned, alpha 0, "
            "no budget); `paper`: TO-FLOW's settings (alpha 0.1); `budget2`: 2 rk4 steps, T fixed, guard on. Cost "
            "is CPU seconds of training (upstream FFJORD: wall seconds of the training process, its start and upstream's own final validation included; scoring excluded), including "
            "the guard's reference solves.\n\n"
            f"Command: `{meta['command']}` (`--render` rewrites this table from the JSON)\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ffjord", type=Path, default=None, help="an rtqichen/ffjord checkout (skipped without one)")
    p.add_argument("--T0", type=float, nargs="+", default=[0.5, 1.0, 10.0])
    p.add_argument("--codebases", nargs="+", default=["torchdiffeq", "zuko", "ffjord"])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--ffjord-iters", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="defaults")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON, run nothing")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads((args.out / f"{args.name}.json").read_text())
        (args.out / f"{args.name}.md").write_text(markdown(saved["rows"], saved["meta"]))
        return 0
    torch.set_num_threads(1)
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
                    row = run_ffjord(args.ffjord.resolve(), config, T0, args.ffjord_iters, args.seed, test,
                                     args.out / f"{args.name}_runs")
                else:
                    row = run_own(codebase, config, T0, args.iters, args.seed, torch.from_numpy(test).float())
                rows.append({"codebase": codebase, "T0": T0, "config": config, **row})
                print(json.dumps(rows[-1]), flush=True)
    meta = {"iters": args.iters, "ffjord_iters": args.ffjord_iters, "seed": args.seed, "torch": torch.__version__,
            "python": platform.python_version(), "command": "python benchmarks/defaults.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
