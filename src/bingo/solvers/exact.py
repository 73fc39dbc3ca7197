"""The exact per-row solve: each row's own Cholesky on its kept inputs (the reference every other solver is checked against)."""

from __future__ import annotations

import torch

from .base import Solver, damped, penalty, register_solver

#: at most this many distinct kept sets are solved one by one, each with all its rows as right-hand sides
PATTERN_LOOP = 64

#: how many times slower per flop a batch of small per-row Cholesky solves (gathered blocks) runs than one
#: large matrix product: 10-15x measured on a 2-core CPU (benchmarks/compensation_scaling.py); used by
#: ``solver="auto"`` to compare the exact solve's counted work with the iterative one's
ROW_SOLVE_SLOWDOWN = 10.0


@register_solver
class ExactSolver(Solver):
    """``(H[S,S] + λI) w_r = (XᵀY)[S, r]`` for each row's kept set ``S``, by Cholesky.

    Rows that keep the same inputs share one factorisation: after a neuron or
    channel prune every row of a layer does (and so does a layer downstream
    of the prune, which keeps everything), so the layer costs one ``k³/3``
    solve with many right-hand sides. Otherwise rows are solved in batches:
    each row's kept columns gathered into a ``k_max × k_max`` block, padded
    with identity rows (zero right-hand side, so padding solves to 0), and
    factored by one batched Cholesky, in chunks of at most ``chunk_bytes``.
    A block that is not positive definite is retried with 10× the damping,
    up to 5 times; rows still failing come back as NaN.
    """

    name = "exact"
    exact = True

    def __init__(self, chunk_bytes: int = 64 * 2**20) -> None:
        self.chunk_bytes = chunk_bytes

    def flops(self, d: int, keep: torch.Tensor) -> float:
        patterns, counts = torch.unique(keep, dim=0, return_counts=True)
        kept = patterns.sum(dim=1).double()
        if len(patterns) <= PATTERN_LOOP:  # a factorisation per pattern, its rows as right-hand sides
            return float((kept**3 / 3 + 2 * kept**2 * counts).sum())
        per_row = keep.sum(dim=1).double()
        return float((per_row**3 / 3 + 3 * per_row**2).sum())

    def cost(self, d: int, keep: torch.Tensor) -> float:
        """:meth:`flops` weighted by how fast each kind runs (:data:`ROW_SOLVE_SLOWDOWN` for per-row solves)."""
        patterns = torch.unique(keep, dim=0)
        return self.flops(d, keep) * (1.0 if len(patterns) <= PATTERN_LOOP else ROW_SOLVE_SLOWDOWN)

    def solve(self, hessian: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
        regularised = damped(hessian, damping)
        lam = penalty(hessian, damping)
        patterns, inverse = torch.unique(keep, dim=0, return_inverse=True)
        if len(patterns) <= PATTERN_LOOP:
            return self._by_pattern(regularised, lam, cross, keep, patterns, inverse)
        return self._by_row(regularised, lam, cross, keep)

    @staticmethod
    def _by_pattern(regularised, lam, cross, keep, patterns, inverse) -> torch.Tensor:
        rows, d = keep.shape
        weights = torch.zeros(rows, d, dtype=torch.float64, device=cross.device)
        for p, pattern in enumerate(patterns):
            members = (inverse == p).nonzero().flatten()
            columns = pattern.nonzero().flatten()
            if not len(columns):
                continue
            block = regularised[columns[:, None], columns[None, :]]
            solution = None
            for attempt in range(6):
                extra = (lam or 1e-8 * float(block.diagonal().mean())) * (10.0**attempt - 1 if attempt else 0.0)
                lower, info = torch.linalg.cholesky_ex(block + extra * torch.eye(len(columns), dtype=block.dtype, device=block.device))
                if int(info) == 0:
                    solution = torch.cholesky_solve(cross[columns][:, members], lower)
                    break
            if solution is None:
                weights[members] = float("nan")
            else:
                weights[members[:, None], columns[None, :]] = solution.T
        return weights

    def _by_row(self, regularised, lam, cross, keep) -> torch.Tensor:
        rows_total, d = keep.shape
        device = cross.device
        weights = torch.zeros(rows_total, d, dtype=torch.float64, device=device)
        counts = keep.sum(dim=1)
        order = torch.argsort(counts, stable=True)  # similar sizes together: little padding
        start = 0
        while start < rows_total:
            # Rows ascend in kept count, so a chunk's block is as wide as its last row's: take the longest run of
            # rows whose (rows × k_last²) block fits in chunk_bytes (at least one row).
            widths = counts[order[start:]].clamp(min=1).double()
            blocks = torch.arange(1, len(widths) + 1, dtype=torch.float64, device=device) * widths.square() * 8
            size = max(1, int((blocks <= self.chunk_bytes).sum()))
            rows = order[start : start + size]
            start += len(rows)
            k_max = int(counts[rows].max())
            if k_max == 0:
                continue
            # kept column indices first, in column order; padding marked invalid
            columns = torch.argsort((~keep[rows]).to(torch.int8), dim=1, stable=True)[:, :k_max]
            valid = torch.arange(k_max, device=device)[None, :] < counts[rows][:, None]
            pair = valid[:, :, None] & valid[:, None, :]
            block = regularised[columns[:, :, None], columns[:, None, :]] * pair
            rhs = cross[columns, rows[:, None]] * valid
            pending = torch.arange(len(rows), device=device)
            solution = torch.full((len(rows), k_max), float("nan"), dtype=torch.float64, device=device)
            # retries add damping: 10×, 100×... λ (from 1e-8 of the block's mean diagonal when λ is 0)
            base = lam + 1e-8 * block.diagonal(dim1=1, dim2=2).sum(dim=1) / counts[rows].clamp(min=1) * (lam == 0)
            for attempt in range(6):
                extra = (base[pending] * (10.0**attempt - 1 if attempt else 0.0))[:, None]
                diagonal = torch.where(valid[pending], extra, torch.ones(1, dtype=torch.float64, device=device))
                factor, info = torch.linalg.cholesky_ex(block[pending] + torch.diag_embed(diagonal))
                good = info == 0
                solution[pending[good]] = torch.cholesky_solve(rhs[pending[good]].unsqueeze(-1), factor[good]).squeeze(-1)
                pending = pending[~good]
                if not len(pending):
                    break
            solution = torch.where(valid, solution, torch.zeros(1, dtype=torch.float64, device=device))
            solution[pending] = float("nan")
            target = weights[rows]
            target.scatter_(1, columns, solution)
            target[pending] = float("nan")
            weights[rows] = target
        return weights
