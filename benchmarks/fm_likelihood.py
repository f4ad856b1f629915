"""Likelihoods of flow-matching models: Meta's ``flow_matching`` against a fitted rk4 budget.

A flow-matching model trains without a solve, but each log-likelihood needs one: the library's
``ODESolver.compute_likelihood`` integrates (x, log-det) from the data at t = 1 back to the noise
at t = 0 (Euler by default). This trains a model with the library itself
(``AffineProbPath(CondOTScheduler())``, MSE on the velocity, Adam; an MLP of 3x64 in 2-D, 3x128 on
digits) on 2-D 8gaussians and on 8x8 digits (dequantized, logit space, as the harness does), then
scores held-out log-likelihoods, all in float64 with the exact trace:

* ``euler``/``midpoint``: the library's ``compute_likelihood`` at steps 1/2, 1/4, ... (to 1/1024 in
  2-D, 1/256 on digits);
* ``fitted``: ``LearnableHorizon(T0=1, budget=N)`` (rk4) on the same field, its step placement
  fitted by ``Budget.fit`` to the reference on a *training* batch, scored on held-out data with
  ``horizon.budgeted()`` (:func:`benchmarks.scoring.flow_log_likelihood`);
* ``uniform``: the same budget unfitted (what ``compute_likelihood(method="rk4", step_size=1/N)``
  computes);
* ``dopri5``: dopri5 at rtol = atol = 1e-2, 1e-3, 1e-4, 1e-5, the baseline an expert tries first;
* ``log_likelihood``: ``torch_tempopt.likelihood.log_likelihood`` at ``tol`` = 0.002 nats per
  sample (in bits per dimension), uniform steps, its default reference (dopri5 1e-5) on 50 checked
  samples, whose cost is in its NFE per sample, and its estimated error against the true one;
* the reference: dopri5 at rtol = atol = 1e-7 (the horizon's ``reference``, i.e. its ``eval()``
  solve).

NFE are counted by a counter on the velocity net (evaluations per solve, each one batched over the
samples). Errors are the mean absolute difference of log p per held-out sample from the reference.
Each family is swept from its cheapest setting and stops at the first within 0.002 nats (a costlier
one cannot change the smallest NFE that reaches it)::

    python -m benchmarks.fm_likelihood --data both   # results/fm_likelihood.{json,md}, docs/img
    python -m benchmarks.fm_likelihood --quick --out /tmp/fm --figures /tmp/fm   # seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CondOTScheduler
from flow_matching.solver import ODESolver
from flow_matching.utils import ModelWrapper
from torch import Tensor, nn

from benchmarks.harness.data import (
    bits_per_dim,
    dequantize,
    load_digits_split,
    logit_transform,
    toy_sample,
)
from benchmarks.scoring import flow_log_likelihood
from benchmarks.writer import FIGURES, RESULTS, command, write
from torch_tempopt import Budget, LearnableHorizon
from torch_tempopt.likelihood import log_likelihood

__all__ = [
    "Counter",
    "Dynamics",
    "FAMILIES",
    "MLP",
    "REFERENCE",
    "fit",
    "library_logp",
    "log_p0",
    "main",
    "run_set",
]

TARGET = 0.002  # nats per sample
REFERENCE = {"method": "dopri5", "rtol": 1e-7, "atol": 1e-7}
FAMILIES = ("euler", "midpoint", "dopri5", "uniform", "fitted", "log_likelihood")
#: the loose tolerances of the baseline an expert tries first (rtol = atol)
LOOSE = (1e-2, 1e-3, 1e-4, 1e-5)
# width, iterations, held-out points, fit batch and Adam steps, finest library step 2^-finest,
# check step 2^-check
SETS: dict[str, dict[str, Any]] = {
    "2d": dict(
        dim=2, hidden=64, iters=4000, test=1000, fit_batch=256, fit_steps=100, finest=10, check=7
    ),
    "digits": dict(
        dim=64, hidden=128, iters=4000, test=200, fit_batch=32, fit_steps=40, finest=8, check=7
    ),
}
QUICK = dict(iters=20, test=16, fit_batch=16, fit_steps=2, finest=3, check=3)


class MLP(nn.Module):
    """A time-conditioned velocity v(x, t): 3 hidden SiLU layers on [x, t]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        sizes = [dim + 1, hidden, hidden, hidden]
        layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.SiLU())]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t).to(x).reshape(-1, 1).expand(x.shape[0], 1)
        return self.net(torch.cat([x, t], 1))


