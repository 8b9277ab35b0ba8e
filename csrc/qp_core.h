// The batched small QP of mtlsam_fast.ops.solve_qp, written once for the CPU and the GPU.
//
//   minimize 1/2 v^T Gamma v + q^T v   s.t.  v in the simplex   (simplex = true)
//                                       or  v >= lower          (simplex = false)
//
// Jacobi scaling u = v * sqrt(diag Gamma / max diag) as the reference solver mtlsam_fast/ops/qp.py,
// then, in fp64, an exact primal active-set method with an updated Cholesky factor of the free block
// (qp_active_set: finite termination, O(K s) per step; on one CPU core about 7x faster than the
// interior point at K = 64), and, when it fails or when the iteration budget is below kQpAsMinIter,
// a port of the reference's primal-dual interior-point method with Mehrotra's predictor-corrector,
// a dense Cholesky of the Newton matrix Gamma + diag(z/x) per iteration, a fixed iteration budget
// and an early exit once the KKT conditions hold to `tol`.
//
// The code is generic over a "team" of cooperating threads that share the workspace:
//   * SerialTeam  (CPU): one thread, sync() is a no-op, reductions are the identity;
//   * WarpTeam    (CUDA, defined in cuda_kernels.cu): one warp per problem (K <= 64), workspace in
//     shared memory, __syncwarp() and reductions through shuffles;
//   * BlockTeam   (CUDA): one CTA per problem (larger K), reductions through warp shuffles and shared
//     memory; with either, every branch on a reduced value is uniform;
// so the CPU build runs exactly the logic (and the order of floating-point operations of each
// reduction, up to the team size) that the GPU runs. tests/qp_team.cpp runs the team code itself on
// the CPU, with std::thread teams (32 threads: the warp) against SerialTeam.
#pragma once

#include "common.h"

// The CPU build compiles this file twice, for x86-64 and for AVX2/FMA (cpu_kernels_avx2.cpp): each
// translation unit names its own inline namespace, so that the two instantiations stay apart.
#ifndef MTLSAM_QP_NAMESPACE
#define MTLSAM_QP_NAMESPACE qp_base
#endif

// The active set's inner routines, always inlined on the host as on the device (__forceinline__):
// GCC otherwise keeps some out of line in the large CPU kernel translation units.
#if defined(__GNUC__) && !defined(__CUDACC__)
#define MTLSAM_QP_INNER inline __attribute__((always_inline))
#else
#define MTLSAM_QP_INNER MTLSAM_HD
#endif

