"""Stand-in for FFJORD's ``lib.layers`` package: re-exports the CNF pieces."""

from .cnf import CNF
from .container import SequentialFlow
from .odefunc import ODEfunc, ODEnet

__all__ = ["CNF", "ODEfunc", "ODEnet", "SequentialFlow"]
