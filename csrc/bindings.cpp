// pybind11 bindings of mtlsam_fast._C -- the only translation unit that includes torch headers.
// Validation of shapes / layouts happens here (cheap metadata checks); the kernels take raw pointers.
#include <torch/extension.h>

#ifdef MTLSAM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common.h"
#include "kernels.h"

namespace {

using at::Tensor;
using mtlsam::DType;

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mtlsam::kF32;
    case at::kDouble: return mtlsam::kF64;
    case at::kBFloat16: return mtlsam::kBF16;
    case at::kHalf: return mtlsam::kF16;
    default: TORCH_CHECK(false, "mtlsam_fast._C: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

int half_or_float(const Tensor& t, const char* name) {
  const int c = dtype_code(t);
  TORCH_CHECK(c != mtlsam::kF64, "mtlsam_fast._C: ", name, " must be float32, bfloat16 or float16 (float64 is "
              "handled by the torch backend)");
  return c;
}

// Row-major [K, P] with unit column stride; returns the row stride.
int64_t row_stride(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "mtlsam_fast._C: ", name, " must be 2-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "mtlsam_fast._C: ", name, " needs a unit column stride");
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), "mtlsam_fast._C: ", name, " has overlapping rows");
  return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0);
}

void check_vec(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && (t.numel() <= 1 || t.stride(0) == 1), "mtlsam_fast._C: ", name,
              " must be a contiguous 1-D tensor");
}

void check_f32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "mtlsam_fast._C: ", name,
              " must be a contiguous float32 tensor");
}

void check_offsets(const Tensor& offsets, const Tensor& like) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.numel() >= 2,
              "mtlsam_fast._C: offsets must be a contiguous 1-D int64 tensor with >= 2 entries");
  TORCH_CHECK(offsets.device() == like.device(), "mtlsam_fast._C: offsets on ", offsets.device(), ", data on ",
              like.device());
}

void same_device(const Tensor& a, const Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), "mtlsam_fast._C: tensors on different devices: ", a.device(), " and ",
              b.device());
}

int nthreads() { return at::get_num_threads(); }

#ifdef MTLSAM_WITH_CUDA
void* stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
int sms_of(const Tensor& t) { return mtlsam::cuda::num_sms(t.device().index()); }
Tensor workspace(int64_t bytes, const Tensor& like) {
  return at::empty({std::max<int64_t>(bytes, 16)}, like.options().dtype(at::kByte));
}
#define MTLSAM_CUDA_GUARD(t) const c10::cuda::CUDAGuard guard_((t).device())
#endif

[[noreturn]] void no_cuda() {
  throw std::runtime_error("mtlsam_fast._C was built without CUDA kernels (rebuild with a CUDA toolkit)");
}

// ---------------------------------------------------------------------------------------------------
Tensor gram(const Tensor& G) {
  const int dt = half_or_float(G, "G");
  const int64_t ld = row_stride(G, "G"), K = G.size(0), P = G.size(1);
  Tensor out = at::empty({K, K}, G.options().dtype(at::kFloat));
  if (K == 0) return out;
  if (G.is_cuda()) {
#ifdef MTLSAM_WITH_CUDA
    MTLSAM_CUDA_GUARD(G);
    const int nsm = sms_of(G);
    Tensor ws = workspace(mtlsam::cuda::gram_workspace(K, P, nsm), G);
    mtlsam::cuda::gram(G.data_ptr(), dt, K, P, ld, out.data_ptr<float>(), ws.data_ptr(), nsm, stream_of(G));
#else
    no_cuda();
#endif
  } else {
    mtlsam::cpu::gram(G.data_ptr(), dt, K, P, ld, out.data_ptr<float>(), nthreads());
  }
  return out;
}

