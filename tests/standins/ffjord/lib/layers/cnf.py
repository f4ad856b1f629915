"""Stand-in for FFJORD's ``lib/layers/cnf.py``: class ``CNF`` with upstream's attributes, signatures and returns.

Like upstream, the end time is ``sqrt_end_time**2`` and the time grid is built from a
copy of it, so ``sqrt_end_time`` receives no gradient even when it is a parameter.
"""

import torch
from torch import nn
from torchdiffeq import odeint_adjoint as odeint

from .wrappers.cnf_regularization import RegularizedODEfunc

__all__ = ["CNF"]


class CNF(nn.Module):
    def __init__(
        self,
        odefunc,
        T=1.0,
        train_T=False,
        regularization_fns=None,
        solver="dopri5",
        atol=1e-5,
        rtol=1e-5,
    ):
        super().__init__()
        sqrt_T = torch.sqrt(torch.tensor(T))
        if train_T:
            self.sqrt_end_time = nn.Parameter(sqrt_T)
        else:
            self.register_buffer("sqrt_end_time", sqrt_T)
        self.nreg = 0 if regularization_fns is None else len(regularization_fns)
        self.odefunc = (
            odefunc
            if regularization_fns is None
            else RegularizedODEfunc(odefunc, regularization_fns)
        )
        self.regularization_states = None
        self.solver, self.atol, self.rtol = solver, atol, rtol
        self.test_solver, self.test_atol, self.test_rtol = solver, atol, rtol
        self.solver_options = {}

    def forward(self, z, logpz=None, integration_times=None, reverse=False):
        logp = torch.zeros(z.shape[0], 1).to(z) if logpz is None else logpz
        if integration_times is None:
            end = (
                self.sqrt_end_time * self.sqrt_end_time
            ).detach()  # upstream: torch.tensor([0.0, T]) copies T
            integration_times = torch.stack([torch.zeros_like(end), end]).to(z)
        if reverse:
            integration_times = integration_times.flip(0)
        self.odefunc.before_odeint()
        if self.training:
            reg = tuple(torch.zeros(()).to(z) for _ in range(self.nreg))
            states = odeint(
                self.odefunc, (z, logp) + reg, integration_times.to(z),
                atol=self.atol, rtol=self.rtol, method=self.solver, options=self.solver_options,
            )  # fmt: skip
        else:
            states = odeint(
                self.odefunc, (z, logp), integration_times.to(z),
                atol=self.test_atol, rtol=self.test_rtol, method=self.test_solver,
            )  # fmt: skip
        if len(integration_times) == 2:
            states = tuple(s[1] for s in states)
        self.regularization_states = states[2:]
        return (states[0], states[1]) if logpz is not None else states[0]

    def get_regularization_states(self):
        states, self.regularization_states = self.regularization_states, None
        return states

    def num_evals(self):
        return self.odefunc._num_evals.item()
