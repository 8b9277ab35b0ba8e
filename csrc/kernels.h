// Raw-pointer entry points of the CPU and CUDA kernels (no torch headers).
// Buffers are row-major with a unit column stride; `ld*` is the row stride in elements.
// Element types are the DType codes of common.h; accumulation is always fp32 (partials in fp64).
#pragma once

#include <cstdint>

namespace mtlsam {
namespace cpu {

const char* isa();  // "avx2" or "generic": the instruction set the hot loops were dispatched to

void gram(const void* G, int dt, int64_t K, int64_t P, int64_t ld, float* out, int nthreads);
void diff_gram(void* A, const void* B, int dt, int64_t K, int64_t P, int64_t lda, int64_t ldb, float* out,
               int nthreads);
// out[r, s] = || weight * x[r, offsets[s]:offsets[s+1]] ||_2 for R rows (weight may be null)
void segment_norms(const void* x, int dt, int64_t R, int64_t P, int64_t ldx, const int64_t* offsets, int64_t S,
                   const void* weight, int wdt, float* out, int nthreads);
// out = w^T G (+ w2^T H); G, H share the dtype gdt; out has dtype odt
void combine(const float* w, const void* G, int64_t K, int64_t ldg, const float* w2, const void* H, int64_t K2,
             int64_t ldh, int gdt, int64_t P, void* out, int odt, int nthreads);
// theta = backup + scale[s] * m(dir) + noise_scale[s] * z; theta/backup share tdt; dir may be null
void perturb(void* theta, const void* backup, int tdt, const void* dir, int ddt, const float* scale, int64_t nscale,
             const int64_t* offsets, int64_t S, bool adaptive, const float* noise_scale, int64_t nnoise,
             uint64_t seed, uint64_t noise_offset, int64_t P, int nthreads);
void gaussian_noise(uint64_t seed, uint64_t offset, int64_t n, float* out, int nthreads);
// out[0, s] = sum z^2, out[1, s] = sum ref * z over segment s
void noise_stats(uint64_t seed, uint64_t offset, const void* ref, int dt, int64_t P, const int64_t* offsets,
                 int64_t S, float* out, int nthreads);
// noise_stats, and in the same pass theta = backup + noise_scale[s] * z (one generation of z)
void perturb_noise_stats(void* theta, const void* backup, int tdt, const float* noise_scale, int64_t nnoise,
                         uint64_t seed, uint64_t offset, const void* ref, int rdt, const int64_t* offsets, int64_t S,
                         float* out, int nthreads);
void philox_words(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out, int nthreads);  // [n, 2] words r0, r1
// batch of B problems, gram [B, K, K], q / lower [B, K] (may be null), dt kF32 or kF64 for all; with
// norm_coef [B] (not null; simplex only) the norm objective q^T v + r sqrt(v^T Gamma v) (qp_solve_norm_one)
void solve_qp(const void* gram, const void* q, const void* lower, const void* norm_coef, int dt, int64_t B, int K,
              bool simplex, int max_iter, double tol, void* out, int32_t* iters, int nthreads);

}  // namespace cpu

#ifdef MTLSAM_WITH_CUDA
namespace cuda {

// All launches are asynchronous on `stream` (a cudaStream_t); no host synchronization.
// Workspace sizes (bytes) are given by the *_workspace functions; the caller allocates them.
int num_sms(int device);
int64_t gram_workspace(int64_t K, int64_t P, int num_sms);
void gram(const void* G, int dt, int64_t K, int64_t P, int64_t ld, float* out, void* ws, int num_sms, void* stream);
void diff_gram(void* A, const void* B, int dt, int64_t K, int64_t P, int64_t lda, int64_t ldb, float* out, void* ws,
               int num_sms, void* stream);
int64_t segment_workspace(int64_t R, int64_t P, int64_t S);
void segment_norms(const void* x, int dt, int64_t R, int64_t P, int64_t ldx, const int64_t* offsets, int64_t S,
                   const void* weight, int wdt, float* out, void* ws, void* stream);
void combine(const float* w, const void* G, int64_t K, int64_t ldg, const float* w2, const void* H, int64_t K2,
             int64_t ldh, int gdt, int64_t P, void* out, int odt, void* stream);
void perturb(void* theta, const void* backup, int tdt, const void* dir, int ddt, const float* scale, int64_t nscale,
             const int64_t* offsets, int64_t S, bool adaptive, const float* noise_scale, int64_t nnoise,
             uint64_t seed, uint64_t noise_offset, int64_t P, void* stream);
void gaussian_noise(uint64_t seed, uint64_t offset, int64_t n, float* out, void* stream);
void noise_stats(uint64_t seed, uint64_t offset, const void* ref, int dt, int64_t P, const int64_t* offsets,
                 int64_t S, float* out, void* ws, void* stream);
void philox_words(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out, void* stream);
int64_t qp_workspace(int64_t B, int K);  // bytes of global workspace solve_qp needs (0: shared memory only)
void solve_qp(const void* gram, const void* q, const void* lower, const void* norm_coef, int dt, int64_t B, int K,
              bool simplex, int max_iter, double tol, void* out, void* ws, void* stream);

// Fused aggregation (docs/ARCHITECTURE.md §6), launch 1: Gram partials over a persistent grid; the
// last CTA to finish (atomic ticket, reset by that CTA) reduces the partials in a fixed order,
// writes gram_out [K, K], solves the simplex QP (MGDA min-norm point) into weights[0:K] and
// writes ||weights^T G|| = sqrt(w^T Gamma w) into weights[K]. `ws` holds gram_workspace(K, P) bytes.
// `ticket` is one uint32 in device memory that must be 0 before the first call; the last CTA
// resets it, so consecutive calls (and CUDA-graph replays) work. One ticket per concurrent stream.
void fused_gram_qp(const void* G, int dt, int64_t K, int64_t P, int64_t ld, float* gram_out, float* weights,
                   void* ws, unsigned int* ticket, int num_sms, int max_iter, double tol, void* stream);
// launch 2: d = weights[0:K]^T G;  mode 0: out = d (dtype odt);  mode 1 (perturbed write):
// out = backup + scale[0] * d / weights[K] (SAM's rho * d / ||d||; d = 0 leaves out = backup);
// mode 2 (update): out = out - scale[0] * d.
void fused_combine_apply(const float* weights, const void* G, int dt, int64_t K, int64_t ld, int64_t P, int mode,
                         const float* scale, const void* backup, void* out, int odt, void* stream);

}  // namespace cuda
#endif

}  // namespace mtlsam
