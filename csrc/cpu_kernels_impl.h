// CPU kernel bodies. Included twice, by cpu_kernels.cpp (generic x86-64) and by
// cpu_kernels_avx2.cpp (compiled for AVX2/FMA/F16C), each time inside its own namespace
// MTLSAM_CPU_NS; cpu_kernels.cpp picks one at run time.
//
// Work is split into a fixed number of pieces that does not depend on the thread count, and
// partial results are combined in a fixed order: results are bitwise reproducible across runs
// and thread counts.
//
// Requires (before inclusion): <cstdint> <cstring> <cmath> <vector> <algorithm>, common.h, and
// <immintrin.h> with MTLSAM_CPU_AVX2 defined in the AVX2/FMA/F16C variant (explicit bf16/fp16
// conversions; GCC's target pragma does not define __AVX2__ in C++).

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
static inline void st8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }

// 8 consecutive bf16 / fp16 values to fp32 and back (fp32 -> T rounds like from_f<T>).
#if defined(MTLSAM_CPU_AVX2)
static inline v8f ld8(const bf16_t* p) {  // zero-extend to 32 bits, shift into the high half
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<v8f>(_mm256_slli_epi32(v, 16));
}
static inline v8f ld8(const f16_t* p) {  // F16C
  return reinterpret_cast<v8f>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline __m256i bf16_round_hi(__m256 v) {  // RNE to bf16 (the high 16 bits), NaN -> 0x7FC0
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
static inline void st8(bf16_t* p, v8f v) {  // as from_f<bf16_t>
  const __m256i r = bf16_round_hi(reinterpret_cast<__m256>(v));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
static inline void st8(f16_t* p, v8f v) {  // F16C, round to nearest even
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
template <class T>
static inline v8f ld8(const T* p) {
  v8f v;
  for (int l = 0; l < 8; ++l) v[l] = to_f(p[l]);
  return v;
}
template <class T>
static inline void st8(T* p, v8f v) {
  for (int l = 0; l < 8; ++l) p[l] = from_f<T>(v[l]);
}
#endif

// Keeps a loaded fp32 vector in a register: the FMAs then take register operands only (GCC
// otherwise folds the loads into memory-operand FMAs: the 4 x 2 block then issues 10 loads per 8
// FMAs instead of 6, ~1.5x slower measured on Zen 3).
#if defined(MTLSAM_CPU_AVX2)
#define MTLSAM_IN_REG(v) __asm__("" : "+x"(v))
#else
#define MTLSAM_IN_REG(v) ((void)0)
#endif

// ---- Gram micro-kernels ------------------------------------------------------------------------
// Rows of T read in place (an L1-resident tile after the first pass over it), 16 columns per
// step, upcast in registers to two fp32 vectors: ld_lo / ld_hi. Their lane order is any fixed
// permutation of the 16 columns, the same for every row, which is all a dot product needs
// (bf16 with AVX2: the even columns shifted into the high half of the 32-bit lanes, the odd ones
// masked in place: one 256-bit load and a shift or an and per 8 values; fp16: F16C).
static inline v8f ld_lo(const float* p) { return ld8(p); }
static inline v8f ld_hi(const float* p) { return ld8(p + 8); }
#if defined(MTLSAM_CPU_AVX2)
static inline v8f ld_lo(const bf16_t* p) {  // the even columns: shift the 32-bit lanes left by 16
  return reinterpret_cast<v8f>(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
}
static inline v8f ld_hi(const bf16_t* p) {  // the odd columns: clear the low 16 bits of the lanes
  return reinterpret_cast<v8f>(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                                _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
static inline v8f ld_lo(const f16_t* p) { return ld8(p); }
static inline v8f ld_hi(const f16_t* p) { return ld8(p + 8); }
#else
template <class T>
static inline v8f ld_lo(const T* p) {
  return ld8(p);
}
template <class T>
static inline v8f ld_hi(const T* p) {
  return ld8(p + 8);
}
#endif

static inline float hsum8(v8f v) {  // fixed tree: (l + l+4), then (l + l+2), then (0 + 1)
  const float a0 = v[0] + v[4], a1 = v[1] + v[5], a2 = v[2] + v[6], a3 = v[3] + v[7];
  return (a0 + a2) + (a1 + a3);
}

// fp32 accumulators in registers for all the pairs of a block; U steps of 16 columns per loop
// iteration; SPLIT: the lo and hi halves (and each step) get their own accumulator set (more
// independent FMA chains for the small blocks). n: a multiple of 16 * U. Fixed reduction order:
// per lane over the columns, then over the sets, then the lanes (hsum8). pf: prefetch distance
// (elements, 0 = none) for the rows of a diagonal block (the diagonal blocks cover every row once).

// Diagonal block: the lower triangle (i, j <= i) of R rows, out[i * (i + 1) / 2 + j].
template <class T, int R, int U, bool SPLIT>
static inline void gram_diag(const T* const* rows, int64_t n, int64_t pf, float* out) {
  constexpr int NP = R * (R + 1) / 2, NS = SPLIT ? 2 * U : U;
  const T* r[R];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) r[i] = rows[i];
  v8f acc[NP][NS];
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 8
    for (int s = 0; s < NS; ++s) acc[p][s] = v8f{};
  for (int64_t w = 0; w < n; w += 16 * U) {
    if (pf) {  // every cache line of the 16 * U columns (at least one prefetch per step)
      constexpr int LINES = 16 * U * sizeof(T) / 64 > 0 ? 16 * U * sizeof(T) / 64 : 1;
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
        for (int l = 0; l < LINES; ++l) __builtin_prefetch(r[i] + w + pf + l * (64 / sizeof(T)), 0, 3);
    }
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int s = SPLIT ? 2 * u + h : u;
        v8f x[R];
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) x[i] = h ? ld_hi(r[i] + w + 16 * u) : ld_lo(r[i] + w + 16 * u);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
          for (int j = 0; j <= i; ++j) acc[i * (i + 1) / 2 + j][s] += x[i] * x[j];
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p) {
    v8f s = acc[p][0];
#pragma GCC unroll 8
    for (int q = 1; q < NS; ++q) s += acc[p][q];
    out[p] = hsum8(s);
  }
}

// Off-diagonal block: RA rows a times RB rows b, out[i * RB + j] = a_i . b_j.
template <class T, int RA, int RB, int U, bool SPLIT>
static inline void gram_off(const T* const* a_rows, const T* const* b_rows, int64_t n, float* out) {
  constexpr int NS = SPLIT ? 2 * U : U;
  constexpr bool kInReg = std::is_same<T, float>::value;  // fp32 loads could fold into the FMAs
  const T* a[RA];
  const T* b[RB];
#pragma GCC unroll 4
  for (int i = 0; i < RA; ++i) a[i] = a_rows[i];
#pragma GCC unroll 4
  for (int j = 0; j < RB; ++j) b[j] = b_rows[j];
  v8f acc[RA * RB][NS];
#pragma GCC unroll 16
  for (int p = 0; p < RA * RB; ++p)
#pragma GCC unroll 8
    for (int s = 0; s < NS; ++s) acc[p][s] = v8f{};
  for (int64_t w = 0; w < n; w += 16 * U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int s = SPLIT ? 2 * u + h : u;
        v8f x[RA];
#pragma GCC unroll 4
        for (int i = 0; i < RA; ++i) {
          v8f v = h ? ld_hi(a[i] + w + 16 * u) : ld_lo(a[i] + w + 16 * u);
          if (kInReg) MTLSAM_IN_REG(v);
          x[i] = v;
        }
#pragma GCC unroll 4
        for (int j = 0; j < RB; ++j) {
          v8f y = h ? ld_hi(b[j] + w + 16 * u) : ld_lo(b[j] + w + 16 * u);
          if (kInReg) MTLSAM_IN_REG(y);
#pragma GCC unroll 4
          for (int i = 0; i < RA; ++i) acc[i * RB + j][s] += x[i] * y;
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < RA * RB; ++p) {
    v8f s = acc[p][0];
#pragma GCC unroll 8
    for (int q = 1; q < NS; ++q) s += acc[p][q];
    out[p] = hsum8(s);
  }
}

constexpr int64_t kGramPad = 64;  // tile lengths handed to the micro-kernels are multiples of this

template <class T>
static inline void off_block(int ra, const T* const* a, const T* const* b, int64_t n, float* t) {
  switch (ra) {
    case 1: gram_off<T, 1, 2, 2, true>(a, b, n, t); break;
    case 2: gram_off<T, 2, 2, 1, true>(a, b, n, t); break;
    case 3: gram_off<T, 3, 2, 1, false>(a, b, n, t); break;
    default: gram_off<T, 4, 2, 1, false>(a, b, n, t); break;
  }
}

// Lower triangle of the Gram of the K rows (length n, a multiple of kGramPad) added into acc
// (fp64), acc[i * K + j], j <= i: 4-row diagonal blocks (4 loads, 10 FMAs per 8 columns) and
// 4 x 2 off-diagonal blocks (6 loads, 8 FMAs); every row is prefetched pf elements ahead once.
template <class T>
static inline void tile_gram(const T* const* rows, int64_t K, int64_t n, int64_t pf, double* acc) {
  float t[16] = {};
  for (int64_t bi = 0; bi < K; bi += 4) {
    const int ra = static_cast<int>(std::min<int64_t>(4, K - bi));
    const T* const* a = rows + bi;
    switch (ra) {
      case 1: gram_diag<T, 1, 4, true>(a, n, pf, t); break;
      case 2: gram_diag<T, 2, 2, true>(a, n, pf, t); break;
      case 3: gram_diag<T, 3, 1, true>(a, n, pf, t); break;
      default: gram_diag<T, 4, 1, false>(a, n, pf, t); break;
    }
    for (int i = 0, p = 0; i < ra; ++i)
      for (int j = 0; j <= i; ++j) acc[(bi + i) * K + bi + j] += t[p++];
    for (int64_t bj = 0; bj < bi; bj += 2) {  // bi is a multiple of 4: always 2 rows b
      off_block<T>(ra, a, rows + bj, n, t);
      for (int i = 0; i < ra; ++i)
        for (int j = 0; j < 2; ++j) acc[(bi + i) * K + bj + j] += t[i * 2 + j];
    }
  }
}

// Columns per tile: a tile (K rows of T) of about 8 KiB, so that it and the next one (being
// prefetched) stay in L1d (32 KiB); 16 KiB tiles measured slower for fp32 K = 8.
static inline int64_t gram_tile_width(int64_t K, int64_t esize) {
  int64_t w = (8192 / esize / (K > 0 ? K : 1)) & ~int64_t(kGramPad - 1);
  return w < 128 ? 128 : (w > 8192 ? 8192 : w);
}

// a[0, 16) <- a - b, rounded to T like from_f<T>.
template <class T>
static inline void diff16(T* __restrict a, const T* __restrict b) {
  st8(a, ld8(a) - ld8(b));
  st8(a + 8, ld8(a + 8) - ld8(b + 8));
}
#if defined(MTLSAM_CPU_AVX2)
// bf16: upcast in the unpack lane order, subtract, round, and pack back (vpackusdw inverts the
// in-lane unpacks): 16 values per 256-bit load and store.
template <>
inline void diff16<bf16_t>(bf16_t* __restrict a, const bf16_t* __restrict b) {
  const __m256i z = _mm256_setzero_si256();
  const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  const __m256 lo = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, va)),
                                  _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, vb)));
  const __m256 hi = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(z, va)),
                                  _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, vb)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), _mm256_packus_epi32(bf16_round_hi(lo), bf16_round_hi(hi)));
}
#endif

