"""Stand-in for RNODE's ``lib/layers/odefunc.py``: ``ODEnet`` (concat layers, ``t.expand``) and ``ODEfunc``,
whose Hutchinson estimator also stores ``sqjacnorm`` (an estimate of ||df/dx||_F^2 / D) for the Jacobian penalty.
Like RNODE (and unlike FFJORD) ``ODEfunc.forward`` keeps the solver's ``t``.
"""

import torch
from torch import nn

__all__ = ["ODEfunc", "ODEnet", "divergence_approx", "divergence_bf"]


def divergence_bf(dx, y, **unused):
    total = 0.0
    for i in range(y.shape[1]):
        total = total + torch.autograd.grad(dx[:, i].sum(), y, create_graph=True)[0][:, i]
    return total, None


def divergence_approx(f, y, e=None):
    e_dzdx = torch.autograd.grad(f, y, e, create_graph=True)[0]
    divergence = (e_dzdx * e).view(y.shape[0], -1).sum(dim=1)
    sqjacnorm = e_dzdx.pow(2).view(y.shape[0], -1).mean(dim=1)
    return divergence, sqjacnorm


class ConcatLinear(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t, x):
        return self._layer(torch.cat([t.expand(x.shape[0], 1).to(x), x], dim=1))


class ODEnet(nn.Module):
    def __init__(
        self,
        hidden_dims,
        input_shape,
        strides=None,
        conv=False,
        layer_type="concat",
        nonlinearity="softplus",
    ):
        super().__init__()
        dims = (input_shape[0], *hidden_dims, input_shape[0])
        self.layers = nn.ModuleList(ConcatLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = nn.functional.softplus(dx)
        return dx


class ODEfunc(nn.Module):
    def __init__(
        self, diffeq, divergence_fn="approximate", residual=False, rademacher=False, div_samples=1
    ):
        super().__init__()
        self.diffeq = diffeq
        self.rademacher = rademacher
        self.residual = residual
        self.divergence_fn = divergence_bf if divergence_fn == "brute_force" else divergence_approx
        self.register_buffer("_num_evals", torch.tensor(0.0))
        self._e = None
        self.sqjacnorm = None

    def before_odeint(self, e=None):
        self._e = e
        self._num_evals.fill_(0)

    def num_evals(self):
        return self._num_evals.item()

    def forward(self, t, states):
        y = states[0]
        self._num_evals += 1
        if self._e is None:
            self._e = (
                torch.randint_like(y, 0, 2) * 2 - 1 if self.rademacher else torch.randn_like(y)
            )
        with torch.set_grad_enabled(True):
            y.requires_grad_(True)
            t.requires_grad_(True)
            dy = self.diffeq(t, y)
            divergence, self.sqjacnorm = self.divergence_fn(dy, y, e=self._e)
        return tuple(
            [dy, -divergence.view(-1, 1)]
            + [torch.zeros_like(s).requires_grad_(True) for s in states[2:]]
        )
