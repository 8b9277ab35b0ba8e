"""One optimizer step equals a straightforward implementation of the paper's algorithm.

The references below follow F-MTL's Algorithm 1 (arXiv 2211.13723) and SAMO (arXiv 2507.07883,
docs/ARCHITECTURE.md §8) literally: ``torch.autograd.grad``, per-parameter loops, a plain SGD
update, BatchNorm statistics saved and restored by hand around the perturbed forwards. Everything
runs in float64 on a small model with BatchNorm and two heads; the only shared piece is the
weighting object itself (a fresh instance with the same seed), applied to a Gram matrix the test
computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlsam_fast
from mtlsam_fast import ops, weighting
from mtlsam_fast.ops import _registry

LR = 0.1
TOL = dict(rtol=1e-9, atol=1e-11)
WEIGHTINGS = ["ls", "mgda", "pcgrad", "cagrad", "imtl"]


def make_weighting(name: str):
    """A fresh weighting (fixed seed where the method is random)."""
    return weighting.get(name, seed=1234) if name == "pcgrad" else weighting.get(name)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 8), nn.ReLU()
        )
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 3)])

    def losses(self, x, y_reg, y_cls):
        f = self.trunk(x)
        return [
            nn.functional.mse_loss(self.heads[0](f).squeeze(1), y_reg),
            nn.functional.cross_entropy(self.heads[1](f), y_cls),
        ]


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Net().double()
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y_reg = torch.randn(20, generator=g, dtype=torch.float64)
    y_cls = torch.randint(0, 3, (20,), generator=g)
    return net, (x, y_reg, y_cls)


@pytest.fixture(autouse=True)
def _one_thread_torch_backend():
    """Tiny models: one intra-op thread is faster and immune to a loaded CI machine. The algorithm
    is checked on the torch (oracle) backend, whose noise is exactly ``ops.gaussian_noise``; the
    other backends are compared with it in ``test_every_backend_matches_the_torch_backend``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    mtlsam_fast.set_backend("torch")
    yield
    mtlsam_fast.set_backend(None)
    torch.set_num_threads(n)


def bn_buffers(net):
    return [b.clone() for b in net.buffers()]


def set_bn_buffers(net, saved):
    with torch.no_grad():
        for b, s in zip(net.buffers(), saved):
            b.copy_(s)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def gram_of(rows):
    G = torch.stack([flat(r) for r in rows])
    return G @ G.T


# ----------------------------------------------------------------------------------- F-MTL
def reference_fmtl(net, data, wfn, rho, rho_head, adaptive):
    shared = list(net.trunk.parameters())
    heads = [list(h.parameters()) for h in net.heads]
    K = 2
    losses = net.losses(*data)  # the clean forward: the only one that updates BN statistics
    g = [torch.autograd.grad(losses[i], shared, retain_graph=True) for i in range(K)]
    hg = [torch.autograd.grad(losses[i], heads[i], retain_graph=True) for i in range(K)]
    det = torch.stack([l.detach() for l in losses])
    w_loss = wfn(gram_of(g), det if wfn.needs_losses else None)
    bn = bn_buffers(net)

    def eps(grads, params, r):
        if adaptive:
            n = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(params, grads)))
            return [r * p * p * gi / n for p, gi in zip(params, grads)]
        n = torch.sqrt(sum((gi**2).sum() for gi in grads))
        return [r * gi / n for gi in grads]

    flat_g, head_sam = [], []
    for i in range(K):
        e_sh = eps(g[i], shared, rho)
        e_h = eps(hg[i], heads[i], rho_head)
        with torch.no_grad():
            for p, e in zip(shared + heads[i], e_sh + e_h):
                p.add_(e)
        li = net.losses(*data)[i]
        s = torch.autograd.grad(li, shared + heads[i])
        with torch.no_grad():
            for p, e in zip(shared + heads[i], e_sh + e_h):
                p.sub_(e)
        set_bn_buffers(net, bn)
        flat_g.append([si - gi for si, gi in zip(s[: len(shared)], g[i])])
        head_sam.append(s[len(shared) :])
    w_flat = wfn(gram_of(flat_g), det if wfn.needs_losses else None)
    with torch.no_grad():
        for j, p in enumerate(shared):
            d = sum(w_loss[i] * g[i][j] for i in range(K)) + sum(
                w_flat[i] * flat_g[i][j] for i in range(K)
            )
            p.sub_(LR * d)
        for i in range(K):
            for p, gi in zip(heads[i], head_sam[i]):
                p.sub_(LR * gi)
    return det


