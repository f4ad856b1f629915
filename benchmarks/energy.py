"""CNFs trained from an energy (reverse KL, no samples): dopri5 training against guarded budgets.

Each configuration trains the same CNF (one block, a concat-squash MLP field of 3 x 64 tanh units,
exact trace, T fixed at 1, N(0, I) base) from the same initial weights and the same base draws,
for the same CPU seconds on one thread, by minimising the reverse KL estimate
``mean(log q(x) + U(x))`` over ``x`` transported from base samples
(:mod:`benchmarks.harness.energies` for the targets). The weights are kept at fixed CPU marks, and
after training every checkpoint is scored the same way, by
:func:`benchmarks.scoring.energy_metrics` (the scoring solve, dopri5 1e-5, the model in
``eval()``): five independent sets of 2,000 samples and their log q, pooled, give the effective
sample size of the importance weights exp(-U - log q) (% of the 10,000; one set's ESS moves by
several times between sets on DW-4, so each set's own is kept too), the reverse KL
(``mean(log q + U)``, plus log Z where known) and log Z's importance-sampling estimate; a forward
solve of 2,000 reference samples gives their NLL; the energies of the first set and of the
reference samples give a 1-Wasserstein distance. For a budgeted model the same base draws are also
solved on its budget ("ESS on the budget"): what its own log q claims, a figure that the accurate
solve corrects.

Configurations (``CONFIGS``): ``dopri5`` (odeint_adjoint, dopri5 1e-5: FFJORD's, E-NF's test and
bgflow's relative setting), ``b2``/``b4``/``b6`` (N rk4 steps, T fixed, the stepper's guard at its
default tolerance, 0.025 nats per dimension), ``b2-strict`` (the guard held to 0.05 nats on log q
in all (``tol = 0.05 / dim``)), ``rnode-b2`` (RNODE's kinetic and Jacobian penalties, 0.01 each,
on 2 steps) and ``toflow-b2`` (T learned with the paper's settings on 2 steps)::

    python -m benchmarks.energy train --target manywell --cpu-seconds 300   # runs/energy
    python -m benchmarks.energy train --target dw4 --cpu-seconds 150
    python -m benchmarks.energy report --name energy_short    # results/energy_short.{json,md}

docs/energy.md gives the long runs' commands (900 CPU seconds, three configurations a target).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.cnf import (
    build_toy_model,
    network_parameters,
    nfe,
    standard_normal_logprob,
)
from benchmarks.harness.egnn import ENF_ENV, build_egnn_model
from benchmarks.harness.energies import TARGETS
from benchmarks.scoring import SOLVE, energy_metrics
from benchmarks.writer import FIGURES, RESULTS, ROOT, command, write, write_markdown
from torch_tempopt import BudgetGuard, CoordinateDescentStepper

__all__ = ["CONFIGS", "build", "main", "reference", "report", "reverse_kl", "train"]

#: name -> budget (rk4 steps; None: dopri5), kinetic/jacobian (RNODE), learn (TO-FLOW), tol
CONFIGS: dict[str, dict[str, Any]] = {
    "dopri5": {"budget": None},
    "b2": {"budget": 2},
    "b2-per-dim": {"budget": 2, "spread": None},
    "b2-no-rollback": {"budget": 2, "rollback": False},
    "b4": {"budget": 4},
    "b6": {"budget": 6},
    "b2-strict": {"budget": 2, "tol": 0.05},
    "rnode-b2": {"budget": 2, "kinetic": 0.01, "jacobian": 0.01},
    "toflow-b2": {"budget": 2, "learn": True},
}
LABELS = {
    "dopri5": "dopri5 1e-5",
    "b2": "2 rk4 steps, guard",
    "b2-per-dim": "2 rk4 steps, guard without its spread tolerance",
    "b2-no-rollback": "2 rk4 steps, guard, no rollback",
    "b4": "4 rk4 steps, guard",
    "b6": "6 rk4 steps, guard",
    "b2-strict": "2 rk4 steps, guard at 0.05 nats",
    "rnode-b2": "RNODE penalties, 2 steps, guard",
    "toflow-b2": "TO-FLOW (learned T), 2 steps, guard",
}


def build(
    config: str,
    dim: int,
    seed: int,
    field: str = "mlp",
    enf: Path | None = None,
    lr: float = 1e-3,
) -> tuple[torch.nn.Module, CoordinateDescentStepper]:
    """The model and its stepper (Adam at ``lr`` on the weights), initialised from ``seed`` alone.

    ``field``: ``"mlp"`` (FFJORD's concat-squash MLP) or ``"egnn"`` (E-NF's EGNN dynamics, from
    the checkout ``enf``; DW-4 only). Every configuration calls ``odeint_adjoint`` at dopri5 1e-5,
    as the unmodified host does; a budget trains on its steps instead, until its guard retires it.
    """
    c = CONFIGS[config]
    torch.manual_seed(seed)
    common = dict(
        T0=1.0,
        time_mode="learn" if c.get("learn") else "fixed",
        budget=c["budget"],
        adjoint=True,
        solver_kwargs=SOLVE,
        count=True,
        kinetic=c.get("kinetic", 0.0),
        jacobian=c.get("jacobian", 0.0),
    )
    if field == "egnn":
        if enf is None or dim != 8:
            raise ValueError(f"field='egnn' needs --enf and DW-4 (dim 8), got {enf} and {dim}.")
        model = build_egnn_model(enf, **common)
    else:
        model = build_toy_model(hidden=(64, 64, 64), dim=dim, **common)
    guard: BudgetGuard | bool = False
    if c["budget"] is not None:
        kw = {"tol": c["tol"] / dim} if "tol" in c else {}
        guard = BudgetGuard(model, **kw, **({"spread": None} if "spread" in c else {}))
    kwargs = {"lr": 1e-2, "alpha": 0.1} if c.get("learn") else {}
    adam = torch.optim.Adam(network_parameters(model), lr=lr)
    kwargs["rollback"] = c.get("rollback", True)
    return model, CoordinateDescentStepper(adam, model, guard=guard, **kwargs)


def reverse_kl(
    model: torch.nn.Module, target: Any, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean(log q(x) + U(x))`` over x transported from base draws ``z``; the penalties' sum."""
    x, logq, regs = model(z, standard_normal_logprob(z), reverse=True)
    return (logq + target.energy(x)).mean(), sum(
        (r.mean() for r in regs.values()), z.new_zeros(())
    )


