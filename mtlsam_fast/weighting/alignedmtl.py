"""Aligned-MTL: align the principal components of the gradient matrix.

Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023 (https://arxiv.org/abs/2305.19000); official code
https://github.com/SamsungLabs/MTL (``ProcrustesSolver``), also in LibMTL (``Aligned_MTL.py``).
"""

from __future__ import annotations

import functools

import torch

from .base import (
    Tensor,
    VectorOption,
    Weighting,
    check_choice,
    check_int,
    check_number,
    out_dtype,
)

SCALE_MODES = ("min", "median", "rmse")
SOLVERS = ("auto", "eigh", "jacobi")
DEFAULT_SWEEPS = 10


def _round_robin(K: int) -> list[tuple[list[int], list[int]]]:
    """Rounds of disjoint pairs covering every pair once (circle method; the bye is dropped)."""
    m = K + (K % 2)
    players = list(range(m))
    rounds = []
    for _ in range(m - 1):
        pairs = [(players[i], players[m - 1 - i]) for i in range(m // 2)]
        pairs = [(min(a, b), max(a, b)) for a, b in pairs if a < K and b < K]
        rounds.append(([a for a, _ in pairs], [b for _, b in pairs]))
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


@functools.cache
def _round_indices(K: int, device: torch.device) -> tuple[tuple[Tensor, Tensor], ...]:
    """:func:`_round_robin` as index tensors on ``device``, built once per (K, device): building
    them is a host-to-device copy, which synchronizes."""
    return tuple(
        (torch.tensor(p, device=device), torch.tensor(q, device=device))
        for p, q in _round_robin(K)
        if p
    )


def _rotate_rows(X: Tensor, p: Tensor, q: Tensor, c: Tensor, s: Tensor) -> Tensor:
    Xp, Xq = X[p], X[q]
    c, s = c[:, None], s[:, None]
    return X.index_put((p,), c * Xp - s * Xq).index_put((q,), s * Xp + c * Xq)


def jacobi_eigh(A: Tensor, sweeps: int = DEFAULT_SWEEPS) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations, ascending like
    ``eigh``.

    A fixed number of sweeps, each rotating every pair once (disjoint pairs in parallel, one batched
    update per round), with the rotation of Golub & Van Loan (*Matrix Computations*, 8.5.2). Only
    tensor arithmetic: no LAPACK ``info`` check, hence no host sync on accelerators. Jacobi
    converges quadratically; 10 sweeps reach float64 round-off for the K <= 64 Grams tested.
    """
    K = A.shape[0]
    dev, dt = A.device, A.dtype
    eye = torch.eye(K, dtype=dt, device=dev)
    V = eye
    rounds = _round_indices(K, dev)
    for _ in range(sweeps):
        for p, q in rounds:
            app, aqq, apq = A[p, p], A[q, q], A[p, q]
            nz = apq != 0
            tau = (aqq - app) / (2 * torch.where(nz, apq, torch.ones_like(apq)))
            sgn = torch.where(tau >= 0, torch.ones_like(tau), -torch.ones_like(tau))
            t = torch.where(
                nz,
                sgn / (tau.abs() + torch.hypot(torch.ones_like(tau), tau)),
                torch.zeros_like(tau),
            )
            c = torch.rsqrt(1 + t * t)
            s = t * c
            # A <- J^T A J and V <- V J for J = I with J[p,p] = J[q,q] = c, J[p,q] = s, J[q,p] = -s,
            # applied to the touched rows and columns only (elementwise; no GEMM, which MKL
            # threads badly at this size)
            A = _rotate_rows(A, p, q, c, s)
            A = _rotate_rows(A.T, p, q, c, s).T
            V = _rotate_rows(V.T, p, q, c, s).T
    lam = A.diagonal()
    order = torch.argsort(lam)
    return lam[order], V[:, order]


def symmetric_eigh(
    A: Tensor, solver: str = "auto", sweeps: int = DEFAULT_SWEEPS
) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric float64 matrix.

    ``torch.linalg.eigh`` synchronizes with the host on accelerators (it checks LAPACK's
    ``info``), so ``"auto"`` uses it on the CPU only and elsewhere the sync-free fixed-budget
    :func:`jacobi_eigh` (``sweeps`` sweeps of K - 1 batched rounds); ``"eigh"`` / ``"jacobi"``
    force one. A non-finite matrix is decomposed as zero (LAPACK may fail on NaN; the caller's
    result is NaN anyway).
    """
    A = torch.where(torch.isfinite(A).all(), A, torch.zeros_like(A))
    if solver == "eigh" or (solver == "auto" and A.device.type == "cpu"):
        return torch.linalg.eigh(A)
    return jacobi_eigh(0.5 * (A + A.T), sweeps)


class AlignedMTL(Weighting):
    """Aligned-MTL from the eigen-decomposition ``Gamma = V diag(lambda) V^T``.

    The paper replaces the gradient matrix ``G`` (K x P) by the closest matrix with orthogonal rows
    of equal norm (the Procrustes solution) scaled to the smallest singular value:
    ``G_hat = B G`` with ``B = sqrt(lambda_min) V_r diag(lambda_r^{-1/2}) V_r^T`` over the ``r``
    eigenvalues above the rank threshold, and the update ``d = 1^T G_hat``. So the weights on the
    original rows are ``w = B 1`` -- exactly what the official code returns (``B.sum(0)``).
    With ``pref_vector`` ``u`` (the paper's task weights; torchjd's default is ``1/K``) the update
    is ``u^T G_hat`` and the weights ``w = B u``.

    ``scale_mode``: the scale ``sqrt(sigma)`` with ``sigma`` the smallest kept eigenvalue
    (``"min"``, the paper's default), their (lower) median or their mean (``"rmse"``), as in the
    official ``ProcrustesSolver``. Rank threshold: eigenvalues ``> rtol * lambda_max`` are kept,
    with the official ``rtol = K * eps`` (eps of the Gram's dtype) unless given. The decomposition
    runs in float64 (``torch.linalg.eigh``; masks instead of a data-dependent rank). An all-zero
    Gram gives zero weights; identical gradients give weight 1 each (``B = 11^T / K``).

    ``solver`` / ``sweeps``: the eigensolver, see :func:`symmetric_eigh` (``"auto"``: LAPACK on the
    CPU, the sync-free Jacobi solver elsewhere).
    """

    name = "alignedmtl"
    pref_vector = VectorOption(positive_sum=True)

    def __init__(
        self,
        scale_mode: str = "min",
        rtol: float | None = None,
        *,
        solver: str = "auto",
        sweeps: int = DEFAULT_SWEEPS,
        pref_vector: Tensor | None = None,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.pref_vector = pref_vector
        self.scale_mode = check_choice("scale_mode", scale_mode, SCALE_MODES)
        self.rtol = None if rtol is None else check_number("rtol", rtol, low=0.0, high=1.0)
        self.solver = check_choice("solver", solver, SOLVERS)
        self.sweeps = check_int("sweeps", sweeps)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        g = gram.to(torch.float64)
        lam, V = symmetric_eigh(g, self.solver, self.sweeps)
        rtol = self.rtol if self.rtol is not None else K * torch.finfo(gram.dtype).eps
        keep = lam > rtol * lam.max()
        inf = torch.full_like(lam, float("inf"))
        kept = torch.where(keep, lam, inf)  # ascending, the r kept ones first after sorting
        r = keep.sum()
        if self.scale_mode == "min":
            sigma = kept.min()
        elif self.scale_mode == "median":
            srt = torch.sort(kept).values
            idx = ((r - 1).clamp(min=0) // 2).reshape(1)
            sigma = srt.gather(0, idx)[0]
        else:
            sigma = torch.where(keep, lam, torch.zeros_like(lam)).sum() / r.clamp(min=1)
        sigma = torch.where(r > 0, sigma, torch.zeros_like(sigma))
        inv_sqrt = torch.where(
            keep, torch.where(keep, lam, torch.ones_like(lam)).rsqrt(), torch.zeros_like(lam)
        )
        Bmat = (V * (sigma.sqrt() * inv_sqrt)[None, :]) @ V.T
        if self.pref_vector is None:
            w = Bmat.sum(dim=1)
        else:
            w = Bmat @ self._option_on("pref_vector", self.pref_vector, K, gram.device)
        return w.to(out_dtype(gram))
