"""conv_decoder_block: one layer of data2vec 2.0's conv decoder, channels-last, fused.

out = GELU(LayerNorm_no_affine(conv(x) + bias)) (+ x when residual and Cin == Cout), exact erf GELU.
1-D x: [N, T, Cin], weight [Cout, Cin/groups, k]; 2-D x: [N, H, W, Cin], weight [Cout, Cin/groups, k, k].
"Same" padding as the reference: pad k // 2 on both sides, then drop the last step when k is even.

The eager chain (reference model, channels-first) runs conv + transpose + LayerNorm + transpose + GELU +
add: six or seven passes over the activations. The fused backends keep activations channels-last and
split the block into the conv (a GEMM) and one row-wise epilogue:

  forward   z = conv(x) (no bias, channels-last [M, Cout], M = N * positions, x.dtype);
            out, mean, rstd = epilogue(z, bias, x): bias + LayerNorm statistics (fp32) + normalise +
            GELU + residual, one read of z, one write of out. z, mean and rstd are saved for the backward
            (z is the only activation-sized tensor kept; y and GELU(y) are recomputed from it).
  backward  grad_z = rows of (LayerNorm + GELU)' applied to grad_out (y recomputed from z, mean, rstd),
            grad_bias = column sums of grad_z (fp32); grad_x = transposed conv of grad_z (+ grad_out
            when residual), grad_weight = per group grad_z^T x over positions.

  cpu     the conv on PyTorch (oneDNN) in channels-last memory format without transposing copies: 2-D x
          [N, H, W, C] permuted to NCHW *is* a channels_last tensor and the conv keeps that format, so its
          output permuted back is a contiguous [N, H, W, Cout]; 1-D x runs as 2-D with H = 1. The bias is
          not given to the conv: the C++ epilogue (csrc/cpu, OpenMP) adds it. The backward's conv is
          aten.convolution_backward on the same channels_last views. Even k: the trimmed z is copied
          (the trimmed step breaks the flat [M, C] view) and grad_z is zero-padded by one step.
  triton  an implicit-GEMM conv kernel per (position tile, group, Cout tile) with tl.dot, fp32
          accumulation (fp32 inputs with input_precision="ieee", no TF32), bf16/fp16 on tensor cores;
          the same kernel with the tap offsets negated and the weight transposed per group is the
          backward's transposed conv (grad_x), with the residual gradient added in its epilogue. The
          LayerNorm/GELU epilogue and its backward are row kernels (a whole Cout row per program);
          grad_weight is a GEMM over positions split into chunks, each chunk writing its own fp32 partial
          that a second pass sums (deterministic: no atomics); grad_bias likewise from per-chunk column
          sums of the grad_z kernel.

          Why two kernels and not the conv with the LayerNorm in its epilogue: the LayerNorm needs the
          whole Cout row, which spans every group, so a fused program must hold a [BLOCK_M, Cout] fp32
          tile across the group loop. Triton cannot write a register tile piecewise per group, so that
          means a batched [groups, BLOCK_M, Cout/groups padded to a power of two] accumulator: at the
          images base shape (Cout 768, 16 groups of 48 -> 64) and BLOCK_M 16 that is 16K fp32, 128
          registers per thread at 4 warps for the accumulator alone, before the operand tiles, i.e. spills
          (or 8+ warps and a quarter of the GEMM's M tile). The two-kernel split costs one extra write
          and read of z, which the backward needs saved anyway; both kernels compile spill-free at the
          data2vec shapes (see aot_specs and `python -m d2v2_kernels.ops.aot`).

Grouped convs with fewer than 16 channels per group (depthwise) run through the same tl.dot kernels with
the group's K and N padded to 16: correct, not fast.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import cpu_extension, register_op, resolve
from ._checks import check_int, check_same_device, check_tensor
from ._triton import triton, tl

OP = "conv_decoder_block"
register_op(OP, fused=("cpu", "triton"), prefer_gpu=("triton",))

CONV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- reference: the executable definition -----------------------------------------------------------


def conv_decoder_block_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, groups: int = 1, residual: bool = True, eps: float = 1e-5
) -> Tensor:
    """The reference model's ops in its order, on a channels-first view of the channels-last input."""
    k = weight.shape[-1]
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    y = conv(x.movedim(-1, 1), weight, bias, padding=k // 2, groups=groups)
    if k % 2 == 0:  # SamePad: drop the last step of every spatial dim
        y = y[..., :-1] if x.dim() == 3 else y[..., :-1, :-1]
    y = F.gelu(F.layer_norm(y.movedim(1, -1), (weight.shape[0],), eps=eps))
    if residual and x.shape[-1] == weight.shape[0]:
        y = y + x
    return y


# --- the epilogue in plain PyTorch: the op's "reference" backend (same contract as the C++ one) -------
# conv_decoder_epilogue_forward(z2d [M, C], bias | None, residual2d [M, C] | None, eps)
#     -> (out [M, C] z.dtype, mean [M], rstd [M])          (stats fp32; fp64 for fp64 z)
# conv_decoder_epilogue_backward(grad_out2d, z2d, bias | None, mean, rstd, need_bias_grad)
#     -> (grad_z [M, C] z.dtype, grad_bias [C] fp32 | None)

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def epilogue_forward_torch(z: Tensor, bias: Tensor | None, residual: Tensor | None, eps: float):
    acc = _acc_dtype(z.dtype)
    v = z.to(acc)
    if bias is not None:
        v = v + bias.to(acc)
    var, mean = torch.var_mean(v, -1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (v - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    out = F.gelu(y)
    if residual is not None:
        out = out + residual.to(acc)
    return out.to(z.dtype), mean, rstd


def epilogue_backward_torch(
    grad_out: Tensor, z: Tensor, bias: Tensor | None, mean: Tensor, rstd: Tensor, need_bias_grad: bool
):
    acc = _acc_dtype(z.dtype)
    v = z.to(acc)
    if bias is not None:
        v = v + bias.to(acc)
    y = (v - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dgelu = 0.5 * (1.0 + torch.erf(y * _INV_SQRT2)) + y * torch.exp(-0.5 * y * y) * _INV_SQRT_2PI
    g = grad_out.to(acc) * dgelu
    dz = rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True) - y * (g * y).mean(-1, keepdim=True))
    return dz.to(z.dtype), (dz.sum(0) if need_bias_grad else None)


# --- the conv in channels-last memory format, on PyTorch (cpu and reference backends) ----------------


def _nchw_view(x: Tensor) -> Tensor:
    """Channels-last [N, T, C] / [N, H, W, C] (contiguous) as a channels_last-strided NCHW tensor."""
    x4 = x.unsqueeze(1) if x.dim() == 3 else x
    return x4.permute(0, 3, 1, 2)


def _conv_geometry(x: Tensor, weight: Tensor):
    """(4-D weight, padding) of the conv as 2-D (1-D convs run with H = 1)."""
    k = weight.shape[-1]
    if x.dim() == 3:
        return weight.unsqueeze(2), [0, k // 2]
    return weight, [k // 2, k // 2]


def _conv_forward_torch(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """z = conv(x) without bias, as a contiguous channels-last [..., Cout] tensor shaped like x."""
    w4, padding = _conv_geometry(x, weight)
    z = F.conv2d(_nchw_view(x), w4, None, padding=padding, groups=groups)  # channels_last memory format
    if weight.shape[-1] % 2 == 0:  # drop the last step of every spatial dim
        z = z[..., :-1] if x.dim() == 3 else z[..., :-1, :-1]
    z = z.permute(0, 2, 3, 1)  # [N, H, W, Cout]: contiguous unless trimmed
    z = z.contiguous()  # a no-op for odd k
    return z.squeeze(1) if x.dim() == 3 else z


def _conv_backward_torch(grad_z: Tensor, x: Tensor, weight: Tensor, groups: int):
    """(grad_x channels-last like x, grad_weight like weight) of z = conv(x) from grad_z [..., Cout]."""
    w4, padding = _conv_geometry(x, weight)
    g = grad_z.unsqueeze(1) if x.dim() == 3 else grad_z
    if weight.shape[-1] % 2 == 0:  # the trimmed step had no gradient: zero-pad it back
        N, H, W, C = g.shape
        padded = g.new_zeros((N, H + (x.dim() == 4), W + 1, C))
        padded[:, :H, :W] = g
        g = padded
    dx, dw, _ = torch.ops.aten.convolution_backward(
        g.permute(0, 3, 1, 2), _nchw_view(x), w4, None, [1, 1], padding, [1, 1], False, [0, 0], groups,
        [True, True, False],
    )
    dx = dx.permute(0, 2, 3, 1).contiguous()  # channels_last already: no copy
    if x.dim() == 3:
        dx, dw = dx.squeeze(1), dw.squeeze(2)
    return dx, dw.contiguous()  # the weight gradient comes channels_last


def _torch_conv_forward(epilogue):
    def forward(x, weight, bias, groups, residual, eps):
        x = x.contiguous()
        z = _conv_forward_torch(x, weight, groups)
        C = z.shape[-1]
        res = x.reshape(-1, C) if residual else None
        out, mean, rstd = epilogue(z.view(-1, C), bias, res, eps)
        return out.view(z.shape), z, mean, rstd

    return forward


def _torch_conv_backward(epilogue_backward):
    def backward(grad_out, x, weight, bias, z, mean, rstd, groups, residual):
        x = x.contiguous()
        grad_out = grad_out.contiguous()
        C = z.shape[-1]
        grad_z, grad_bias = epilogue_backward(grad_out.view(-1, C), z.view(-1, C), bias, mean, rstd, bias is not None)
        dx, dw = _conv_backward_torch(grad_z.view(z.shape), x, weight, groups)
        if residual:
            dx.add_(grad_out)
        return dx, dw, _bias_grad(grad_bias, bias)

    return backward


def _bias_grad(grad_bias: Tensor | None, bias: Tensor | None) -> Tensor:
    if bias is None:
        return torch.empty((0,), dtype=torch.float32, device=grad_out_device(grad_bias))
    return grad_bias.to(bias.dtype)


def grad_out_device(t):
    return t.device if t is not None else "cpu"


def _cpu_epilogue_forward(z, bias, res, eps):
    return cpu_extension().conv_decoder_epilogue_forward(z, bias, res, eps)


def _cpu_epilogue_backward(grad_out, z, bias, mean, rstd, need_bias_grad):
    return cpu_extension().conv_decoder_epilogue_backward(grad_out, z, bias, mean, rstd, need_bias_grad)
