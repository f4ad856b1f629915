"""Stand-in for OT-Flow's ``src/plotter.py``: picks TkAgg first, imports ``h5py`` and the repository's
``datasets`` package at import (as upstream), and ``plot4`` integrates forward and back with the hard-coded spans."""

try:
    import matplotlib

    matplotlib.use("TkAgg")
    import matplotlib.pyplot as plt
except Exception:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
import datasets  # noqa: F401
import h5py  # noqa: F401
import numpy as np
from src.OTFlowProblem import *  # noqa: F403


def plot4(net, x, y, nt_val, sPath, sTitle="", doPaths=False):
    d = net.d
    fx = integrate(x[:, :d], net, [0.0, 1.0], nt_val, stepper="rk4", alph=net.alph)  # noqa: F405
    gen = integrate(y[:, :d], net, [1.0, 0.0], nt_val, stepper="rk4", alph=net.alph)  # noqa: F405
    fig = plt.figure(figsize=(2, 2))
    plt.scatter(gen[:, 0].cpu().numpy(), gen[:, 1].cpu().numpy(), s=1)
    plt.title(sTitle)
    fig.savefig(sPath)
    plt.close(fig)
    np.save(sPath + ".fx.npy", fx.cpu().numpy())
