"""How the benchmarks score a model: one solve (dopri5 at 1e-5) and one function per kind of model.

Every benchmark scores with :data:`SOLVE`, the library's default reference
(:data:`torch_tempopt.budget.DEFAULT_REFERENCE`), outside its training clocks and NFE counts, and
with its own random draws fixed by a seed, so every configuration and checkpoint sees the same
ones:

``upstream_bits_per_dim``
    Upstream FFJORD's image model (``benchmarks.images_score``): held-out bits/dim in ``eval()``.
``flow_log_likelihood``
    A flow-matching model's velocity through a budget or its reference
    (``benchmarks.fm_likelihood``).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterable, Iterator

import numpy
import torch
from torch import Tensor, nn

from benchmarks.harness.cnf import (
    CNF,
    bits_per_dim_and_reg,
    nfe,
    nll_and_reg,
    standard_normal_logprob,
)
from benchmarks.harness.energies import effective_sample_size, energy_w1
from torch_tempopt import LearnableHorizon
from torch_tempopt.budget import DEFAULT_REFERENCE

__all__ = [
    "SOLVE",
    "adaptive",
    "cnf_nll",
    "energy_metrics",
    "flow_log_likelihood",
    "upstream_bits_per_dim",
    "upstream_toy_nll",
]

#: The scoring solve of every benchmark: dopri5 at rtol = atol = 1e-5.
SOLVE: dict[str, Any] = dict(DEFAULT_REFERENCE)


@torch.no_grad()
def upstream_bits_per_dim(
    model: nn.Module,
    test_loader: Iterable[tuple[Tensor, Any]],
    bits_per_dim: Callable[[Tensor, nn.Module], Tensor],
    count_nfe: Callable[[nn.Module], int],
    seed: int = 1234,
) -> dict[str, Any]:
    """Held-out bits/dim of upstream FFJORD's image model, solved in ``eval()`` by its test solver.

    ``bits_per_dim`` and ``count_nfe`` are upstream's (``train_cnf.compute_bits_per_dim``,
    ``train_misc.count_nfe``); its test solver is :data:`SOLVE` (``images.score_argv``). ``seed``
    fixes the dequantization noise and the Hutchinson probes, the same for every checkpoint.
    """
    model.eval()
    torch.manual_seed(seed)
    total, n, nfe, start = 0.0, 0, 0, time.process_time()
    for x, _ in test_loader:
        total += float(bits_per_dim(x, model)) * x.shape[0]
        n += x.shape[0]
        nfe += count_nfe(model)
    return {
        "bits_per_dim": total / n,
        "images": n,
        "score_nfe": nfe,
        "score_cpu_seconds": time.process_time() - start,
    }


def flow_log_likelihood(
    horizon: LearnableHorizon,
    field: nn.Module,
    x: Tensor,
    log_p0: Callable[[Tensor], Tensor],
    budgeted: bool = True,
) -> Tensor:
    """log p(x) of a flow-matching model from the data (t = 1) back to the noise (t = 0).

    ``field`` returns (dx/dt, d log det/dt); the solve is the horizon's budget or, with
    ``budgeted=False``, its reference.
    """
    with torch.no_grad(), horizon.budgeted(budgeted):
        z, logdet = (s[-1] for s in horizon(field, (x, x.new_zeros(x.shape[0])), reverse=True))
    return log_p0(z) + logdet


@contextlib.contextmanager
def adaptive(model: nn.Module, solve: dict[str, Any] = SOLVE) -> Iterator[None]:
    """Within the block every harness CNF block solves by ``solve`` (odeint), budget or not."""
    blocks = [m for m in model.modules() if isinstance(m, CNF)]
    saved = [(b.solver_kwargs, b.adjoint) for b in blocks]
    with contextlib.ExitStack() as stack:
        for b in blocks:  # a budget's reference is the call's own settings: these
            b.solver_kwargs, b.adjoint = dict(solve), False
            if b.horizon.budget is not None:
                stack.enter_context(b.horizon.budgeted(False))
        try:
            yield
        finally:
            for b, (kwargs, adjoint) in zip(blocks, saved):
                b.solver_kwargs, b.adjoint = kwargs, adjoint


def cnf_nll(
    model: nn.Module, test: Tensor, *, image: bool, seed: int, batch_size: int = 10000
) -> float:
    """The mean NLL of ``test`` under a harness CNF in ``eval()``: nats, or bits/dim of images.

    The probes and the dequantization noise come from ``seed`` (torch's global RNG is seeded: the
    caller forks it if it must survive). The blocks solve as they are set: within :func:`adaptive`
    by the scoring solve, within ``horizon.budgeted()`` on their budgets.
    """
    torch.manual_seed(seed)
    dequant = torch.Generator().manual_seed(seed)
    model.eval()
    dtype, total = next(model.parameters()).dtype, 0.0
    for chunk in test.split(batch_size):
        if image:
            value = bits_per_dim_and_reg(model, chunk, dequant)[0]
        else:
            value = nll_and_reg(model, chunk.to(dtype))[0]
        total += float(value) * chunk.shape[0]
    return total / test.shape[0]


@torch.no_grad()
def energy_metrics(
    model: nn.Module, target: Any, ref: Tensor, seed: int, draws: int = 5
) -> dict[str, Any]:
    """An energy-trained CNF against ``ref``, samples of the target, by its ``eval()`` solve.

    ``draws`` independent sets of N = len(ref) samples from the model, pooled: the effective
    sample size (% of draws x N) of exp(-U - log q), and beside it each set's own ESS (% of N,
    ``ess_draws``: how much one N-sample estimate moves), the reverse KL (plus log Z where
    known), log Z's importance-sampling estimate and, for a budget, the ESS that its own log q
    claims on the same draws (``ess_on_budget``). From the first set and ``ref``: the energies'
    1-Wasserstein distance; and the NLL of ``ref``; the scoring NFE of one set. The first set is
    the one a single-draw score used.
    """
    model.eval()
    n = ref.shape[0]
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(10_000 + seed)
    z = torch.cat([torch.randn(n, target.dim, generator=gen, dtype=dtype) for _ in range(draws)])
    nfe(model, reset=True)
    x, logq = zip(*(model(c, standard_normal_logprob(c), reverse=True)[:2] for c in z.split(n)))
    score_nfe = nfe(model, reset=True)["forward"] // draws
    x, logq = torch.cat(x), torch.cat(logq)
    u = target.energy(x)
    log_w = -u - logq
    ref = ref.to(z.dtype)
    zr, delta, _ = model(ref, ref.new_zeros(n))
    nll_ref = -(standard_normal_logprob(zr) - delta.reshape(-1))
    finite = torch.isfinite(log_w)
    log_z = -math.inf
    if finite.any():
        log_z = float(torch.logsumexp(log_w[finite], 0) - math.log(log_w.numel()))
    u_finite = torch.where(torch.isfinite(u), u, u.new_tensor(1e30))
    out = {
        "ess": 100 * effective_sample_size(log_w),
        "ess_draws": [100 * effective_sample_size(w) for w in log_w.split(n)],
        "draws": draws,
        "reverse_kl": float((logq + u)[finite].mean()),
        "log_Z_estimate": log_z,
        "nll_reference": float(nll_ref.mean()),
        "energy_w1": energy_w1(u_finite[:n], target.energy(ref)),
        "nonfinite": int((~finite).sum()),
        "score_nfe": score_nfe,
    }
    if target.log_Z is not None:
        out.update(reverse_kl=out["reverse_kl"] + target.log_Z, log_Z_error=log_z - target.log_Z)
    h = model.chain[0].horizon
    if h.budget is not None:  # what the budget's own log q claims about its own samples
        with h.budgeted():
            xb, logqb = zip(
                *(model(c, standard_normal_logprob(c), reverse=True)[:2] for c in z.split(n))
            )
        out["ess_on_budget"] = 100 * effective_sample_size(
            -target.energy(torch.cat(xb)) - torch.cat(logqb)
        )
    model.train()
    return out


@torch.no_grad()
def upstream_toy_nll(model: nn.Module, x: Tensor, chunk: int = 1000) -> float:
    """The mean NLL (nats) of 2-D points under upstream FFJORD's toy model by its eval() solve."""
    model.eval()
    total = 0.0
    for c in x.split(chunk):
        z, delta = model(c, torch.zeros(c.shape[0], 1))
        logpz = -0.5 * z.pow(2).sum(1, keepdim=True) - numpy.log(2 * numpy.pi)
        total += float((logpz - delta).sum())
    return -total / x.shape[0]
