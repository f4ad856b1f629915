"""Stand-in for FFJORD's ``lib/layers/wrappers/cnf_regularization.py``: integrands as extra ODE states."""

import torch
from torch import nn

__all__ = ["RegularizedODEfunc", "l2_regularzation_fn"]


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
            logp.requires_grad_(True)
            dstate = self.odefunc(t, (x, logp))
            if len(state) == 2:
                return dstate
            dx, dlogp = dstate[:2]
            return dstate + tuple(fn(x, logp, dx, dlogp, None) for fn in self.regularization_fns)

    @property
    def _num_evals(self):
        return self.odefunc._num_evals


def l2_regularzation_fn(x, logp, dx, dlogp, unused_context):
    dx = dx.view(dx.shape[0], -1)
    return torch.mean(dx.norm(dim=1) / dx.shape[1] ** 0.5)
