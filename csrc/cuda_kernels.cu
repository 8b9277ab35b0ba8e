// CUDA kernels of mtlsam_fast._C. No torch headers: raw pointers in, launches on the given
// stream, no host synchronization, no allocation (workspaces come from the caller), so every
// entry point is CUDA-graph capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"
#include "kernels.h"
#define MTLSAM_QP_NAMESPACE qp_cuda  // its own instantiation: qp_ld differs from the CPU builds'
#include "qp_core.h"

namespace mtlsam {
namespace cuda {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("mtlsam_fast._C CUDA ") + what + ": " + cudaGetErrorString(e));
}
#define MTLSAM_CHECK_LAUNCH(name) check(cudaGetLastError(), name)

// ---- element types: storage type S and conversions ---------------------------------------------
struct F32 {
  using S = float;
  static __device__ __forceinline__ float to_f(S v) { return v; }
  static __device__ __forceinline__ S from_f(float v) { return v; }
};
struct BF16 {
  using S = uint16_t;
  static __device__ __forceinline__ float to_f(S v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }
  static __device__ __forceinline__ S from_f(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};
struct F16 {
  using S = uint16_t;
  static __device__ __forceinline__ float to_f(S v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ S from_f(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

#define MTLSAM_CUDA_DISPATCH(dt, T, ...)                                    \
  switch (dt) {                                                             \
    case kF32: { using T = F32; __VA_ARGS__; break; }                       \
    case kBF16: { using T = BF16; __VA_ARGS__; break; }                     \
    case kF16: { using T = F16; __VA_ARGS__; break; }                       \
    default: throw std::runtime_error("mtlsam_fast._C: unsupported dtype"); \
  }

template <class T>
struct VecN {
  static constexpr int N = 16 / sizeof(typename T::S);  // elements per 128-bit access
};

template <class T>
__device__ __forceinline__ void load16(const typename T::S* p, float* f) {
  using S = typename T::S;
  constexpr int N = VecN<T>::N;
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  S s[N];
  memcpy(s, &u, 16);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = T::to_f(s[i]);
}

template <class T>
__device__ __forceinline__ void store16(typename T::S* p, const float* f) {
  using S = typename T::S;
  constexpr int N = VecN<T>::N;
  S s[N];
#pragma unroll
  for (int i = 0; i < N; ++i) s[i] = T::from_f(f[i]);
  uint4 u;
  memcpy(&u, s, 16);
  *reinterpret_cast<uint4*>(p) = u;
}

bool aligned16(const void* p, int64_t ld, int64_t elt) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && ((ld * elt) % 16 == 0);
}

int64_t elt_size(int dt) { return dt == kF32 ? 4 : (dt == kF64 ? 8 : 2); }

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;

// ---- teams for the QP core: one warp (K <= kQpWarpMaxK) or one CTA per problem ---------------------
// Reductions are barriers too (as BlockTeam's __syncthreads), and every lane of a warp gets the same
// bits from the xor butterfly (each stage adds the same two values, in either order: addition
// commutes), so a branch on a reduced value is uniform.
struct WarpTeam {
  __device__ int rank() const { return threadIdx.x & 31; }
  __device__ int size() const { return 32; }
  __device__ void sync() const { __syncwarp(); }
  __device__ double sum(double v) const {
    __syncwarp();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  __device__ double max(double v) const {
    __syncwarp();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
  }
};

struct BlockTeam {
  double* red;  // shared scratch, >= 32 doubles
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ double sum(double v) const {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < (blockDim.x >> 5); ++w) t += red[w];
    return t;
  }
  __device__ double max(double v) const {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    double t = red[0];
    for (int w = 1; w < (blockDim.x >> 5); ++w) t = fmax(t, red[w]);
    return t;
  }
};

// ---- Gram partials ---------------------------------------------------------------------------------
// Grid: persistent, G_blocks = min(kBlocksPerSm * SMs, ceil(P / 2048)). Each CTA accumulates a
// K x K fp32 partial over its columns and writes it (lower triangle) to part[blockIdx.x].
int gram_blocks(int64_t P, int num_sms) {
  int64_t b = (P + 2047) / 2048;
  int64_t cap = static_cast<int64_t>(kBlocksPerSm) * (num_sms > 0 ? num_sms : 1);
  if (b > cap) b = cap;
  return static_cast<int>(b < 1 ? 1 : b);
}

// Small K (<= KMAX <= 8): every thread keeps the KMAX(KMAX+1)/2 pair sums in registers and walks the
// columns in 128-bit vectors (scalar when the rows are not 16-byte aligned).
template <class T, int KMAX, bool DIFF>
__device__ void gram_partial_reg(typename T::S* A, const typename T::S* B, int K, int64_t P, int64_t lda,
                                 int64_t ldb, bool vec, float* part) {
  constexpr int NP = KMAX * (KMAX + 1) / 2;
  constexpr int N = VecN<T>::N;
  float acc[NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) acc[p] = 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = vec ? P / N : 0;
  for (int64_t c = tid; c < nvec; c += stride) {
    float f[KMAX][N];
#pragma unroll
    for (int i = 0; i < KMAX; ++i) {
      if (i < K) {
        typename T::S* a = A + i * lda + c * N;
        load16<T>(a, f[i]);
        if (DIFF) {
          float g[N];
          load16<T>(B + i * ldb + c * N, g);
#pragma unroll
          for (int n = 0; n < N; ++n) f[i][n] = T::to_f(T::from_f(f[i][n] - g[n]));
          store16<T>(a, f[i]);
        }
      } else {
#pragma unroll
        for (int n = 0; n < N; ++n) f[i][n] = 0.f;
      }
    }
    int p = 0;
#pragma unroll
    for (int i = 0; i < KMAX; ++i)
#pragma unroll
      for (int j = 0; j <= i; ++j, ++p)
#pragma unroll
        for (int n = 0; n < N; ++n) acc[p] += f[i][n] * f[j][n];
  }
  for (int64_t e = nvec * N + tid; e < P; e += stride) {  // tail (and the unaligned case)
    float f[KMAX];
#pragma unroll
    for (int i = 0; i < KMAX; ++i) {
      f[i] = 0.f;
      if (i < K) {
        if (DIFF) {
          const typename T::S r = T::from_f(T::to_f(A[i * lda + e]) - T::to_f(B[i * ldb + e]));
          A[i * lda + e] = r;
          f[i] = T::to_f(r);
        } else {
          f[i] = T::to_f(A[i * lda + e]);
        }
      }
    }
    int p = 0;
#pragma unroll
    for (int i = 0; i < KMAX; ++i)
#pragma unroll
      for (int j = 0; j <= i; ++j, ++p) acc[p] += f[i] * f[j];
  }
  // block reduction of every pair: warp shuffles, then warps in a fixed order
  __shared__ float red[kThreads / 32][NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    float v = acc[p];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5][p] = v;
  }
  __syncthreads();
  if (threadIdx.x < NP) {
    int i = 0, t = threadIdx.x;
    while (t > i) t -= ++i;  // pair index -> (i, j = t)
    if (i < K) {
      float s = 0.f;
      for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += red[w][threadIdx.x];
      part[static_cast<int64_t>(blockIdx.x) * K * K + i * K + t] = s;
    }
  }
}

// Larger K (<= 64): tiles of K x 32 columns in shared memory (upcast right after the load), each
// thread owns up to 9 pairs.
constexpr int kTileW = 32;
constexpr int kTileMaxK = 64;
constexpr int kTilePairsPerThread = (kTileMaxK * (kTileMaxK + 1) / 2 + kThreads - 1) / kThreads;

template <class T, bool DIFF>
__device__ void gram_partial_tile(typename T::S* A, const typename T::S* B, int K, int64_t P, int64_t lda,
                                  int64_t ldb, float* part) {
  __shared__ float tile[kTileMaxK][kTileW + 1];
  const int npairs = K * (K + 1) / 2;
  int pi[kTilePairsPerThread], pj[kTilePairsPerThread];
  float acc[kTilePairsPerThread];
#pragma unroll
  for (int q = 0; q < kTilePairsPerThread; ++q) {
    int t = threadIdx.x + q * kThreads, i = 0;
    while (t > i) t -= ++i;
    pi[q] = i;
    pj[q] = t;
    acc[q] = 0.f;
  }
  const int64_t ntiles = (P + kTileW - 1) / kTileW;
  for (int64_t tl = blockIdx.x; tl < ntiles; tl += gridDim.x) {
    const int64_t c0 = tl * kTileW;
    __syncthreads();
    for (int e = threadIdx.x; e < K * kTileW; e += blockDim.x) {
      const int i = e / kTileW, w = e % kTileW;
      const int64_t col = c0 + w;
      float v = 0.f;
      if (col < P) {
        if (DIFF) {
          const typename T::S r = T::from_f(T::to_f(A[i * lda + col]) - T::to_f(B[i * ldb + col]));
          A[i * lda + col] = r;
          v = T::to_f(r);
        } else {
          v = T::to_f(A[i * lda + col]);
        }
      }
      tile[i][w] = v;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kTilePairsPerThread; ++q) {
      if (threadIdx.x + q * kThreads < npairs) {
        const float* a = tile[pi[q]];
        const float* b = tile[pj[q]];
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kTileW; ++w) s += a[w] * b[w];
        acc[q] += s;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kTilePairsPerThread; ++q)
    if (threadIdx.x + q * kThreads < npairs)
      part[static_cast<int64_t>(blockIdx.x) * K * K + pi[q] * K + pj[q]] = acc[q];
}

template <class T, int VARIANT, bool DIFF>  // VARIANT: 4 or 8 (registers), 0 (shared-memory tiles)
__device__ __forceinline__ void gram_partial(typename T::S* A, const typename T::S* B, int K, int64_t P,
                                             int64_t lda, int64_t ldb, bool vec, float* part) {
  if constexpr (VARIANT == 0) {
    gram_partial_tile<T, DIFF>(A, B, K, P, lda, ldb, part);
  } else {
    gram_partial_reg<T, VARIANT, DIFF>(A, B, K, P, lda, ldb, vec, part);
  }
}

template <class T, int VARIANT, bool DIFF>
__global__ void __launch_bounds__(kThreads) gram_partial_kernel(typename T::S* A, const typename T::S* B, int K,
                                                                int64_t P, int64_t lda, int64_t ldb, bool vec,
                                                                float* part) {
  gram_partial<T, VARIANT, DIFF>(A, B, K, P, lda, ldb, vec, part);
}

// Second pass: a fixed-order sum of the per-CTA partials (fp64 accumulator), symmetric output.
__device__ __forceinline__ void gram_reduce_block(const float* part, int nblocks, int K, float* out) {
  for (int e = threadIdx.x; e < K * K; e += blockDim.x) {
    const int i = e / K, j = e % K;
    if (j > i) continue;
    double s = 0.0;
    for (int b = 0; b < nblocks; ++b) s += __ldcg(part + static_cast<int64_t>(b) * K * K + e);
    out[i * K + j] = static_cast<float>(s);
    out[j * K + i] = static_cast<float>(s);
  }
}

__global__ void gram_reduce_kernel(const float* part, int nblocks, int K, float* out) {
  gram_reduce_block(part, nblocks, K, out);
}

int gram_variant(int64_t K) { return K <= 4 ? 4 : (K <= 8 ? 8 : 0); }

template <bool DIFF>
void launch_gram(void* A, const void* B, int dt, int64_t K, int64_t P, int64_t lda, int64_t ldb, float* out,
                 void* ws, int num_sms, cudaStream_t st) {
  if (K > kTileMaxK) throw std::runtime_error("mtlsam_fast._C: CUDA gram supports K <= 64");
  const int nb = gram_blocks(P, num_sms);
  float* part = static_cast<float*>(ws);
  const int64_t es = elt_size(dt);
  const bool vec = aligned16(A, lda, es) && (!DIFF || aligned16(B, ldb, es));
  const int var = gram_variant(K);
  MTLSAM_CUDA_DISPATCH(dt, T, {
    using S = typename T::S;
    S* a = static_cast<S*>(A);
    const S* b = static_cast<const S*>(B);
    if (var == 4)
      gram_partial_kernel<T, 4, DIFF><<<nb, kThreads, 0, st>>>(a, b, (int)K, P, lda, ldb, vec, part);
    else if (var == 8)
      gram_partial_kernel<T, 8, DIFF><<<nb, kThreads, 0, st>>>(a, b, (int)K, P, lda, ldb, vec, part);
    else
      gram_partial_kernel<T, 0, DIFF><<<nb, kThreads, 0, st>>>(a, b, (int)K, P, lda, ldb, vec, part);
  });
  MTLSAM_CHECK_LAUNCH("gram partials");
  gram_reduce_kernel<<<1, kThreads, 0, st>>>(part, nb, (int)K, out);
  MTLSAM_CHECK_LAUNCH("gram reduce");
}

// ---- segmented reductions (norms, noise statistics) ---------------------------------------------------
// Pass 1: CTA (chunk c, row r) walks the segments that intersect its chunk of kSegChunk columns and
// block-reduces each piece; a segment's piece in the chunk where it starts goes to first[r, s], the
// piece of the segment that straddles the chunk's start goes to cont[r, c]. Pass 2 adds, per
// segment, first + the cont of the chunks it spans, in order: deterministic.
constexpr int64_t kSegChunk = 4096;

template <int NV>
__device__ __forceinline__ void block_sum(float* v, float* red /* [32][NV] */) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0)
#pragma unroll
    for (int k = 0; k < NV; ++k) red[(threadIdx.x >> 5) * NV + k] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    float s = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += red[w * NV + k];
    v[k] = s;
  }
}