Tensor diff_gram(Tensor A, const Tensor& B) {
  const int dt = half_or_float(A, "A");
  TORCH_CHECK(A.sizes() == B.sizes() && A.scalar_type() == B.scalar_type(), "mtlsam_fast._C: A and B must match");
  same_device(A, B);
  const int64_t lda = row_stride(A, "A"), ldb = row_stride(B, "B"), K = A.size(0), P = A.size(1);
  Tensor out = at::empty({K, K}, A.options().dtype(at::kFloat));
  if (K == 0) return out;
  if (A.is_cuda()) {
#ifdef MTLSAM_WITH_CUDA
    MTLSAM_CUDA_GUARD(A);
    const int nsm = sms_of(A);
    Tensor ws = workspace(mtlsam::cuda::gram_workspace(K, P, nsm), A);
    mtlsam::cuda::diff_gram(A.data_ptr(), B.data_ptr(), dt, K, P, lda, ldb, out.data_ptr<float>(), ws.data_ptr(),
                            nsm, stream_of(A));
#else
    no_cuda();
#endif
  } else {
    mtlsam::cpu::diff_gram(A.data_ptr(), B.data_ptr(), dt, K, P, lda, ldb, out.data_ptr<float>(), nthreads());
  }
  return out;
}

Tensor segment_norms(const Tensor& x, const Tensor& offsets, const c10::optional<Tensor>& weight) {
  const int dt = half_or_float(x, "x");
  check_offsets(offsets, x);
  const bool flat = x.dim() == 1;
  const Tensor x2 = flat ? x.unsqueeze(0) : x;
  const int64_t ldx = row_stride(x2, "x"), R = x2.size(0), P = x2.size(1), S = offsets.numel() - 1;
  int wdt = dt;
  const void* wp = nullptr;
  if (weight.has_value()) {
    wdt = half_or_float(*weight, "weight");
    check_vec(*weight, "weight");
    same_device(*weight, x);
    TORCH_CHECK(weight->numel() == P, "mtlsam_fast._C: weight must have P elements");
    wp = weight->data_ptr();
  }
  Tensor out = at::empty({R, S}, x.options().dtype(at::kFloat));
  if (R > 0) {
    if (x.is_cuda()) {
#ifdef MTLSAM_WITH_CUDA
      MTLSAM_CUDA_GUARD(x);
      Tensor ws = workspace(mtlsam::cuda::segment_workspace(R, P, S), x);
      mtlsam::cuda::segment_norms(x2.data_ptr(), dt, R, P, ldx, offsets.data_ptr<int64_t>(), S, wp, wdt,
                                  out.data_ptr<float>(), ws.data_ptr(), stream_of(x));
#else
      no_cuda();
#endif
    } else {
      mtlsam::cpu::segment_norms(x2.data_ptr(), dt, R, P, ldx, offsets.data_ptr<int64_t>(), S, wp, wdt,
                                 out.data_ptr<float>(), nthreads());
    }
  }
  return flat ? out.squeeze(0) : out;
}

Tensor combine(const Tensor& w, const Tensor& G, const c10::optional<Tensor>& w2, const c10::optional<Tensor>& H,
               Tensor out) {
  const int gdt = half_or_float(G, "G");
  const int odt = half_or_float(out, "out");
  check_f32(w, "w");
  check_vec(out, "out");
  same_device(w, G);
  same_device(out, G);
  const int64_t ldg = row_stride(G, "G"), K = G.size(0), P = G.size(1);
  TORCH_CHECK(w.numel() == K && out.numel() == P, "mtlsam_fast._C: combine shapes");
  const float* w2p = nullptr;
  const void* hp = nullptr;
  int64_t K2 = 0, ldh = 0;
  if (H.has_value()) {
    TORCH_CHECK(w2.has_value(), "mtlsam_fast._C: w2 and H go together");
    TORCH_CHECK(dtype_code(*H) == gdt, "mtlsam_fast._C: H must have G's dtype");
    check_f32(*w2, "w2");
    same_device(*H, G);
    same_device(*w2, G);
    ldh = row_stride(*H, "H");
    K2 = H->size(0);
    TORCH_CHECK(H->size(1) == P && w2->numel() == K2, "mtlsam_fast._C: combine shapes (H)");
    w2p = w2->data_ptr<float>();
    hp = H->data_ptr();
  }
  if (P == 0) return out;
  if (G.is_cuda()) {
#ifdef MTLSAM_WITH_CUDA
    MTLSAM_CUDA_GUARD(G);
    mtlsam::cuda::combine(w.data_ptr<float>(), G.data_ptr(), K, ldg, w2p, hp, K2, ldh, gdt, P, out.data_ptr(), odt,
                          stream_of(G));
#else
    no_cuda();
#endif
  } else {
    mtlsam::cpu::combine(w.data_ptr<float>(), G.data_ptr(), K, ldg, w2p, hp, K2, ldh, gdt, P, out.data_ptr(), odt,
                         nthreads());
  }
  return out;
}

