"""Compensation's solvers behind one name -> class registry (:data:`SOLVERS`).

One file per solver: ``exact`` (per-row Cholesky, the reference), ``cg``
(conjugate gradients on the kept weights with one shared ``H`` product per
iteration, converging to the exact optimum) and ``sparsegpt`` (the column
sweep, approximate). ``solver="auto"`` picks per layer by counted work
(:func:`choose_solver`).
"""

from .base import SOLVERS, Solver, choose_solver, damped, factor, get_solver, penalty, register_solver
from .exact import ExactSolver  # isort: skip (registration order = the order choices are listed)
from .cg import ConjugateGradientSolver  # isort: skip
from .sparsegpt import SparseGPTSolver  # isort: skip

__all__ = [
    "ConjugateGradientSolver",
    "ExactSolver",
    "SOLVERS",
    "Solver",
    "SparseGPTSolver",
    "choose_solver",
    "damped",
    "factor",
    "get_solver",
    "penalty",
    "register_solver",
]