def _closure(net, data):
    return lambda: net.losses(*data)


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("name", WEIGHTINGS)
def test_fmtl_step_matches_algorithm_1(name, adaptive):
    net, data = make_problem()
    ref = copy.deepcopy(net)
    rho, rho_head = 0.3, 0.2
    torch.manual_seed(7)
    ref_losses = reference_fmtl(ref, data, make_weighting(name), rho, rho_head, adaptive)

    torch.manual_seed(7)
    opt = mtlsam_fast.FMTL(
        net.trunk.parameters(),
        [h.parameters() for h in net.heads],
        torch.optim.SGD,
        make_weighting(name),
        rho=rho,
        rho_head=rho_head,
        adaptive=adaptive,
        lr=LR,
    )
    losses = opt.step(_closure(net, data))
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"{n}: {m}")
    for b, c in zip(net.buffers(), ref.buffers()):  # BN statistics: the clean forward only
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    assert float(opt.found_inf) == 0.0


def test_fmtl_step_changes_with_rho():
    """Guard against a reference and an optimizer that both ignore the perturbation."""
    out = []
    for rho in (0.0, 0.5):
        net, data = make_problem()
        opt = mtlsam_fast.FMTL(
            net.trunk.parameters(),
            [h.parameters() for h in net.heads],
            torch.optim.SGD,
            "mgda",
            rho=rho,
            lr=LR,
        )
        opt.step(_closure(net, data))
        out.append(flat(net.trunk.parameters()).detach())
    assert (out[0] - out[1]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------- SAMO
def reference_samo(net, data, wfn, rho, rho_head, alpha, mu, layerwise, seed, step=0):
    shared = list(net.trunk.parameters())
    heads = [list(h.parameters()) for h in net.heads]
    K = 2
    P = sum(p.numel() for p in shared)
    losses = net.losses(*data)
    det = torch.stack([l.detach() for l in losses])
    mean = (losses[0] + losses[1]) / K
    g0 = torch.autograd.grad(mean, shared, retain_graph=True)
    hg = [torch.autograd.grad(mean, heads[i], retain_graph=True) for i in range(K)]
    bn = bn_buffers(net)
    G, head_sam = [], []
    for i in range(K):
        z_flat = ops.gaussian_noise(seed, (step * K + i) * P, P).double()
        z, o = [], 0
        for p in shared:
            z.append(z_flat[o : o + p.numel()].view_as(p))
            o += p.numel()
        with torch.no_grad():
            for p, zi in zip(shared, z):
                p.add_(mu * zi)
            lp = net.losses(*data)[i]
            for p, zi in zip(shared, z):
                p.sub_(2 * mu * zi)
            lm = net.losses(*data)[i]
            for p, zi in zip(shared, z):
                p.add_(mu * zi)
        set_bn_buffers(net, bn)
        c = (lp - lm) / (2 * mu)
        ghat = [c * zi for zi in z]
        if layerwise:
            ghat = [gd.norm() * hd / hd.norm() for gd, hd in zip(g0, ghat)]
        else:
            gn = torch.sqrt(sum((gd**2).sum() for gd in g0))
            hn = torch.sqrt(sum((hd**2).sum() for hd in ghat))
            ghat = [gn * hd / hn for hd in ghat]
        v = [alpha * gd + (1 - alpha) * hd for gd, hd in zip(g0, ghat)]
        vn = torch.sqrt(sum((vd**2).sum() for vd in v))
        e_sh = [rho * vd / vn for vd in v]
        hn = torch.sqrt(sum((h**2).sum() for h in hg[i]))
        e_h = [rho_head * h / hn for h in hg[i]]
        with torch.no_grad():
            for p, e in zip(shared + heads[i], e_sh + e_h):
                p.add_(e)
        li = net.losses(*data)[i]
        s = torch.autograd.grad(li, shared + heads[i])
        with torch.no_grad():
            for p, e in zip(shared + heads[i], e_sh + e_h):
                p.sub_(e)
        set_bn_buffers(net, bn)
        G.append(s[: len(shared)])
        head_sam.append(s[len(shared) :])
    w = wfn(gram_of(G), det if wfn.needs_losses else None)
    with torch.no_grad():
        for j, p in enumerate(shared):
            p.sub_(LR * sum(w[i] * G[i][j] for i in range(K)))
        for i in range(K):
            for p, gi in zip(heads[i], head_sam[i]):
                p.sub_(LR * gi)
    return det


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "global"])
@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("name", ["ls", "mgda", "imtl"])
def test_samo_step_matches_reference(name, alpha, layerwise):
    net, data = make_problem(1)
    ref = copy.deepcopy(net)
    kw = dict(rho=0.25, rho_head=0.1, alpha=alpha, zo_eps=1e-3, layerwise=layerwise, seed=42)
    torch.manual_seed(3)
    ref_losses = reference_samo(
        ref,
        data,
        make_weighting(name),
        kw["rho"],
        kw["rho_head"],
        alpha,
        kw["zo_eps"],
        layerwise,
        kw["seed"],
    )
    torch.manual_seed(3)
    opt = mtlsam_fast.SAMO(
        net.trunk.parameters(),
        [h.parameters() for h in net.heads],
        torch.optim.SGD,
        make_weighting(name),
        lr=LR,
        **kw,
    )
    assert opt.noise_offset(1) == sum(p.numel() for p in net.trunk.parameters())
    losses = opt.step(_closure(net, data))
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"{n}: {m}")
    for b, c in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_samo_second_step_uses_fresh_noise():
    """Step t uses the noise offsets (t*K + i)*P: a two-step run matches the reference twice."""
    net, data = make_problem(2)
    ref = copy.deepcopy(net)
    kw = dict(rho=0.25, rho_head=0.1, alpha=0.3, zo_eps=1e-3, layerwise=True, seed=5)
    opt = mtlsam_fast.SAMO(
        net.trunk.parameters(),
        [h.parameters() for h in net.heads],
        torch.optim.SGD,
        "ls",
        lr=LR,
        **kw,
    )
    for step in range(2):
        reference_samo(
            ref,
            data,
            weighting.get("ls"),
            kw["rho"],
            kw["rho_head"],
            kw["alpha"],
            kw["zo_eps"],
            True,
            kw["seed"],
            step=step,
        )
        opt.step(_closure(net, data))
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_samo_alpha_changes_the_step():
    out = []
    for alpha in (1.0, 0.0):
        net, data = make_problem(1)
        opt = mtlsam_fast.SAMO(
            net.trunk.parameters(),
            [h.parameters() for h in net.heads],
            torch.optim.SGD,
            "ls",
            rho=0.5,
            alpha=alpha,
            lr=LR,
        )
        opt.step(_closure(net, data))
        out.append(flat(net.trunk.parameters()).detach())
    assert (out[0] - out[1]).abs().max() > 1e-5


