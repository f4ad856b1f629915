"""The energy targets, their reference samples, the estimators and the reverse-KL benchmark."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate

from benchmarks import energy
from benchmarks.harness.cnf import ConcatSquashLinear, build_toy_model, standard_normal_logprob
from benchmarks.harness.energies import (
    DW4,
    GMM40,
    ManyWell,
    effective_sample_size,
    energy_w1,
    metropolis,
    split_rhat,
)
from benchmarks.scoring import energy_metrics

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- Many-Well


def test_many_well_log_z_is_the_quadrature_and_fabs_value() -> None:
    target = ManyWell(dim=32)
    z1, _ = integrate.quad(
        lambda x: math.exp(0.5 * x + 6 * x**2 - x**4), -np.inf, np.inf, epsabs=0, epsrel=1e-12
    )
    assert target.log_z1 == pytest.approx(math.log(z1), abs=1e-9)
    assert target.log_Z == pytest.approx(
        16 * (math.log(z1) + 0.5 * math.log(2 * math.pi)), abs=1e-8
    )
    # the value FAB reports for its 32-D Many-Well
    assert target.log_Z == pytest.approx(164.69568, abs=1e-4)


def test_many_well_energy_is_fabs_double_well_per_pair() -> None:
    target = ManyWell(dim=4)
    x = torch.tensor([[1.5, -0.3, -2.0, 0.7]], dtype=torch.float64)
    well = lambda d: -0.5 * d - 6 * d**2 + d**4  # noqa: E731
    expected = well(1.5) + 0.5 * 0.3**2 + well(-2.0) + 0.5 * 0.7**2
    assert target.energy(x).item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="dim must be a positive even number"):
        ManyWell(dim=3)


def test_many_well_samples_are_exact() -> None:
    target = ManyWell(dim=4)
    x = target.reference(200_000, seed=3)
    z1 = integrate.quad(lambda d: math.exp(0.5 * d + 6 * d**2 - d**4), -6, 6, epsrel=1e-12)[0]
    mean = (
        integrate.quad(lambda d: d * math.exp(0.5 * d + 6 * d**2 - d**4), -6, 6, epsrel=1e-12)[0]
        / z1
    )
    right = (
        integrate.quad(lambda d: math.exp(0.5 * d + 6 * d**2 - d**4), 0, 6, epsrel=1e-12)[0] / z1
    )
    se = 1.0 / math.sqrt(x.shape[0] * 2)  # both well coordinates, std below 2
    assert x[:, 0::2].mean().item() == pytest.approx(mean, abs=4 * 2 * se)
    assert (x[:, 0::2] > 0).double().mean().item() == pytest.approx(right, abs=4 * 0.5 * se)
    assert x[:, 1::2].std().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(x, target.reference(200_000, seed=3))  # seeded


# ----------------------------------------------------------------------------- GMM-40


def test_gmm40_is_a_normalized_mixture_of_fabs_recipe() -> None:
    target = GMM40()
    assert target.means.shape == (40, 2) and target.means.abs().max() <= 40 and target.log_Z == 0.0
    assert target.std == pytest.approx(math.log(1 + math.e))  # softplus(1)
    grid = torch.linspace(-48, 48, 1601, dtype=torch.float64)  # 6 std beyond the outermost means
    x = torch.cartesian_prod(grid, grid)
    mass = torch.exp(-target.energy(x)).sum() * (grid[1] - grid[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=1e-6)  # so log Z = 0
    # near one mode, far from the rest
    one = target.means[7:8] + torch.tensor([[0.3, -1.1]], dtype=torch.float64)
    direct = (
        -math.log(1 / 40)
        + 0.5 * (0.3**2 + 1.1**2) / target.std**2
        + math.log(2 * math.pi * target.std**2)
    )
    assert target.energy(one).item() <= direct + 1e-9  # the other modes only add mass


def test_gmm40_samples_are_exact() -> None:
    target = GMM40()
    x = target.reference(100_000, seed=2)
    nearest = torch.cdist(x, target.means).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=40).double() / x.shape[0]
    assert counts.min() > 0.02 and counts.max() < 0.03  # each mode 1/40 (modes barely overlap)
    resid = x - target.means[nearest]
    assert resid.std(dim=0).max().item() == pytest.approx(target.std, rel=0.03)
    assert torch.equal(x, target.reference(100_000, seed=2))


# ----------------------------------------------------------------------------- DW-4


def test_dw4_energy_is_the_pair_double_well_plus_the_centre_of_mass_term() -> None:
    target = DW4()
    # a 3 x 4 rectangle
    x = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0, 4.0, 3.0, 4.0]], dtype=torch.float64)
    d = torch.tensor([3.0, 4.0, 5.0, 5.0, 4.0, 3.0]) - 4.0
    com = torch.tensor([1.5, 2.0])
    expected = (0.9 * d**4 - 4 * d**2).sum() + 0.5 * 4 * com.pow(2).sum()
    assert target.energy(x).item() == pytest.approx(expected.item(), abs=1e-10)


def test_dw4_symmetry_moves_keep_the_energy() -> None:
    target = DW4()
    x = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    y = target.symmetry(x, torch.Generator().manual_seed(1))
    assert not torch.allclose(x, y)
    torch.testing.assert_close(target.energy(y), target.energy(x), rtol=1e-10, atol=1e-10)


def test_metropolis_samples_a_gaussian_and_tempering_balances_two_wells() -> None:
    x, info = metropolis(lambda x: 0.5 * x.pow(2).sum(1), 2, chains=200, steps=2000, seed=0)
    assert x.mean().abs().item() < 0.05 and x.var().item() == pytest.approx(1.0, abs=0.05)
    assert info["rhat_energy"] < 1.02 and 0.2 < info["acceptance"] < 0.4
    # A 1-D double well with a barrier of 8 (kT): plain chains stay where they start, tempering
    # mixes them.
    well = lambda x: 2 * (x[:, 0].pow(2) - 4).pow(2) / 4  # noqa: E731
    side = {"side": lambda x: (x[:, 0] > 0).double()}
    _, stuck = metropolis(well, 1, chains=100, steps=2000, seed=0, init_scale=3.0, statistics=side)
    x, mixed = metropolis(
        well,
        1,
        chains=100,
        steps=2000,
        seed=0,
        init_scale=3.0,
        statistics=side,
        betas=(1.0, 0.5, 0.25, 0.1),
    )
    assert stuck["rhat_side"] > 1.5 and mixed["rhat_side"] < 1.05
    assert (x[:, 0] > 0).double().mean().item() == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="betas must start at 1.0"):
        metropolis(well, 1, chains=2, steps=2, betas=(0.5, 1.0))


# ----------------------------------------------------------------------------- estimators


def test_effective_sample_size_closed_forms() -> None:
    assert effective_sample_size(torch.zeros(10)) == pytest.approx(1.0)
    w = torch.tensor([1.0, 2.0, 3.0])
    assert effective_sample_size(w.log()) == pytest.approx(36 / (3 * 14))
    assert effective_sample_size(
        torch.tensor([0.0, -math.inf, -math.inf, -math.inf])
    ) == pytest.approx(0.25)
    # NaN: no weight
    assert effective_sample_size(torch.tensor([0.0, math.nan])) == pytest.approx(0.5)
    assert effective_sample_size(torch.full((3,), math.nan)) == 0.0
    # no overflow
    assert effective_sample_size(torch.tensor([1000.0, 1000.0])) == pytest.approx(1.0)


def test_energy_w1_and_split_rhat() -> None:
    u = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert energy_w1(u + 0.3, u) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="the same size"):
        energy_w1(u, u[:10])
    iid = torch.randn(8, 2000, generator=torch.Generator().manual_seed(1))
    assert split_rhat(iid) < 1.01
    assert split_rhat(iid + torch.arange(8.0)[:, None]) > 2


# ----------------------------------------------------------------------------- the reverse KL


class _Gaussian:
    """U = |x|^2 / 2 in 2-D: the base itself, log Z = log 2 pi."""

    dim, name, log_Z = 2, "gaussian", math.log(2 * math.pi)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.pow(2).sum(1)

    def reference(self, n: int, seed: int = 0) -> torch.Tensor:
        return torch.randn(
            n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )


def _identity_cnf(budget: int | None = None) -> torch.nn.Module:
    model = build_toy_model(
        hidden=(8,), dim=2, T0=1.0, time_mode="fixed", budget=budget, count=True
    ).double()
    last = [m for m in model.modules() if isinstance(m, ConcatSquashLinear)][-1]
    for name in ("linear", "hyper_bias"):
        for p in getattr(last, name).parameters():
            torch.nn.init.zeros_(p)  # f = 0: the identity map
    return model


def test_reverse_kl_is_zero_on_the_target_and_log_q_matches_the_forward_density() -> None:
    model, target = _identity_cnf(), _Gaussian()
    z = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kl, reg = energy.reverse_kl(model, target, z)
    assert kl.item() + target.log_Z == pytest.approx(0.0, abs=1e-10) and reg.item() == 0.0
    # A trained-looking field: log q from the sampling solve equals the density of the sample,
    # solved forward.
    torch.manual_seed(0)
    tight = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-10}
    model = build_toy_model(
        hidden=(16, 16), dim=2, T0=1.0, time_mode="fixed", solver_kwargs=tight
    ).double()
    x, logq, _ = model(z[:20], standard_normal_logprob(z[:20]), reverse=True)
    back, delta, _ = model(x.detach(), x.new_zeros(20))
    assert (x.detach() - z[:20]).abs().max() > 0.05  # the map is not the identity
    torch.testing.assert_close(back, z[:20], atol=1e-7, rtol=0)
    torch.testing.assert_close(
        standard_normal_logprob(back) - delta, logq.detach(), atol=1e-7, rtol=0
    )


def test_score_on_the_exact_flow_gives_full_ess_and_log_z() -> None:
    target = _Gaussian()
    out = energy_metrics(_identity_cnf(budget=2), target, target.reference(400), seed=0)
    assert out["ess"] == pytest.approx(100.0) and out["ess_on_budget"] == pytest.approx(100.0)
    assert out["log_Z_error"] == pytest.approx(0.0, abs=1e-9) and out[
        "reverse_kl"
    ] == pytest.approx(0.0, abs=1e-9)
    assert out["nonfinite"] == 0 and out["score_nfe"] > 0
    assert out["nll_reference"] == pytest.approx(
        -standard_normal_logprob(target.reference(400)).mean().item()
    )


def test_score_pools_independent_sets_and_keeps_the_first_sets_draws() -> None:
    target = ManyWell(dim=4)
    torch.manual_seed(0)
    model = build_toy_model(hidden=(8,), dim=4, T0=1.0, time_mode="fixed", budget=2)
    ref = target.reference(50, seed=1)
    one = energy_metrics(model, target, ref, seed=3, draws=1)
    three = energy_metrics(model, target, ref, seed=3, draws=3)
    assert one["draws"] == 1 and three["draws"] == 3 and len(three["ess_draws"]) == 3
    # the first set is the single-draw score's, sample for sample
    assert three["ess_draws"][0] == pytest.approx(one["ess"], rel=1e-12)
    assert one["energy_w1"] == pytest.approx(three["energy_w1"], rel=1e-12)
    assert one["score_nfe"] == three["score_nfe"]
    assert len(set(three["ess_draws"])) == 3  # independent sets
    assert 0 < three["ess"] <= 100 and "ess_on_budget" in three  # % of the 150 pooled


def _train(runs: Path, target: str, seconds: float, checkpoints: int, batch: int, *configs: str):
    """A short energy run of each configuration into ``runs``."""
    size = [
        "--cpu-seconds",
        str(seconds),
        "--checkpoints",
        str(checkpoints),
        "--batch",
        str(batch),
    ]
    energy.main(["train", "--target", target, *size, "--configs", *configs, "--runs", str(runs)])


def test_report_rescores_a_checkpoint_scored_on_another_number_of_sets(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _train(runs, "manywell", 0.3, 1, 8, "b2")
    common = ["--runs", str(runs), "--n", "32", "--out", str(tmp_path), "--name", "t"]
    energy.main(["report", *common, "--draws", "1", "--figures", str(tmp_path)])
    (path,) = runs.glob("*/b2.pt")
    assert torch.load(path, weights_only=False)["checkpoints"][0]["score"]["draws"] == 1
    res = energy.main(["report", *common, "--draws", "2", "--figures", str(tmp_path)])
    assert len(res["rows"][0]["ess_draws"]) == 2
    assert torch.load(path, weights_only=False)["checkpoints"][0]["score"]["draws"] == 2
    assert "on 2 independent sets of 32 samples" in (tmp_path / "t.md").read_text()


def test_benchmark_trains_scores_and_reports(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _train(runs, "manywell", 1, 2, 16, "dopri5", "b2")
    res = energy.main([
        "report", "--runs", str(runs), "--n", "64", "--out", str(tmp_path),
        "--figures", str(tmp_path), "--name", "t",
    ])  # fmt: skip
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["dopri5", "b2"]
    b2, base = rows["b2"], rows["dopri5"]
    assert b2["budget"] == 2 and base["budget"] is None and b2["guard"]["checks"] >= 1
    assert (
        len(b2["curve"]) == 2
        and b2["curve"][0]["cpu"] >= 0.5
        and b2["nfe"] >= b2["curve"][0]["nfe"]
    )
    assert 0 <= b2["ess"] <= 100 and "ess_on_budget" in b2 and "ess_on_budget" not in base
    assert base["log_Z_error"] == pytest.approx(base["log_Z_estimate"] - ManyWell().log_Z)
    if base["ess"] >= 2:  # the dopri5 run reaches its own final ESS - 2, by interpolation
        assert 0 < base["reach_cpu_ratio"] <= 1
    else:  # under 2 % there is no goal to reach: no ratio, and the summary says the race is open
        assert base["reach_cpu_ratio"] is None
        assert "open: dopri5 under 2 %" in (tmp_path / "t_summary.md").read_text()
    text = (tmp_path / "t.md").read_text()
    assert (
        "Reference: exact samples." in text
        and "| 2 rk4 steps, guard |" in text
        and "Command:" in text
    )
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["config"] == "dopri5"
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("t_*.png"))  # sample pictures only for 2-D targets


def test_a_resumed_run_trains_as_the_uninterrupted_one(tmp_path: Path) -> None:
    def train(runs: Path, seconds: float, checkpoints: int) -> dict:
        _train(runs, "gmm40", seconds, checkpoints, 16, "b2")
        return torch.load(runs / "gmm40-s0" / "b2.pt", weights_only=False)

    whole = train(tmp_path / "a", 1.0, 2)
    half = train(tmp_path / "b", 0.5, 1)
    assert half["resumed"] == []
    resumed = train(tmp_path / "b", 1.0, 2)  # goes on from its mark at 0.5 s
    assert resumed["resumed"] == [{"iteration": len(half["log"]), "cpu": half["log"][-1]["cpu"]}]
    assert [c["mark"] for c in resumed["checkpoints"]] == [0.5, 1.0]
    n = min(len(whole["log"]), len(resumed["log"]))
    assert n > len(half["log"]) + 5
    for key in ("loss", "nfe"):  # the same iterates, evaluation for evaluation
        assert [e[key] for e in whole["log"][:n]] == [e[key] for e in resumed["log"][:n]]
    done = train(tmp_path / "b", 1.0, 2)  # nothing left to train
    assert len(done["log"]) == len(resumed["log"])


def test_a_run_still_training_is_left_out_of_scoring_and_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    _train(runs, "gmm40", 0.3, 1, 8, "dopri5", "b2")
    path = runs / "gmm40-s0" / "b2.pt"
    run = torch.load(path, weights_only=False)
    torch.save({**run, "cpu_seconds": 0.6}, path)  # as a trainer going on to 0.6 s writes it
    before = path.read_bytes()
    res = energy.main(["report", "--runs", str(runs), "--n", "32", "--out", str(tmp_path),
                       "--figures", str(tmp_path), "--name", "t"])  # fmt: skip
    assert [r["config"] for r in res["rows"]] == ["dopri5"] and path.read_bytes() == before
    assert "b2.pt: left out, trained to 0.3 of 0.6 s" in capsys.readouterr().out


def test_benchmark_draws_a_two_dimensional_target(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _train(runs, "gmm40", 0.5, 1, 16, "b2")
    res = energy.main([
        "report", "--runs", str(runs), "--n", "64", "--out", str(tmp_path),
        "--figures", str(tmp_path), "--name", "t",
    ])  # fmt: skip
    (row,) = res["rows"]
    # log Z = 0
    assert row["run"] == "gmm40-s0, 0.5 s" and row["log_Z_error"] == pytest.approx(
        row["log_Z_estimate"]
    )
    assert (tmp_path / "t_gmm40-s0.png").read_bytes()[:4] == b"\x89PNG"


def test_reverse_kl_example_runs_on_a_budget_and_adaptive() -> None:
    spec = importlib.util.spec_from_file_location(
        "reverse_kl", ROOT / "examples" / "reverse_kl.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    budget = example.main(["--iters", "6"])
    adaptive = example.main(["--iters", "2", "--budget", "0"])
    assert 0 < budget["ess"] <= 100 and math.isfinite(budget["log_Z"]) and budget["nfe"] > 6 * 16
    assert 0 < adaptive["ess"] <= 100 and adaptive["nfe"] > 0


def test_the_crossing_is_interpolated_between_checkpoints() -> None:
    run = {
        "checkpoints": [
            {"cpu": 10.0, "nfe": 100, "score": {"ess": 1.0}},
            {"cpu": 20.0, "nfe": 200, "score": {"ess": 5.0}},
            {"cpu": 30.0, "nfe": 400, "score": {"ess": 9.0}},
        ]
    }
    assert energy._crossing(run, 7.0) == pytest.approx((25.0, 300.0))
    assert energy._crossing(run, 0.5) == pytest.approx((5.0, 50.0))  # from the start, at 0
    assert energy._crossing(run, 10.0) is None and energy._crossing(run, -1.0) is None