class Counter(ModelWrapper):
    """The velocity as the library calls it, ``model(x=x, t=t)``, its evaluations in ``nfe``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.nfe = 0

    def forward(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:
        self.nfe += 1
        return self.model(x=x, t=t, **extras)


class Dynamics(nn.Module):
    """The augmented field (dx/dt, dlogdet/dt) = (v, div v): the library's dynamics and trace.

    The library takes the trace with one ``autograd.grad`` per dimension; this takes all of them in
    one batched call (``is_grads_batched``), the same numbers (to rounding) in a third of the time
    in 64-D.
    """

    def __init__(self, velocity: nn.Module) -> None:
        super().__init__()
        self.velocity = velocity

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = state[0]
        with torch.enable_grad():  # create_graph: fit differentiates the solve in the step times
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            v = self.velocity(x=x, t=t)
            eye = torch.eye(v.shape[1], dtype=v.dtype).unsqueeze(1).expand(-1, *v.shape)
            # jac[i] = d v_i / dx
            jac = torch.autograd.grad(v, x, eye, create_graph=True, is_grads_batched=True)[0]
        return v, jac.diagonal(dim1=0, dim2=2).sum(1)


def log_p0(x: Tensor) -> Tensor:
    """log N(x; 0, I) per sample."""
    return -0.5 * x.pow(2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


def counted(counter: Counter, fn: Callable[..., Any], *args: Any) -> tuple[Any, int, float]:
    """``fn(*args)``, the velocity evaluations it took and its CPU seconds."""
    before, start = counter.nfe, time.process_time()
    out = fn(*args)
    return out, counter.nfe - before, time.process_time() - start


def library_logp(counter: Counter, x: Tensor, method: str, step: float) -> Tensor:
    grid = torch.tensor([1.0, 0.0], dtype=x.dtype)
    return ODESolver(counter).compute_likelihood(
        x, log_p0, step, method=method, time_grid=grid, exact_divergence=True
    )[1]


def fit(horizon: LearnableHorizon, field: Dynamics, x: Tensor, steps: int) -> tuple[float, float]:
    """Fits the placement on the mean |log p - reference| of ``x``: the errors before and after."""
    pick = lambda y: (log_p0(y[0]) + y[1],)  # noqa: E731
    t = x.new_tensor([1.0, 0.0])  # from data back to noise
    before, after = horizon.budget.fit(
        field, (x, x.new_zeros(x.shape[0])), t, steps=steps, select=pick
    )
    return float(before.sum()), float(after.sum())


def data(
    name: str, n_test: int, seed: int
) -> tuple[Callable[[int, np.random.Generator], Tensor], Tensor, Tensor]:
    """A training sampler ``(batch, rng) -> x`` (float64), the held-out set, its log-det."""
    if name == "2d":
        train = torch.from_numpy(toy_sample("8gaussians", 20000, seed)).double()
        test = torch.from_numpy(toy_sample("8gaussians", n_test, seed + 1000)).double()
        return (
            (lambda b, rng: train[torch.from_numpy(rng.integers(0, len(train), b))]),
            test,
            test.new_zeros(n_test),
        )
    train_levels, test_levels = load_digits_split(seed=seed)
    g = torch.Generator().manual_seed(seed)

    def sample(b: int, rng: np.random.Generator) -> Tensor:
        levels = train_levels[torch.from_numpy(rng.integers(0, len(train_levels), b))]
        return logit_transform(dequantize(levels, g, dtype=torch.float64), 1e-6)[0].flatten(1)

    y, logdet = logit_transform(
        dequantize(
            test_levels[:n_test], torch.Generator().manual_seed(seed + 1000), dtype=torch.float64
        ),
        1e-6,
    )
    return sample, y.flatten(1), logdet


def train(
    sample: Callable[[int, np.random.Generator], Tensor],
    dim: int,
    hidden: int,
    iters: int,
    seed: int,
) -> tuple[MLP, float]:
    """Flow matching with the library's path, ``AffineProbPath(CondOTScheduler())``."""
    torch.manual_seed(seed)
    model, path, rng = (
        MLP(dim, hidden),
        AffineProbPath(scheduler=CondOTScheduler()),
        np.random.default_rng(seed),
    )
    opt, start = torch.optim.Adam(model.parameters(), lr=1e-3), time.process_time()
    for _ in range(iters):
        x_1 = sample(256, rng).float()
        p = path.sample(t=torch.rand(len(x_1)), x_0=torch.randn_like(x_1), x_1=x_1)
        loss = (model(p.x_t, p.t) - p.dx_t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double(), time.process_time() - start


def reach(rows: list[dict[str, Any]], family: str) -> int | None:
    """The smallest measured NFE of ``family`` within TARGET nats (no interpolation)."""
    ok = [r["nfe"] for r in rows if r["family"] == family and r["mae"] <= TARGET]
    return min(ok) if ok else None


class _Sweep:
    """One model's rows: each family swept from its cheapest setting to the first within TARGET."""

    def __init__(
        self, name: str, cfg: dict[str, Any], counter: Counter, test: Tensor, logdet: Tensor
    ) -> None:
        self.name, self.cfg, self.counter = name, cfg, counter
        self.test, self.logdet, self.field = test, logdet, Dynamics(counter)
        self.rows: list[dict[str, Any]] = []
        self.fits: list[dict[str, Any]] = []
        ref_h = LearnableHorizon(T0=1.0, budget=Budget(1, reference=REFERENCE)).double().eval()
        self.ref, self.ref_nfe, self.ref_cpu = self.count(ref_h, False)

    def count(self, horizon: LearnableHorizon, budgeted: bool = True) -> tuple[Tensor, int, float]:
        """log p of the held-out set by the horizon's budget (or reference), its NFE and CPU s."""
        args = (horizon, self.field, self.test, log_p0, budgeted)
        return counted(self.counter, flow_log_likelihood, *args)

    def done(self, family: str) -> bool:
        return any(r["family"] == family and r["mae"] <= TARGET for r in self.rows)

    def add(
        self, family: str, setting: str, scored: tuple[Tensor, int, float], **extra: Any
    ) -> None:
        logp, nfe, cpu = scored
        mae, nll = float((logp - self.ref).abs().mean()), float(-(logp + self.logdet).mean())
        row = dict(family=family, setting=setting, nfe=nfe, mae=mae, nll=nll, cpu=cpu, **extra)
        if self.name == "digits":
            bpd = 1.0 / (self.cfg["dim"] * math.log(2))
            row.update(mae_bpd=mae * bpd, nll_bpd=float(bits_per_dim(-nll, self.cfg["dim"])))
        self.rows.append(row)

    def library(self) -> None:
        """The library's euler and midpoint at steps 1/2, 1/4, ..."""
        for method in ("euler", "midpoint"):
            for k in range(1, self.cfg["finest"] + 1):
                if not self.done(method):
                    args = (self.counter, self.test, method, 2.0**-k)
                    self.add(method, f"step 1/{2**k}", counted(self.counter, library_logp, *args))

    def adaptive(self) -> None:
        """dopri5 at the loose tolerances (rtol = atol), tightest last."""
        for tol in LOOSE:
            if not self.done("dopri5"):
                solve = {"method": "dopri5", "rtol": tol, "atol": tol}
                h = LearnableHorizon(T0=1.0, budget=Budget(1, reference=solve)).double().eval()
                self.add("dopri5", f"rtol = atol = {tol:g}", self.count(h, False))

    def feature(self, seed: int) -> None:
        """``torch_tempopt.likelihood.log_likelihood`` at tol = TARGET nats per sample (in bits
        per dimension), uniform steps, its default reference; its NFE per sample count the
        reference on the checked samples.
        """
        tol = TARGET / (self.cfg["dim"] * math.log(2))
        velocity = lambda t, x: self.counter(x=x, t=t)  # noqa: E731
        gen = torch.Generator().manual_seed(seed)
        start = time.process_time()
        out = log_likelihood(velocity, self.test, log_p0, tol=tol, generator=gen)
        cpu = time.process_time() - start
        truth = float((self.ref - out.log_p).mean()) / (self.cfg["dim"] * math.log(2))
        self.add(
            "log_likelihood",
            f"tol {tol:.2g} bits/dim: rk4 x {out.steps}",
            (out.log_p, round(out.nfe, 1), cpu),
            estimated_error=out.error,
            estimated_se=out.error_se,
            true_error=truth,
            checked=out.checked,
            covered=abs(truth - out.error) <= 2 * out.error_se,
        )

    def budgets(self, budgets: tuple[int, ...], xfit: Tensor) -> None:
        """Each budget uniform, then fitted on ``xfit``."""
        for n in budgets:
            h = LearnableHorizon(T0=1.0, budget=Budget(n, reference=REFERENCE)).double().eval()
            if not self.done("uniform"):
                self.add("uniform", f"rk4 x {n}", self.count(h))
            if not self.done("fitted"):
                args = (h, self.field, xfit, self.cfg["fit_steps"])
                (before, after), fit_nfe, fit_cpu = counted(self.counter, fit, *args)
                frac = [round(f, 4) for f in h.budget.fractions().tolist()]
                self.add("fitted", f"rk4 x {n}", self.count(h), fractions=frac)
                fit_row = dict(budget=n, nfe=fit_nfe, cpu=fit_cpu)
                self.fits.append(dict(fit_row, train_mae_before=before, train_mae_after=after))

    def check(self) -> dict[str, Any]:
        """The library's rk4 at a tiny step against the reference: sign and time direction."""
        sub, step = self.test[:32], 2.0 ** -self.cfg["check"]
        worst = float((library_logp(self.counter, sub, "rk4", step) - self.ref[:32]).abs().max())
        return dict(method="rk4", step=step, points=len(sub), max_abs=worst)


def run_set(name: str, cfg: dict[str, Any], budgets: tuple[int, ...], seed: int) -> dict[str, Any]:
    """Trains one model and sweeps every family to its first setting within TARGET."""
    sample, test, logdet = data(name, cfg["test"], seed)
    model, train_cpu = train(sample, cfg["dim"], cfg["hidden"], cfg["iters"], seed)
    sweep = _Sweep(name, cfg, Counter(model), test, logdet)
    sweep.library()
    sweep.adaptive()
    sweep.feature(seed)
    sweep.budgets(budgets, sample(cfg["fit_batch"], np.random.default_rng(seed + 2000)))
    check = sweep.check()
    reached = {f: reach(sweep.rows, f) for f in FAMILIES}
    ref_nll = float(-(sweep.ref + logdet).mean())
    library = [v for f, v in reached.items() if f in ("euler", "midpoint") and v is not None]
    best = min(library, default=None)
    ratio = reached["fitted"] / best if best and reached["fitted"] else None
    baselines = [v for f in ("euler", "midpoint", "dopri5") if (v := reached[f]) is not None]
    cheapest = min(baselines, default=None)
    feature = reached["log_likelihood"]
    feature_ratio = feature / cheapest if cheapest and feature else None
    reference = dict(nfe=sweep.ref_nfe, cpu=sweep.ref_cpu, nll=ref_nll, **REFERENCE)
    reference["nll_bpd"] = float(bits_per_dim(-ref_nll, cfg["dim"]))
    return dict(
        data="8gaussians" if name == "2d" else "digits",
        dim=cfg["dim"],
        hidden=cfg["hidden"],
        iters=cfg["iters"],
        n_test=len(test),
        fit_batch=cfg["fit_batch"],
        fit_steps=cfg["fit_steps"],
        train_cpu=train_cpu,
        reference=reference,
        check=check,
        rows=sweep.rows,
        fits=sweep.fits,
        reached=reached,
        library_best=best,
        ratio=ratio,
        cheapest_baseline=cheapest,
        feature_ratio=feature_ratio,
    )


def _fmt(v: float | None, rows: list[dict[str, Any]], family: str) -> str:
    if v is not None:
        return f"{v:g}"
    tried = [r["nfe"] for r in rows if r["family"] == family]
    return f"not reached (<= {max(tried):g})" if tried else "-"


def _set_markdown(s: dict[str, Any]) -> list[str]:
    """One data set's table of every solve, and its fits."""
    digits = s["data"] == "digits"
    unit, ref = ("bits/dim" if digits else "nats"), s["reference"]
    out = [
        f"**{s['data']}** ({s['dim']}-D, MLP 3x{s['hidden']}, {s['iters']} flow-matching "
        f"iterations; {s['n_test']} held-out points; reference dopri5 1e-7: {ref['nfe']} NFE, NLL "
        f"{ref['nll_bpd'] if digits else ref['nll']:.4f} {unit})\n"
    ]
    head = "| solve | setting | NFE per sample | mean abs error of log p (nats) |"
    head += " (bits/dim) |" if digits else ""
    out += [head + f" held-out NLL ({unit}) | CPU s |", "|---" * (6 + digits) + "|"]
    for r in s["rows"]:
        extra = f" {r['mae_bpd']:.2e} |" if digits else ""
        nll = f"{r['nll_bpd'] if digits else r['nll']:.4f} | {r['cpu']:.2f}"
        mae = f"{r['mae']:.2e} |{extra}"
        out.append(f"| {r['family']} | {r['setting']} | {r['nfe']} | {mae} {nll} |")
    fits = ", ".join(
        f"N={f['budget']}: {f['nfe']} NFE on {s['fit_batch']} points, {f['cpu']:.1f} s, "
        f"training-batch error {f['train_mae_before']:.1e} -> {f['train_mae_after']:.1e}"
        for f in s["fits"]
    )
    c = s["check"]
    out.append(
        f"\nFit ({s['fit_steps']} Adam steps + its reference solve, once per model): {fits}. The "
        f"library's rk4 at step 1/{round(1 / c['step'])} is within {c['max_abs']:.1e} nats of the "
        f"reference (max over {c['points']} points).\n"
    )
    return out


def markdown(res: dict[str, Any]) -> str:
    """Every data set's table, then the smallest NFE within TARGET of each family."""
    out = [line for s in res["sets"] for line in _set_markdown(s)]
    out += [
        f"**Smallest measured NFE per sample within {TARGET} nats of the reference** (mean "
        "absolute error of log p per held-out sample; no interpolation)\n",
        "| data | library euler | library midpoint | dopri5 (loose) | uniform rk4 budget "
        "| fitted rk4 budget | log_likelihood | fitted / library's best "
        "| log_likelihood / cheapest baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in res["sets"]:
        ratios = [s.get(k) for k in ("ratio", "feature_ratio")]
        cells = " | ".join(_fmt(s["reached"].get(f), s["rows"], f) for f in FAMILIES)
        tail = " | ".join("-" if r is None else f"{r:.2f}" for r in ratios)
        out.append(f"| {s['data']} | {cells} | {tail} |")
    out.append(
        "\nlog_likelihood's NFE per sample count the reference solve on its checked samples "
        "(50), amortised over the held-out set; its estimated error and the true one (against "
        "dopri5 1e-7, on every held-out sample) are in its row of each table's JSON "
        "(`estimated_error`, `estimated_se`, `true_error`, `covered`).\n"
    )
    out.append(
        "\nThe library's rows take the trace with one `autograd.grad` per dimension (its own "
        "code), the horizon's with one batched call, so their CPU seconds are not comparable per "
        "NFE; NFE are.\n"
    )
    out.append("One thread.")
    return "\n".join(out) + "\n"


def figure(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(res["sets"]), figsize=(5.5 * len(res["sets"]), 4), squeeze=False
    )
    for ax, s in zip(axes[0], res["sets"]):
        for family, style in zip(FAMILIES, ("o-", "s-", "v-", "^--", "D-", "*")):
            rows = [r for r in s["rows"] if r["family"] == family]
            label = {
                "uniform": "uniform rk4 budget",
                "fitted": "fitted rk4 budget",
                "dopri5": "dopri5, rtol = atol = 1e-2 ... 1e-5",
                "log_likelihood": "log_likelihood (its checks included)",
            }.get(family, f"library {family}")
            ax.loglog(
                [r["nfe"] for r in rows], [max(r["mae"], 1e-12) for r in rows], style, label=label
            )
        ax.axhline(TARGET, color="grey", lw=0.8, ls=":", label=f"{TARGET} nats")
        ax.set(title=s["data"], xlabel="NFE per sample", ylabel="mean |log p - reference| (nats)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("2d", "digits", "both"), default="both")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--figures", type=Path, default=FIGURES, help="where the figure goes")
    p.add_argument("--name", default="fm_likelihood")
    p.add_argument(
        "--iters", type=int, default=None, help="flow-matching iterations (default per data set)"
    )
    p.add_argument(
        "--budgets", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 12, 16], help="rk4 steps"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    budgets, sets = (1, 2) if args.quick else tuple(args.budgets), []
    for name in ("2d", "digits") if args.data == "both" else (args.data,):
        cfg = {**SETS[name], **(QUICK if args.quick else {})}
        cfg["iters"] = args.iters or cfg["iters"]
        sets.append(run_set(name, cfg, budgets, args.seed))
    res = dict(target_nats=TARGET, sets=sets)
    res = write(args.out, args.name, res, markdown(res), command("fm_likelihood", argv))
    figure(res, args.figures / f"{args.name}.png")
    return res


if __name__ == "__main__":
    main()
