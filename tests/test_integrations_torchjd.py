"""The torchjd adapter (mtlsam_fast.integrations.torchjd) against torchjd 0.18 itself.

Tolerances, per method (float64 inputs):

* exact in both (closed forms, or exact solvers on the same problem): IMTLG, AlignedMTL, Mean,
  Sum, UPGrad / DualProj given torchjd's QuadprogProjector (quadprog is an exact active-set
  solver; ours reproduces its normalization and regularization): 1e-8;
* torchjd's solver stops at a tolerance: FairGrad (scipy least_squares, ftol/xtol 1e-8): 1e-5
  relative; NashMTL (its sequential convex steps stop when an iterate moves less than 1e-6):
  1e-5 relative; CAGrad (cvxpy's interior-point CLARABEL stays ~1e-8 inside the simplex where
  the optimum lies on a face, and the flat objective there turns that into ~2e-5 on the
  weights): 1e-4 relative, and our dual objective is never above torchjd's;
* torchjd approximates: MGDA (Frank-Wolfe stopped at a step below 1e-3; the direction differs by
  up to 17 % on these matrices) and UPGrad / DualProj with torchjd's default regularization
  (reg_eps = 1e-4): ours is checked against an exact reference (its KKT conditions, quadprog
  without regularization) and never worse than torchjd's objective;
* random methods (PCGrad, GradVac): torchjd's task orders come from ``torch.randperm``; the tests
  replay our seeded orders into torchjd's own code (``torch.randperm`` patched), then the two
  are the same algorithm on the same orders: 1e-12 for PCGrad, 1e-7 for GradVac (torchjd adds
  eps = 1e-8 to its cosines' denominators, ours divides exactly).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torchjd
import torchjd.aggregation as tja
from torchjd.autogram import Engine
from torchjd.autojac import jac_to_grad as torchjd_jac_to_grad
from torchjd.autojac import mtl_backward
from torchjd.linalg import QuadprogProjector

from mtlsam_fast import ops, weighting
from mtlsam_fast.integrations import torchjd as ours
from mtlsam_fast.weighting.rlw import PhiloxStream

F64 = torch.float64

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are solving a parameterized problem that is not DPP",
    "ignore:Solution may be inaccurate",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread (two threads on a busy 2-core machine spin-wait, up to
    60x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jacobian(K: int, P: int, seed: int, scales: tuple[float, float] | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(K, P, dtype=F64, generator=g)
    if scales is not None:  # rows of very different norms (torchjd's "scaled" matrices)
        lo, hi = scales
        J = J * torch.logspace(lo, hi, K, dtype=F64)[torch.randperm(K, generator=g)][:, None]
    return J


TYPICAL = [(2, 5, 0), (3, 10, 1), (5, 40, 2), (8, 30, 3)]
SCALED = [(3, 10, 4, (-4.0, 3.0)), (6, 20, 5, (-3.0, 4.0)), (9, 40, 6, (-5.0, 2.0))]


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=rel * max(b.abs().max().item(), 1e-300))


# --------------------------------------------------------------------------- the table
def test_every_method_both_libraries_have_is_one_row() -> None:
    rows = ours.METHODS
    # all our weightings but DB-MTL (torchjd has none)
    assert {r.ours for r in rows.values()} == set(weighting.names()) - {"dbmtl"}
    for name, row in rows.items():
        aggregator = getattr(ours, name)
        assert issubclass(aggregator, tja.Aggregator)
        assert issubclass(getattr(ours, f"{name}Weighting"), tja.Weighting)
        assert hasattr(tja, name), name
        if row.uses_gram:
            assert issubclass(aggregator, tja.GramianWeightedAggregator)
        assert issubclass(aggregator, torchjd.Stateful) == issubclass(
            getattr(tja, name), torchjd.Stateful
        )
        assert row.stateful == issubclass(getattr(tja, name), torchjd.Stateful)
        for suffix in ("", "Weighting"):
            peer = getattr(tja, name + suffix, None)
            if peer is None:  # NashMTL: torchjd has no public Gramian weighting
                continue
            theirs = inspect.signature(peer).parameters
            mine = inspect.signature(getattr(ours, name + suffix)).parameters
            for arg, p in theirs.items():  # every torchjd option, same kind and default
                assert arg in mine, (name + suffix, arg)
                assert (mine[arg].kind, mine[arg].default) == (p.kind, p.default), (name, arg)
            extra = [p for a, p in mine.items() if a not in theirs]
            assert all(p.kind is p.KEYWORD_ONLY for p in extra), (name, extra)


# --------------------------------------------------------------------------- same numbers
EQUAL = [
    ("IMTLG", {}, 1e-8),
    ("AlignedMTL", {}, 1e-8),
    ("AlignedMTL", {"scale_mode": "median"}, 1e-8),
    ("AlignedMTL", {"scale_mode": "rmse"}, 1e-8),
    ("Mean", {}, 1e-12),
    ("Sum", {}, 1e-12),
    ("UPGrad", {"projector": "default"}, 1e-8),
    ("DualProj", {"projector": "default"}, 1e-8),
    ("UPGrad", {"projector": (1e-3, 1e-2)}, 1e-8),
    ("FairGrad", {"alpha": 0.5}, 1e-5),
    ("FairGrad", {"alpha": 2.0}, 1e-5),
    ("FairGrad", {"alpha": 0.0}, 1e-12),
]


def _options(kwargs: dict) -> dict:
    """torchjd's projector instances (QuadprogProjector needs quadprog: built in the test)."""
    proj = kwargs.get("projector")
    if proj == "default":
        return {**kwargs, "projector": QuadprogProjector()}
    if isinstance(proj, tuple):
        return {**kwargs, "projector": QuadprogProjector(norm_eps=proj[0], reg_eps=proj[1])}
    return kwargs