// a <- a - b (rounded to T), n elements; prefetches both pf elements ahead.
template <class T>
static inline void diff_row(T* __restrict a, const T* __restrict b, int64_t n, int64_t pf) {
  constexpr int64_t L = 64 / sizeof(T);
  int64_t w = 0;
  for (; w + L <= n; w += L) {
    if (pf) {
      __builtin_prefetch(a + w + pf, 1, 3);
      __builtin_prefetch(b + w + pf, 0, 3);
    }
#pragma GCC unroll 4
    for (int64_t v = 0; v < L; v += 16) diff16(a + w + v, b + w + v);
  }
  for (; w < n; ++w) a[w] = from_f<T>(to_f(a[w]) - to_f(b[w]));
}

// Gram (optionally fused with A <- A - B) over a fixed partition of the columns:
// each partition accumulates its tiles' fp32 dot products into a private fp64 K x K block, the
// blocks are summed in partition order. Every element of G (A, B) is read once from memory: the
// micro-kernels run on a tile of W columns (in L1 after its first pass) and prefetch the next one;
// a last partial tile is copied into a zero padded scratch.
template <class T, bool DIFF>
static void gram_impl(T* A, const T* B, int64_t K, int64_t P, int64_t lda, int64_t ldb, float* out, int nthreads) {
  const int64_t W = gram_tile_width(K, sizeof(T));
  const int64_t ntiles = cdiv(P, W);
  // a fixed number of partitions (independent of the thread count: deterministic results), many
  // more than threads so that dynamic scheduling balances a loaded machine
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(K <= 16 ? 256 : 64, ntiles));
  std::vector<double> parts(static_cast<size_t>(nparts * K * K), 0.0);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> pad;  // the last partial tile, zero padded (all-zero bits: 0.0 in every T)
    std::vector<const T*> rows(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < nparts; ++p) {
      double* acc = parts.data() + p * K * K;
      const int64_t t0 = ntiles * p / nparts, t1 = ntiles * (p + 1) / nparts;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * W, n = std::min(W, P - c0);
        const int64_t npad = cdiv(n, kGramPad) * kGramPad;
        const int64_t pf = (t + 1 < t1) ? W : 0;  // the row's next tile
        for (int64_t k = 0; k < K; ++k) {
          T* a = A + k * lda + c0;
          if (DIFF) diff_row<T>(a, B + k * ldb + c0, n, pf);
          rows[k] = a;
        }
        if (n != npad) {
          pad.assign(static_cast<size_t>(K * npad), T{});
          for (int64_t k = 0; k < K; ++k) {
            std::memcpy(pad.data() + k * npad, rows[k], static_cast<size_t>(n) * sizeof(T));
            rows[k] = pad.data() + k * npad;
          }
        }
        tile_gram<T>(rows.data(), K, npad, DIFF ? 0 : pf, acc);
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
// out = w^T G (+ w2^T H), per column: fp32 accumulation over the rows in order k = 0, 1, ... (the
// same order in the vector body and the tail). The K row streams are read concurrently, 32
// columns at a time, with the accumulators in registers; each row's next tile is prefetched.
template <class T, class O>
static void combine_impl(const float* w, const T* G, int64_t K, int64_t ldg, const float* w2, const T* H, int64_t K2,
                         int64_t ldh, int64_t P, O* out, int nthreads) {
  constexpr int64_t W = 1024;
  constexpr int64_t L = 64 / sizeof(T);  // elements per cache line
  const int64_t ntiles = cdiv(P, W);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t c0 = t * W, n = std::min(W, P - c0);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t k = 0; k < K; ++k) {
        const float wk = w[k];
        const T* g = G + k * ldg + c0 + i;
#pragma GCC unroll 2
        for (int64_t l = 0; l < 32; l += L) __builtin_prefetch(g + l + W, 0, 3);
        a0 += wk * ld8(g);
        a1 += wk * ld8(g + 8);
        a2 += wk * ld8(g + 16);
        a3 += wk * ld8(g + 24);
      }
      if (H) {
        for (int64_t k = 0; k < K2; ++k) {
          const float wk = w2[k];
          const T* h = H + k * ldh + c0 + i;
#pragma GCC unroll 2
          for (int64_t l = 0; l < 32; l += L) __builtin_prefetch(h + l + W, 0, 3);
          a0 += wk * ld8(h);
          a1 += wk * ld8(h + 8);
          a2 += wk * ld8(h + 16);
          a3 += wk * ld8(h + 24);
        }
      }
      O* o = out + c0 + i;
      st8(o, a0);
      st8(o + 8, a1);
      st8(o + 16, a2);
      st8(o + 24, a3);
    }
    for (; i < n; ++i) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += w[k] * to_f(G[k * ldg + c0 + i]);
      if (H)
        for (int64_t k = 0; k < K2; ++k) acc += w2[k] * to_f(H[k * ldh + c0 + i]);
      out[c0 + i] = from_f<O>(acc);
    }
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

}  // namespace MTLSAM_CPU_NS
}  // namespace mtlsam
