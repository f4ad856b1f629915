"""Shared pytest options: float64 by default, ``--device``/``--dtype`` for GPU checks."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for tensors in the tests, e.g. cuda")
    parser.addoption(
        "--dtype", default="float64", choices=["float32", "float64"], help="default dtype"
    )


@pytest.fixture(autouse=True)
def _default_dtype(request: pytest.FixtureRequest):
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, request.config.getoption("--dtype")))
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def dtype() -> torch.dtype:
    return torch.get_default_dtype()


# tests/standins/ holds stand-ins for upstream checkouts (their own ``lib`` packages and scripts
# that parse sys.argv at import); the patches import them on their own, pytest must not collect
# them.
collect_ignore = ["standins"]
