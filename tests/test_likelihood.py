"""torch_tempopt.likelihood: budgeted log-likelihoods against an accurate solve, float64."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

from torch_tempopt.likelihood import log_likelihood

D = 3


def _velocity() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))
    return net.double()


def _field(net: torch.nn.Module):
    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * net(torch.cat([x, t.to(x).expand(x.shape[0], 1)], 1))

    return velocity


def log_p0(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def _accurate(velocity, x: torch.Tensor, t: tuple[float, float]) -> torch.Tensor:
    """log p by dopri5 at 1e-10 with the exact divergence, written out by hand."""

    def aug(s: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        with torch.enable_grad():
            y = state[0].detach().requires_grad_(True)
            v = velocity(s, y)
            div = sum(torch.autograd.grad(v[:, i].sum(), y, retain_graph=True)[0][:, i]
                      for i in range(D))  # fmt: skip
        return v.detach(), div.detach()

    ts = torch.tensor(t, dtype=x.dtype)
    with torch.no_grad():
        z, div = torchdiffeq.odeint(aug, (x, x.new_zeros(len(x))), ts, rtol=1e-10, atol=1e-10)
    return log_p0(z[-1]) + div[-1]


@pytest.mark.parametrize("t", [(1.0, 0.0), (0.0, 1.5)])
def test_the_budget_is_within_tol_and_its_estimate_covers_the_true_error(t) -> None:
    velocity = _velocity()
    x = torch.randn(400, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    truth = _accurate(_field(velocity), x, t)
    out = log_likelihood(_field(velocity), x, log_p0, t=t, tol=1e-3, check=40,
                         generator=torch.Generator().manual_seed(2))  # fmt: skip
    d = (truth - out.log_p) / (D * math.log(2))
    assert out.steps >= 2 and out.checked == 40
    assert float(d.abs().mean()) <= 1e-3  # what was promised, on all 400
    assert abs(float(d.mean()) - out.error) <= 3 * out.error_se + 1e-9  # the estimate covers it
    assert out.abs_error <= 1e-3  # the estimate it accepted the budget on
    # the cost: the reference on 40 of 400, then 4 evaluations a step for every sample
    assert out.nfe >= 4 * out.steps and out.nfe < 4 * out.steps * 3 + out.reference_nfe


def test_a_tighter_tol_takes_more_steps_and_a_looser_reference_is_its_own() -> None:
    velocity = _velocity()
    x = torch.randn(200, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loose = log_likelihood(_field(velocity), x, log_p0, tol=1e-2)
    exact = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-10}
    tight = log_likelihood(_field(velocity), x, log_p0, tol=1e-7, reference=exact)
    assert tight.steps > loose.steps and tight.abs_error < loose.abs_error
    sloppy = log_likelihood(_field(velocity), x, log_p0, tol=1e-2,
                            reference={"method": "bosh3", "rtol": 1e-3, "atol": 1e-3})  # fmt: skip
    assert sloppy.reference_nfe < tight.reference_nfe


def test_a_fitted_placement_counts_its_fit_and_stays_within_tol() -> None:
    velocity = _velocity()
    gen = torch.Generator().manual_seed(1)
    x, train = (torch.randn(200, D, dtype=torch.float64, generator=gen) for _ in range(2))
    plain = log_likelihood(_field(velocity), x, log_p0, tol=1e-4)
    fitted = log_likelihood(_field(velocity), x, log_p0, tol=1e-4, fit=train[:32])
    truth = _accurate(_field(velocity), x, (1.0, 0.0))
    assert float(((truth - fitted.log_p) / (D * math.log(2))).abs().mean()) <= 1e-4
    assert fitted.steps <= plain.steps
    assert fitted.nfe > plain.nfe  # the fit's Adam steps on 32 samples are paid for


def test_hutchinson_is_repeatable_and_unbiased() -> None:
    velocity = _velocity()
    x = torch.randn(2000, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = log_likelihood(_field(velocity), x, log_p0, tol=1e-3)

    def probe(seed: int):
        return log_likelihood(_field(velocity), x, log_p0, tol=1e-3, hutchinson=True,
                              generator=torch.Generator().manual_seed(seed))  # fmt: skip

    a, b = probe(0), probe(0)
    assert torch.equal(a.log_p, b.log_p)
    noise = a.log_p - exact.log_p
    assert float(noise.std()) > 1e-3  # the probes do add noise per sample
    assert abs(float(noise.mean())) < 4 * float(noise.std()) / math.sqrt(len(x))


def test_without_a_budget_within_tol_every_sample_is_the_references() -> None:
    velocity = _velocity()
    x = torch.randn(50, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="no budget of up to 3 rk4 steps was within tol=1e-09"):
        out = log_likelihood(_field(velocity), x, log_p0, tol=1e-9, max_steps=3)
    assert out.steps == 0
    truth = _accurate(_field(velocity), x, (1.0, 0.0))
    assert torch.allclose(out.log_p, truth, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.zeros(5)}, ValueError, r"at least 2 samples, one per row, got shape \(5,\)"),
        ({"t": (1.0, 1.0)}, ValueError, r"t must hold .* times, which differ, got \[1.0, 1.0\]"),
        ({"tol": 0.0}, ValueError, r"tol must be positive \(bits per dimension\), got 0.0"),
        ({"check": 1}, ValueError, "check must be at least 2, got 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be at least 1, got 0"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(kwargs, error, match) -> None:
    args = {"x": torch.zeros(5, D, dtype=torch.float64), **kwargs}
    x = args.pop("x")
    with pytest.raises(error, match=match):
        log_likelihood(lambda t, y: -y, x, log_p0, **args)


def test_batches_give_the_same_log_likelihoods() -> None:
    velocity = _velocity()
    x = torch.randn(60, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = log_likelihood(_field(velocity), x, log_p0, tol=1e-3, max_steps=4,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    parts = log_likelihood(_field(velocity), x, log_p0, tol=1e-3, max_steps=4, batch_size=7,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert whole.steps == parts.steps
    # the budget's solves are the same per sample; the reference's adaptive steps are per batch
    assert torch.allclose(whole.log_p, parts.log_p, atol=1e-6)
