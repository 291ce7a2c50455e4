"""Build script: the Python package plus the native extension ``znorm_kernels._C`` (csrc/).

Install for development with ``pip install --no-build-isolation -e .`` (the Makefile does this), so the
extension compiles against the torch already installed. One module holds the ops' schemas, the hook's steady
step (grad_watch.cpp), their CPU kernels and, in a CUDA build, their CUDA kernels (csrc/: cpu_*.cpp, cuda_*.cu
and cuda_table_cache.cpp).

Environment switches:
    ZNORM_BUILD_CUDA=0|1   skip / require the CUDA kernel. Default: built when torch is a CUDA build and nvcc
                           is found (CUDA_HOME, e.g. /usr/local/cuda).
    ZNORM_CUDA_ARCHS       compute capabilities to compile for, ";"- or ","-separated, e.g. "8.0;9.0" (the
                           default) or "9.0". Under CI (CI=true) the default is "9.0" alone, to keep the
                           compile-only check short.
    ZNORM_BUILD_NATIVE=0   build no extension at all (pure Python package; "auto" uses the reference).
    MAX_JOBS               parallel compile jobs (ninja).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

CSRC = os.path.join("csrc")


def _flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"setup.py: {name}={value!r}; expected 0 or 1")


def _cuda_archs() -> list[str]:
    default = "9.0" if os.environ.get("CI", "").lower() in ("1", "true") else "8.0;9.0"
    archs = os.environ.get("ZNORM_CUDA_ARCHS", "").strip() or default
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


def _gencode(arch: str) -> list[str]:
    ptx = arch.endswith("+PTX")
    num = arch.removesuffix("+PTX").replace(".", "")
    flags = [f"-gencode=arch=compute_{num},code=sm_{num}"]
    if ptx:
        flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _extensions() -> tuple[list, dict]:
    if _flag("ZNORM_BUILD_NATIVE") is False:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    want_cuda = _flag("ZNORM_BUILD_CUDA")
    cuda_home = cpp_extension.CUDA_HOME
    can_cuda = torch.version.cuda is not None and cuda_home is not None
    if want_cuda and not can_cuda:
        missing = "torch is not a CUDA build" if torch.version.cuda is None else "no nvcc (set CUDA_HOME)"
        raise SystemExit(f"setup.py: ZNORM_BUILD_CUDA=1 but {missing}")
    with_cuda = can_cuda if want_cuda is None else want_cuda

    # One family of kernels per file (csrc/tiles.h holds their sizes): the schemas, the hook's steady step,
    # Adam's step counters, then the CPU ops.
    cpu_files = ("module.cpp", "grad_watch.cpp", "step_counters.cpp", "cpu_znorm.cpp", "cpu_optim.cpp")
    sources = [os.path.join(CSRC, f) for f in cpu_files]
    # -ffp-contract=off: no fused multiply-adds, so the baseline and AVX2 copies of the CPU loops round alike.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    extra = {"cxx": cxx}
    kwargs = {"py_limited_api": True, "extra_link_args": ["-fopenmp"]}
    if with_cuda:
        sources += [os.path.join(CSRC, f) for f in ("cuda_table_cache.cpp", "cuda_znorm.cu", "cuda_optim.cu")]
        archs = _cuda_archs()
        # Our -gencode flags are the whole arch list (torch adds none of its own when it sees them).
        extra["nvcc"] = ["-O3", *(f for a in archs for f in _gencode(a))]
        ext = cpp_extension.CUDAExtension("znorm_kernels._C", sources, extra_compile_args=extra, **kwargs)
        print(f"setup.py: building znorm_kernels._C with CUDA for {', '.join(archs)}", file=sys.stderr)
    else:
        ext = cpp_extension.CppExtension("znorm_kernels._C", sources, extra_compile_args=extra, **kwargs)
        print("setup.py: building znorm_kernels._C for the CPU only", file=sys.stderr)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