// MODE 0: sum (w x)^2 over rows of x; MODE 1: [sum z^2, sum ref z] with z the Philox noise.
template <int MODE, class T, class TW>
__global__ void __launch_bounds__(kThreads) seg_pass1_kernel(const typename T::S* x, int64_t ldx,
                                                             const typename TW::S* weight, const int64_t* offsets,
                                                             int64_t S, int64_t P, uint64_t seed, uint64_t noff,
                                                             float* first, float* cont, int64_t nchunks) {
  constexpr int NV = MODE == 0 ? 1 : 2;
  __shared__ float red[32 * NV];
  const int64_t c = blockIdx.x, r = blockIdx.y;
  const int64_t start = c * kSegChunk, end = min(P, start + kSegChunk);
  const typename T::S* row = x + r * ldx;
  for (int64_t s = find_segment(offsets, S, start); s < S && offsets[s] < end; ++s) {
    const int64_t b = max(start, offsets[s]), e = min(end, offsets[s + 1]);
    float v[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) v[k] = 0.f;
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
      if (MODE == 0) {
        float t = T::to_f(row[i]);
        if (weight) t *= TW::to_f(weight[i]);
        v[0] += t * t;
      } else {
        const float z = philox_gaussian(seed, noff + static_cast<uint64_t>(i));
        v[0] += z * z;
        v[NV - 1] += z * T::to_f(row[i]);
      }
    }
    block_sum<NV>(v, red);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (offsets[s] >= start) first[(k * gridDim.y + r) * S + s] = v[k];
        else cont[(k * gridDim.y + r) * nchunks + c] = v[k];
      }
    }
  }
}

