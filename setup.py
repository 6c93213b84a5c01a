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
    """CUDA_HOME if set, else the toolkit of the nvcc on PATH, else the newest /usr/local/cuda-*."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for cand in sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
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
    # torch's CUDA headers include the cuSPARSE/cuBLAS headers that pip ships under nvidia/cu*/include.
    site = sysconfig.get_paths()["purelib"]
    include = INCLUDE + sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    archs_literal = '\\"' + ";".join(archs) + '\\"'
    return CUDAExtension(
        "d2v2_kernels._C_cuda",
        _rel("python/cuda/*.cpp") + _rel("csrc/cuda/*.cu"),
        include_dirs=include,
        define_macros=[("D2V2_CUDA_ARCHS", archs_literal)],
        extra_compile_args={
            "cxx": ["-O3"],
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
