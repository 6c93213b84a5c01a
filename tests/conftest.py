"""Test session set-up: Triton kernels run on CPU through the interpreter (set before any import of
d2v2_kernels, since Triton reads it when kernels are defined); hypothesis kept short by default."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("default", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Tolerances of the contract (shared/spec/ops.md): fused vs reference.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fused_backends():
    """The fused backends that can run on CPU tensors in this process."""
    from d2v2_kernels.backends import why_unavailable

    return [b for b in ("cpu", "triton") if why_unavailable(b, "cpu") is None]