template <int MODE>
__global__ void seg_pass2_kernel(const int64_t* offsets, int64_t S, int64_t R, const float* first, const float* cont,
                                 int64_t nchunks, float* out) {
  constexpr int NV = MODE == 0 ? 1 : 2;
  const int64_t n = NV * R * S;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t kr = t / S, s = t % S;  // kr = k * R + r
    const int64_t b = offsets[s], e = offsets[s + 1];
    double acc = 0.0;
    if (e > b) {
      acc = first[kr * S + s];
      for (int64_t c = b / kSegChunk + 1; c <= (e - 1) / kSegChunk; ++c) acc += cont[kr * nchunks + c];
    }
    out[t] = MODE == 0 ? static_cast<float>(sqrt(acc)) : static_cast<float>(acc);
  }
}

int grid_for(int64_t n, int64_t per_block) {
  int64_t g = (n + per_block - 1) / per_block;
  if (g > 65535LL * 32) g = 65535LL * 32;
  return static_cast<int>(g < 1 ? 1 : g);
}

// ---- combine ---------------------------------------------------------------------------------------
template <class T, class O>
__global__ void __launch_bounds__(kThreads) combine_kernel(const float* w, const typename T::S* G, int K, int64_t ldg,
                                                           const float* w2, const typename T::S* H, int K2,
                                                           int64_t ldh, int64_t P, bool vec,
                                                           typename O::S* out) {
  constexpr int N = VecN<T>::N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = vec ? P / N : 0;
  for (int64_t c = tid; c < nvec; c += stride) {
    float acc[N], f[N];
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] = 0.f;
    for (int k = 0; k < K; ++k) {
      load16<T>(G + k * ldg + c * N, f);
      const float wk = w[k];
#pragma unroll
      for (int n = 0; n < N; ++n) acc[n] += wk * f[n];
    }
    if (H)
      for (int k = 0; k < K2; ++k) {
        load16<T>(H + k * ldh + c * N, f);
        const float wk = w2[k];
#pragma unroll
        for (int n = 0; n < N; ++n) acc[n] += wk * f[n];
      }
#pragma unroll
    for (int n = 0; n < N; ++n) out[c * N + n] = O::from_f(acc[n]);
  }
  for (int64_t e = nvec * N + tid; e < P; e += stride) {
    float acc = 0.f;
    for (int k = 0; k < K; ++k) acc += w[k] * T::to_f(G[k * ldg + e]);
    if (H)
      for (int k = 0; k < K2; ++k) acc += w2[k] * T::to_f(H[k * ldh + e]);
    out[e] = O::from_f(acc);
  }
}

