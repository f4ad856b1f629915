"""Stand-in for FFJORD's ``lib/layers/odefunc.py``: ``ODEnet``, ``ODEfunc`` and the divergence functions.

Like upstream (odefunc.py:288), ``ODEfunc.forward`` takes ``t`` out of the graph
before using it, so a solver's own time gradient misses the field's dependence on t.
"""

import torch
from torch import nn

__all__ = ["ODEfunc", "ODEnet", "divergence_approx", "divergence_bf"]

NONLINEARITIES = {"tanh": nn.Tanh(), "softplus": nn.Softplus(), "relu": nn.ReLU()}


def divergence_bf(dx, y, **unused):
    total = 0.0
    for i in range(y.shape[1]):
        total = total + torch.autograd.grad(dx[:, i].sum(), y, create_graph=True)[0][:, i]
    return total


def divergence_approx(f, y, e=None):
    e_dzdx = torch.autograd.grad(f, y, e, create_graph=True)[0]
    return (e_dzdx * e).view(y.shape[0], -1).sum(dim=1)


class ConcatSquashLinear(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_gate = nn.Linear(1, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t, x):
        tt = t.view(1, 1).to(x)
        return self._layer(x) * torch.sigmoid(self._hyper_gate(tt)) + self._hyper_bias(tt)


class ODEnet(nn.Module):
    def __init__(
        self,
        hidden_dims,
        input_shape,
        strides=None,
        conv=False,
        layer_type="concatsquash",
        nonlinearity="tanh",
    ):
        super().__init__()
        dims = (input_shape[0], *hidden_dims, input_shape[0])
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.nonlinearity = NONLINEARITIES[nonlinearity]

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = self.nonlinearity(dx)
        return dx


class ODEfunc(nn.Module):
    def __init__(self, diffeq, divergence_fn="approximate", residual=False, rademacher=False):
        super().__init__()
        self.diffeq = diffeq
        self.residual = residual
        self.rademacher = rademacher
        self.divergence_fn = divergence_bf if divergence_fn == "brute_force" else divergence_approx
        self.register_buffer("_num_evals", torch.tensor(0.0))
        self._e = None

    def before_odeint(self, e=None):
        self._e = e
        self._num_evals.fill_(0)

    def num_evals(self):
        return self._num_evals.item()

    def forward(self, t, states):
        y = states[0]
        self._num_evals += 1
        t = t.detach().clone().to(y)  # upstream: t = torch.tensor(t).type_as(y)
        if self._e is None:
            self._e = (
                torch.randint_like(y, 0, 2) * 2 - 1 if self.rademacher else torch.randn_like(y)
            )
        with torch.set_grad_enabled(True):
            y.requires_grad_(True)
            t.requires_grad_(True)
            for s in states[2:]:
                s.requires_grad_(True)
            dy = self.diffeq(t, y, *states[2:])
            if not self.training and dy.view(dy.shape[0], -1).shape[1] == 2:
                divergence = divergence_bf(dy, y).view(-1, 1)
            else:
                divergence = self.divergence_fn(dy, y, e=self._e).view(-1, 1)
        return tuple(
            [dy, -divergence] + [torch.zeros_like(s).requires_grad_(True) for s in states[2:]]
        )
