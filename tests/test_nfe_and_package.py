"""count_nfe, the public surface, and what importing the package pulls in."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchdiffeq
from fields import TimeMLP

import torch_tempopt
from torch_tempopt import LearnableHorizon, NFECounter, count_nfe


def test_public_surface():
    assert set(torch_tempopt.__all__) == {
        "CoordinateDescentStepper",
        "LearnableHorizon",
        "NFECounter",
        "count_nfe",
        "load_state_dict_adding_horizons",
    }
    assert isinstance(torch_tempopt.__version__, str)


def test_import_pulls_in_nothing_beyond_torch_torchdiffeq_numpy():
    code = (
        "import sys\n"
        "import numpy, torch, torchdiffeq\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import torch_tempopt\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['torch_tempopt']"


def test_counts_forward_and_adjoint_backward():
    f = count_nfe(TimeMLP())
    assert isinstance(f, torch.nn.Module) and len(list(f.parameters())) == 4
    y0 = torch.randn(3, 2)
    torchdiffeq.odeint_adjoint(f, y0, torch.tensor([0.0, 1.0]), method="rk4", options=dict(step_size=0.25))[-1].sum().backward()
    assert f.nfe_forward == 16 and f.nfe_backward == 16 and f.nfe == 32
    f.reset()
    assert (f.nfe_forward, f.nfe_backward) == (0, 0)
    assert count_nfe(f) is f
    assert "nfe_forward=0" in repr(f)


def test_counter_forwards_attributes_and_works_inside_a_horizon():
    class Field(TimeMLP):
        def before_odeint(self):
            self.ready = True

    f = count_nfe(Field())
    f.before_odeint()
    assert f.ready
    h = LearnableHorizon(T0=0.5)
    h(f, torch.randn(2, 2), method="rk4", options=dict(step_size=0.5)).sum().backward()
    assert (f.nfe_forward, f.nfe_backward) == (4, 1)
    with pytest.raises(AttributeError):
        f.no_such_attribute  # noqa: B018


def test_counter_rejects_non_callable():
    with pytest.raises(TypeError, match="func"):
        NFECounter(3)
