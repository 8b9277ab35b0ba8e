"""The flat layout's values for hand-built parameter lists, a single parameter included
(docs/ARCHITECTURE.md §2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mtlsam_fast.buffers import FlatLayout, flatten_parameters


def test_layout_of_hand_built_parameters():
    params = [torch.zeros(2, 3), torch.zeros(()), torch.zeros(4)]
    layout = FlatLayout(params)
    assert [(s.offset, s.numel, tuple(s.shape)) for s in layout.segments] == [
        (0, 6, (2, 3)),
        (6, 1, ()),
        (7, 4, (4,)),
    ]
    assert layout.numel == 11 and len(layout) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):  # a layout cannot be edited in place
        layout.segments[0].offset = 1  # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_single_parameter_flattens_and_gathers(dtype):
    p = torch.nn.Parameter(torch.arange(6, dtype=dtype).view(2, 3))
    flat = flatten_parameters([p])
    assert flat.dtype == dtype and flat.shape == (6,)
    assert p.data.data_ptr() == flat.data_ptr()
    layout = FlatLayout([p])
    out = layout.gather([torch.full((2, 3), 2.0, dtype=dtype)])
    assert out.dtype == dtype and torch.equal(out, torch.full((6,), 2.0, dtype=dtype))
    wide = layout.gather([p.detach()], dtype=torch.float32)
    assert wide.dtype == torch.float32 and torch.equal(wide, torch.arange(6.0))
