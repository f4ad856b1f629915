"""Stand-in for OT-Flow's ``src/OTFlowProblem.py``: ``OTFlowProblem``, ``stepRK4``, ``stepRK1``, ``integrate``,
``C`` and ``odefun`` with upstream's signatures and fixed-step scheme (``nt`` steps of ``(t1 - t0) / nt``). Like
upstream, ``odefun`` builds ``[x, t]`` with ``pad(value=t)``, which accepts a Python number only.
"""

import math

import torch
from src.Phi import *  # noqa: F403  (upstream's star import; brings Phi)
from torch.nn.functional import pad


def OTFlowProblem(x, Phi, tspan, nt, stepper="rk4", alph=(1.0, 1.0, 1.0)):
    h = (tspan[1] - tspan[0]) / nt
    z = pad(x, (0, 3, 0, 0), value=0)
    tk = tspan[0]
    step = stepRK4 if stepper == "rk4" else stepRK1
    for _ in range(nt):
        z = step(odefun, z, Phi, alph, tk, tk + h)
        tk += h
    cs = [torch.mean(z[:, -2]), torch.mean(C(z)), torch.mean(z[:, -1])]
    return sum(c * a for c, a in zip(cs, alph)), cs


def stepRK4(odefun, z, Phi, alph, t0, t1):
    h = t1 - t0
    k1 = h * odefun(z, t0, Phi, alph=alph)
    k2 = h * odefun(z + 0.5 * k1, t0 + h / 2, Phi, alph=alph)
    k3 = h * odefun(z + 0.5 * k2, t0 + h / 2, Phi, alph=alph)
    k4 = h * odefun(z + k3, t0 + h, Phi, alph=alph)
    return z + (k1 + 2 * k2 + 2 * k3 + k4) / 6


def stepRK1(odefun, z, Phi, alph, t0, t1):
    return z + (t1 - t0) * odefun(z, t0, Phi, alph=alph)


def integrate(x, net, tspan, nt, stepper="rk4", alph=(1.0, 1.0, 1.0), intermediates=False):
    h = (tspan[1] - tspan[0]) / nt
    z = pad(x, (0, 3, 0, 0), value=tspan[0])
    tk = tspan[0]
    step = stepRK4 if stepper == "rk4" else stepRK1
    path = [z]
    for _ in range(nt):
        z = step(odefun, z, net, alph, tk, tk + h)
        path.append(z)
        tk += h
    return torch.stack(path, dim=-1) if intermediates else z


def C(z):
    d = z.shape[1] - 3
    return -(
        torch.sum(-0.5 * math.log(2 * math.pi) - z[:, :d].pow(2) / 2, 1, keepdim=True)
        + z[:, d].unsqueeze(1)
    )


def odefun(x, t, net, alph=(1.0, 1.0, 1.0)):
    nex, d_extra = x.shape
    d = d_extra - 3
    z = pad(x[:, :d], (0, 1, 0, 0), value=t)
    gradPhi, trH = net.trHess(z)
    dx = -(1.0 / alph[0]) * gradPhi[:, :d]
    dl = -(1.0 / alph[0]) * trH.unsqueeze(1)
    dv = 0.5 * torch.sum(dx.pow(2), 1, keepdim=True)
    dr = torch.abs(-gradPhi[:, -1].unsqueeze(1) + alph[0] * dv)
    return torch.cat((dx, dl, dv, dr), 1)
