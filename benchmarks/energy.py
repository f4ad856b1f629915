"""CNFs trained from an energy (reverse KL, no samples seen): dopri5 training against guarded budgets.

Each configuration trains the same CNF (one block, a concat-squash MLP field of 3 x 64 tanh units, exact
trace, T fixed at 1, N(0, I) base) from the same initial weights and the same base draws, for the same CPU
budget on one thread, by minimising the reverse KL estimate ``mean(log q(x) + U(x))`` over ``x``
transported from base samples (:mod:`benchmarks.harness.energies` for the targets). The weights are kept
at fixed CPU marks, and after training every checkpoint is scored the same way, with a dopri5 1e-5 solve
(the model in ``eval()``): 2,000 samples and their log q from that one solve give the effective sample
size of the importance weights exp(-U - log q) (% of N), the reverse KL (``mean(log q + U)``, plus log Z
where known) and log Z's importance-sampling estimate; a forward solve of 2,000 reference samples gives
their NLL; the energies of the model's samples and of 2,000 reference samples give a 1-Wasserstein
distance. For a budgeted model the same 2,000 base draws are also solved on its budget
("ESS on the budget"): what its own log q claims, a figure that the accurate solve corrects.

Configurations (``CONFIGS``): ``dopri5`` (odeint_adjoint, dopri5 1e-5: FFJORD's, E-NF's test and bgflow's
relative setting), ``b2``/``b4``/``b6`` (N rk4 steps, T fixed, the stepper's guard at its default
tolerance, 0.025 nats per dimension), ``b2-strict`` (the guard held to 0.05 nats on log q in all
(``tol = 0.05 / dim``)), ``rnode-b2`` (RNODE's kinetic and Jacobian penalties, 0.01 each, on 2 steps) and
``toflow-b2`` (T learned with the paper's settings on 2 steps)::

    python benchmarks/energy.py train --target manywell --cpu 300      # runs/energy/manywell-s0, all configs
    python benchmarks/energy.py train --target dw4 --cpu 150
    python benchmarks/energy.py report --name energy_short             # benchmarks/results/energy_short.{json,md}
    python benchmarks/energy.py train --target gmm40 --configs dopri5 b2 b4 toflow-b2 --cpu 200 --checkpoints 4 --runs runs/energy-gmm
    python benchmarks/energy.py report --runs runs/energy-gmm --name energy_gmm40   # and docs/img/energy_gmm40_gmm40-s0.png

docs/energy.md gives the long runs' commands (900 CPU seconds, three configurations a target).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.cnf import (  # noqa: E402
    build_toy_model,
    network_parameters,
    nfe,
    standard_normal_logprob,
)
from benchmarks.harness.energies import TARGETS, effective_sample_size, energy_w1  # noqa: E402
from torch_tempopt import BudgetGuard, CoordinateDescentStepper  # noqa: E402

#: name -> settings: budget (rk4 steps; None: dopri5), kinetic/jacobian (RNODE), learn (TO-FLOW), tol (per sample)
CONFIGS: dict[str, dict[str, Any]] = {
    "dopri5": {"budget": None},
    "b2": {"budget": 2},
    "b4": {"budget": 4},
    "b6": {"budget": 6},
    "b2-strict": {"budget": 2, "tol": 0.05},
    "rnode-b2": {"budget": 2, "kinetic": 0.01, "jacobian": 0.01},
    "toflow-b2": {"budget": 2, "learn": True},
}
LABELS = {"dopri5": "dopri5 1e-5", "b2": "2 rk4 steps, guard", "b4": "4 rk4 steps, guard",
          "b6": "6 rk4 steps, guard", "b2-strict": "2 rk4 steps, guard at 0.05 nats",
          "rnode-b2": "RNODE penalties, 2 steps, guard", "toflow-b2": "TO-FLOW (learned T), 2 steps, guard"}
SCORE = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}


def build(config: str, dim: int, seed: int) -> tuple[torch.nn.Module, CoordinateDescentStepper]:
    """The model and its stepper (Adam 1e-3 on the weights), initialised from ``seed`` alone."""
    c = CONFIGS[config]
    torch.manual_seed(seed)
    model = build_toy_model(hidden=(64, 64, 64), dim=dim, T0=1.0, time_mode="learn" if c.get("learn") else "fixed",
                            budget=c["budget"], adjoint=c["budget"] is None, solver_kwargs=SCORE, count=True,
                            kinetic=c.get("kinetic", 0.0), jacobian=c.get("jacobian", 0.0))
    guard: BudgetGuard | bool = False
    if c["budget"] is not None:
        guard = BudgetGuard(model, **({"tol": c["tol"] / dim} if "tol" in c else {}))
    kwargs = {"lr": 1e-2, "alpha": 0.1} if c.get("learn") else {}
    return model, CoordinateDescentStepper(torch.optim.Adam(network_parameters(model), lr=1e-3), model,
                                           guard=guard, **kwargs)


def reverse_kl(model: torch.nn.Module, target: Any, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean(log q(x) + U(x))`` over x transported from the base draws ``z``, and the penalties' sum."""
    x, logq, regs = model(z, standard_normal_logprob(z), reverse=True)
    return (logq + target.energy(x)).mean(), sum((r.mean() for r in regs.values()), z.new_zeros(()))


