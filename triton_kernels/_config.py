"""Launch configurations for the Triton kernels: candidates, a small cached autotuner, pinning.

* Under ``TRITON_INTERPRET=1`` every kernel uses one small fixed configuration (autotuning in the
  interpreter is slow and meaningless).
* On a GPU the first call for a key ``(kernel family, device, dtype, K-bucket, P-bucket)`` times
  every candidate once (CUDA events; this is the warm-up, it may synchronize) and caches the
  fastest. Calls made while a CUDA graph is being captured never tune: they use the cached choice,
  or the first candidate when nothing is cached. Warm up before capturing.
* Pinning, for reproducible benchmarks: ``pin_config("gram", BLOCK_P=256, num_warps=8, waves=4)``
  or the environment variable
  ``MTLSAM_TRITON_PIN="gram:BLOCK_P=256,num_warps=8,waves=4;combine:..."``. A pinned family never
  tunes. ``clear_cache()`` forgets tuned choices (and cached workspaces).

Candidates target Hopper (H100/H200: 132 SMs, 3.35-4.8 TB/s): enough bytes in flight per SM to
cover the latency of HBM3 (several 128-bit loads per thread, 2-8 resident programs per SM); the
same configurations are sane on A100 (108 SMs), where the tuner simply picks among them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

Config = dict[str, int]

#: candidates per kernel family (GPU). Keys: BLOCK_P (columns per tile), num_warps, waves
#: (persistent programs per SM), KC (rows per chunk for combine), num_stages.
CANDIDATES: dict[str, list[Config]] = {
    # Gram, K <= 8 fp32 broadcast path and all tensor-core paths; BLOCK_P shrinks with K (see
    # gram.py)
    "gram": [
        {"BLOCK_P": 512, "num_warps": 8, "waves": 4, "num_stages": 3},
        {"BLOCK_P": 256, "num_warps": 4, "waves": 8, "num_stages": 3},
        {"BLOCK_P": 1024, "num_warps": 8, "waves": 2, "num_stages": 3},
        {"BLOCK_P": 256, "num_warps": 8, "waves": 4, "num_stages": 4},
        {"BLOCK_P": 128, "num_warps": 4, "waves": 8, "num_stages": 4},
    ],
    "combine": [
        {"BLOCK_P": 1024, "num_warps": 4, "KC": 8},
        {"BLOCK_P": 2048, "num_warps": 8, "KC": 4},
        {"BLOCK_P": 512, "num_warps": 4, "KC": 16},
    ],
    "segment": [  # segment norms, perturb, noise stats (one block of columns per program)
        {"BLOCK_P": 2048, "num_warps": 8},
        {"BLOCK_P": 4096, "num_warps": 8},
        {"BLOCK_P": 1024, "num_warps": 4},
    ],
    "noise": [
        {"BLOCK_P": 1024, "num_warps": 4},
        {"BLOCK_P": 2048, "num_warps": 8},
    ],
    "qp": [
        {"num_warps": 4},
        {"num_warps": 8},
        {"num_warps": 2},
    ],
}

#: the single configuration used under the interpreter (small blocks: programs run serially).
INTERPRETER_CONFIG: dict[str, Config] = {
    "gram": {"BLOCK_P": 32, "num_warps": 1, "waves": 3, "num_stages": 1},
    "combine": {"BLOCK_P": 64, "num_warps": 1, "KC": 8},
    "segment": {"BLOCK_P": 32, "num_warps": 1},
    "noise": {"BLOCK_P": 128, "num_warps": 1},
    "qp": {"num_warps": 1},
}

_pinned: dict[str, Config] = {}
_tuned: dict[tuple, Config] = {}
_sm_count: dict[int, int] = {}


def _parse_env() -> dict[str, Config]:
    spec = os.environ.get("MTLSAM_TRITON_PIN", "").strip()
    out: dict[str, Config] = {}
    if not spec:
        return out
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            fam, kv = part.split(":", 1)
            cfg = {
                k.strip(): int(v)
                for k, v in (item.split("=") for item in kv.split(",") if item.strip())
            }
        except ValueError:
            raise ValueError(
                f"MTLSAM_TRITON_PIN: cannot parse {part!r}; expected 'family:KEY=int,KEY=int'"
            ) from None
        out[fam.strip()] = cfg
    return out


def pin_config(family: str, **cfg: int) -> None:
    """Use ``cfg`` (merged over the first candidate) for every launch of ``family``; no tuning."""
    if family not in CANDIDATES:
        raise ValueError(f"unknown kernel family {family!r}; known: {', '.join(CANDIDATES)}")
    _pinned[family] = {**CANDIDATES[family][0], **{k: int(v) for k, v in cfg.items()}}


def unpin_config(family: str | None = None) -> None:
    if family is None:
        _pinned.clear()
    else:
        _pinned.pop(family, None)


def clear_cache() -> None:
    """Forget tuned configurations (workspaces are cleared separately: ``_workspace.clear()``)."""
    _tuned.clear()


def pinned(family: str) -> Config | None:
    if family in _pinned:
        return _pinned[family]
    env = _parse_env()
    if family in env:
        return {**CANDIDATES[family][0], **env[family]}
    return None


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def bucket(n: int) -> int:
    """Power-of-two bucket of ``n`` (tuning keys stay few)."""
    return max(int(n), 1).bit_length()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def shares_storage(t: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether ``t`` lives in the same storage as any of ``others`` (then re-running is unsafe)."""
    ptr = t.untyped_storage().data_ptr()
    return any(o is not None and o.untyped_storage().data_ptr() == ptr for o in others)


def choose(
    family: str,
    key: tuple,
    device: torch.device,
    run: Callable[[Config], Any],
    candidates: list[Config] | None = None,
    idempotent: bool = True,
) -> Config:
    """The configuration for ``family``/``key``: interpreter > pinned > cached > tuned now.

    ``run(cfg)`` launches the kernel with ``cfg``; it is called repeatedly while tuning, so a call
    that is not idempotent (an output aliasing an input) passes ``idempotent=False`` and gets the
    cached choice or the first candidate. Tuning happens only on CUDA, outside graph capture.
    """
    if INTERPRET or device.type != "cuda":
        return INTERPRETER_CONFIG[family]
    p = pinned(family)
    if p is not None:
        return p
    cands = candidates if candidates is not None else CANDIDATES[family]
    full_key = (family, device.index, *key)
    if full_key in _tuned:
        return _tuned[full_key]
    if _capturing(device) or len(cands) == 1 or not idempotent:
        return cands[0]
    best, best_t = cands[0], float("inf")
    for cfg in cands:
        try:
            run(cfg)  # compile + warm
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                run(cfg)
            end.record()
            end.synchronize()
            t = start.elapsed_time(end)
        except Exception:  # a candidate that does not compile here (registers, shared memory)
            continue
        if t < best_t:
            best, best_t = cfg, t
    _tuned[full_key] = best
    return best


def tuned_configs() -> dict[tuple, Config]:
    """What the tuner chose so far (for benchmark reports)."""
    return dict(_tuned)
