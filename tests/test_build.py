"""The builds: both extensions import, Triton kernels compile ahead of time for sm_80/sm_90 without
spills, and the standalone CMake build of csrc passes its CTest suite."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

import d2v2_kernels as dk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc_present():
    return bool(shutil.which("nvcc") or os.environ.get("CUDA_HOME") or glob.glob("/usr/local/cuda*/bin/nvcc"))


def test_cpu_extension_built_with_openmp():
    info = dk.build_info()["cpu_extension"]
    assert info["built"], info["error"]
    assert info["openmp"]


@pytest.mark.skipif(not _nvcc_present(), reason="no CUDA toolkit on this machine")
def test_cuda_extension_built_for_sm80_and_sm90():
    info = dk.build_info()["cuda_extension"]
    assert info["built"], info["error"]
    assert info["archs"] == ["80", "90a"]


def test_triton_kernels_compile_ahead_of_time_without_spills():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "d2v2_kernels.ops.aot", "--check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for op in ("gather", "decoder_input", "ema", "targets", "loss"):
        if os.path.exists(os.path.join(ROOT, "d2v2_kernels", "ops", f"{op}.py")):
            assert f"\n{op} " in proc.stdout, f"no AOT rows for {op}:\n{proc.stdout}"
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_ctest(tmp_path):
    build = tmp_path / "build"
    run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)  # noqa: E731
    for cmd in (
        ("cmake", "-S", ".", "-B", str(build), "-DD2V2_CUDA=OFF"),
        ("cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)),
        ("ctest", "--test-dir", str(build), "--output-on-failure"),
    ):
        proc = run(*cmd)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
