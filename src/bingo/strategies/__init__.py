"""Pruning strategies behind one name -> class registry (:data:`STRATEGIES`)."""

from .base import STRATEGIES, DenseRun, Experiment, ForwardCounter, Outcome, Strategy, Trained, get_strategy, register, rewind
from .oneshot import BingoConfig, BingoStrategy, MagnitudeStrategy, OneShotConfig, RandomStrategy

__all__ = [
    "STRATEGIES",
    "BingoConfig",
    "BingoStrategy",
    "DenseRun",
    "Experiment",
    "ForwardCounter",
    "MagnitudeStrategy",
    "OneShotConfig",
    "Outcome",
    "RandomStrategy",
    "Strategy",
    "Trained",
    "get_strategy",
    "register",
    "rewind",
]
