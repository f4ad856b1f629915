"""Stand-in for RNODE's ``lib/layers/wrappers/cnf_regularization.py``: per-sample integrands
``reg_fn(x, t, logp, dx, dlogp, context)`` with the inner ODEfunc as context."""

import torch
from torch import nn

__all__ = ["RegularizedODEfunc", "jacobian_frobenius_regularization_fn", "quadratic_cost"]


class RegularizedODEfunc(nn.Module):
    def __init__(self, odefunc, regularization_fns):
        super().__init__()
        self.odefunc = odefunc
        self.regularization_fns = regularization_fns

    def before_odeint(self, *args, **kwargs):
        self.odefunc.before_odeint(*args, **kwargs)

    def forward(self, t, state):
        with torch.enable_grad():
            x, logp = state[:2]
            x.requires_grad_(True)
            t.requires_grad_(True)
            logp.requires_grad_(True)
            dstate = self.odefunc(t, (x, logp))
            if len(state) == 2:
                return dstate
            dx, dlogp = dstate[:2]
            return dstate + tuple(
                fn(x, t, logp, dx, dlogp, self.odefunc) for fn in self.regularization_fns
            )

    @property
    def _num_evals(self):
        return self.odefunc._num_evals


def quadratic_cost(x, t, logp, dx, dlogp, unused_context):
    return 0.5 * dx.view(dx.shape[0], -1).pow(2).mean(dim=-1)


def jacobian_frobenius_regularization_fn(x, t, logp, dx, dlogp, context):
    return context.sqjacnorm