def _train_one(config: str, target: Any, args: argparse.Namespace, path: Path) -> None:
    """One configuration until the last CPU mark into ``path``, saved with what a resumed run needs
    at every mark; a run saved there before goes on from its last mark.
    """
    marks = [args.cpu_seconds * k / args.checkpoints for k in range(1, args.checkpoints + 1)]
    model, stepper = build(config, target.dim, args.seed, args.field, args.enf, args.lr)
    draws = torch.Generator().manual_seed(args.seed + 1)  # the same base draws for every config
    ckpts, log, cpu, it, resumed = [], [], 0.0, 0, []
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        state = saved["resume"]
        model.load_state_dict(state["model"])
        stepper.load_state_dict(state["stepper"])
        draws.set_state(state["draws"])
        torch.set_rng_state(state["rng"])
        for m, (forward, backward) in zip(_counters(model), state["counts"]):
            m.nfe_forward, m.nfe_backward = forward, backward
        ckpts, log, cpu, it = saved["checkpoints"], saved["log"], state["cpu"], state["iteration"]
        resumed = saved.get("resumed", []) + [{"iteration": it, "cpu": cpu}]
        marks = [m for m in marks if m > ckpts[-1]["mark"]]
        print(f"{config}: resumed at iteration {it}, {cpu:.0f} CPU s", flush=True)
    while marks:
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
        total = counts["forward"] + counts["backward"]
        log.append({"iteration": it, "cpu": cpu, "loss": kl.item(), "nfe": total})
        if marks and cpu >= marks[0]:
            h = model.chain[0].horizon
            steps = None if h.budget is None else h.budget.steps
            state = copy.deepcopy(model.state_dict())
            while marks and cpu >= marks[0]:
                point = {"mark": marks.pop(0), "cpu": cpu, "iteration": it, "nfe": total}
                ckpts.append({**point, "budget": steps, "T": h.T.item(), "state": state})
            resume = {"model": state, "stepper": stepper.state_dict(), "draws": draws.get_state()}
            resume.update(rng=torch.get_rng_state(), cpu=cpu, iteration=it)
            resume["counts"] = [(m.nfe_forward, m.nfe_backward) for m in _counters(model)]
            _save(path, config, args, ckpts, log, stepper, resume, resumed)
        if it % 50 == 0:
            print(f"{config} it {it} cpu {cpu:.0f} loss {kl.item():.3f} NFE {total}", flush=True)
    print(f"{config}: {it} iterations, {log[-1]['nfe']} NFE in {cpu:.0f} CPU s", flush=True)


