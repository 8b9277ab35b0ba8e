"""The optional compiled extension ``mtlsam_fast._C`` (everything else is in ``pyproject.toml``).

The extension (``csrc/``) always gets its CPU kernels (C++/OpenMP) and gets the CUDA kernels
whenever a CUDA toolkit is found and torch is a CUDA build. Build it against the installed torch:

    pip install --no-build-isolation -e .

Environment variables:
    MTLSAM_NO_EXTENSION=1   pure-Python install (the library then runs on the torch backend)
    MTLSAM_NO_CUDA=1        CPU kernels only, even when a CUDA toolkit is present
    CUDA_HOME               the toolkit (default: found even when ``nvcc`` on PATH is a wrapper
                            script)
    TORCH_CUDA_ARCH_LIST    GPU architectures (default ``8.0;9.0``)
    MAX_JOBS                parallel compile jobs (ninja)
"""

import importlib.util
import os
import sys

from setuptools import setup


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load_ext_helpers():
    """mtlsam_fast/_ext.py, by path (it imports no torch at import time)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mtlsam_fast", "_ext.py")
    spec = importlib.util.spec_from_file_location("_mtlsam_ext_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extension_kwargs():
    if _env_flag("MTLSAM_NO_EXTENSION"):
        print(
            "mtlsam_fast: MTLSAM_NO_EXTENSION set, skipping the compiled extension", file=sys.stderr
        )
        return {}
    helpers = _load_ext_helpers()
    cuda_home = None if _env_flag("MTLSAM_NO_CUDA") else helpers.find_cuda_home()
    if cuda_home:
        # before torch.utils.cpp_extension is imported: it fixes CUDA_HOME at import time and would
        # otherwise derive it from the first nvcc on PATH (possibly a wrapper script).
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", helpers.DEFAULT_ARCH_LIST)
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        print(
            f"mtlsam_fast: torch is not importable ({e}); building without the extension "
            "(use pip install --no-build-isolation)",
            file=sys.stderr,
        )
        return {}
    with_cuda = bool(cuda_home) and torch.version.cuda is not None
    if cuda_home and not with_cuda:
        print(
            "mtlsam_fast: CUDA toolkit found but torch is a CPU build; CPU kernels only",
            file=sys.stderr,
        )
    sources = helpers.CPU_SOURCES + (helpers.CUDA_SOURCES if with_cuda else [])
    defines = [("MTLSAM_WITH_CUDA", None)] if with_cuda else []
    ext_cls = CUDAExtension if with_cuda else CppExtension
    compile_args = {"cxx": helpers.CXX_FLAGS}
    if with_cuda:
        compile_args["nvcc"] = helpers.NVCC_FLAGS
    print(
        "mtlsam_fast: building mtlsam_fast._C "
        f"(CPU{' + CUDA from ' + cuda_home if with_cuda else ' only'}"
        f"{', arch ' + os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else ''})",
        file=sys.stderr,
    )
    ext = ext_cls(
        name="mtlsam_fast._C",
        sources=sources,
        define_macros=defines,
        extra_compile_args=compile_args,
        extra_link_args=helpers.LINK_FLAGS,
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


# Metadata, dependencies and packages are in pyproject.toml; this file only adds the extension.
setup(**_extension_kwargs())
