"""How far the adjoint on a budget's steps is from the computed loss's gradient, in training.

FFJORD's toy CNF (the harness's, concat-squash MLP 64-64-64, exact trace) trained on a 2-D set with
a budget of N rk4 steps, backpropagated through (0.4's default), Adam 1e-3, batch 256. Every
``--every`` iterations the same batch's loss is differentiated twice: through the steps (the exact
derivative of the loss computed: ``tests/test_gradients.py`` checks it against finite differences)
and by torchdiffeq's adjoint solved on the same steps (``Budget(N, gradient="adjoint")``, 0.3's
behaviour under ``odeint_adjoint``). Reported: the relative error ``||g_adjoint - g|| / ||g||`` of
the weights' gradient, and the cosine between the two.

    python -m benchmarks.gradient_error --data 8gaussians --budgets 2 4 --iters 2000 --every 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.cnf import build_toy_model, network_parameters, nll_and_reg
from benchmarks.harness.data import toy_sample
from benchmarks.writer import FIGURES, RESULTS, command, write
from torch_tempopt import Budget, CoordinateDescentStepper

__all__ = ["compare", "main", "run"]


def compare(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The weights' gradient through the steps and by the adjoint on them, on the batch ``x``."""
    weights = network_parameters(model)
    budgets = [m for m in model.modules() if isinstance(m, Budget)]
    grads = []
    for gradient in ("backprop", "adjoint"):
        for b in budgets:
            b.gradient = gradient
        nll, _ = nll_and_reg(model, x)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(nll, weights)]))
    for b in budgets:
        b.gradient = "backprop"
    exact, adjoint = grads
    return {
        "relative_error": float((adjoint - exact).norm() / exact.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(adjoint, exact, dim=0)),
    }


def run(data: str, budget: int, iters: int, every: int, seed: int) -> list[dict[str, Any]]:
    """Trains on the budget; the comparison every ``every`` iterations (and at the start)."""
    torch.manual_seed(seed)
    model = build_toy_model(budget=Budget(budget), adjoint=True)
    stepper = CoordinateDescentStepper(torch.optim.Adam(network_parameters(model), lr=1e-3), model)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for it in range(iters + 1):
        x = torch.from_numpy(
            toy_sample(data, 256, int(torch.randint(2**31, (1,), generator=generator)))
        ).float()
        if it % every == 0:
            rows.append({"iteration": it, **compare(model, x)})
            print(json.dumps({"budget": budget, **rows[-1]}), flush=True)
        if it == iters:
            break
        nll, _ = nll_and_reg(model, x)
        stepper.zero_grad()
        nll.backward()
        stepper.step()
    return rows


def figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for n, rows in results["runs"].items():
        ax.plot(
            [r["iteration"] for r in rows],
            [100 * r["relative_error"] for r in rows],
            marker="o",
            ms=3,
            label=f"{n} rk4 steps",
        )
    ax.set(
        xlabel="training iteration",
        ylabel="adjoint's gradient error (%)",
        yscale="log",
        title=f"{results['data']}: the adjoint on the steps against the loss's gradient",
    )
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| rk4 steps | iteration | relative error of the adjoint's weight gradient | cosine |",
        "|---|---|---|---|",
    ]
    for n, rows in results["runs"].items():
        lines += [
            f"| {n} | {r['iteration']} | {100 * r['relative_error']:.2f} % | {r['cosine']:.4f} |"
            for r in rows
        ]
    return "\n".join(lines) + "\n\nOne thread."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="8gaussians")
    p.add_argument("--budgets", nargs="+", type=int, default=[2, 4])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="gradient_error")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--figures", type=Path, default=FIGURES, help="where the figure goes")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runs = {str(n): run(args.data, n, args.iters, args.every, args.seed) for n in args.budgets}
    results = {"data": args.data, "runs": runs}
    write(args.out, args.name, results, markdown(results), command("gradient_error", argv))
    figure(results, args.figures / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
