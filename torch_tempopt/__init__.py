"""torch_tempopt: learnable integration horizons and step budgets for continuous
normalizing flows.
"""

from .budget import Budget
from .guard import BudgetGuard
from .horizon import LearnableHorizon
from .nfe import NFECounter, count_nfe
from .stepper import CoordinateDescentStepper

__all__ = [
    "Budget",
    "BudgetGuard",
    "CoordinateDescentStepper",
    "LearnableHorizon",
    "NFECounter",
    "count_nfe",
]

__version__ = "0.5.0"