// ---- perturb / noise ---------------------------------------------------------------------------------
template <class T, class D>
__global__ void __launch_bounds__(kThreads) perturb_kernel(typename T::S* theta, const typename T::S* backup,
                                                           const typename D::S* dir, const float* scale,
                                                           int64_t nscale, const int64_t* offsets, int64_t S,
                                                           bool adaptive, const float* noise_scale, int64_t nnoise,
                                                           uint64_t seed, uint64_t noff, int64_t P) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < P;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool per_seg = (dir && nscale > 1) || (noise_scale && nnoise > 1);
    const int64_t s = per_seg ? find_segment(offsets, S, i) : 0;
    const float b = T::to_f(backup[i]);
    float v = b;
    if (dir) {
      float st = D::to_f(dir[i]) * scale[nscale == 1 ? 0 : s];
      if (adaptive) st = st * b * b;
      v = v + st;
    }
    if (noise_scale) v = v + philox_gaussian(seed, noff + static_cast<uint64_t>(i)) * noise_scale[nnoise == 1 ? 0 : s];
    theta[i] = T::from_f(v);
  }
}

__global__ void gaussian_kernel(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = philox_gaussian(seed, offset + static_cast<uint64_t>(i));
}

__global__ void philox_kernel(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const PhiloxWords w = philox4x32_10(seed, offset + static_cast<uint64_t>(i));
    out[2 * i] = w.r0;
    out[2 * i + 1] = w.r1;
  }
}

