// The CPU kernels compiled for AVX2 + FMA + F16C (selected at run time when the CPU has them).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_table.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c")
#define MTLSAM_QP_NAMESPACE qp_avx2  // this translation unit's own instantiation of the QP solver
#define MTLSAM_QP_AVX2 1             // with its AVX2 scaling pass (qp_scale_tiles)
#include "qp_core.h"
#define MTLSAM_CPU_NS avx2
#define MTLSAM_CPU_AVX2 1
#include "cpu_kernels_impl.h"
#undef MTLSAM_CPU_AVX2
#undef MTLSAM_CPU_NS

namespace mtlsam {
namespace avx2 {
const CpuTable* table() {
  static const CpuTable t = MTLSAM_CPU_TABLE(mtlsam::avx2);
  return &t;
}
}  // namespace avx2
}  // namespace mtlsam
#else
namespace mtlsam {
namespace avx2 {
const CpuTable* table() { return nullptr; }
}  // namespace avx2
}  // namespace mtlsam
#endif
