// Shared definitions for the CPU (C++/OpenMP) and CUDA kernels of mtlsam_fast._C.
// No torch headers here: this file is included by .cpp and .cu translation units alike.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define MTLSAM_HD __host__ __device__ __forceinline__
#else
#define MTLSAM_HD inline
#endif

namespace mtlsam {

// The largest K the QP solver takes: its indices (j * ld + i into K x ld matrices, ld <= K + 8) are
// 32-bit ints, exact while K * ld < 2^31 (K <= 46340), with room to spare here. The binding refuses
// larger problems; the Python backends hand them to the torch reference.
constexpr int kQpMaxK = 1 << 15;

// Element type codes shared by the binding and the kernels.
enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11), the noise spec of mtlsam_fast/ops/philox.py:
// key (lo32 seed, hi32 seed), counter (lo32 n, hi32 n, 0, 0), first two output words.
// ---------------------------------------------------------------------------------------------
struct PhiloxWords {
  uint32_t r0, r1;
};

MTLSAM_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

MTLSAM_HD PhiloxWords philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    uint32_t hi_b, hi_a;
    uint32_t lo_b = mulhilo32(0xCD9E8D57u, c2, &hi_b);
    uint32_t lo_a = mulhilo32(0xD2511F53u, c0, &hi_a);
    uint32_t n0 = hi_b ^ c1 ^ k0;
    uint32_t n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{c0, c1};
}

// Box-Muller in fp32 exactly as the spec: u1 = ((r0>>8)+0.5)*2^-24, u2 = (r1>>8)*2^-24,
// z = sqrt(-2 ln u1) * cos(2 pi u2) (2 pi rounded to fp32, as torch does for a Python scalar).
MTLSAM_HD float philox_gaussian(uint64_t seed, uint64_t counter) {
  PhiloxWords w = philox4x32_10(seed, counter);
  const float inv24 = 5.9604644775390625e-08f;  // 2^-24
  float u1 = (static_cast<float>(w.r0 >> 8) + 0.5f) * inv24;
  float u2 = static_cast<float>(w.r1 >> 8) * inv24;
  float rad = sqrtf(-2.0f * logf(u1));
  return rad * cosf(6.2831854820251465f * u2);
}

// Segment lookup: the segment s with offsets[s] <= i < offsets[s + 1] (offsets non-decreasing,
// offsets[0] = 0, offsets[S] = P, empty segments skipped). Binary search, O(log S).
MTLSAM_HD int64_t find_segment(const int64_t* offsets, int64_t S, int64_t i) {
  int64_t lo = 0, hi = S;  // invariant: offsets[lo] <= i < offsets[hi]
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) >> 1;
    if (offsets[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace mtlsam
