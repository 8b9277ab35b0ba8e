// CPU kernel bodies. Included twice, by cpu_kernels.cpp (generic x86-64) and by
// cpu_kernels_avx2.cpp (compiled for AVX2/FMA/F16C), each time inside its own namespace
// MTLSAM_CPU_NS; cpu_kernels.cpp picks one at run time.
//
// Work is split into a fixed number of pieces that does not depend on the thread count, and
// partial results are combined in a fixed order: results are bitwise reproducible across runs
// and thread counts.
//
// Requires (before inclusion): <cstdint> <cstring> <cmath> <vector> <algorithm>, common.h, qp_core.h.

namespace mtlsam {
namespace MTLSAM_CPU_NS {

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

static inline float to_f(float v) { return v; }
static inline float to_f(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float to_f(f16_t v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
template <class T> static inline T from_f(float v);
template <> inline float from_f<float>(float v) { return v; }
template <> inline bf16_t from_f<bf16_t>(float v) {  // round to nearest even, NaN -> quiet NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint16_t r = (v != v) ? static_cast<uint16_t>(0x7FC0)
                        : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return bf16_t{r};
}
template <> inline f16_t from_f<f16_t>(float v) {
  _Float16 h = static_cast<_Float16>(v);
  f16_t r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}

#define MTLSAM_CPU_DISPATCH(dt, T, ...)                  \
  switch (dt) {                                          \
    case kF32: { using T = float; __VA_ARGS__; break; }  \
    case kBF16: { using T = bf16_t; __VA_ARGS__; break; } \
    case kF16: { using T = f16_t; __VA_ARGS__; break; }  \
    default: break;                                      \
  }

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 8-lane fp32 vectors (GCC vector extension: one ymm register with AVX2, two xmm otherwise).
typedef float v8f __attribute__((vector_size(32)));

static inline v8f ld8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

static inline float hsum8(v8f v) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// Dot product of two fp32 rows, 4 independent 8-lane accumulators.
static inline float dot32(const float* __restrict a, const float* __restrict b, int64_t n) {
  v8f c0 = {}, c1 = {}, c2 = {}, c3 = {};
  int64_t w = 0;
  for (; w + 32 <= n; w += 32) {
    c0 += ld8(a + w) * ld8(b + w);
    c1 += ld8(a + w + 8) * ld8(b + w + 8);
    c2 += ld8(a + w + 16) * ld8(b + w + 16);
    c3 += ld8(a + w + 24) * ld8(b + w + 24);
  }
  for (; w + 8 <= n; w += 8) c0 += ld8(a + w) * ld8(b + w);
  float tail = 0.f;
  for (; w < n; ++w) tail += a[w] * b[w];
  return hsum8((c0 + c1) + (c2 + c3)) + tail;
}

// Four dot products sharing the row a: out[t] = a . b_t (one load of a feeds four FMAs), two
// 8-lane accumulators per product.
static inline void dot4(const float* __restrict a, const float* __restrict b0, const float* __restrict b1,
                        const float* __restrict b2, const float* __restrict b3, int64_t n, float* out) {
  v8f c0 = {}, c1 = {}, c2 = {}, c3 = {}, d0 = {}, d1 = {}, d2 = {}, d3 = {};
  int64_t w = 0;
  for (; w + 16 <= n; w += 16) {
    const v8f x = ld8(a + w), y = ld8(a + w + 8);
    c0 += x * ld8(b0 + w);
    c1 += x * ld8(b1 + w);
    c2 += x * ld8(b2 + w);
    c3 += x * ld8(b3 + w);
    d0 += y * ld8(b0 + w + 8);
    d1 += y * ld8(b1 + w + 8);
    d2 += y * ld8(b2 + w + 8);
    d3 += y * ld8(b3 + w + 8);
  }
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  for (; w < n; ++w) {
    s0 += a[w] * b0[w];
    s1 += a[w] * b1[w];
    s2 += a[w] * b2[w];
    s3 += a[w] * b3[w];
  }
  out[0] = hsum8(c0 + d0) + s0;
  out[1] = hsum8(c1 + d1) + s1;
  out[2] = hsum8(c2 + d2) + s2;
  out[3] = hsum8(c3 + d3) + s3;
}

// Lower triangle of the Gram of the K fp32 rows (length n) into acc (fp64), acc[i * K + j], j <= i.
static inline void tile_gram(const float* const* rows, int64_t K, int64_t n, double* acc) {
  float t[4];
  for (int64_t i = 0; i < K; ++i) {
    int64_t j = 0;
    for (; j + 4 <= i + 1; j += 4) {
      dot4(rows[i], rows[j], rows[j + 1], rows[j + 2], rows[j + 3], n, t);
      for (int u = 0; u < 4; ++u) acc[i * K + j + u] += t[u];
    }
    for (; j <= i; ++j) acc[i * K + j] += dot32(rows[i], rows[j], n);
  }
}

static inline int64_t gram_tile_width(int64_t K) {
  int64_t w = (4096 / (K > 0 ? K : 1)) & ~int64_t(31);
  return w < 64 ? 64 : (w > 2048 ? 2048 : w);
}

// Gram (optionally fused with A <- A - B) over a fixed partition of the columns:
// each partition accumulates its tiles' fp32 dot products into a private fp64 K x K block, the
// blocks are summed in partition order. Every element of G (A, B) is read once.
template <class T, bool DIFF>
static void gram_impl(T* A, const T* B, int64_t K, int64_t P, int64_t lda, int64_t ldb, float* out, int nthreads) {
  const int64_t W = gram_tile_width(K);
  const int64_t ntiles = cdiv(P, W);
  // a fixed number of partitions (independent of the thread count: deterministic results), many
  // more than threads so that dynamic scheduling balances a loaded machine
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(K <= 16 ? 256 : 64, ntiles));
  std::vector<double> parts(static_cast<size_t>(nparts * K * K), 0.0);
  constexpr bool kDirect = std::is_same<T, float>::value;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> buf(kDirect ? 0 : static_cast<size_t>(K * W));
    std::vector<const float*> rows(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < nparts; ++p) {
      double* acc = parts.data() + p * K * K;
      const int64_t t0 = ntiles * p / nparts, t1 = ntiles * (p + 1) / nparts;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * W, n = std::min(W, P - c0);
        for (int64_t k = 0; k < K; ++k) {
          T* a = A + k * lda + c0;
          if (DIFF) {
            const T* b = B + k * ldb + c0;
            if (kDirect) {
              for (int64_t w = 0; w < n; ++w) a[w] = from_f<T>(to_f(a[w]) - to_f(b[w]));
            } else {
              float* f = buf.data() + k * W;
              for (int64_t w = 0; w < n; ++w) {
                const T r = from_f<T>(to_f(a[w]) - to_f(b[w]));
                a[w] = r;
                f[w] = to_f(r);
              }
            }
          } else if (!kDirect) {
            float* f = buf.data() + k * W;
            for (int64_t w = 0; w < n; ++w) f[w] = to_f(a[w]);
          }
          rows[k] = kDirect ? reinterpret_cast<const float*>(a) : buf.data() + k * W;
        }
        tile_gram(rows.data(), K, n, acc);
      }
    }
  }
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < nparts; ++p) s += parts[p * K * K + i * K + j];
      out[i * K + j] = out[j * K + i] = static_cast<float>(s);
    }
  }
}

