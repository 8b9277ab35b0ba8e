"""The ``"cuda"`` backend: CUDA kernels of the compiled extension ``mtlsam_fast._C``.

Same functions and semantics as :mod:`.torch_backend` (the oracle). Every kernel launches on the
current CUDA stream, allocates its workspaces from the caching allocator, and never synchronizes
with the host, so these ops can be captured in a CUDA graph (warm up before capturing).

Kernels: Gram over a split-P persistent grid (128-bit loads when rows are 16-byte aligned, a fixed
per-CTA partial and a deterministic second pass; registers for K <= 8, shared-memory tiles for
K <= 64), fused difference + Gram, segmented norms, combine, perturb with Philox noise, noise
statistics, and the batched QP with one warp (K <= 64) or one CTA per problem (the
``__host__ __device__`` solver of ``csrc/qp_core.h`` that the CPU backend runs too). Fallbacks to
the torch backend: float64 buffers, K > 64 for the Gram, layouts without a unit column stride,
inputs that require grad (each through ``_registry.fallback``); ``solve_qp(..., norm_coef=...)``,
CAGrad's norm objective, runs in the QP kernel.

:class:`FusedAggregator` / :func:`fused_aggregate` expose the two-launch aggregation path of
docs/ARCHITECTURE.md §6 (MGDA weights without leaving the device). While ``torch.compile``
traces, the kernels are the custom ops of :mod:`._library` (``TRACEABLE``) and
``min_norm_aggregate`` composes gram, solve_qp and combine (the fused pair is not a custom op).
"""

from __future__ import annotations

import sys

import torch

from .. import _ext
from . import _registry
from . import cpu_backend as _k  # the device-agnostic wrappers around mtlsam_fast._C
from . import qp as _qp
from ._contract import compose_min_norm_aggregate

Tensor = torch.Tensor

TRACEABLE = True  # the kernels are torch custom ops while dynamo traces (_library)

MAX_GRAM_K = 64


