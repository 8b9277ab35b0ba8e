"""The batched QP solver (``mtlsam_fast.ops.solve_qp``) against exact references.

References: closed forms for K = 2, quadprog (Goldfarb-Idnani, with a tiny ridge) for larger K,
the KKT target of docs/ARCHITECTURE.md §4 (relative residual <= 1e-5 for fp32 input, K <= 64) over a
fixed set of hard matrices, and, for the norm variant (CAGrad's inner problem), a problem whose
optimum sits exactly on the non-smooth point ``Gamma v = 0``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlsam_fast import ops
from mtlsam_fast.ops import kkt_residual


def solve_qp(*args, **kwargs):
    """The reference (``"torch"``) solver of :mod:`mtlsam_fast.ops.qp`, through the public op."""
    kwargs.setdefault("backend", "torch")
    return ops.solve_qp(*args, **kwargs)


quadprog = pytest.importorskip("quadprog")
scipy_optimize = pytest.importorskip("scipy.optimize")

KKT_TARGET = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """K <= 64 problems are latency-bound: intra-op threads only add contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SIZES = [2, 3, 8, 17, 40, 64]
KINDS = ["random", "rankdef", "scaled", "tiny", "huge", "identical", "zero", "opposite"]


def make_gradients(kind: str, K: int, seed: int = 0) -> torch.Tensor:
    """Fixed per-task gradients (fp64, K x P) of the kinds the solver must handle."""
    gen = torch.Generator().manual_seed(1000 * K + KINDS.index(kind) + seed)
    P = 2 * K + 3
    if kind == "rankdef":
        g = torch.randn(K, max(1, K // 4), generator=gen, dtype=torch.float64) @ torch.randn(
            max(1, K // 4), P, generator=gen, dtype=torch.float64
        )
    elif kind == "identical":
        g = torch.randn(1, P, generator=gen, dtype=torch.float64).expand(K, P).clone()
    elif kind == "zero":
        g = torch.zeros(K, P, dtype=torch.float64)
    else:
        g = torch.randn(K, P, generator=gen, dtype=torch.float64)
    if kind == "scaled":  # per-task gradient norms 1e-6 .. 1e6: Gram diagonal 1e-12 .. 1e12
        g = (
            g
            * torch.logspace(-6, 6, K, dtype=torch.float64)[torch.randperm(K, generator=gen)][
                :, None
            ]
        )
    elif kind == "tiny":
        g = g * 1e-6
    elif kind == "huge":
        g = g * 1e6
    elif kind == "opposite" and K > 1:
        g[K // 2 : 2 * (K // 2)] = -g[: K // 2]
    return g


def gram_of(g: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (g @ g.T).to(dtype)


def lower_for(K: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + K)
    return torch.rand(K, generator=gen, dtype=torch.float64) / K


def objective(G: np.ndarray, v: np.ndarray, q: np.ndarray | None = None) -> float:
    return float(0.5 * v @ G @ v + (0.0 if q is None else q @ v))


def quadprog_solve(
    G: np.ndarray, q: np.ndarray | None, lower: np.ndarray | None, constraint: str
) -> np.ndarray:
    K = G.shape[0]
    ridge = 1e-9 * max(np.abs(np.diag(G)).max(), 1e-300)  # smaller ridges make quadprog inexact
    Gp = 0.5 * (G + G.T) + ridge * np.eye(K)
    a = np.zeros(K) if q is None else -q
    if constraint == "simplex":
        C = np.hstack([np.ones((K, 1)), np.eye(K)])
        b = np.concatenate([[1.0], np.zeros(K)])
        v = np.clip(quadprog.solve_qp(Gp, a, C, b, 1)[0], 0.0, None)
        return v / v.sum()  # quadprog's answer can be off the simplex by ~1e-8: snap it back
    return np.maximum(quadprog.solve_qp(Gp, a, np.eye(K), lower, 0)[0], lower)


# ---------------------------------------------------------------------------------------------
# closed forms, K = 2


def closed_form_simplex_2(G: np.ndarray, q: np.ndarray) -> np.ndarray:
    (a, b), (_, c) = G
    t = (c - b + q[1] - q[0]) / (a - 2 * b + c)
    t = min(max(t, 0.0), 1.0)
    return np.array([t, 1 - t])


def closed_form_lower_2(G: np.ndarray, q: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Enumerate the four active sets of ``min 1/2 v'Gv + q'v, v >= lo`` (G positive definite)."""
    sols = []
    for active in ((True, True), (True, False), (False, True), (False, False)):
        v = lo.copy()
        free = [i for i in range(2) if not active[i]]
        if free:
            fixed = [i for i in range(2) if active[i]]
            rhs = -q[free] - G[np.ix_(free, fixed)] @ lo[fixed] if fixed else -q[free]
            v[free] = np.linalg.solve(G[np.ix_(free, free)], rhs)
        z = G @ v + q
        if np.all(v >= lo - 1e-12) and all(z[i] >= -1e-12 for i in range(2) if active[i]):
            sols.append(v)
    assert sols, "no active set satisfies the KKT conditions"
    return min(sols, key=lambda v: objective(G, v, q))


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_k2_simplex(device, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    G = (g @ g.T).numpy()
    q = torch.randn(2, generator=gen, dtype=torch.float64).numpy() * (seed % 3)
    v = solve_qp(torch.tensor(G, device=device), torch.tensor(q, device=device))
    np.testing.assert_allclose(v.cpu().numpy(), closed_form_simplex_2(G, q), atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_k2_lower(device, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    g = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    G = (g @ g.T).numpy()
    q = torch.randn(2, generator=gen, dtype=torch.float64).numpy() * (seed % 2)
    lo = torch.randn(2, generator=gen, dtype=torch.float64).numpy()
    v = solve_qp(
        torch.tensor(G, device=device),
        torch.tensor(q, device=device),
        torch.tensor(lo, device=device),
        constraint="lower",
    )
    np.testing.assert_allclose(v.cpu().numpy(), closed_form_lower_2(G, q, lo), atol=1e-9)


def test_k2_mgda_opposite_and_identical(device):
    # opposite gradients: the hull contains 0 at (1/2, 1/2); identical: every point is optimal
    G = torch.tensor([[4.0, -4.0], [-4.0, 4.0]], dtype=torch.float64, device=device)
    torch.testing.assert_close(
        solve_qp(G), torch.full((2,), 0.5, dtype=torch.float64, device=device)
    )
    v = solve_qp(torch.ones(2, 2, device=device))
    assert torch.isfinite(v).all() and abs(float(v.sum()) - 1) < 1e-6 and bool((v >= 0).all())


# ---------------------------------------------------------------------------------------------
# quadprog, K >= 3


@pytest.mark.parametrize("constraint", ["simplex", "lower"])
@pytest.mark.parametrize("kind", ["random", "rankdef"])
@pytest.mark.parametrize("K", [3, 8, 17, 40, 64])
def test_against_quadprog(K, kind, constraint):
    g = make_gradients(kind, K)
    G = (g @ g.T).numpy()
    gen = torch.Generator().manual_seed(K)
    q = (torch.randn(K, generator=gen, dtype=torch.float64) * math.sqrt(np.diag(G).mean())).numpy()
    if constraint == "lower" and kind == "rankdef":
        # v >= lo with a singular Gamma and a linear term is unbounded (or nearly so in fp64):
        # the bounded, UPGrad/DualProj case is q = 0
        q = np.zeros(K)
    lo = lower_for(K).numpy() if constraint == "lower" else None
    v = solve_qp(
        torch.tensor(G),
        torch.tensor(q),
        None if lo is None else torch.tensor(lo),
        constraint=constraint,
    ).numpy()
    ref = quadprog_solve(G, q, lo, constraint)
    scale = np.abs(np.diag(G)).max() + np.abs(q).max()
    f, f_ref = objective(G, v, q), objective(G, ref, q)
    assert f <= f_ref + 1e-9 * scale, (f, f_ref)
    assert f_ref <= f + 1e-7 * scale, (f, f_ref)
    if kind == "random":  # strictly convex: the minimizer is unique
        np.testing.assert_allclose(v, ref, atol=1e-6)
    # feasibility
    if constraint == "simplex":
        assert v.min() >= 0 and abs(v.sum() - 1) < 1e-12
    else:
        assert np.all(v >= lo)


# ---------------------------------------------------------------------------------------------
# the KKT target of docs/ARCHITECTURE.md §4


@pytest.mark.parametrize("constraint", ["simplex", "lower"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", SIZES)
def test_kkt_target_fp32(K, kind, constraint):
    G = gram_of(make_gradients(kind, K), torch.float32)
    lo = lower_for(K).float() if constraint == "lower" else None
    v = solve_qp(G, lower=lo, constraint=constraint)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    res = float(kkt_residual(G, v, lower=lo, constraint=constraint))
    assert res <= KKT_TARGET, f"KKT residual {res:.3e} for K={K} {kind} {constraint}"


def test_kkt_target_batch_with_linear_term():
    """The whole fixed set, with a linear term, in one batched call per K (simplex: always
    bounded)."""
    for K in SIZES:
        G = torch.stack([gram_of(make_gradients(k, K), torch.float32) for k in KINDS])
        scale = G.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(1e-30)
        q = torch.randn(len(KINDS), K) * scale
        v = solve_qp(G, q)
        res = kkt_residual(G, v, q)
        assert float(res.max()) <= KKT_TARGET, (K, res)


def test_kkt_residual_detects_wrong_answers():
    G = gram_of(make_gradients("random", 8), torch.float64)
    v = solve_qp(G)
    assert float(kkt_residual(G, v)) < 1e-9
    assert float(kkt_residual(G, torch.full((8,), 1 / 8, dtype=torch.float64))) > 1e-3
    assert float(kkt_residual(G, v * 1.1)) > 1e-3  # infeasible


# ---------------------------------------------------------------------------------------------
# batching, edge cases, dtypes, sync-freedom


@pytest.mark.parametrize("constraint", ["simplex", "lower"])
def test_batched_equals_per_problem(device, constraint):
    K = 8
    G = torch.stack([gram_of(make_gradients(k, K), torch.float64) for k in KINDS]).to(device)
    q = torch.randn(len(KINDS), K, dtype=torch.float64, device=device) * G.diagonal(
        dim1=-2, dim2=-1
    ).mean(-1, keepdim=True)
    lo = (
        torch.rand(len(KINDS), K, dtype=torch.float64, device=device) / K
        if constraint == "lower"
        else None
    )
    batched = solve_qp(
        G.reshape(2, 4, K, K),
        q.reshape(2, 4, K),
        None if lo is None else lo.reshape(2, 4, K),
        constraint=constraint,
    )
    assert batched.shape == (2, 4, K)
    single = torch.stack(
        [
            solve_qp(G[b], q[b], None if lo is None else lo[b], constraint=constraint)
            for b in range(len(KINDS))
        ]
    )
    torch.testing.assert_close(batched.reshape(-1, K), single, rtol=0, atol=1e-9)


def test_k1(device):
    G = torch.tensor([[3.0]], device=device)
    torch.testing.assert_close(solve_qp(G), torch.ones(1, device=device))
    torch.testing.assert_close(
        solve_qp(torch.zeros(1, 1, device=device)), torch.ones(1, device=device)
    )
    lo = torch.tensor([0.5], device=device)
    torch.testing.assert_close(solve_qp(G, lower=lo, constraint="lower"), lo)
    q = torch.tensor([-6.0], device=device)  # unconstrained minimum 2 >= 0.5
    torch.testing.assert_close(
        solve_qp(G, q, lo, constraint="lower"), torch.tensor([2.0], device=device)
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("constraint", ["simplex", "lower"])
def test_nonfinite_gives_nan_without_exception(device, bad, constraint):
    G = torch.stack([gram_of(make_gradients("random", 4))] * 3).to(device)
    G[1, 2, 1] = bad
    lo = torch.full((3, 4), 0.1, device=device) if constraint == "lower" else None
    v = solve_qp(G, lower=lo, constraint=constraint)
    assert torch.isnan(v[1]).all()
    assert torch.isfinite(v[[0, 2]]).all()
    torch.testing.assert_close(
        v[0], solve_qp(G[0], lower=None if lo is None else lo[0], constraint=constraint)
    )
    q = torch.zeros(4, device=device)
    q[0] = bad
    assert torch.isnan(solve_qp(G[0], q)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("constraint", ["simplex", "lower"])
def test_dtypes(device, dtype, constraint):
    G = gram_of(make_gradients("random", 6), torch.float64).to(device)
    Gd = G.to(dtype)
    lo = torch.full((6,), 0.05, device=device) if constraint == "lower" else None
    v = solve_qp(Gd, lower=None if lo is None else lo.to(dtype), constraint=constraint)
    assert v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # exactly the fp64 solution of the rounded input, rounded once
    ref = solve_qp(
        Gd.to(torch.float64),
        lower=None if lo is None else lo.to(dtype).to(torch.float64),
        constraint=constraint,
    )
    torch.testing.assert_close(v, ref.to(v.dtype), rtol=1e-6, atol=1e-7)


def test_compile_fullgraph_matches_eager():
    """Sync-freedom: no graph break (no .item(), no data-dependent Python branch) under dynamo."""
    G = torch.stack([gram_of(make_gradients(k, 5)) for k in ("random", "rankdef", "opposite")])
    lo = torch.eye(5) / 5
    r = torch.tensor([0.3, 0.2, 0.5])
    kw = dict(max_iter=8)  # tracing unrolls the loop: keep it short, the check is the graph
    eager = (
        solve_qp(G, **kw),
        solve_qp(G[0].expand(5, 5, 5), lower=lo, constraint="lower", **kw),
        solve_qp(G, G.mean(-1), norm_coef=r, **kw),
    )
    torch._dynamo.reset()
    try:
        fn = torch.compile(
            lambda G, lo, r: (
                solve_qp(G, **kw),
                solve_qp(G[0].expand(5, 5, 5), lower=lo, constraint="lower", **kw),
                solve_qp(G, G.mean(-1), norm_coef=r, **kw),
            ),
            fullgraph=True,
            backend="eager",
        )
        compiled = fn(G, lo, r)
    finally:
        torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.ones(3, 4),), {}, "square"),
        ((torch.ones(3),), {}, "square"),
        ((torch.eye(3), torch.ones(4)), {}, "q must have shape"),
        ((torch.eye(3),), {"lower": torch.ones(2), "constraint": "lower"}, "lower must have shape"),
        ((torch.eye(3),), {"lower": torch.ones(3)}, "only used with constraint='lower'"),
        ((torch.eye(3),), {"constraint": "box"}, "constraint must be"),
        ((torch.eye(3),), {"norm_coef": torch.ones(()), "constraint": "lower"}, "norm_coef"),
        ((torch.eye(3).expand(2, 3, 3),), {"norm_coef": torch.ones(3)}, "norm_coef"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_qp(*args, **kwargs)


def test_bad_dtype():
    with pytest.raises(TypeError):
        solve_qp(torch.eye(3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# the norm variant: min q'v + r sqrt(v' Gamma v) over the simplex (CAGrad's inner problem)


def norm_objective(G: np.ndarray, q: np.ndarray, r: float, v: np.ndarray) -> float:
    return float(q @ v + r * math.sqrt(max(v @ G @ v, 0.0)))


def test_norm_k2_closed_form_at_the_kink(device):
    """Opposite gradients: f(t) = q2 + (q1 - q2) t + r ||g|| |2t - 1|, optimum t = 1/2 when
    |q1 - q2| <= 2 r ||g|| (the non-smooth point), else a vertex. The old smoothed Newton stalled
    here (objective gap ~2.6)."""
    for q, r, t in [
        ([-0.6, 0.2], 1.0, 0.5),
        ([0.3, -0.1], 0.05, 0.0),
        ([5.0, 4.0], 0.4, 0.5),
        ([0.0, 0.0], 0.3, 0.5),
    ]:
        G = torch.tensor([[2.0, -2.0], [-2.0, 2.0]], dtype=torch.float64, device=device)
        v = solve_qp(
            G,
            torch.tensor(q, dtype=torch.float64, device=device),
            norm_coef=torch.tensor(r, dtype=torch.float64, device=device),
        )
        np.testing.assert_allclose(v.cpu().numpy(), [t, 1 - t], atol=1e-8)


@pytest.mark.parametrize("K", [3, 6, 17])
def test_norm_optimum_on_the_kink_exact(K):
    """A problem whose unique optimum v* has G^T v* = 0, built from the subgradient condition:
    q = const - r Gamma y / (2 sqrt(y'Gamma y)), so 0 lies strictly inside the subdifferential."""
    gen = torch.Generator().manual_seed(K)
    g = torch.randn(K - 1, K - 1, generator=gen, dtype=torch.float64)  # K - 1 independent gradients
    v_star = torch.rand(K, generator=gen, dtype=torch.float64) + 0.2
    v_star /= v_star.sum()
    g = torch.cat([g, -(v_star[:-1] @ g / v_star[-1])[None]])  # sum v*_i g_i = 0
    G = g @ g.T
    y = torch.randn(K, generator=gen, dtype=torch.float64)
    r = 0.7
    q = 0.3 - r * (G @ y) / (2 * torch.sqrt(y @ G @ y))
    v = solve_qp(G, q, norm_coef=torch.tensor(r, dtype=torch.float64))
    f = norm_objective(G.numpy(), q.numpy(), r, v.numpy())
    f_star = float(q @ v_star)
    # through Gamma, fp64 resolves ||G v|| only to ~sqrt(eps) ||G|| ||v||: the precision at a kink
    assert abs(f - f_star) <= 1e-7 * (1 + abs(f_star))
    np.testing.assert_allclose(v.numpy(), v_star.numpy(), atol=1e-6)


def _slsqp_best(G: np.ndarray, q: np.ndarray, r: float, starts: list[np.ndarray]) -> float:
    K = G.shape[0]
    fun = lambda x: norm_objective(G, q, r, x)  # noqa: E731
    best = math.inf
    for x0 in starts:
        res = scipy_optimize.minimize(
            fun,
            x0,
            method="SLSQP",
            bounds=[(0, 1)] * K,
            constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
            options={"ftol": 1e-15, "maxiter": 300},
        )
        best = min(best, fun(np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()))
    return best


@pytest.mark.parametrize("kind", ["random", "rankdef", "scaled"])
@pytest.mark.parametrize("K", [3, 8])
def test_norm_against_slsqp(K, kind):
    """Never worse than SLSQP from several starts (uniform, vertices, random), for CAGrad-like
    (q = Gamma 1/K, r = 0.4 ||g0||) and random (q, r) problems."""
    g = make_gradients(kind, K)
    G = (g @ g.T).numpy()
    rng = np.random.default_rng(K)
    starts = [np.ones(K) / K, np.eye(K)[0], rng.dirichlet(np.ones(K))]
    for q, r in [
        (G.mean(1), 0.4 * math.sqrt(max(G.mean(), 0))),
        (rng.standard_normal(K) * math.sqrt(np.diag(G).mean()), math.sqrt(np.diag(G).mean())),
    ]:
        v = solve_qp(
            torch.tensor(G), torch.tensor(q), norm_coef=torch.tensor(r, dtype=torch.float64)
        ).numpy()
        assert v.min() >= 0 and abs(v.sum() - 1) < 1e-12
        f = norm_objective(G, q, r, v)
        f_ref = _slsqp_best(G, q, r, starts)
        scale = np.abs(q).max() + r * math.sqrt(np.diag(G).max())
        assert f <= f_ref + 1e-8 * scale, (f, f_ref)


def test_norm_batched_and_nonfinite():
    K = 5
    G = torch.stack(
        [gram_of(make_gradients(k, K), torch.float64) for k in ("random", "opposite", "rankdef")]
    )
    q = G.mean(-1)
    r = torch.tensor([0.4, 0.4, 0.0], dtype=torch.float64)
    batched = solve_qp(G, q, norm_coef=r)
    single = torch.stack([solve_qp(G[b], q[b], norm_coef=r[b]) for b in range(3)])
    # problem 1 has its optimum on the kink, resolved to ~sqrt(eps): rounding differences show there
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-7)
    bad = r.clone()
    bad[1] = -1.0  # not convex: NaN, no exception
    out = solve_qp(G, q, norm_coef=bad)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    G2 = G.clone()
    G2[0, 0, 0] = float("nan")
    out = solve_qp(G2, q, norm_coef=r)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()


@pytest.mark.parametrize("constraint", ["simplex", "lower"])
def test_every_backend_meets_the_kkt_target(device, constraint):
    """The accelerated backends on this machine, through the dispatcher, on the hard matrices."""
    for name in ops.available_backends(device):
        interpreted = (
            name == "triton" and device.type == "cpu"
        )  # serial fp64 sweeps: minutes at K=64
        for K in (3, 17) if interpreted else (3, 17, 64):  # tests/test_triton.py covers K=64 there
            G = torch.stack([gram_of(make_gradients(k, K), torch.float32) for k in KINDS]).to(
                device
            )
            lo = (
                torch.stack([lower_for(K, s) for s in range(len(KINDS))]).float().to(device)
                if constraint == "lower"
                else None
            )
            v = ops.solve_qp(G, lower=lo, constraint=constraint, backend=name)
            res = kkt_residual(
                G.cpu(), v.cpu(), lower=None if lo is None else lo.cpu(), constraint=constraint
            )
            assert float(res.max()) <= KKT_TARGET, (name, K, res)