@pytest.mark.parametrize(("name", "kwargs", "rel"), EQUAL, ids=lambda v: str(v))
def test_aggregator_and_weighting_equal_torchjd(name: str, kwargs: dict, rel: float) -> None:
    for K, P, seed in TYPICAL:
        J = jacobian(K, P, seed)
        theirs = getattr(tja, name)(**_options(kwargs))
        mine = getattr(ours, name)(**_options(kwargs))
        close(mine(J), theirs(J), rel)
        stat = J @ J.T if ours.METHODS[name].uses_gram else J
        w_theirs = getattr(tja, f"{name}Weighting")(**_options(kwargs))(stat)
        w_mine = getattr(ours, f"{name}Weighting")(**_options(kwargs))(stat)
        assert w_mine.dtype == w_theirs.dtype and w_mine.device == w_theirs.device
        close(w_mine, w_theirs, rel)


def test_cagrad_equals_torchjd_and_solves_the_dual_at_least_as_well() -> None:
    for c in (0.5, 2.0):
        for K, P, seed in TYPICAL:
            J = jacobian(K, P, seed)
            G = J @ J.T
            mine, theirs = ours.CAGradWeighting(c=c)(G), tja.CAGradWeighting(c=c)(G)
            close(ours.CAGrad(c=c)(J), tja.CAGrad(c=c)(J), 1e-4)
            close(mine, theirs, 1e-4)
            if c > 0:  # weights = 1/K + lambda w: the dual objective w^T b + c ||g0|| ||g_w||
                objective = []
                for weights in (mine, theirs):
                    w = (weights - 1 / K) / (weights.sum() - 1)
                    objective.append(w @ G.mean(1) + c * G.mean().sqrt() * (w @ G @ w).sqrt())
                assert objective[0] <= objective[1] + 1e-12


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(n, k) for n, k, _ in EQUAL if n != "FairGrad" or k["alpha"] > 0] + [("CAGrad", {"c": 0.5})],
    ids=str,
)
def test_single_task_equals_torchjd(name: str, kwargs: dict) -> None:
    J = jacobian(1, 6, 0)
    close(
        getattr(ours, name)(**_options(kwargs))(J), getattr(tja, name)(**_options(kwargs))(J), 1e-6
    )


