"""The contract every registered weighting meets, checked uniformly from explicit task gradients.

A weighting maps the Gram (plus the losses or the gradients themselves, as it declares) to K
weights, or to a direction for the methods that return one; these tests build every input from an
explicit gradient matrix ``G`` and compare through the direction ``d`` where the kinds differ.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from mtlsam_fast import weighting
from mtlsam_fast.weighting.base import COMMON_OPTIONS

NAMES = weighting.names()
#: the methods of torchjd 0.18 and LibMTL this library covers (issue 20's table and the first 13)
ALL = {
    "ls", "mgda", "pcgrad", "cagrad", "imtl", "nashmtl", "fairgrad", "upgrad", "dualproj",
    "alignedmtl", "dbmtl", "gradvac", "rlw", "config", "excessmtl", "sdmgrad", "modo", "pcd",
    "crmogm", "graddrop", "krum", "trimmedmean", "moco", "gradnorm", "uw", "dwa", "gls", "stch",
    "famo", "imtl_l", "cosmos", "pbi",
}  # fmt: skip
#: random methods (a seed option; outputs depend on the stream position)
RANDOM = {"pcgrad", "gradvac", "rlw", "graddrop"}
#: not symmetric in the tasks (the first task is the primary one)
ASYMMETRIC = {"pcd"}
#: weights unchanged when every gradient is scaled by the same factor (the others: eps guards,
#: step sizes in gradient units, or directions, which scale with the gradients)
SCALE_INVARIANT = {
    "ls", "mgda", "pcgrad", "cagrad", "imtl", "nashmtl", "fairgrad", "upgrad", "dualproj",
    "alignedmtl", "gradvac", "rlw", "config", "krum", "uw", "dwa", "gls", "stch", "famo",
    "imtl_l", "cosmos", "pbi", "crmogm",
}  # fmt: skip
#: directions proportional to the gradients' scale
SCALE_EQUIVARIANT_DIRECTION = {"graddrop", "trimmedmean"}
#: methods that promise <g_i, d> >= 0 for every task (ConFIG: for linearly independent gradients)
NON_CONFLICTING = {"mgda", "upgrad", "dualproj", "config"}
#: the weight of a single task where it is not 1: UW's is exp(-s)/2 at s = 0; MoCo's first
#: direction is its tracked gradient, beta g (tracking starts at 0)
SINGLE_TASK_WEIGHT = {"uw": 0.5, "moco": 0.5}


def make(name: str, **options):
    if name in RANDOM:
        options.setdefault("seed", 3)
    return weighting.get(name, **options)


def min_tasks(name: str) -> int:
    w = make(name)
    for K in range(1, 8):
        try:
            w.check_num_tasks(K)
            return K
        except ValueError:
            continue
    raise AssertionError(f"{name} accepts no K up to 7")


def inputs(w, G: torch.Tensor, losses: torch.Tensor | None = None):
    """(gram, losses, kwargs) for ``w`` from explicit gradients."""
    gram = G @ G.T
    if losses is None:
        gen = torch.Generator().manual_seed(G.shape[0])
        losses = (torch.rand(G.shape[0], generator=gen, dtype=torch.float64) + 0.5).to(G)
    return gram, losses if w.needs_losses else None, {"grads": G} if w.needs_grads else {}


def call(w, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    gram, l, kw = inputs(w, G, losses)
    return w(gram, l, **kw)


def direction(w, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    out = call(w, G, losses)
    return out if w.returns_direction else out.to(G.dtype) @ G


def grads(K: int, P: int = 20, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(K, P, generator=gen, dtype=torch.float64)
    G = G * torch.exp(0.5 * torch.randn(K, 1, generator=gen, dtype=torch.float64))
    return G.to(dtype)


# ---------------------------------------------------------------- registry and options
def test_registry_has_every_method_of_the_peers():
    assert set(NAMES) == ALL
    for name in NAMES:
        cls = type(make(name))
        assert cls.name == name and getattr(weighting, cls.__name__) is cls
        assert cls.__doc__ and cls.__module__.startswith("mtlsam_fast.weighting.")
        if name != "ls":  # the baseline has no paper
            assert "https://" in (sys.modules[cls.__module__].__doc__ or ""), f"{name}: paper"


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown weighting 'nope'.*mgda.*pbi"):
        weighting.get("nope")
    w = weighting.get("mgda")
    assert weighting.get(w) is w
    with pytest.raises(ValueError, match="options"):
        weighting.get(w, normalization="l2")


@pytest.mark.parametrize("name", NAMES)
def test_common_options_and_misspelled_options(name):
    cls = type(make(name))
    valid = [p for p in inspect.signature(cls).parameters if p not in ("self",)]
    for common in COMMON_OPTIONS:
        assert common in valid
    assert make(name, backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="backend must be None or one of"):
        make(name, backend="cdua")
    with pytest.raises(ValueError) as err:
        make(name, bakend="torch")
    msg = str(err.value)
    assert "'bakend'" in msg and name in msg and all(v in msg for v in valid)


# ---------------------------------------------------------------- outputs
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("K", [1, 2, 5])
def test_shape_dtype_device(name, K, device):
    if min_tasks(name) > K:
        with pytest.raises(ValueError, match=f"K={K}"):
            call(make(name), grads(K).to(device))
        return
    for dtype in (torch.float32, torch.float64):
        G = grads(K, dtype=dtype).to(device)
        w = make(name)
        out = call(w, G)
        expected = (G.shape[1],) if w.returns_direction else (K,)
        assert out.shape == expected and out.device == G.device and out.dtype == dtype
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in NAMES if min_tasks(n) == 1])
def test_single_task(name):
    """One task: weight 1 (the direction is the gradient itself) for every method but UW."""
    G = grads(1)
    torch.testing.assert_close(
        direction(make(name), G), SINGLE_TASK_WEIGHT.get(name, 1.0) * G[0], rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["zero", "identical", "opposite", "one_zero", "rank_one"])
def test_degenerate_gradients_give_finite_results(name, case):
    K = max(4, min_tasks(name))
    G = grads(K)
    if case == "zero":
        G = torch.zeros_like(G)
    elif case == "identical":
        G = G[:1].expand(K, -1).clone()
    elif case == "opposite":
        G[1] = -G[0]
    elif case == "one_zero":
        G[2] = 0
    else:
        G = torch.randn(K, 1, dtype=G.dtype) * G[:1]
    for dtype in (torch.float64, torch.float32):
        assert torch.isfinite(call(make(name), G.to(dtype))).all(), (case, dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_gives_nan_not_an_exception(name, bad, device):
    """NaN/Inf in the gradients (hence the Gram) give all-NaN results: the optimizers' found-inf
    flag; loss-based methods do the same for a non-finite loss."""
    K = max(3, min_tasks(name))
    G = grads(K).to(device)
    G[0, 1] = bad
    assert torch.isnan(call(make(name), G)).all()
    w = make(name)
    if w.needs_losses:
        losses = torch.ones(K, dtype=torch.float64, device=device)
        losses[1] = bad
        assert torch.isnan(call(w, grads(K).to(device), losses)).all()


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise(name):
    w = make(name)
    K = max(3, min_tasks(name))
    with pytest.raises(ValueError, match="square"):
        w(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="square"):
        w(torch.zeros(3))
    with pytest.raises(ValueError, match="losses"):
        w(torch.eye(K), torch.ones(K + 1))
    if w.needs_losses:
        with pytest.raises(ValueError, match="needs the K task losses"):
            w(torch.eye(K), grads=torch.eye(K))
    if w.needs_grads:
        with pytest.raises(ValueError, match="needs the K x P task gradients"):
            w(torch.eye(K), torch.ones(K))
        with pytest.raises(ValueError, match=r"grads must be a \[\d+, P\] tensor"):
            w(torch.eye(K), torch.ones(K), grads=torch.ones(K + 1, 4))


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("name", sorted(set(NAMES) - RANDOM - ASYMMETRIC))
def test_permutation_equivariance(name):
    K = max(5, min_tasks(name))
    G = grads(K, seed=1)
    losses = torch.rand(K, dtype=torch.float64) + 0.5
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(2))
    base = call(make(name), G, losses)
    permuted = call(make(name), G[perm], losses[perm])
    expected = base if make(name).returns_direction else base[perm]
    torch.testing.assert_close(permuted, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(SCALE_INVARIANT | SCALE_EQUIVARIANT_DIRECTION))
def test_scaling(name):
    K = max(4, min_tasks(name))
    G = grads(K, seed=4)
    base = call(make(name), G)
    for s in (1e-6, 1e6):
        out = call(make(name), G * s)
        expected = base * s if name in SCALE_EQUIVARIANT_DIRECTION else base
        torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-9 * expected.abs().max())


@pytest.mark.parametrize("name", sorted(NON_CONFLICTING))
def test_non_conflicting_direction(name):
    for seed in range(5):
        G = grads(6, P=8, seed=seed)
        G[1] = -0.9 * G[0] + 0.1 * G[1]  # a strong conflict
        d = direction(make(name), G)
        assert (G @ d >= -1e-9 * (G * G).sum(1).max()).all()


# ---------------------------------------------------------------- sync-freedom
@pytest.mark.parametrize("name", NAMES)
def test_no_graph_break_under_compile(name):
    """Sync-freedom on the CPU: two calls trace as one graph each (no .item(), no value branches).

    Iterative methods get a small budget: tracing unrolls their loops (the budget is a constant,
    so the graph has the same structure at any size).
    """
    torch._dynamo.reset()
    cls = type(make(name))
    params = inspect.signature(cls).parameters
    options: dict = {k: 3 for k in ("max_iter", "n_iter", "sweeps") if k in params}
    if name == "crmogm":  # the wrapped MGDA's QP budget
        options["weighting_options"] = {"max_iter": 3}
    K = max(4, min_tasks(name))
    eager_w, compiled_w = make(name, **options), make(name, **options)
    fn = torch.compile(
        lambda g, l, G: compiled_w(
            g,
            l if compiled_w.needs_losses else None,
            grads=G if compiled_w.needs_grads else None,
        ),
        fullgraph=True,
        backend="eager",
    )
    for seed in range(2):
        G = grads(K, seed=seed, dtype=torch.float32)
        gram, losses, _ = inputs(eager_w, G)
        expected = call(eager_w, G)
        out = fn(gram, losses if losses is not None else torch.ones(K), G)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------- state
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    """A resumed weighting continues bitwise; stateless ones have empty state."""
    K = max(3, min_tasks(name))
    w = make(name)
    call(w, grads(K))
    state = w.state_dict()
    after = [call(w, grads(K, seed=s) * (s + 1)) for s in range(3)]
    w2 = make(name)
    w2.load_state_dict(state)
    again = [call(w2, grads(K, seed=s) * (s + 1)) for s in range(3)]
    for a, b in zip(after, again):
        assert torch.equal(a, b)


STATEFUL = [n for n in NAMES if make(n).snapshot() is not None or make(n).STATE]


@pytest.mark.parametrize("name", STATEFUL)
def test_restore_where_undoes_calls_bitwise(name):
    """The optimizers' found-inf guard: ``restore_where(True, snapshot)`` leaves no trace of the
    calls since the snapshot (also when they created the state); ``restore_where(False)`` keeps
    them. ``w`` and a fresh twin must then continue identically."""
    K = max(3, min_tasks(name))
    steps = [grads(K, seed=s) for s in range(4)]
    w, twin = make(name), make(name)
    snap = w.snapshot()  # before the state exists
    call(w, steps[0])
    w.restore_where(torch.tensor(True), snap)
    assert torch.equal(call(w, steps[1]), call(twin, steps[1]))
    snap = w.snapshot()
    call(w, steps[2])
    w.restore_where(torch.tensor(True), snap)
    assert torch.equal(call(w, steps[3]), call(twin, steps[3]))
    snap = w.snapshot()
    assert torch.equal(call(w, steps[0]), call(twin, steps[0]))
    w.restore_where(torch.tensor(False), snap)
    assert torch.equal(call(w, steps[1]), call(twin, steps[1]))


@pytest.mark.parametrize("name", STATEFUL)
def test_bad_state_raises_before_changing_anything(name):
    K = max(3, min_tasks(name))
    w = make(name)
    call(w, grads(K))
    before = w.state_dict()
    with pytest.raises(ValueError):
        w.load_state_dict({"bogus": 1})
    ref = make(name)
    ref.load_state_dict(before)
    G = grads(K, seed=9)
    assert torch.equal(call(w, G), call(ref, G))


@pytest.mark.parametrize("name", sorted(n for n in STATEFUL if n not in RANDOM))
def test_stateful_methods_reject_a_task_count_change(name):
    K = max(3, min_tasks(name))
    w = make(name)
    call(w, grads(K))
    with pytest.raises(ValueError, match=f"K={K + 1}"):
        call(w, grads(K + 1))


@pytest.mark.parametrize("name", [n for n in NAMES if make(n).needs_grads])
def test_gradients_under_a_loss_scale(name):
    """``grads`` may carry a GradScaler's scale (``inv_scale`` divides it out): weights are those
    of the true gradients, directions come back in the units of ``grads``."""
    K = max(3, min_tasks(name))
    w, scaled = make(name), make(name)
    for step in range(3):
        G = grads(K, seed=step)
        gram = G @ G.T
        losses = torch.rand(K, dtype=torch.float64) + 0.5
        args = (gram, losses) if w.needs_losses else (gram,)
        ref = w(*args, grads=G)
        out = scaled(*args, grads=G * 1024.0, inv_scale=torch.tensor(1 / 1024.0))
        expected = ref * 1024.0 if w.returns_direction else ref
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)


def _bad_options():
    nan, inf = float("nan"), float("inf")
    neg_pref, nan_pref, zero_pref = [-0.5, 1.0, 1.0], [nan, 1.0, 1.0], [0.0, 0.0, 0.0]
    cases = {
        "mgda": [{"normalization": "max"}, {"max_iter": 0}, {"tol": 0.0}, {"tol": nan}],
        "cagrad": [{"c": inf}, {"c": -1.0}, {"c": nan}, {"rescale": 3}, {"max_iter": 1.5}],
        "upgrad": [{"pref_vector": neg_pref}, {"pref_vector": nan_pref},
                   {"pref_vector": zero_pref}, {"max_iter": 0}, {"tol": -1.0}],
        "dualproj": [{"pref_vector": neg_pref}, {"max_iter": True}],
        "nashmtl": [{"max_iter": 0}, {"reg": 0.0}, {"reg": inf}, {"normalize": 1}],
        "fairgrad": [{"alpha": 0.0}, {"alpha": inf}, {"alpha": nan}, {"max_iter": 0}],
        "alignedmtl": [{"scale_mode": "max"}, {"rtol": -1.0}, {"rtol": nan}, {"sweeps": 0}],
        "dbmtl": [{"beta": 1.5}, {"beta": nan}, {"eps": 0.0}, {"eps": inf}],
        "gradvac": [{"beta": -0.1}, {"seed": -1}],
        "pcgrad": [{"reduction": "max"}, {"seed": 1.5}],
        "rlw": [{"seed": 2**64}],
        "config": [{"pref_vector": neg_pref}, {"pref_vector": [[1.0]]}, {"solver": "svd"}],
        "excessmtl": [{"robust_step_size": 0.0}, {"robust_step_size": inf},
                      {"n_warmup_steps": -1}],
        "sdmgrad": [{"lr": 0.0}, {"momentum": 1.0}, {"n_iter": 0}, {"lambda_": -1.0},
                    {"pref_vector": nan_pref}],
        "modo": [{"gamma": 0.0}, {"gamma": inf}, {"rho": -1.0}],
        "pcd": [{"tau": 1.5}, {"tau": [0.1, nan]}, {"beta": 1.0}, {"eps": -1.0}, {"max_iter": 0}],
        "crmogm": [{"alpha": 1.5}, {"weighting": "graddrop"}, {"weighting": "nope"},
                   {"initial_weights": nan_pref}, {"weighting_options": {"bogus": 1}}],
        "graddrop": [{"leak": 1.5}, {"leak": [0.1, nan]}, {"f": 3}, {"seed": -2}],
        "krum": [{"n_byzantine": -1}, {"n_selected": 0}, {"distance": "l1"}],
        "trimmedmean": [{"trim_number": -1}, {"trim_number": 0.5}],
        "moco": [{"beta": 0.0}, {"beta": 1.5}, {"gamma": inf}, {"rho": -1.0}, {"normalize": 0}],
        "gradnorm": [{"alpha": -1.0}, {"lr": inf}, {"betas": (0.9, 1.0)}],
        "uw": [{"lr": -1.0}, {"init": inf}, {"eps": 0.0}, {"weight_decay": nan}],
        "imtl_l": [{"lr": nan}, {"betas": (0.9,)}],
        "dwa": [{"temperature": 0.0}, {"temperature": inf}],
        "famo": [{"lr": -1.0}, {"weight_decay": inf}, {"min_losses": nan_pref}],
        "gls": [],
        "stch": [{"mu": 0.0}, {"mu": inf}, {"pref_vector": neg_pref}, {"reference": nan_pref}],
        "cosmos": [{"lambda_": -1.0}, {"pref_vector": zero_pref}],
        "pbi": [{"theta": -1.0}, {"theta": nan}, {"pref_vector": neg_pref}],
        "ls": [],
    }  # fmt: skip
    return [(n, o) for n, opts in cases.items() for o in opts]


@pytest.mark.parametrize("name,options", _bad_options(), ids=lambda x: str(x)[:30])
def test_options_that_make_no_sense_raise(name, options):
    with pytest.raises(ValueError):
        weighting.get(name, **options)


def test_option_vectors_are_checked_when_reassigned():
    w = weighting.get("cosmos")
    w.pref_vector = [1.0, 2.0, 3.0]
    assert w.pref_vector.dtype == torch.float64
    with pytest.raises(ValueError, match="non-negative"):
        w.pref_vector = [1.0, -2.0, 3.0]
    with pytest.raises(ValueError, match="K=2"):
        w(torch.eye(2), torch.ones(2))


def test_small_work_runs_on_one_thread(monkeypatch):
    """K x K work (a weighting's call, the QP) runs on one intra-op thread on the CPU, and torch's
    thread count is back afterwards; gradient-based methods keep it unless the gradients are
    small."""
    from mtlsam_fast import ops
    from mtlsam_fast.ops import torch_backend

    seen: dict[str, int] = {}

    def spy(key, fn):
        def wrapped(*args):
            seen[key] = torch.get_num_threads()
            return fn(*args)

        return wrapped

    mgda, graddrop = make("mgda", backend="torch"), make("graddrop")
    for w in (mgda, graddrop):
        monkeypatch.setattr(type(w), "compute", spy(w.name, type(w).compute))
    monkeypatch.setattr(torch_backend, "solve_qp", spy("qp", torch_backend.solve_qp))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        call(mgda, grads(4))
        assert seen == {"mgda": 1, "qp": 1}
        seen.clear()
        ops.solve_qp(torch.eye(3), backend="torch")
        assert seen == {"qp": 1} and torch.get_num_threads() == 2
        call(graddrop, grads(4))
        assert seen["graddrop"] == 1  # small gradients
        call(graddrop, grads(4, P=ops.threads.GRAIN // 4))
        assert seen["graddrop"] == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_no_host_sync_on_cuda(name):
    """Every weighting, stateful ones included, runs its calls without a host synchronization
    (after a first call that creates its state and copies its option vectors to the device)."""
    K = max(4, min_tasks(name))
    w = make(name)
    steps = [inputs(w, grads(K, seed=s, dtype=torch.float32).cuda()) for s in range(3)]
    gram, losses, kw = steps[0]
    w(gram, losses, **kw)
    snap = w.snapshot()
    keep = torch.zeros((), dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gram, losses, kw in steps[1:]:
            w(gram, losses, **kw)
        w.restore_where(keep, snap)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("name", NAMES)
def test_init_state_changes_nothing_but_the_state_dict_structure(name):
    """``init_state`` creates the state the first call would create: same results after it, and
    a fresh ``state_dict`` already shaped like a used one (torch.distributed.checkpoint loads a
    checkpoint into the structure of the destination's state dict)."""
    K, P = max(3, min_tasks(name)), 20
    G = grads(K, P)
    plain, primed, used = make(name), make(name), make(name)
    primed.init_state(K, torch.device("cpu"), P, G.dtype)
    call(used, G)

    def structure(v):
        if isinstance(v, dict):
            return {k: structure(x) for k, x in v.items()}
        return (type(v), tuple(v.shape) if isinstance(v, torch.Tensor) else None)

    assert structure(primed.state_dict()) == structure(used.state_dict())
    for i in range(3):
        torch.manual_seed(i)
        a = call(plain, G * (i + 1))
        torch.manual_seed(i)
        assert torch.equal(a, call(primed, G * (i + 1)))
    primed.init_state(K, torch.device("cpu"), P)  # idempotent
    if primed.STATE:
        with pytest.raises(ValueError, match="tasks"):
            primed.init_state(K + 1, torch.device("cpu"), P)
