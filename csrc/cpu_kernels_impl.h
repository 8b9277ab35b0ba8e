// CPU kernel bodies. Included twice, by cpu_kernels.cpp (generic x86-64) and by
// cpu_kernels_avx2.cpp (compiled for AVX2/FMA/F16C), each time inside its own namespace
// MTLSAM_CPU_NS; cpu_kernels.cpp picks one at run time.
//
// Work is split into a fixed number of pieces that does not depend on the thread count, and
// partial results are combined in a fixed order: results are bitwise reproducible across runs
// and thread counts.
//
// Requires (before inclusion): <cstdint> <cstring> <cmath> <vector> <algorithm>, common.h, qp_core.h,
// and <immintrin.h> with MTLSAM_CPU_AVX2 defined in the AVX2/FMA/F16C variant (explicit bf16/fp16
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
    v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};  // four independent FMA chains, 32 columns per step
    int64_t i = pc.begin;
    if (weight) {
      for (; i + 32 <= pc.end; i += 32) {
        const v8f v0 = ld8(row + i) * ld8(weight + i), v1 = ld8(row + i + 8) * ld8(weight + i + 8);
        const v8f v2 = ld8(row + i + 16) * ld8(weight + i + 16), v3 = ld8(row + i + 24) * ld8(weight + i + 24);
        a0 += v0 * v0;
        a1 += v1 * v1;
        a2 += v2 * v2;
        a3 += v3 * v3;
      }
    } else {
      for (; i + 32 <= pc.end; i += 32) {
        const v8f v0 = ld8(row + i), v1 = ld8(row + i + 8), v2 = ld8(row + i + 16), v3 = ld8(row + i + 24);
        a0 += v0 * v0;
        a1 += v1 * v1;
        a2 += v2 * v2;
        a3 += v3 * v3;
      }
    }
    double s = 0.0;
    for (; i < pc.end; ++i) {
      float v = to_f(row[i]);
      if (weight) v *= to_f(weight[i]);
      s += static_cast<double>(v * v);
    }
    part[t] = s + hsum8((a0 + a1) + (a2 + a3));
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t s = 0; s < S; ++s) out[r * S + s] = 0.f;
    std::vector<double> tot(static_cast<size_t>(S), 0.0);
    for (int64_t k = 0; k < np; ++k) tot[pieces[k].seg] += part[r * np + k];
    for (int64_t s = 0; s < S; ++s) out[r * S + s] = static_cast<float>(std::sqrt(tot[s]));
  }
}

// ---- Philox noise, 8 counters at a time ------------------------------------------------------
// The stream of common.h (Philox4x32-10 words, Box-Muller in fp32) with the rounds on 8-lane
// integer vectors and vector log / cos (Cephes single-precision polynomials, within ~2 ulp of libm;
// the torch oracle's log / cos differ from libm by as much). Same code in both variants; the
// AVX2 one multiplies with vpmuludq.
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

template <class To, class From>
static inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  __builtin_memcpy(&to, &from, sizeof(To));
  return to;
}

static inline void mulhilo8(uint32_t m, v8u x, v8u* hi, v8u* lo) {
#if defined(MTLSAM_CPU_AVX2)
  const __m256i a = bit_cast<__m256i>(x), mm = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i pe = _mm256_mul_epu32(a, mm);                        // lanes 0, 2, 4, 6 -> 64 bit
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), mm);  // lanes 1, 3, 5, 7
  const __m256i l = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  const __m256i h = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  *lo = bit_cast<v8u>(l);
  *hi = bit_cast<v8u>(h);
#else
  for (int l = 0; l < 8; ++l) {
    const uint64_t p = static_cast<uint64_t>(m) * x[l];
    (*lo)[l] = static_cast<uint32_t>(p);
    (*hi)[l] = static_cast<uint32_t>(p >> 32);
  }
#endif
}