Tensor perturb(Tensor theta, const Tensor& backup, const c10::optional<Tensor>& direction,
               const c10::optional<Tensor>& scale, const Tensor& offsets, bool adaptive,
               const c10::optional<Tensor>& noise_scale, uint64_t seed, uint64_t noise_offset) {
  const int tdt = half_or_float(theta, "theta");
  TORCH_CHECK(dtype_code(backup) == tdt, "mtlsam_fast._C: backup must have theta's dtype");
  check_vec(theta, "theta");
  check_vec(backup, "backup");
  same_device(theta, backup);
  check_offsets(offsets, theta);
  const int64_t P = theta.numel(), S = offsets.numel() - 1;
  TORCH_CHECK(backup.numel() == P, "mtlsam_fast._C: backup size");
  int ddt = tdt;
  const void* dp = nullptr;
  const float* sp = nullptr;
  int64_t ns = 0, nn = 0;
  if (direction.has_value()) {
    TORCH_CHECK(scale.has_value(), "mtlsam_fast._C: direction needs scale");
    ddt = half_or_float(*direction, "direction");
    check_vec(*direction, "direction");
    check_f32(*scale, "scale");
    same_device(*direction, theta);
    same_device(*scale, theta);
    TORCH_CHECK(direction->numel() == P, "mtlsam_fast._C: direction size");
    ns = scale->numel();
    TORCH_CHECK(ns == 1 || ns == S, "mtlsam_fast._C: scale must have 1 or S entries");
    dp = direction->data_ptr();
    sp = scale->data_ptr<float>();
  }
  const float* np = nullptr;
  if (noise_scale.has_value()) {
    check_f32(*noise_scale, "noise_scale");
    same_device(*noise_scale, theta);
    nn = noise_scale->numel();
    TORCH_CHECK(nn == 1 || nn == S, "mtlsam_fast._C: noise_scale must have 1 or S entries");
    np = noise_scale->data_ptr<float>();
  }
  if (P == 0) return theta;
  if (theta.is_cuda()) {
#ifdef MTLSAM_WITH_CUDA
    MTLSAM_CUDA_GUARD(theta);
    mtlsam::cuda::perturb(theta.data_ptr(), backup.data_ptr(), tdt, dp, ddt, sp, ns, offsets.data_ptr<int64_t>(), S,
                          adaptive, np, nn, seed, noise_offset, P, stream_of(theta));
#else
    no_cuda();
#endif
  } else {
    mtlsam::cpu::perturb(theta.data_ptr(), backup.data_ptr(), tdt, dp, ddt, sp, ns, offsets.data_ptr<int64_t>(), S,
                         adaptive, np, nn, seed, noise_offset, P, nthreads());
  }
  return theta;
}

Tensor gaussian_noise(uint64_t seed, uint64_t offset, Tensor out) {
  check_f32(out, "out");
  const int64_t n = out.numel();
  if (n == 0) return out;
  if (out.is_cuda()) {
#ifdef MTLSAM_WITH_CUDA
    MTLSAM_CUDA_GUARD(out);
    mtlsam::cuda::gaussian_noise(seed, offset, n, out.data_ptr<float>(), stream_of(out));
#else
    no_cuda();
#endif
  } else {
    mtlsam::cpu::gaussian_noise(seed, offset, n, out.data_ptr<float>(), nthreads());
  }
  return out;
}

Tensor noise_stats(uint64_t seed, uint64_t offset, const Tensor& ref, const Tensor& offsets) {
  const int dt = half_or_float(ref, "ref");
  check_vec(ref, "ref");
  check_offsets(offsets, ref);
  const int64_t P = ref.numel(), S = offsets.numel() - 1;
  Tensor out = at::empty({2, S}, ref.options().dtype(at::kFloat));
  if (ref.is_cuda()) {
#ifdef MTLSAM_WITH_CUDA
    MTLSAM_CUDA_GUARD(ref);
    Tensor ws = workspace(mtlsam::cuda::segment_workspace(1, P, S), ref);
    mtlsam::cuda::noise_stats(seed, offset, ref.data_ptr(), dt, P, offsets.data_ptr<int64_t>(), S,
                              out.data_ptr<float>(), ws.data_ptr(), stream_of(ref));
#else
    no_cuda();
#endif
  } else {
    mtlsam::cpu::noise_stats(seed, offset, ref.data_ptr(), dt, P, offsets.data_ptr<int64_t>(), S,
                             out.data_ptr<float>(), nthreads());
  }
  return out;
}

