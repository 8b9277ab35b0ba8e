"""Loader of the optional compiled extension ``mtlsam_fast._C`` (C++/OpenMP and CUDA kernels).

``get()`` returns the module or ``None``; it never compiles anything unless asked to. When the
package was installed without the extension (``MTLSAM_NO_EXTENSION=1``, or no compiler), the
kernels can be built just in time with :func:`torch.utils.cpp_extension.load` from the ``csrc/``
sources of a source checkout -- opt in with ``MTLSAM_JIT=1`` or by calling ``load(jit=True)``.

Environment variables:

* ``MTLSAM_JIT=1``: JIT-compile the extension on first use when ``mtlsam_fast._C`` is missing.
* ``MTLSAM_NO_CUDA=1``: build (setup.py or JIT) the CPU kernels only.
* ``CUDA_HOME``: the CUDA toolkit; otherwise found by :func:`find_cuda_home`.
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures to compile for (default ``8.0;9.0``).

This module does not import torch at import time, so ``setup.py`` can load it by path.
"""

from __future__ import annotations

import glob
import os
import shutil
from types import ModuleType

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(_ROOT, "csrc")

#: sources of the extension (relative to the repository root)
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/cpu_kernels.cpp", "csrc/cpu_kernels_avx2.cpp"]
CUDA_SOURCES = ["csrc/cuda_kernels.cu"]
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
# torch adds its -std (C++20 for torch >= 2.10). -fno-math-errno: sqrt and friends without the errno
# branch (inlined, vectorizable). -fno-trapping-math: no kernel reads the FP exception flags, so GCC
# may if-convert and vectorize FP code that could trap; same results (the QP's weights bitwise),
# the K = 64 QP solve ~3 % faster. (-funroll-loops: QP another ~2 %, but diff_gram bf16 ~5 %
# slower.)
NVCC_FLAGS = ["-O3", "-std=c++17"]
LINK_FLAGS = ["-fopenmp"]
DEFAULT_ARCH_LIST = "8.0;9.0"

_module: ModuleType | None = None
_error: str | None = None
_tried = False


def _valid_cuda_home(path: str | None) -> bool:
    if not path:
        return False
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, or ``None``.

    ``CUDA_HOME`` / ``CUDA_PATH`` when they hold a toolkit; else the toolkit of ``nvcc`` on ``PATH``
    (its real path, so a symlink works); else ``/usr/local/cuda`` and ``/usr/local/cuda-*``. A
    ``nvcc`` on ``PATH`` that is a wrapper script (``/usr/local/bin/nvcc`` has no ``include/``
    next to it) is skipped instead of trusted, which is where torch's own guess goes wrong.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _valid_cuda_home(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _valid_cuda_home(home):
            return home
    for home in [
        "/usr/local/cuda",
        *sorted(glob.glob("/usr/local/cuda-*"), reverse=True),
        "/opt/cuda",
    ]:
        if _valid_cuda_home(home):
            return home
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _jit_build(verbose: bool = False) -> ModuleType:
    """Compile the extension from ``csrc/`` with ``torch.utils.cpp_extension.load``."""
    if not os.path.isfile(os.path.join(CSRC, "bindings.cpp")):
        raise ImportError(
            f"cannot JIT-build mtlsam_fast._C: no sources at {CSRC} "
            "(install from a source checkout)"
        )
    home = None if _env_flag("MTLSAM_NO_CUDA") else find_cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    import torch
    from torch.utils import cpp_extension

    with_cuda = bool(home) and torch.version.cuda is not None
    if with_cuda:
        cpp_extension.CUDA_HOME = (
            home  # torch guessed it at import time, maybe from a wrapper script
        )
    sources = [os.path.join(_ROOT, s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    defines = ["-DMTLSAM_WITH_CUDA"] if with_cuda else []
    return cpp_extension.load(
        name="mtlsam_fast_C_jit" + ("_cuda" if with_cuda else ""),
        sources=sources,
        extra_cflags=CXX_FLAGS + defines,
        extra_cuda_cflags=NVCC_FLAGS + defines,
        extra_ldflags=LINK_FLAGS,
        with_cuda=with_cuda,
        verbose=verbose,
    )


def load(jit: bool | None = None, verbose: bool = False) -> ModuleType | None:
    """Import ``mtlsam_fast._C``; JIT-build it when missing and ``jit`` (default:
    ``MTLSAM_JIT``)."""
    global _module, _error, _tried
    if _module is not None:
        return _module
    if jit is None:
        jit = _env_flag("MTLSAM_JIT")
    if not _tried or jit:
        _tried = True
        try:
            from . import _C

            _module, _error = _C, None
        except ImportError as e:
            _error = (
                f"mtlsam_fast._C is not built ({e}); "
                "reinstall without MTLSAM_NO_EXTENSION or set MTLSAM_JIT=1"
            )
            if jit:
                try:
                    _module, _error = _jit_build(verbose), None
                except Exception as e2:  # compiler missing, build error
                    _error = f"JIT build of mtlsam_fast._C failed: {type(e2).__name__}: {e2}"
    return _module


def get() -> ModuleType | None:
    """The loaded extension or ``None`` (never compiles unless ``MTLSAM_JIT=1``)."""
    return load()


def error() -> str | None:
    """Why the extension is unavailable (``None`` when it loaded)."""
    load()
    return _error


def has_cuda() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    mod = load()
    return bool(mod is not None and mod.has_cuda())