namespace mtlsam {
inline namespace MTLSAM_QP_NAMESPACE {

struct SerialTeam {
  MTLSAM_HD int rank() const { return 0; }
  MTLSAM_HD int size() const { return 1; }
  MTLSAM_HD void sync() const {}
  MTLSAM_HD double sum(double v) const { return v; }
  MTLSAM_HD double max(double v) const { return v; }
};

// Leading dimension of the K x K matrices in the workspace. On the GPU odd: no shared-memory bank
// conflicts on column walks. On the CPU a multiple of four doubles -- 32-byte aligned columns for the
// vector loads, in a 64-byte aligned workspace -- and an odd one, to spread the columns over the
// cache sets (K = 64: ld 68; ld K + 1 measured ~4 % slower).
#if defined(__CUDACC__)
MTLSAM_HD int qp_ld(int K) { return K + 1; }
#else
MTLSAM_HD int qp_ld(int K) { return ((K + 3) & ~3) | 4; }
#endif

// Number of doubles of workspace one problem needs.
MTLSAM_HD int64_t qp_workspace_doubles(int K) {
  return 2 * static_cast<int64_t>(K) * qp_ld(K) + 18 * static_cast<int64_t>(K);  // 2 matrices + 18 vectors
}

// Proximal term added to the unit diagonal of the scaled problem: it makes the solution unique
// and bounded when Gamma is singular with an unbounded optimal face (a zero gradient under the
// lower-bound constraint), where the central path would otherwise diverge. It moves the solution
// by O(1e-10) relative, far below the 1e-5 KKT target.
constexpr double kQpProx = 1e-10;
constexpr double kQpMaxProx = 1e-4;
constexpr double kQpNewtonReg = 1e-14;  // Newton matrix H + diag(z/x) + kQpNewtonReg I

MTLSAM_HD double qp_dmax(double a, double b) { return a > b ? a : b; }
MTLSAM_HD double qp_dmin(double a, double b) { return a < b ? a : b; }

MTLSAM_HD bool qp_isfinite(double v) { return v == v && v - v == 0.0; }

// Advance the pair (hi, lo) = (t / K, t % K) to t + step without a division.
MTLSAM_HD void qp_next_pair(int K, int step, int* hi, int* lo) {
  *lo += step;
  while (*lo >= K) {
    *lo -= K;
    ++*hi;
  }
}

template <class T>
MTLSAM_HD double qp_load(const T* p, int64_t i) { return static_cast<double>(p[i]); }

#if defined(MTLSAM_QP_AVX2)
// The AVX2 build's scaling pass for one thread (qp_solve_one): H = D sym(Gamma) D / ref read straight
// from Gamma in 4 x 4 tiles, each with its mirror tile, transposed in registers -- every load and
// store contiguous. The same expressions as the generic pass, element by element (so the same
// values): v = (Gamma_ij + Gamma_ji) / 2, H_ij = H_ji = v * (d_lo / ref) * d_hi, lo = min(i, j).
// Returns false when some entry is not finite. dr: scratch, K doubles.
MTLSAM_QP_INNER __m256d qp_load4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
MTLSAM_QP_INNER __m256d qp_load4(const double* p) { return _mm256_loadu_pd(p); }

MTLSAM_QP_INNER void qp_transpose4(__m256d& r0, __m256d& r1, __m256d& r2, __m256d& r3) {
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
  const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  r0 = _mm256_permute2f128_pd(t0, t2, 0x20);
  r1 = _mm256_permute2f128_pd(t1, t3, 0x20);
  r2 = _mm256_permute2f128_pd(t0, t2, 0x31);
  r3 = _mm256_permute2f128_pd(t1, t3, 0x31);
}

template <class T>
MTLSAM_QP_INNER bool qp_scale_tiles(int K, int ld, const T* gram, const double* d, double ref, double* dr,
                                    double* H) {
  for (int i = 0; i < K; ++i) dr[i] = d[i] / ref;
  double bad = 0.0;  // sum of v - v: NaN once some v is not finite
  const auto pair = [&](int i, int j) {  // one entry below the diagonal (i > j) and its mirror
    const double v = 0.5 * (qp_load(gram, static_cast<int64_t>(j) * K + i) + qp_load(gram, static_cast<int64_t>(i) * K + j));
    bad += v - v;
    const double h = v * dr[j] * d[i];
    H[j * ld + i] = h;
    H[i * ld + j] = h;
  };
  for (int j = 0; j < K; ++j) {  // the diagonal
    const double gjj = qp_load(gram, static_cast<int64_t>(j) * K + j);
    bad += gjj - gjj;
    H[j * ld + j] = gjj * dr[j] * d[j] + kQpProx;
  }
  const int K4 = K & ~3;
  __m256d vbad = _mm256_setzero_pd();
  const __m256d half = _mm256_set1_pd(0.5);
  for (int j0 = 0; j0 < K4; j0 += 4) {
    for (int j = j0; j < j0 + 4; ++j)  // the diagonal tile below the diagonal
      for (int i = j + 1; i < j0 + 4; ++i) pair(i, j);
    const T* gj = gram + static_cast<int64_t>(j0) * K;  // rows j0..j0+3 of Gamma
    const __m256d b0 = _mm256_set1_pd(dr[j0]), b1 = _mm256_set1_pd(dr[j0 + 1]), b2 = _mm256_set1_pd(dr[j0 + 2]),
                  b3 = _mm256_set1_pd(dr[j0 + 3]);
    for (int i0 = j0 + 4; i0 < K4; i0 += 4) {
      // c_k[r] = Gamma(j0 + k, i0 + r); m_k[r] = Gamma(i0 + r, j0 + k) after the transpose
      __m256d c0 = qp_load4(gj + i0), c1 = qp_load4(gj + K + i0), c2 = qp_load4(gj + 2 * K + i0),
              c3 = qp_load4(gj + 3 * K + i0);
      const T* gi = gram + static_cast<int64_t>(i0) * K + j0;
      __m256d m0 = qp_load4(gi), m1 = qp_load4(gi + K), m2 = qp_load4(gi + 2 * K), m3 = qp_load4(gi + 3 * K);
      qp_transpose4(m0, m1, m2, m3);
      const __m256d di = _mm256_loadu_pd(d + i0);
      c0 = _mm256_mul_pd(half, _mm256_add_pd(c0, m0));
      c1 = _mm256_mul_pd(half, _mm256_add_pd(c1, m1));
      c2 = _mm256_mul_pd(half, _mm256_add_pd(c2, m2));
      c3 = _mm256_mul_pd(half, _mm256_add_pd(c3, m3));
      vbad = _mm256_add_pd(vbad, _mm256_add_pd(_mm256_sub_pd(c0, c0), _mm256_sub_pd(c1, c1)));
      vbad = _mm256_add_pd(vbad, _mm256_add_pd(_mm256_sub_pd(c2, c2), _mm256_sub_pd(c3, c3)));
      c0 = _mm256_mul_pd(_mm256_mul_pd(c0, b0), di);
      c1 = _mm256_mul_pd(_mm256_mul_pd(c1, b1), di);
      c2 = _mm256_mul_pd(_mm256_mul_pd(c2, b2), di);
      c3 = _mm256_mul_pd(_mm256_mul_pd(c3, b3), di);
      _mm256_storeu_pd(H + j0 * ld + i0, c0);
      _mm256_storeu_pd(H + (j0 + 1) * ld + i0, c1);
      _mm256_storeu_pd(H + (j0 + 2) * ld + i0, c2);
      _mm256_storeu_pd(H + (j0 + 3) * ld + i0, c3);
      qp_transpose4(c0, c1, c2, c3);
      _mm256_storeu_pd(H + i0 * ld + j0, c0);
      _mm256_storeu_pd(H + (i0 + 1) * ld + j0, c1);
      _mm256_storeu_pd(H + (i0 + 2) * ld + j0, c2);
      _mm256_storeu_pd(H + (i0 + 3) * ld + j0, c3);
    }
    for (int i = K4; i < K; ++i)
      for (int j = j0; j < j0 + 4; ++j) pair(i, j);
  }
  for (int j = K4; j < K; ++j)  // the last K % 4 columns
    for (int i = j + 1; i < K; ++i) pair(i, j);
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, vbad);
  bad += (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  return bad == 0.0;
}
#endif

// In-place Cholesky factorization of the lower triangle of M (column-major, M[j*ld + i] is row i,
// column j; i >= j), right-looking; each column step is parallel over the trailing triangle.
// M = H + diag(z/x) + delta I with H PSD has every pivot >= delta in exact arithmetic; a pivot
// below delta / 2 means H is numerically indefinite (a Gram matrix rounded to fp32, say): the
// factorization stops and returns false so that the caller raises delta and refactors.
template <class Team>
MTLSAM_HD bool qp_cholesky(const Team& team, int K, int ld, double* M, double delta) {
  for (int j = 0; j < K; ++j) {
    team.sync();
    const double pivot = M[j * ld + j];
    if (!(pivot >= 0.5 * delta)) {
      team.sync();
      return false;  // uniform: every thread read the same pivot
    }
    double djj = sqrt(pivot);
    double inv = 1.0 / djj;
    for (int i = j + 1 + team.rank(); i < K; i += team.size()) M[j * ld + i] *= inv;
    team.sync();
    if (team.rank() == 0) M[j * ld + j] = djj;
    const int n = K - j - 1;
    if (team.size() == 1) {
      for (int k = j + 1; k < K; ++k) {
        const double lkj = M[j * ld + k];
        double* colk = M + k * ld;
        const double* colj = M + j * ld;
        for (int i = k; i < K; ++i) colk[i] -= colj[i] * lkj;
      }
    } else {
      for (int t = team.rank(); t < n * n; t += team.size()) {
        const int k = j + 1 + t / n, i = j + 1 + t % n;
        if (i >= k) M[k * ld + i] -= M[j * ld + i] * M[j * ld + k];
      }
    }
  }
  team.sync();
  return true;
}

// Solve (L L^T) X = B in place for nrhs right-hand sides stored as B[r * K + i].
template <class Team>
MTLSAM_HD void qp_chol_solve(const Team& team, int K, int ld, const double* L, double* B, int nrhs) {
  // forward: L y = b, column oriented
  for (int j = 0; j < K; ++j) {
    team.sync();
    const double inv = 1.0 / L[j * ld + j];
    for (int r = 0; r < nrhs; ++r) {
      const double yj = B[r * K + j] * inv;
      for (int i = j + 1 + team.rank(); i < K; i += team.size()) B[r * K + i] -= L[j * ld + i] * yj;
    }
    team.sync();
    if (team.rank() == 0)
      for (int r = 0; r < nrhs; ++r) B[r * K + j] *= inv;
  }
  // backward: L^T x = y, column oriented on L^T (row j of L)
  for (int j = K - 1; j >= 0; --j) {
    team.sync();
    const double inv = 1.0 / L[j * ld + j];
    for (int r = 0; r < nrhs; ++r) {
      const double xj = B[r * K + j] * inv;
      for (int i = team.rank(); i < j; i += team.size()) B[r * K + i] -= L[i * ld + j] * xj;
    }
    team.sync();
    if (team.rank() == 0)
      for (int r = 0; r < nrhs; ++r) B[r * K + j] *= inv;
  }
  team.sync();
}

// Largest alpha in (0, 1] with x + alpha dx >= 0, times the fraction to the boundary.
template <class Team>
MTLSAM_HD double qp_max_step(const Team& team, int K, const double* x, const double* dx) {
  double worst = 0.0;  // max over i of -dx_i / x_i  (alpha <= 1 / worst)
  for (int i = team.rank(); i < K; i += team.size())
    if (dx[i] < 0) worst = qp_dmax(worst, -dx[i] / x[i]);
  worst = team.max(worst);
  double alpha = worst > 0 ? 0.995 / worst : 1.0;
  return alpha < 1.0 ? alpha : 1.0;
}

// ---- exact primal active-set method ----------------------------------------------------------------
//
// The scaled problem  min 1/2 x^T H x + c^T x  s.t.  x >= 0 (and a^T x = beta for the simplex)  is
// solved first by a primal active-set method (Nocedal & Wright, Numerical Optimization, 16.5; with
// q = 0 on the simplex it is Wolfe's min-norm-point algorithm). The free set S holds the variables
// off their bound. M_S = H_SS + rho a_S a_S^T (rho = 1 for the simplex, 0 otherwise) is positive
// definite exactly when H_SS is on the null space of a_S^T; with its Cholesky factor L and the
// forward vectors f_c = L^-1 (-c_S), f_a = L^-1 a_S, the optimum of the face of S is
//     w = L^-T (f_c + tau f_a),   tau = (beta - f_a.f_c) / (f_a.f_a)    (simplex; tau = 0 otherwise)
// (one triangular solve). Each step walks to the face optimum, dropping the first variable that
// would turn negative, or, at the face optimum, prices the bounds z_j = (H x + c - y a)_j and frees
// the most negative one. Nothing is refactored: a freed variable appends a row to L and an entry to
// f_c, f_a (one forward solve, O(s^2)); a dropped one deletes row and column k of L and restores the
// triangle by Givens rotations of the trailing block (a rank-one update, O(s^2)), which rotate f_c
// and f_a along. A variable whose column makes M_S numerically singular (affinely dependent
// gradients, zero curvature) is not added: the iterate moves along the null direction -- a descent
// direction of zero (or, from fp32 rounding, slightly negative) curvature -- to the first bound,
// which leaves the set, and the variable is tried again. A step costs O(K s) (the gradient over the
// free columns) plus O(s^2). The method stops when no bound multiplier is below its rounding level
// (the exact optimum, not merely a point within the KKT target: on badly scaled problems that target,
// relative to max Gamma_ii, cannot tell the optimum of the small gradients from a poor guess), or,
// for a min-norm problem (q = 0), once x^T H x is zero to fp64 rounding (the origin is in the hull:
// optimal, and on a degenerate face the remaining steps only settle multipliers at rounding level).
// Either way the point must meet the KKT conditions to the target of kkt_residual (the dual
// residual, in the units of the unscaled problem, <= tol * max(1, max|q| / max Gamma_ii),
// complementarity exactly, |sum v - 1| <= tol), after one step of iterative refinement on the face
// when needed; otherwise (non-finite values, an
// unbounded direction, the step budget exhausted by degenerate cycling, a face solve that drops the
// variable the pricing just freed, a residual refinement cannot bring down -- in practice: a linear
// term that dwarfs the Jacobi-scaled Gram matrix, or v >= lower with a singular Gram matrix) it
// reports failure and the caller runs the interior-point method.
constexpr double kQpAsSingular = 1e-12;  // relative pivot of M_S below which a column counts as dependent
constexpr double kQpAsPrice = 1e-13;     // a bound multiplier above -kQpAsPrice * (its terms) counts as >= 0
constexpr double kQpInf = 1e300;
constexpr double kQpRound = 1.1102230246251565e-16;  // fp64 unit roundoff, 2^-53
// The active set stands in for the interior point when the iteration budget is one the interior
// point converges within (about 8-15 iterations); a smaller budget asks for the truncated interior
// point itself, which the torch reference (and torch.compile) reproduces.
constexpr int kQpAsMinIter = 20;
constexpr int kQpAsMaxBlock = 4;  // the most variables one pricing frees (8: more drops when rank-deficient)

MTLSAM_QP_INNER int qp_at(const double* S, int p) { return static_cast<int>(S[p]); }

// Team-wide argmin: the smallest value and the smallest index attaining it (index -1: none).
// (v, i): each thread's own best, v = kQpInf and i = -1 when it has no candidate.
template <class Team>
MTLSAM_QP_INNER double qp_argmin(const Team& team, double v, int i, int* idx) {
  const double vmin = -team.max(-v);
  const double im = team.max((i >= 0 && v == vmin) ? -static_cast<double>(i) : -kQpInf);
  *idx = im > -0.5 * kQpInf ? static_cast<int>(-im) : -1;
  return vmin;
}

#if defined(MTLSAM_QP_AVX2)
// qp_first_min for one thread: the minimum in vector registers, then the first index holding it (keys
// are finite or kQpInf, never NaN: the same answer as the scalar scan).
MTLSAM_QP_INNER int qp_first_min_avx2(int K, const double* key) {
  __m256d m0 = _mm256_set1_pd(kQpInf), m1 = m0;
  int i = 0;
  for (; i + 8 <= K; i += 8) {
    m0 = _mm256_min_pd(m0, _mm256_loadu_pd(key + i));
    m1 = _mm256_min_pd(m1, _mm256_loadu_pd(key + i + 4));
  }
  if (i + 4 <= K) {
    m0 = _mm256_min_pd(m0, _mm256_loadu_pd(key + i));
    i += 4;
  }
  m0 = _mm256_min_pd(m0, m1);
  __m128d h = _mm_min_pd(_mm256_castpd256_pd128(m0), _mm256_extractf128_pd(m0, 1));
  double vmin = _mm_cvtsd_f64(_mm_min_sd(h, _mm_unpackhi_pd(h, h)));
  for (; i < K; ++i) vmin = key[i] < vmin ? key[i] : vmin;
  if (!(vmin < kQpInf)) return -1;
  const __m256d target = _mm256_set1_pd(vmin);
  for (i = 0; i + 4 <= K; i += 4) {
    const int hit = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(key + i), target, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; key[i] != vmin; ++i) {
  }
  return i;
}
#endif

// The first index of the smallest of key[0..K) (-1 when every key is kQpInf); each thread reads the
// entries i = rank (mod size) only.
template <class Team>
MTLSAM_QP_INNER int qp_first_min(const Team& team, int K, const double* key) {
#if defined(MTLSAM_QP_AVX2)
  if (team.size() == 1) return qp_first_min_avx2(K, key);
#endif
  double vb = kQpInf;
  int ib = -1;
  for (int i = team.rank(); i < K; i += team.size()) {
    if (key[i] < vb) {
      vb = key[i];
      ib = i;
    }
  }
  int idx;
  qp_argmin(team, vb, ib, &idx);
  return idx;
}

// This thread's part of sum_{lo <= i < n} u_i v_i (one thread: four partial sums, for the vector unit).
template <class Team>
MTLSAM_QP_INNER double qp_dot_part(const Team& team, int lo, int n, const double* u, const double* v) {
  if (team.size() == 1) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int i = lo;
    for (; i + 4 <= n; i += 4) {
      s0 += u[i] * v[i];
      s1 += u[i + 1] * v[i + 1];
      s2 += u[i + 2] * v[i + 2];
      s3 += u[i + 3] * v[i + 3];
    }
    for (; i < n; ++i) s0 += u[i] * v[i];
    return (s0 + s1) + (s2 + s3);
  }
  double s = 0.0;
  for (int i = lo + team.rank(); i < n; i += team.size()) s += u[i] * v[i];
  return s;
}

// L y = b (and L y2 = b2 when b2) in place; L: n x n lower triangle, column-major with ld; inv: the
// reciprocals of its diagonal (multiplications on the sequential chain of the sweep, not divisions).
template <class Team>
MTLSAM_QP_INNER void qp_fwd(const Team& team, int n, int ld, const double* L, const double* inv, double* b, double* b2) {
  const int rk = team.rank(), ts = team.size();
  if (ts == 1 && !b2) {  // one thread: four columns per sweep (a quarter of the short inner loops)
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const double *c0 = L + j * ld, *c1 = c0 + ld, *c2 = c1 + ld, *c3 = c2 + ld;
      const double y0 = b[j] * inv[j];
      const double y1 = (b[j + 1] - c0[j + 1] * y0) * inv[j + 1];
      const double y2 = (b[j + 2] - c0[j + 2] * y0 - c1[j + 2] * y1) * inv[j + 2];
      const double y3 = (b[j + 3] - c0[j + 3] * y0 - c1[j + 3] * y1 - c2[j + 3] * y2) * inv[j + 3];
      b[j] = y0;
      b[j + 1] = y1;
      b[j + 2] = y2;
      b[j + 3] = y3;
      for (int i = j + 4; i < n; ++i) b[i] -= (c0[i] * y0 + c1[i] * y1) + (c2[i] * y2 + c3[i] * y3);
    }
    for (; j < n; ++j) {
      const double* cj = L + j * ld;
      const double yj = b[j] * inv[j];
      b[j] = yj;
      for (int i = j + 1; i < n; ++i) b[i] -= cj[i] * yj;
    }
    return;
  }
  for (int j = 0; j < n; ++j) {
    team.sync();
    const double* col = L + j * ld;
    const double yj = b[j] * inv[j];
    for (int i = j + 1 + rk; i < n; i += ts) b[i] -= col[i] * yj;
    if (b2) {
      const double yj2 = b2[j] * inv[j];
      for (int i = j + 1 + rk; i < n; i += ts) b2[i] -= col[i] * yj2;
    }
  }
  team.sync();
  for (int i = rk; i < n; i += ts) {
    b[i] *= inv[i];
    if (b2) b2[i] *= inv[i];
  }
  team.sync();
}

