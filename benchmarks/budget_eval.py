"""Evaluation and sampling of trained models at a budget of N rk4 steps, against dopri5.

For each finished run of ``benchmarks.harness.train`` and each N: the test NLL with N uniform steps
per block, then with the steps' placement fitted to dopri5 on a batch of training-distribution data
(``Budget.fit``), and the mean distance of N-step samples to dopri5 samples from the same base
noise; each against the dopri5 (1e-5) value, with the NFE per solve as a ratio to dopri5's::

    python -m benchmarks.budget_eval --runs runs/bench/8gaussians/ffjord-s0 --budgets 2 3 4 6 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness.cnf import CNF, nfe, sample
from benchmarks.harness.data import load_digits_split, toy_sample
from benchmarks.harness.train import load_model
from benchmarks.scoring import adaptive, cnf_nll
from benchmarks.writer import RESULTS, command, write
from torch_tempopt import Budget, LearnableHorizon

__all__ = ["evaluate_run", "main", "markdown"]


def _blocks(model: torch.nn.Module) -> list[CNF]:
    return [m for m in model.modules() if isinstance(m, CNF)]


def _data(config: dict[str, Any], fit_size: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The runner's held-out set and a fitting batch of the training distribution."""
    if config["data"] == "digits":
        train, test = load_digits_split(seed=int(config["split_seed"]))
        g = torch.Generator().manual_seed(777)
        return test, train[torch.randperm(train.shape[0], generator=g)[:fit_size]], True
    test = torch.from_numpy(
        toy_sample(config["data"], int(config["test_size"]), int(config["test_seed"]))
    )
    return test.float(), torch.from_numpy(toy_sample(config["data"], fit_size, 777)).float(), False


def _fit(
    model: torch.nn.Module, x: torch.Tensor, image: bool, ref: dict[str, Any], steps: int
) -> list[float]:
    """Fits every block's placement on the batch's input to that block (the forward direction)."""
    from benchmarks.harness.cnf import _core, to_logit_space

    torch.manual_seed(0)
    y = to_logit_space(model, x, torch.Generator().manual_seed(0))[0] if image else x
    errors = []
    for block in _blocks(model):
        block.odefunc.before_odeint()
        # RNODE's
        state = (
            y,
            y.new_zeros(y.shape[0]),
            *(y.new_zeros(y.shape[0]) for _ in _core(block.odefunc).reg_names),
        )
        h = block.horizon
        t = torch.stack([h.t0, h.T]).detach()
        before, after = h.budget.fit(block.odefunc, state, t, steps=steps)
        errors.append(float(after.max()))
        with torch.no_grad(), adaptive(model, ref):
            y = block(y)[0]
    return errors


def _on_budget(model: torch.nn.Module, n: int, ref: dict[str, Any]) -> None:
    """Gives every block a horizon of ``n`` uniform steps at its trained T (reference ``ref``)."""
    for b in _blocks(model):
        old = b.horizon
        new = LearnableHorizon(
            T0=old.T_init,
            t0=old.t0_init,
            eps=old.eps,
            budget=Budget(n, reference=ref),
            learn_T=False,
        )
        with torch.no_grad():
            new.T.copy_(old.T)
            new.t0.copy_(old.t0)
        b.horizon = new.to(old.T.device)


def _score(
    model: torch.nn.Module, test: torch.Tensor, image: bool, seed: int
) -> tuple[float, float]:
    """The test NLL (the runner's scoring seed) and the forward NFE per block solve, on budgets."""
    solves = len(_blocks(model)) * -(-test.shape[0] // 10000)
    nfe(model, reset=True)
    with torch.no_grad(), _on_budgets(model):
        nll = cnf_nll(model, test, image=image, seed=seed)
    return nll, nfe(model, reset=True)["forward"] / solves


@contextlib.contextmanager
def _on_budgets(model: torch.nn.Module) -> Any:
    """Within the block, budgeted horizons solve on their budget in eval() too."""
    with contextlib.ExitStack() as stack:
        for b in _blocks(model):
            if b.horizon.budget is not None:
                stack.enter_context(b.horizon.budgeted())
        yield


def _samples(
    model: torch.nn.Module, n: int, shape: tuple[int, ...], budget: bool = True
) -> torch.Tensor:
    with torch.no_grad(), _on_budgets(model) if budget else contextlib.nullcontext():
        return sample(model, (n, *shape), torch.Generator().manual_seed(4321)).z


def evaluate_run(
    run_dir: Path, budgets: list[int], fit_steps: int, fit_size: int, n_samples: int
) -> list[dict]:
    model, config, _ = load_model(run_dir)
    test, fit_batch, image = _data(config, fit_size)
    ref = {
        "method": config["eval_solver"],
        "rtol": config["eval_rtol"],
        "atol": config["eval_atol"],
    }
    seed, shape = int(config["test_seed"]), tuple(test.shape[1:])
    for b in _blocks(model):
        b.solver_kwargs, b.adjoint = dict(ref), False
    with adaptive(model, ref):
        nll_ref, nfe_ref = _score(model, test, image, seed)
        x_ref = _samples(model, n_samples, shape, budget=False)
    rows = []
    for n in budgets:
        row: dict[str, Any] = {
            "run": str(run_dir),
            "trained_budget": config.get("budget"),
            "N": n,
            "nll_dopri5": nll_ref,
            "nfe_dopri5_per_solve": nfe_ref,
        }
        _on_budget(model, n, ref)
        for kind in ("uniform", "fitted"):
            if kind == "fitted":
                row["fit_error"] = _fit(model, fit_batch, image, ref, fit_steps)
            nll, per_solve = _score(model, test, image, seed)
            x = _samples(model, n_samples, shape)
            row.update(
                {
                    f"nll_{kind}": nll,
                    f"nll_error_{kind}": nll - nll_ref,
                    "nfe_per_solve": per_solve,
                    f"sample_error_{kind}": float((x - x_ref).flatten(1).norm(dim=1).mean()),
                }
            )
        row["nfe_ratio"] = row["nfe_per_solve"] / nfe_ref
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "run"}), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| run | N | NFE per solve (ratio to dopri5) | NLL error, uniform | NLL error, fitted | "
        "sample distance, uniform | sample distance, fitted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        run = Path(r["run"])
        unit = "bits/dim" if run.parent.name == "digits" else "nats"
        errors = f"{r['nll_error_uniform']:+.4f} | {r['nll_error_fitted']:+.4f}"
        distances = f"{r['sample_error_uniform']:.4f} | {r['sample_error_fitted']:.4f}"
        lines.append(
            f"| {run.parent.name}/{run.name} (dopri5 {r['nll_dopri5']:.4f} {unit}, "
            f"{r['nfe_dopri5_per_solve']:.0f} NFE) | {r['N']} | {r['nfe_per_solve']:.0f} "
            f"({r['nfe_ratio']:.2f}x) | {errors} | {distances} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        required=True,
        help="finished runs of benchmarks.harness.train",
    )
    parser.add_argument("--budgets", nargs="+", type=int, default=[2, 3, 4, 6, 8])
    parser.add_argument("--fit-steps", type=int, default=200)
    parser.add_argument("--fit-size", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="budget_eval")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    np.random.seed(0)
    rows = [
        r
        for run in args.runs
        for r in evaluate_run(run, args.budgets, args.fit_steps, args.fit_size, args.samples)
    ]
    text = markdown(rows) + "\nOne thread."
    write(args.out, args.name, {"rows": rows}, text, command("budget_eval", argv))
    print(text)
    return rows


if __name__ == "__main__":
    main()
