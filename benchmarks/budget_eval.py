"""Evaluation and sampling of trained models at a budget of N rk4 steps, against dopri5.

For each finished run of ``benchmarks.harness.train`` and each N: the test NLL with N uniform steps per block,
then with the steps' placement fitted to dopri5 on a batch of training-distribution data
(``LearnableHorizon.fit``), and the mean distance of N-step samples to dopri5 samples from the same
base noise; each against the dopri5 (1e-5) value, with the NFE per solve as a ratio to dopri5's.

    python benchmarks/budget_eval.py --runs runs/bench/8gaussians/ffjord-s0 --budgets 2 3 4 6 8 --name budget_eval_8gaussians
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness.cnf import CNF, nfe, sample  # noqa: E402
from benchmarks.harness.data import load_digits_split, toy_sample  # noqa: E402
from benchmarks.harness.train import load_model, scoring  # noqa: E402
from torch_tempopt import Budget, LearnableHorizon  # noqa: E402


def _blocks(model: torch.nn.Module) -> list[CNF]:
    return [m for m in model.modules() if isinstance(m, CNF)]


def _data(config: dict[str, Any], fit_size: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The runner's held-out set and a fitting batch from the training distribution (another seed)."""
    if config["data"] == "digits":
        train, test = load_digits_split(seed=int(config["split_seed"]))
        g = torch.Generator().manual_seed(777)
        return test, train[torch.randperm(train.shape[0], generator=g)[:fit_size]], True
    test = torch.from_numpy(toy_sample(config["data"], int(config["test_size"]), int(config["test_seed"])))
    return test.float(), torch.from_numpy(toy_sample(config["data"], fit_size, 777)).float(), False


def _fit(model: torch.nn.Module, x: torch.Tensor, image: bool, ref: dict[str, Any], steps: int) -> list[float]:
    """Fits every block's placement on the batch's input to that block (the flow's forward direction)."""
    from benchmarks.harness.cnf import _core, to_logit_space

    torch.manual_seed(0)
    y = to_logit_space(model, x, torch.Generator().manual_seed(0))[0] if image else x
    errors = []
    for block in _blocks(model):
        block.odefunc.before_odeint()
        state = (y, y.new_zeros(y.shape[0]), *(y.new_zeros(y.shape[0]) for _ in _core(block.odefunc).reg_names))  # RNODE's
        h = block.horizon
        t = torch.stack([h.t0, h.T]).detach()
        before, after = h.budget.fit(block.odefunc, state, t, steps=steps)
        errors.append(float(after.max()))
        with torch.no_grad(), scoring(model, ref):
            y = block(y)[0]
    return errors


def _on_budget(model: torch.nn.Module, n: int, ref: dict[str, Any]) -> None:
    """Gives every block a horizon of ``n`` uniform steps at its trained T (reference ``ref``)."""
    for b in _blocks(model):
        old = b.horizon
        new = LearnableHorizon(T0=old.T_init, t0=old.t0_init, eps=old.eps, budget=Budget(n, reference=ref),
                               learn_T=False)
        with torch.no_grad():
            new.T.copy_(old.T)
            new.t0.copy_(old.t0)
        b.horizon = new.to(old.T.device)


def _score(model: torch.nn.Module, test: torch.Tensor, image: bool, seed: int) -> tuple[float, float]:
    """The test NLL (the runner's scoring seed) and the forward NFE per block solve, on the blocks' budgets."""
    from benchmarks.harness.cnf import bits_per_dim_and_reg, nll_and_reg

    solves = len(_blocks(model)) * -(-test.shape[0] // 10000)
    nfe(model, reset=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model.eval()
    total = 0.0
    with torch.no_grad(), _on_budgets(model):
        for chunk in test.split(10000):
            v = bits_per_dim_and_reg(model, chunk, g)[0] if image else nll_and_reg(model, chunk)[0]
            total += float(v) * chunk.shape[0]
    return total / test.shape[0], nfe(model, reset=True)["forward"] / solves


@contextlib.contextmanager
def _on_budgets(model: torch.nn.Module) -> Any:
    """Within the block, budgeted horizons solve on their budget in eval() too (which would use the reference)."""
    with contextlib.ExitStack() as stack:
        for b in _blocks(model):
            if b.horizon.budget is not None:
                stack.enter_context(b.horizon.budgeted())
        yield


def _samples(model: torch.nn.Module, n: int, shape: tuple[int, ...], budget: bool = True) -> torch.Tensor:
    with torch.no_grad(), _on_budgets(model) if budget else contextlib.nullcontext():
        return sample(model, (n, *shape), torch.Generator().manual_seed(4321)).z


def evaluate_run(run_dir: Path, budgets: list[int], fit_steps: int, fit_size: int, n_samples: int) -> list[dict]:
    model, config, _ = load_model(run_dir)
    test, fit_batch, image = _data(config, fit_size)
    ref = {"method": config["eval_solver"], "rtol": config["eval_rtol"], "atol": config["eval_atol"]}
    seed, shape = int(config["test_seed"]), tuple(test.shape[1:])
    for b in _blocks(model):
        b.solver_kwargs, b.adjoint = dict(ref), False
    with scoring(model, ref):
        nll_ref, nfe_ref = _score(model, test, image, seed)
        x_ref = _samples(model, n_samples, shape, budget=False)
    rows = []
    for n in budgets:
        row: dict[str, Any] = {"run": str(run_dir), "trained_budget": config.get("budget"), "N": n,
                               "nll_dopri5": nll_ref, "nfe_dopri5_per_solve": nfe_ref}
        _on_budget(model, n, ref)
        for kind in ("uniform", "fitted"):
            if kind == "fitted":
                row["fit_error"] = _fit(model, fit_batch, image, ref, fit_steps)
            nll, per_solve = _score(model, test, image, seed)
            x = _samples(model, n_samples, shape)
            row.update({f"nll_{kind}": nll, f"nll_error_{kind}": nll - nll_ref, "nfe_per_solve": per_solve,
                        f"sample_error_{kind}": float((x - x_ref).flatten(1).norm(dim=1).mean())})
        row["nfe_ratio"] = row["nfe_per_solve"] / nfe_ref
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "run"}), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| run | N | NFE per solve (ratio to dopri5) | NLL error, uniform | NLL error, fitted | "
             "sample distance, uniform | sample distance, fitted |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        run = Path(r["run"])
        unit = "bits/dim" if run.parent.name == "digits" else "nats"
        lines.append(f"| {run.parent.name}/{run.name} (dopri5 {r['nll_dopri5']:.4f} {unit}, "
                     f"{r['nfe_dopri5_per_solve']:.0f} NFE) | "
                     f"{r['N']} | {r['nfe_per_solve']:.0f} ({r['nfe_ratio']:.2f}x) | {r['nll_error_uniform']:+.4f} | "
                     f"{r['nll_error_fitted']:+.4f} | {r['sample_error_uniform']:.4f} | {r['sample_error_fitted']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished benchmarks.harness.train run directories")
    parser.add_argument("--budgets", nargs="+", type=int, default=[2, 3, 4, 6, 8])
    parser.add_argument("--fit-steps", type=int, default=200)
    parser.add_argument("--fit-size", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="budget_eval")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    np.random.seed(0)
    rows = [r for run in args.runs for r in evaluate_run(run, args.budgets, args.fit_steps, args.fit_size, args.samples)]
    command = "python benchmarks/budget_eval.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine = f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, 1 thread"
    text = markdown(rows) + f"\nCommand: `{command}`. Machine: {machine}.\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1))
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
