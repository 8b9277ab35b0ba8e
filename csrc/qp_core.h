// The batched small QP of mtlsam_fast.ops.solve_qp, written once for the CPU and the GPU.
//
//   minimize 1/2 v^T Gamma v + q^T v   s.t.  v in the simplex   (simplex = true)
//                                       or  v >= lower          (simplex = false)
//
// A port of the reference solver mtlsam_fast/ops/qp.py: Jacobi scaling u = v * sqrt(diag Gamma /
// max diag), then a primal-dual interior-point method with Mehrotra's predictor-corrector in
// fp64, a dense Cholesky of the Newton matrix Gamma + diag(z/x) per iteration, a fixed iteration
// budget and an early exit once the KKT conditions hold to `tol`.
//
// The code is generic over a "team" of cooperating threads that share the workspace:
//   * SerialTeam  (CPU): one thread, sync() is a no-op, reductions are the identity;
//   * BlockTeam   (CUDA, defined in cuda_kernels.cu): one CTA per problem, workspace in shared
//     memory, reductions through warp shuffles; every branch on a reduced value is uniform.
// so the CPU build runs exactly the logic (and the order of floating-point operations of each
// reduction, up to the team size) that the GPU runs.
#pragma once

#include "common.h"

namespace mtlsam {

struct SerialTeam {
  MTLSAM_HD int rank() const { return 0; }
  MTLSAM_HD int size() const { return 1; }
  MTLSAM_HD void sync() const {}
  MTLSAM_HD double sum(double v) const { return v; }
  MTLSAM_HD double max(double v) const { return v; }
};

// Leading dimension of the K x K matrices in the workspace (odd: no shared-memory bank conflicts
// on column walks).
MTLSAM_HD int qp_ld(int K) { return K + 1; }

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

template <class T>
MTLSAM_HD double qp_load(const T* p, int64_t i) { return static_cast<double>(p[i]); }

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

// Solve one problem. gram: K x K (row stride K), q / lower: K or null; out: K.
// Every thread of the team calls this with the same arguments; ws is shared by the team.
// Returns the number of iterations run.
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

  // ---- symmetrize, check finiteness --------------------------------------------------------
  double bad = 0.0;
  for (int t = rk; t < K * K; t += ts) {
    const int i = t / K, j = t % K;
    const double v = 0.5 * (qp_load(gram, static_cast<int64_t>(i) * K + j) + qp_load(gram, static_cast<int64_t>(j) * K + i));
    H[j * ld + i] = v;
    if (!qp_isfinite(v)) bad = 1.0;
  }
  for (int i = rk; i < K; i += ts) {
    const double qi = q ? qp_load(q, i) : 0.0;
    c[i] = qi;
    if (!qp_isfinite(qi)) bad = 1.0;
  }
  bad = team.max(bad);
  if (bad > 0) {
    for (int i = rk; i < K; i += ts) out[i] = static_cast<T>(NAN);
    team.sync();
    return 0;
  }
  team.sync();

  // ---- scaling: H = D Gamma D / ref with unit diagonal, c = D q / ref ------------------------
  double ref = 0.0, qref = 0.0;
  for (int i = rk; i < K; i += ts) {
    ref = qp_dmax(ref, H[i * ld + i]);
    qref = qp_dmax(qref, fabs(c[i]));
  }
  ref = team.max(ref);
  qref = team.max(qref);
  if (!(ref > 0)) ref = qref > 0 ? qref : 1.0;  // a zero Gram leaves the linear term to set the scale
  for (int i = rk; i < K; i += ts) {
    const double rel = H[i * ld + i] / ref;
    d[i] = rel > 1e-300 ? 1.0 / sqrt(rel) : 1.0;
    zrow[i] = (rel > 1e-300 || !(c[i] >= 0)) ? 0.0 : 1.0;  // zero gradient, cost q_i >= 0
  }
  team.sync();
  for (int t = rk; t < K * K; t += ts) {
    const int j = t / K, i = t % K;
    H[j * ld + i] = H[j * ld + i] / ref * d[i] * d[j] + (i == j ? kQpProx : 0.0);
  }
  for (int i = rk; i < K; i += ts) c[i] = c[i] / ref * d[i];
  team.sync();

  double beta = 0.0;
  if (simplex) {
    double dm = 0.0;
    for (int i = rk; i < K; i += ts) dm = qp_dmax(dm, d[i]);
    dm = team.max(dm);
    double asum = 0.0;
    for (int i = rk; i < K; i += ts) {
      a[i] = d[i] / dm;
      lo[i] = 0.0;
      asum += a[i];
    }
    asum = team.sum(asum);
    beta = 1.0 / dm;
    const double x0 = beta / asum;
    for (int i = rk; i < K; i += ts) x[i] = x0;
  } else {
    for (int i = rk; i < K; i += ts) {
      lo[i] = lower ? qp_load(lower, i) / d[i] : 0.0;
      a[i] = 0.0;
      x[i] = 1.0;
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
  for (int i = rk; i < K; i += ts) z[i] = 1.0;
  team.sync();
  double cmax = 0.0;
  for (int i = rk; i < K; i += ts) cmax = qp_dmax(cmax, fabs(c[i]));
  const double c_scale = 1.0 + team.max(cmax);
  double y = 0.0;
  double prox = kQpProx;  // current proximal term on the diagonal of H (grows if H is indefinite)

  int it = 0;
  for (; it < max_iter; ++it) {
    // ---- residuals and convergence ---------------------------------------------------------
    double rdmax = 0.0, xz = 0.0, ax = 0.0;
    for (int i = rk; i < K; i += ts) {
      double g = c[i];
      for (int k = 0; k < K; ++k) g += H[k * ld + i] * x[k];
      const double r = g - z[i] - (simplex ? a[i] * y : 0.0);
      rd[i] = r;
      rdmax = qp_dmax(rdmax, fabs(r));
      xz += x[i] * z[i];
      ax += a[i] * x[i];
    }
    rdmax = team.max(rdmax);
    const double mu = team.sum(xz) / K;
    const double rp = simplex ? beta - team.sum(ax) : 0.0;
    bool conv = rdmax <= tol * c_scale && mu <= tol * tol;
    if (simplex) conv = conv && fabs(rp) <= tol;
    if (conv || !(mu == mu)) break;  // uniform across the team

    // ---- Newton matrix and its factorization ---------------------------------------------------
    // A failed factorization means H is numerically indefinite (fp32 rounding of a singular Gram
    // matrix leaves eigenvalues of about -1e-7): the proximal term grows tenfold, becomes part of
    // the objective (so the residuals stay consistent and Newton converges on the convexified
    // problem) and the matrix is refactored. The solution moves by O(prox), below the KKT target.
    bool factored = false;
    for (;;) {
      for (int t = rk; t < K * K; t += ts) {
        const int j = t / K, i = t % K;
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

}  // namespace mtlsam
