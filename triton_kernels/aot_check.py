"""Compile the Triton kernels ahead of time for a GPU target, without a GPU.

    python -m mtlsam_fast.triton_kernels.aot_check            # sm_90 (H100/H200), every kernel
                                                              # variant
    python -m mtlsam_fast.triton_kernels.aot_check --quick    # a representative subset (CI)
    python -m mtlsam_fast.triton_kernels.aot_check --arch 80  # A100

Catches what the CPU interpreter cannot: type errors of the compiled dialect (loop-carried values,
``if`` yields), unsupported ops, shared-memory overflows, and it prints registers / spills per
kernel (``cuobjdump -res-usage``) so configurations can be judged before a GPU is at hand. Must run
in a process where ``TRITON_INTERPRET`` is unset (it removes it before importing Triton).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import elementwise as ew
from . import fused, gram, qp


def _usage(kernel) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool) or "cubin" not in kernel.asm:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    lines = [ln.strip() for ln in out.splitlines() if "REG:" in ln]
    return " ".join(lines[0].split()[:3]) if lines else ""


def _cases(quick: bool):
    def g(dt, mode, kp, bp, diff, nw):
        sig = {
            "G": "*" + dt,
            "B": "*" + dt,
            "WS": "*fp32",
            "sgk": "i64",
            "sgp": "i32",
            "sbk": "i64",
            "sbp": "i32",
            "P": "i64",
            "K": "i32",
            "nblocks": "i32",
        }
        return (
            f"gram_partial {dt} MODE={mode} KP={kp} BLOCK_P={bp} DIFF={diff}",
            gram._gram_partial_kernel,
            sig,
            {"KP": kp, "BLOCK_P": bp, "MODE": mode, "DIFF": diff},
            nw,
        )

    gram_set = [
        ("fp32", 0, 1, 512),
        ("fp32", 0, 8, 256),
        ("fp32", 1, 16, 512),
        ("bf16", 2, 16, 512),
    ]
    if not quick:
        gram_set += [("fp32", 1, 64, 128), ("bf16", 2, 64, 128), ("fp16", 2, 32, 256)]
    for dt, mode, kp, bp in gram_set:
        for diff in (False,) if quick else (False, True):
            yield g(dt, mode, kp, bp, diff, 8)
    yield (
        "gram_reduce",
        gram._gram_reduce_kernel,
        {"WS": "*fp32", "OUT": "*fp32", "nparts": "i32", "K": "i32"},
        {"KP": 64, "RC": 16},
        4,
    )
    yield (
        "combine",
        ew._combine_kernel,
        {
            "W1": "*fp32",
            "G": "*bf16",
            "K": "i32",
            "sgk": "i64",
            "sgp": "i32",
            "W2": "*fp32",
            "H": "*bf16",
            "K2": "i32",
            "shk": "i64",
            "shp": "i32",
            "OUT": "*bf16",
            "so": "i32",
            "P": "i64",
        },
        {"HAS_H": True, "BLOCK_P": 1024, "KC": 8},
        4,
    )
    yield (
        "segment_norms",
        ew._seg_norm_kernel,
        {
            "X": "*fp32",
            "Wt": "*fp32",
            "OFF": "*i64",
            "HEAD": "*fp32",
            "MID": "*fp32",
            "sxk": "i64",
            "sxp": "i32",
            "sw": "i32",
            "P": "i64",
            "S": "i32",
            "nblocks": "i32",
        },
        {"HAS_W": True, "BLOCK_P": 2048, "NSTEPS": 8},
        8,
    )
    yield (
        "segment_finish",
        ew._seg_finish_kernel,
        {
            "HEAD": "*fp32",
            "MID": "*fp32",
            "OFF": "*i64",
            "OUT": "*fp32",
            "S": "i32",
            "nblocks": "i32",
        },
        {"BLOCK_P": 2048, "RC": 256, "SQRT": True},
        4,
    )
    yield (
        "perturb asam+noise",
        ew._perturb_kernel,
        {
            "TH": "*bf16",
            "BK": "*bf16",
            "DIR": "*bf16",
            "SC": "*fp32",
            "NS": "*fp32",
            "OFF": "*i64",
            "sth": "i32",
            "sbk": "i32",
            "sdir": "i32",
            "ssc": "i32",
            "sns": "i32",
            "P": "i64",
            "S": "i32",
            "seed": "u64",
            "noise_offset": "i64",
        },
        {"HAS_DIR": True, "ADAPTIVE": True, "HAS_NOISE": True, "BLOCK_P": 2048, "NSTEPS": 8},
        8,
    )
    yield (
        "noise_stats",
        ew._noise_stats_kernel,
        {
            "REF": "*fp32",
            "OFF": "*i64",
            "HEAD": "*fp32",
            "MID": "*fp32",
            "sref": "i32",
            "P": "i64",
            "S": "i32",
            "nblocks": "i32",
            "seed": "i32",
            "noise_offset": "i64",
        },
        {"BLOCK_P": 2048, "NSTEPS": 4},
        8,
    )
    yield (
        "gaussian_noise",
        ew._noise_kernel,
        {"OUT": "*fp32", "n": "i32", "seed": "i64", "noise_offset": "i64"},
        {"BLOCK_P": 1024},
        4,
    )
    qp_sig = {
        "GR": "*fp32",
        "Q": "*fp32",
        "LO": "*fp32",
        "R": "*fp32",
        "OUT": "*fp32",
        "K": "i32",
        "sgb": "i32",
        "sgi": "i32",
        "sgj": "i32",
        "max_iter": "i32",
        "tol": "fp32",
    }
    qp_set = [(16, True, False, True), (16, False, False, True), (16, True, True, True)]
    if not quick:
        qp_set += [(64, True, False, True), (64, False, False, False), (32, True, True, True)]
    for kp, simplex, has_r, has_q in qp_set:
        yield (
            f"qp KP={kp} simplex={simplex} norm={has_r}",
            qp._qp_kernel,
            dict(qp_sig),
            {"KP": kp, "SIMPLEX": simplex, "HAS_Q": has_q, "HAS_LO": not simplex, "HAS_R": has_r},
            qp.qp_num_warps(kp),
        )
    fsig = {
        "G": "*bf16",
        "sgk": "i64",
        "sgp": "i32",
        "H": "*bf16",
        "shk": "i64",
        "shp": "i32",
        "P": "i64",
        "K": "i32",
        "nblocks": "i32",
        "WS": "*fp32",
        "WS2": "*fp32",
        "TICKET": "*i32",
        "GOUT": "*fp32",
        "WOUT": "*fp32",
        "GOUT2": "*fp32",
        "WOUT2": "*fp32",
        "max_iter": "i32",
        "tol": "fp32",
    }
    yield (
        "fused gram+qp bf16 KP=16",
        fused._gram_qp_kernel,
        dict(fsig),
        {"KP": 16, "BLOCK_P": 512, "MODE": 2, "HAS_H": True},
        8,
    )
    if not quick:
        yield (
            "fused gram+qp fp32 KP=64",
            fused._gram_qp_kernel,
            {**fsig, "G": "*fp32", "H": "*fp32"},
            {"KP": 64, "BLOCK_P": 128, "MODE": 1, "HAS_H": False},
            16,
        )
    yield (
        "fused apply",
        fused._apply_kernel,
        {
            "W1": "*fp32",
            "G": "*bf16",
            "K": "i32",
            "sgk": "i64",
            "sgp": "i32",
            "W2": "*fp32",
            "H": "*bf16",
            "shk": "i64",
            "shp": "i32",
            "OUT": "*bf16",
            "so": "i32",
            "TH": "*fp32",
            "sth": "i32",
            "LR": "*fp32",
            "P": "i64",
        },
        {"HAS_H": True, "WRITE": True, "UPDATE": True, "BLOCK_P": 1024, "KC": 8},
        4,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: Hopper)"
    )
    ap.add_argument("--quick", action="store_true", help="a representative subset")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, fn, sig, consts, nw in _cases(args.quick):
        t = time.time()
        sig = {**sig, **dict.fromkeys(consts, "constexpr")}
        src = ASTSource(
            fn=fn,
            signature=sig,
            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        )
        try:
            k = triton.compile(src, target=target, options={"num_warps": nw})
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        print(
            f"ok   {name:48s} sm_{args.arch} num_warps={nw:2d} {time.time() - t:5.1f}s "
            f"smem={k.metadata.shared} {_usage(k)}",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
