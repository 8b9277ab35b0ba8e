"""PCGrad, IMTL-G, Nash-MTL, FairGrad, Aligned-MTL, DB-MTL, GradVac and RLW against direct
implementations of the papers' algorithms on explicit per-task gradient vectors (float64, in the
style of the official code), plus their properties, state, edge cases and sync-freedom."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from mtlsam_fast import weighting
from mtlsam_fast.ops import philox
from mtlsam_fast.weighting.alignedmtl import AlignedMTL
from mtlsam_fast.weighting.dbmtl import DBMTL
from mtlsam_fast.weighting.fairgrad import FairGrad
from mtlsam_fast.weighting.gradvac import GradVac
from mtlsam_fast.weighting.imtl import IMTL
from mtlsam_fast.weighting.nashmtl import NashMTL
from mtlsam_fast.weighting.pcgrad import PCGrad
from mtlsam_fast.weighting.rlw import RLW, PhiloxStream

F64 = torch.float64
KS = [1, 2, 3, 8]
NAMES = ["pcgrad", "imtl", "nashmtl", "fairgrad", "alignedmtl", "dbmtl", "gradvac", "rlw"]
RANDOM = {"pcgrad", "gradvac", "rlw"}
STATEFUL = {"pcgrad", "gradvac", "rlw", "dbmtl"}


def grads(K: int, device, P: int = 24, seed: int = 0, dtype=F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(K, P, generator=gen, dtype=F64)
    G = G * torch.exp(torch.randn(K, 1, generator=gen, dtype=F64))  # unequal norms
    return G.to(device=device, dtype=dtype)


def gram_of(G: torch.Tensor) -> torch.Tensor:
    return G @ G.T


# ---------------------------------------------------------------- references (explicit vectors)


def ref_orders(seed: int, offset: int, K: int) -> list[list[int]]:
    """The documented stream: keys = Philox words at counters offset..offset+K*K-1, row-major;
    row i visits the other tasks by increasing key (stable)."""
    words = philox.philox4x32(seed, torch.arange(offset, offset + K * K, dtype=torch.int64))[
        0
    ].view(K, K)
    return [
        sorted((j for j in range(K) if j != i), key=lambda j: (int(words[i, j]), j))
        for i in range(K)
    ]


def ref_pcgrad(G: torch.Tensor, orders, reduction: str = "sum"):
    """Paper Algorithm 1 / LibMTL style: returns (direction, LibMTL's batch_weight)."""
    K = G.shape[0]
    pc = G.clone()
    batch_weight = np.ones(K)
    for i in range(K):
        for j in orders[i]:
            g_ij = torch.dot(pc[i], G[j])
            if g_ij < 0:
                pc[i] -= g_ij * G[j] / G[j].norm().pow(2)
                batch_weight[j] -= (g_ij / G[j].norm().pow(2)).item()
    d = pc.sum(0)
    if reduction == "mean":
        return d / K, batch_weight / K
    return d, batch_weight


def ref_gradvac(G: torch.Tensor, orders, rho_T: torch.Tensor, beta: float):
    """LibMTL's GradVac (whole model), cosines without its +1e-8; updates rho_T in place."""
    K = G.shape[0]
    pc = G.clone()
    batch_weight = np.ones(K)
    for i in range(K):
        for j in orders[i]:
            rho = torch.dot(pc[i], G[j]) / (pc[i].norm() * G[j].norm())
            if rho < rho_T[i, j]:
                w = (
                    pc[i].norm()
                    * (rho_T[i, j] * (1 - rho**2).sqrt() - rho * (1 - rho_T[i, j] ** 2).sqrt())
                    / (G[j].norm() * (1 - rho_T[i, j] ** 2).sqrt())
                )
                pc[i] += G[j] * w
                batch_weight[j] += w.item()
            rho_T[i, j] = (1 - beta) * rho_T[i, j] + beta * rho
    return pc.sum(0), batch_weight


def ref_imtl(G: torch.Tensor) -> torch.Tensor:
    """LibMTL's IMTL-G (closed form anchored at task 1)."""
    K = G.shape[0]
    if K == 1:
        return torch.ones(1, dtype=G.dtype)
    grads_unit = G / torch.norm(G, p=2, dim=-1, keepdim=True)
    D = G[0:1].repeat(K - 1, 1) - G[1:]
    U = grads_unit[0:1].repeat(K - 1, 1) - grads_unit[1:]
    alpha = torch.matmul(torch.matmul(G[0], U.t()), torch.inverse(torch.matmul(D, U.t())))
    return torch.cat((1 - alpha.sum().unsqueeze(0), alpha), dim=0)


def ref_power(G: torch.Tensor, alpha: float, normalize: bool = True) -> np.ndarray:
    """FairGrad's official solver (scipy least_squares from 1/K, w >= 0), tightened; alpha = 1 is
    Nash-MTL."""
    A = (G @ G.T).cpu().numpy()
    if normalize:
        A = A / np.linalg.norm(A)
    K = A.shape[0]
    res = scipy.optimize.least_squares(
        lambda x: A @ x - np.power(1 / x, 1 / alpha),
        np.ones(K) / K,
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=10000,
    )
    return res.x


def ref_aligned(G: torch.Tensor, scale_mode: str = "min") -> torch.Tensor:
    """Aligned-MTL from the SVD of G (Procrustes): G_hat = s * U_r V_r^T, d = 1^T G_hat."""
    K = G.shape[0]
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    lam = S**2
    r = int((lam > lam.max() * K * torch.finfo(G.dtype).eps).sum())
    lam_r = lam[:r]
    if scale_mode == "min":
        s = lam_r[-1].sqrt()
    elif scale_mode == "median":
        s = torch.median(lam_r).sqrt()
    else:
        s = lam_r.mean().sqrt()
    return (s * U[:, :r] @ Vh[:r]).sum(0)


def ref_dbmtl_official(G_steps, beta: float, beta_sigma: float) -> np.ndarray:
    """LibMTL's DB-MTL: EMA of the full gradients; returns the last step's alpha."""
    buf = torch.zeros_like(G_steps[0])
    for step, G in enumerate(G_steps, start=1):
        buf = G + (beta / step**beta_sigma) * (buf - G)
        u = buf.norm(dim=-1)
        alpha = u.max() / (u + 1e-8)
    return alpha.cpu().numpy()


def ref_dbmtl_sqnorm(G_steps, beta: float, beta_sigma: float) -> np.ndarray:
    """The documented Gram-only variant: the same EMA on the squared norms."""
    s = torch.zeros(G_steps[0].shape[0], dtype=F64)
    for step, G in enumerate(G_steps, start=1):
        sq = (G.cpu() ** 2).sum(1)
        s = sq + (beta / step**beta_sigma) * (s - sq)
        u = s.sqrt()
        alpha = u.max() / (u + 1e-8)
    return alpha.numpy()


# ---------------------------------------------------------------- comparisons with the papers


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_matches_paper(K, reduction, device):
    w = PCGrad(reduction=reduction, seed=7)
    offset = 0
    for step in range(3):
        G = grads(K, device, seed=10 * K + step)
        out = w(gram_of(G))
        d_ref, bw = ref_pcgrad(G.cpu(), ref_orders(7, offset, K), reduction)
        offset += K * K
        torch.testing.assert_close(out.cpu(), torch.from_numpy(bw), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close((out @ G).cpu(), d_ref, rtol=1e-9, atol=1e-10)
        again = PCGrad(reduction=reduction)
        again.load_state_dict({"stream": {"seed": 7, "offset": torch.tensor(offset - K * K)}})
        w32 = again(gram_of(G).float())
        assert w32.dtype == torch.float32
        torch.testing.assert_close(w32.double().cpu(), torch.from_numpy(bw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K", KS)
def test_gradvac_matches_paper_over_steps(K, device):
    beta = 0.3
    w = GradVac(beta=beta, seed=3)
    rho_T = torch.zeros(K, K, dtype=F64)
    offset = 0
    for step in range(4):
        G = grads(K, device, seed=100 * K + step)
        if step == 2 and K > 1:
            G[1] = -0.5 * G[0] + 0.1 * G[1]  # strong conflict
        out = w(gram_of(G))
        d_ref, bw = ref_gradvac(G.cpu(), ref_orders(3, offset, K), rho_T, beta)
        offset += K * K
        torch.testing.assert_close(out.cpu(), torch.from_numpy(bw), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close((out @ G).cpu(), d_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w.state_dict()["target"].cpu(), rho_T, rtol=1e-12, atol=1e-12)


def test_gradvac_first_step_is_pcgrad_for_two_tasks(device):
    for seed in range(5):
        G = grads(2, device, seed=seed)
        gram = gram_of(G)
        torch.testing.assert_close(GradVac()(gram), PCGrad()(gram), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_imtl_matches_paper(K, dtype, device):
    G = grads(K, device, P=3 * K + 4, seed=K)
    out = IMTL()(gram_of(G).to(dtype))
    ref = ref_imtl(G.cpu())
    tol = 1e-9 if dtype == F64 else 1e-4
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
    # the defining property: equal projections of d onto every unit gradient, sum(w) = 1
    d = out.double() @ G
    proj = (G @ d) / G.norm(dim=1)
    torch.testing.assert_close(proj, proj[:1].expand(K), rtol=10 * tol, atol=10 * tol)
    assert abs(out.double().sum().item() - 1) < 10 * tol


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_nashmtl_solves_the_bargaining_equation(K, dtype, device):
    G = grads(K, device, P=2 * K + 6, seed=20 + K)
    gram = gram_of(G)
    gn = gram / torch.linalg.matrix_norm(gram)
    out = NashMTL()(gram.to(dtype)).double()
    resid = (gn @ out - 1 / out).norm() / (1 / out).norm()
    assert resid <= (1e-9 if dtype == F64 else 1e-5), resid
    ref = ref_power(G, 1.0)
    ref_resid = np.linalg.norm(gn.cpu().numpy() @ ref - 1 / ref) / np.linalg.norm(1 / ref)
    assert ref_resid < 1e-9  # the reference itself converged
    torch.testing.assert_close(out.cpu(), torch.from_numpy(ref), rtol=1e-5, atol=1e-7)
    # the Nash bargaining solution improves every task: <g_i, d> = 1 / alpha_i > 0
    assert (G @ (out @ G) > 0).all()
    # the paper's un-normalized equation
    raw = NashMTL(normalize=False)(gram).double()
    assert ((gram @ raw - 1 / raw).norm() / (1 / raw).norm()) <= 1e-9
    torch.testing.assert_close(
        raw.cpu(), torch.from_numpy(ref_power(G, 1.0, normalize=False)), rtol=1e-5, atol=1e-9
    )


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
def test_fairgrad_matches_official_solver(K, alpha, device):
    G = grads(K, device, P=2 * K + 6, seed=40 + K)
    gram = gram_of(G)
    gn = gram / torch.linalg.matrix_norm(gram)
    out = FairGrad(alpha=alpha)(gram)
    rhs = out.pow(-1 / alpha)
    assert (gn @ out - rhs).norm() / rhs.norm() <= 1e-9
    ref = ref_power(G, alpha)
    torch.testing.assert_close(out.cpu(), torch.from_numpy(ref), rtol=1e-5, atol=1e-8)
    raw = FairGrad(alpha=alpha, normalize=False)(gram)
    torch.testing.assert_close(
        raw.cpu(), torch.from_numpy(ref_power(G, alpha, normalize=False)), rtol=1e-5, atol=1e-9
    )
    out32 = FairGrad(alpha=alpha)(gram.float()).double()
    assert (gn @ out32 - out32.pow(-1 / alpha)).norm() / out32.pow(-1 / alpha).norm() <= 1e-5
    # alpha-fair allocation: <g_i, d> = w_i^(-1/alpha) > 0 for every task
    torch.testing.assert_close(gn @ out, rhs, rtol=1e-8, atol=0)


def test_fairgrad_alpha_one_solves_the_bargaining_equation(device):
    """alpha = 1 is Nash-MTL's equation Γw = 1/w, checked on the equation and the independent
    reference (FairGrad and NashMTL share their solver: comparing the two would be a
    tautology)."""
    G = grads(5, device)
    gram = gram_of(G)
    out = FairGrad(alpha=1.0)(gram)
    gn = gram / torch.linalg.matrix_norm(gram)
    assert (gn @ out - 1 / out).norm() / (1 / out).norm() <= 1e-9
    torch.testing.assert_close(out.cpu(), torch.from_numpy(ref_power(G, 1.0)), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_power_solver_badly_scaled_and_singular(alpha, device):
    """Gradient norms spanning 1e-4..1e4, and Grams with no solution (zero / opposite gradients)."""
    G = grads(8, device, P=30, seed=5)
    G = (
        G
        / G.norm(dim=1, keepdim=True)
        * torch.logspace(-4, 4, 8, dtype=F64, device=device)[:, None]
    )
    gram = gram_of(G)
    gn = gram / torch.linalg.matrix_norm(gram)
    w = FairGrad(alpha=alpha)(gram)
    r = gn @ w - w.pow(-1 / alpha)
    assert (
        r.abs() / (gn.abs() @ w + w.pow(-1 / alpha))
    ).max() <= 1e-9  # componentwise backward error
    for case in ("zero", "opposite"):
        G = grads(4, device, seed=6)
        if case == "zero":
            G[2] = 0
        else:
            G[1] = -G[0]
        w = FairGrad(alpha=alpha)(gram_of(G))
        assert torch.isfinite(w).all() and (w > 0).all()
        big = [2] if case == "zero" else [0, 1]
        assert (
            w[big] > 1e3
        ).all()  # no solution: those weights grow to about reg^(-alpha/(alpha+1))


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("solver", ["eigh", "jacobi"])
def test_alignedmtl_matches_procrustes_svd(K, scale_mode, solver, device):
    G = grads(K, device, P=3 * K + 2, seed=60 + K)
    out = AlignedMTL(scale_mode=scale_mode, solver=solver)(gram_of(G))
    torch.testing.assert_close(
        (out @ G).cpu(), ref_aligned(G.cpu(), scale_mode), rtol=1e-8, atol=1e-9
    )


@pytest.mark.parametrize("solver", ["eigh", "jacobi"])
def test_alignedmtl_rank_deficient(solver, device):
    base = grads(2, device, P=20, seed=8)
    mix = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5]], dtype=F64, device=device)
    G = mix @ base  # K = 4, rank 2
    for dtype in (F64, torch.float32):
        out = AlignedMTL(solver=solver)(gram_of(G).to(dtype)).double()
        torch.testing.assert_close((out @ G).cpu(), ref_aligned(G.cpu()), rtol=1e-4, atol=1e-4)
    # the aligned rows are orthogonal with equal norms sqrt(sigma_min) on the rank-2 subspace
    U, S, Vh = torch.linalg.svd(G.cpu())
    d = (AlignedMTL(solver=solver)(gram_of(G)) @ G).cpu()
    d_ref = S[1] * (U[:, :2] @ Vh[:2]).sum(0)
    torch.testing.assert_close(d, d_ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("K", [2, 5, 8, 40])
def test_jacobi_eigh_matches_lapack(K, device):
    from mtlsam_fast.weighting.alignedmtl import jacobi_eigh

    G = grads(K, device, P=K + 3, seed=K)
    A = gram_of(G)
    lam, V = jacobi_eigh(A)
    ref = torch.linalg.eigvalsh(A)
    torch.testing.assert_close(lam, ref, rtol=0, atol=1e-12 * ref.abs().max().item())
    torch.testing.assert_close((V * lam) @ V.T, A, rtol=0, atol=1e-12 * A.abs().max().item())
    torch.testing.assert_close(V.T @ V, torch.eye(K, dtype=F64, device=device), rtol=0, atol=1e-12)


@pytest.mark.parametrize("K", KS)
def test_dbmtl_matches_official_where_exact(K, device):
    """First step (any gradients) and stationary gradients: the squared-norm EMA is exact."""
    G = grads(K, device, seed=70 + K)
    out = DBMTL()(gram_of(G))
    torch.testing.assert_close(
        out.cpu(), torch.from_numpy(ref_dbmtl_official([G], 0.9, 0.0)), rtol=1e-7, atol=0
    )
    w = DBMTL(beta=0.8, beta_sigma=0.5)
    for _ in range(5):
        out = w(gram_of(G))
    torch.testing.assert_close(
        out.cpu(), torch.from_numpy(ref_dbmtl_official([G] * 5, 0.8, 0.5)), rtol=1e-7, atol=0
    )


@pytest.mark.parametrize("K", KS)
def test_dbmtl_squared_norm_ema(K, device):
    steps = [grads(K, device, seed=80 + s) * (s + 1) for s in range(6)]
    w = DBMTL(beta=0.7, beta_sigma=0.3)
    for G in steps:
        out = w(gram_of(G))
    torch.testing.assert_close(
        out.cpu(), torch.from_numpy(ref_dbmtl_sqnorm(steps, 0.7, 0.3)), rtol=1e-10, atol=0
    )
    # balancing: every weighted EMA norm equals the largest one (up to eps)
    u = torch.from_numpy(np.sqrt(w.state_dict()["sq_norm_ema"].cpu().numpy()))
    torch.testing.assert_close(out.cpu() * u, u.max().expand(K), rtol=1e-7, atol=0)


@pytest.mark.parametrize("K", KS)
def test_rlw_is_softmax_of_the_documented_normals(K, device):
    w = RLW(seed=11)
    for step in range(3):
        out = w(torch.eye(K, dtype=F64, device=device))
        # the normals computed on the same device (CUDA's logf / cosf differ from the CPU's in the
        # last ulp)
        z = philox.gaussian_from_counter(
            11, torch.arange(step * K, (step + 1) * K, dtype=torch.int64, device=device)
        )
        torch.testing.assert_close(out, torch.softmax(z.double(), 0), rtol=1e-12, atol=0)


def test_random_orders_are_uniform_permutations(device):
    stream = PhiloxStream(5)
    K = 4
    counts: dict[tuple[int, ...], int] = {}
    n = 600
    for _ in range(n // K):
        orders = stream.task_orders(K, device).cpu()
        for i in range(K):
            row = orders[i].tolist()
            assert sorted(row) == [j for j in range(K) if j != i]
            counts[(i, *row)] = counts.get((i, *row), 0) + 1
    assert len(counts) == K * 6  # every order of the 3 other tasks occurs for every task
    # 25 draws per (task, order) on average; a fair stream stays well inside [5, 50]
    assert min(counts.values()) >= 5 and max(counts.values()) <= 50
    z = torch.cat([PhiloxStream(s).normal(500, torch.device(device)).cpu() for s in range(4)])
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1


# ---------------------------------------------------------------- properties

DETERMINISTIC = ["imtl", "nashmtl", "fairgrad", "alignedmtl"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_permutation_equivariance_and_scale_invariance(name, device):
    G = grads(6, device, seed=90)
    gram = gram_of(G)
    perm = torch.tensor([4, 2, 0, 5, 1, 3], device=device)
    w = weighting.get(name)
    base = w(gram)
    torch.testing.assert_close(w(gram[perm][:, perm]), base[perm], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(w(gram * 1e6), base, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(w(gram * 1e-6), base, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_random_methods_are_scale_invariant_and_seeded(name, device):
    gram = gram_of(grads(5, device, seed=91))
    a, b, c = (weighting.get(name, seed=s) for s in (1, 1, 2))
    wa = [a(gram) for _ in range(3)]
    wb = [b(gram * 1e4) for _ in range(3)]
    for x, y in zip(wa, wb):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(x, c(gram)) for x in wa)


def test_scale_equivariance_without_normalization(device):
    gram = gram_of(grads(5, device, seed=92))
    for alpha in (0.5, 1.0, 4.0):
        w = FairGrad(alpha=alpha, normalize=False)
        torch.testing.assert_close(
            w(gram * 9.0), w(gram) * 9.0 ** (-alpha / (alpha + 1)), rtol=1e-8, atol=0
        )
    # Nash-MTL is invariant to rescaling a task's loss: g_i -> s_i g_i gives
    # alpha_i -> alpha_i / s_i
    G = grads(4, device, seed=93)
    s = torch.tensor([0.1, 1.0, 7.0, 30.0], dtype=F64, device=device)
    a0 = NashMTL(normalize=False)(gram_of(G))
    a1 = NashMTL(normalize=False)(gram_of(G * s[:, None]))
    torch.testing.assert_close(a1, a0 / s, rtol=1e-8, atol=0)


def test_pcgrad_two_tasks_do_not_conflict(device):
    for seed in range(6):
        G = grads(2, device, seed=seed)
        G[1] = -0.7 * G[0] + 0.3 * G[1]
        d = PCGrad()(gram_of(G)) @ G
        assert (G @ d >= -1e-12 * (G * G).sum(1)).all()
        # each projected gradient is orthogonal to the gradient it conflicted with
        gram = gram_of(G)
        if gram[0, 1] < 0:
            g0 = G[0] - gram[0, 1] / gram[1, 1] * G[1]
            assert abs(torch.dot(g0, G[1]).item()) < 1e-10 * gram.diagonal().max().item()


# ---------------------------------------------------------------- state, determinism, edge cases


def make(name: str, seed: int = 0):
    return weighting.get(name, seed=seed) if name in RANDOM else weighting.get(name)


@pytest.mark.parametrize("name", NAMES)
def test_fixed_seed_determinism_and_state_round_trip(name, device):
    grams = [gram_of(grads(4, device, seed=s)) for s in range(6)]
    a, b = make(name, 3), make(name, 3)
    for g in grams[:2]:
        torch.testing.assert_close(a(g), b(g), rtol=0, atol=0)
    state = a.state_dict()
    later = [a(g) for g in grams[2:]]
    c = make(name, 99)
    c.load_state_dict(state)
    for g, ref in zip(grams[2:], later):
        assert torch.equal(c(g), ref)
    if name in STATEFUL:
        assert state  # has something to round-trip
        fresh = make(name, 3)
        assert not all(torch.equal(fresh(g), ref) for g, ref in zip(grams[2:], later))
    else:
        assert state == {}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_bad_state_raises_before_changing_anything(name):
    w = make(name)
    w(torch.eye(3, dtype=F64))
    before = w.state_dict()
    with pytest.raises(ValueError):
        w.load_state_dict({"bogus": 1})
    after = w.state_dict()
    assert before.keys() == after.keys()
    g = torch.eye(3, dtype=F64)
    ref = make(name)
    ref.load_state_dict(before)
    assert torch.equal(w(g), ref(g))


@pytest.mark.parametrize("name", ["gradvac", "dbmtl"])
def test_stateful_methods_reject_k_change(name):
    w = make(name)
    w(torch.eye(3))
    with pytest.raises(ValueError, match="K=4"):
        w(torch.eye(4))


@pytest.mark.parametrize("name", ["gradvac", "dbmtl"])
def test_nonfinite_step_leaves_ema_state_untouched(name):
    w = make(name)
    g = gram_of(grads(3, "cpu", seed=1))
    w(g)
    before = w.state_dict()
    bad = g.clone()
    bad[0, 0] = float("nan")
    assert torch.isnan(w(bad)).all()
    after = w.state_dict()
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, after[k])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("K", KS)
def test_edge_cases(name, K, device):
    for dtype in (torch.float32, F64):
        G = grads(K, device, dtype=dtype)
        if K == 1:
            out = make(name)(gram_of(G))
            torch.testing.assert_close(
                out, torch.ones(1, dtype=dtype, device=device), rtol=1e-6, atol=1e-6
            )
        zero = torch.zeros(K, K, dtype=dtype, device=device)
        identical = gram_of(G[:1].expand(K, -1).contiguous())
        one_zero = gram_of(torch.cat([torch.zeros_like(G[:1]), G[1:]]))
        for gram in (zero, identical, one_zero):
            out = make(name)(gram)
            assert out.shape == (K,) and out.dtype == dtype and out.device == gram.device
            assert torch.isfinite(out).all()
        for bad in (float("nan"), float("inf"), -float("inf")):
            gram = gram_of(G).clone()
            gram[0, -1] = bad
            assert torch.isnan(make(name)(gram)).all()


def test_identical_gradients_give_symmetric_weights():
    g = grads(1, "cpu", seed=4)
    gram = gram_of(g.expand(5, -1).contiguous())
    # the Gram's last-bit rounding in the singular direction is amplified by 1/lambda
    torch.testing.assert_close(IMTL()(gram), torch.full((5,), 0.2, dtype=F64), rtol=0, atol=1e-4)
    torch.testing.assert_close(AlignedMTL()(gram), torch.ones(5, dtype=F64))
    torch.testing.assert_close(PCGrad()(gram), torch.ones(5, dtype=F64))
    w = NashMTL()(gram)
    torch.testing.assert_close(w, w[:1].expand(5))


def test_option_validation():
    bad = [
        (PCGrad, {"reduction": "max"}),
        (PCGrad, {"seed": -1}),
        (PCGrad, {"seed": 1.5}),
        (FairGrad, {"alpha": -1.0}),
        (FairGrad, {"alpha": 0}),
        (FairGrad, {"alpha": float("inf")}),
        (FairGrad, {"max_iter": 0}),
        (NashMTL, {"reg": -1e-3}),
        (NashMTL, {"normalize": "yes"}),
        (AlignedMTL, {"scale_mode": "max"}),
        (AlignedMTL, {"rtol": -1.0}),
        (AlignedMTL, {"solver": "svd"}),
        (AlignedMTL, {"sweeps": 0}),
        (DBMTL, {"beta": -0.1}),
        (DBMTL, {"beta": 1.5}),
        (DBMTL, {"beta_sigma": -1}),
        (DBMTL, {"eps": 0.0}),
        (GradVac, {"beta": -0.5}),
        (GradVac, {"beta": 2.0}),
        (RLW, {"seed": 2**64}),
    ]
    for cls, opts in bad:
        with pytest.raises(ValueError):
            cls(**opts)
    for name in NAMES:
        assert make(name).needs_losses is False
        with pytest.raises(ValueError, match="square"):
            make(name)(torch.zeros(2, 3))


# ---------------------------------------------------------------- sync-freedom

COMPILE_CASES = [
    ("pcgrad", {"reduction": "mean"}),
    ("gradvac", {}),
    ("rlw", {}),
    ("dbmtl", {"beta_sigma": 0.5}),
    ("imtl", {}),
    ("alignedmtl", {"scale_mode": "median"}),
    ("alignedmtl", {"solver": "jacobi", "sweeps": 3}),
    # a short Newton budget keeps tracing fast; every iteration is the same code
    ("nashmtl", {"max_iter": 5}),
    ("fairgrad", {"alpha": 2.0, "max_iter": 5}),
]


COMPILE_IDS = [f"{n}-{'-'.join(map(str, o.values()))}" for n, o in COMPILE_CASES]


@pytest.mark.parametrize("name,opts", COMPILE_CASES, ids=COMPILE_IDS)
def test_compiles_without_graph_break_and_matches_eager(name, opts, device):
    torch._dynamo.reset()
    grams = [gram_of(grads(3, device, dtype=torch.float32, seed=s)) for s in range(2)]
    eager, compiled = weighting.get(name, **opts), weighting.get(name, **opts)
    fn = torch.compile(lambda g: compiled(g), fullgraph=True, backend="eager")
    for g in grams:
        torch.testing.assert_close(fn(g), eager(g), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_no_host_sync_on_cuda(name):
    """AlignedMTL's default solver on CUDA is the Jacobi one (torch.linalg.eigh synchronizes)."""
    grams = [gram_of(grads(4, "cuda", dtype=torch.float32, seed=s)) for s in range(2)]
    w = make(name)
    w(grams[0])  # lazy state creation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for g in grams:
            w(g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
