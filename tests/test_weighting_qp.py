"""CAGrad, UPGrad and DualProj against direct implementations on the explicit gradient vectors.

* CAGrad: the official code's algorithm (Liu et al. 2021, ``cagrad_exact``: scipy SLSQP on the
  dual, then ``d = g0 + c ||g0|| / ||g_w|| g_w``), run to high precision (no ``1e-8`` guards,
  ``ftol=1e-15``, several starts) on the K x P gradient matrix.
* UPGrad / DualProj: the projection onto the dual cone ``{x : G x >= 0}`` computed in parameter
  space with quadprog (``min 1/2 ||x - u^T G||^2  s.t.  G x >= 0``), not through the Gram matrix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlsam_fast import weighting
from mtlsam_fast.weighting import CAGrad, DualProj, UPGrad

quadprog = pytest.importorskip("quadprog")
scipy_optimize = pytest.importorskip("scipy.optimize")

QP_METHODS = ["cagrad", "upgrad", "dualproj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """K <= 64 problems are latency-bound: intra-op threads only add contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def grads(K: int, P: int = 12, seed: int = 0, conflict: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(K, P, generator=gen, dtype=torch.float64)
    g = g * (0.5 + torch.rand(K, 1, generator=gen, dtype=torch.float64))  # unequal norms
    if conflict and K > 1:
        g[1] = -0.8 * g[0] + 0.3 * g[1]
    return g


def direction(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return w.to(torch.float64).cpu() @ g.to(torch.float64).cpu()


# ---------------------------------------------------------------------------------------------
# direct references


def cagrad_official(g: np.ndarray, c: float, rescale: int) -> np.ndarray:
    """``cagrad_exact`` of the official code on explicit gradients (rows), made high-precision."""
    K = g.shape[0]
    GG = g @ g.T
    g0_norm = math.sqrt(max(GG.mean(), 0.0))
    x_start = np.ones(K) / K
    A, b = GG, x_start.copy()
    cc = c * g0_norm

    def objfn(x):
        return float(x @ A @ b + cc * math.sqrt(max(x @ A @ x, 0.0)))

    best = None
    rng = np.random.default_rng(0)
    for x0 in [x_start, np.eye(K)[0], rng.dirichlet(np.ones(K))]:
        res = scipy_optimize.minimize(
            objfn,
            x0,
            bounds=[(0, 1)] * K,
            method="SLSQP",
            constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
            options={"ftol": 1e-15, "maxiter": 500},
        )
        if best is None or res.fun < best.fun:
            best = res
    ww = best.x
    gw = ww @ g
    gw_norm = np.linalg.norm(gw)
    lmbda = cc / gw_norm if gw_norm > 0 else 0.0
    d = g.mean(0) + lmbda * gw
    if rescale == 1:
        d = d / (1 + c**2)
    elif rescale == 2:
        d = d / (1 + c)
    return d


def dual_cone_projection(g: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin_x 1/2 ||x - y||^2  s.t.  g x >= 0`` in parameter space (quadprog)."""
    P = g.shape[1]
    return quadprog.solve_qp(np.eye(P), y, g.T.copy(), np.zeros(g.shape[0]), 0)[0]


def upgrad_direct(g: np.ndarray, pref: np.ndarray | None = None) -> np.ndarray:
    K = g.shape[0]
    pref = np.ones(K) / K if pref is None else pref
    return sum(dual_cone_projection(g, pref[i] * g[i]) for i in range(K))


def dualproj_direct(g: np.ndarray, pref: np.ndarray | None = None) -> np.ndarray:
    K = g.shape[0]
    pref = np.ones(K) / K if pref is None else pref
    return dual_cone_projection(g, pref @ g)


# ---------------------------------------------------------------------------------------------
# against the references


@pytest.mark.parametrize("rescale", [0, 1, 2])
@pytest.mark.parametrize("c", [0.1, 0.4, 0.9])
@pytest.mark.parametrize("K", [2, 3, 7])
def test_cagrad_matches_official_algorithm(device, K, c, rescale):
    g = grads(K, seed=K)
    gram = (g @ g.T).to(device)
    w = CAGrad(c=c, rescale=rescale)(gram)
    d = direction(w, g)
    d_ref = cagrad_official(g.numpy(), c, rescale)
    scale = float(g.mean(0).norm()) * (1 + c)
    np.testing.assert_allclose(d.numpy(), d_ref, atol=2e-6 * scale, rtol=0)


def test_cagrad_inner_objective_never_worse_than_slsqp(device):
    for seed in range(4):
        g = grads(5, seed=seed)
        GG = (g @ g.T).numpy()
        b = GG.mean(1)
        coef = 0.4 * math.sqrt(GG.mean())
        fun = lambda x: float(x @ b + coef * math.sqrt(max(x @ GG @ x, 0.0)))  # noqa: E731
        from mtlsam_fast import ops

        v = (
            ops.solve_qp(
                torch.tensor(GG, device=device),
                torch.tensor(b, device=device),
                norm_coef=torch.tensor(coef, dtype=torch.float64, device=device),
            )
            .cpu()
            .numpy()
        )
        res = scipy_optimize.minimize(
            fun,
            np.ones(5) / 5,
            bounds=[(0, 1)] * 5,
            method="SLSQP",
            constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
            options={"ftol": 1e-15, "maxiter": 500},
        )
        assert fun(v) <= res.fun + 1e-10 * (abs(res.fun) + 1)


@pytest.mark.parametrize("K", [2, 3, 6, 10])
@pytest.mark.parametrize("seed", range(3))
def test_upgrad_matches_direct_projections(device, K, seed):
    g = grads(K, seed=seed)
    w = UPGrad()((g @ g.T).to(device))
    np.testing.assert_allclose(direction(w, g).numpy(), upgrad_direct(g.numpy()), atol=1e-7, rtol=0)


@pytest.mark.parametrize("K", [2, 3, 6, 10])
@pytest.mark.parametrize("seed", range(3))
def test_dualproj_matches_direct_projection(device, K, seed):
    g = grads(K, seed=seed)
    w = DualProj()((g @ g.T).to(device))
    np.testing.assert_allclose(
        direction(w, g).numpy(), dualproj_direct(g.numpy()), atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("cls, direct", [(UPGrad, upgrad_direct), (DualProj, dualproj_direct)])
def test_pref_vector(device, cls, direct):
    g = grads(4, seed=7)
    pref = torch.tensor([0.1, 0.5, 0.2, 0.7], dtype=torch.float64)
    w = cls(pref_vector=pref)((g @ g.T).to(device))
    np.testing.assert_allclose(
        direction(w, g).numpy(), direct(g.numpy(), pref.numpy()), atol=1e-7, rtol=0
    )


def test_fp32_gram_is_close_to_the_reference(device):
    g = grads(8, P=30, seed=3)
    gram = (g.float() @ g.float().T).to(device)
    for w, ref in (
        (UPGrad(), upgrad_direct(g.numpy())),
        (DualProj(), dualproj_direct(g.numpy())),
        (CAGrad(), cagrad_official(g.numpy(), 0.4, 1)),
    ):
        out = w(gram)
        assert out.dtype == torch.float32
        d = direction(out, g).numpy()
        assert np.linalg.norm(d - ref) <= 1e-4 * np.linalg.norm(ref)


# ---------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)]
)  # solver tol: 1e-9
def test_non_conflict(device, name, dtype, tol):
    for seed in range(6):
        g = grads(6, seed=seed)
        g[2] = -g[3] * 0.5 + 0.01 * g[2]  # a second strong conflict
        gram = (g @ g.T).to(dtype).to(device)
        d = direction(weighting.get(name)(gram), g)
        assert (g @ d >= -tol * float(gram.diagonal().max())).all(), g @ d


@pytest.mark.parametrize("name", QP_METHODS)
def test_permutation_equivariance(device, name):
    g = grads(6, seed=11)
    gram = (g @ g.T).to(device)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    w = weighting.get(name)(gram)
    wp = weighting.get(name)(gram[perm][:, perm])
    torch.testing.assert_close(wp, w[perm.to(device)], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", QP_METHODS)
@pytest.mark.parametrize("s", [1e-4, 1e3])
def test_scale_equivariance(device, name, s):
    """Scaling every gradient by s scales d by s: the weights are unchanged."""
    g = grads(5, seed=5)
    gram = (g @ g.T).to(device)
    w = weighting.get(name)(gram)
    ws = weighting.get(name)(gram * s * s)
    torch.testing.assert_close(ws, w, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(direction(ws, g * s), direction(w, g) * s, rtol=1e-6, atol=1e-9 * s)


@pytest.mark.parametrize("name", QP_METHODS)
def test_edge_cases_finite(device, name):
    w = weighting.get(name)
    one = torch.tensor([[2.5]], device=device)
    torch.testing.assert_close(w(one), torch.ones(1, device=device))
    for gram in (
        torch.zeros(4, 4, device=device),
        torch.full((4, 4), 3.0, device=device),
        torch.tensor([[1.0, -1.0], [-1.0, 1.0]], device=device),
    ):
        out = w(gram)
        assert torch.isfinite(out).all(), (name, gram, out)


def test_edge_case_directions(device):
    g = torch.randn(1, 9, dtype=torch.float64).expand(3, 9)  # identical gradients
    gram = (g @ g.T).to(device)
    # UPGrad / DualProj: nothing conflicts, the projection is the identity: d = g
    for w in (UPGrad(), DualProj()):
        torch.testing.assert_close(direction(w(gram), g), g[0], rtol=1e-7, atol=1e-9)
    # CAGrad: d = (1 + c) g / (1 + c^2) (rescale=1), the official formula
    torch.testing.assert_close(
        direction(CAGrad()(gram), g), g[0] * 1.4 / 1.16, rtol=1e-6, atol=1e-9
    )
    # opposite gradients: g0 = 0 and g_w = 0 at the optimum: d = 0, weights finite
    g2 = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    for name in QP_METHODS:
        out = weighting.get(name)((g2 @ g2.T).to(device))
        assert torch.isfinite(out).all()
        assert float(direction(out, g2).norm()) < 1e-8


@pytest.mark.parametrize("name", QP_METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gives_nan(device, name, bad):
    gram = torch.eye(3, device=device)
    gram[0, 1] = gram[1, 0] = bad
    out = weighting.get(name)(gram)
    assert out.shape == (3,) and torch.isnan(out).all()


@pytest.mark.parametrize("name", QP_METHODS)
def test_compile_fullgraph_matches_eager(name):
    """Sync-freedom: the whole weighting traces as one graph (short budget: tracing unrolls it)."""
    g = grads(4, seed=1).float()
    gram = g @ g.T
    w = weighting.get(
        name, max_iter=6, backend="torch"
    )  # the compiled C++ backend is opaque to dynamo
    eager = w(gram)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda x: w(x), fullgraph=True, backend="eager")(gram)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_bad_options():
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(c=-0.1)
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)
    with pytest.raises(ValueError, match="pref_vector"):
        UPGrad(pref_vector=torch.ones(2, 2))
    with pytest.raises(ValueError, match="pref_vector has 2 entries"):
        UPGrad(pref_vector=torch.ones(2))(torch.eye(3))
    with pytest.raises(ValueError, match="pref_vector has 4 entries"):
        DualProj(pref_vector=torch.ones(4))(torch.eye(3))
    with pytest.raises(ValueError, match="square"):
        UPGrad()(torch.ones(3, 2))


def test_registry_and_repr():
    assert isinstance(weighting.get("cagrad", c=0.5), CAGrad)
    assert isinstance(weighting.get("upgrad"), UPGrad)
    assert isinstance(weighting.get("dualproj"), DualProj)
    assert "c=0.5" in repr(weighting.get("cagrad", c=0.5))
    # c = 0: linear scalarization (weights 1/K, rescale divides by 1)
    g = grads(4)
    torch.testing.assert_close(CAGrad(c=0.0)(g @ g.T), torch.full((4,), 0.25, dtype=torch.float64))