// noise_stats(seed, offset, ref, offsets) and, in the same pass over the noise (CPU only),
// theta <- backup + noise_scale[s] * z
Tensor perturb_noise_stats(Tensor theta, const Tensor& backup, const Tensor& offsets, const Tensor& noise_scale,
                           uint64_t seed, uint64_t offset, const Tensor& ref) {
  TORCH_CHECK(!theta.is_cuda(), "mtlsam_fast._C: perturb_noise_stats runs on CPU tensors");
  const int tdt = half_or_float(theta, "theta");
  const int rdt = half_or_float(ref, "ref");
  TORCH_CHECK(dtype_code(backup) == tdt, "mtlsam_fast._C: backup must have theta's dtype");
  check_vec(theta, "theta");
  check_vec(backup, "backup");
  check_vec(ref, "ref");
  check_offsets(offsets, theta);
  check_f32(noise_scale, "noise_scale");
  const int64_t P = theta.numel(), S = offsets.numel() - 1, nn = noise_scale.numel();
  TORCH_CHECK(backup.numel() == P && ref.numel() == P, "mtlsam_fast._C: backup / ref size");
  TORCH_CHECK(nn == 1 || nn == S, "mtlsam_fast._C: noise_scale must have 1 or S entries");
  Tensor out = at::empty({2, S}, ref.options().dtype(at::kFloat));
  mtlsam::cpu::perturb_noise_stats(theta.data_ptr(), backup.data_ptr(), tdt, noise_scale.data_ptr<float>(), nn, seed,
                                   offset, ref.data_ptr(), rdt, offsets.data_ptr<int64_t>(), S,
                                   out.data_ptr<float>(), nthreads());
  return out;
}

// [n, 2] int32 tensor holding the uint32 words r0, r1 (testing the Philox implementation)
Tensor philox_words(uint64_t seed, uint64_t offset, int64_t n, const Tensor& like) {
  Tensor out = at::empty({n, 2}, like.options().dtype(at::kInt));
  if (n == 0) return out;
  if (like.is_cuda()) {
#ifdef MTLSAM_WITH_CUDA
    MTLSAM_CUDA_GUARD(like);
    mtlsam::cuda::philox_words(seed, offset, n, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()),
                               stream_of(like));
#else
    no_cuda();
#endif
  } else {
    mtlsam::cpu::philox_words(seed, offset, n, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), nthreads());
  }
  return out;
}