def train(args: argparse.Namespace) -> None:
    target = TARGETS[args.target]()
    folder = args.runs / f"{args.target}-s{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    marks = [args.cpu * k / args.checkpoints for k in range(1, args.checkpoints + 1)]
    torch.set_num_threads(1)
    for config in args.configs:
        if (folder / f"{config}.pt").is_file():
            print(f"{config}: done already in {folder}", flush=True)
            continue
        model, stepper = build(config, target.dim, args.seed)
        draws = torch.Generator().manual_seed(args.seed + 1)  # the same base draws for every configuration
        ckpts, log, cpu, it, todo = [], [], 0.0, 0, list(marks)
        while todo:
            start = time.process_time()
            z = torch.randn(args.batch, target.dim, generator=draws)
            kl, reg = reverse_kl(model, target, z)
            stepper.zero_grad()
            (kl + reg).backward()
            torch.nn.utils.clip_grad_norm_(network_parameters(model), args.clip)
            stepper.step()
            cpu += time.process_time() - start
            it += 1
            counts = nfe(model)
            log.append({"iteration": it, "cpu": cpu, "loss": kl.item(), "nfe": counts["forward"] + counts["backward"]})
            while todo and cpu >= todo[0]:
                h = model.chain[0].horizon
                ckpts.append({"mark": todo.pop(0), "cpu": cpu, "iteration": it, "nfe": log[-1]["nfe"],
                              "budget": None if h.budget is None else h.budget.steps, "T": h.T.item(), "state": copy.deepcopy(model.state_dict())})
            if it % 50 == 0:
                print(f"{config} it {it} cpu {cpu:.0f} loss {kl.item():.3f} NFE {log[-1]['nfe']}", flush=True)
        guard = stepper.guard.stats if stepper.guard else None
        torch.save({"config": config, "target": args.target, "seed": args.seed, "cpu_budget": args.cpu,
                    "batch": args.batch, "checkpoints": ckpts, "log": log,
                    "guard": None if guard is None else {k: guard[k] for k in ("checks", "nfe", "seconds", "events")}},
                   folder / f"{config}.pt")
        print(f"{config}: {it} iterations, {log[-1]['nfe']} NFE in {cpu:.0f} CPU s", flush=True)


