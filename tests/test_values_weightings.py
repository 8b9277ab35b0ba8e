"""The weights of the simple weightings and of MGDA's normalizations against numbers derived by
hand in this file (closed forms written out with `math`, never the library's own functions).

The contract and property suites check invariances that a wrong constant, a swapped operand or a
dropped term still satisfies (a uniform 0.5 instead of 1/K is permutation-equivariant); these
tests pin the values themselves.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtlsam_fast import weighting

F64 = torch.float64


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=F64)


def close(actual: torch.Tensor, expected: list[float], rtol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, t(*expected), rtol=rtol, atol=rtol * 1e-3)


# A Gram that is not diagonal, so that a mutation of the off-diagonal normalization shows:
# g1 = (2, 0), g2 = (1, 2)  ->  Γ = [[4, 2], [2, 5]].
GRAM = t(4.0, 2.0, 2.0, 5.0).view(2, 2)


def min_norm_2(a: float, b: float, c: float) -> tuple[float, float]:
    """argmin over the simplex of v1² a + 2 v1 v2 c + v2² b (K = 2): v1 = clip((b-c)/(a+b-2c))."""
    v1 = min(max((b - c) / (a + b - 2 * c), 0.0), 1.0)
    return v1, 1.0 - v1


@pytest.mark.parametrize("K", [1, 2, 3, 7])
def test_linear_scalarization_is_one_over_k(K):
    close(weighting.get("ls")(torch.eye(K, dtype=F64)), [1.0 / K] * K)


def test_mgda_none_is_the_closed_form_min_norm_point():
    v1, v2 = min_norm_2(4.0, 5.0, 2.0)  # (0.6, 0.4)
    close(weighting.get("mgda")(GRAM), [v1, v2], rtol=1e-6)


def test_mgda_l2_normalizes_by_gradient_norms():
    n1, n2 = 2.0, math.sqrt(5.0)
    v1, v2 = min_norm_2(1.0, 1.0, 2.0 / (n1 * n2))
    close(weighting.get("mgda", normalization="l2")(GRAM), [v1 / n1, v2 / n2], rtol=1e-6)


def test_mgda_loss_normalizes_by_losses():
    L1, L2 = 1.0, 2.0
    v1, v2 = min_norm_2(4.0 / L1**2, 5.0 / L2**2, 2.0 / (L1 * L2))  # (1/13, 12/13)
    out = weighting.get("mgda", normalization="loss")(GRAM, t(L1, L2))
    close(out, [v1 / L1, v2 / L2], rtol=1e-6)


def test_mgda_loss_plus_normalizes_by_loss_times_norm():
    n1, n2 = 1.0 * 2.0, 2.0 * math.sqrt(5.0)
    v1, v2 = min_norm_2(4.0 / n1**2, 5.0 / n2**2, 2.0 / (n1 * n2))
    out = weighting.get("mgda", normalization="loss+")(GRAM, t(1.0, 2.0))
    close(out, [v1 / n1, v2 / n2], rtol=1e-6)


def test_mgda_zero_loss_normalizes_by_one():
    """A zero normalizer is replaced by 1 (no division by zero)."""
    L2 = 2.0
    v1, v2 = min_norm_2(4.0, 5.0 / L2**2, 2.0 / L2)  # interior: (1/13, 12/13)
    out = weighting.get("mgda", normalization="loss")(GRAM, t(0.0, L2))
    close(out, [v1, v2 / L2], rtol=1e-6)


def test_rlw_is_a_softmax_of_standard_normals():
    """K = 2: logit(w1) = z1 - z2 ~ N(0, 2) and w1 + w2 = 1 (uniform draws, a unit variance or
    a shifted mean fail the moments; 1000 draws: the mean's sd is 0.045, the variance's 0.09)."""
    w = weighting.get("rlw", seed=3)
    draws = torch.stack([w(torch.eye(2, dtype=F64)) for _ in range(1000)])
    close(draws.sum(1), [1.0] * 1000)
    logit = torch.log(draws[:, 0] / draws[:, 1])
    assert abs(logit.mean().item()) < 0.2
    assert abs(logit.var().item() - 2.0) < 0.4
    assert (draws[1:] != draws[:-1]).all()  # a fresh draw every call


def test_dwa_weights_from_the_last_two_epoch_averages():
    T = 2.0
    w = weighting.get("dwa", temperature=T)
    eye = torch.eye(2, dtype=F64)
    close(w(eye, t(1.0, 2.0)), [1.0, 1.0])  # epoch 0: ones
    w.end_epoch()
    close(w(eye, t(7.0, 9.0)), [1.0, 1.0])  # epoch 1: still ones (one average known)
    close(w(eye, t(3.0, 3.0)), [1.0, 1.0])
    w(eye, t(float("nan"), 1.0))  # a non-finite call is not counted in the average
    w.end_epoch()  # averages: epoch 0 (1, 2), epoch 1 (5, 6)
    r1, r2 = 5.0 / 1.0, 6.0 / 2.0
    e1, e2 = math.exp(r1 / T), math.exp(r2 / T)
    expected = [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]
    close(w(eye, t(1.0, 1.0)), expected)
    close(w(eye, t(1.0, 1.0)), expected)  # fixed within the epoch
    w.end_epoch()  # averages: (5, 6), (1, 1)
    r1, r2 = 1.0 / 5.0, 1.0 / 6.0
    e1, e2 = math.exp(r1 / T), math.exp(r2 / T)
    close(w(eye, t(1.0, 1.0)), [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])


def test_dwa_zero_previous_average_gives_ratio_one():
    w = weighting.get("dwa", temperature=1.0)
    eye = torch.eye(2, dtype=F64)
    w(eye, t(0.0, 1.0))
    w.end_epoch()
    w(eye, t(4.0, 3.0))
    w.end_epoch()  # ratios: 1 (0 before), 3
    e1, e2 = math.exp(1.0), math.exp(3.0)
    close(w(eye, t(1.0, 1.0)), [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])


def adam_first_steps(grads: list[float], lr: float, b1=0.9, b2=0.999, eps=1e-8) -> list[float]:
    """The parameter change of torch.optim.Adam after each step, for a scalar parameter."""
    m = v = 0.0
    out = []
    for k, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr / (1 - b1**k) * m / (math.sqrt(v) / math.sqrt(1 - b2**k) + eps))
    return out


def test_uw_weights_and_its_log_variance_step():
    """UW: weights exp(-s)/2, dS/ds = 1/2 - exp(-s) L / 2, s from 0 by Adam (lr 0.1)."""
    w = weighting.get("uw", lr=0.1)
    L = t(3.0, 0.25)
    close(w(torch.eye(2, dtype=F64), L), [0.5, 0.5])
    s = [adam_first_steps([0.5 - 0.5 * Li], 0.1)[0] for Li in (3.0, 0.25)]
    close(w(torch.eye(2, dtype=F64), L), [0.5 * math.exp(-si) for si in s])


def test_imtl_l_weights_and_its_scale_step():
    """IMTL-L: weights exp(s), dS/ds = exp(s) L - 1, s from init by Adam."""
    w = weighting.get("imtl_l", lr=0.05, init=0.5)
    L = t(3.0, 0.25)
    a = math.exp(0.5)
    close(w(torch.eye(2, dtype=F64), L), [a, a])
    s = [0.5 + adam_first_steps([a * Li - 1.0], 0.05)[0] for Li in (3.0, 0.25)]
    close(w(torch.eye(2, dtype=F64), L), [math.exp(si) for si in s])


def test_imtl_l_adam_step_adds_l2_weight_decay_to_the_gradient():
    """Adam's L2 weight decay (torch.optim.Adam's): the step is taken on dS/ds + wd · s. Adam's
    first step is ±lr whatever the gradient's size, so wd = 2 is chosen to flip task 2's sign:
    dS/ds = e^0.5 · 0.25 - 1 = -0.59, plus 2 · 0.5 = +0.41."""
    w = weighting.get("imtl_l", lr=0.05, init=0.5, weight_decay=2.0)
    L = t(3.0, 0.25)
    a = math.exp(0.5)
    w(torch.eye(2, dtype=F64), L)
    s = [0.5 + adam_first_steps([a * Li - 1.0 + 2.0 * 0.5], 0.05)[0] for Li in (3.0, 0.25)]
    assert s[1] < 0.5  # the decay, not the loss, drives task 2's step
    close(w(torch.eye(2, dtype=F64), L), [math.exp(si) for si in s])


def test_gls_is_the_geometric_mean_over_k_times_the_loss():
    L = [2.0, 8.0, 0.5]
    S = (2.0 * 8.0 * 0.5) ** (1 / 3)
    close(weighting.get("gls")(torch.eye(3, dtype=F64), t(*L)), [S / (3 * x) for x in L])
    bad = weighting.get("gls")(torch.eye(2, dtype=F64), t(0.0, 1.0))
    assert torch.isnan(bad).all()


def test_stch_is_the_preference_times_a_softmax():
    lam, L, z, mu = [0.25, 0.75], [2.0, 1.0], [0.5, 0.0], 0.5
    y = [lam[i] * (L[i] - z[i]) / mu for i in range(2)]
    e = [math.exp(v) for v in y]
    w = weighting.get("stch", mu=mu, pref_vector=t(*lam), reference=t(*z))
    close(w(torch.eye(2, dtype=F64), t(*L)), [lam[i] * e[i] / sum(e) for i in range(2)])
    y = [0.5 * x for x in L]  # defaults: lambda = 1/2, z = 0, mu = 1
    e = [math.exp(v) for v in y]
    out = weighting.get("stch")(torch.eye(2, dtype=F64), t(*L))
    close(out, [0.5 * e[i] / sum(e) for i in range(2)])


def test_cosmos_is_the_preference_minus_the_cosine_gradient():
    r, L, lam = [0.25, 0.75], [3.0, 4.0], 2.0
    nr, nl = math.hypot(*r), 5.0
    rl = r[0] * L[0] + r[1] * L[1]
    expected = [r[i] - lam * (r[i] / (nr * nl) - rl * L[i] / (nr * nl**3)) for i in range(2)]
    w = weighting.get("cosmos", lambda_=lam, pref_vector=t(*r))
    close(w(torch.eye(2, dtype=F64), t(*L)), expected)
    close(w(torch.eye(2, dtype=F64), t(0.0, 0.0)), r)  # L = 0: the preference itself


def test_pbi_is_the_direction_plus_theta_times_the_unit_residual():
    pref, L, z, theta = [1.0, 3.0], [2.0, 1.0], [0.5, 0.5], 5.0
    nu = math.hypot(*pref)
    u = [x / nu for x in pref]
    f = [L[i] - z[i] for i in range(2)]
    d1 = f[0] * u[0] + f[1] * u[1]
    p = [f[i] - d1 * u[i] for i in range(2)]
    n = math.hypot(*p)
    w = weighting.get("pbi", theta=theta, pref_vector=t(*pref), reference=t(*z))
    close(w(torch.eye(2, dtype=F64), t(*L)), [u[i] + theta * p[i] / n for i in range(2)])
    # on the preference ray the residual has no direction: the weights are u
    on_ray = t(0.5 + 2 * u[0], 0.5 + 2 * u[1])
    close(w(torch.eye(2, dtype=F64), on_ray), u)


def test_krum_picks_the_gradient_closest_to_its_neighbours_at_small_scale():
    """Scalar gradients 0, 0.1, 0.2, 0.9 (all squared distances below 1): with n_byzantine = 0
    each scores its K - 2 = 2 nearest squared distances: 0.05, 0.02, 0.05, 1.13, so Krum takes
    the second."""
    g = t(0.0, 0.1, 0.2, 0.9)
    gram = g[:, None] * g[None, :]
    close(weighting.get("krum", n_byzantine=0, n_selected=1)(gram), [0.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("name,option", [("famo", "min_losses"), ("stch", "pref_vector")])
def test_vector_options_are_checked_when_set(name, option):
    """At construction and on reassignment (preferences change between steps)."""
    bad = t(float("nan"), 1.0)
    with pytest.raises(ValueError, match=option):
        weighting.get(name, **{option: bad})
    w = weighting.get(name, **{option: t(0.5, 0.5)})
    with pytest.raises(ValueError, match=option):
        setattr(w, option, bad)
    torch.testing.assert_close(getattr(w, option), t(0.5, 0.5))


@pytest.mark.parametrize("name", weighting.names())
def test_every_weighting_reports_its_registry_name(name):
    """`name` is what state_dicts, errors and the CLI print: the class behind a registry entry
    carries that same name (aliases to one class, e.g. dualproj, included)."""
    assert weighting.get(name).name == name
