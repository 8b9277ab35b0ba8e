// Function table of one compiled variant (generic / AVX2) of the CPU kernels.
#pragma once

#include <cstdint>

namespace mtlsam {

struct CpuTable {
  void (*gram)(const void*, int, int64_t, int64_t, int64_t, float*, int);
  void (*diff_gram)(void*, const void*, int, int64_t, int64_t, int64_t, int64_t, float*, int);
  void (*segment_norms)(const void*, int, int64_t, int64_t, const int64_t*, int64_t, const void*, int, float*, int);
  void (*combine)(const float*, const void*, int64_t, int64_t, const float*, const void*, int64_t, int64_t, int,
                  int64_t, void*, int, int);
  void (*perturb)(void*, const void*, int, const void*, int, const float*, int64_t, const int64_t*, int64_t, bool,
                  const float*, int64_t, uint64_t, uint64_t, int64_t, int);
  void (*noise_stats)(uint64_t, uint64_t, const void*, int, const int64_t*, int64_t, float*, int);
  void (*gaussian_noise)(uint64_t, uint64_t, int64_t, float*, int);
  void (*philox_words)(uint64_t, uint64_t, int64_t, uint32_t*, int);
  void (*solve_qp)(const void*, const void*, const void*, const void*, int, int64_t, int, bool, int, double, void*,
                   int32_t*, int);
  void (*perturb_noise_stats)(void*, const void*, int, const float*, int64_t, uint64_t, uint64_t, const void*, int,
                              const int64_t*, int64_t, float*, int);
};

#define MTLSAM_CPU_TABLE(ns)                                                                           \
  CpuTable{&ns::gram,          &ns::diff_gram,    &ns::segment_norms, &ns::combine,  &ns::perturb, \
           &ns::noise_stats,   &ns::gaussian_noise, &ns::philox_words, &ns::solve_qp, \
           &ns::perturb_noise_stats}

namespace avx2 {
const CpuTable* table();  // nullptr when the variant was not compiled (non-x86 builds)
}

}  // namespace mtlsam
