"""Small vector fields shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TimeMLP(nn.Module):
    """A time-conditioned MLP field on (batch, dim) states."""

    def __init__(self, dim: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.to(y).expand(y.shape[0], 1)
        return self.net(torch.cat([y, tt], dim=1))


class TupleField(nn.Module):
    """A CNF-like field on (z, logp, kinetic): three parts, the last two driven by z and t."""

    def __init__(self, dim: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.f = TimeMLP(dim, hidden)

    def forward(
        self, t: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        z = state[0]
        dz = self.f(t, z)
        dlogp = -(dz * torch.sin(z)).sum(1, keepdim=True) - t
        kin = dz.pow(2).sum(1, keepdim=True)
        return dz, dlogp, kin


class Linear(nn.Module):
    """dy/dt = A y, with a closed-form flow exp(A (T - t0))."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.A.T


class Pulse(nn.Module):
    """dy/dt = y * height * exp(-((t - center) / width)^2) + net(y): dynamics concentrated around
    ``center``.
    """

    def __init__(
        self, dim: int = 2, center: float = 0.9, width: float = 0.05, height: float = 20.0
    ) -> None:
        super().__init__()
        self.center, self.width, self.height = center, width, height
        self.net = nn.Linear(dim, dim)
        with torch.no_grad():
            self.net.weight.mul_(0.1)
            self.net.bias.mul_(0.1)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rate = self.height * torch.exp(-(((t - self.center) / self.width) ** 2))
        return y * rate.to(y) + self.net(y)


class Stiff(nn.Module):
    """A small learnable field plus a decay of rate ``k``: a few rk4 steps are unstable for a large
    ``k``.
    """

    def __init__(self, dim: int = 2, k: float = 40.0) -> None:
        super().__init__()
        self.k = k
        self.net = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y) - self.k * y
