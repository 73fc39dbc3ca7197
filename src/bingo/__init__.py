"""bingo: prune PyTorch networks with BINGO (Panangat, arXiv 2505.09864).

A :class:`TicketSearch` learns a significance score per weight during one
ordinary training run; :func:`prune` removes the least significant weights
in one shot, through ``torch.nn.utils.prune``.

This package is the library; the benchmark harness (datasets, model zoo,
training loops, baselines, ``bingo compare``, plots, the ``bingo`` command)
is :mod:`bingo.bench`, which ``import bingo`` does not load.
"""

from .compensation import CompensationResult, compensate, reestimate_batchnorm
from .coupled import ChannelGroup, channel_groups, prune_coupled, shrink_coupled
from .heads import PrunedMultiheadAttention, head_scores, prune_heads, shrink_heads
from .errors import BingoError, CheckpointError, ConfigError, DataError, TrainingError
from .export import ExportResult, RawInputModel, export_checkpoint, export_model, load_compact, save_compact, state_dict_size
from .estimators import ESTIMATORS, Estimator, register_estimator
from .io import load_scores, save_scores
from .layers import coverage, find_layers
from .masks import apply_masks, current_masks, load_pruned_state_dict, make_permanent, model_sparsity, pruned_parameters
from .pruning import AccuracyFloorResult, prune, prune_to_accuracy
from .schedule import SparsityScheduler, gmp_sparsity
from .scoring import bingo_scores, combine_ranks, magnitude_scores, random_scores
from .search import BINGO_SEARCH, SearchConfig, TicketSearch
from .selection import is_n_m, select_masks, select_n_m
from .semi_structured import to_semi_structured
from .shrink import count_flops, count_parameters, shrink

__all__ = [
    "PrunedMultiheadAttention",
    "head_scores",
    "prune_heads",
    "shrink_heads",
    "ChannelGroup",
    "channel_groups",
    "prune_coupled",
    "shrink_coupled",
    "AccuracyFloorResult",
    "BINGO_SEARCH",
    "BingoError",
    "CheckpointError",
    "CompensationResult",
    "ConfigError",
    "DataError",
    "ESTIMATORS",
    "Estimator",
    "ExportResult",
    "RawInputModel",
    "SearchConfig",
    "SparsityScheduler",
    "TicketSearch",
    "TrainingError",
    "apply_masks",
    "bingo_scores",
    "combine_ranks",
    "compensate",
    "count_flops",
    "count_parameters",
    "current_masks",
    "export_checkpoint",
    "export_model",
    "coverage",
    "find_layers",
    "gmp_sparsity",
    "is_n_m",
    "load_compact",
    "load_scores",
    "load_pruned_state_dict",
    "magnitude_scores",
    "make_permanent",
    "model_sparsity",
    "pruned_parameters",
    "prune",
    "prune_to_accuracy",
    "random_scores",
    "reestimate_batchnorm",
    "register_estimator",
    "save_compact",
    "save_scores",
    "select_masks",
    "select_n_m",
    "shrink",
    "state_dict_size",
    "to_semi_structured",
]

__version__ = "0.1.0"
