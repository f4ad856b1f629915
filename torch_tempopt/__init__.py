"""torch_tempopt: learnable integration horizons for continuous normalizing flows (TO-FLOW)."""

from .horizon import LearnableHorizon, load_state_dict_adding_horizons
from .nfe import NFECounter, count_nfe
from .stepper import CoordinateDescentStepper

__all__ = [
    "CoordinateDescentStepper",
    "LearnableHorizon",
    "NFECounter",
    "count_nfe",
    "load_state_dict_adding_horizons",
]

__version__ = "0.1.0"
