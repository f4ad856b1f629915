"""Stand-in for RNODE's ``lib/layers/cnf.py``: FFJORD's ``CNF`` with per-sample regularisation states passed
along and returned, ``(z, logp, reg_states)``; per-state tolerances for dopri5/bosh3; test solver options.
Like upstream, the time grid is built from a copy of ``sqrt_end_time**2`` (no gradient reaches it).
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
        self.solver, self.atol, self.rtol = solver, atol, rtol
        self.test_solver, self.test_atol, self.test_rtol = solver, atol, rtol
        self.solver_options = {}
        self.test_solver_options = {}

    def forward(self, z, logpz=None, reg_states=tuple(), integration_times=None, reverse=False):  # noqa: B008
        if len(reg_states) != self.nreg and self.training:
            reg_states = tuple(torch.zeros(z.size(0)).to(z) for _ in range(self.nreg))
        logp = torch.zeros(z.shape[0], 1).to(z) if logpz is None else logpz
        if integration_times is None:
            end = (
                self.sqrt_end_time * self.sqrt_end_time
            ).detach()  # upstream: torch.tensor([0.0, T])
            integration_times = torch.stack([torch.zeros_like(end), end]).to(z)
        if reverse:
            integration_times = integration_times.flip(0)
        self.odefunc.before_odeint()
        if self.training:
            adaptive = self.solver in ("dopri5", "bosh3")
            tols = [
                [tol, tol] + [1e20] * len(reg_states) if adaptive else tol
                for tol in (self.atol, self.rtol)
            ]
            states = odeint(
                self.odefunc, (z, logp) + tuple(reg_states), integration_times.to(z),
                atol=tols[0], rtol=tols[1], method=self.solver, options=self.solver_options,
            )  # fmt: skip
        else:
            states = odeint(
                self.odefunc, (z, logp), integration_times.to(z), atol=self.test_atol, rtol=self.test_rtol,
                method=self.test_solver, options=self.test_solver_options,
            )  # fmt: skip
        if len(integration_times) == 2:
            states = tuple(s[1] for s in states)
        return states[0], states[1], states[2:]

    def num_evals(self):
        return self.odefunc._num_evals.item()
