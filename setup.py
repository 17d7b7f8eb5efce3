"""Builds decovae_fast._C: C++ CPU kernels always, CUDA kernels when possible.

DECOVAE_BUILD_CUDA=1 forces the CUDA part (and fails clearly if it cannot be built),
DECOVAE_BUILD_CUDA=0 skips it; unset, it is built when torch has CUDA and nvcc is found.
Install with `pip install --no-build-isolation -e .` (this file imports torch).
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin fools it."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        return os.path.dirname(os.path.dirname(real))
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # must precede the cpp_extension import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("DECOVAE_BUILD_CUDA", "").strip()
    nvcc_ok = _cuda_home is not None and os.path.exists(os.path.join(_cuda_home, "bin", "nvcc"))
    if flag == "0":
        return False
    if flag == "1":
        if torch.version.cuda is None:
            sys.exit("DECOVAE_BUILD_CUDA=1 but this torch (%s) has no CUDA support" % torch.__version__)
        if not nvcc_ok:
            sys.exit("DECOVAE_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and nvcc_ok


def _nvidia_wheel_includes():
    """CUDA headers torch includes (cusparse.h, cublas) ship in the nvidia pip wheels."""
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _extension():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # Portable baseline: the hot kernels are compiled again for AVX2 and AVX-512 in their own files
    # (csrc/cpu/kernels_*.cpp) and chosen at run time, so one build runs on every x86-64 CPU.
    # DECOVAE_MARCH=native tunes everything for the build host instead (opt-in).
    march = os.environ.get("DECOVAE_MARCH", "x86-64-v2" if platform.machine() in ("x86_64", "AMD64") else "")
    cxx = ["-O3", "-std=c++20", "-fopenmp"] + (["-march=" + march] if march else [])
    # DECOVAE_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer (scripts/sanitize_check.sh;
    # CPU only, load with LD_PRELOAD of libasan)
    link = []
    if os.environ.get("DECOVAE_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1"] + san
        link = san
    include_dirs = [os.path.join(ROOT, "csrc")]
    # the baseline the build used, for `decovae info` and the test that inspects the built library
    macros = [("DECOVAE_BUILD_MARCH", '"%s"' % (march or "default"))]
    libs = ["gomp"]
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        return CUDAExtension(
            "decovae_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + _nvidia_wheel_includes(),
            define_macros=macros + [("DECOVAE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
            libraries=libs,
        )
    return CppExtension("decovae_fast._C", cpu_sources, include_dirs=include_dirs, define_macros=macros,
                        extra_compile_args={"cxx": cxx}, extra_link_args=link, libraries=libs)


setup(
    packages=find_packages(include=["decovae_fast", "decovae_fast.*"]),  # ops/triton/ included: no remapping
    package_data={"decovae_fast": ["weights/*/*", "configs/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
