"""The faithful naive baseline: multi-task SAM written the way the papers' official code is written.

This is what mtlsam_fast is measured against, so it is deliberately *not* optimized, but it is
also not sabotaged: every loop below mirrors a published implementation.

* Per-task gradients are lists of per-parameter tensors (``[p.grad.clone() for p in params]``).
* Dot products are per parameter and per pair of tasks, each brought to the host (``.item()``), as
  in Sener & Koltun's ``MinNormSolver._min_norm_2d`` (github.com/isl-org/MultiObjectiveOptimization,
  ``min_norm_solvers.py``), and the min-norm problem is solved by their host-side (numpy) loop
  ``find_min_norm_element`` (projected-gradient steps with an exact line search, MAX_ITER = 250,
  STOP_CRIT = 1e-5). The original never increments ``iter_count``; we do, so the loop is bounded.
* The perturbation is SAM's (Foret et al. 2021; github.com/davda54/sam): per parameter,
  ``old_p = p.data.clone()``, ``p.add_(grad * scale)``; restore copies each ``old_p`` back.
* Norms are per parameter, each a host scalar.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

Tensor = torch.Tensor
Vecs = Sequence[Sequence[Tensor]]  # vecs[task][param]


def split(G: Tensor, offsets: Sequence[int]) -> list[list[Tensor]]:
    """Per-task, per-parameter views of a [K, P] buffer (how the naive code holds gradients)."""
    return [[row[a:b] for a, b in itertools.pairwise(offsets)] for row in G]


def split_flat(x: Tensor, offsets: Sequence[int]) -> list[Tensor]:
    return [x[a:b] for a, b in itertools.pairwise(offsets)]


class MinNormSolver:
    """Sener & Koltun's MinNormSolver (NeurIPS 2018 code), kept line for line where it matters."""

    MAX_ITER = 250
    STOP_CRIT = 1e-5

    @staticmethod
    def _min_norm_element_from2(v1v1, v1v2, v2v2):
        if v1v2 >= v1v1:
            return 0.999, v1v1
        if v1v2 >= v2v2:
            return 0.001, v2v2
        gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        cost = v2v2 + gamma * (v1v2 - v2v2)
        return gamma, cost

    @staticmethod
    def _min_norm_2d(vecs: Vecs, dps: dict):
        dmin = 1e8
        sol = None
        for i in range(len(vecs)):
            for j in range(i + 1, len(vecs)):
                if (i, j) not in dps:
                    dps[(i, j)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(i, j)] += torch.mul(vecs[i][k], vecs[j][k]).sum().item()
                    dps[(j, i)] = dps[(i, j)]
                if (i, i) not in dps:
                    dps[(i, i)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(i, i)] += torch.mul(vecs[i][k], vecs[i][k]).sum().item()
                if (j, j) not in dps:
                    dps[(j, j)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(j, j)] += torch.mul(vecs[j][k], vecs[j][k]).sum().item()
                c, d = MinNormSolver._min_norm_element_from2(dps[(i, i)], dps[(i, j)], dps[(j, j)])
                if d < dmin:
                    dmin = d
                    sol = [(i, j), c, d]
        return sol, dps

    @staticmethod
    def _projection2simplex(y):
        m = len(y)
        sorted_y = np.flip(np.sort(y), axis=0)
        tmpsum = 0.0
        tmax_f = (np.sum(y) - 1.0) / m
        for i in range(m - 1):
            tmpsum += sorted_y[i]
            tmax = (tmpsum - 1) / (i + 1.0)
            if tmax > sorted_y[i + 1]:
                tmax_f = tmax
                break
        return np.maximum(y - tmax_f, np.zeros(y.shape))

    @staticmethod
    def _next_point(cur_val, grad, n):
        proj_grad = grad - (np.sum(grad) / n)
        tm1 = -1.0 * cur_val[proj_grad < 0] / proj_grad[proj_grad < 0]
        tm2 = (1.0 - cur_val[proj_grad > 0]) / (proj_grad[proj_grad > 0])
        t = 1
        if len(tm1[tm1 > 1e-7]) > 0:
            t = np.min(tm1[tm1 > 1e-7])
        if len(tm2[tm2 > 1e-7]) > 0:
            t = min(t, np.min(tm2[tm2 > 1e-7]))
        next_point = proj_grad * t + cur_val
        return MinNormSolver._projection2simplex(next_point)

    @staticmethod
    def find_min_norm_element(vecs: Vecs, dps: dict | None = None):
        """Min-norm element of the convex hull of ``vecs``; returns (weights [K] numpy, norm^2)."""
        dps = {} if dps is None else dps
        init_sol, dps = MinNormSolver._min_norm_2d(vecs, dps)
        n = len(vecs)
        sol_vec = np.zeros(n)
        sol_vec[init_sol[0][0]] = init_sol[1]
        sol_vec[init_sol[0][1]] = 1 - init_sol[1]
        if n < 3:
            return sol_vec, init_sol[2]
        iter_count = 0
        grad_mat = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                grad_mat[i, j] = dps[(i, j)]
        nd = init_sol[2]
        while iter_count < MinNormSolver.MAX_ITER:
            iter_count += 1  # (missing in the original, whose loop only ends on convergence)
            grad_dir = -1.0 * np.dot(grad_mat, sol_vec)
            new_point = MinNormSolver._next_point(sol_vec, grad_dir, n)
            v1v1 = 0.0
            v1v2 = 0.0
            v2v2 = 0.0
            for i in range(n):
                for j in range(n):
                    v1v1 += sol_vec[i] * sol_vec[j] * dps[(i, j)]
                    v1v2 += sol_vec[i] * new_point[j] * dps[(i, j)]
                    v2v2 += new_point[i] * new_point[j] * dps[(i, j)]
            nc, nd = MinNormSolver._min_norm_element_from2(v1v1, v1v2, v2v2)
            new_sol_vec = nc * sol_vec + (1 - nc) * new_point
            change = new_sol_vec - sol_vec
            if np.sum(np.abs(change)) < MinNormSolver.STOP_CRIT:
                return sol_vec, nd
            sol_vec = new_sol_vec
        return sol_vec, nd