// ---- QP: one warp or one CTA per problem -----------------------------------------------------------------
// Up to K = 64 a warp solves each problem. The solver's steps are chains of short loops (triangular
// sweeps over s <= K entries with a barrier per entry, reductions): on an H100 a CTA of 128 threads
// took ~12 us per active-set step at K = 64, about 150 cycles per barrier-separated entry, which a
// warp's __syncwarp and register shuffles should cut (not measured yet). Larger K: a CTA of kQpThreads.
constexpr int kQpThreads = 128;
constexpr int kQpWarpMaxK = 64;
constexpr int64_t kQpSmemLimit = 96 * 1024;

int64_t qp_smem_bytes(int K) { return (qp_workspace_doubles(K) + 32) * 8; }

template <class T, bool WARP>
__global__ void __launch_bounds__(kQpThreads) qp_kernel(const T* gram, const T* q, const T* lower, const T* norm_coef,
                                                        int K, bool simplex, int max_iter, double tol, T* out,
                                                        double* gws) {
  extern __shared__ double smem[];
  const int64_t b = blockIdx.x, KK = static_cast<int64_t>(K) * K;
  double* ws = gws ? gws + b * qp_workspace_doubles(K) : smem + 32;
  const T *g = gram + b * KK, *qb = q ? q + b * K : nullptr, *lb = lower ? lower + b * K : nullptr;
  if (norm_coef) {  // uniform: the same pointer for every thread
    const double r = static_cast<double>(norm_coef[b]);
    if (WARP)
      qp_solve_norm_one(WarpTeam{}, K, g, qb, r, max_iter, tol, ws, out + b * K);
    else
      qp_solve_norm_one(BlockTeam{smem}, K, g, qb, r, max_iter, tol, ws, out + b * K);
  } else if (WARP) {
    qp_solve_one(WarpTeam{}, K, g, qb, lb, simplex, max_iter, tol, ws, out + b * K);
  } else {
    qp_solve_one(BlockTeam{smem}, K, g, qb, lb, simplex, max_iter, tol, ws, out + b * K);
  }
}

