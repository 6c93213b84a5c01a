"""Optional Triton import shared by the op modules, plus small launch helpers.

Triton reads TRITON_INTERPRET when kernels are defined, so tests that run the kernels on CPU set it
before importing d2v2_kernels.
"""

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without Triton: the triton backend reports why
    triton = None
    tl = None


def row_block(C: int, cap: int = 1024) -> int:
    """Power-of-two channel block covering C (one program per row when C <= cap)."""
    block = 16
    while block < C and block < cap:
        block *= 2
    return block