static inline v8f sqrt8(v8f x) {
#if defined(MTLSAM_CPU_AVX2)
  return bit_cast<v8f>(_mm256_sqrt_ps(bit_cast<__m256>(x)));
#else
  for (int l = 0; l < 8; ++l) x[l] = std::sqrt(x[l]);
  return x;
#endif
}

// log(x) for normal x > 0 (Cephes logf).
static inline v8f log8(v8f x) {
  const v8i bits = bit_cast<v8i>(x);
  v8i e = ((bits >> 23) & 0xff) - 126;
  const v8i mb = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  v8f m = bit_cast<v8f>(mb);
  const v8i small = m < 0.70710678118654752f;
  e += small;  // -1 where small
  m = small ? m + m : m;
  const v8f f = m - 1.0f, z = f * f, ef = __builtin_convertvector(e, v8f);
  v8f y = 7.0376836292e-2f * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * ef;
}

// cos(a) for 0 <= a < 8 (Cephes cosf: octant reduction in three parts of pi/4, then sin / cos
// polynomials).
static inline v8f cos8(v8f a) {
  v8i j = __builtin_convertvector(a * 1.27323954473516f, v8i);  // a >= 0: truncation is floor
  j = (j + 1) & ~1;  // to the even octant: x in [-pi/4, pi/4]
  const v8f y = __builtin_convertvector(j, v8f);
  j &= 7;
  const v8i neg = ((j & 4) != 0) ^ (((j & 2) != 0));  // -1 where the result is negated
  const v8i use_sin = (j & 2) != 0;
  const v8f x = ((a - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const v8f z = x * x;
  const v8f s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const v8f c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z
                - 0.5f * z + 1.0f;
  const v8f r = use_sin ? s : c;
  return neg ? -r : r;
}

constexpr int kPhiloxGroups = 4;  // independent 8-lane streams interleaved: the rounds are latency-bound

// Philox4x32-10 words (r0, r1) of the 32 counters first, first + 1, ... (group g, lane l: + 8 g + l).
static inline void philox_words32(uint64_t seed, uint64_t first, v8u (&r0)[kPhiloxGroups], v8u (&r1)[kPhiloxGroups]) {
  const v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
  v8u c2[kPhiloxGroups] = {}, c3[kPhiloxGroups] = {};
  for (int g = 0; g < kPhiloxGroups; ++g) {  // 64-bit counters split in halves
    const uint64_t base = first + static_cast<uint64_t>(8 * g);
    const uint32_t lo = static_cast<uint32_t>(base);
    r0[g] = lo + lane;
    r1[g] = static_cast<uint32_t>(base >> 32) - (r0[g] < lo);  // a true compare is -1: the carry
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    for (int g = 0; g < kPhiloxGroups; ++g) {
      v8u hb, lb, ha, la;
      mulhilo8(0xCD9E8D57u, c2[g], &hb, &lb);
      mulhilo8(0xD2511F53u, r0[g], &ha, &la);
      r0[g] = hb ^ r1[g] ^ k0;
      r1[g] = lb;
      c2[g] = ha ^ c3[g] ^ k1;
      c3[g] = la;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// z[0..n) = the Gaussian stream at counters first, first + 1, ... (n <= kNoiseBlock).
constexpr int64_t kNoiseBlock = 256;

static inline void noise_block(uint64_t seed, uint64_t first, int64_t n, float* z) {
  const float inv24 = 5.9604644775390625e-08f;  // 2^-24
  for (int64_t b = 0; b < n; b += 8 * kPhiloxGroups) {
    v8u r0[kPhiloxGroups], r1[kPhiloxGroups];
    philox_words32(seed, first + static_cast<uint64_t>(b), r0, r1);
    for (int g = 0; g < kPhiloxGroups && b + 8 * g < n; ++g) {
      const v8f u1 = (__builtin_convertvector(bit_cast<v8i>(r0[g] >> 8), v8f) + 0.5f) * inv24;  // < 2^24: exact
      const v8f u2 = __builtin_convertvector(bit_cast<v8i>(r1[g] >> 8), v8f) * inv24;
      const v8f v = sqrt8(-2.0f * log8(u1)) * cos8(6.2831854820251465f * u2);
      const int64_t m = std::min<int64_t>(8, n - b - 8 * g);
      __builtin_memcpy(z + b + 8 * g, &v, static_cast<size_t>(m) * sizeof(float));
    }
  }
}

// out[2 i], out[2 i + 1] = the words of counter offset + i (bit-exact to common.h's scalar Philox).
static void philox_words(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out, int nthreads) {
  constexpr int64_t kSpan = 8 * kPhiloxGroups;
  const int64_t nspans = cdiv(n, kSpan);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t k = 0; k < nspans; ++k) {
    v8u r0[kPhiloxGroups], r1[kPhiloxGroups];
    philox_words32(seed, offset + static_cast<uint64_t>(k * kSpan), r0, r1);
    const int64_t m = std::min(kSpan, n - k * kSpan);
    uint32_t* o = out + 2 * k * kSpan;
    for (int64_t i = 0; i < m; ++i) {
      o[2 * i] = r0[i / 8][i % 8];
      o[2 * i + 1] = r1[i / 8][i % 8];
    }
  }
}

static void gaussian_noise(uint64_t seed, uint64_t offset, int64_t n, float* out, int nthreads) {
  const int64_t nblocks = cdiv(n, kNoiseBlock);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t k = 0; k < nblocks; ++k) {
    const int64_t b = k * kNoiseBlock;
    noise_block(seed, offset + static_cast<uint64_t>(b), std::min(kNoiseBlock, n - b), out + b);
  }
}

// Per segment [sum z^2, sum ref z] of the noise stream; with theta, the same pass also writes
// theta <- backup + noise_scale[s] * z (bitwise perturb's noise-only result): SAMO's first probe and
// its statistics from one generation of the noise.
template <class T, class TT>
static void noise_stats_impl(uint64_t seed, uint64_t offset, const T* ref, const int64_t* offsets, int64_t S,
                             float* out, int nthreads, TT* theta = nullptr, const TT* backup = nullptr,
                             const float* noise_scale = nullptr, int64_t nnoise = 0) {
  const std::vector<Piece> pieces = make_pieces(offsets, S, kSegChunk);
  const int64_t np = static_cast<int64_t>(pieces.size());
  std::vector<double> part(static_cast<size_t>(2 * np));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t k = 0; k < np; ++k) {
    const float ns = theta ? noise_scale[nnoise == 1 ? 0 : pieces[k].seg] : 0.f;
    double s0 = 0.0, s1 = 0.0;
    float z[kNoiseBlock];
    for (int64_t b = pieces[k].begin; b < pieces[k].end; b += kNoiseBlock) {  // fp32 blocks, fp64 across
      const int64_t n = std::min(kNoiseBlock, pieces[k].end - b);
      noise_block(seed, offset + static_cast<uint64_t>(b), n, z);
      float a0 = 0.f, a1 = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        a0 += z[i] * z[i];
        a1 += z[i] * to_f(ref[b + i]);
      }
      if (theta)
        for (int64_t i = 0; i < n; ++i) theta[b + i] = from_f<TT>(to_f(backup[b + i]) + z[i] * ns);
      s0 += a0;
      s1 += a1;
    }
    part[2 * k] = s0;
    part[2 * k + 1] = s1;
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
      const auto add_rows = [&](const float* wts, const T* M, int64_t rows, int64_t ld) {
        for (int64_t k = 0; k < rows; ++k) {
          const float wk = wts[k];
          const T* g = M + k * ld + c0 + i;
#pragma GCC unroll 2
          for (int64_t l = 0; l < 32; l += L) __builtin_prefetch(g + l + W, 0, 3);
          a0 += wk * ld8(g);
          a1 += wk * ld8(g + 8);
          a2 += wk * ld8(g + 16);
          a3 += wk * ld8(g + 24);
        }
      };
      add_rows(w, G, K, ldg);
      if (H) add_rows(w2, H, K2, ldh);
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
      float z[kNoiseBlock];
      for (int64_t b0 = pc.begin; b0 < pc.end; b0 += kNoiseBlock) {
        const int64_t n = std::min(kNoiseBlock, pc.end - b0);
        if (noise_scale) noise_block(seed, noise_offset + static_cast<uint64_t>(b0), n, z);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = b0 + j;
          const float b = to_f(backup[i]);
          float v = b;
          if (dir) {
            float st = to_f(dir[i]) * sc;
            if (adaptive) st = st * b * b;
            v = v + st;
          }
          theta[i] = from_f<T>(noise_scale ? v + z[j] * ns : v);
        }
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
  MTLSAM_CPU_DISPATCH(dt, T, noise_stats_impl<T, float>(seed, offset, static_cast<const T*>(ref), offsets, S, out,
                                                         nthreads))
}

static void perturb_noise_stats(void* theta, const void* backup, int tdt, const float* noise_scale, int64_t nnoise,
                                uint64_t seed, uint64_t offset, const void* ref, int rdt, const int64_t* offsets,
                                int64_t S, float* out, int nthreads) {
  MTLSAM_CPU_DISPATCH(rdt, T, MTLSAM_CPU_DISPATCH(tdt, TT, noise_stats_impl<T, TT>(seed, offset,
      static_cast<const T*>(ref), offsets, S, out, nthreads, static_cast<TT*>(theta), static_cast<const TT*>(backup),
      noise_scale, nnoise)))
}

// The batched QP (qp_core.h, one problem per thread). A batch smaller than the thread count gets
// one thread per problem, a single problem no parallel region at all (latency).
template <class T>
static void solve_qp_impl(const T* gram, const T* q, const T* lower, const T* norm_coef, int64_t B, int K,
                          bool simplex, int max_iter, double tol, T* out, int32_t* iters, int nthreads) {
  const int64_t KK = static_cast<int64_t>(K) * K;
  const int nt = static_cast<int>(B < nthreads ? B : nthreads);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // 64-byte aligned (see qp_ld)
    std::vector<double> buf(static_cast<size_t>(qp_workspace_doubles(K)) + 8);
    double* ws = reinterpret_cast<double*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~static_cast<uintptr_t>(63));
    SerialTeam team;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const T* qb = q ? q + b * K : nullptr;
      const int it = norm_coef ? qp_solve_norm_one(team, K, gram + b * KK, qb, static_cast<double>(norm_coef[b]),
                                                   max_iter, tol, ws, out + b * K)
                               : qp_solve_one(team, K, gram + b * KK, qb, lower ? lower + b * K : nullptr, simplex,
                                              max_iter, tol, ws, out + b * K);
      if (iters) iters[b] = it;
    }
  }
}

static void solve_qp(const void* gram, const void* q, const void* lower, const void* norm_coef, int dt, int64_t B,
                     int K, bool simplex, int max_iter, double tol, void* out, int32_t* iters, int nthreads) {
  if (dt == kF64) {
    solve_qp_impl(static_cast<const double*>(gram), static_cast<const double*>(q), static_cast<const double*>(lower),
                  static_cast<const double*>(norm_coef), B, K, simplex, max_iter, tol, static_cast<double*>(out), iters,
                  nthreads);
  } else {
    solve_qp_impl(static_cast<const float*>(gram), static_cast<const float*>(q), static_cast<const float*>(lower),
                  static_cast<const float*>(norm_coef), B, K, simplex, max_iter, tol, static_cast<float*>(out), iters,
                  nthreads);
  }
}

}  // namespace MTLSAM_CPU_NS
}  // namespace mtlsam