// L^T x = y (and L^T x2 = y2 when y2) in place, column-oriented on L^T: row j of L is read from its
// mirror in the upper triangle (L[j * ld + q] = L(j, q), q < j), contiguous.
template <class Team>
MTLSAM_QP_INNER void qp_bwd(const Team& team, int n, int ld, const double* L, const double* inv, double* y, double* y2) {
  const int rk = team.rank(), ts = team.size();
  if (ts == 1 && !y2) {  // one thread: four rows per sweep
    int j = n - 1;
    for (; j >= 3; j -= 4) {
      const double *r0 = L + j * ld, *r1 = r0 - ld, *r2 = r1 - ld, *r3 = r2 - ld;  // rows j, j-1, j-2, j-3
      const double x0 = y[j] * inv[j];
      const double x1 = (y[j - 1] - r0[j - 1] * x0) * inv[j - 1];
      const double x2 = (y[j - 2] - r0[j - 2] * x0 - r1[j - 2] * x1) * inv[j - 2];
      const double x3 = (y[j - 3] - r0[j - 3] * x0 - r1[j - 3] * x1 - r2[j - 3] * x2) * inv[j - 3];
      y[j] = x0;
      y[j - 1] = x1;
      y[j - 2] = x2;
      y[j - 3] = x3;
      for (int q = 0; q < j - 3; ++q) y[q] -= (r0[q] * x0 + r1[q] * x1) + (r2[q] * x2 + r3[q] * x3);
    }
    for (; j >= 0; --j) {
      const double* rj = L + j * ld;
      const double xj = y[j] * inv[j];
      y[j] = xj;
      for (int q = 0; q < j; ++q) y[q] -= rj[q] * xj;
    }
    return;
  }
  for (int j = n - 1; j >= 0; --j) {
    team.sync();
    const double* row = L + j * ld;
    const double xj = y[j] * inv[j];
    for (int q = rk; q < j; q += ts) y[q] -= row[q] * xj;
    if (y2) {
      const double xj2 = y2[j] * inv[j];
      for (int q = rk; q < j; q += ts) y2[q] -= row[q] * xj2;
    }
  }
  team.sync();
  for (int i = rk; i < n; i += ts) {
    y[i] *= inv[i];
    if (y2) y2[i] *= inv[i];
  }
  team.sync();
}

