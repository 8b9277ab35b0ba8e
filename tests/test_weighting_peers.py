"""The methods of issue 20 against the peers' own code: torchjd 0.18 and LibMTL 1.1.5.

Same inputs, same settings, compared in float64. Tolerances (relative to the largest entry):
``EXACT`` (1e-12) where both sides compute the same closed form or the same iteration (the
difference is rounding); ``QP`` (1e-8) where both solve a QP exactly by different algorithms
(torchjd's active set on the host against the shared interior point, stopped at a relative KKT
residual of 1e-9). Where a peer regularizes (PBI's 1e-12 under a square root) or has no code (MoCo
is not in LibMTL 1.1.5), the reference is the paper's algorithm on explicit vectors, and the
difference to the peer is stated.

Loss-based methods are scalarizers in torchjd: their weights are the gradient of the scalarized
loss with respect to the losses (autograd through the peer's module), and their learnt parameters
take a ``torch.optim.Adam`` step, as a torchjd user would do.

LibMTL imports ``torchvision.models.utils``, which torchvision removed; its only function there is
``torch.hub.load_state_dict_from_url``, provided by the ``libmtl`` fixture as a stub module.
"""

from __future__ import annotations

import math
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch
import torchjd.aggregation as tj
import torchjd.scalarization as tjs

from mtlsam_fast import ops, weighting

F64 = torch.float64
EXACT = 1e-12
QP = 1e-8


@pytest.fixture(autouse=True)
def _float64_and_one_thread():
    """The peers create their tensors in the default dtype: make it float64 for exact checks."""
    dtype, n = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(F64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def libmtl():
    if "torchvision.models.utils" not in sys.modules:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
        sys.modules["torchvision.models.utils"] = shim
    import LibMTL.weighting

    return LibMTL.weighting


def close(out, ref, tol):
    out, ref = torch.as_tensor(out, dtype=F64), torch.as_tensor(ref, dtype=F64)
    err = ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-300)).item()
    assert err <= tol, f"relative difference {err:.3g} > {tol:g}"