// ---- fused aggregation, launch 1: Gram partials -> last CTA: reduce + QP + ||d|| --------------------------
// At least two CTAs per SM for the memory-bound Gram phase: at most 128 registers a thread. (Without
// the bound ptxas gave this kernel 254 -- for the QP, which runs in one CTA -- so one CTA of 8 warps
// per SM streamed G; the QP phase may spill to L1-cached local memory instead.)
template <class T, int VARIANT>
__global__ void __launch_bounds__(kThreads, 2) fused_gram_qp_kernel(const typename T::S* G, int K, int64_t P,
                                                                 int64_t ld, bool vec, float* part,
                                                                 unsigned int* ticket, float* gram_out,
                                                                 float* weights, double* qp_gws, int max_iter,
                                                                 double tol) {
  extern __shared__ double smem[];
  __shared__ bool is_last;
  gram_partial<T, VARIANT, false>(const_cast<typename T::S*>(G), nullptr, K, P, ld, 0, vec, part);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  gram_reduce_block(part, gridDim.x, K, gram_out);
  __syncthreads();
  double* ws = qp_gws ? qp_gws : smem + 32;
  if (threadIdx.x < 32)  // the first warp solves (K <= 64 = kQpWarpMaxK here), the others wait
    qp_solve_one(WarpTeam{}, K, static_cast<const float*>(gram_out), static_cast<const float*>(nullptr),
                 static_cast<const float*>(nullptr), true, max_iter, tol, ws, weights);
  __syncthreads();
  BlockTeam team{smem};
  // ||w^T G||^2 = w^T Gamma w, kept on the device for the normalization in launch 2
  double s = 0.0;
  for (int e = threadIdx.x; e < K * K; e += blockDim.x)
    s += static_cast<double>(weights[e / K]) * gram_out[e] * weights[e % K];
  s = team.sum(s);
  if (threadIdx.x == 0) {
    weights[K] = static_cast<float>(sqrt(s > 0 ? s : 0.0));
    *ticket = 0u;  // self-reset for the next call / graph replay
  }
}

// ---- fused aggregation, launch 2: d = w^T G, then write / perturb / update ------------------------------
template <class T, class O>
__global__ void __launch_bounds__(kThreads) fused_apply_kernel(const float* weights, const typename T::S* G, int K,
                                                               int64_t ld, int64_t P, int mode, const float* scale,
                                                               const typename O::S* backup, typename O::S* out) {
  float coef = 1.f;
  if (mode == 1) {
    const float dn = weights[K];
    coef = dn > 0.f ? scale[0] / dn : 0.f;
  } else if (mode == 2) {
    coef = -scale[0];
  }
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < P;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float d = 0.f;
    for (int k = 0; k < K; ++k) d += weights[k] * T::to_f(G[k * ld + e]);
    float v;
    if (mode == 0) v = d;
    else if (mode == 1) v = O::to_f(backup[e]) + coef * d;
    else v = O::to_f(out[e]) + coef * d;
    out[e] = O::from_f(v);
  }
}

}  // namespace

// ===================================================================================================
int num_sms(int device) {
  int n = 0;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "device attribute");
  return n;
}

int64_t gram_workspace(int64_t K, int64_t P, int num_sms) {
  return static_cast<int64_t>(gram_blocks(P, num_sms)) * K * K * 4 + qp_workspace_doubles(static_cast<int>(K)) * 8 + 64;
}

void gram(const void* G, int dt, int64_t K, int64_t P, int64_t ld, float* out, void* ws, int nsm, void* stream) {
  launch_gram<false>(const_cast<void*>(G), nullptr, dt, K, P, ld, 0, out, ws, nsm, static_cast<cudaStream_t>(stream));
}

void diff_gram(void* A, const void* B, int dt, int64_t K, int64_t P, int64_t lda, int64_t ldb, float* out, void* ws,
               int nsm, void* stream) {
  launch_gram<true>(A, B, dt, K, P, lda, ldb, out, ws, nsm, static_cast<cudaStream_t>(stream));
}

int64_t segment_workspace(int64_t R, int64_t P, int64_t S) {
  const int64_t nchunks = (P + kSegChunk - 1) / kSegChunk;
  return 2 * R * (S + nchunks) * 4 + 64;
}

