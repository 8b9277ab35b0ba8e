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
    for numel, offset in ((-1, 0), (1, -1)):
        with pytest.raises(ValueError, match="non-negative"):
            ops.gaussian_noise(3, offset, numel, backend="torch")
