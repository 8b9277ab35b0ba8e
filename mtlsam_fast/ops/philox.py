"""Counter-based Gaussian noise: the specification every backend reproduces.

Element ``j`` of the noise stream for ``(seed, offset)`` is

* Philox4x32-10 (Salmon et al., SC'11) with key ``(lo32(seed), hi32(seed))`` and counter
  ``(lo32(offset + j), hi32(offset + j), 0, 0)`` -- exactly Triton's ``tl.philox`` with 32-bit
  counters -- giving words ``r0, r1``;
* ``u1 = ((r0 >> 8) + 0.5) * 2**-24`` in (0, 1) and ``u2 = (r1 >> 8) * 2**-24`` in [0, 1), both
  exact in fp32;
* Box-Muller: ``z = sqrt(-2 ln u1) * cos(2 pi u2)`` evaluated in fp32.

Because the value depends only on ``(seed, offset + j)``, SAMO regenerates its noise instead of
storing it, and any slice of the stream can be produced independently. Backends agree up to the
last-ulp differences of ``log``/``cos``.
"""

from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
_M32 = 0xFFFFFFFF
_M16 = 0xFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of constant ``a`` and uint32 values ``b``.

    ``b`` is held in int64; splitting it in 16-bit halves keeps every product below 2**48.
    """
    b_hi = b >> 16
    b_lo = b & _M16
    p_hi = a * b_hi  # < 2**48
    p_lo = a * b_lo  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & _M16) << 16) + p_lo) & _M32
    return hi, lo


def philox4x32(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First two output words of Philox4x32-10 for 64-bit counters (an int64 tensor)."""
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1


def gaussian_from_counter(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """Standard normal fp32 values for int64 ``counter`` values (see the module docstring)."""
    r0, r1 = philox4x32(seed, counter)
    u1 = ((r0 >> 8).to(torch.float32) + 0.5) * (2.0**-24)
    u2 = (r1 >> 8).to(torch.float32) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
