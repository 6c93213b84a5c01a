"""gather_visible: the multi-mask student input, `x.repeat_interleave(clones, 0)` + gather, fused.

out[n, j] = x[n // clones, ids_keep[n, j]] for n < B*clones, j < K. The eager chain writes the M-fold
copy of the tokens and reads it back; the fused kernels read each kept row once and write it once.

Backward: grad_x[b, t] sums grad_out[n, j] over n // clones == b, ids_keep[n, j] == t. No atomics:
the CPU kernel gives each thread whole samples; the Triton and CUDA kernels sum a CSR segment per
input row (built with one stable sort of the flat target keys), so results are deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import cpu_extension, cuda_extension, register_op, resolve
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_int, check_same_device, check_tensor
from ._triton import triton, tl, row_block

OP = "gather_visible"
register_op(OP, fused=("cpu", "triton", "cuda"), prefer_gpu=("triton", "cuda"))


# --- reference: the executable definition (and the eager chain the benchmarks compare against) ------


def gather_visible_reference(x: Tensor, ids_keep: Tensor, clones: int = 1) -> Tensor:
    xr = x.repeat_interleave(clones, 0) if clones > 1 else x
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.gather(xr, 1, index)


# --- Triton kernels --------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def gather_visible_fwd_kernel(
        x_ptr, ids_ptr, out_ptr, K, C, clones,
        stride_xb, stride_xt, stride_in, stride_ik,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # flat output row n*K + j
        n = row // K
        j = row - n * K
        t = tl.load(ids_ptr + n * stride_in + j * stride_ik).to(tl.int64)
        src = x_ptr + (n // clones) * stride_xb + t * stride_xt
        offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = offs < C
        tl.store(out_ptr + row * C + offs, tl.load(src + offs, mask=mask), mask=mask)

    @triton.jit
    def gather_visible_bwd_kernel(
        grad_ptr, rows_ptr, seg_ptr, out_ptr, C,
        BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)  # flat input row b*T + t
        s0 = tl.load(seg_ptr + r)
        s1 = tl.load(seg_ptr + r + 1)
        offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = offs < C
        acc = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
        for s in range(s0, s1):
            src = tl.load(rows_ptr + s)
            acc += tl.load(grad_ptr + src * C + offs, mask=mask).to(ACC_DTYPE)
        tl.store(out_ptr + r * C + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _csr_by_target(ids_keep: Tensor, clones: int, T: int):
    """Source rows n*K + j grouped by target row b*T + t, and the B*T + 1 segment starts."""
    N = ids_keep.shape[0]
    sample = torch.arange(N, device=ids_keep.device).div(clones, rounding_mode="floor").unsqueeze(1)
    keys = (sample * T + ids_keep.long()).flatten()
    rows_by_target = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=(N // clones) * T)
    segment_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return rows_by_target, segment_start


def _triton_forward(x: Tensor, ids_keep: Tensor, clones: int) -> Tensor:
    N, K = ids_keep.shape
    C = x.shape[2]
    out = x.new_empty((N, K, C))
    if out.numel() == 0:
        return out
    if x.stride(2) != 1:
        x = x.contiguous()
    block = row_block(C)
    grid = (N * K, triton.cdiv(C, block))
    gather_visible_fwd_kernel[grid](
        x, ids_keep, out, K, C, clones, x.stride(0), x.stride(1), ids_keep.stride(0), ids_keep.stride(1),
        BLOCK_C=block,
    )
    return out


def _triton_backward(grad: Tensor, ids_keep: Tensor, clones: int, T: int) -> Tensor:
    N, K, C = grad.shape
    grad_x = grad.new_empty((N // clones, T, C))
    if grad_x.numel() == 0:
        return grad_x
    grad = grad.contiguous()
    rows_by_target, segment_start = _csr_by_target(ids_keep, clones, T)
    block = row_block(C)
    acc = tl.float64 if grad.dtype == torch.float64 else tl.float32
    grid = ((N // clones) * T, triton.cdiv(C, block))
    gather_visible_bwd_kernel[grid](grad, rows_by_target, segment_start, grad_x, C, BLOCK_C=block, ACC_DTYPE=acc)
    return grad_x


# --- the torch.library op: one name, every fused backend behind it -------------------------------

_FORWARD = {
    "reference": gather_visible_reference,
    "cpu": lambda x, ids, clones: cpu_extension().gather_visible_forward(x, ids, clones),
    "cuda": lambda x, ids, clones: cuda_extension().gather_visible_forward(x, ids, clones),
    "triton": _triton_forward,
}


def _reference_backward(grad: Tensor, ids_keep: Tensor, clones: int, T: int) -> Tensor:
    N, K, C = grad.shape
    grad_x = grad.new_zeros((N, T, C))
    grad_x.scatter_add_(1, ids_keep.long().unsqueeze(-1).expand(-1, -1, C), grad)
    return grad_x.view(N // clones, clones, T, C).sum(1) if clones > 1 else grad_x


_BACKWARD = {
    "reference": _reference_backward,
    "cpu": lambda g, ids, clones, T: cpu_extension().gather_visible_backward(g, ids, clones, T),
    "cuda": lambda g, ids, clones, T: cuda_extension().gather_visible_backward(g, ids, clones, T),
    "triton": _triton_backward,
}


@torch.library.custom_op("d2v2::gather_visible", mutates_args=())
def _gather_visible_op(x: Tensor, ids_keep: Tensor, clones: int, backend: str) -> Tensor:
    check_index_range("ids_keep", ids_keep, x.shape[1])
    return _FORWARD[backend](x, ids_keep, clones)


@_gather_visible_op.register_fake
def _(x, ids_keep, clones, backend):
    return x.new_empty((ids_keep.shape[0], ids_keep.shape[1], x.shape[2]))


@torch.library.custom_op("d2v2::gather_visible_backward", mutates_args=())
def _gather_visible_backward_op(grad: Tensor, ids_keep: Tensor, clones: int, T: int, backend: str) -> Tensor:
    return _BACKWARD[backend](grad, ids_keep, clones, T)


@_gather_visible_backward_op.register_fake
def _(grad, ids_keep, clones, T, backend):
    return grad.new_empty((grad.shape[0] // clones, T, grad.shape[2]))


def _setup_context(ctx, inputs, output):
    x, ids_keep, clones, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.clones, ctx.T, ctx.backend = clones, x.shape[1], backend


def _backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    return _gather_visible_backward_op(grad, ids_keep, ctx.clones, ctx.T, ctx.backend), None, None, None


_gather_visible_op.register_autograd(_backward, setup_context=_setup_context)


# --- public API ------------------------------------------------------------------------------------


def gather_visible(x: Tensor, ids_keep: Tensor, clones: int = 1) -> Tensor:
    """`x.repeat_interleave(clones, 0).gather(1, ids_keep)` over channels, without the repeated copy.

    x: [B, T, C] float; ids_keep: [B*clones, K] int32/int64 in [0, T). Returns [B*clones, K, C].
    Differentiable in x; repeated ids accumulate in the gradient.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES)
    check_int("clones", clones, minimum=1)
    check_same_device(x=x, ids_keep=ids_keep)
    B, T, C = x.shape
    if B == 0 or T == 0 or C == 0:
        raise ValueError(f"x: expected a non-empty [B, T, C] tensor, got shape {tuple(x.shape)}")
    if ids_keep.shape[0] != B * clones:
        raise ValueError(
            f"ids_keep: expected {B * clones} rows (B={B} x clones={clones}), got shape {tuple(ids_keep.shape)}"
        )
    backend = resolve(OP, x.device)
    if backend == "reference":
        if not torch.compiler.is_compiling():
            check_index_range("ids_keep", ids_keep, T)
        return gather_visible_reference(x, ids_keep, clones)
    return _gather_visible_op(x, ids_keep, clones, backend)


def aot_specs():
    """Triton kernels and signatures for the ahead-of-time compile check (ops/aot.py)."""
    for dt in ("fp32", "bf16"):
        yield gather_visible_fwd_kernel, {
            "x_ptr": f"*{dt}", "ids_ptr": "*i64", "out_ptr": f"*{dt}", "K": "i32", "C": "i32", "clones": "i32",
            "stride_xb": "i64", "stride_xt": "i64", "stride_in": "i64", "stride_ik": "i32",
        }, {"BLOCK_C": 1024}
        yield gather_visible_bwd_kernel, {
            "grad_ptr": f"*{dt}", "rows_ptr": "*i64", "seg_ptr": "*i64", "out_ptr": f"*{dt}", "C": "i32",
        }, {"BLOCK_C": 1024, "ACC_DTYPE": tl.float32}