def test_aligned_mtl_preference_vector_equals_torchjd() -> None:
    J = jacobian(4, 12, 7)
    u = torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=F64)
    close(ours.AlignedMTL(pref_vector=u)(J), tja.AlignedMTL(pref_vector=u)(J), 1e-8)
    close(
        ours.UPGrad(pref_vector=u)(J),
        tja.UPGrad(u, QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(J),
        1e-8,
    )


def test_nash_mtl_equals_torchjd() -> None:
    for K, P, seed in TYPICAL:
        J = jacobian(K, P, seed)
        for max_norm in (0.0, 1.0):
            close(
                ours.NashMTL(n_tasks=K, max_norm=max_norm)(J),
                tja.NashMTL(n_tasks=K, max_norm=max_norm)(J),
                1e-5,
            )


def _kkt_upgrad(gram: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> None:
    """UPGrad's weights are sum_i v_i with v_i = argmin v^T G v s.t. v >= u_i e_i: the
    direction is in the dual cone and beats every other feasible point of each QP."""
    d_dot_g = gram @ weights  # <g_j, d>
    scale = gram.diagonal().max().sqrt() * weights.abs().sum() * gram.diagonal().sqrt()
    assert (d_dot_g >= -1e-9 * scale).all(), d_dot_g


@pytest.mark.parametrize("name", ["UPGrad", "DualProj"])
def test_dual_cone_methods_exact_where_torchjd_regularizes(name: str) -> None:
    for K, P, seed in TYPICAL:
        J = jacobian(K, P, seed)
        exact = getattr(tja, name)(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(J)
        close(getattr(ours, name)()(J), exact, 1e-8)
    for K, P, seed, scales in SCALED:  # badly scaled: quadprog without regularization may fail
        J = jacobian(K, P, seed, scales)
        d = getattr(ours, name)()(J)
        assert ((J @ d) >= -1e-9 * (J.norm(dim=1) * d.norm())).all()  # never conflicts


def test_mgda_is_the_exact_min_norm_point() -> None:
    for K, P, seed in TYPICAL:
        J = jacobian(K, P, seed)
        G = J @ J.T
        w = ours.MGDAWeighting()(G)
        w_theirs = tja.MGDAWeighting()(G)
        assert ops.kkt_residual(G, w).item() < 1e-9
        assert w @ G @ w <= w_theirs @ G @ w_theirs + 1e-12  # never worse than Frank-Wolfe


@pytest.mark.parametrize("name", ["PCGrad", "GradVac"])
def test_random_orders_replayed_in_torchjd(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    K = 5
    mine = getattr(ours, f"{name}Weighting")(seed=3)
    theirs = getattr(tja, f"{name}Weighting")()
    real_randperm = torch.randperm
    for step in range(3):  # GradVac's targets carry over between steps
        J = jacobian(K, 12, 10 + step)
        G = J @ J.T
        stream = PhiloxStream(0)
        stream.load_state_dict(mine.get_extra_state()["state"]["stream"])
        orders = stream.task_orders(K, G.device).tolist()  # the orders our next call draws
        if name == "PCGrad":  # torchjd: randperm(K) per task, skipping the task itself
            perms = [[*order, i] for i, order in enumerate(orders)]
        else:  # torchjd: randperm(K - 1), indices into the other tasks
            perms = [[j - (j > i) for j in order] for i, order in enumerate(orders)]
        queue = iter(perms)
        monkeypatch.setattr(
            torch, "randperm", lambda n, *a, **k: real_randperm(n).new_tensor(next(queue))
        )
        expected = theirs(G)
        monkeypatch.setattr(torch, "randperm", real_randperm)
        close(mine(G), expected, 1e-12 if name == "PCGrad" else 1e-7)


def test_random_weighting() -> None:
    J = jacobian(4, 6, 0)
    torch.manual_seed(5)
    a = ours.Random()
    torch.manual_seed(5)
    b = ours.Random()
    first = a.weighting(J)
    assert torch.equal(first, b.weighting(J))  # torch.manual_seed makes it reproducible
    second = a.weighting(J)
    assert not torch.equal(first, second)  # fresh weights at every call
    for w in (first, second):
        assert (w > 0).all() and abs(w.sum().item() - 1) < 1e-12
    assert not torch.equal(ours.Random()(J), ours.Random()(J))  # two instances differ


# --------------------------------------------------------------------------- training loops
def _model(seed: int, K: int):
    torch.manual_seed(seed)
    shared = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4), torch.nn.Tanh()
    ).double()
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(K)]).double()
    return shared, heads


