"""Small multi-task networks: a shared convolutional trunk and one classification head per task.

``model(x)`` returns the list of K logit tensors. ``model.trunk`` holds the shared parameters and
``model.heads[k]`` the parameters of task k — the split the optimizers take::

    opt = mtlsam_fast.FMTL(model.shared_parameters(), task_params=model.task_parameters(), ...)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MultiTaskNet(nn.Module):
    """Conv3x3-BatchNorm-ReLU-MaxPool blocks until the feature map is at most 4x4 (channel width
    doubling from ``width``, capped at 8x), a shared fully connected layer of ``hidden`` units, and
    per task a two-layer head (``hidden -> head_hidden -> classes``)."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: Sequence[int],
        *,
        width: int = 32,
        hidden: int = 128,
        head_hidden: int = 64,
    ):
        super().__init__()
        c, h, w = in_shape
        if not num_classes:
            raise ValueError("num_classes must list at least one task")
        layers: list[nn.Module] = []
        ch = width
        while min(h, w) > 4:
            layers += [
                nn.Conv2d(c, ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(ch),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c, h, w = ch, h // 2, w // 2
            ch = min(ch * 2, width * 8)
        layers += [
            nn.Flatten(),
            nn.Linear(c * h * w, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        ]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden, head_hidden), nn.ReLU(inplace=True), nn.Linear(head_hidden, n)
            )
            for n in num_classes
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def task_parameters(self) -> list[list[nn.Parameter]]:
        return [list(h.parameters()) for h in self.heads]