void segment_norms(const void* x, int dt, int64_t R, int64_t P, int64_t ldx, const int64_t* offsets, int64_t S,
                   const void* weight, int wdt, float* out, void* ws, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t nchunks = (P + kSegChunk - 1) / kSegChunk;
  float* first = static_cast<float*>(ws);
  float* cont = first + R * S;
  if (nchunks > 0) {
    dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(R));
    MTLSAM_CUDA_DISPATCH(dt, T, MTLSAM_CUDA_DISPATCH(weight ? wdt : dt, TW, seg_pass1_kernel<0, T, TW><<<grid, kThreads, 0, st>>>(
        static_cast<const typename T::S*>(x), ldx, static_cast<const typename TW::S*>(weight), offsets, S, P, 0, 0,
        first, cont, nchunks)));
    MTLSAM_CHECK_LAUNCH("segment_norms pass 1");
  }
  seg_pass2_kernel<0><<<grid_for(R * S, kThreads), kThreads, 0, st>>>(offsets, S, R, first, cont, nchunks, out);
  MTLSAM_CHECK_LAUNCH("segment_norms pass 2");
}

void noise_stats(uint64_t seed, uint64_t offset, const void* ref, int dt, int64_t P, const int64_t* offsets,
                 int64_t S, float* out, void* ws, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t nchunks = (P + kSegChunk - 1) / kSegChunk;
  float* first = static_cast<float*>(ws);
  float* cont = first + 2 * S;
  if (nchunks > 0) {
    dim3 grid(static_cast<unsigned>(nchunks), 1);
    MTLSAM_CUDA_DISPATCH(dt, T, seg_pass1_kernel<1, T, T><<<grid, kThreads, 0, st>>>(
        static_cast<const typename T::S*>(ref), 0, nullptr, offsets, S, P, seed, offset, first, cont, nchunks));
    MTLSAM_CHECK_LAUNCH("noise_stats pass 1");
  }
  seg_pass2_kernel<1><<<grid_for(2 * S, kThreads), kThreads, 0, st>>>(offsets, S, 1, first, cont, nchunks, out);
  MTLSAM_CHECK_LAUNCH("noise_stats pass 2");
}

void combine(const float* w, const void* G, int64_t K, int64_t ldg, const float* w2, const void* H, int64_t K2,
             int64_t ldh, int gdt, int64_t P, void* out, int odt, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t es = elt_size(gdt);
  const bool vec = aligned16(G, ldg, es) && (!H || aligned16(H, ldh, es));
  const int grid = grid_for(P / (16 / es) + 1, kThreads);
  MTLSAM_CUDA_DISPATCH(gdt, T, MTLSAM_CUDA_DISPATCH(odt, O, combine_kernel<T, O><<<grid, kThreads, 0, st>>>(
      w, static_cast<const typename T::S*>(G), (int)K, ldg, w2, static_cast<const typename T::S*>(H), (int)K2, ldh, P,
      vec, static_cast<typename O::S*>(out))));
  MTLSAM_CHECK_LAUNCH("combine");
}

void perturb(void* theta, const void* backup, int tdt, const void* dir, int ddt, const float* scale, int64_t nscale,
             const int64_t* offsets, int64_t S, bool adaptive, const float* noise_scale, int64_t nnoise,
             uint64_t seed, uint64_t noise_offset, int64_t P, void* stream) {
  if (P == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  MTLSAM_CUDA_DISPATCH(tdt, T, MTLSAM_CUDA_DISPATCH(dir ? ddt : tdt, D, perturb_kernel<T, D><<<grid_for(P, kThreads), kThreads, 0, st>>>(
      static_cast<typename T::S*>(theta), static_cast<const typename T::S*>(backup),
      static_cast<const typename D::S*>(dir), scale, nscale, offsets, S, adaptive, noise_scale, nnoise, seed,
      noise_offset, P)));
  MTLSAM_CHECK_LAUNCH("perturb");
}

void gaussian_noise(uint64_t seed, uint64_t offset, int64_t n, float* out, void* stream) {
  if (n == 0) return;
  gaussian_kernel<<<grid_for(n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(seed, offset, n, out);
  MTLSAM_CHECK_LAUNCH("gaussian_noise");
}

void philox_words(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out, void* stream) {
  if (n == 0) return;
  philox_kernel<<<grid_for(n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(seed, offset, n, out);
  MTLSAM_CHECK_LAUNCH("philox_words");
}

template <class T>
void launch_qp(const T* gram, const T* q, const T* lower, const T* norm_coef, int64_t B, int K, bool simplex,
               int max_iter, double tol, T* out, double* gws, cudaStream_t st) {
  const int64_t smem = gws ? 32 * 8 : qp_smem_bytes(K);
  const bool warp = K <= kQpWarpMaxK;
  const auto kernel = warp ? qp_kernel<T, true> : qp_kernel<T, false>;
  // The opt-in limit is the most any launch of this kernel asks for, not this launch's need: set per
  // call to the launch's own size, two host threads solving different K could lower it between the
  // other's set and launch (an invalid-argument launch error). Setting the same value is idempotent.
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kQpSmemLimit)),
          "qp shared memory");
  kernel<<<static_cast<unsigned>(B), warp ? 32 : kQpThreads, smem, st>>>(gram, q, lower, norm_coef, K, simplex,
                                                                        max_iter, tol, out, gws);
  MTLSAM_CHECK_LAUNCH("solve_qp");
}

