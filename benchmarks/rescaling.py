r"""Why a learned T alone cannot cut an adaptive solver's cost: both time scales take one path.

Integrating :math:`F` over :math:`[0, T]` and :math:`G(s, y) = T F(sT, y)` over :math:`s \in [0,
1]` gives the same states at matching times; an embedded Runge-Kutta pair's error estimates are the
same numbers (every stage of G is T times the stage of F at the matching time, the step in s is the
step in t over T), so the step-size controller accepts and rejects the same steps. The only
difference is torchdiffeq's initial-step heuristic, which does not scale with time; with the first
step scaled by T as well the evaluation counts are equal. Measured on a time-conditioned MLP field
(random weights, seed 0), dopri5 at rtol = atol = 1e-5:

    python -m benchmarks.rescaling
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchdiffeq
from torch import nn

from benchmarks.scoring import SOLVE
from benchmarks.writer import RESULTS, command, write

__all__ = ["Field", "counts", "main"]


class Field(nn.Module):
    """A time-conditioned MLP, like a CNF's velocity network."""

    def __init__(self, dim: int = 2, hidden: int = 64) -> None:
        super().__init__()
        kw = {"dtype": torch.float32}  # the same weights whatever the default dtype, then float64
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden, **kw),
            nn.Tanh(),
            nn.Linear(hidden, hidden, **kw),
            nn.Tanh(),
            nn.Linear(hidden, dim, **kw),
        )
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(torch.cat([y, t.expand(y.shape[0], 1)], dim=1))


def counts(
    T: float,
    first_step: float | None = None,
    seed: int = 0,
    rtol: float = SOLVE["rtol"],
    atol: float = SOLVE["atol"],
) -> dict:
    """NFE of the solve over [0, T] and of the rescaled one over [0, 1]; the largest difference."""
    torch.manual_seed(seed)
    f = Field().double()
    y0 = torch.randn(256, 2, dtype=torch.float32).double()

    def g(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return T * f(s * T, y)

    options = {} if first_step is None else {"first_step": first_step}
    a = torchdiffeq.odeint(
        f, y0, torch.tensor([0.0, T], dtype=torch.float64), rtol=rtol, atol=atol, options=options
    )
    nfe_t, f.calls = f.calls, 0
    scaled = {} if first_step is None else {"first_step": first_step / T}
    b = torchdiffeq.odeint(
        g, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=rtol, atol=atol, options=scaled
    )
    return {
        "T": T,
        "first_step": first_step,
        "nfe_over_T": nfe_t,
        "nfe_rescaled": f.calls,
        "max_state_difference": float((a[-1] - b[-1]).detach().abs().max()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [counts(T) for T in (0.25, 0.5, 1.0, 2.0)] + [
        counts(T, first_step=0.01 * T) for T in (0.25, 0.5, 1.0, 2.0)
    ]
    head = "| T | first step | NFE over [0, T] | NFE of T F(sT, y) over [0, 1] |"
    lines = [head + " max state difference |", "|---|---|---|---|---|"]
    for r in rows:
        step = "torchdiffeq's heuristic"
        if r["first_step"] is not None:
            step = f"{r['first_step']:g} (scaled by 1/T in s)"
        nfe = f"{r['nfe_over_T']} | {r['nfe_rescaled']}"
        lines.append(f"| {r['T']} | {step} | {nfe} | {r['max_state_difference']:.1e} |")
    text = "\n".join(lines) + "\n\ndopri5 rtol = atol = 1e-5, float64, 256 states."
    write(args.out, "rescaling", {"rows": rows}, text, command("rescaling", argv))
    print(text)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
