// CPU (OpenMP) kernels of mtlsam_fast._C: run-time ISA dispatch, the QP driver, the noise stream.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_table.h"
#include "kernels.h"
#include "qp_core.h"

#define MTLSAM_CPU_NS generic
#include "cpu_kernels_impl.h"
#undef MTLSAM_CPU_NS

namespace mtlsam {
namespace cpu {

namespace {

// MTLSAM_CPU_ISA=generic forces the generic variant (how the tests cover it on AVX2 machines).
bool cpu_has_avx2() {
  const char* forced = std::getenv("MTLSAM_CPU_ISA");
  if (forced && std::strcmp(forced, "generic") == 0) return false;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const CpuTable& kernels() {
  static const CpuTable generic_table = MTLSAM_CPU_TABLE(mtlsam::generic);
  static const CpuTable* chosen = (cpu_has_avx2() && avx2::table()) ? avx2::table() : &generic_table;
  return *chosen;
}

}  // namespace

const char* isa() { return (cpu_has_avx2() && avx2::table()) ? "avx2" : "generic"; }

void gram(const void* G, int dt, int64_t K, int64_t P, int64_t ld, float* out, int nthreads) {
  kernels().gram(G, dt, K, P, ld, out, nthreads);
}

void diff_gram(void* A, const void* B, int dt, int64_t K, int64_t P, int64_t lda, int64_t ldb, float* out,
               int nthreads) {
  kernels().diff_gram(A, B, dt, K, P, lda, ldb, out, nthreads);
}

void segment_norms(const void* x, int dt, int64_t R, int64_t P, int64_t ldx, const int64_t* offsets, int64_t S,
                   const void* weight, int wdt, float* out, int nthreads) {
  (void)P;
  kernels().segment_norms(x, dt, R, ldx, offsets, S, weight, weight ? wdt : dt, out, nthreads);
}

void combine(const float* w, const void* G, int64_t K, int64_t ldg, const float* w2, const void* H, int64_t K2,
             int64_t ldh, int gdt, int64_t P, void* out, int odt, int nthreads) {
  kernels().combine(w, G, K, ldg, w2, H, K2, ldh, gdt, P, out, odt, nthreads);
}

void perturb(void* theta, const void* backup, int tdt, const void* dir, int ddt, const float* scale, int64_t nscale,
             const int64_t* offsets, int64_t S, bool adaptive, const float* noise_scale, int64_t nnoise,
             uint64_t seed, uint64_t noise_offset, int64_t P, int nthreads) {
  kernels().perturb(theta, backup, tdt, dir, dir ? ddt : tdt, scale, nscale, offsets, S, adaptive, noise_scale,
                    nnoise, seed, noise_offset, P, nthreads);
}

void noise_stats(uint64_t seed, uint64_t offset, const void* ref, int dt, int64_t P, const int64_t* offsets,
                 int64_t S, float* out, int nthreads) {
  (void)P;
  kernels().noise_stats(seed, offset, ref, dt, offsets, S, out, nthreads);
}

void perturb_noise_stats(void* theta, const void* backup, int tdt, const float* noise_scale, int64_t nnoise,
                         uint64_t seed, uint64_t offset, const void* ref, int rdt, const int64_t* offsets, int64_t S,
                         float* out, int nthreads) {
  kernels().perturb_noise_stats(theta, backup, tdt, noise_scale, nnoise, seed, offset, ref, rdt, offsets, S, out,
                                nthreads);
}

void gaussian_noise(uint64_t seed, uint64_t offset, int64_t n, float* out, int nthreads) {
  kernels().gaussian_noise(seed, offset, n, out, nthreads);
}

void philox_words(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out, int nthreads) {
  kernels().philox_words(seed, offset, n, out, nthreads);
}

void solve_qp(const void* gram, const void* q, const void* lower, const void* norm_coef, int dt, int64_t B, int K,
              bool simplex, int max_iter, double tol, void* out, int32_t* iters, int nthreads) {
  kernels().solve_qp(gram, q, lower, norm_coef, dt, B, K, simplex, max_iter, tol, out, iters, nthreads);
}

}  // namespace cpu
}  // namespace mtlsam