// gram [..., K, K], q / lower [..., K], norm_coef [...] (simplex only: CAGrad's norm objective) (float32 or
// float64, contiguous, same dtype). Returns the
// weights [..., K] and, with_iters, the solver's steps [...] (int32; zeros on CUDA), else None. The
// batch shape is handled here, not by reshapes in Python (each a dispatcher call, ~1-3 us: the K = 8
// solve itself takes ~1 us).
std::tuple<Tensor, c10::optional<Tensor>> solve_qp(const Tensor& gram, const c10::optional<Tensor>& q,
                                                   const c10::optional<Tensor>& lower, bool simplex,
                                                   int64_t max_iter, double tol, bool with_iters,
                                                   const c10::optional<Tensor>& norm_coef) {
  TORCH_CHECK(gram.dim() >= 2 && gram.size(-1) == gram.size(-2) && gram.is_contiguous(),
              "mtlsam_fast._C: gram must be a contiguous [..., K, K] tensor");
  const int dt = dtype_code(gram);
  TORCH_CHECK(dt == mtlsam::kF32 || dt == mtlsam::kF64, "mtlsam_fast._C: gram must be float32 or float64");
  const int64_t K = gram.size(-1);
  TORCH_CHECK(K >= 1 && K <= mtlsam::kQpMaxK, "mtlsam_fast._C: solve_qp takes 1 <= K <= ", mtlsam::kQpMaxK, ", got ", K);
  const auto batch = gram.sizes().slice(0, gram.dim() - 2);
  const int64_t B = c10::multiply_integers(batch);
  const auto vec_sizes = gram.sizes().slice(0, gram.dim() - 1);  // [..., K]
  for (const auto* t : {&q, &lower}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->scalar_type() == gram.scalar_type() && (*t)->is_contiguous() && (*t)->sizes() == vec_sizes,
                  "mtlsam_fast._C: q / lower must be contiguous [..., K] tensors of gram's dtype and batch shape");
      same_device(**t, gram);
    }
  }
  if (norm_coef.has_value()) {
    TORCH_CHECK(simplex, "mtlsam_fast._C: norm_coef is only supported with the simplex constraint");
    TORCH_CHECK(norm_coef->scalar_type() == gram.scalar_type() && norm_coef->is_contiguous() &&
                    norm_coef->sizes() == batch,
                "mtlsam_fast._C: norm_coef must be a contiguous [...] tensor of gram's dtype and batch shape");
    same_device(*norm_coef, gram);
  }
  TORCH_CHECK(max_iter >= 0, "mtlsam_fast._C: max_iter must be >= 0");
  const void* qp = q.has_value() ? q->data_ptr() : nullptr;
  const void* rp = norm_coef.has_value() ? norm_coef->data_ptr() : nullptr;
  const void* lp = lower.has_value() ? lower->data_ptr() : nullptr;
  Tensor out = at::empty(vec_sizes, gram.options());
  c10::optional<Tensor> iters;
  if (with_iters) iters = at::zeros(batch, gram.options().dtype(at::kInt));
  if (B == 0) return {out, iters};
  if (gram.is_cuda()) {
#ifdef MTLSAM_WITH_CUDA
    MTLSAM_CUDA_GUARD(gram);
    Tensor ws = workspace(mtlsam::cuda::qp_workspace(B, static_cast<int>(K)), gram);
    mtlsam::cuda::solve_qp(gram.data_ptr(), qp, lp, rp, dt, B, static_cast<int>(K), simplex,
                           static_cast<int>(max_iter), tol, out.data_ptr(), ws.data_ptr(), stream_of(gram));
#else
    no_cuda();
#endif
  } else {
    mtlsam::cpu::solve_qp(gram.data_ptr(), qp, lp, rp, dt, B, static_cast<int>(K), simplex, static_cast<int>(max_iter),
                          tol, out.data_ptr(), with_iters ? iters->data_ptr<int32_t>() : nullptr, nthreads());
  }
  return {out, iters};
}

#ifdef MTLSAM_WITH_CUDA
int64_t fused_workspace_bytes(int64_t K, int64_t P, const Tensor& like) {
  MTLSAM_CUDA_GUARD(like);
  return mtlsam::cuda::gram_workspace(K, P, sms_of(like));
}

void fused_gram_qp(const Tensor& G, Tensor gram_out, Tensor weights, Tensor ws, Tensor ticket, int64_t max_iter,
                   double tol) {
  TORCH_CHECK(G.is_cuda(), "mtlsam_fast._C: fused aggregation needs CUDA tensors");
  const int dt = half_or_float(G, "G");
  const int64_t ld = row_stride(G, "G"), K = G.size(0), P = G.size(1);
  check_f32(gram_out, "gram_out");
  check_f32(weights, "weights");
  TORCH_CHECK(gram_out.numel() == K * K && weights.numel() == K + 1, "mtlsam_fast._C: fused output shapes");
  TORCH_CHECK(ticket.scalar_type() == at::kInt && ticket.numel() == 1, "mtlsam_fast._C: ticket must be int32 [1]");
  for (const Tensor* t : {&gram_out, &weights, &ws, &ticket}) same_device(*t, G);
  MTLSAM_CUDA_GUARD(G);
  const int nsm = sms_of(G);
  TORCH_CHECK(ws.numel() >= mtlsam::cuda::gram_workspace(K, P, nsm) && ws.is_contiguous(),
              "mtlsam_fast._C: fused workspace too small");
  mtlsam::cuda::fused_gram_qp(G.data_ptr(), dt, K, P, ld, gram_out.data_ptr<float>(), weights.data_ptr<float>(),
                              ws.data_ptr(), reinterpret_cast<unsigned int*>(ticket.data_ptr<int32_t>()), nsm,
                              static_cast<int>(max_iter), tol, stream_of(G));
}