// ---- segmented reductions -------------------------------------------------------------------
struct Piece {
  int64_t seg, begin, end;
};

// Segments cut at multiples of `chunk`: a fixed decomposition, independent of the thread count.
static inline std::vector<Piece> make_pieces(const int64_t* offsets, int64_t S, int64_t chunk) {
  std::vector<Piece> pieces;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t b = offsets[s]; b < offsets[s + 1];) {
      const int64_t e = std::min(offsets[s + 1], (b / chunk + 1) * chunk);
      pieces.push_back(Piece{s, b, e});
      b = e;
    }
  }
  return pieces;
}

constexpr int64_t kSegChunk = 1 << 15;

template <class T, class TW>
static void segment_norms_impl(const T* x, int64_t R, int64_t ldx, const int64_t* offsets, int64_t S,
                               const TW* weight, float* out, int nthreads) {
  const std::vector<Piece> pieces = make_pieces(offsets, S, kSegChunk);
  const int64_t np = static_cast<int64_t>(pieces.size());
  std::vector<double> part(static_cast<size_t>(R * np));
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads)
  for (int64_t t = 0; t < R * np; ++t) {
    const int64_t r = t / np;
    const Piece pc = pieces[t % np];
    const T* row = x + r * ldx;
    float acc[16] = {0.f};
    int64_t i = pc.begin;
    for (; i + 16 <= pc.end; i += 16) {
      for (int l = 0; l < 16; ++l) {
        float v = to_f(row[i + l]);
        if (weight) v *= to_f(weight[i + l]);
        acc[l] += v * v;
      }
    }
    double s = 0.0;
    for (; i < pc.end; ++i) {
      float v = to_f(row[i]);
      if (weight) v *= to_f(weight[i]);
      s += static_cast<double>(v * v);
    }
    for (int l = 0; l < 16; ++l) s += acc[l];
    part[t] = s;
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t s = 0; s < S; ++s) out[r * S + s] = 0.f;
    std::vector<double> tot(static_cast<size_t>(S), 0.0);
    for (int64_t k = 0; k < np; ++k) tot[pieces[k].seg] += part[r * np + k];
    for (int64_t s = 0; s < S; ++s) out[r * S + s] = static_cast<float>(std::sqrt(tot[s]));
  }
}

