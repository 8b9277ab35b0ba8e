"""Multi-task optimizers with the ``torch.optim`` interface.

* :class:`MTLOptimizer` -- gradient aggregation (1 forward, K backwards per step);
* :class:`FMTL` -- F-MTL, arXiv 2211.13723 (1 + K forwards, 2K backwards);
* :class:`SAMO` -- SAMO, arXiv 2507.07883 (1 + 3K forwards of which 2K without autograd, 1 + K
  backwards).

``step(closure)``: ``closure()`` returns the K task losses at the current weights and never calls
``backward``; the optimizer runs the backward passes. See :class:`~.base.MTLBase`.
"""

from .aggregate import MTLOptimizer
from .base import MTLBase, frozen_running_stats
from .fmtl import FMTL
from .samo import SAMO

__all__ = ["FMTL", "SAMO", "MTLBase", "MTLOptimizer", "frozen_running_stats"]