def unavailable_reason(device_type: str) -> str | None:
    if device_type != "cuda":
        return "the 'cuda' backend runs on CUDA tensors only"
    mod = _ext.get()
    if mod is None:
        return _ext.error()
    if not mod.has_cuda():
        return (
            "mtlsam_fast._C was built without CUDA kernels "
            "(no CUDA toolkit at build time, or MTLSAM_NO_CUDA=1)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def gram(G: Tensor) -> Tensor:
    if G.shape[0] > MAX_GRAM_K:
        return _registry.fallback("gram", "cuda", f"K = {G.shape[0]} > {MAX_GRAM_K}").gram(G)
    return _k.gram(G)


def diff_gram(A: Tensor, B: Tensor) -> Tensor:
    if A.shape[0] > MAX_GRAM_K:
        reason = f"K = {A.shape[0]} > {MAX_GRAM_K}"
        return _registry.fallback("diff_gram", "cuda", reason).diff_gram(A, B)
    return _k.diff_gram(A, B)


segment_norms = _k.segment_norms
combine = _k.combine
perturb = _k.perturb
gaussian_noise = _k.gaussian_noise  # one fused launch (CUDA logf / cosf: last-ulp differences)
noise_stats = _k.noise_stats
perturb_noise_stats = _k.perturb_noise_stats  # CUDA tensors: perturb, then noise_stats
solve_qp = _k.solve_qp


def philox_words(
    seed: int, offset: int, n: int, device: torch.device | str = "cuda"
) -> tuple[Tensor, Tensor]:
    return _k.philox_words(seed, offset, n, device)


_MODES = {"direction": 0, "perturb": 1, "update": 2}


class FusedAggregator:
    """MGDA aggregation of a ``[K, P]`` CUDA gradient buffer in two kernel launches
    (docs/ARCHITECTURE.md §6).

    Launch 1 computes Gram partials over a persistent grid; the last CTA to finish (an atomic
    ticket that it resets, so repeated calls and CUDA-graph replays work) sums the partials in a
    fixed order into ``gram`` (``[K, K]`` fp32), solves the simplex QP (the min-norm point of the
    convex hull, exactly as ``solve_qp(gram)``) into ``weights`` and writes
    ``dnorm = ||weights^T G|| = sqrt(w^T Gamma w)``. Launch 2 forms ``d = weights^T G``, fused
    with the write selected by ``mode``:

    * ``"direction"``: ``out = d`` (in ``out``'s dtype);
    * ``"perturb"``:  ``out = backup + scale * d / dnorm`` (SAM: ``scale = rho``; ``d = 0`` leaves
      ``out = backup``);
    * ``"update"``:   ``out -= scale * d`` (``scale``: the learning rate).

    ``scale`` is a 1-element fp32 device tensor, so a schedule can change it between graph replays.
    Weights, Gram and norm never leave the device; nothing synchronizes with the host. The buffers
    are allocated here, once: build (and call once) before capturing a graph, and use one
    aggregator per concurrent stream (they share the ticket). ``weights``, ``dnorm`` and ``gram``
    are overwritten by every call. Requires K <= 64 and fp32/bf16/fp16 ``G`` with a unit column
    stride.
    """

    def __init__(
        self,
        K: int,
        P: int,
        device: torch.device | str = "cuda",
        *,
        max_iter: int = _qp.DEFAULT_MAX_ITER,
        tol: float = _qp.DEFAULT_TOL,
    ) -> None:
        reason = unavailable_reason(torch.device(device).type)
        if reason is not None:
            raise RuntimeError(f"FusedAggregator needs the CUDA kernels: {reason}")
        if not 1 <= K <= MAX_GRAM_K:
            raise ValueError(f"FusedAggregator supports 1 <= K <= {MAX_GRAM_K}, got {K}")
        self.K, self.P, self.max_iter, self.tol = int(K), int(P), int(max_iter), float(tol)
        self.device = torch.device(device)
        if self.device.index is None:  # "cuda" means the current device; tensors report "cuda:N"
            self.device = torch.device(self.device.type, torch.cuda.current_device())
        C = _ext.get()
        assert C is not None  # unavailable_reason() above found the extension
        like = torch.empty(0, device=self.device)
        self._ws = torch.empty(
            C.fused_workspace_bytes(self.K, self.P, like), dtype=torch.uint8, device=self.device
        )
        self._ticket = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.gram = torch.zeros(self.K, self.K, dtype=torch.float32, device=self.device)
        self._wbuf = torch.zeros(self.K + 1, dtype=torch.float32, device=self.device)
        self.weights = self._wbuf[: self.K]
        self.dnorm = self._wbuf[self.K]

    def __call__(
        self,
        G: Tensor,
        out: Tensor | None = None,
        *,
        mode: str = "direction",
        scale: Tensor | None = None,
        backup: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run both launches; returns ``(weights, dnorm)`` (device tensors, overwritten next
        call)."""
        if G.dim() != 2 or tuple(G.shape) != (self.K, self.P) or G.device != self.device:
            raise ValueError(
                f"G must be a [{self.K}, {self.P}] tensor on {self.device}, "
                f"got {tuple(G.shape)} on {G.device}"
            )
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        if not _k._rows_ok(G):
            raise ValueError("G needs a unit column stride and non-overlapping rows")
        if out is None and mode != "direction":
            raise ValueError(f"mode {mode!r} needs out")
        if mode != "direction" and scale is None:
            raise ValueError(f"mode {mode!r} needs scale (a 1-element fp32 device tensor)")
        if mode == "perturb" and backup is None:
            raise ValueError("mode 'perturb' needs backup")
        C = _ext.get()
        assert C is not None  # loaded: __init__ checked it
        C.fused_gram_qp(G, self.gram, self._wbuf, self._ws, self._ticket, self.max_iter, self.tol)
        if out is not None:
            C.fused_combine_apply(
                self._wbuf, G, _MODES[mode], None if scale is None else _k._f32(scale), backup, out
            )
        return self.weights, self.dnorm


_aggregators: dict[tuple, FusedAggregator] = {}


def fused_aggregate(
    G: Tensor,
    out: Tensor | None = None,
    *,
    mode: str = "direction",
    scale: Tensor | None = None,
    backup: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:class:`FusedAggregator` with buffers cached per (device, stream, K, P); see its contract."""
    return _aggregator(G)(G, out, mode=mode, scale=scale, backup=backup)


def _aggregator(
    G: Tensor, max_iter: int = _qp.DEFAULT_MAX_ITER, tol: float = _qp.DEFAULT_TOL
) -> FusedAggregator:
    key = (
        G.device,
        torch.cuda.current_stream(G.device).cuda_stream,
        G.shape[0],
        G.shape[1],
        max_iter,
        tol,
    )
    agg = _aggregators.get(key)
    if agg is None:
        agg = _aggregators[key] = FusedAggregator(
            G.shape[0], G.shape[1], G.device, max_iter=max_iter, tol=tol
        )
    return agg


def min_norm_aggregate(
    G: Tensor, out: Tensor, subtract: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    """``ops.min_norm_aggregate`` through a cached :class:`FusedAggregator` (mode ``"direction"``,
    or ``"update"`` with scale 1 for ``subtract``). Inputs it does not take (fp64, K > 64, rows
    without a unit column stride), and while dynamo traces: this backend's gram, solve_qp and
    combine."""
    K, P = G.shape
    if (
        torch.compiler.is_compiling()
        or G.dtype == torch.float64
        or out.dtype == torch.float64
        or K > MAX_GRAM_K
        or not _k._rows_ok(G)
        or (P > 1 and out.stride(0) != 1)
    ):
        return compose_min_norm_aggregate(_self, G, out, subtract, max_iter, tol)
    agg = _aggregator(G, max_iter, tol)
    if subtract:
        agg(G, out, mode="update", scale=_unit_scale(G.device))
    else:
        agg(G, out, mode="direction")
    return agg.weights, agg.gram


_unit_scales: dict[torch.device, Tensor] = {}


def _unit_scale(device: torch.device) -> Tensor:
    t = _unit_scales.get(device)
    if t is None:
        t = _unit_scales[device] = torch.ones(1, dtype=torch.float32, device=device)
    return t


_self = sys.modules[__name__]  # this module, as the backend the compositions call