template <class T>
static void noise_stats_impl(uint64_t seed, uint64_t offset, const T* ref, const int64_t* offsets, int64_t S,
                             float* out, int nthreads) {
  const std::vector<Piece> pieces = make_pieces(offsets, S, kSegChunk);
  const int64_t np = static_cast<int64_t>(pieces.size());
  std::vector<double> part(static_cast<size_t>(2 * np));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t k = 0; k < np; ++k) {
    double s0 = 0.0, s1 = 0.0;
    float a0 = 0.f, a1 = 0.f;
    int cnt = 0;
    for (int64_t i = pieces[k].begin; i < pieces[k].end; ++i) {
      const float z = philox_gaussian(seed, offset + static_cast<uint64_t>(i));
      a0 += z * z;
      a1 += z * to_f(ref[i]);
      if (++cnt == 256) {  // fp32 runs of 256, fp64 across runs
        s0 += a0;
        s1 += a1;
        a0 = a1 = 0.f;
        cnt = 0;
      }
    }
    part[2 * k] = s0 + a0;
    part[2 * k + 1] = s1 + a1;
  }
  std::vector<double> tot(static_cast<size_t>(2 * S), 0.0);
  for (int64_t k = 0; k < np; ++k) {
    tot[pieces[k].seg] += part[2 * k];
    tot[S + pieces[k].seg] += part[2 * k + 1];
  }
  for (int64_t s = 0; s < 2 * S; ++s) out[s] = static_cast<float>(tot[s]);
}

// ---- combine --------------------------------------------------------------------------------
template <class T, class O>
static void combine_impl(const float* w, const T* G, int64_t K, int64_t ldg, const float* w2, const T* H, int64_t K2,
                         int64_t ldh, int64_t P, O* out, int nthreads) {
  constexpr int64_t W = 1024;
  const int64_t ntiles = cdiv(P, W);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t c0 = t * W, n = std::min(W, P - c0);
    float acc[W];
    for (int64_t i = 0; i < n; ++i) acc[i] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float wk = w[k];
      const T* g = G + k * ldg + c0;
      for (int64_t i = 0; i < n; ++i) acc[i] += wk * to_f(g[i]);
    }
    if (H) {
      for (int64_t k = 0; k < K2; ++k) {
        const float wk = w2[k];
        const T* h = H + k * ldh + c0;
        for (int64_t i = 0; i < n; ++i) acc[i] += wk * to_f(h[i]);
      }
    }
    O* o = out + c0;
    for (int64_t i = 0; i < n; ++i) o[i] = from_f<O>(acc[i]);
  }
}

// ---- perturb --------------------------------------------------------------------------------
template <class T, class D>
static void perturb_impl(T* theta, const T* backup, const D* dir, const float* scale, int64_t nscale,
                         const int64_t* offsets, int64_t S, bool adaptive, const float* noise_scale, int64_t nnoise,
                         uint64_t seed, uint64_t noise_offset, int64_t P, int nthreads) {
  const std::vector<Piece> pieces = make_pieces(offsets, S, kSegChunk);
  const int64_t np = static_cast<int64_t>(pieces.size());
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads)
  for (int64_t k = 0; k < np; ++k) {
    const Piece pc = pieces[k];
    const float sc = dir ? scale[nscale == 1 ? 0 : pc.seg] : 0.f;
    const float ns = noise_scale ? noise_scale[nnoise == 1 ? 0 : pc.seg] : 0.f;
    if (dir && !noise_scale) {
      if (adaptive) {
        for (int64_t i = pc.begin; i < pc.end; ++i) {
          const float b = to_f(backup[i]);
          theta[i] = from_f<T>(b + to_f(dir[i]) * sc * b * b);
        }
      } else {
        for (int64_t i = pc.begin; i < pc.end; ++i) theta[i] = from_f<T>(to_f(backup[i]) + to_f(dir[i]) * sc);
      }
    } else {
      for (int64_t i = pc.begin; i < pc.end; ++i) {
        const float b = to_f(backup[i]);
        float v = b;
        if (dir) {
          float st = to_f(dir[i]) * sc;
          if (adaptive) st = st * b * b;
          v = v + st;
        }
        if (noise_scale) v = v + philox_gaussian(seed, noise_offset + static_cast<uint64_t>(i)) * ns;
        theta[i] = from_f<T>(v);
      }
    }
  }
}

