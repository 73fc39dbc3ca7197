"""The solver interface: one masked least-squares problem per layer, ``(H, XᵀY, keep) -> weights``.

Compensation (:mod:`bingo.compensation`) accumulates, per layer, ``H = XᵀX``
(``d × d``: the layer's calibration inputs, a column of ones last when it
has a bias) and ``XᵀY`` (``d × rows``: against the dense layer's outputs).
A solver then finds, for every output row ``r``,

    ``w_r = argmin_w ‖X w − Y[:, r]‖² + λ‖w‖²``  with ``w`` zero outside ``keep[r]``,

``λ = damping · mean(diag H)`` (SparseGPT's damping, Frantar & Alistarh 2023),
the same ``λ`` for every row so that solvers which share work across rows
solve the same problem as the exact one. Capture of ``H`` is apart from its
solve, as SparseGPT's ``add_batch`` / ``fasterprune`` split is.

A solver is a :class:`Solver` subclass in one file, registered by
:func:`register_solver` under its ``name``; :func:`get_solver` picks one by
name, and ``"auto"`` (the default) picks by the layer's shape and mask
(:func:`choose_solver`).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["SOLVERS", "Solver", "choose_solver", "damped", "factor", "penalty", "get_solver", "register_solver"]

#: every registered solver class by name, in registration order
SOLVERS: dict[str, type["Solver"]] = {}


class Solver:
    """Solves the masked, damped least-squares problem of one layer for all its rows.

    Subclasses set ``name`` and implement :meth:`solve` and :meth:`flops`.
    """

    name: str = ""
    #: True when the answer is the exact per-row optimum (up to floating point), not an approximation of it
    exact: bool = False

    def solve(self, hessian: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
        """The re-fitted rows.

        Args:
            hessian: ``H = XᵀX``, ``(d, d)``, float64, symmetric positive semi-definite.
            cross: ``XᵀY``, ``(d, rows)``, float64.
            keep: ``(rows, d)`` bool, True where a weight may be non-zero (a pruned unit's row is all False).
            damping: relative damping, ``λ = damping · mean(diag H)``.

        Returns:
            ``(rows, d)`` float64, zero wherever ``keep`` is False; a row the solver could not
            solve (numerically hopeless) is NaN, and the caller keeps that row as it was.
        """
        raise NotImplementedError

    def flops(self, d: int, keep: torch.Tensor) -> float:
        """Floating-point operations :meth:`solve` needs for this shape and mask (an estimate; its leading terms)."""
        raise NotImplementedError

    def cost(self, d: int, keep: torch.Tensor) -> float:
        """What ``solver="auto"`` compares: :meth:`flops`, weighted where they run slower than large matrix products."""
        return self.flops(d, keep)


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make ``cls`` available as ``solver=cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise ConfigError(f"register_solver takes a Solver subclass, got {cls!r}")
    if not cls.name:
        raise ConfigError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    SOLVERS[cls.name] = cls
    return cls


def get_solver(name_or_instance: str | Solver) -> Solver | None:
    """The solver registered as ``name`` (None for ``"auto"``: chosen per layer), or the instance given."""
    if isinstance(name_or_instance, Solver):
        return name_or_instance
    if name_or_instance == "auto":
        return None
    if not isinstance(name_or_instance, str) or name_or_instance not in SOLVERS:
        raise ConfigError(
            f"unknown solver {name_or_instance!r}; valid choices: auto, {', '.join(SOLVERS)}, or a Solver instance"
        )
    return SOLVERS[name_or_instance]()


def choose_solver(d: int, keep: torch.Tensor) -> Solver:
    """The default solver for one layer: the exact one where it is cheaper than the iterative one, else that.

    Both aim at the exact per-row optimum (the iterative one gets within 1–5%
    of its held-out error, up to 7% on the widest layers, measured by
    ``benchmarks/compensation_scaling.py``), so the choice is by counted
    work alone: the exact solve costs ``Σ_r k_r³ / 3`` for ``k_r`` kept
    inputs per row, shared by rows that keep the same inputs (a neuron or
    channel prune: one factorisation per layer), and is cheap at high
    sparsity; the iterative one costs a few ``d³`` plus ``d² · rows`` per
    iteration whatever the mask, and wins on wide layers at moderate sparsity
    and on N:M patterns.
    """
    exact, iterative = SOLVERS["exact"](), SOLVERS["cg"]()
    return exact if exact.cost(d, keep) <= iterative.cost(d, keep) else iterative


def penalty(hessian: torch.Tensor, damping: float) -> float:
    """``λ = damping · mean(diag H)`` over the inputs that were ever non-zero (1 · damping if none was)."""
    diagonal = hessian.diagonal()
    live = diagonal > 0
    return damping * (float(diagonal[live].mean()) if bool(live.any()) else 1.0)


def damped(hessian: torch.Tensor, damping: float, boost: float = 1.0) -> torch.Tensor:
    """``H + λI`` with ``λ = boost · damping · mean(diag H)``; an input never seen (zero diagonal) gets 1 there.

    The 1 on a dead input (SparseGPT's ``H[dead, dead] = 1``) keeps ``H``
    invertible without changing any solution: that input's column of X is
    zero, so is its row of ``XᵀY``, and its weight solves to 0.
    """
    h = hessian.clone()
    diagonal = h.diagonal()
    lam = penalty(hessian, damping)
    diagonal[diagonal == 0] = 1.0
    diagonal += boost * lam
    return h


def factor(hessian: torch.Tensor, damping: float, attempts: int = 6) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(H + λI, its lower Cholesky factor)``, λ raised 10× per failed attempt; None if every attempt fails."""
    for attempt in range(attempts):
        # the damping asked for first; then more (from 1e-8 when none was asked for)
        regularised = damped(hessian, damping if attempt == 0 else max(damping, 1e-8) * 10.0**attempt)
        lower, info = torch.linalg.cholesky_ex(regularised)
        if int(info) == 0:
            return regularised, lower
    return None