def _train_autojac(aggregator, jac_to_grad, steps: int = 4, K: int = 3) -> list[torch.Tensor]:
    shared, heads = _model(0, K)
    params = [*shared.parameters(), *heads.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, dtype=F64, generator=g)
        ys = torch.randn(K, 16, 1, dtype=F64, generator=g)
        features = shared(x)
        losses = [torch.nn.functional.mse_loss(h(features), y) for h, y in zip(heads, ys)]
        mtl_backward(losses, features=features)
        jac_to_grad(shared.parameters(), aggregator)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in params]


LOOPS = [
    (
        "UPGrad",
        lambda: tja.UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0)),
        {},
        1e-8,
    ),
    ("UPGrad", lambda: tja.UPGrad(), {"projector": "default"}, 1e-8),
    ("IMTLG", tja.IMTLG, {}, 1e-8),
    ("AlignedMTL", tja.AlignedMTL, {}, 1e-8),
    ("CAGrad", lambda: tja.CAGrad(c=0.5), {"c": 0.5}, 1e-5),
    ("Mean", tja.Mean, {}, 1e-12),
]


@pytest.mark.parametrize(("name", "make_theirs", "kwargs", "rel"), LOOPS, ids=[r[0] for r in LOOPS])
def test_mtl_backward_loop_equals_torchjd(name, make_theirs, kwargs, rel) -> None:
    reference = _train_autojac(make_theirs(), torchjd_jac_to_grad)
    for jac_to_grad in (torchjd_jac_to_grad, ours.jac_to_grad):
        trained = _train_autojac(getattr(ours, name)(**_options(kwargs)), jac_to_grad)
        for a, b in zip(trained, reference):
            close(a, b, rel)


def test_autogram_engine_loop_equals_torchjd() -> None:
    def train(weighting_) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1)
        ).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = Engine(model, batch_dim=0)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(8, 5, dtype=F64, generator=g)
            y = torch.randn(8, dtype=F64, generator=g)
            losses = torch.nn.functional.mse_loss(model(x).squeeze(1), y, reduction="none")
            gramian = engine.compute_gramian(losses)
            losses.backward(weighting_(gramian))
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    reference = train(tja.UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0)))
    for a, b in zip(train(ours.UPGradWeighting()), reference):
        close(a, b, 1e-8)
    reference = train(tja.IMTLGWeighting())
    for a, b in zip(train(ours.IMTLGWeighting()), reference):
        close(a, b, 1e-8)


# --------------------------------------------------------------------------- properties
NON_CONFLICTING = ["UPGrad", "DualProj", "MGDA", "NashMTL"]
DETERMINISTIC = [
    "UPGrad",
    "DualProj",
    "MGDA",
    "CAGrad",
    "IMTLG",
    "AlignedMTL",
    "FairGrad",
    "NashMTL",
    "Mean",
    "Sum",
]
LINEAR_UNDER_SCALING = ["UPGrad", "Mean", "Sum"]


def _make(name: str, K: int):
    args = {"CAGrad": {"c": 0.5}, "FairGrad": {"alpha": 1.5}, "NashMTL": {"n_tasks": K}}
    return getattr(ours, name)(**args.get(name, {}))


@pytest.mark.parametrize("name", NON_CONFLICTING)
def test_non_conflicting(name: str) -> None:
    cases = [(K, P, s, None) for K, P, s in TYPICAL] + SCALED
    for K, P, seed, scales in cases:
        J = jacobian(K, P, seed, scales)
        d = _make(name, K)(J)
        assert ((J @ d) >= -1e-9 * J.norm(dim=1) * d.norm()).all(), (name, K, J @ d)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_permutation_invariant(name: str) -> None:
    for K, P, seed in TYPICAL[1:]:
        J = jacobian(K, P, seed)
        agg = _make(name, K)
        d = agg(J)
        for s in range(3):
            perm = torch.randperm(K, generator=torch.Generator().manual_seed(s))
            close(_make(name, K)(J[perm]), d, 1e-7)