void fused_combine_apply(const Tensor& weights, const Tensor& G, int64_t mode, const c10::optional<Tensor>& scale,
                         const c10::optional<Tensor>& backup, Tensor out) {
  const int dt = half_or_float(G, "G");
  const int odt = half_or_float(out, "out");
  const int64_t ld = row_stride(G, "G"), K = G.size(0), P = G.size(1);
  check_f32(weights, "weights");
  check_vec(out, "out");
  TORCH_CHECK(weights.numel() == K + 1 && out.numel() == P, "mtlsam_fast._C: fused apply shapes");
  TORCH_CHECK(mode >= 0 && mode <= 2, "mtlsam_fast._C: mode must be 0, 1 or 2");
  const float* sp = nullptr;
  const void* bp = nullptr;
  if (mode > 0) {
    TORCH_CHECK(scale.has_value(), "mtlsam_fast._C: mode ", mode, " needs scale");
    check_f32(*scale, "scale");
    same_device(*scale, G);
    sp = scale->data_ptr<float>();
  }
  if (mode == 1) {
    TORCH_CHECK(backup.has_value() && dtype_code(*backup) == odt && backup->numel() == P,
                "mtlsam_fast._C: mode 1 needs backup with out's dtype and size");
    check_vec(*backup, "backup");
    same_device(*backup, G);
    bp = backup->data_ptr();
  }
  same_device(out, G);
  same_device(weights, G);
  MTLSAM_CUDA_GUARD(G);
  mtlsam::cuda::fused_combine_apply(weights.data_ptr<float>(), G.data_ptr(), dt, K, ld, P, static_cast<int>(mode), sp,
                                    bp, out.data_ptr(), odt, stream_of(G));
}
#endif

bool has_cuda() {
#ifdef MTLSAM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mtlsam_fast compiled kernels (CPU/OpenMP and, when built with a CUDA toolkit, CUDA)";
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def("cpu_isa", &mtlsam::cpu::isa, "instruction set the CPU kernels dispatched to");
  m.def("gram", &gram, py::arg("G"));
  m.def("diff_gram", &diff_gram, py::arg("A"), py::arg("B"));
  m.def("segment_norms", &segment_norms, py::arg("x"), py::arg("offsets"), py::arg("weight"));
  m.def("combine", &combine, py::arg("w"), py::arg("G"), py::arg("w2"), py::arg("H"), py::arg("out"));
  m.def("perturb", &perturb, py::arg("theta"), py::arg("backup"), py::arg("direction"), py::arg("scale"),
        py::arg("offsets"), py::arg("adaptive"), py::arg("noise_scale"), py::arg("seed"), py::arg("noise_offset"));
  m.def("gaussian_noise", &gaussian_noise, py::arg("seed"), py::arg("offset"), py::arg("out"));
  m.def("noise_stats", &noise_stats, py::arg("seed"), py::arg("offset"), py::arg("ref"), py::arg("offsets"));
  m.def("perturb_noise_stats", &perturb_noise_stats, py::arg("theta"), py::arg("backup"), py::arg("offsets"),
        py::arg("noise_scale"), py::arg("seed"), py::arg("offset"), py::arg("ref"));
  m.def("philox_words", &philox_words, py::arg("seed"), py::arg("offset"), py::arg("n"), py::arg("like"));
  m.attr("QP_MAX_K") = mtlsam::kQpMaxK;
  m.def("solve_qp", &solve_qp, py::arg("gram"), py::arg("q"), py::arg("lower"), py::arg("simplex"),
        py::arg("max_iter"), py::arg("tol"), py::arg("with_iters") = false, py::arg("norm_coef") = py::none());
#ifdef MTLSAM_WITH_CUDA
  m.def("fused_workspace_bytes", &fused_workspace_bytes, py::arg("K"), py::arg("P"), py::arg("like"));
  m.def("fused_gram_qp", &fused_gram_qp, py::arg("G"), py::arg("gram_out"), py::arg("weights"), py::arg("ws"),
        py::arg("ticket"), py::arg("max_iter"), py::arg("tol"));
  m.def("fused_combine_apply", &fused_combine_apply, py::arg("weights"), py::arg("G"), py::arg("mode"),
        py::arg("scale"), py::arg("backup"), py::arg("out"));
#endif
}
