"""The contract every registered weighting meets (DESIGN.md section 4), checked uniformly."""

from __future__ import annotations

import inspect

import pytest
import torch

from mtlsam_fast import weighting

NAMES = weighting.names()
#: weightings whose output does not depend on call order or random state
DETERMINISTIC = {
    "ls",
    "mgda",
    "cagrad",
    "imtl",
    "nashmtl",
    "fairgrad",
    "upgrad",
    "dualproj",
    "alignedmtl",
}
#: methods that promise <g_i, d> >= 0 for every task
NON_CONFLICTING = {"mgda", "upgrad", "dualproj"}


def make(name: str):
    return weighting.get(name)


def losses_for(K: int, device) -> torch.Tensor:
    return torch.rand(K, device=device) + 0.5


def call(w, gram):
    losses = losses_for(gram.shape[0], gram.device) if w.needs_losses else None
    return w(gram, losses)


def random_gram(K: int, device, P: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    G = torch.randn(K, P, device=device)
    return G, G @ G.T


def test_registry_has_all_thirteen_methods():
    assert set(NAMES) == {
        "ls",
        "mgda",
        "pcgrad",
        "cagrad",
        "imtl",
        "nashmtl",
        "fairgrad",
        "upgrad",
        "dualproj",
        "alignedmtl",
        "dbmtl",
        "gradvac",
        "rlw",
    }
    for name in NAMES:
        cls = type(weighting.get(name))
        assert cls.name == name and getattr(weighting, cls.__name__) is cls
        assert cls.__doc__ and cls.__module__.startswith("mtlsam_fast.weighting.")


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown weighting 'nope'.*mgda"):
        weighting.get("nope")
    w = weighting.get("mgda")
    assert weighting.get(w) is w
    with pytest.raises(ValueError, match="options"):
        weighting.get(w, normalization="l2")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("K", [1, 2, 5])
def test_weights_shape_dtype_device(name, K, device):
    _, gram = random_gram(K, device)
    out = call(make(name), gram)
    assert out.shape == (K,) and out.device == gram.device and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out64 = call(make(name), gram.double())
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_single_task_gets_weight_one(name):
    _, gram = random_gram(1, "cpu")
    out = call(make(name), gram)
    torch.testing.assert_close(out, torch.ones(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["zero", "identical", "one_zero"])
def test_degenerate_gradients_give_finite_weights(name, case):
    K = 4
    if case == "zero":
        gram = torch.zeros(K, K)
    elif case == "identical":
        g = torch.randn(1, 30)
        gram = (g @ g.T).expand(K, K).clone()
    else:
        G = torch.randn(K, 30)
        G[2] = 0
        gram = G @ G.T
    assert torch.isfinite(call(make(name), gram)).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gram_gives_nan_weights_not_an_exception(name, bad):
    _, gram = random_gram(3, "cpu")
    gram[0, 1] = gram[1, 0] = bad
    assert torch.isnan(call(make(name), gram)).all()


@pytest.mark.parametrize("name", NAMES)
def test_bad_gram_raises(name):
    w = make(name)
    with pytest.raises(ValueError, match="square"):
        w(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="square"):
        w(torch.zeros(3))
    with pytest.raises(ValueError, match="losses"):
        w(torch.eye(3), torch.ones(2))


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_permutation_equivariance(name):
    _, gram = random_gram(5, "cpu", P=12)
    losses = torch.rand(5) + 0.5
    perm = torch.tensor([3, 0, 4, 1, 2])
    w = make(name)
    args = (losses,) if w.needs_losses else ()
    base = w(gram.double(), *[a.double() for a in args])
    permuted = make(name)(gram.double()[perm][:, perm], *[a.double()[perm] for a in args])
    torch.testing.assert_close(permuted, base[perm], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(NON_CONFLICTING))
def test_non_conflicting_direction(name):
    for seed in range(5):
        torch.manual_seed(seed)
        G = torch.randn(6, 8, dtype=torch.float64)
        G[1] = -0.9 * G[0] + 0.1 * G[1]  # a strong conflict
        gram = G @ G.T
        d = call(make(name), gram) @ G
        assert (G @ d >= -1e-9 * gram.diagonal().max()).all()


@pytest.mark.parametrize("name", NAMES)
def test_no_graph_break_under_compile(name):
    """Sync-freedom on the CPU: the weighting traces as one graph (no .item(), no value branches).

    Iterative methods get a small budget: tracing unrolls their loops (the budget is a constant,
    so the graph has the same structure at any size).
    """
    torch._dynamo.reset()
    cls = type(make(name))
    options = {"max_iter": 3} if "max_iter" in inspect.signature(cls.__init__).parameters else {}
    _, gram = random_gram(4, "cpu")
    losses = losses_for(4, "cpu")
    eager_w, compiled_w = cls(**options), cls(**options)
    expected = eager_w(gram, losses if eager_w.needs_losses else None)
    fn = torch.compile(
        lambda g, l: compiled_w(g, l if compiled_w.needs_losses else None),
        fullgraph=True,
        backend="eager",
    )
    out = fn(gram, losses)
    assert out.shape == (4,) and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    """Stateful weightings resume identically; stateless ones have empty state."""
    _, gram = random_gram(3, "cpu")
    w = make(name)
    call(w, gram)
    state = w.state_dict()
    torch.manual_seed(123)
    after = [call(w, gram * (i + 1)) for i in range(3)]
    w2 = make(name)
    w2.load_state_dict(state)
    torch.manual_seed(123)
    again = [call(w2, gram * (i + 1)) for i in range(3)]
    for a, b in zip(after, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_init_state_changes_nothing_but_the_state_dict_structure(name):
    """``init_state`` creates the state the first call would create: same weights after it, and
    a fresh ``state_dict`` already shaped like a used one (torch.distributed.checkpoint loads a
    checkpoint into the structure of the destination's state dict)."""
    _, gram = random_gram(3, "cpu")
    plain, primed = make(name), make(name)
    primed.init_state(3, torch.device("cpu"))
    used = make(name)
    call(used, gram)

    def structure(state):
        return {k: type(v) for k, v in state.items()}

    assert structure(primed.state_dict()) == structure(used.state_dict())
    for i in range(3):
        torch.manual_seed(i)
        a = call(plain, gram * (i + 1))
        torch.manual_seed(i)
        assert torch.equal(a, call(primed, gram * (i + 1)))
    primed.init_state(3, torch.device("cpu"))  # idempotent
    if structure(make(name).state_dict()) != structure(used.state_dict()):  # lazily created
        with pytest.raises(ValueError, match="tasks"):
            primed.init_state(4, torch.device("cpu"))
