"""Significance estimators behind one name -> class registry (:data:`ESTIMATORS`).

One file per estimator: ``probe`` (the paper's fake passes, targeted
searching as an option), ``taylor`` (the gradient estimate, no extra
passes) and ``hybrid`` (taylor, each layer calibrated by real fake passes).
Fake-pass mechanics live in :mod:`bingo.estimators.fake_pass`, targeted
searching in :mod:`bingo.estimators.targeted`.
"""

from .base import ESTIMATORS, Estimator, get_estimator, register_estimator
from .probe import ProbeEstimator  # isort: skip (registration order = the order choices are listed)
from .taylor import TaylorEstimator  # isort: skip
from .hybrid import HybridEstimator  # isort: skip
from .targeted import Focus

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "Focus",
    "HybridEstimator",
    "ProbeEstimator",
    "TaylorEstimator",
    "get_estimator",
    "register_estimator",
]
