#!/usr/bin/env bash
# Build bench/qp_native.cpp against the CPU kernels of a csrc/ directory (default: this checkout's)
# with the extension's C++ flags, and run it; the arguments go to qp_native. For example:
#   bash bench/qp_native.sh --family full
#   QP_CSRC=/tmp/other-checkout/csrc bash bench/qp_native.sh --out /tmp/b.bin   # the "B" of an A/B
#   MTLSAM_CPU_ISA=generic bash bench/qp_native.sh                            # the pre-AVX2 variant
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
csrc=${QP_CSRC:-$root/csrc}
flags=$(python3 - "$root/mtlsam_fast/_ext.py" <<'PY'
import ast, re, sys
src = open(sys.argv[1]).read()
print(" ".join(ast.literal_eval(re.search(r"^CXX_FLAGS = (\[.*?\])", src, re.M).group(1))))
PY
)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cxx=${CXX:-g++}
# as the extension's build: torch adds -DNDEBUG -fwrapv -fPIC and -std=c++20 (torch >= 2.10)
common="-DNDEBUG -fwrapv -fPIC -std=c++20 -Wno-psabi $flags -I$csrc"
$cxx $common -c "$csrc/cpu_kernels.cpp" -o "$build/cpu.o" & pid=$!
$cxx $common -c "$csrc/cpu_kernels_avx2.cpp" -o "$build/avx2.o"
wait $pid
$cxx $common "$root/bench/qp_native.cpp" "$build/cpu.o" "$build/avx2.o" -o "$build/qp_native"
"$build/qp_native" "$@"
