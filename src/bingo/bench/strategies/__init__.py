"""Pruning strategies behind one name -> class registry (:data:`STRATEGIES`)."""

from .base import STRATEGIES, DenseRun, Experiment, ForwardCounter, Outcome, Strategy, Trained, get_strategy, register, rewind
from .oneshot import BINGO, BINGO_PAPER, BingoConfig, BingoPaperStrategy, BingoStrategy, CompensationConfig, MagnitudeStrategy, OneShotConfig, OneShotStrategy, RandomStrategy  # isort: skip (registered first)
from .gmp import GmpConfig, GmpStrategy, ScheduleConfig, ScheduledStrategy, gmp_sparsity
from .gradual import GradualBingoConfig, GradualBingoStrategy
from .imp import ImpConfig, ImpStrategy, imp_schedule
from .snip import SnipConfig, SnipStrategy, snip_scores

__all__ = [
    "BINGO",
    "BINGO_PAPER",
    "STRATEGIES",
    "BingoConfig",
    "BingoPaperStrategy",
    "BingoStrategy",
    "CompensationConfig",
    "DenseRun",
    "Experiment",
    "ForwardCounter",
    "GmpConfig",
    "GmpStrategy",
    "GradualBingoConfig",
    "GradualBingoStrategy",
    "ImpConfig",
    "ImpStrategy",
    "MagnitudeStrategy",
    "OneShotConfig",
    "OneShotStrategy",
    "Outcome",
    "RandomStrategy",
    "ScheduleConfig",
    "ScheduledStrategy",
    "SnipConfig",
    "SnipStrategy",
    "Strategy",
    "Trained",
    "get_strategy",
    "gmp_sparsity",
    "imp_schedule",
    "register",
    "rewind",
    "snip_scores",
]
