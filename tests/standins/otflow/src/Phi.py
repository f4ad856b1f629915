"""Stand-in for OT-Flow's ``src/Phi.py``: a potential ``Phi(nTh, m, d, r=10, alph=...)`` with ``trHess``.

Our own small potential, not OT-Flow's ResNet:
Phi(s) = 0.5 |A s|^2 + c.s + sum_j w_j log cosh(K s + b)_j for s = [x, t], with the exact
gradient and the trace of its spatial Hessian, as ``trHess`` returns them upstream.
"""

import torch
from torch import nn

__all__ = ["Phi"]


class Phi(nn.Module):
    def __init__(self, nTh, m, d, r=10, alph=(1.0,) * 5):
        super().__init__()
        self.m, self.nTh, self.d, self.alph = m, nTh, d, list(alph)
        r = min(r, d + 1)
        self.A = nn.Parameter(0.3 * torch.randn(r, d + 1))
        self.c = nn.Linear(d + 1, 1, bias=True)
        self.K = nn.Linear(d + 1, m, bias=True)
        self.w = nn.Parameter(torch.ones(m) / m)

    def forward(self, x):
        return (
            0.5 * (x @ self.A.t()).pow(2).sum(1, keepdim=True)
            + self.c(x)
            + (self.w * torch.log(torch.cosh(self.K(x)))).sum(1, keepdim=True)
        )

    def trHess(self, x, justGrad=False):
        d = x.shape[1] - 1
        tanh = torch.tanh(self.K(x))
        symA = self.A.t() @ self.A
        grad = x @ symA + self.c.weight + (self.w * tanh) @ self.K.weight
        if justGrad:
            return grad
        K = self.K.weight[:, :d]
        trH = torch.diagonal(symA)[:d].sum() + (
            (self.w * (1 - tanh.pow(2))) * K.pow(2).sum(1)
        ).sum(1)
        return grad, trH
