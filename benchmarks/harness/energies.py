r"""Unnormalized targets :math:`p(x) \propto e^{-U(x)}` for CNFs trained by reverse KL.

Each target has ``dim``, ``energy(x)`` (U per sample, differentiable), ``log_Z`` (known, or
``None``) and ``reference(n, seed)``: samples of p, exact or from a long seeded MCMC run.

* :class:`ManyWell` (FAB, Midgley et al. 2023): ``dim / 2`` independent copies of FAB's 2-D double
  well, :math:`U(x_1, x_2) = x_1^4 - 6 x_1^2 - \tfrac12 x_1 + \tfrac12 x_2^2` (``a=-0.5, b=-6,
  c=1``), so :math:`2^{\mathrm{dim}/2}` modes. Its one-dimensional factor is integrated and
  inverted on a fine grid, so log Z and the samples are exact (to ~1e-9).
* :class:`DW4` (Köhler et al. 2020): 4 particles in 2-D, the pair potential :math:`a (d - d_0)^4 +
  b (d - d_0)^2` with ``a=0.9, b=-4, d0=4`` summed over the 6 pairs (bgflow's
  ``MultiDoubleWellPotential`` as E-NF and iDEM use it). U is translation invariant, so p is not
  normalizable on R^8; here the centre of mass gets the harmonic term :math:`\tfrac n2 |\bar x|^2`,
  the law of the mean of n standard normal particles, which a CNF with an N(0, I) base can
  represent and which leaves the relative coordinates' law unchanged. Its reference is a seeded
  random-walk Metropolis run over many chains (:func:`metropolis`) with its diagnostics
  (acceptance, split R-hat).
* :class:`GMM40` (FAB, as iDEM uses it): an equal mixture of 40 isotropic Gaussians in 2-D, the
  means uniform on [-40, 40]^2 (FAB's recipe, drawn in float64 from a generator seeded 0, so not
  FAB's exact means), each standard deviation softplus(1) = 1.313. The mixture is normalized, so
  log Z = 0, and its samples are exact. It is for pictures: its modes lie up to 57 base standard
  deviations apart, which reverse KL is known to collapse onto a few of.

References:
    | Flow Annealed Importance Sampling Bootstrap, Midgley et al., 2023
      (https://arxiv.org/abs/2208.01893)
    | Equivariant Flows: exact likelihood generative learning for symmetric densities, Köhler et
      al., 2020 (https://arxiv.org/abs/2006.02425)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DW4",
    "GMM40",
    "TARGETS",
    "ManyWell",
    "effective_sample_size",
    "energy_w1",
    "metropolis",
    "split_rhat",
]


class ManyWell:
    """FAB's Many-Well: ``dim / 2`` 2-D double wells (even coordinates: the well; odd: N(0, 1))."""

    name = "manywell"

    def __init__(self, dim: int = 32, a: float = -0.5, b: float = -6.0, c: float = 1.0) -> None:
        if dim <= 0 or dim % 2:
            raise ValueError(
                f"dim must be a positive even number (pairs of coordinates), got {dim}."
            )
        self.dim, self.a, self.b, self.c = dim, a, b, c
        self._grid = np.linspace(-5.0, 5.0, 400_001)
        log_f = -(a * self._grid + b * self._grid**2 + c * self._grid**4)
        shift = log_f.max()
        f = np.exp(log_f - shift)
        cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) * 0.5 * np.diff(self._grid))])
        # the double well's one-dimensional normalizer
        self.log_z1 = float(np.log(cdf[-1]) + shift)
        self._cdf = cdf / cdf[-1]
        self.log_Z: float | None = dim // 2 * (self.log_z1 + 0.5 * math.log(2 * math.pi))

    def energy(self, x: Tensor) -> Tensor:
        well, gauss = x[:, 0::2], x[:, 1::2]
        u = self.a * well + self.b * well.pow(2) + self.c * well.pow(4)
        return u.sum(dim=1) + 0.5 * gauss.pow(2).sum(dim=1)

    def reference(self, n: int, seed: int = 0) -> Tensor:
        """``n`` exact samples: the well coordinates by inverting the CDF, the others N(0, 1)."""
        rng = np.random.default_rng(seed)
        x = np.empty((n, self.dim))
        x[:, 0::2] = np.interp(rng.random((n, self.dim // 2)), self._cdf, self._grid)
        x[:, 1::2] = rng.standard_normal((n, self.dim // 2))
        return torch.as_tensor(x, dtype=torch.float64)


def _pair_distances(x: Tensor, n: int) -> Tensor:
    p = x.reshape(x.shape[0], n, -1)
    i, j = torch.triu_indices(n, n, offset=1)
    return (p[:, i] - p[:, j]).pow(2).sum(-1).clamp_min(1e-12).sqrt()


class DW4:
    """4 particles in 2-D, pairwise double wells, the centre of mass held by a harmonic term."""

    name = "dw4"

    def __init__(
        self,
        a: float = 0.9,
        b: float = -4.0,
        offset: float = 4.0,
        n_particles: int = 4,
        space: int = 2,
    ) -> None:
        self.a, self.b, self.offset, self.n, self.space = a, b, offset, n_particles, space
        self.dim, self.log_Z = n_particles * space, None
        # the tempering ladder of the reference
        self.betas = tuple(float(b) for b in np.geomspace(1.0, 0.1, 6))
        self._cache: dict[tuple[int, int], tuple[Tensor, dict[str, Any]]] = {}

    def pair_distances(self, x: Tensor) -> Tensor:
        return _pair_distances(x, self.n)

    def symmetry(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A random rotation about the centre of mass and relabelling of particles, per state."""
        p = x.reshape(x.shape[0], self.n, self.space)
        com = p.mean(dim=1, keepdim=True)
        q, r = torch.linalg.qr(
            torch.randn(x.shape[0], self.space, self.space, generator=generator, dtype=x.dtype)
        )
        # Haar-distributed orthogonal
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
        perm = torch.rand(x.shape[0], self.n, generator=generator).argsort(dim=1)
        p = torch.gather(p, 1, perm[..., None].expand_as(p))
        return ((p - com) @ q + com).reshape(x.shape)

    def energy(self, x: Tensor) -> Tensor:
        d = self.pair_distances(x) - self.offset
        com = x.reshape(x.shape[0], self.n, self.space).mean(dim=1)
        return (self.a * d.pow(4) + self.b * d.pow(2)).sum(dim=1) + 0.5 * self.n * com.pow(2).sum(
            dim=1
        )

    def reference(
        self, n: int, seed: int = 0, *, chains: int = 500, steps: int = 20_000
    ) -> Tensor:
        """``n`` samples of :func:`metropolis` (cached per seed), its diagnostics kept."""
        key = (seed, chains * 1000 + steps)
        if key not in self._cache:
            short = {
                "short_pairs": lambda x: (
                    (self.pair_distances(x) < self.offset).double().sum(dim=1)
                ),
                "coordinate_0": lambda x: x[:, 0],
            }
            self._cache[key] = metropolis(
                self.energy,
                self.dim,
                chains=chains,
                steps=steps,
                seed=seed,
                init_scale=2.0,
                betas=self.betas,
                statistics=short,
                symmetry=self.symmetry,
            )
        samples, self.diagnostics = self._cache[key]
        if n > samples.shape[0]:
            raise ValueError(
                f"n must be at most {samples.shape[0]} (the chains' kept samples), got {n}."
            )
        return samples[
            torch.randperm(samples.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        ]


class GMM40:
    """FAB's 2-D mixture of 40 Gaussians: equal weights, means uniform on [-40, 40]^2."""

    name = "gmm40"

    def __init__(self, n_modes: int = 40, loc_scaling: float = 40.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.means = (
            (torch.rand(n_modes, 2, generator=g, dtype=torch.float64) - 0.5) * 2 * loc_scaling
        )
        # softplus(1); a normalized density
        self.std, self.dim, self.log_Z = (
            math.log1p(math.e),
            2,
            0.0,
        )

    def energy(self, x: Tensor) -> Tensor:
        m = self.means.to(x)
        sq = (x[:, None, :] - m[None]).pow(2).sum(-1) / self.std**2
        log_n = -0.5 * sq - math.log(2 * math.pi * self.std**2)
        return -(torch.logsumexp(log_n, dim=1) - math.log(m.shape[0]))

    def reference(self, n: int, seed: int = 0) -> Tensor:
        """``n`` exact samples: a mode drawn uniformly, then its Gaussian."""
        g = torch.Generator().manual_seed(seed)
        k = torch.randint(0, self.means.shape[0], (n,), generator=g)
        return self.means[k] + self.std * torch.randn(n, 2, generator=g, dtype=torch.float64)


TARGETS: dict[str, Callable[[], Any]] = {"manywell": ManyWell, "dw4": DW4, "gmm40": GMM40}


# --------------------------------------------------------------------------- estimators


def effective_sample_size(log_w: Tensor) -> float:
    r"""Kish's effective sample size of importance weights, as a fraction of their number.

    :math:`(\sum w)^2 / (N \sum w^2)`, computed from log-weights; non-finite log-weights count as
    zero weight (a sample the model cannot account for).

    Example:
        >>> effective_sample_size(torch.zeros(10))
        1.0
    """
    lw = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf)).double()
    if not torch.isfinite(lw).any():
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / lw.numel())


def energy_w1(u: Tensor, u_ref: Tensor) -> float:
    """The 1-Wasserstein distance of two energy histograms (equal sizes: mean sorted gap)."""
    if u.numel() != u_ref.numel():
        raise ValueError(
            f"u and u_ref must have the same size, got {u.numel()} and {u_ref.numel()}."
        )
    return float((u.double().sort().values - u_ref.double().sort().values).abs().mean())


def split_rhat(chains: Tensor) -> float:
    r"""Gelman-Rubin's split :math:`\hat R` of a scalar over ``chains``, shaped (chains, draws)."""
    half = chains.shape[1] // 2
    c = torch.cat([chains[:, :half], chains[:, half : 2 * half]]).double()
    n = c.shape[1]
    within = c.var(dim=1).mean()
    between = n * c.mean(dim=1).var()
    return float(torch.sqrt(((n - 1) / n * within + between / n) / within))


@torch.no_grad()
def metropolis(
    energy: Callable[[Tensor], Tensor],
    dim: int,
    *,
    chains: int,
    steps: int,
    seed: int = 0,
    burn: float = 0.5,
    thin: int = 20,
    init_scale: float = 1.0,
    betas: tuple[float, ...] = (1.0,),
    statistics: dict[str, Callable[[Tensor], Tensor]] | None = None,
    symmetry: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Random-walk Metropolis on ``exp(-energy)`` in float64, parallel-tempered.

    ``chains`` independent chains, each with replicas at inverse temperatures ``betas`` (the first
    1) that swap between neighbours every step (parallel tempering); only the ``beta = 1`` replicas
    are kept.

    The proposal scales adapt per replica towards 30 % acceptance during the first ``burn``
    fraction of ``steps`` only; the rest is plain Metropolis, thinned by ``thin``. ``symmetry(x,
    generator)``, if given, maps the states by a random volume-preserving symmetry of the energy
    after every step (a move that is always accepted). Returns the kept samples and diagnostics:
    acceptance and swap rates after burn-in, and split R-hat across chains of the energy and of
    each of ``statistics`` (name -> a function of samples of shape (N, dim), one value per sample).
    """
    if betas[0] != 1.0:
        raise ValueError(f"betas must start at 1.0 (the target), got {betas[0]}.")
    g = torch.Generator().manual_seed(seed)
    beta = torch.tensor(betas, dtype=torch.float64)[:, None]  # (K, 1)
    k = len(betas)
    x = init_scale * torch.randn(k * chains, dim, generator=g, dtype=torch.float64)
    u = energy(x).reshape(k, chains)
    scale = torch.full((k, chains), 0.5, dtype=torch.float64)
    n_burn, kept, kept_u, accepted, swapped = int(steps * burn), [], [], 0.0, 0.0
    for step in range(steps):
        y = x + (
            scale.reshape(-1, 1) * torch.randn(k * chains, dim, generator=g, dtype=torch.float64)
        )
        uy = energy(y).reshape(k, chains)
        accept = torch.rand(k, chains, generator=g, dtype=torch.float64).log() < beta * (u - uy)
        x = torch.where(accept.reshape(-1, 1), y, x)
        u = torch.where(accept, uy, u)
        x = x if symmetry is None else symmetry(x, g)
        if k > 1:  # swap neighbours (even pairs on even steps, odd on odd)
            lo = torch.arange(step % 2, k - 1, 2)
            if len(lo):
                log_r = (beta[lo] - beta[lo + 1]) * (u[lo] - u[lo + 1])
                swap = torch.rand(len(lo), chains, generator=g, dtype=torch.float64).log() < log_r
                xs = x.reshape(k, chains, dim)
                a, b = xs[lo].clone(), xs[lo + 1].clone()
                xs[lo], xs[lo + 1] = (
                    torch.where(swap[..., None], b, a),
                    torch.where(swap[..., None], a, b),
                )
                ua, ub = u[lo].clone(), u[lo + 1].clone()
                u[lo], u[lo + 1] = torch.where(swap, ub, ua), torch.where(swap, ua, ub)
                swapped += float(swap.double().mean()) * (step >= n_burn)
        if step < n_burn:
            scale = scale * torch.exp(0.02 * (accept.double() - 0.3))
        else:
            accepted += float(accept[0].double().mean())
            if (step - n_burn) % thin == 0:
                kept.append(x[:chains].clone())
                kept_u.append(u[0].clone())
    # (chains, draws, dim), (chains, draws)
    samples, energies = (
        torch.stack(kept, 1),
        torch.stack(kept_u, 1),
    )
    info = {
        "chains": chains,
        "steps": steps,
        "burn_in": n_burn,
        "thin": thin,
        "seed": seed,
        "betas": list(betas),
        "kept": samples.shape[0] * samples.shape[1],
        "acceptance": accepted / (steps - n_burn),
        "swap_rate": swapped / (steps - n_burn) if k > 1 else None,
        "rhat_energy": split_rhat(energies),
    }
    for name, f in (statistics or {}).items():
        info[f"rhat_{name}"] = split_rhat(f(samples.reshape(-1, dim)).reshape(samples.shape[:2]))
    return samples.reshape(-1, dim), info