// ---- typed entry points -----------------------------------------------------------------------
static void gram(const void* G, int dt, int64_t K, int64_t P, int64_t ld, float* out, int nthreads) {
  MTLSAM_CPU_DISPATCH(dt, T, gram_impl<T, false>(const_cast<T*>(static_cast<const T*>(G)), nullptr, K, P, ld, 0,
                                                  out, nthreads))
}

static void diff_gram(void* A, const void* B, int dt, int64_t K, int64_t P, int64_t lda, int64_t ldb, float* out,
                      int nthreads) {
  MTLSAM_CPU_DISPATCH(dt, T, gram_impl<T, true>(static_cast<T*>(A), static_cast<const T*>(B), K, P, lda, ldb, out,
                                                 nthreads))
}

static void segment_norms(const void* x, int dt, int64_t R, int64_t ldx, const int64_t* offsets, int64_t S,
                          const void* weight, int wdt, float* out, int nthreads) {
  MTLSAM_CPU_DISPATCH(dt, T, MTLSAM_CPU_DISPATCH(wdt, TW, segment_norms_impl<T, TW>(static_cast<const T*>(x), R, ldx,
      offsets, S, static_cast<const TW*>(weight), out, nthreads)))
}

static void combine(const float* w, const void* G, int64_t K, int64_t ldg, const float* w2, const void* H,
                    int64_t K2, int64_t ldh, int gdt, int64_t P, void* out, int odt, int nthreads) {
  MTLSAM_CPU_DISPATCH(gdt, T, MTLSAM_CPU_DISPATCH(odt, O, combine_impl<T, O>(w, static_cast<const T*>(G), K, ldg, w2,
      static_cast<const T*>(H), K2, ldh, P, static_cast<O*>(out), nthreads)))
}

static void perturb(void* theta, const void* backup, int tdt, const void* dir, int ddt, const float* scale,
                    int64_t nscale, const int64_t* offsets, int64_t S, bool adaptive, const float* noise_scale,
                    int64_t nnoise, uint64_t seed, uint64_t noise_offset, int64_t P, int nthreads) {
  MTLSAM_CPU_DISPATCH(tdt, T, MTLSAM_CPU_DISPATCH(ddt, D, perturb_impl<T, D>(static_cast<T*>(theta),
      static_cast<const T*>(backup), static_cast<const D*>(dir), scale, nscale, offsets, S, adaptive, noise_scale,
      nnoise, seed, noise_offset, P, nthreads)))
}

static void noise_stats(uint64_t seed, uint64_t offset, const void* ref, int dt, const int64_t* offsets, int64_t S,
                        float* out, int nthreads) {
  MTLSAM_CPU_DISPATCH(dt, T, noise_stats_impl<T>(seed, offset, static_cast<const T*>(ref), offsets, S, out, nthreads))
}

// The batched QP (qp_core.h, one problem per thread). A batch smaller than the thread count gets
// one thread per problem, a single problem no parallel region at all (latency).
template <class T>
static void solve_qp_impl(const T* gram, const T* q, const T* lower, int64_t B, int K, bool simplex, int max_iter,
                          double tol, T* out, int32_t* iters, int nthreads) {
  const int64_t KK = static_cast<int64_t>(K) * K;
  const int nt = static_cast<int>(B < nthreads ? B : nthreads);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<double> ws(static_cast<size_t>(qp_workspace_doubles(K)));
    SerialTeam team;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int it = qp_solve_one(team, K, gram + b * KK, q ? q + b * K : nullptr, lower ? lower + b * K : nullptr,
                                  simplex, max_iter, tol, ws.data(), out + b * K);
      if (iters) iters[b] = it;
    }
  }
}

static void solve_qp(const void* gram, const void* q, const void* lower, int dt, int64_t B, int K, bool simplex,
                     int max_iter, double tol, void* out, int32_t* iters, int nthreads) {
  if (dt == kF64) {
    solve_qp_impl(static_cast<const double*>(gram), static_cast<const double*>(q), static_cast<const double*>(lower),
                  B, K, simplex, max_iter, tol, static_cast<double*>(out), iters, nthreads);
  } else {
    solve_qp_impl(static_cast<const float*>(gram), static_cast<const float*>(q), static_cast<const float*>(lower), B,
                  K, simplex, max_iter, tol, static_cast<float*>(out), iters, nthreads);
  }
}

}  // namespace MTLSAM_CPU_NS
}  // namespace mtlsam
