"""The backend registry: which implementations exist for which op on which device, and why not.

Every op registers the fused backends it implements. A call resolves the requested backend
(`set_backend`, `use_backend`, `D2V2_BACKEND`, default "auto") against the device of its inputs:
"auto" takes the op's preferred available backend for that device; an explicit name must be available
or the call fails with the reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
FUSED = ("cpu", "triton", "cuda")

_global_backend = os.environ.get("D2V2_BACKEND", "auto")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("d2v2_backend", default=None)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op from now on ("auto", "reference", "cpu", "triton", "cuda")."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The backend name in force here: the innermost `use_backend`, else `set_backend`/D2V2_BACKEND."""
    return _override.get() or _global_backend


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager selecting a backend for the calls inside it (thread- and task-local)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


_check_name(_global_backend)  # a bad D2V2_BACKEND fails at import, not at the first op call


# --- what this process can run -------------------------------------------------------------------


@lru_cache(maxsize=None)
def _extension(name: str):
    """(module, None) if d2v2_kernels.<name> imports, else (None, reason)."""
    try:
        return importlib.import_module(f"d2v2_kernels.{name}"), None
    except ImportError as e:  # not built, or built against another torch
        return None, f"extension d2v2_kernels.{name} not importable ({e}); run `pip install -e . --no-build-isolation`"


def cpu_extension():
    mod, reason = _extension("_C")
    if mod is None:
        raise RuntimeError(reason)
    return mod


def cuda_extension():
    mod, reason = _extension("_C_cuda")
    if mod is None:
        raise RuntimeError(reason)
    return mod


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _triton_version():
    try:
        import triton

        return triton.__version__, None
    except ImportError as e:
        return None, f"triton not installed ({e})"


def why_unavailable(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on tensors of `device_type` in this process, else the reason."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"cpu: runs on CPU tensors, got {device_type} tensors"
        return _extension("_C")[1]
    if backend == "cuda":
        if device_type != "cuda":
            return f"cuda: runs on CUDA tensors, got {device_type} tensors"
        if not torch.cuda.is_available():
            return "cuda: no CUDA device"
        return _extension("_C_cuda")[1]
    if backend == "triton":
        version, reason = _triton_version()
        if version is None:
            return f"triton: {reason}"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "triton: no CUDA device"
        if device_type == "cpu":
            if triton_interpreting():
                return None
            return "triton: no CUDA device; set TRITON_INTERPRET=1 to run the kernels on CPU for testing"
        return f"triton: unsupported device {device_type}"
    return f"{backend}: unknown backend"


# --- per-op registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpBackends:
    fused: tuple[str, ...]  # fused backends this op implements
    prefer_gpu: tuple[str, ...]  # "auto" order on CUDA tensors (fastest first)


_ops: dict[str, OpBackends] = {}


def register_op(name: str, fused: tuple[str, ...], prefer_gpu: tuple[str, ...] = ("triton", "cuda")) -> None:
    _ops[name] = OpBackends(tuple(fused), tuple(b for b in prefer_gpu if b in fused))


# Under torch.compile the choice is made once, at trace time, and baked into the graph.
@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device) -> str:
    """The concrete backend ("reference", "cpu", "triton" or "cuda") that `op` uses for `device`."""
    spec = _ops[op]
    requested = get_backend()
    if requested == "reference":
        return requested
    if requested == "auto":
        order = ("cpu",) if device.type == "cpu" else spec.prefer_gpu
        for b in order:
            if b in spec.fused and why_unavailable(b, device.type) is None:
                return b
        return "reference"
    if requested not in spec.fused:
        raise RuntimeError(f"{op}: backend {requested!r} is not implemented for this op (has {spec.fused})")
    reason = why_unavailable(requested, device.type)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {requested!r} unavailable: {reason}")
    return requested


def available_backends(device: str | torch.device | None = None) -> dict[str, dict[str, str]]:
    """For each op and backend: "available" or the reason it is not, for `device`
    (default: "cuda" when a GPU is present, else "cpu")."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    table = {}
    for op, spec in sorted(_ops.items()):
        row = {"reference": "available"}
        for b in FUSED:
            if b not in spec.fused:
                row[b] = f"{b}: not implemented for {op}"
            else:
                row[b] = why_unavailable(b, device_type) or "available"
        with use_backend("auto"):
            row["auto"] = f"-> {resolve(op, torch.device(device_type))}"
        table[op] = row
    return table


def build_info() -> dict:
    """What was built: the extensions, their CUDA architectures, OpenMP, and the torch/Triton versions."""
    cpu_mod, cpu_reason = _extension("_C")
    cuda_mod, cuda_reason = _extension("_C_cuda")
    triton_version, triton_reason = _triton_version()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_extension": {"built": cpu_mod is not None, "openmp": getattr(cpu_mod, "openmp", None),
                          "threads": torch.get_num_threads(), "error": cpu_reason},
        "cuda_extension": {"built": cuda_mod is not None,
                           "archs": getattr(cuda_mod, "cuda_archs", "").split("_") if cuda_mod else [],
                           "error": cuda_reason},
        "triton": {"version": triton_version, "interpreter": triton_interpreting(), "error": triton_reason},
    }