def reference(name: str, n: int, seed: int, runs: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """``n`` reference samples of a target and how they were drawn, kept in ``runs`` (MCMC takes minutes)."""
    path = runs / f"reference-{name}-n{n}-s{seed}.pt"
    if not path.is_file():
        target = TARGETS[name]()
        samples = target.reference(n, seed=seed)
        info = getattr(target, "diagnostics", {"exact": True})
        runs.mkdir(parents=True, exist_ok=True)
        torch.save({"samples": samples, "diagnostics": info}, path)
    saved = torch.load(path, weights_only=False)
    return saved["samples"], saved["diagnostics"]


@torch.no_grad()
def score(model: torch.nn.Module, target: Any, ref: torch.Tensor, seed: int) -> dict[str, Any]:
    """The accurate solve's metrics of one model against reference samples ``ref`` (see the module's docstring)."""
    model.eval()
    n = ref.shape[0]
    dtype = next(model.parameters()).dtype
    z = torch.randn(n, target.dim, generator=torch.Generator().manual_seed(10_000 + seed), dtype=dtype)
    nfe(model, reset=True)
    x, logq, _ = model(z, standard_normal_logprob(z), reverse=True)
    u = target.energy(x)
    log_w = -u - logq
    ref = ref.to(z.dtype)
    zr, delta, _ = model(ref, ref.new_zeros(n))
    nll_ref = -(standard_normal_logprob(zr) - delta.reshape(-1))
    finite = torch.isfinite(log_w)
    log_z = float(torch.logsumexp(log_w[finite], 0) - math.log(n)) if finite.any() else -math.inf
    out = {"ess": 100 * effective_sample_size(log_w), "reverse_kl": float((logq + u)[finite].mean()),
           "log_Z_estimate": log_z, "nll_reference": float(nll_ref.mean()),
           "energy_w1": energy_w1(torch.where(torch.isfinite(u), u, u.new_tensor(1e30)), target.energy(ref)),
           "nonfinite": int((~finite).sum()), "score_nfe": nfe(model, reset=True)["forward"]}
    if target.log_Z is not None:
        out.update(reverse_kl=out["reverse_kl"] + target.log_Z, log_Z_error=log_z - target.log_Z)
    h = model.chain[0].horizon
    if h.budget is not None:  # what the budget's own log q claims about its own samples
        with h.budgeted():
            xb, logqb, _ = model(z, standard_normal_logprob(z), reverse=True)
        out["ess_on_budget"] = 100 * effective_sample_size(-target.energy(xb) - logqb)
    model.train()
    return out


def score_runs(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    for path in sorted(args.runs.glob("*-s*/*.pt")):
        run = torch.load(path, weights_only=False)
        if all("score" in c for c in run["checkpoints"]):
            continue
        target = TARGETS[run["target"]]()
        ref, _ = reference(run["target"], args.n, run["seed"], args.runs)
        for c in run["checkpoints"]:
            if "score" not in c:
                model, _ = build(run["config"], target.dim, run["seed"])
                model.load_state_dict(c["state"])
                c["score"] = score(model, target, ref, run["seed"])
                print(f"{path.parent.name}/{run['config']} @ {c['mark']:.0f} s: "
                      + ", ".join(f"{k} {v:.4g}" for k, v in c["score"].items()), flush=True)
        torch.save(run, path)


def _reach(run: dict[str, Any], goal: float) -> dict[str, Any] | None:
    return next((c for c in run["checkpoints"] if c["score"]["ess"] >= goal), None)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(args: argparse.Namespace) -> dict[str, Any]:
    score_runs(args)
    rows, lines = [], []
    for folder in sorted(p for p in args.runs.glob("*-s*") if p.is_dir()):
        runs = {r["config"]: r for r in (torch.load(p, weights_only=False) for p in folder.glob("*.pt"))}
        base = runs.get("dopri5")
        any_run = next(iter(runs.values()))
        _, info = reference(any_run["target"], args.n, any_run["seed"], args.runs)
        how = "exact samples" if info.get("exact") else (
            f"parallel-tempering Metropolis, {info['chains']} chains x {info['steps']} steps ({info['burn_in']} burn-in, "
            f"thinned by {info['thin']}), acceptance {info['acceptance']:.2f}, swap rate {info['swap_rate']:.2f}, split "
            "R-hat " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in info.items() if k.startswith("rhat_")))
        lines += [f"\n### {folder.name}: {any_run['cpu_budget']:g} CPU seconds per configuration, "
                  f"{len(any_run['checkpoints'])} checkpoints\n", f"Reference: {how}.\n", "| configuration | iterations | training NFE | guard NFE | budget (final) | "
                  "ESS % (dopri5) | ESS % on its budget | reverse KL | log Z error | NLL of reference | energy W1 | "
                  "CPU / NFE to dopri5's ESS - 2 |", "|" + " --- |" * 12]
        for name in [c for c in CONFIGS if c in runs]:
            run = runs[name]
            last = run["checkpoints"][-1]
            s = last["score"]
            hit = None if base is None else _reach(run, base["checkpoints"][-1]["score"]["ess"] - 2)
            b_last = None if base is None else base["checkpoints"][-1]
            ratio = "not reached" if hit is None else \
                f"{hit['cpu'] / b_last['cpu']:.2f}x / {hit['nfe'] / b_last['nfe']:.2f}x"
            row = {"run": folder.name, "config": name, "iterations": last["iteration"], "nfe": last["nfe"],
                   "guard": run["guard"], "budget": last["budget"], "T": last["T"], **s,
                   "reach_cpu_ratio": None if hit is None else hit["cpu"] / b_last["cpu"],
                   "reach_nfe_ratio": None if hit is None else hit["nfe"] / b_last["nfe"],
                   "curve": [{k: c[k] for k in ("mark", "cpu", "iteration", "nfe", "budget", "T")} | c["score"]
                             for c in run["checkpoints"]]}
            rows.append(row)
            g = run["guard"]
            lines.append(f"| {LABELS[name]} | {last['iteration']} | {last['nfe']} | {'-' if g is None else g['nfe']} | "
                         f"{last['budget'] or '-'} | {s['ess']:.2f} | {_num(s.get('ess_on_budget'), 2)} | "
                         f"{s['reverse_kl']:.3f} | {_num(s.get('log_Z_error'), 3)} | {s['nll_reference']:.3f} "
                         f"| {s['energy_w1']:.3f} | {ratio} |")
    command = "python benchmarks/energy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = ("Every checkpoint scored by dopri5 1e-5 (2,000 samples; ESS of exp(-U - log q) in % of N). "
            "Training NFE include the guard's. Reverse KL: mean(log q + U) over the samples, plus log Z where it is "
            "known (then it is KL(q || p) itself, >= 0). The last column: the first checkpoint whose ESS is within 2 points "
            "of the dopri5-trained model's final ESS, as a fraction of that model's CPU time and NFE.\n"
            + "\n".join(lines) + f"\n\nCommand: `{command}`. Machine: {platform.machine()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, 1 thread.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"rows": rows, "command": command}, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(text)
    if args.figures is not None:
        _figure(rows, args.figures / f"{args.name}.png")
        for folder in sorted(p for p in args.runs.glob("*-s*") if p.is_dir()):
            runs = [torch.load(p, weights_only=False) for p in sorted(folder.glob("*.pt"))]
            if runs and TARGETS[runs[0]["target"]]().dim == 2:
                _samples_figure(runs, args.n, args.runs, args.figures / f"{args.name}_{folder.name}.png")
    print(text)
    return {"rows": rows}


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({r["run"] for r in rows})
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for r in (r for r in rows if r["run"] == run):
            ax.plot([c["cpu"] for c in r["curve"]], [c["ess"] for c in r["curve"]], "o-", label=LABELS[r["config"]])
        ax.set(title=run, xlabel="training CPU seconds", ylabel="ESS % (dopri5 1e-5)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def _samples_figure(runs: list[dict[str, Any]], n: int, folder: Path, path: Path) -> None:
    """A 2-D target's reference samples beside each configuration's last model's (dopri5 1e-5, the same draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = TARGETS[runs[0]["target"]]()
    ref, _ = reference(runs[0]["target"], n, runs[0]["seed"], folder)
    panels = [("reference (exact)", ref)]
    for run in sorted(runs, key=lambda r: list(CONFIGS).index(r["config"])):
        model, _ = build(run["config"], target.dim, run["seed"])
        model.load_state_dict(run["checkpoints"][-1]["state"])
        model.eval()
        z = torch.randn(n, target.dim, generator=torch.Generator().manual_seed(10_000 + run["seed"]))
        x = model(z, standard_normal_logprob(z), reverse=True)[0]
        ess = run["checkpoints"][-1].get("score", {}).get("ess")
        panels.append((LABELS[run["config"]] + ("" if ess is None else f", ESS {ess:.1f} %"), x))
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.1), squeeze=False)
    lim = float(ref.abs().max()) * 1.1
    for ax, (title, x) in zip(axes[0], panels):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        if hasattr(target, "means"):
            ax.scatter(target.means[:, 0], target.means[:, 1], s=6, marker="x", color="k", lw=0.6)
        ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
        ax.title.set_fontsize(7)
        ax.tick_params(labelsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--target", choices=sorted(TARGETS), required=True)
    tr.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    tr.add_argument("--cpu", type=float, default=600.0, help="CPU seconds per configuration")
    tr.add_argument("--checkpoints", type=int, default=6, help="checkpoints at equal CPU marks")
    tr.add_argument("--batch", type=int, default=256)
    tr.add_argument("--clip", type=float, default=100.0, help="the weights' gradient-norm clip")
    tr.add_argument("--seed", type=int, default=0)
    rep = sub.add_parser("report")
    rep.add_argument("--n", type=int, default=2000, help="samples per score")
    rep.add_argument("--name", default="energy")
    rep.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    rep.add_argument("--figures", type=Path, default=ROOT / "docs" / "img")
    for s in (tr, rep):
        s.add_argument("--runs", type=Path, default=ROOT / "runs" / "energy")
    args = parser.parse_args(argv)
    return train(args) if args.command == "train" else report(args)


if __name__ == "__main__":
    main()
