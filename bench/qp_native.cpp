// The CPU QP solver (csrc/qp_core.h through mtlsam::cpu::solve_qp) timed without Python, on one
// thread: the tool for A/B-testing solver changes, whose effects (1-5 %) drown in the noise of the
// Python-level benchmark. Built and run by bench/qp_native.sh with the extension's C++ flags.
//
//   qp_native [--family rank|full] [--K 64] [--batch 64] [--reps 200] [--out FILE]
//
// Families (fp32 Gram matrices, fixed seed): "rank" -- rank K/2, gradients scaled 1e-3 .. 1e3
// (Gamma 1e-6 .. 1e6; the family of bench_cpu_kernels.py); "full" -- A A^T with A: K x 2K.
// Prints microseconds per problem (best of five rounds of --reps passes over the batch) and the mean
// active-set steps; --out writes the weights (fp32, raw) for a bitwise comparison between builds.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace {

std::vector<float> make_family(const std::string& family, int K, int B) {
  std::mt19937_64 rng(0);
  std::normal_distribution<double> normal;
  const int r = family == "rank" ? std::max(1, K / 2) : 2 * K;
  std::vector<float> gram(static_cast<size_t>(B) * K * K);
  std::vector<double> A(static_cast<size_t>(K) * r), s(K, 1.0);
  if (family == "rank")
    for (int i = 0; i < K; ++i) s[i] = std::pow(10.0, K > 1 ? -3.0 + 6.0 * i / (K - 1) : 0.0);
  for (int b = 0; b < B; ++b) {
    for (double& a : A) a = normal(rng);
    for (int i = 0; i < K; ++i)
      for (int j = 0; j < K; ++j) {
        double v = 0.0;
        for (int k = 0; k < r; ++k) v += A[i * r + k] * A[j * r + k];
        gram[(static_cast<size_t>(b) * K + i) * K + j] = static_cast<float>(v * s[i] * s[j]);
      }
  }
  return gram;
}

}  // namespace

int main(int argc, char** argv) {
  std::string family = "rank", out_path;
  int K = 64, B = 64, reps = 200;
  for (int a = 1; a + 1 < argc; a += 2) {
    const std::string key = argv[a];
    if (key == "--family") family = argv[a + 1];
    else if (key == "--K") K = std::atoi(argv[a + 1]);
    else if (key == "--batch") B = std::atoi(argv[a + 1]);
    else if (key == "--reps") reps = std::atoi(argv[a + 1]);
    else if (key == "--out") out_path = argv[a + 1];
    else {
      std::fprintf(stderr, "unknown option %s\n", argv[a]);
      return 2;
    }
  }
  if ((family != "rank" && family != "full") || K < 1 || B < 1 || reps < 1) {
    std::fprintf(stderr, "usage: qp_native [--family rank|full] [--K n] [--batch n] [--reps n] [--out FILE]\n");
    return 2;
  }
  const std::vector<float> gram = make_family(family, K, B);
  std::vector<float> out(static_cast<size_t>(B) * K);
  std::vector<int32_t> iters(B);
  const auto solve = [&] {
    mtlsam::cpu::solve_qp(gram.data(), nullptr, nullptr, nullptr, mtlsam::kF32, B, K, true, 60, 1e-9, out.data(),
                          iters.data(), 1);
  };
  solve();  // warm-up
  double best = 1e300;
  for (int round = 0; round < 5; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) solve();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::micro>(t1 - t0).count() / (static_cast<double>(reps) * B));
  }
  double steps = 0.0;
  for (int32_t it : iters) steps += it;
  std::printf("family=%s K=%d batch=%d: %.2f us/problem, %.1f steps/problem\n", family.c_str(), K, B, best,
              steps / B);
  if (!out_path.empty()) {
    FILE* f = std::fopen(out_path.c_str(), "wb");
    if (!f || std::fwrite(out.data(), sizeof(float), out.size(), f) != out.size()) {
      std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
      return 1;
    }
    std::fclose(f);
  }
  return 0;
}