def grads(K: int, P: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(K, P, generator=gen, dtype=F64)
    return G * torch.exp(0.5 * torch.randn(K, 1, generator=gen, dtype=F64))


def losses(K: int, seed: int) -> torch.Tensor:
    return torch.rand(K, generator=torch.Generator().manual_seed(100 + seed), dtype=F64) + 0.2


def scalarizer_weights(scalarizer, L: torch.Tensor) -> torch.Tensor:
    """The peer's gradient weights: d scalarizer(L) / dL."""
    L = L.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(scalarizer(L), L)
    return g


KS = [1, 2, 5, 8]


# ---------------------------------------------------------------- Gram / matrix methods (torchjd)
@pytest.mark.parametrize("K", KS)
def test_config(K):
    for seed in range(3):
        G = grads(K, seed=seed)
        if K > 2 and seed == 2:
            G[1] = 0  # a zero gradient: no unit vector
        close(weighting.get("config")(G @ G.T) @ G, tj.ConFIG()(G), EXACT)
        pref = torch.rand(K, dtype=F64) + 0.1
        ours = weighting.get("config", pref_vector=pref)(G @ G.T) @ G
        close(ours, tj.ConFIG(pref_vector=pref)(G), EXACT)


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("warmup", [0, 2])
def test_excessmtl(K, warmup):
    ours = weighting.get("excessmtl", robust_step_size=0.5, n_warmup_steps=warmup)
    peer = tj.ExcessMTLWeighting(robust_step_size=0.5, n_warmup_steps=warmup)
    for step in range(5):
        G = grads(K, seed=step) * (1 + step)
        close(ours(G @ G.T, grads=G), peer(G), EXACT)


@pytest.mark.parametrize("K", KS)
def test_sdmgrad(K):
    pref = torch.rand(K, dtype=F64) + 0.1
    pref = pref / pref.sum()
    for opts in ({}, {"lambda_": 0.6, "lr": 5.0, "momentum": 0.3, "n_iter": 7}):
        ours = weighting.get("sdmgrad", **opts, pref_vector=pref)
        peer = tj.SDMGradWeighting(**opts, pref_vector=pref)
        for step in range(3):
            G = grads(K, seed=step)
            close(ours(G @ G.T), peer(G @ G.T), EXACT)


@pytest.mark.parametrize("K", KS)
def test_modo_with_the_double_sampling_matrix(K):
    ours, peer = weighting.get("modo", gamma=0.3, rho=0.05), tj.MoDoWeighting(gamma=0.3, rho=0.05)
    for step in range(4):
        J1, J2 = grads(K, seed=step), grads(K, seed=50 + step)
        A = J1 @ J2.T  # not symmetric: used as given
        close(ours(A), peer(A), EXACT)


@pytest.mark.parametrize("K", KS)
def test_pcd(K):
    """Directions (the multipliers are unique only for independent secondary gradients)."""
    cases: list[dict] = [{}, {"tau": 0.3, "beta": 0.9}]
    if K > 1:  # one tau per secondary task
        cases.append({"tau": torch.linspace(0.0, 0.5, K - 1, dtype=F64), "beta": 0.5, "eps": 0.0})
    for opts in cases:
        ours, peer = weighting.get("pcd", **opts), tj.PCDWeighting(**opts)
        for step in range(3):
            G = grads(K, seed=step)
            close(ours(G @ G.T) @ G, peer(G @ G.T) @ G, QP)


def test_pcd_special_cases():
    G = grads(4)
    G[3] = -G[2]  # infeasible: opposite secondary gradients, the constraints are dropped
    for w in (weighting.get("pcd", tau=0.2), tj.PCDWeighting(tau=0.2)):
        torch.testing.assert_close(w(G @ G.T) @ G, G[0], rtol=1e-12, atol=1e-12)
    G = grads(4)
    G[0] = 0  # a zero primary gradient: no update
    assert (weighting.get("pcd")(G @ G.T) == 0).all()
    G = grads(12, P=5)  # dependent secondary gradients (K - 1 > P)
    close(weighting.get("pcd", tau=0.1)(G @ G.T) @ G, tj.PCDWeighting(tau=0.1)(G @ G.T) @ G, QP)


@pytest.mark.parametrize("K", KS)
def test_crmogm(K):
    init = torch.full((K,), 1.0 / K, dtype=F64)
    for opts in ({}, {"alpha": 0.5, "initial_weights": init}):
        ours = weighting.get("crmogm", weighting="imtl", **opts)
        peer = tj.CRMOGMWeighting(tj.IMTLGWeighting(), **opts)
        for step in range(4):
            G = grads(K, seed=step)
            close(ours(G @ G.T), peer(G @ G.T), EXACT)


@pytest.mark.parametrize("K", KS)
def test_graddrop_with_the_same_uniforms(K):
    """torchjd draws ``U`` with ``torch.rand``: it gets ours (``Phi(z)`` of our noise stream)."""
    P = 400
    leak = torch.linspace(0.0, 0.5, K, dtype=F64)
    for opts in ({}, {"leak": leak}, {"leak": leak, "f": torch.sqrt}):
        w = weighting.get("graddrop", seed=5, **opts)
        for draw in range(2):
            G = grads(K, P=P, seed=draw)
            G[:, :50] = G[:, :50].abs()  # coordinates of pure sign
            z = ops.gaussian_noise(5, draw * P, P).to(F64)
            u = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
            with mock.patch("torch.rand", lambda *a, **k: u):
                ref = tj.GradDrop(**opts)(G)
            close(w(G @ G.T, grads=G), ref, EXACT)


def test_krum():
    for K, f, m in [(3, 0, 1), (6, 1, 1), (8, 2, 3), (8, 0, 8)]:
        for seed in range(3):
            G = grads(K, seed=seed)
            G[0] = G[0] * 20  # an outlier
            gram = G @ G.T
            ours = weighting.get("krum", n_byzantine=f, n_selected=m, distance="euclidean")
            close(ours(gram), tj.KrumWeighting(n_byzantine=f, n_selected=m)(gram), EXACT)
            # the paper's squared distances, on the explicit vectors
            d2 = ((G[:, None, :] - G[None, :, :]) ** 2).sum(-1)
            scores = [sorted(d2[i, j].item() for j in range(K) if j != i) for i in range(K)]
            scores = [sum(s[: K - f - 2]) for s in scores]
            ref = torch.zeros(K, dtype=F64)
            ref[sorted(range(K), key=lambda i: (scores[i], i))[:m]] = 1.0 / m
            close(weighting.get("krum", n_byzantine=f, n_selected=m)(gram), ref, EXACT)


@pytest.mark.parametrize("trim", [0, 1, 3])
def test_trimmed_mean(trim):
    G = grads(8, P=50)
    out = weighting.get("trimmedmean", trim_number=trim)(G @ G.T, grads=G)
    close(out, tj.TrimmedMean(trim)(G), EXACT)


# ---------------------------------------------------------------- loss-based methods
def _scalarization_cases(K: int):
    """(our options, the torchjd scalarizer, tolerance) per method, with a preference and an
    ideal point where the method takes them."""
    pref = torch.rand(K, generator=torch.Generator().manual_seed(K), dtype=F64) + 0.1
    ref_point = torch.rand(K, generator=torch.Generator().manual_seed(K + 1), dtype=F64) * 0.1
    return {
        "gls": [({}, tjs.GeometricMean(), EXACT)],
        "stch": [
            ({"mu": 0.3}, tjs.STCH(0.3), EXACT),
            ({"mu": 0.05, "pref_vector": pref, "reference": ref_point},
             tjs.STCH(0.05, pref, ref_point), EXACT),
        ],
        "cosmos": [({"lambda_": 2.0, "pref_vector": pref}, tjs.COSMOS(2.0, pref), EXACT)],
        # torchjd adds 1e-12 under the square root of ||p||^2 (||p|| ~ 0.1 here): 1e-10 relative
        "pbi": [({"theta": 5.0, "pref_vector": pref, "reference": ref_point},
                 tjs.PBI(5.0, pref, ref_point), 1e-9)],
    }  # fmt: skip


# one loss has no perpendicular part: torchjd's epsilon would be all of PBI's d2
@pytest.mark.parametrize(
    "name,K",
    [(n, K) for n in ("gls", "stch", "cosmos", "pbi") for K in KS if (n, K) != ("pbi", 1)],
)
def test_fixed_scalarizations(name, K):
    G = grads(K)
    for opts, peer, tol in _scalarization_cases(K)[name]:
        for seed in range(3):
            L = losses(K, seed)
            close(weighting.get(name, **opts)(G @ G.T, L), scalarizer_weights(peer, L), tol)


@pytest.mark.parametrize("name,peer_cls", [("uw", "UW"), ("imtl_l", "IMTLL")])
def test_learnt_log_scales_with_adam(name, peer_cls):
    K, lr = 4, 0.05
    ours = weighting.get(name, lr=lr)
    peer = getattr(tjs, peer_cls)(K)
    opt = torch.optim.Adam(peer.parameters(), lr=lr)
    G = grads(K)
    for step in range(8):
        L = losses(K, step)
        Lr = L.clone().requires_grad_(True)
        opt.zero_grad()
        peer(Lr).backward()
        close(ours(G @ G.T, L), Lr.grad, EXACT)
        opt.step()


def test_famo_sequence():
    """torchjd: forward(L_t), then update(L_t+1); ours takes the update at the next call."""
    K = 4
    ours, peer = weighting.get("famo"), tjs.FAMO(K)
    G = grads(K)
    seq = [losses(K, s) for s in range(8)]
    for t, L in enumerate(seq):
        close(ours(G @ G.T, L), scalarizer_weights(peer, L), EXACT)
        if t + 1 < len(seq):
            peer.update(seq[t + 1])
    b = torch.full((K,), 0.1, dtype=F64)
    ours, peer = (
        weighting.get("famo", lr=0.1, weight_decay=0.0, min_losses=b),
        tjs.FAMO(K, min_losses=b, lr=0.1, weight_decay=0.0),
    )
    for t, L in enumerate(seq):
        close(ours(G @ G.T, L), scalarizer_weights(peer, L), EXACT)
        if t + 1 < len(seq):
            peer.update(seq[t + 1])


def test_dwa_over_epochs():
    K = 3
    ours, peer = weighting.get("dwa", temperature=1.5), tjs.DWA(temperature=1.5)
    G = grads(K)
    for epoch in range(5):
        for batch in range(3):
            L = losses(K, 10 * epoch + batch) * (0.7**epoch)
            close(ours(G @ G.T, L), scalarizer_weights(peer, L), EXACT)
        ours.end_epoch()
        peer.step()


# ---------------------------------------------------------------- LibMTL
def test_libmtl_uw_dwa_gls(libmtl):
    K = 3
    G = grads(K)
    uw = libmtl.UW()
    uw.task_num, uw.device = K, "cpu"
    uw.init_param()
    ours = weighting.get("uw", init=-0.5)
    L = losses(K, 0).requires_grad_(True)
    close(ours(G @ G.T, L.detach()), uw.backward(L), EXACT)  # LibMTL returns 1 / (2 exp(s))

    dwa = libmtl.DWA()
    dwa.task_num, dwa.device = K, "cpu"
    history = np.stack([losses(K, e).numpy() * 0.8**e for e in range(3)], axis=1)
    dwa.train_loss_buffer, dwa.epoch = history, 2
    ours = weighting.get("dwa", temperature=2.0)
    for e in range(2):  # two finished epochs with those averages
        ours(G @ G.T, torch.from_numpy(history[:, e]))
        ours.end_epoch()
    L = losses(K, 7).requires_grad_(True)
    close(ours(G @ G.T, L.detach()), dwa.backward(L, T=2.0), EXACT)

    gls = libmtl.GLS()
    gls.task_num, gls.device = K, "cpu"
    L = losses(K, 8).requires_grad_(True)
    gls.backward(L)  # trains on prod(L)^(1/K); its returned batch_weight is not the gradient
    close(weighting.get("gls")(G @ G.T, L.detach()), L.grad, EXACT)


def test_libmtl_gradnorm_balance_gradient(libmtl):
    """LibMTL's L_grad through w = K softmax(theta): theta.grad = J^T balance_gradient."""
    from mtlsam_fast.weighting.gradnorm import balance_gradient

    K, alpha = 4, 1.5
    G = grads(K, P=30)
    L0 = losses(K, 0) + 1.0
    gn = libmtl.GradNorm()
    gn.task_num, gn.device, gn.rep_grad, gn.epoch = K, "cpu", False, 1
    gn.train_loss_buffer = L0.numpy()[:, None]
    gn.init_param()
    with torch.no_grad():
        gn.loss_scale.copy_(torch.randn(K, dtype=F64))
    gn._get_grads = lambda losses, mode: G  # the gradients LibMTL would collect
    gn._backward_new_grads = lambda *a, **k: None
    L = losses(K, 1)
    weights = torch.as_tensor(gn.backward(L, alpha=alpha))
    z = torch.softmax(gn.loss_scale.detach(), 0)
    close(weights, K * z, EXACT)
    rate = L / L0
    g_w = balance_gradient(K * z, G.norm(dim=1), rate / rate.mean(), alpha)
    close(K * z * (g_w - (z * g_w).sum()), gn.loss_scale.grad, EXACT)


def test_gradnorm_update_follows_the_paper():
    """Algorithm 1 with Adam on w (torch.optim.Adam), clipped at 0 and renormalized to sum K."""
    from mtlsam_fast.weighting.gradnorm import balance_gradient

    K, alpha, lr = 3, 1.2, 0.3
    w_ref = torch.ones(K, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([w_ref], lr=lr)
    ours = weighting.get("gradnorm", alpha=alpha, lr=lr)
    L0 = None
    for step in range(6):
        G = grads(K, seed=step) * torch.tensor([[1.0], [3.0], [0.3]], dtype=F64)
        L = losses(K, step) * 0.9**step
        L0 = L if L0 is None else L0
        close(ours(G @ G.T, L), w_ref.detach(), EXACT)
        rate = L / L0
        w_ref.grad = balance_gradient(w_ref.detach(), G.norm(dim=1), rate / rate.mean(), alpha)
        opt.step()
        with torch.no_grad():
            w_ref.copy_(K * w_ref.clamp(min=0) / w_ref.clamp(min=0).sum())


# ---------------------------------------------------------------- MoCo (no peer installed)
def moco_reference(steps, beta, beta_sigma, gamma, gamma_sigma, rho, normalize, L=None):
    """Algorithm 1 of the paper on explicit vectors (no ball projection of y, as LibMTL)."""
    K, P = steps[0].shape
    y = torch.zeros(K, P, dtype=F64)
    lam = torch.full((K,), 1.0 / K, dtype=F64)
    out = []
    for t, G in enumerate(steps, start=1):
        h = G / (G.norm(dim=1, keepdim=True) + 1e-8) * L[t - 1][:, None] if normalize else G
        y = y - beta / t**beta_sigma * (y - h)
        v = lam - gamma / t**gamma_sigma * (y @ y.T + rho * torch.eye(K, dtype=F64)) @ lam
        # Euclidean projection onto the simplex by bisection on the threshold
        lo, hi = v.min().item() - 1, v.max().item()
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (v - mid).clamp(min=0).sum() > 1 else (lo, mid)
        lam = (v - (lo + hi) / 2).clamp(min=0)
        out.append(y.T @ lam)
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_moco_matches_the_paper(normalize):
    K = 4
    steps = [grads(K, P=20, seed=s) for s in range(5)]
    L = [losses(K, s) for s in range(5)]
    opts = dict(beta=0.6, beta_sigma=0.4, gamma=0.5, gamma_sigma=0.3, rho=0.1)
    ref = moco_reference(steps, **opts, normalize=normalize, L=L)
    w = weighting.get("moco", **opts, normalize=normalize)
    for G, Lt, d in zip(steps, L, ref):
        close(w(G @ G.T, Lt if normalize else None, grads=G), d, 1e-10)