def _counters(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's evaluation counters (``torch_tempopt.count_nfe``), in module order."""
    return [m for m in model.modules() if hasattr(m, "nfe_forward")]


def _save(path: Path, config: str, args: argparse.Namespace, ckpts: list, log: list,
          stepper: CoordinateDescentStepper, resume: dict, resumed: list) -> None:  # fmt: skip
    """A run as far as it went, written whole or not at all."""
    stats = stepper.guard.stats if stepper.guard else None
    guard = (
        None if stats is None else {k: stats[k] for k in ("checks", "nfe", "seconds", "events")}
    )
    run = {"config": config, "target": args.target, "seed": args.seed, "field": args.field,
           "enf": None if args.enf is None else str(args.enf),
           "cpu_seconds": args.cpu_seconds, "batch": args.batch, "lr": args.lr,
           "checkpoints": ckpts, "log": list(log), "guard": copy.deepcopy(guard),
           "resume": resume, "resumed": resumed}  # fmt: skip
    torch.save(run, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def train(args: argparse.Namespace) -> None:
    """Every configuration not yet trained to ``--cpu-seconds`` into
    ``runs/<target>-s<seed>/<config>.pt``, going on from where a saved run stopped.
    """
    target = TARGETS[args.target]()
    folder = (
        args.runs / f"{args.target}{'' if args.field == 'mlp' else '-' + args.field}-s{args.seed}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for config in args.configs:
        path = folder / f"{config}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=False)
            if saved["checkpoints"][-1]["mark"] >= args.cpu_seconds:
                print(f"{config}: done already in {folder}", flush=True)
                continue
            if "resume" not in saved:
                raise SystemExit(f"{path} was saved without a state to resume from; remove it.")
        _train_one(config, target, args, path)


def reference(name: str, n: int, seed: int, runs: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """``n`` reference samples of a target and how they were drawn, kept in ``runs`` (MCMC)."""
    path = runs / f"reference-{name}-n{n}-s{seed}.pt"
    if not path.is_file():
        target = TARGETS[name]()
        samples = target.reference(n, seed=seed)
        info = getattr(target, "diagnostics", {"exact": True})
        runs.mkdir(parents=True, exist_ok=True)
        torch.save({"samples": samples, "diagnostics": info}, path)
    saved = torch.load(path, weights_only=False)
    return saved["samples"], saved["diagnostics"]


def _rebuild(run: dict[str, Any], target: Any) -> tuple[torch.nn.Module, Any]:
    """A run's model as it was built (an EGNN run's checkout from ``TEMPOPT_ENF_DIR``)."""
    field = run.get("field", "mlp")
    enf = run.get("enf") or os.environ.get(ENF_ENV)
    return build(run["config"], target.dim, run["seed"], field, None if enf is None else Path(enf))


def _finished(run: dict[str, Any], path: Path) -> bool:
    """Whether a run reached its CPU seconds (one that has not may be written by its trainer)."""
    seconds = run.get("cpu_seconds", run.get("cpu_budget"))  # 0.3's runs: cpu_budget
    if run["checkpoints"][-1]["mark"] >= seconds:
        return True
    last = run["checkpoints"][-1]["mark"]
    print(f"{path}: left out, trained to {last:g} of {seconds:g} s", flush=True)
    return False


def _sets(checkpoint: dict[str, Any]) -> int | None:
    """The sets of samples a checkpoint was scored on (None: not scored; 0.5's first scores, kept
    without the count, were on one).
    """
    return None if "score" not in checkpoint else checkpoint["score"].get("draws", 1)


def score_runs(runs: Path, n: int, draws: int = 5) -> None:
    """Scores every checkpoint not yet scored on ``draws`` sets of ``n`` samples
    (:func:`benchmarks.scoring.energy_metrics`); a score on another number of sets is redone.
    """
    torch.set_num_threads(1)
    for path in sorted(runs.glob("*-s*/*.pt")):
        run = torch.load(path, weights_only=False)
        if not _finished(run, path):
            continue
        todo = [c for c in run["checkpoints"] if _sets(c) != draws]
        if not todo:
            continue
        target = TARGETS[run["target"]]()
        ref, _ = reference(run["target"], n, run["seed"], runs)
        for c in todo:
            model, _ = _rebuild(run, target)
            model.load_state_dict(c["state"])
            c["score"] = energy_metrics(model, target, ref, run["seed"], draws)
            scores = ", ".join(f"{k} {v:.4g}" for k, v in c["score"].items() if k != "ess_draws")
            print(f"{path.parent.name}/{run['config']} @ {c['mark']:.0f} s: {scores}", flush=True)
        torch.save(run, path)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _how(info: dict[str, Any]) -> str:
    """How the reference samples were drawn."""
    if info.get("exact"):
        return "exact samples"
    rhat = ", ".join(f"{k[5:]} {v:.3f}" for k, v in info.items() if k.startswith("rhat_"))
    return (
        f"parallel-tempering Metropolis, {info['chains']} chains x {info['steps']} steps "
        f"({info['burn_in']} burn-in, thinned by {info['thin']}), acceptance "
        f"{info['acceptance']:.2f}, swap rate {info['swap_rate']:.2f}, split R-hat {rhat}"
    )


def _crossing(run: dict[str, Any], goal: float) -> tuple[float, float] | None:
    """CPU seconds and NFE where the ESS first reaches ``goal``, interpolated linearly between the
    checkpoints around it (from the start, at 0, for the first).
    """
    if goal <= 0:  # dopri5 ended under 2 %: a goal any model meets at the start
        return None
    before = {"cpu": 0.0, "nfe": 0, "score": {"ess": 0.0}}
    for c in run["checkpoints"]:
        if c["score"]["ess"] >= goal:
            a, b = before["score"]["ess"], c["score"]["ess"]
            f = 1.0 if b == a else (goal - a) / (b - a)
            return tuple(
                p + f * (q - p) for p, q in ((before["cpu"], c["cpu"]), (before["nfe"], c["nfe"]))
            )  # type: ignore[return-value]
        before = c
    return None


def _retired_at(run: dict[str, Any]) -> int | None:
    """The training step at which the guard retired the budget, if it did."""
    events = [] if run["guard"] is None else run["guard"]["events"]
    return next((e["step"] for e in events if e["budget"][1] == "retired"), None)


def _row(label: str, name: str, run: dict[str, Any], base: dict[str, Any] | None) -> dict:
    """A configuration's final scores and how soon it reached dopri5's final ESS - 2."""
    last = run["checkpoints"][-1]
    goal = None if base is None else base["checkpoints"][-1]["score"]["ess"] - 2
    hit = None if goal is None else _crossing(run, goal)
    b_last = None if base is None else base["checkpoints"][-1]
    keys = ("mark", "cpu", "iteration", "nfe", "budget", "T")
    retired = _retired_at(run)
    curve = [{k: c[k] for k in keys} | c["score"] for c in run["checkpoints"]]
    for c in curve:
        c["retired"] = retired is not None and retired < c["iteration"]
    return {
        "run": label,
        "config": name,
        "iterations": last["iteration"],
        "nfe": last["nfe"],
        "guard": run["guard"],
        "budget": "retired" if curve[-1]["retired"] else last["budget"],
        "T": last["T"],
        **last["score"],
        "reach_cpu_ratio": None if hit is None else hit[0] / b_last["cpu"],
        "reach_nfe_ratio": None if hit is None else hit[1] / b_last["nfe"],
        "curve": curve,
    }


def _events(guard: dict[str, Any] | None) -> str:
    """The guard's growths and retirement, e.g. ``2>3 @120, 3>retired @410`` (training steps)."""
    if guard is None:
        return "-"
    text = [
        f"{e['budget'][0]}>{e['budget'][1]} @{e['step']}"
        + (f" (back to {e['rolled_back_to']})" if "rolled_back_to" in e else "")
        for e in guard["events"]
    ]
    return ", ".join(text) or "none"


def _line(row: dict[str, Any]) -> str:
    g, ratio = row["guard"], "not reached"
    if row["reach_cpu_ratio"] is not None:
        ratio = f"{row['reach_cpu_ratio']:.2f}x / {row['reach_nfe_ratio']:.2f}x"
    return (
        f"| {LABELS[row['config']]} | {row['iterations']} | {row['nfe']} | "
        f"{'-' if g is None else g['nfe']} | {row['budget'] or '-'} | {_ess(row)} | "
        f"{_num(row.get('ess_on_budget'), 2)} | {row['reverse_kl']:.3f} | "
        f"{_num(row.get('log_Z_error'), 3)} | {row['nll_reference']:.3f} | "
        f"{row['energy_w1']:.3f} | {ratio} | {_events(g)} |"
    )


def _folder(folder: Path, n: int) -> tuple[list[dict[str, Any]], list[str]]:
    """One target and seed: the rows of its configurations and their table."""
    saved = {p: torch.load(p, weights_only=False) for p in sorted(folder.glob("*.pt"))}
    runs = {r["config"]: r for p, r in saved.items() if _finished(r, p)}
    if not runs:
        return [], []
    first = next(iter(runs.values()))
    _, info = reference(first["target"], n, first["seed"], folder.parent)
    seconds = first.get("cpu_seconds", first.get("cpu_budget"))
    label = f"{folder.name}, {seconds:g} s"
    rows = [_row(label, c, runs[c], runs.get("dopri5")) for c in CONFIGS if c in runs]
    lines = [
        f"\n### {folder.name}: {seconds:g} CPU seconds per configuration, "
        f"{len(first['checkpoints'])} checkpoints\n",
        f"Reference: {_how(info)}.\n",
        "| configuration | iterations | training NFE | guard NFE | budget (final) | "
        "ESS % (dopri5) | ESS % on its budget | reverse KL | log Z error | NLL of reference | "
        "energy W1 | CPU / NFE to dopri5's ESS - 2 | guard: budget > budget @ step |",
        "|" + " --- |" * 13,
    ]
    return rows, lines + [_line(r) for r in rows]


def _ess(score: dict[str, Any]) -> str:
    """The pooled ESS and, scored on several sets, the lowest and highest set's own."""
    sets = score.get("ess_draws", [])
    spread = f" ({min(sets):.1f}-{max(sets):.1f})" if len(sets) > 1 else ""
    return f"{score['ess']:.2f}{spread}"


def _summary(rows: list[dict[str, Any]], config: str = "b2") -> str:
    """Per run: the default budget against dopri5 at the end of the race, and the goal."""
    lines = [
        f"\n### {LABELS[config]} against dopri5 1e-5, at the end of each race\n",
        "| run | ESS % dopri5 (one set's range) | ESS % budget (one set's range) "
        "| reverse KL dopri5 / budget | log Z error dopri5 / budget "
        "| CPU to dopri5's ESS - 2 | budget at the end | ESS within 2 points at <= 0.5x CPU |",
        "|" + " --- |" * 8,
    ]
    for run in dict.fromkeys(r["run"] for r in rows):  # in the order of the folders
        got = {r["config"]: r for r in rows if r["run"] == run}
        if "dopri5" not in got or config not in got:
            continue
        d, b = got["dopri5"], got[config]
        err = f"{_num(d.get('log_Z_error'), 3)} / {_num(b.get('log_Z_error'), 3)}"
        reach, open_race = b["reach_cpu_ratio"], d["ess"] < 2
        met = b["ess"] >= d["ess"] - 2 and reach is not None and reach <= 0.5
        when = "not reached" if reach is None else f"{reach:.2f}x"
        verdict = "yes" if met else "no"
        if open_race:  # dopri5 under 2 %: its race had not started to converge
            when, verdict = (
                "-",
                f"open: dopri5 under 2 %, budget {'ahead' if b['ess'] > d['ess'] else 'behind'}",
            )
        kl = f"{d['reverse_kl']:.3f} / {b['reverse_kl']:.3f}"
        lines.append(
            f"| {run} | {_ess(d)} | {_ess(b)} | {kl} | {err} | {when} | {b['budget']} | "
            f"{verdict} |"
        )
    return "\n".join(lines) + "\n"


def report(
    runs: list[Path], n: int, out: Path, name: str, figures: Path | None, cmd: str, draws: int = 5
) -> dict:
    """Scores what is not scored in each folder of ``runs``, then writes the tables and the
    figures (a run is named by its target and seed and its CPU seconds).
    """
    for folder in runs:
        score_runs(folder, n, draws)
    rows, lines = [], []
    folders = [p for r in runs for p in sorted(r.glob("*-s*")) if p.is_dir()]
    for folder in folders:
        more, text = _folder(folder, n)
        rows, lines = rows + more, lines + text
    text = (
        f"Every checkpoint scored by dopri5 1e-5 on {draws} independent sets of {n:,} samples, "
        "pooled (ESS of exp(-U - log q) in % of all the samples; in parentheses, the lowest and "
        "highest ESS of one set alone, in % of its samples). Training NFE include the guard's. "
        "Reverse KL: mean(log q + U) over the samples, plus "
        "log Z where it is known (then it is KL(q || p) itself, >= 0). The CPU / NFE column: "
        "where the ESS first reaches the dopri5-trained model's final ESS - 2, interpolated "
        "between checkpoints, as a fraction of that model's CPU time and NFE. Guard events: "
        "`n>m @s` grew n steps to m at training step s, `(back to r)` rolled the weights back to "
        "step r, `retired`: trained as the call asks from then on. One thread.\n"
        + _summary(rows)
        + "\n".join(lines)
    )
    record = write(out, name, {"rows": rows}, text, cmd)
    write_markdown(out, f"{name}_summary", _summary(rows).strip() + "\n", record)
    if figures is not None:
        _figure(rows, figures / f"{name}.png")
        for folder in folders:
            saved = [torch.load(p, weights_only=False) for p in sorted(folder.glob("*.pt"))]
            if saved and TARGETS[saved[0]["target"]]().dim == 2:
                _samples_figure(saved, n, folder.parent, figures / f"{name}_{folder.name}.png")
    print((out / f"{name}.md").read_text())
    return record


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    """ESS against training CPU seconds (top), the budget's steps (bottom; x: retired) and the
    NFE of the scoring solve that samples each model (dashed: how stiff its field became).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    if not runs:
        return
    cols = min(4, len(runs))
    rows_ = -(-len(runs) // cols)
    fig, axes = plt.subplots(
        2 * rows_, cols, figsize=(4.2 * cols, 5.0 * rows_), squeeze=False,
        gridspec_kw={"height_ratios": [2, 1] * rows_},
    )  # fmt: skip
    for k in range(len(runs), rows_ * cols):  # empty panels
        axes[2 * (k // cols)][k % cols].axis("off")
        axes[2 * (k // cols) + 1][k % cols].axis("off")
    for k, run in enumerate(runs):
        top, bottom = axes[2 * (k // cols)][k % cols], axes[2 * (k // cols) + 1][k % cols]
        cost = bottom.twinx()  # what sampling the field costs dopri5 1e-5: its stiffness
        for r in (r for r in rows if r["run"] == run):
            cpu, ess = [c["cpu"] for c in r["curve"]], [c["ess"] for c in r["curve"]]
            color = f"C{list(CONFIGS).index(r['config'])}"
            top.plot(cpu, ess, "o-", color=color, label=LABELS[r["config"]], ms=3)
            if all(len(c.get("ess_draws", [])) > 1 for c in r["curve"]):
                lo, hi = ([f(c["ess_draws"]) for c in r["curve"]] for f in (min, max))
                top.fill_between(cpu, lo, hi, color=color, alpha=0.15, lw=0)
            cost.plot(cpu, [c["score_nfe"] for c in r["curve"]], "--", color=color, lw=1)
            if r["curve"][0]["budget"] is None:
                continue
            steps = [c["budget"] for c in r["curve"]]
            bottom.plot(cpu, steps, "o-", color=color, ms=3)
            gone = [(c["cpu"], c["budget"]) for c in r["curve"] if c["retired"]]
            if gone:
                bottom.plot(*gone[0], "x", color=color, ms=9, mew=2)
        top.set(title=run, ylabel="ESS % (dopri5 1e-5; band: one set)")
        bottom.set(xlabel="training CPU seconds", ylabel="budget (steps; x: retired)")
        cost.set_ylabel("dopri5 NFE to sample (dashed)", fontsize=7)
        cost.set_ylim(bottom=0)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def _samples_figure(runs: list[dict[str, Any]], n: int, folder: Path, path: Path) -> None:
    """A 2-D target's reference samples beside each configuration's last model's (same draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = TARGETS[runs[0]["target"]]()
    ref, _ = reference(runs[0]["target"], n, runs[0]["seed"], folder)
    panels = [("reference (exact)", ref)]
    for run in sorted(runs, key=lambda r: list(CONFIGS).index(r["config"])):
        model, _ = _rebuild(run, target)
        model.load_state_dict(run["checkpoints"][-1]["state"])
        model.eval()
        z = torch.randn(
            n, target.dim, generator=torch.Generator().manual_seed(10_000 + run["seed"])
        )
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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--target", choices=sorted(TARGETS), required=True)
    tr.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    tr.add_argument(
        "--cpu-seconds", type=float, default=600.0, help="CPU seconds per configuration"
    )
    tr.add_argument("--checkpoints", type=int, default=6, help="checkpoints at equal CPU marks")
    tr.add_argument("--batch", type=int, default=256)
    tr.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    tr.add_argument("--clip", type=float, default=100.0, help="the weights' gradient-norm clip")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--field", choices=("mlp", "egnn"), default="mlp", help="the vector field")
    tr.add_argument("--enf", type=Path, help="a vgsatorras/en_flows checkout (--field egnn)")
    rep = sub.add_parser("report")
    rep.add_argument("--n", type=int, default=2000, help="samples per set (and reference)")
    rep.add_argument("--draws", type=int, default=5, help="independent sets of samples")
    rep.add_argument("--name", default="energy")
    rep.add_argument("--out", type=Path, default=RESULTS)
    rep.add_argument("--figures", type=Path, default=FIGURES)
    tr.add_argument("--runs", type=Path, default=ROOT / "runs" / "energy")
    rep.add_argument(
        "--runs", type=Path, nargs="+", default=[ROOT / "runs" / "energy"], help="run folders"
    )
    args = parser.parse_args(argv)
    if args.command == "train":
        return train(args)
    cmd = command("energy", argv)
    return report(args.runs, args.n, args.out, args.name, args.figures, cmd, args.draws)


if __name__ == "__main__":
    main()
