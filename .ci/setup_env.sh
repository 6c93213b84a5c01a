#!/usr/bin/env bash
# Idempotent environment set-up for a fresh machine (Python, gcc, optionally nvcc) or an existing checkout:
# creates .venv, installs the pinned requirements, builds d2v2_kernels._C (always) and _C_cuda (when nvcc
# is found). The first run installs the package editable; later runs rebuild only what changed (ninja).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# Fashion-MNIST for the trainer tests and speed_vs_mae (a Debian package: offline, 30 MB).
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || echo "[setup] could not install dataset-fashion-mnist: the data tests will skip"
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

if ! python -c "import torch, triton, hypothesis, safetensors, pytest_benchmark" 2>/dev/null; then
  echo "[setup] installing requirements (torch ~5 GB from the local wheel cache, about a minute)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
fi

# nvcc: on PATH, or the toolkit the machines of this project carry.
if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if ! python -m pip show -q d2v2-kernels >/dev/null 2>&1; then
  echo "[setup] building and installing d2v2-kernels (editable; CUDA extension takes a few minutes)"
  python -m pip install -q -e . --no-build-isolation --no-deps
else
  echo "[setup] incremental build of the extensions"
  python setup.py -q build_ext --inplace
fi
python -c "import json, d2v2_kernels as dk; print(json.dumps(dk.build_info(), indent=1))"
