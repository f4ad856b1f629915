"""torch_tempopt: learnable integration horizons for continuous normalizing flows (TO-FLOW)."""

from .horizon import LearnableHorizon
from .nfe import NFECounter, count_nfe
from .stepper import CoordinateDescentStepper

__all__ = ["CoordinateDescentStepper", "LearnableHorizon", "NFECounter", "count_nfe"]

__version__ = "0.1.0"
