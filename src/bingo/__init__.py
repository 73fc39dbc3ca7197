"""bingo: prune PyTorch networks with BINGO (Panangat, arXiv 2505.09864).

A :class:`TicketSearch` learns a significance score per weight during one
ordinary training run; :func:`prune` removes the least significant weights
in one shot, through ``torch.nn.utils.prune``.

This package is the library; the benchmark harness (datasets, model zoo,
training loops, baselines, ``bingo compare``, plots, the ``bingo`` command)
is :mod:`bingo.bench`, which ``import bingo`` does not load.
"""

from .blend import BLEND_WEIGHTS, BlendChoice, choose_magnitude_weight
from .compensation import CompensationResult, compensate, reestimate_batchnorm, suggested_calibration_samples
from .coupled import ChannelGroup, channel_groups, prune_coupled, shrink_coupled
from .heads import PrunedMultiheadAttention, head_scores, prune_heads, shrink_heads
from .errors import BingoError, CheckpointError, ConfigError, DataError, TrainingError
from .export import ExportResult, RawInputModel, export_checkpoint, export_model, load_compact, save_compact, state_dict_size
from .estimators import ESTIMATORS, Estimator, register_estimator
from .io import load_scores, save_scores
from .layers import coverage, find_layers
from .masks import apply_masks, cached_masks, current_masks, load_pruned_state_dict, make_permanent, model_sparsity, pruned_parameters
from .pruning import AccuracyFloorResult, prune, prune_to_accuracy
from .multistep import MultiStepResult, prune_in_steps, step_sparsities
from .schedule import SparsityScheduler, gmp_sparsity
from .scoring import bingo_scores, combine_ranks, magnitude_scores, random_scores
from .search import BINGO_SEARCH, SearchConfig, TicketSearch
from .selection import is_n_m, select_masks, select_n_m
from .semi_structured import to_semi_structured
from .sparse import SparseLayer, SparseLinear, SparseResult, to_sparse
from .shrink import count_flops, count_parameters, shrink

__all__ = [
    "AccuracyFloorResult",
    "apply_masks",
    "bingo_scores",
    "cached_masks",
    "BINGO_SEARCH",
    "BLEND_WEIGHTS",
    "BlendChoice",
    "BingoError",
    "channel_groups",
    "ChannelGroup",
    "CheckpointError",
    "choose_magnitude_weight",
    "combine_ranks",
    "compensate",
    "CompensationResult",
    "ConfigError",
    "count_flops",
    "count_parameters",
    "coverage",
    "current_masks",
    "DataError",
    "Estimator",
    "ESTIMATORS",
    "export_checkpoint",
    "export_model",
    "ExportResult",
    "find_layers",
    "gmp_sparsity",
    "head_scores",
    "is_n_m",
    "load_compact",
    "load_pruned_state_dict",
    "load_scores",
    "magnitude_scores",
    "make_permanent",
    "model_sparsity",
    "MultiStepResult",
    "prune",
    "prune_coupled",
    "prune_heads",
    "prune_in_steps",
    "prune_to_accuracy",
    "pruned_parameters",
    "PrunedMultiheadAttention",
    "random_scores",
    "RawInputModel",
    "reestimate_batchnorm",
    "register_estimator",
    "save_compact",
    "save_scores",
    "SearchConfig",
    "select_masks",
    "select_n_m",
    "shrink",
    "shrink_coupled",
    "shrink_heads",
    "SparseLayer",
    "SparseLinear",
    "SparseResult",
    "SparsityScheduler",
    "state_dict_size",
    "step_sparsities",
    "suggested_calibration_samples",
    "TicketSearch",
    "to_semi_structured",
    "to_sparse",
    "TrainingError",
]

__version__ = "0.1.0"
