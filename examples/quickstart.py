"""Quickstart: a 2-D CNF of your own kind, with the four lines that add torch_tempopt.

    python examples/quickstart.py                 # 4 rk4 steps per solve (T fixed), guarded
    python examples/quickstart.py --budget 0      # the adaptive solve it replaces (dopri5 1e-5)

Prints T, the NFE and the test NLL (always scored with dopri5). Where matplotlib is installed
(pip install matplotlib, or the project's examples extra), it also writes a density plot
(--plot PATH; '' for none).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import numpy as np
import torch
from torch import Tensor, nn
from torchdiffeq import odeint_adjoint

from torch_tempopt import CoordinateDescentStepper, LearnableHorizon, count_nfe  # line 1 of 4


def eight_gaussians(n: int, rng: np.random.Generator) -> Tensor:
    angles = np.arange(8) * math.pi / 4
    centers = np.stack([np.cos(angles), np.sin(angles)], 1) * 2 * math.sqrt(2)
    x = centers[rng.integers(8, size=n)] + 0.5 * rng.standard_normal((n, 2))
    return torch.as_tensor(x / math.sqrt(2), dtype=torch.float32)


class Field(nn.Module):
    """The augmented dynamics (dz/dt, dlogp/dt) of a time-conditioned MLP, exact divergence."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        layers = [nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 2))

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z = state[0]
        with torch.enable_grad():
            z = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = self.net(torch.cat([z, t.expand(z.shape[0], 1)], dim=1))
            keep = torch.is_grad_enabled()
            rows = [torch.autograd.grad(dz[:, i].sum(), z, create_graph=keep)[0] for i in (0, 1)]
        return dz, -sum(g[:, i] for i, g in enumerate(rows))[:, None]


class CNF(nn.Module):
    def __init__(self, budget: int | None) -> None:
        super().__init__()
        self.field = count_nfe(Field())
        self.horizon = LearnableHorizon(T0=0.5, budget=budget)  # line 2 of 4

    def forward(self, x: Tensor) -> Tensor:
        """-log p(x) per sample."""
        zeros = torch.zeros(x.shape[0], 1)
        # was: odeint_adjoint(self.field, (x, zeros), torch.tensor([0.0, 0.5]), rtol=..., atol=...)
        settings = dict(solver=odeint_adjoint, rtol=1e-5, atol=1e-5)
        z_t, dlogp_t = self.horizon(self.field, (x, zeros), **settings)  # line 3 of 4
        z, dlogp = z_t[-1], dlogp_t[-1]
        logpz = -0.5 * (z.pow(2).sum(1, keepdim=True) + 2 * math.log(2 * math.pi))
        return -(logpz - dlogp).squeeze(1)


def score(model: CNF, x: Tensor) -> float:
    """The test NLL in eval(): the horizon solves with its adaptive reference, not the budget."""
    model.eval()
    with torch.no_grad():
        nll = model(x).mean().item()
    model.train()
    return nll


def density_plot(model: CNF, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.linspace(-4, 4, 100)
    xy = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    model.eval()
    with torch.no_grad():
        p = torch.cat([(-model(c)).exp() for c in xy.split(2500)]).reshape(100, 100)
    plt.figure(figsize=(4, 4))
    plt.imshow(p.numpy(), extent=(-4, 4, -4, 4), origin="lower", cmap="viridis")
    plt.axis("off")
    plt.savefig(path, dpi=100, bbox_inches="tight")
    plt.close()


def main(argv: list[str] | None = None) -> dict[str, float]:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=4, help="rk4 steps (0: adaptive dopri5)")
    parser.add_argument("--plot", default="quickstart_density.png", help="'' for none")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    test = eight_gaussians(2000, np.random.default_rng(1))
    model = CNF(args.budget or None)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer = CoordinateDescentStepper(adam, model)  # line 4 of 4
    start = time.process_time()
    for it in range(1, args.iters + 1):
        loss = model(eight_gaussians(100, rng)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if it % max(args.iters // 5, 1) == 0 or it == args.iters:
            guard = f" (guard {optimizer.guard.stats['nfe']} of them)" if optimizer.guard else ""
            nfe = f"{model.field.nfe_forward}+{model.field.nfe_backward}"
            T = model.horizon.T.item()
            print(f"iter {it:5d}  loss {loss.item():.4f}  T {T:.4f}  NFE {nfe}{guard}")
    cpu, nfe = time.process_time() - start, model.field.nfe
    nll, T = score(model, test), model.horizon.T.item()
    print(f"test NLL {nll:.4f} nats (dopri5 1e-5)  T {T:.4f}  training NFE {nfe}  CPU {cpu:.1f} s")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("no density plot: matplotlib is not installed (pip install matplotlib, then rerun)")
    elif args.plot:
        density_plot(model, args.plot)
        print(f"density: {args.plot}")
    return {"test_nll": nll, "T": T, "nfe": nfe, "cpu_seconds": cpu}


if __name__ == "__main__":
    main()