// Delete position k of the free set (s: the size before): row and column k of the factor (rows below
// move up, columns right of k move left), then Givens rotations restore the triangle -- the rank-one
// update L22 L22^T + x x^T of the trailing block, x the old column k below the diagonal -- and
// rotate the forward vectors fc, fa (their entry k plays the part of x), and renews inv (the
// reciprocals of the diagonal) from k on. Scratch: xr, dn, nc, na.
template <class Team>
MTLSAM_QP_INNER void qp_as_remove(const Team& team, int s, int ld, double* L, double* inv, double* S, double* pos,
                            double* fc, double* fa, int k, double* xr, double* dn, double* nc, double* na) {
  const int rk = team.rank(), ts = team.size();
  team.sync();
  for (int r = k + 1 + rk; r < s; r += ts) xr[r - 1] = L[k * ld + r];
  double xc = fc[k], xa = fa[k];  // every thread, before the shift below
  if (rk == 0) pos[qp_at(S, k)] = -1.0;
  team.sync();
  if (ts == 1) {  // one thread, column by column (contiguous): columns left of k lose entry k (the
    // rows below move up); column c >= k becomes column c + 1 without its entry k: here the mirror
    // left of k, the lower part is read from column c + 1 by the rotations below
    for (int col = 0; col < k; ++col)
      for (int r = k; r < s - 1; ++r) L[col * ld + r] = L[col * ld + r + 1];
    for (int col = k; col < s - 1; ++col)
      for (int q = 0; q < k; ++q) L[col * ld + q] = L[(col + 1) * ld + q];
  } else {
    for (int r = k; r < s - 1; ++r) {  // row r <- row r + 1: reads row r + 1 only, writes row r only
      for (int col = rk; col <= r; col += ts) L[col * ld + r] = L[(col < k ? col : col + 1) * ld + r + 1];
      team.sync();
    }
  }
  for (int base = k; base < s - 1; base += ts) {  // S, fc, fa: [p] <- [p + 1], in chunks of the team size
    const int p = base + rk;
    const bool in = p < s - 1;
    const double vs = in ? S[p + 1] : 0.0, vc = in ? fc[p + 1] : 0.0, va = in ? fa[p + 1] : 0.0;
    team.sync();
    if (in) {
      S[p] = vs;
      fc[p] = vc;
      fa[p] = va;
      pos[static_cast<int>(vs)] = p;
    }
    team.sync();
  }
  const int n = s - 1;
  for (int i = k; i < n; ++i) {  // rotation of (column i, x): zeroes x_i (LINPACK dchud)
    team.sync();
    double* col = L + i * ld;
    const double* src = ts == 1 ? col + ld + 1 : col;  // one thread: column i + 1, one row down
    const double lii = src[i], xi = xr[i];
    const double r = sqrt(lii * lii + xi * xi);
    const double ir = 1.0 / r;
    const double cs = lii * ir, sn = xi * ir;
    for (int j = i + 1 + rk; j < n; j += ts) {
      const double lj = src[j];
      col[j] = cs * lj + sn * xr[j];
      xr[j] = cs * xr[j] - sn * lj;
    }
    const double fci = fc[i], fai = fa[i];
    if (rk == 0) {  // written after the sweep: every thread reads col[i], fc[i], fa[i] here
      dn[i] = r;
      nc[i] = cs * fci + sn * xc;
      na[i] = cs * fai + sn * xa;
    }
    xc = cs * xc - sn * fci;
    xa = cs * xa - sn * fai;
  }
  team.sync();
  for (int i = k + rk; i < n; i += ts) {
    L[i * ld + i] = dn[i];
    inv[i] = 1.0 / dn[i];
    fc[i] = nc[i];
    fa[i] = na[i];
  }
  // the mirror of the rows that changed (upper triangle, see qp_bwd): the rotated trailing block
  // (one thread already moved these rows' entries left of column k, in the shift above)
  for (int r = k; r < n; ++r)
    for (int q = (ts == 1 ? k : 0) + rk; q < r; q += ts) L[r * ld + q] = L[q * ld + r];
  team.sync();
}

// Optimum of the face S from the right side b (in w; out: the solution): H_SS w - b in span(a_S),
// a_S^T w = target (simplex); H_SS w = b otherwise. Two right sides through L (iterative refinement).
template <class Team>
MTLSAM_QP_INNER void qp_as_face(const Team& team, int s, int ld, const double* L, const double* inv, const double* a,
                          const double* S, bool simplex, double target, double* w, double* m) {
  const int rk = team.rank(), ts = team.size();
  if (simplex)
    for (int p = rk; p < s; p += ts) m[p] = a[qp_at(S, p)];
  team.sync();
  qp_fwd(team, s, ld, L, inv, w, simplex ? m : nullptr);
  qp_bwd(team, s, ld, L, inv, w, simplex ? m : nullptr);
  if (simplex) {
    double aw = 0.0, am = 0.0;
    for (int p = rk; p < s; p += ts) {
      const double ai = a[qp_at(S, p)];
      aw += ai * w[p];
      am += ai * m[p];
    }
    aw = team.sum(aw);
    am = team.sum(am);
    const double t = (target - aw) / am;
    for (int p = rk; p < s; p += ts) w[p] += t * m[p];
  }
  team.sync();
}