int64_t qp_workspace(int64_t B, int K) { return qp_smem_bytes(K) > kQpSmemLimit ? B * qp_workspace_doubles(K) * 8 : 0; }

void solve_qp(const void* gram, const void* q, const void* lower, const void* norm_coef, int dt, int64_t B, int K,
              bool simplex, int max_iter, double tol, void* out, void* ws, void* stream) {
  if (B == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  double* gws = qp_smem_bytes(K) > kQpSmemLimit ? static_cast<double*>(ws) : nullptr;
  if (dt == kF64)
    launch_qp(static_cast<const double*>(gram), static_cast<const double*>(q), static_cast<const double*>(lower),
              static_cast<const double*>(norm_coef), B, K, simplex, max_iter, tol, static_cast<double*>(out), gws, st);
  else
    launch_qp(static_cast<const float*>(gram), static_cast<const float*>(q), static_cast<const float*>(lower),
              static_cast<const float*>(norm_coef), B, K, simplex, max_iter, tol, static_cast<float*>(out), gws, st);
}

void fused_gram_qp(const void* G, int dt, int64_t K, int64_t P, int64_t ld, float* gram_out, float* weights, void* ws,
                   unsigned int* ticket, int nsm, int max_iter, double tol, void* stream) {
  if (K > kTileMaxK) throw std::runtime_error("mtlsam_fast._C: fused aggregation supports K <= 64");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int nb = gram_blocks(P, nsm);
  float* part = static_cast<float*>(ws);
  const int64_t part_bytes = static_cast<int64_t>(nb) * K * K * 4;
  // the QP workspace of the last CTA: shared memory when small, else global (after the partials)
  const bool small = qp_smem_bytes(static_cast<int>(K)) <= 16 * 1024;
  double* qp_gws = small ? nullptr : reinterpret_cast<double*>(static_cast<char*>(ws) + ((part_bytes + 15) / 16) * 16);
  const int64_t smem = small ? qp_smem_bytes(static_cast<int>(K)) : 32 * 8;
  const bool vec = aligned16(G, ld, elt_size(dt));
  const int var = gram_variant(K);
  MTLSAM_CUDA_DISPATCH(dt, T, {
    const typename T::S* g = static_cast<const typename T::S*>(G);
    if (var == 4)
      fused_gram_qp_kernel<T, 4><<<nb, kThreads, smem, st>>>(g, (int)K, P, ld, vec, part, ticket, gram_out, weights,
                                                             qp_gws, max_iter, tol);
    else if (var == 8)
      fused_gram_qp_kernel<T, 8><<<nb, kThreads, smem, st>>>(g, (int)K, P, ld, vec, part, ticket, gram_out, weights,
                                                             qp_gws, max_iter, tol);
    else
      fused_gram_qp_kernel<T, 0><<<nb, kThreads, smem, st>>>(g, (int)K, P, ld, vec, part, ticket, gram_out, weights,
                                                             qp_gws, max_iter, tol);
  });
  MTLSAM_CHECK_LAUNCH("fused gram + qp");
}

void fused_combine_apply(const float* weights, const void* G, int dt, int64_t K, int64_t ld, int64_t P, int mode,
                         const float* scale, const void* backup, void* out, int odt, void* stream) {
  if (P == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  MTLSAM_CUDA_DISPATCH(dt, T, MTLSAM_CUDA_DISPATCH(odt, O, fused_apply_kernel<T, O><<<grid_for(P, kThreads), kThreads, 0, st>>>(
      weights, static_cast<const typename T::S*>(G), (int)K, ld, P, mode, scale,
      static_cast<const typename O::S*>(backup), static_cast<typename O::S*>(out))));
  MTLSAM_CHECK_LAUNCH("fused combine + apply");
}

}  // namespace cuda
}  // namespace mtlsam
