"""The weighting interface: a K x K Gram matrix (plus losses or state) -> K task weights.

The update direction is ``d = weights^T G``. Weightings run on the Gram's device, never read a
tensor value on the host, and use fixed iteration budgets, so a whole aggregation step can be
captured in a CUDA graph or traced by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

Tensor = torch.Tensor


def check_gram(gram: Tensor) -> int:
    """Validate a Gram matrix from metadata only; returns K."""
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(
            f"gram must be a non-empty square K x K matrix, got shape {tuple(gram.shape)}"
        )
    if not gram.is_floating_point():
        raise TypeError(f"gram must be floating point, got {gram.dtype}")
    return gram.shape[0]


def check_nonnegative(**options: float) -> None:
    for name, value in options.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")


class Weighting:
    """Base class. Subclasses implement :meth:`weights`; :meth:`__call__` validates first."""

    #: registry name (``mtlsam_fast.weighting.get(name)``)
    name: ClassVar[str] = ""
    #: whether :meth:`weights` needs the K task losses
    needs_losses: ClassVar[bool] = False

    def __call__(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        K = check_gram(gram)
        if self.needs_losses or losses is not None:
            if losses is None:
                raise ValueError(
                    f"weighting {self.name!r} needs the K task losses: call w(gram, losses)"
                )
            if not isinstance(losses, torch.Tensor) or losses.shape != (K,):
                shape = (
                    tuple(losses.shape)
                    if isinstance(losses, torch.Tensor)
                    else type(losses).__name__
                )
                raise ValueError(
                    f"losses must be a tensor of shape ({K},) to match the {K}x{K} gram, "
                    f"got {shape}"
                )
            if losses.device != gram.device:
                raise ValueError(f"losses are on {losses.device}, gram on {gram.device}")
        return self.weights(gram, losses)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        """K weights (fp32, or fp64 for an fp64 Gram) on ``gram.device``."""
        raise NotImplementedError

    def init_state(self, num_tasks: int, device: torch.device) -> None:
        """Create now, for ``num_tasks`` tasks on ``device``, the state that the first call would
        create (a no-op for weightings without lazily created state). The optimizers call it when
        they are built, so that a fresh optimizer's ``state_dict()`` already has the structure of a
        trained one: ``torch.distributed.checkpoint`` loads a checkpoint into the structure of the
        destination's state dict. Raises if existing state holds a different number of tasks."""

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume bitwise (EMA buffers, random generators); empty when stateless."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"weighting {self.name!r} is stateless but got state keys {sorted(state)}"
            )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


def out_dtype(gram: Tensor) -> torch.dtype:
    return torch.float64 if gram.dtype == torch.float64 else torch.float32


def nan_if_nonfinite(weights: Tensor, gram: Tensor) -> Tensor:
    """NaN weights when the Gram holds NaN/Inf, so the optimizer's found-inf flag trips."""
    bad = ~torch.isfinite(gram).all()
    return torch.where(bad, torch.full_like(weights, float("nan")), weights)