# ----------------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("name", WEIGHTINGS)
def test_mtl_optimizer_step_matches_reference(name):
    net, data = make_problem(3)
    ref = copy.deepcopy(net)
    torch.manual_seed(11)
    wfn = make_weighting(name)
    shared = list(ref.trunk.parameters())
    losses = ref.losses(*data)
    g = [torch.autograd.grad(losses[i], shared, retain_graph=True) for i in range(2)]
    hg = [
        torch.autograd.grad(losses[i], list(ref.heads[i].parameters()), retain_graph=True)
        for i in range(2)
    ]
    w = wfn(gram_of(g), None)
    with torch.no_grad():
        for j, p in enumerate(shared):
            p.sub_(LR * (w[0] * g[0][j] + w[1] * g[1][j]))
        for i in range(2):
            for p, gi in zip(ref.heads[i].parameters(), hg[i]):
                p.sub_(LR * gi)
    torch.manual_seed(11)
    opt = mtlsam_fast.MTLOptimizer(
        net.trunk.parameters(),
        [h.parameters() for h in net.heads],
        torch.optim.SGD,
        make_weighting(name),
        lr=LR,
    )
    opt.step(_closure(net, data))
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL)


# ----------------------------------------------------------------------------------- backends
def _step_with_backend(method: str, backend: str):
    mtlsam_fast.set_backend(backend)
    net, data = make_problem(4)
    heads = [h.parameters() for h in net.heads]
    if method == "samo":
        opt = mtlsam_fast.SAMO(
            net.trunk.parameters(), heads, torch.optim.SGD, "mgda", rho=0.25, alpha=0.4, lr=LR
        )
    else:
        opt = mtlsam_fast.FMTL(
            net.trunk.parameters(),
            heads,
            torch.optim.SGD,
            "mgda",
            rho=0.25,
            adaptive=method == "asam",
            lr=LR,
        )
    for _ in range(2):
        opt.step(_closure(net, data))
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("method", ["fmtl", "asam", "samo"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_backend_matches_the_torch_backend(method, backend):
    """The optimizer only uses the ops layer, so it runs unchanged on every backend (fp32 noise and
    fused reductions differ from the oracle in the last bits: compare with a float32-level
    tolerance). A backend missing here is skipped with its reason, never dropped unseen."""
    reason = _registry.unavailable_reason(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend!r} is not available: {reason}")
    ref = _step_with_backend(method, "torch")
    out = _step_with_backend(method, backend)
    for p, q in zip(out, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
