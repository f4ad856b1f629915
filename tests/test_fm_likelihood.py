"""benchmarks.fm_likelihood: budgeted likelihoods of flow-matching models against Meta's library.

The analytic case is the exact conditional-OT velocity for data N(mu, s^2 I) from noise N(0, I):
along x_t = t x_1 + (1 - t) x_0 the marginal is N(t mu, sigma_t^2 I) with sigma_t^2 = t^2 s^2 + (1
- t)^2, so

    u_t(x) = mu + (t s^2 - (1 - t)) / sigma_t^2 (x - t mu),

and the flow's log p at t = 1 is log N(x; mu, s^2 I) in closed form.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.scoring import flow_log_likelihood

pytest.importorskip("flow_matching")
fm = importlib.import_module("benchmarks.fm_likelihood")  # it imports Meta's flow_matching
MU, S = torch.tensor([1.0, -0.5]), 0.5


def horizon_logp(horizon, field, x, budgeted=True):
    """The scoring function of flow-matching likelihoods, with the benchmark's N(0, I) base."""
    return flow_log_likelihood(horizon, field, x, fm.log_p0, budgeted)


class Gaussian(nn.Module):
    """The exact flow-matching velocity of N(MU, S^2 I) under CondOTScheduler."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).to(x).reshape(-1, 1)
        mu = MU.to(x)
        return mu + (t * S**2 - (1 - t)) / (t**2 * S**2 + (1 - t) ** 2) * (x - t * mu)


def _closed_form(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    return (
        -0.5 * ((x - MU.to(x)) / S).pow(2).sum(1)
        - d * math.log(S)
        - 0.5 * d * math.log(2 * math.pi)
    )


def _setup(n: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = MU.double() + S * torch.randn(n, 2, generator=g, dtype=torch.float64)
    counter = fm.Counter(Gaussian())
    return x, counter, fm.Dynamics(counter)


def _horizon(n: int) -> fm.LearnableHorizon:
    return fm.LearnableHorizon(T0=1.0, budget=fm.Budget(n, reference=fm.REFERENCE)).double().eval()


def test_reference_library_and_budget_match_the_closed_form():
    x, counter, field = _setup()
    exact = _closed_form(x)
    # dopri5 1e-7 from t = 1 back to t = 0
    ref = horizon_logp(_horizon(1), field, x, budgeted=False)
    assert (ref - exact).abs().max() < 1e-6  # measured 1e-7
    # data at t = 1, noise at t = 0, as the library has it
    library = fm.library_logp(counter, x, "midpoint", 1 / 512)
    assert (library - exact).abs().max() < 1e-5  # measured 1.2e-6
    assert (library - ref).abs().max() < 1e-5
    h = _horizon(4)
    uniform = (horizon_logp(h, field, x) - exact).abs().mean()
    train, _, _ = _setup(64, seed=1)  # fitted on other points than it is scored on
    before, after = fm.fit(h, field, train, steps=60)
    fitted = (horizon_logp(h, field, x) - exact).abs().mean()
    assert after < before and fitted < 0.8 * uniform  # measured 1.8e-4 against 4.9e-4
    assert fitted < 5e-4


def test_the_uniform_budget_is_the_librarys_rk4_and_the_trace_is_the_librarys():
    x, counter, field = _setup(50)
    uniform = horizon_logp(_horizon(3), field, x)
    assert (uniform - fm.library_logp(counter, x, "rk4", 1 / 3)).abs().max() < 1e-10
    mlp = fm.MLP(64, 32).double()
    z = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64)
    v, div = fm.Dynamics(mlp)(t, (z, z.new_zeros(5)))
    # the library's trace
    loop = sum(torch.autograd.grad(mlp(z, t)[:, i].sum(), z)[0][:, i] for i in range(64))
    assert torch.allclose(div, loop, atol=1e-12) and torch.equal(v, mlp(z, t))


def test_nfe_counts_are_one_per_step_for_euler_two_for_midpoint_four_for_rk4():
    x, counter, field = _setup(8)
    for method, step, expected in [
        ("euler", 1 / 8, 8),
        ("euler", 1 / 256, 256),
        ("midpoint", 1 / 8, 16),
    ]:
        assert fm.counted(counter, fm.library_logp, counter, x, method, step)[1] == expected
    for n in (1, 3, 6):
        assert fm.counted(counter, horizon_logp, _horizon(n), field, x)[1] == 4 * n


def test_quick_run_writes_json_markdown_and_figure(tmp_path: Path):
    res = fm.main(["--quick", "--out", str(tmp_path), "--figures", str(tmp_path), "--name", "q"])
    saved = json.loads((tmp_path / "q.json").read_text())
    assert (
        saved["command"].startswith("python -m benchmarks.fm_likelihood --quick")
        and saved["target_nats"] == 0.002
    )
    assert (
        [s["data"] for s in saved["sets"]]
        == ["8gaussians", "digits"]
        == [s["data"] for s in res["sets"]]
    )
    for s in saved["sets"]:
        assert set(s["reached"]) == set(fm.FAMILIES)
        assert {"reference", "rows", "fits", "library_best", "ratio", "check"} <= set(s)
        assert {"cheapest_baseline", "feature_ratio"} <= set(s)
        (feature,) = [r for r in s["rows"] if r["family"] == "log_likelihood"]
        # its estimate against the truth on every held-out sample, and whether 2 se covered it
        assert feature["covered"] == (
            abs(feature["true_error"] - feature["estimated_error"]) <= 2 * feature["estimated_se"]
        )
        dopri5 = [r["setting"] for r in s["rows"] if r["family"] == "dopri5"]
        assert dopri5[0] == "rtol = atol = 0.01"
        assert {r["family"] for r in s["rows"]} == set(fm.FAMILIES)
        euler = [r for r in s["rows"] if r["family"] == "euler"]
        assert [r["nfe"] for r in euler] == [2, 4, 8][: len(euler)]
        assert all(
            r["nfe"] == 4 * int(r["setting"].split()[-1])
            for r in s["rows"]
            if r["family"] == "fitted"
        )
        assert all({"nfe", "mae", "nll"} <= set(r) for r in s["rows"])
    assert "mae_bpd" in saved["sets"][1]["rows"][0]
    md = (tmp_path / "q.md").read_text()
    assert (
        "| 8gaussians |" in md
        and "| digits |" in md
        and "Command: `python -m benchmarks.fm_likelihood" in md
    )
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