def dps_from_gram(gram: Tensor) -> dict:
    """The ``dps`` dictionary of host floats that MinNormSolver builds, from a Gram matrix."""
    g = gram.double().cpu().tolist()
    K = len(g)
    return {(i, j): g[i][j] for i in range(K) for j in range(K)}


def min_norm_from_gram(gram: Tensor) -> np.ndarray:
    """The host-side solver alone (dot products given): ``find_min_norm_element`` on ``gram``."""
    dps = dps_from_gram(gram)
    K = gram.shape[0]
    sol, _ = MinNormSolver.find_min_norm_element([[None]] * K, dps)
    return sol


def gram(vecs: Vecs) -> np.ndarray:
    """All pairwise dot products, per parameter, each a host scalar (``_min_norm_2d``'s loop)."""
    K = len(vecs)
    out = np.zeros((K, K))
    for i in range(K):
        for j in range(i, K):
            s = 0.0
            for k in range(len(vecs[i])):
                s += torch.mul(vecs[i][k], vecs[j][k]).sum().item()
            out[i, j] = out[j, i] = s
    return out


def diff_gram(A: Vecs, B: Vecs) -> np.ndarray:
    """F-MTL's flat component per parameter (``s_i - g_i``), then the pairwise dot products."""
    for a_row, b_row in zip(A, B):
        for a, b in zip(a_row, b_row):
            a.sub_(b)
    return gram(A)


def mgda_weights(vecs: Vecs) -> np.ndarray:
    """Dot products + host min-norm loop: the MGDA weights as the official code computes them."""
    sol, _ = MinNormSolver.find_min_norm_element(vecs)
    return sol


def segment_norms(vecs: Vecs) -> list[list[float]]:
    """Per task, per parameter L2 norms, each a host scalar."""
    return [[p.norm(p=2).item() for p in row] for row in vecs]


def combine(weights: Sequence[float], vecs: Vecs) -> list[Tensor]:
    """Per parameter ``sum_k w_k g_k`` with host-side weights (the weights come from numpy)."""
    out = []
    for k in range(len(vecs[0])):
        acc = float(weights[0]) * vecs[0][k]
        for t in range(1, len(vecs)):
            acc = acc + float(weights[t]) * vecs[t][k]
        out.append(acc)
    return out


@torch.no_grad()
def perturb(params: Sequence[Tensor], grads: Sequence[Tensor], rho: float = 0.05) -> list[Tensor]:
    """SAM's first step: global grad norm (host), per parameter clone + ``add_(grad * scale)``.

    Returns the clones (``old_p``) needed by :func:`restore`.
    """
    grad_norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
    scale = rho / (grad_norm + 1e-12)
    olds = []
    for p, g in zip(params, grads):
        olds.append(p.data.clone())
        p.add_(g * scale.to(p))
    return olds


@torch.no_grad()
def restore(params: Sequence[Tensor], olds: Sequence[Tensor]) -> None:
    """Per parameter copy back from the clone."""
    for p, old in zip(params, olds):
        p.data.copy_(old)


def noise_stats(ref: Sequence[Tensor], generator: torch.Generator) -> list[tuple[float, float]]:
    """SAMO-style zeroth-order bookkeeping, naively: store z per parameter, host scalars per
    stat."""
    out = []
    for r in ref:
        z = torch.randn(r.shape, generator=generator, dtype=torch.float32, device=r.device)
        out.append(((z * z).sum().item(), (z * r.float()).sum().item()))
    return out