// Returns the number of steps (>= 0) with the solution in x, or -1 (failure: x is garbage).
// min_norm: c = 0, so the objective is x^T H x >= 0 (enables the zero-objective stop below).
// Workspace: g, inv, S, pos, fc, fa, w, m, l, v, xr, dn: K doubles each; L: K x ld.
template <class Team>
MTLSAM_HD int qp_active_set(const Team& team, int K, int ld, const double* H, const double* c, const double* a,
                            const double* d, double beta, bool simplex, bool min_norm, double tol, double l_scale,
                            int max_steps,
                            double* x, double* g, double* L, double* inv, double* S, double* pos, double* fc,
                            double* fa, double* w, double* m, double* l, double* v, double* xr, double* dn) {
  const int rk = team.rank(), ts = team.size();
  const double rho = simplex ? 1.0 : 0.0;
  const double dtol = tol * l_scale;
  for (int i = rk; i < K; i += ts) {
    x[i] = 0.0;
    pos[i] = -1.0;
  }
  team.sync();
  int s = 0, steps = 0;
  bool solve = false, refined = false;
  int nfresh = 0;  // the variables freed at zero for this face solve: the last nfresh of S
  int block = 0;   // how many candidates the last pricing freed at once (0: none yet)
  bool dropped = false;  // a variable left the free set since the last pricing
  if (simplex) {  // start at the best vertex
    double best = kQpInf;
    int bi = -1;
    for (int i = rk; i < K; i += ts) {
      const double ui = beta / a[i];
      const double f = ui * (0.5 * H[i * ld + i] * ui + c[i]);
      if (f < best) {
        best = f;
        bi = i;
      }
    }
    int i0;
    qp_argmin(team, best, bi, &i0);
    if (i0 < 0) return -1;
    if (rk == 0) {
      const double l0 = sqrt(H[i0 * ld + i0] + rho * a[i0] * a[i0]);
      x[i0] = beta / a[i0];
      S[0] = i0;
      pos[i0] = 0.0;
      L[0] = l0;
      inv[0] = 1.0 / l0;
      fc[0] = -c[i0] / l0;
      fa[0] = a[i0] / l0;
    }
    s = 1;
    team.sync();
  }
  for (;;) {
    if (solve) {  // ---- the face optimum w = L^-T (fc + tau fa), then the ratio test ----
      double tau = 0.0;
      if (simplex) {
        const double ac = min_norm ? 0.0 : team.sum(qp_dot_part(team, 0, s, fa, fc));  // (c = 0: f_c = 0)
        const double aa = team.sum(qp_dot_part(team, 0, s, fa, fa));
        tau = (beta - ac) / aa;
      }
      for (int p = rk; p < s; p += ts) w[p] = fc[p] + tau * fa[p];
      qp_bwd(team, s, ld, L, inv, w, nullptr);
      double tb = kQpInf;
      int kb = -1;
      for (int p = rk; p < s; p += ts) {
        if (!(w[p] > 0)) {
          const double xi = x[qp_at(S, p)];
          const double t = xi > 0 ? xi / (xi - w[p]) : 0.0;
          if (t < tb) {
            tb = t;
            kb = p;
          }
        }
      }
      int kmin;
      const double tmin = qp_argmin(team, tb, kb, &kmin);
      // A variable freed at zero leaves at once (a step of length zero) when the others freed with it
      // take its place; the last one left must grow (its multiplier was negative): dropping it means
      // the face solve and the pricing disagree (cancellation of a huge linear term).
      if (kmin >= 0 && kmin >= s - nfresh) {
        if (nfresh == 1) return -1;
        --nfresh;
      } else {
        nfresh = 0;
      }
      if (kmin < 0) {
        for (int p = rk; p < s; p += ts) x[qp_at(S, p)] = w[p];
        solve = false;
        team.sync();
      } else {
        for (int p = rk; p < s; p += ts) {
          const int i = qp_at(S, p);
          x[i] += tmin * (w[p] - x[i]);
        }
        team.sync();
        if (rk == 0) x[qp_at(S, kmin)] = 0.0;
        qp_as_remove(team, s, ld, L, inv, S, pos, fc, fa, kmin, xr, dn, l, v);
        --s;
        dropped = true;
        if (++steps >= max_steps) return -1;
        continue;
      }
    }
    // ---- pricing at the face optimum: g = H x + c over the free columns ----
    // Each g_i is c_i plus the free columns' terms in the order of S, accumulated in a register; one
    // thread takes 16 rows at a time (four vectors of accumulators, no store until the sum is done).
    int i0 = 0;  // rows below i0 are done
    if (ts == 1) {
      constexpr int kRows = 16;
      for (; i0 + 2 * kRows <= K; i0 += 2 * kRows) {  // two blocks: eight independent FMA chains
        double acc0[kRows], acc1[kRows];
        for (int r = 0; r < kRows; ++r) {
          acc0[r] = c[i0 + r];
          acc1[r] = c[i0 + kRows + r];
        }
        for (int p = 0; p < s; ++p) {
          const int j = qp_at(S, p);
          const double xj = x[j];
          const double* hj = H + j * ld + i0;
          for (int r = 0; r < kRows; ++r) acc0[r] += hj[r] * xj;
          for (int r = 0; r < kRows; ++r) acc1[r] += hj[kRows + r] * xj;
        }
        for (int r = 0; r < kRows; ++r) {
          g[i0 + r] = acc0[r];
          g[i0 + kRows + r] = acc1[r];
        }
      }
      for (; i0 + kRows <= K; i0 += kRows) {
        double acc[kRows];
        for (int r = 0; r < kRows; ++r) acc[r] = c[i0 + r];
        for (int p = 0; p < s; ++p) {
          const int j = qp_at(S, p);
          const double xj = x[j];
          const double* hj = H + j * ld + i0;
          for (int r = 0; r < kRows; ++r) acc[r] += hj[r] * xj;
        }
        for (int r = 0; r < kRows; ++r) g[i0 + r] = acc[r];
      }
    }
    for (int i = i0 + rk; i < K; i += ts) {  // a team thread's rows; one thread's last K % 16
      double acc = c[i];
      for (int p = 0; p < s; ++p) acc += H[qp_at(S, p) * ld + i] * x[qp_at(S, p)];
      g[i] = acc;
    }
    team.sync();
    // (x is zero off the free set: dv = sum_i d_i x_i = sum v, xg = x^T (H x + c))
    double y = 0.0, xs = 0.0, dv = 0.0, xg = 0.0;
    {
      double ag = 0.0, aa = 0.0;
      for (int p = rk; p < s; p += ts) {
        const int i = qp_at(S, p);
        ag += a[i] * g[i];
        aa += a[i] * a[i];
        xs += x[i];
        dv += d[i] * x[i];
        xg += x[i] * g[i];
      }
      if (simplex) {
        ag = team.sum(ag);
        aa = team.sum(aa);
        y = ag / aa;
      }
      xs = team.sum(xs);
      xg = team.sum(xg);
    }
    // pricing keys in w (z_i = g_i - y a_i of the bounds below their rounding level, branch-free;
    // w is free until the next face solve)
    int nonfinite = 0;
    for (int i = rk; i < K; i += ts) {
      const double zi = g[i] - y * a[i];
      nonfinite |= !(zi - zi == 0.0);
      const bool key = (pos[i] < 0.0) & (zi < -kQpAsPrice * (fabs(c[i]) + fabs(y * a[i]) + xs));
      w[i] = key ? zi : kQpInf;
    }
    if (team.max(nonfinite ? 1.0 : 0.0) > 0) return -1;
    int j = qp_first_min(team, K, w);
    // Converged? When no bound multiplier is below its rounding level; or, with c = 0 (min-norm), when
    // the objective x^T H x is zero to fp64 rounding: H is PSD, so x is optimal to the precision of
    // the arithmetic -- the origin lies in the hull, and the steps left would move along zero
    // curvature only, to settle the multipliers at the rounding level. Either way the dual residual
    // must meet the target, in the units of the unscaled problem: |z_i| / d_i on the free set,
    // -z_i / d_i on the bounds (kkt_residual's measure).
    if (j < 0 || (min_norm && xg <= kQpRound * xs * xs)) {
      int above = 0;  // some |z_i| > dtol d_i (no division; vectorizes)
      for (int i = rk; i < K; i += ts) {
        const double zi = g[i] - y * a[i];
        above |= (pos[i] >= 0 ? fabs(zi) : -zi) > dtol * d[i];
      }
      const double feas = simplex ? fabs(1.0 - team.sum(dv)) : 0.0;  // |sum v - 1|
      if (team.max(above) == 0 && feas <= tol) return steps;
    }
    if (j < 0) {  // the residual is above the target: one refinement step, then give up
      if (refined) return -1;
      // one step of iterative refinement on the face: H d = -(g_S - y a_S) + y' a_S, a_S^T d = beta - a^T x
      refined = true;
      double ax = 0.0;
      for (int p = rk; p < s; p += ts) {
        const int i = qp_at(S, p);
        w[p] = y * a[i] - g[i];
        ax += a[i] * x[i];
      }
      qp_as_face(team, s, ld, L, inv, a, S, simplex, beta - team.sum(ax), w, m);
      for (int p = rk; p < s; p += ts) {
        const int i = qp_at(S, p);
        const double xi = x[i] + w[p];
        x[i] = xi > 0 ? xi : 0.0;
      }
      team.sync();
      continue;
    }
    // ---- free j, and more: append to the factor, or walk along the null direction ----
    // While no variable has left the free set, each pricing frees twice as many of its candidates
    // (most negative first, up to kQpAsMaxBlock): one pricing and one face solve for several appends.
    // A drop resets the block to one. Only the first candidate of a block may walk along a null
    // direction; a later one whose column is numerically dependent, or any after such a walk (the
    // keys are stale then), ends the block.
    block = (dropped || block == 0) ? 1 : (2 * block < kQpAsMaxBlock ? 2 * block : kQpAsMaxBlock);
    dropped = false;
    nfresh = 0;
    for (int added = 0; added < block;) {
      const double mjj = H[j * ld + j] + rho * a[j] * a[j];
      bool appended = false, walked = false;
      for (;;) {
        for (int p = rk; p < s; p += ts) {
          const int i = qp_at(S, p);
          l[p] = H[j * ld + i] + rho * a[i] * a[j];
        }
        qp_fwd(team, s, ld, L, inv, l, nullptr);
        const double ll = team.sum(qp_dot_part(team, 0, s, l, l));
        const double d2 = mjj - ll;
        if (d2 > kQpAsSingular * mjj) {
          const double lc = min_norm ? 0.0 : team.sum(qp_dot_part(team, 0, s, l, fc));
          const double la = team.sum(qp_dot_part(team, 0, s, l, fa));
          const double djj = sqrt(d2);
          for (int p = rk; p < s; p += ts) {
            L[p * ld + s] = l[p];
            L[s * ld + p] = l[p];  // mirror (row s of L, for qp_bwd)
          }
          nfresh = x[j] == 0.0 ? nfresh + 1 : 0;
          if (rk == 0) {
            L[s * ld + s] = djj;
            inv[s] = 1.0 / djj;
            fc[s] = (-c[j] - lc) / djj;
            fa[s] = (rho > 0 ? a[j] - la : 0.0) / djj;
            S[s] = j;
            pos[j] = s;
          }
          ++s;
          team.sync();
          solve = true;
          refined = false;
          appended = true;
          break;
        }
        if (added > 0) break;  // a later candidate, dependent: the block ends before it
        // numerically dependent: walk along the null direction [-L^-T l; 1] to the first bound
        for (int p = rk; p < s; p += ts) v[p] = l[p];
        qp_bwd(team, s, ld, L, inv, v, nullptr);
        double tb = kQpInf;
        int kb = -1;
        for (int p = rk; p < s; p += ts) {
          if (v[p] > 0) {
            const double t = x[qp_at(S, p)] / v[p];
            if (t < tb) {
              tb = t;
              kb = p;
            }
          }
        }
        int kmin;
        const double tmax = qp_argmin(team, tb, kb, &kmin);
        if (kmin < 0) return -1;  // no bound ahead: unbounded (or lost in rounding)
        for (int p = rk; p < s; p += ts) x[qp_at(S, p)] -= tmax * v[p];
        team.sync();
        if (rk == 0) {
          x[j] += tmax;
          x[qp_at(S, kmin)] = 0.0;
        }
        qp_as_remove(team, s, ld, L, inv, S, pos, fc, fa, kmin, xr, dn, l, v);
        --s;
        walked = dropped = true;
        if (++steps >= max_steps) return -1;
      }
      if (!appended) break;
      if (++steps >= max_steps) return -1;
      if (++added == block || walked) break;
      // the next candidate: the smallest key left (each thread reads only its own keys)
      if (j % ts == rk) w[j] = kQpInf;
      j = qp_first_min(team, K, w);
      if (j < 0) break;
    }
  }
}

