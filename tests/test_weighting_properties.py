"""Property tests (Hypothesis): every weighting gives finite results on every finite PSD Gram.

Families of K = 1 ... 64 task gradients -- random (any P), low rank (fewer dimensions than tasks),
identical, opposite pairs, collinear with mixed signs, zero rows, all zero -- with row norms
spread over up to 6 decades, Gram scales 1e-30 ... 1e30, in float32 and float64. Each example
builds a fresh weighting and calls it twice (stateful methods then run their update). The budget
is fixed (derandomized, ``MAX_EXAMPLES`` per method, no example database), so CI time is bounded.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import pytest
import torch

from mtlsam_fast import weighting

MAX_EXAMPLES = 25
FAMILIES = ("random", "low_rank", "identical", "opposite", "collinear", "zero_rows", "zero")
#: promised <g_i, d> >= 0 (checked on float64 examples)
NON_CONFLICTING = {"mgda", "upgrad", "dualproj"}


@st.composite
def problems(draw):
    K = draw(st.integers(1, 64))
    family = draw(st.sampled_from(FAMILIES))
    # low rank: more tasks than gradient dimensions
    P = draw(st.integers(1, max(1, K - 1))) if family == "low_rank" else draw(st.integers(1, K + 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    G = torch.randn(K, P, generator=gen, dtype=torch.float64)
    if family == "identical":
        G = G[:1].expand(K, P).clone()
    elif family == "opposite":
        G[1::2] = -G[: K // 2 * 2 : 2][: G[1::2].shape[0]]
    elif family == "collinear":
        G = torch.randn(K, 1, generator=gen, dtype=torch.float64) * G[:1]
    elif family == "zero_rows":
        G[torch.rand(K, generator=gen) < 0.5] = 0
    elif family == "zero":
        G.zero_()
    spread = draw(st.integers(0, 6))
    G = G * 10.0 ** (spread * (torch.rand(K, 1, generator=gen, dtype=torch.float64) - 0.5))
    # the largest diagonal entry of the Gram is 10^e
    largest = G.norm(dim=1).max()
    scale = 10.0 ** (draw(st.integers(-30, 30)) / 2) / (largest if largest > 0 else 1.0)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    losses = 10.0 ** (2 * torch.rand(K, generator=gen, dtype=torch.float64) - 1)
    return (G * scale).to(dtype), losses.to(dtype)


def runnable(name: str, K: int) -> bool:
    try:
        weighting.get(name).check_num_tasks(K)
        return True
    except ValueError:  # e.g. Krum needs n_byzantine + 3 tasks
        return False


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", weighting.names())
def test_finite_on_every_finite_psd_gram(name):
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(problems())
    def check(problem):
        G, losses = problem
        K = G.shape[0]
        hypothesis.assume(runnable(name, K))
        gram = G @ G.T
        assert torch.isfinite(gram).all()  # a finite input
        w = weighting.get(name)
        for _ in range(2):
            out = w(
                gram,
                losses if w.needs_losses else None,
                grads=G if w.needs_grads else None,
            )
            assert torch.isfinite(out).all(), out
        if name in NON_CONFLICTING and G.dtype == torch.float64:
            # relative to the size of the combination (d itself may cancel to rounding level)
            norms = G.norm(dim=1)
            assert (G @ (out @ G) >= -1e-8 * norms * (out.abs() @ norms)).all()

    check()