@pytest.mark.parametrize("name", LINEAR_UNDER_SCALING)
def test_linear_under_scaling(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    for K, P, seed in TYPICAL:
        J = jacobian(K, P, seed)
        agg = _make(name, K)
        c1, c2 = torch.rand(K, dtype=F64, generator=g), torch.rand(K, dtype=F64, generator=g)
        a, b = torch.rand((), dtype=F64, generator=g), torch.rand((), dtype=F64, generator=g)
        expected = a * agg(c1[:, None] * J) + b * agg(c2[:, None] * J)
        close(agg((a * c1 + b * c2)[:, None] * J), expected, 1e-8)


# --------------------------------------------------------------------------- jac_to_grad
def _jacs(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in [(3, 4), (5,), (2, 2, 2)]
    ]
    for p in params:
        p.jac = torch.randn(3, *p.shape, generator=g).to(dtype)
    return params


@pytest.mark.parametrize("name", ["UPGrad", "MGDA", "IMTLG", "Mean", "Sum", "Random"])
def test_jac_to_grad_equals_torchjds(name: str) -> None:
    a, b = _jacs(0), _jacs(0)
    torch.manual_seed(1)
    agg_a = getattr(ours, name)()
    torch.manual_seed(1)
    agg_b = getattr(ours, name)()
    w_a = ours.jac_to_grad(a, agg_a)
    w_b = torchjd_jac_to_grad(b, agg_b)  # torchjd concatenates, then calls our aggregator
    torch.testing.assert_close(w_a, w_b, rtol=1e-5, atol=1e-6)
    for p, q in zip(a, b):
        assert not hasattr(p, "jac") and p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_mgda_aggregator_fused_path_equals_the_three_steps() -> None:
    for K, P, seed in TYPICAL:
        J = jacobian(K, P, seed).float()
        w = ours.MGDAWeighting()(ops.gram(J))
        close(ours.MGDA()(J), ops.combine(w, J), 1e-6)  # no hook: min_norm_aggregate


def test_jac_to_grad_fused_mgda_single_tensor_and_accumulation() -> None:
    g = torch.Generator().manual_seed(3)
    p = torch.randn(7, 5, generator=g).requires_grad_()
    J = torch.randn(4, 7, 5, generator=g)
    p.jac = J.clone()
    p.grad = torch.ones(7, 5)
    w = ours.jac_to_grad([p], ours.MGDA(), retain_jac=True)
    expected_w = weighting.get("mgda")(ops.gram(J.reshape(4, -1)))
    torch.testing.assert_close(w, expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.grad, 1 + torch.einsum("k,k...->...", expected_w, J))
    assert torch.equal(p.jac, J)  # retained


def test_jac_to_grad_hooks_and_foreign_aggregators_go_to_torchjd() -> None:
    seen = []
    agg = ours.UPGrad()
    agg.weighting.register_forward_hook(lambda m, i, o: seen.append(o))
    a = _jacs(4)
    w = ours.jac_to_grad(a, agg)
    assert len(seen) == 1 and torch.equal(seen[0], w)  # the hook saw the weights
    b, c = _jacs(4), _jacs(4)
    ours.jac_to_grad(b, tja.Mean())
    torchjd_jac_to_grad(c, tja.Mean())
    for p, q in zip(b, c):
        torch.testing.assert_close(p.grad, q.grad)


def test_jac_to_grad_errors_before_any_change() -> None:
    a = _jacs(5)
    del a[1].jac
    with pytest.raises(ValueError, match="jac"):
        ours.jac_to_grad(a, ours.UPGrad())
    assert hasattr(a[0], "jac") and a[0].grad is None
    b = _jacs(6)
    b[2].jac = torch.randn(2, *b[2].shape)  # 2 rows, the others 3
    with pytest.raises(ValueError, match="same number of rows"):
        ours.jac_to_grad(b, ours.UPGrad())
    assert all(hasattr(p, "jac") for p in b)
    with pytest.raises(ValueError, match="cannot be empty"):
        ours.jac_to_grad([], ours.UPGrad())


def test_bf16_jacobians() -> None:
    a = _jacs(7, torch.bfloat16)
    ref = [p.jac.float() for p in a]
    w = ours.jac_to_grad(a, ours.UPGrad())
    gram = sum(j.reshape(3, -1) @ j.reshape(3, -1).T for j in ref)
    torch.testing.assert_close(w, weighting.get("upgrad")(gram), rtol=1e-4, atol=1e-5)
    for p, j in zip(a, ref):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(
            p.grad.float(), torch.einsum("k,k...->...", w, j), rtol=2e-2, atol=2e-2
        )


# --------------------------------------------------------------------------- state, errors
def test_nash_mtl_reset_and_update_every() -> None:
    Js = [jacobian(3, 5, s) for s in range(4)]
    agg = ours.NashMTL(n_tasks=3, max_norm=0.0, update_weights_every=3)
    first = [agg(J) for J in Js]
    w0 = ours.NashMTLWeighting(n_tasks=3, max_norm=0.0)(Js[0] @ Js[0].T)
    close(first[1], w0 @ Js[1], 1e-12)  # call 1 reuses the weights of call 0
    agg.reset()
    for J, expected in zip(Js, first):
        close(agg(J), expected, 1e-12)
    with pytest.raises(ValueError, match="n_tasks=3"):
        agg(jacobian(4, 5, 0))


def test_state_dict_resumes_random_and_ema_state() -> None:
    for name in ("GradVac", "PCGrad", "Random"):
        a = getattr(ours, name)(seed=11)
        Js = [jacobian(4, 9, s) for s in range(4)]
        for J in Js[:2]:
            a(J)
        b = getattr(ours, name)(seed=0)
        b.load_state_dict(a.state_dict())
        for J in Js[2:]:
            assert torch.equal(a(J), b(J)), name
    with pytest.raises(ValueError, match="cannot be loaded"):
        ours.PCGrad().load_state_dict(ours.GradVac().state_dict())


def test_gradvac_reset_clears_the_ema_only() -> None:
    a, b = ours.GradVac(seed=2), ours.GradVac(seed=2)
    Js = [jacobian(4, 9, s) for s in range(3)]
    a(Js[0])
    b(Js[0])
    a.reset()  # targets back to zero, the stream goes on
    fresh = ours.GradVac(seed=2)
    fresh.load_state_dict(b.state_dict())
    state = fresh.gramian_weighting.get_extra_state()
    state["state"]["target"] = None
    fresh.gramian_weighting.set_extra_state(state)
    assert torch.equal(a(Js[1]), fresh(Js[1]))


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: ours.MGDA(epsilon=0.0), ValueError),
        (lambda: ours.MGDA(max_iters=0), ValueError),
        (lambda: ours.CAGrad(c=-1.0), ValueError),
        (lambda: ours.CAGrad(c=0.5, norm_eps=-1.0), ValueError),
        (lambda: ours.GradVac(beta=2.0), ValueError),
        (lambda: ours.GradVac(eps=-1.0), ValueError),
        (lambda: ours.NashMTL(n_tasks=0), ValueError),
        (lambda: ours.NashMTL(n_tasks=2, update_weights_every=0), ValueError),
        (lambda: ours.FairGrad(alpha=-1.0), ValueError),
        (lambda: ours.AlignedMTL(scale_mode="max"), ValueError),
        (lambda: ours.UPGrad(pref_vector=torch.ones(2, 2)), ValueError),
        (lambda: ours.UPGrad(projector=object()), TypeError),
        (lambda: ours.UPGrad(projector=QuadprogProjector(), reg_eps=1e-3), TypeError),
        (lambda: ours.UPGrad(reg_eps=-1.0), ValueError),
        (lambda: ours.CAGrad(), TypeError),  # c is required, as in torchjd
    ],
)
def test_invalid_options_raise(make, error) -> None:
    with pytest.raises(error):
        make()


def test_wrong_inputs_raise_clearly() -> None:
    w = ours.UPGradWeighting(pref_vector=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="pref_vector has 3 entries"):
        w(torch.eye(4, dtype=F64))
    with pytest.raises(ValueError, match="square"):
        ours.UPGradWeighting()(torch.ones(3, 4))
    with pytest.raises(ValueError):
        ours.UPGrad()(torch.ones(3))  # torchjd's own matrix check


def test_float32_and_representations() -> None:
    J = jacobian(3, 8, 0).float()
    w = ours.UPGradWeighting()(J @ J.T)
    assert w.dtype == torch.float32
    assert ours.UPGrad()(J).dtype == torch.float32
    assert repr(ours.MGDA()) == "MGDA(epsilon=0.001, max_iters=100)"
    assert str(ours.UPGrad()) == "UPGrad"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.NashMTL(n_tasks=3)(J)  # no solver warning: nothing is solved on the host