// Solve one problem. gram: K x K (row stride K), q / lower: K or null; out: K.
// Every thread of the team calls this with the same arguments; ws is shared by the team.
// Returns the number of active-set steps, or of interior-point iterations when it ran.
template <class Team, class T>
MTLSAM_HD int qp_solve_one(const Team& team, int K, const T* gram, const T* q, const T* lower, bool simplex,
                           int max_iter, double tol, double* ws, T* out) {
  const int ld = qp_ld(K);
  const int rk = team.rank(), ts = team.size();
  double* H = ws;
  double* L = H + static_cast<int64_t>(K) * ld;
  double* d = L + static_cast<int64_t>(K) * ld;
  double* c = d + K;
  double* lo = c + K;
  double* a = lo + K;
  double* x = a + K;
  double* z = x + K;
  double* rd = z + K;
  double* rhs = rd + K;  // 4 * K: [p | m] for the predictor, [p] for the corrector
  double* dxa = rhs + 4 * K;
  double* dza = dxa + K;
  double* dx = dza + K;
  double* dz = dx + K;
  double* tmp = dz + K;  // 2 * K
  double* zrow = tmp + 2 * K;  // 1: Gamma_ii = 0 (a zero gradient)

  // ---- scaling: H = D sym(Gamma) D / ref with unit diagonal, c = D q / ref; finiteness -------------
  // sym(Gamma) = (Gamma + Gamma^T) / 2; D, ref from the diagonal (which symmetrizing leaves alone).
  double bad = 0.0;
#if defined(MTLSAM_QP_AVX2)
  const bool tiles = ts == 1;  // one thread: qp_scale_tiles reads Gamma itself
#else
  const bool tiles = false;
#endif
  if (ts == 1 && !tiles) {  // one thread: first a contiguous copy (vectorized); the pairs (i, j) in place below
    for (int j = 0; j < K; ++j) {
      const T* gj = gram + static_cast<int64_t>(j) * K;
      double* hj = H + j * ld;
      for (int i = 0; i < K; ++i) hj[i] = qp_load(gj, i);
    }
  }
  double ref = 0.0, qref = 0.0;
  for (int i = rk; i < K; i += ts) {
    const double qi = q ? qp_load(q, i) : 0.0;
    c[i] = qi;
    if (!qp_isfinite(qi)) bad = 1.0;
    ref = qp_dmax(ref, qp_load(gram, static_cast<int64_t>(i) * K + i));
    qref = qp_dmax(qref, fabs(qi));
  }
  ref = team.max(ref);
  qref = team.max(qref);
  if (!(ref > 0)) ref = qref > 0 ? qref : 1.0;  // a zero Gram leaves the linear term to set the scale
  // kkt_residual's step length max(max Gamma_ii, max |q|), relative to ref: the active set's dual target
  const double l_scale = qp_dmax(1.0, qref / ref);
  for (int i = rk; i < K; i += ts) {
    const double rel = qp_load(gram, static_cast<int64_t>(i) * K + i) / ref;
    d[i] = rel > 1e-300 ? 1.0 / sqrt(rel) : 1.0;
    zrow[i] = (rel > 1e-300 || !(c[i] >= 0)) ? 0.0 : 1.0;  // zero gradient, cost q_i >= 0
  }
  team.sync();
  // entry (i, j) and its mirror get the same value: sym * (d_lo / ref) * d_hi, lo = min(i, j)
  if (tiles) {
#if defined(MTLSAM_QP_AVX2)
    if (!qp_scale_tiles(K, ld, gram, d, ref, x, H)) bad = 1.0;  // (x: scratch until the active set)
#endif
  } else if (ts == 1) {
    int nonfinite = 0;
    for (int j = 0; j < K; ++j) {
      double* hj = H + j * ld;
      const double dj = d[j] / ref;
      nonfinite |= !(hj[j] - hj[j] == 0.0);
      hj[j] = hj[j] * dj * d[j] + kQpProx;
      for (int i = j + 1; i < K; ++i) {
        const double v = 0.5 * (hj[i] + H[i * ld + j]);
        nonfinite |= !(v - v == 0.0);
        const double h = v * dj * d[i];
        hj[i] = h;
        H[i * ld + j] = h;
      }
    }
    if (nonfinite) bad = 1.0;
  } else {
    for (int t = rk, i = rk / K, j = rk % K; t < K * K; t += ts, qp_next_pair(K, ts, &i, &j)) {
      const double v = 0.5 * (qp_load(gram, static_cast<int64_t>(i) * K + j) + qp_load(gram, static_cast<int64_t>(j) * K + i));
      if (!qp_isfinite(v)) bad = 1.0;
      const int lo = i < j ? i : j, hi = i < j ? j : i;
      H[j * ld + i] = v * (d[lo] / ref) * d[hi] + (i == j ? kQpProx : 0.0);
    }
  }
  bad = team.max(bad);
  if (bad > 0) {
    for (int i = rk; i < K; i += ts) out[i] = static_cast<T>(NAN);
    team.sync();
    return 0;
  }
  for (int i = rk; i < K; i += ts) c[i] = c[i] / ref * d[i];
  team.sync();

  double beta = 0.0;
  if (simplex) {
    double dm = 0.0;
    for (int i = rk; i < K; i += ts) dm = qp_dmax(dm, d[i]);
    dm = team.max(dm);
    for (int i = rk; i < K; i += ts) {
      a[i] = d[i] / dm;
      lo[i] = 0.0;
    }
    beta = 1.0 / dm;
  } else {
    for (int i = rk; i < K; i += ts) {
      lo[i] = lower ? qp_load(lower, i) / d[i] : 0.0;
      a[i] = 0.0;
    }
    team.sync();
    for (int i = rk; i < K; i += ts) {  // shift u = x + lo, x >= 0
      double s = 0.0;
      for (int k = 0; k < K; ++k) s += H[k * ld + i] * lo[k];
      tmp[i] = s;
    }
    team.sync();
    for (int i = rk; i < K; i += ts) c[i] += tmp[i];
  }
  team.sync();
  double cmax = 0.0;
  for (int i = rk; i < K; i += ts) cmax = qp_dmax(cmax, fabs(c[i]));
  cmax = team.max(cmax);

  // ---- exact active-set method first; the interior point below is its fallback ---------------------
  // (workspace: x; g in rd; the reciprocal diagonal of the factor in z; the free set and positions in
  // dxa, dza; f_c, f_a in tmp; w, m, l, v in rhs; scratch in dx, dz -- all rewritten by the interior
  // point when it runs)
  int it = 0;
  const int as_steps =
      max_iter >= kQpAsMinIter
          ? qp_active_set(team, K, ld, H, c, a, d, beta, simplex, cmax == 0.0, tol, l_scale, 4 * K + 16, x, rd, L, z,
                          dxa, dza, tmp, tmp + K, rhs, rhs + K, rhs + 2 * K, rhs + 3 * K, dx, dz)
          : -1;
  if (as_steps >= 0) {
    it = as_steps;
  } else {  // the interior point: the active set failed (or a truncated budget was asked for)
    // The start and the stopping rule in the units of v, as the reference (mtlsam_fast/ops/qp.py):
    // the centre v = 1/K of the simplex with x_i z_i = 1/K for every variable (z_u = d z_v, z_v = 1);
    // under "lower", x = z = 1.
    for (int i = rk; i < K; i += ts) {
      x[i] = simplex ? beta / (K * a[i]) : 1.0;
      z[i] = simplex ? d[i] : 1.0;
    }
    team.sync();
    double y = 0.0;
    double prox = kQpProx;  // current proximal term on the diagonal of H (grows if H is indefinite)
    for (; it < max_iter; ++it) {
      // ---- residuals and convergence ---------------------------------------------------------
      // converged when the residuals are small against the problem's own magnitude, in v-units: the
      // gradient's terms |g_i| + |c_i| and the multiplier |y| of sum v = 1 (2 f* for a min-norm
      // problem, however tiny the Gram matrix)
      double rdmax = 0.0, gscale = 0.0, xz = 0.0, ax = 0.0;
      for (int i = rk; i < K; i += ts) {
        double g = c[i];
        for (int k = 0; k < K; ++k) g += H[k * ld + i] * x[k];
        const double r = g - z[i] - (simplex ? a[i] * y : 0.0);
        rd[i] = r;
        rdmax = qp_dmax(rdmax, fabs(r) / d[i]);
        gscale = qp_dmax(gscale, (fabs(g) + fabs(c[i])) / d[i]);
        xz += x[i] * z[i];
        ax += a[i] * x[i];
      }
      rdmax = team.max(rdmax);
      const double scale = qp_dmax(qp_dmax(team.max(gscale), simplex ? fabs(y) * beta : 0.0), 1e-300);
      const double mu = team.sum(xz) / K;
      const double rp = simplex ? beta - team.sum(ax) : 0.0;
      bool conv = rdmax <= tol * scale && mu <= tol * tol * scale;
      if (simplex) conv = conv && fabs(rp) <= tol * beta;
      if (conv || !(mu == mu)) break;  // uniform across the team

      // ---- Newton matrix and its factorization ---------------------------------------------------
      // A failed factorization means H is numerically indefinite (fp32 rounding of a singular Gram
      // matrix leaves eigenvalues of about -1e-7): the proximal term grows tenfold, becomes part of
      // the objective (so the residuals stay consistent and Newton converges on the convexified
      // problem) and the matrix is refactored. The solution moves by O(prox), below the KKT target.
      bool factored = false;
      for (;;) {
        for (int t = rk, j = rk / K, i = rk % K; t < K * K; t += ts, qp_next_pair(K, ts, &j, &i)) {
          if (i >= j) L[j * ld + i] = H[j * ld + i] + (i == j ? z[i] / x[i] + kQpNewtonReg : 0.0);
        }
        if (qp_cholesky(team, K, ld, L, kQpNewtonReg)) {
          factored = true;
          break;
        }
        if (prox >= kQpMaxProx) break;
        const double step = prox * 9.0;
        prox *= 10.0;
        team.sync();
        for (int i = rk; i < K; i += ts) {  // H += step I; c = c0 + H lo and r_d = H x + c - z - a y follow
          H[i * ld + i] += step;
          c[i] += step * lo[i];
          rd[i] += step * (x[i] + lo[i]);
        }
        team.sync();
      }
      if (!factored) break;  // uniform: keep the last finite iterate
      for (int i = rk; i < K; i += ts) {
        rhs[i] = -rd[i] - z[i];  // predictor: rc = -x z  ->  rhs = -r_d + rc / x
        rhs[K + i] = a[i];
      }
      team.sync();
      qp_chol_solve(team, K, ld, L, rhs, simplex ? 2 : 1);
      // m = M^-1 a lives in rhs[K..2K) and is reused by the corrector
      double am = 0.0;
      if (simplex) {
        for (int i = rk; i < K; i += ts) am += a[i] * rhs[K + i];
        am = team.sum(am);
      }
      // predictor step
      double ap = 0.0;
      if (simplex) {
        for (int i = rk; i < K; i += ts) ap += a[i] * rhs[i];
        ap = team.sum(ap);
      }
      const double dya = simplex ? (rp - ap) / am : 0.0;
      for (int i = rk; i < K; i += ts) {
        dxa[i] = rhs[i] + (simplex ? rhs[K + i] * dya : 0.0);
        dza[i] = (-x[i] * z[i] - z[i] * dxa[i]) / x[i];
      }
      team.sync();
      const double alpha_a = qp_dmin(qp_max_step(team, K, x, dxa), qp_max_step(team, K, z, dza));
      double maff = 0.0;
      for (int i = rk; i < K; i += ts) maff += (x[i] + alpha_a * dxa[i]) * (z[i] + alpha_a * dza[i]);
      const double mu_aff = team.sum(maff) / K;
      double sig = mu_aff / qp_dmax(mu, 1e-300);
      sig = sig < 0 ? 0.0 : (sig > 1 ? 1.0 : sig);
      const double sigma = sig * sig * sig;
      // corrector
      for (int i = rk; i < K; i += ts) {
        const double rc = -x[i] * z[i] - dxa[i] * dza[i] + sigma * mu;
        tmp[i] = rc;
        rhs[2 * K + i] = -rd[i] + rc / x[i];
      }
      qp_chol_solve(team, K, ld, L, rhs + 2 * K, 1);
      double ap2 = 0.0;
      if (simplex) {
        for (int i = rk; i < K; i += ts) ap2 += a[i] * rhs[2 * K + i];
        ap2 = team.sum(ap2);
      }
      const double dy = simplex ? (rp - ap2) / am : 0.0;
      for (int i = rk; i < K; i += ts) {
        dx[i] = rhs[2 * K + i] + (simplex ? rhs[K + i] * dy : 0.0);
        dz[i] = (tmp[i] - z[i] * dx[i]) / x[i];
      }
      team.sync();
      const double alpha = qp_dmin(qp_max_step(team, K, x, dx), qp_max_step(team, K, z, dz));
      for (int i = rk; i < K; i += ts) {
        x[i] += alpha * dx[i];
        z[i] += alpha * dz[i];
      }
      y += alpha * dy;
      team.sync();
    }
  }

  // ---- back to the original variables ----------------------------------------------------------
  double vsum = 0.0;
  for (int i = rk; i < K; i += ts) {
    // lower bound: a variable with a zero row in Gamma and cost >= 0 is optimal at its bound (with
    // cost 0: anywhere above it; the bound is the defined, minimal answer) -- as the reference
    const double xi = (!simplex && zrow[i] > 0) ? 0.0 : x[i];
    double v = (xi + lo[i]) * d[i];
    if (simplex) {
      v = v > 0 ? v : 0.0;
      vsum += v;
    } else {
      const double lb = lower ? qp_load(lower, i) : 0.0;  // the bound itself, not lo / d * d
      v = v > lb ? v : lb;
    }
    tmp[K + i] = v;
  }
  if (simplex) vsum = team.sum(vsum);
  team.sync();
  for (int i = rk; i < K; i += ts) out[i] = static_cast<T>(simplex ? tmp[K + i] / vsum : tmp[K + i]);
  team.sync();
  return it;
}

