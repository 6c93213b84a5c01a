"""Build d2v2_kernels: the CPU extension always, the CUDA extension whenever nvcc is found.

Environment knobs:
  D2V2_BUILD_CUDA=0/1   force the CUDA extension off/on (default: on when nvcc is found)
  D2V2_CUDA_ARCHS       semicolon list of SM targets (default "80;90a")
  D2V2_CPU_ARCH         value of -march for the CPU extension (default "native": the build machine)
  MAX_JOBS              parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import sys
import sysconfig


def _find_cuda_home():
    """The first toolkit with both nvcc and headers: CUDA_HOME, the nvcc on PATH, /usr/local/cuda[-*]."""
    candidates = [os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:  # may be a wrapper script (e.g. /usr/local/bin/nvcc), hence the header check below
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for cand in candidates:
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")) and os.path.exists(
            os.path.join(cand, "include", "cuda_runtime.h")
        ):
            return cand
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so resolve it first.
_cuda_home = _find_cuda_home()
_want_cuda = os.environ.get("D2V2_BUILD_CUDA", "1" if _cuda_home else "0") == "1"
if _want_cuda and _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "python")]


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def cpu_extension():
    march = os.environ.get("D2V2_CPU_ARCH", "native")
    flags = ["-O3", "-fopenmp", "-fno-math-errno"] + ([f"-march={march}"] if march else [])
    return CppExtension(
        "d2v2_kernels._C",
        _rel("python/cpu/*.cpp") + _rel("csrc/cpu/*.cpp"),
        include_dirs=INCLUDE,
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )


def cuda_extension():
    archs = [a for a in os.environ.get("D2V2_CUDA_ARCHS", "80;90a").split(";") if a]
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # Some torch CUDA headers include cuSPARSE/cuBLAS headers that only pip ships (nvidia/cu*/include);
    # searched after the toolkit's own include dir, whose cuda_runtime.h must win.
    site = sysconfig.get_paths()["purelib"]
    after = [f"-idirafter{d}" for d in sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))]
    archs_token = "_".join(archs)  # e.g. 80_90a: a bare token, stringised in C++ (quotes break in ninja)
    return CUDAExtension(
        "d2v2_kernels._C_cuda",
        _rel("python/cuda/*.cpp") + _rel("csrc/cuda/*.cu"),
        include_dirs=INCLUDE,
        define_macros=[("D2V2_CUDA_ARCHS", archs_token)],
        extra_compile_args={
            "cxx": ["-O3"] + after,
            "nvcc": ["-O3", "-lineinfo"] + gencode,
        },
    )


ext_modules = [cpu_extension()]
if _want_cuda:
    if not _cuda_home:
        sys.exit("D2V2_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    ext_modules.append(cuda_extension())

setup(
    name="d2v2-kernels",
    version="0.1.0",
    description="Fused kernels and a slim trainer for data2vec 2.0",
    packages=find_packages(include=["d2v2_kernels", "d2v2_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "safetensors"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["d2v2=d2v2_kernels.cli:main"]},
    zip_safe=False,
)
