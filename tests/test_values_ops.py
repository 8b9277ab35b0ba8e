"""The ops front end's promises that property tests do not reach: an invalid argument is named
in the error (docs/ARCHITECTURE.md §3.1), and the edge sizes that are valid return their exact
(empty) result instead of raising."""

from __future__ import annotations

import pytest
import torch

from mtlsam_fast import ops

P = 6
OFFSETS = torch.tensor([0, 2, P])


@pytest.mark.parametrize(
    "argument,kwargs",
    [
        ("theta", dict(theta=torch.zeros(2, P))),
        ("backup", dict(backup=torch.zeros(2, P))),
        ("direction", dict(direction=torch.zeros(2, P))),
        ("theta", dict(theta=torch.zeros(P, dtype=torch.int32))),
        ("direction", dict(direction=torch.zeros(P, dtype=torch.int64))),
    ],
)
def test_perturb_names_the_invalid_argument(argument, kwargs):
    args = dict(
        theta=torch.zeros(P),
        backup=torch.zeros(P),
        offsets=OFFSETS,
        direction=torch.zeros(P),
        scale=torch.ones(2),
    )
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=rf"^{argument} "):
        ops.perturb(**args, backend="torch")


def test_gaussian_noise_edge_sizes():
    empty = ops.gaussian_noise(3, 0, 0, backend="torch")
    assert empty.shape == (0,) and empty.dtype == torch.float32
    one = ops.gaussian_noise(3, 5, 1, backend="torch")
    assert torch.equal(one, ops.gaussian_noise(3, 0, 6, backend="torch")[5:])
    for numel, offset, message in ((-1, 0, "numel must be non-negative"), (1, -1, "offset must")):
        with pytest.raises(ValueError, match=message):
            ops.gaussian_noise(3, offset, numel, backend="torch")


def test_philox_known_answer():
    """Philox4x32-10 with key (0, 0) and counter (0, 0, 0, 0): the published known-answer vector
    starts 0x6627e8d5, 0xe169c58d (docs/ARCHITECTURE.md §5 keys and counts this way)."""
    x0, x1 = ops.philox.philox4x32(0, torch.tensor([0], dtype=torch.int64))
    assert [int(x0[0]) & 0xFFFFFFFF, int(x1[0]) & 0xFFFFFFFF] == [0x6627E8D5, 0xE169C58D]


@pytest.mark.parametrize("rows", [None, 2])
def test_segment_norms_across_many_summation_blocks(rows):
    """Segments that start and end inside and across the reference's 1024-column partial sums
    (tests/test_ops.py stays below one block)."""
    P = 5000
    offsets = torch.tensor([0, 3, 1023, 1024, 1025, 3000, 3001, P])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows or 1, P, generator=g, dtype=torch.float64)
    x = x[0] if rows is None else x
    out = ops.segment_norms(x, offsets, backend="torch")
    expected = torch.stack(
        [x[..., offsets[i] : offsets[i + 1]].square().sum(-1).sqrt() for i in range(7)], -1
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_solve_qp_lower_bound_only_under_its_constraint():
    gram = torch.eye(3, dtype=torch.float64)
    lower = torch.full((3,), 0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="lower is only used"):
        ops.solve_qp(gram, lower=lower, backend="torch")
    v = ops.solve_qp(gram, lower=lower, constraint="lower", backend="torch")
    assert (v >= lower - 1e-9).all()