// ---- CAGrad's inner problem: min q^T v + r sqrt(v^T Gamma v) over the simplex -------------------------
//
// A port of the reference's barrier method (mtlsam_fast/ops/qp.py, _barrier_norm; docs/ARCHITECTURE.md
// §4) on the same Jacobi-scaled problem  min c^T x + r sqrt(x^T H x)  s.t. x >= 0, a^T x = beta: the
// second-order-cone barrier eliminated in closed form (t = rho + sqrt(rho^2 + w^2), rho = mu / r),
// damped Newton steps on Phi_mu with the best of the fixed grid alpha_max 2^-j (j < kQpNormLsSteps) and
// the damped step 1 / (1 + lambda), mu shrunk by kQpNormMuShrink once centred (lambda <= kQpNormCentred),
// frozen at mu_final = tol^2 relative or when the Newton matrix stops factoring; the same expressions in
// the same order as the reference (sums may round in another order), the same iteration budget.
constexpr double kQpNormMuShrink = 100.0;
constexpr double kQpNormCentred = 2.0;
constexpr double kQpNormW2Err = 2.220446049250313e-16;  // 2^-52: relative rounding of x^T H x, per term
constexpr int kQpNormLsSteps = 8;

// Phi_mu at cand = x + s dx (up to a constant in x); every thread returns the same value (inf when not
// finite). cand: K doubles of workspace.
template <class Team>
MTLSAM_HD double qp_norm_phi(const Team& team, int K, int ld, const double* H, const double* c, double r, double rho,
                             double mu, double w2_err, const double* x, const double* dx, double s, double* cand) {
  const int rk = team.rank(), ts = team.size();
  team.sync();
  for (int i = rk; i < K; i += ts) cand[i] = x[i] + s * dx[i];
  team.sync();
  double lin = 0.0, quad = 0.0, logs = 0.0;
  for (int i = rk; i < K; i += ts) {
    double hi = 0.0;
    for (int k = 0; k < K; ++k) hi += H[k * ld + i] * cand[k];
    quad += cand[i] * hi;
    lin += c[i] * cand[i];
    logs += log(cand[i]);
  }
  lin = team.sum(lin);
  quad = team.sum(quad);
  logs = team.sum(logs);
  const double w2 = qp_dmax(quad, 0.0) + w2_err;
  const double t = rho + sqrt(rho * rho + w2);
  const double norm_term = r > 0 ? r * t - mu * log(t) : 0.0;
  const double phi = lin + norm_term - mu * logs;
  return qp_isfinite(phi) ? phi : kQpInf;
}

// Solve one problem of the norm objective. gram: K x K, q: K or null, r: the norm coefficient; out: K.
// Every thread of the team calls this with the same arguments; ws (qp_workspace_doubles(K)) is shared.
// Returns the number of iterations. A non-finite input or a negative r gives NaN weights.
template <class Team, class T>
MTLSAM_HD int qp_solve_norm_one(const Team& team, int K, const T* gram, const T* q, double r_in, int max_iter,
                                double tol, double* ws, T* out) {
  const int ld = qp_ld(K);
  const int rk = team.rank(), ts = team.size();
  double* H = ws;
  double* L = H + static_cast<int64_t>(K) * ld;
  double* d = L + static_cast<int64_t>(K) * ld;
  double* c = d + K;
  double* a = c + K;
  double* x = a + K;
  double* Hx = x + K;
  double* g = Hx + K;
  double* rhs = g + K;  // 2 * K: [p | m]
  double* dx = rhs + 2 * K;
  double* aHx = dx + K;  // |H| x, then H dx
  double* cand = aHx + K;

  // ---- scaling, as qp_solve_one without the proximal term (the reference's) ---------------------------
  double ref = 0.0, qref = 0.0, bad = 0.0;
  for (int i = rk; i < K; i += ts) {
    const double qi = q ? qp_load(q, i) : 0.0;
    c[i] = qi;
    if (!qp_isfinite(qi)) bad = 1.0;
    ref = qp_dmax(ref, qp_load(gram, static_cast<int64_t>(i) * K + i));
    qref = qp_dmax(qref, fabs(qi));
  }
  ref = team.max(ref);
  qref = team.max(qref);
  if (!(ref > 0)) ref = qref > 0 ? qref : 1.0;
  for (int i = rk; i < K; i += ts) {
    const double rel = qp_load(gram, static_cast<int64_t>(i) * K + i) / ref;
    d[i] = rel > 1e-300 ? 1.0 / sqrt(rel) : 1.0;
  }
  team.sync();
  for (int t = rk; t < K * K; t += ts) {
    const int i = t / K, j = t % K;
    const double v = 0.5 * (qp_load(gram, static_cast<int64_t>(i) * K + j) + qp_load(gram, static_cast<int64_t>(j) * K + i));
    if (!qp_isfinite(v)) bad = 1.0;
    H[j * ld + i] = v / ref * d[i] * d[j];
  }
  const double r = r_in / sqrt(ref);  // r sqrt(v'Gv) = ref (r / sqrt(ref)) sqrt(u'Hu)
  if (!qp_isfinite(r) || !(r >= 0)) bad = 1.0;
  bad = team.max(bad);
  if (bad > 0) {
    for (int i = rk; i < K; i += ts) out[i] = static_cast<T>(NAN);
    team.sync();
    return 0;
  }
  double dm = 0.0;
  for (int i = rk; i < K; i += ts) {
    c[i] = c[i] / ref * d[i];
    dm = qp_dmax(dm, d[i]);
  }
  dm = team.max(dm);
  const double beta = 1.0 / dm;
  double asum = 0.0, cmax = 0.0;
  for (int i = rk; i < K; i += ts) {
    a[i] = d[i] / dm;
    asum += a[i];
    cmax = qp_dmax(cmax, fabs(c[i]));
  }
  asum = team.sum(asum);
  cmax = team.max(cmax);
  for (int i = rk; i < K; i += ts) x[i] = beta / asum;
  team.sync();

  const double r_safe = r > 0 ? r : 1.0;
  const double obj_scale = 1.0 + cmax + r;
  double xsum = 0.0;
  for (int i = rk; i < K; i += ts) xsum += x[i];
  const double xmean = team.sum(xsum) / K;
  double mu = obj_scale * xmean;
  const double mu_final = tol * tol * obj_scale * xmean;
  int it = 0;
  for (; it < max_iter; ++it) {
    // H x, and |H| x for the rounding bound of w^2 = x^T H x
    double xhx = 0.0, xahx = 0.0, ax = 0.0;
    for (int i = rk; i < K; i += ts) {
      double sh = 0.0, sa = 0.0;
      for (int k = 0; k < K; ++k) {
        const double h = H[k * ld + i];
        sh += h * x[k];
        sa += fabs(h) * x[k];
      }
      Hx[i] = sh;
      xhx += x[i] * sh;
      xahx += x[i] * sa;
      ax += a[i] * x[i];
    }
    const double w2_err = kQpNormW2Err * K * team.sum(xahx);
    const double w2 = qp_dmax(team.sum(xhx), 0.0) + w2_err;
    const double r_p = beta - team.sum(ax);
    const double rho = mu / r_safe;
    const double h = sqrt(rho * rho + w2);
    const double t = rho + h;
    const double tth = t * t * h;
    team.sync();
    // gradient, the Newton matrix hess + diag(mu / x^2) + gamma a a^T (gamma: its largest diagonal)
    double gamma = 0.0;
    for (int i = rk; i < K; i += ts) {
      g[i] = c[i] + r * Hx[i] / t - mu / x[i];
      const double hii = r * (H[i * ld + i] / t - Hx[i] * Hx[i] / tth);
      gamma = qp_dmax(gamma, hii + mu / (x[i] * x[i]));
    }
    gamma = team.max(gamma);
    for (int tt = rk; tt < K * K; tt += ts) {
      const int j = tt / K, i = tt % K;
      if (i >= j)
        L[j * ld + i] = r * (H[j * ld + i] / t - Hx[i] * Hx[j] / tth) + (i == j ? mu / (x[i] * x[i]) : 0.0) +
                        gamma * a[i] * a[j];
    }
    const bool factored = qp_cholesky(team, K, ld, L, 2e-300);  // fails below a pivot of 1e-300 (or NaN)
    if (!factored) break;  // uniform: frozen at the last, feasible iterate
    for (int i = rk; i < K; i += ts) {
      rhs[i] = -g[i] + gamma * a[i] * r_p;
      rhs[K + i] = a[i];
    }
    team.sync();
    qp_chol_solve(team, K, ld, L, rhs, 2);
    double ap = 0.0, am = 0.0;
    for (int i = rk; i < K; i += ts) {
      ap += a[i] * rhs[i];
      am += a[i] * rhs[K + i];
    }
    const double dy = (r_p - team.sum(ap)) / team.sum(am);
    for (int i = rk; i < K; i += ts) dx[i] = rhs[i] + rhs[K + i] * dy;
    team.sync();
    // the Newton decrement lambda^2 = dx^T hess dx + mu sum (dx / x)^2, relative to mu
    double dhd = 0.0, hxdx = 0.0, bar = 0.0, nonfinite = 0.0;
    for (int i = rk; i < K; i += ts) {
      double sh = 0.0;
      for (int k = 0; k < K; ++k) sh += H[k * ld + i] * dx[k];
      dhd += dx[i] * sh;
      hxdx += Hx[i] * dx[i];
      bar += mu * (dx[i] / x[i]) * (dx[i] / x[i]);
      if (!qp_isfinite(dx[i])) nonfinite = 1.0;
    }
    hxdx = team.sum(hxdx);
    const double quad = r * (team.sum(dhd) / t - hxdx * hxdx / tth) + team.sum(bar);
    const double lam = sqrt(qp_dmax(quad, 0.0) / mu);
    if (team.max(nonfinite) > 0 || !qp_isfinite(lam)) break;  // uniform
    // the line search over the fixed grid: the least Phi_mu (first index on ties, as torch.argmin)
    const double a_max = qp_max_step(team, K, x, dx);
    const double damped = qp_dmin(1.0 / (1.0 + lam), a_max);
    double best = kQpInf, alpha = a_max, step = a_max;
    for (int j = 0; j <= kQpNormLsSteps; ++j) {
      const double sj = j < kQpNormLsSteps ? step : damped;
      const double phi = qp_norm_phi(team, K, ld, H, c, r, rho, mu, w2_err, x, dx, sj, cand);
      if (phi < best) {
        best = phi;
        alpha = sj;
      }
      step *= 0.5;
    }
    if (!(best < kQpInf)) alpha = a_max;  // every candidate non-finite: the reference's argmin picks index 0
    team.sync();
    for (int i = rk; i < K; i += ts) x[i] += alpha * dx[i];
    team.sync();
    const bool centred = lam <= kQpNormCentred;
    if (centred && mu <= mu_final) {
      ++it;
      break;
    }
    if (centred) mu = qp_dmax(mu / kQpNormMuShrink, mu_final);
  }

  double vsum = 0.0;
  for (int i = rk; i < K; i += ts) {
    const double v = x[i] * d[i];
    cand[i] = v > 0 ? v : 0.0;
    vsum += cand[i];
  }
  vsum = team.sum(vsum);
  team.sync();
  for (int i = rk; i < K; i += ts) out[i] = static_cast<T>(cand[i] / vsum);
  team.sync();
  return it;
}

}  // namespace MTLSAM_QP_NAMESPACE
}  // namespace mtlsam
