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
          means a batched [groups, BLOCK_M, Cout/groups padded to a power of two] accumulator and a 3-D
          tl.dot: at the images base shape (Cout 768, 16 groups of 48 -> 64) that is 16K fp32 at
          BLOCK_M 16, 128 per thread at 4 warps for the accumulator alone. Compiled as an experiment
          (sm_80/sm_90, fp32/bf16): 255 registers at BLOCK_M 16 (the ceiling; sm_80 fp32 168), ~40 s of
          compile per variant, and a BLOCK_M 32 variant reporting 32 registers, which cannot hold its 32K
          accumulator and could not be checked without a GPU. The two kernels cost one extra write and
          read of z, which the backward needs saved anyway, and compile spill-free in about a second
          each at the data2vec shapes (aot_specs; `python -m d2v2_kernels.ops.aot`).

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
        return dx, dw, _bias_grad(grad_bias, bias, x.device)

    return backward


def _bias_grad(grad_bias: Tensor | None, bias: Tensor | None, device) -> Tensor:
    """The backward op's third output: grad_bias in the bias dtype, or an empty tensor without a bias."""
    if bias is None:
        return torch.empty((0,), dtype=torch.float32, device=device)
    return grad_bias.to(bias.dtype)


def _cpu_epilogue_forward(z, bias, res, eps):
    return cpu_extension().conv_decoder_epilogue_forward(z, bias, res, eps)


def _cpu_epilogue_backward(grad_out, z, bias, mean, rstd, need_bias_grad):
    return cpu_extension().conv_decoder_epilogue_backward(grad_out, z, bias, mean, rstd, need_bias_grad)


# --- Triton kernels --------------------------------------------------------------------------------
# Positions are flat rows m = (n * H + h) * W + w of a channels-last activation (1-D: H = 1, W = T); a
# tap (dh, dw) of the KH x KW kernel (1-D: KH = 1) reads source row (h + dh - PH, w + dw - PW), zero
# outside the input (PH = KH // 2: the "same" padding; for even k the output simply stops at H - 1,
# which is the reference's trimmed last step). The transposed conv (FLIP) reads (h - dh + PH, ...).

if triton is not None:

    @triton.jit
    def _rows(m, H, W):
        hw = H * W
        n = m // hw
        r = m - n * hw
        h = r // W
        return n, h, r - h * W

    @triton.jit
    def conv_cl_gemm_kernel(
        src_ptr, w_ptr, dst_ptr, add_ptr, H, W, M, C_SRC, C_DST, CG_SRC, CG_DST, n_tiles,
        stride_sn, stride_sh, stride_sw,
        KH: tl.constexpr, KW: tl.constexpr, FLIP: tl.constexpr, ADD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
    ):
        """dst[m, g*CG_DST + j] = sum_{tap, i} src[row(m, tap), g*CG_SRC + i] * w[g, tap, i, j] (+ add[m, .]).

        Implicit GEMM per group: M = positions, N = CG_DST, K = taps x CG_SRC. w is packed [G, KH*KW,
        CG_SRC, CG_DST] (contiguous, so the B tile loads along its rows). src has channel stride 1; dst and
        add are contiguous [M, C_DST]."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = pid_n // n_tiles
        offs_n = (pid_n - g * n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < CG_DST
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions fit int32; addresses are int64
        m_ok = m < M
        n, h, w = _rows(m, H, W)
        src_base = src_ptr + n.to(tl.int64) * stride_sn + g * CG_SRC
        w_base = w_ptr + g.to(tl.int64) * (KH * KW) * CG_SRC * CG_DST
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for tap in range(KH * KW):
            dh = tap // KW
            dw = tap - dh * KW
            if FLIP:
                ih = h - dh + KH // 2
                iw = w - dw + KW // 2
            else:
                ih = h + dh - KH // 2
                iw = w + dw - KW // 2
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_row = src_base + ih * stride_sh + iw * stride_sw
            b_tap = w_base + tap * CG_SRC * CG_DST
            for k0 in range(0, CG_SRC, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < CG_SRC
                a = tl.load(a_row[:, None] + offs_k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_tap + offs_k[:, None] * CG_DST + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                            other=0.0)
                acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
        out_off = m.to(tl.int64)[:, None] * C_DST + (g * CG_DST + offs_n)[None, :]
        st = m_ok[:, None] & n_ok[None, :]
        if ADD:
            acc += tl.load(add_ptr + out_off, mask=st, other=0.0).to(ACC)
        tl.store(dst_ptr + out_off, acc.to(dst_ptr.dtype.element_ty), mask=st)

    @triton.jit
    def conv_cl_wgrad_kernel(
        x_ptr, gz_ptr, part_ptr, H, W, M, C_OUT, CG_IN, CG_OUT, rows_per_split, n_ci_tiles,
        stride_xn, stride_xh, stride_xw, stride_ps,
        KH: tl.constexpr, KW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, ACC: tl.constexpr,
    ):
        """part[s, g*CG_OUT + o, i, tap] = sum over the rows m of split s of
        gz[m, g*CG_OUT + o] * x[row(m, tap), g*CG_IN + i].

        One program per (row split, group x Cout tile x Cin tile, tap); the splits' fp32 partials are
        summed by a second pass (deterministic). part is [splits, C_OUT, CG_IN, KH*KW]: the weight layout."""
        pid_s = tl.program_id(0)
        pid_t = tl.program_id(1)
        tap = tl.program_id(2)
        tiles_per_g = tl.cdiv(CG_OUT, BLOCK_CO) * n_ci_tiles
        g = pid_t // tiles_per_g
        t = pid_t - g * tiles_per_g
        t_co = t // n_ci_tiles
        offs_co = t_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        offs_ci = (t - t_co * n_ci_tiles) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        co_ok = offs_co < CG_OUT
        ci_ok = offs_ci < CG_IN
        dh = tap // KW
        dw = tap - dh * KW
        start = pid_s * rows_per_split  # positions fit int32; addresses are int64
        end = tl.minimum(start + rows_per_split, M)
        acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=ACC)
        for m0 in range(start, end, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            m_ok = m < end
            n, h, w = _rows(m, H, W)
            ih = h + dh - KH // 2
            iw = w + dw - KW // 2
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            gz = tl.load(gz_ptr + m.to(tl.int64)[:, None] * C_OUT + (g * CG_OUT + offs_co)[None, :],
                         mask=m_ok[:, None] & co_ok[None, :], other=0.0)
            x_row = n.to(tl.int64) * stride_xn + ih * stride_xh + iw * stride_xw + g * CG_IN
            xs = tl.load(x_ptr + x_row[:, None] + offs_ci[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(gz), xs, acc, input_precision="ieee", out_dtype=ACC)
        out = (part_ptr + pid_s * stride_ps + ((g * CG_OUT + offs_co)[:, None] * CG_IN + offs_ci[None, :]) * (KH * KW)
               + tap)
        tl.store(out, acc, mask=co_ok[:, None] & ci_ok[None, :])

    @triton.jit
    def conv_decoder_epilogue_fwd_kernel(
        z_ptr, bias_ptr, res_ptr, out_ptr, mean_ptr, rstd_ptr, M, C, eps,
        HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    ):
        """out = GELU((z + bias - mean) * rstd) (+ res) over whole rows of C channels; stats in ACC."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        c_ok = cols < C
        ok = (rows < M)[:, None] & c_ok[None, :]
        off = rows[:, None] * C + cols[None, :]
        v = tl.load(z_ptr + off, mask=ok, other=0.0).to(ACC)
        if HAS_BIAS:
            v += tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(ACC)[None, :]
        mean = tl.sum(v, 1) / C
        d = tl.where(ok, v - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
        y = d * rstd[:, None]
        out = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        if RESIDUAL:
            out += tl.load(res_ptr + off, mask=ok, other=0.0).to(ACC)
        tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + rows, mean, mask=rows < M)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)

    @triton.jit
    def conv_decoder_epilogue_bwd_kernel(
        gout_ptr, z_ptr, bias_ptr, mean_ptr, rstd_ptr, gz_ptr, dbpart_ptr, M, C,
        HAS_BIAS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    ):
        """grad_z = LayerNorm'(GELU'(y) * grad_out) per row, y recomputed from z, bias, mean, rstd; the
        column sums of this program's ROWS_PER_PROGRAM rows go to dbpart[program] (grad_bias partials)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        c_ok = cols < C
        if HAS_BIAS:
            b = tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(ACC)
        db = tl.zeros([BLOCK_C], dtype=ACC)
        for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_M):
            rows = pid.to(tl.int64) * ROWS_PER_PROGRAM + r0 + tl.arange(0, BLOCK_M)
            r_ok = rows < M
            ok = r_ok[:, None] & c_ok[None, :]
            off = rows[:, None] * C + cols[None, :]
            v = tl.load(z_ptr + off, mask=ok, other=0.0).to(ACC)
            if HAS_BIAS:
                v += b[None, :]
            mean = tl.load(mean_ptr + rows, mask=r_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
            y = tl.where(ok, (v - mean[:, None]) * rstd[:, None], 0.0)
            dgelu = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476)) + y * tl.exp(-0.5 * y * y) * 0.3989422804014327
            gy = tl.load(gout_ptr + off, mask=ok, other=0.0).to(ACC) * dgelu
            c1 = tl.sum(gy * y, 1) / C
            c2 = tl.sum(gy, 1) / C
            dz = tl.where(ok, rstd[:, None] * (gy - c2[:, None] - y * c1[:, None]), 0.0)
            tl.store(gz_ptr + off, dz.to(gz_ptr.dtype.element_ty), mask=ok)
            if HAS_BIAS:
                db += tl.sum(dz, 0)
        if HAS_BIAS:
            tl.store(dbpart_ptr + pid.to(tl.int64) * C + cols, db, mask=c_ok)


def _k_block(n: int) -> int:
    """The dot's K block over a per-group size n (reduced dimension): the largest of 64/32/16 dividing n
    (no masked waste), else the power of two covering n, between 16 and 64."""
    for b in (64, 32, 16):
        if n % b == 0:
            return b
    return max(16, min(64, triton.next_power_of_2(n)))


def _n_block(n: int) -> int:
    """An output block over a per-group size n: one tile per group up to 64 (48 -> 64 reads each A tile
    once; three 16-wide tiles would read it three times), 64-wide tiles beyond."""
    return max(16, min(64, triton.next_power_of_2(n)))


# Positions per program (the GEMM's M tile). fp32 runs tl.dot on FMA units (no TF32), whose operand
# layouts cost registers: at 4 warps and the default 3 stages a 64 x 64 fp32 tile takes 255 registers
# (no spill, but one CTA per SM), 32 x 64 takes 168; bf16/fp16 on tensor cores: 64 x 64 takes ~150.
# The weight gradient's dot reduces over BLOCK_M positions (its K): 16 (fp32) / 32 (16-bit) keeps its
# 64 x 64 fp32 tile at <= 167 registers (32 / 64 take 255). See aot_specs for the compiled numbers.
def _conv_block_m(dtype: torch.dtype) -> int:
    return 64 if dtype in (torch.bfloat16, torch.float16) else 32


def _wgrad_block_m(dtype: torch.dtype) -> int:
    return 32 if dtype in (torch.bfloat16, torch.float16) else 16


_WGRAD_MIN_ROWS = 1024  # rows per weight-gradient split, at least
_WGRAD_MAX_SPLITS = 16
_ROW_WARPS_ELEMS = 1024  # row kernels: BLOCK_M * BLOCK_C elements per live vector (8 per thread at 4 warps)
_DB_ROWS = 64  # rows per program of the grad_z kernel (one grad_bias partial each)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(x: Tensor, weight: Tensor):
    """(H, W, KH, KW, (stride n, h, w)) of channels-last x as 2-D (1-D: H = 1)."""
    k = weight.shape[-1]
    if x.dim() == 3:
        return 1, x.shape[1], 1, k, (x.stride(0), 0, x.stride(1))
    return x.shape[1], x.shape[2], k, k, (x.stride(0), x.stride(1), x.stride(2))


def _conv_blocks(cg_src: int, cg_dst: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the implicit-GEMM conv."""
    return _n_block(cg_dst), _k_block(cg_src)


def _launch_conv(src, w_packed, dst, add, geom, M, C_src, C_dst, G, flip):
    H, W, KH, KW, strides = geom
    cg_src, cg_dst = C_src // G, C_dst // G
    block_n, block_k = _conv_blocks(cg_src, cg_dst)
    n_tiles = triton.cdiv(cg_dst, block_n)
    block_m = _conv_block_m(src.dtype)
    grid = (triton.cdiv(M, block_m), G * n_tiles)
    conv_cl_gemm_kernel[grid](
        src, w_packed, dst, add if add is not None else dst, H, W, M, C_src, C_dst, cg_src, cg_dst, n_tiles,
        *strides, KH=KH, KW=KW, FLIP=flip, ADD=add is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ACC=_tl_acc(src.dtype),
    )


def _row_blocks(C: int) -> tuple[int, int]:
    block_c = max(16, triton.next_power_of_2(C))
    return max(1, min(16, _ROW_WARPS_ELEMS // block_c)), block_c


def _triton_forward(x, weight, bias, groups, residual, eps):
    if x.stride(-1) != 1:
        x = x.contiguous()
    Cin, Cout, G = x.shape[-1], weight.shape[0], groups
    geom = _geometry(x, weight)
    H, W, KH, KW, _ = geom
    M = x.numel() // Cin
    if M >= 2**31:  # the kernels index positions in int32 (addresses in int64)
        raise ValueError(f"x: the triton backend takes fewer than 2**31 positions, got {M} (shape {tuple(x.shape)})")
    # [Cout, Cin/G, taps] -> [G, taps, Cin/G, Cout/G]: the B operand of each (group, tap), rows along Cin
    w_packed = weight.reshape(G, Cout // G, Cin // G, KH * KW).permute(0, 3, 2, 1).contiguous()
    z = x.new_empty(x.shape[:-1] + (Cout,))
    _launch_conv(x, w_packed, z, None, geom, M, Cin, Cout, G, flip=False)
    acc = _acc_dtype(x.dtype)
    out = torch.empty_like(z)
    mean = torch.empty((M,), dtype=acc, device=x.device)
    rstd = torch.empty((M,), dtype=acc, device=x.device)
    res = None
    if residual:
        res = x if x.is_contiguous() else x.contiguous()
    block_m, block_c = _row_blocks(Cout)
    conv_decoder_epilogue_fwd_kernel[(triton.cdiv(M, block_m),)](
        z, bias if bias is not None else z, res if res is not None else z, out, mean, rstd, M, Cout, eps,
        HAS_BIAS=bias is not None, RESIDUAL=residual, BLOCK_M=block_m, BLOCK_C=block_c, ACC=_tl_acc(x.dtype),
    )
    return out, z, mean, rstd


def _wgrad_splits(M: int, block_m: int) -> tuple[int, int]:
    """(splits, rows per split) of the weight-gradient reduction over positions."""
    splits = max(1, min(_WGRAD_MAX_SPLITS, M // _WGRAD_MIN_ROWS))
    rows = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return triton.cdiv(M, rows), rows


def _triton_backward(grad_out, x, weight, bias, z, mean, rstd, groups, residual):
    if x.stride(-1) != 1:
        x = x.contiguous()
    grad_out = grad_out.contiguous()
    Cin, Cout, G = x.shape[-1], weight.shape[0], groups
    geom = _geometry(x, weight)
    H, W, KH, KW, x_strides = geom
    M = x.numel() // Cin
    acc = _acc_dtype(x.dtype)
    # grad_z (and grad_bias partials)
    grad_z = torch.empty_like(z)
    block_m, block_c = _row_blocks(Cout)
    rows_per_program = max(block_m, _DB_ROWS)
    programs = triton.cdiv(M, rows_per_program)
    db_part = torch.empty((programs, Cout) if bias is not None else (1,), dtype=acc, device=x.device)
    conv_decoder_epilogue_bwd_kernel[(programs,)](
        grad_out, z, bias if bias is not None else z, mean, rstd, grad_z, db_part, M, Cout,
        HAS_BIAS=bias is not None, ROWS_PER_PROGRAM=rows_per_program, BLOCK_M=block_m, BLOCK_C=block_c,
        ACC=_tl_acc(x.dtype),
    )
    grad_bias = db_part.sum(0) if bias is not None else None
    # grad_x: the transposed conv of grad_z (tap offsets negated, weight [G, taps, Cout/G, Cin/G]), + grad_out
    w_t = weight.reshape(G, Cout // G, Cin // G, KH * KW).permute(0, 3, 1, 2).contiguous()
    grad_x = x.new_empty(x.shape)
    gz_geom = (H, W, KH, KW, (H * W * Cout, W * Cout, Cout))
    _launch_conv(grad_z, w_t, grad_x, grad_out if residual else None, gz_geom, M, Cout, Cin, G, flip=True)
    # grad_weight: per (split, group tile, tap) partials, summed over the splits
    cg_in, cg_out = Cin // G, Cout // G
    block_co, block_ci = _n_block(cg_out), _n_block(cg_in)
    n_ci_tiles = triton.cdiv(cg_in, block_ci)
    wgrad_block_m = _wgrad_block_m(x.dtype)
    splits, rows = _wgrad_splits(M, wgrad_block_m)
    part = torch.empty((splits, Cout, cg_in, KH * KW), dtype=acc, device=x.device)
    grid = (splits, G * triton.cdiv(cg_out, block_co) * n_ci_tiles, KH * KW)
    conv_cl_wgrad_kernel[grid](
        x, grad_z, part, H, W, M, Cout, cg_in, cg_out, rows, n_ci_tiles, *x_strides, part.stride(0),
        KH=KH, KW=KW, BLOCK_M=wgrad_block_m, BLOCK_CO=block_co, BLOCK_CI=block_ci, ACC=_tl_acc(x.dtype),
    )
    grad_w = (part[0] if splits == 1 else part.sum(0)).to(weight.dtype).view(weight.shape)
    return grad_x, grad_w, _bias_grad(grad_bias, bias, x.device)


# --- the torch.library ops: one name, every fused backend behind it ------------------------------
# Forward op: (out, z, mean, rstd); z (conv output without bias, channels-last), mean and rstd are saved
# for the backward op and are not differentiable. The "reference" entry runs the same decomposition in
# plain PyTorch (the PyTorch conv + the PyTorch epilogue above): the public reference path does not use
# the op, this one exists for opcheck and for checking the decomposition itself.

_FORWARD = {
    "reference": _torch_conv_forward(epilogue_forward_torch),
    "cpu": _torch_conv_forward(_cpu_epilogue_forward),
    "triton": _triton_forward,
}

_BACKWARD = {
    "reference": _torch_conv_backward(epilogue_backward_torch),
    "cpu": _torch_conv_backward(_cpu_epilogue_backward),
    "triton": _triton_backward,
}


@torch.library.custom_op("d2v2::conv_decoder_block", mutates_args=())
def _conv_decoder_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int, residual: bool, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """residual: add x (the caller passes residual and Cin == Cout)."""
    return _FORWARD[backend](x, weight, bias, groups, residual, eps)


@_conv_decoder_op.register_fake
def _(x, weight, bias, groups, residual, eps, backend):
    shape = tuple(x.shape[:-1]) + (weight.shape[0],)
    M = x.numel() // x.shape[-1]
    acc = _acc_dtype(x.dtype)
    return (x.new_empty(shape), x.new_empty(shape), x.new_empty((M,), dtype=acc), x.new_empty((M,), dtype=acc))


@torch.library.custom_op("d2v2::conv_decoder_block_backward", mutates_args=())
def _conv_decoder_backward_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor, mean: Tensor, rstd: Tensor,
    groups: int, residual: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); grad_bias is an empty fp32 tensor when bias is None."""
    return _BACKWARD[backend](grad_out, x, weight, bias, z, mean, rstd, groups, residual)


@_conv_decoder_backward_op.register_fake
def _(grad_out, x, weight, bias, z, mean, rstd, groups, residual, backend):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else x.new_empty((0,), dtype=torch.float32)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, residual, eps, backend = inputs
    out, z, mean, rstd = output
    ctx.mark_non_differentiable(z, mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled "gradients" for z, mean, rstd
    ctx.save_for_backward(x, weight, bias, z, mean, rstd)
    ctx.args = (groups, residual, backend)


def _backward(ctx, grad_out, _grad_z, _grad_mean, _grad_rstd):
    if grad_out is None:  # out took no part in the loss
        return (None,) * 7
    x, weight, bias, z, mean, rstd = ctx.saved_tensors
    groups, residual, backend = ctx.args
    grad_x, grad_w, grad_b = _conv_decoder_backward_op(grad_out, x, weight, bias, z, mean, rstd, groups, residual,
                                                       backend)
    return grad_x, grad_w, (grad_b if bias is not None else None), None, None, None, None


_conv_decoder_op.register_autograd(_backward, setup_context=_setup_context)


# --- public API ------------------------------------------------------------------------------------


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int, eps: float) -> None:
    check_tensor("x", x, dtypes=CONV_DTYPES)
    check_tensor("weight", weight, dtypes=(x.dtype,))
    if x.dim() not in (3, 4):
        raise ValueError(
            f"x: expected channels-last [N, T, C] (1-D) or [N, H, W, C] (2-D), got shape {tuple(x.shape)}"
        )
    if weight.dim() != x.dim():
        kind = "[Cout, Cin/groups, k]" if x.dim() == 3 else "[Cout, Cin/groups, k, k]"
        raise ValueError(
            f"weight: expected {kind} ({x.dim()}-D, matching the {x.dim() - 2}-D conv of x), "
            f"got shape {tuple(weight.shape)}"
        )
    check_int("groups", groups, minimum=1)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    check_same_device(x=x, weight=weight)
    cin, cout, k = x.shape[-1], weight.shape[0], weight.shape[-1]
    if x.dim() == 4 and weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight: expected a square k x k kernel, got shape {tuple(weight.shape)}")
    if cin % groups or cout % groups:
        raise ValueError(f"groups={groups} must divide both input channels ({cin}) and output channels ({cout})")
    if weight.shape[1] * groups != cin:
        hint = ""
        if x.shape[1] == weight.shape[1] * groups:
            hint = " (x looks channels-first; this op takes channels-last x)"
        raise ValueError(
            f"weight: expected Cin/groups = {cin}/{groups} input channels per group from channels-last x of "
            f"shape {tuple(x.shape)}, got weight shape {tuple(weight.shape)}{hint}"
        )
    spatial = tuple(x.shape[1:-1])
    if min(spatial) < 1 or x.shape[0] == 0 or cin == 0 or cout == 0:
        raise ValueError(f"x: expected a non-empty input, got shape {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if k < 1 or k > min(spatial):
        raise ValueError(f"weight: kernel size {k} larger than the input's spatial size {spatial}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,))
        check_same_device(x=x, bias=bias)
        if bias.shape[0] != cout:
            raise ValueError(f"bias: expected shape ({cout},), got {tuple(bias.shape)}")


def conv_decoder_block(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, groups: int = 1, residual: bool = True,
    eps: float = 1e-5,
) -> Tensor:
    """One conv decoder layer on channels-last activations: conv + bias -> LayerNorm (no affine) -> GELU
    (+ x when `residual` and Cin == Cout). Differentiable in x, weight and bias.

    x: [N, T, Cin] (1-D) or [N, H, W, Cin] (2-D), fp32/bf16/fp16 (fp64 for gradcheck); weight:
    [Cout, Cin/groups, k] or [Cout, Cin/groups, k, k] of x's dtype; bias: [Cout] or None. Stride 1, "same"
    padding (k // 2, the last step dropped for even k). Statistics in fp32. Returns [..., Cout] in x.dtype.
    """
    _check_inputs(x, weight, bias, groups, eps)
    if not isinstance(residual, bool):
        raise TypeError(f"residual: expected a bool, got {type(residual).__name__}")
    backend = resolve(OP, x.device)
    if backend == "reference":
        return conv_decoder_block_reference(x, weight, bias, groups, residual, float(eps))
    add_residual = residual and x.shape[-1] == weight.shape[0]
    return _conv_decoder_op(x, weight, bias, groups, add_residual, float(eps), backend)[0]


def aot_specs():
    """Triton kernels and signatures for the ahead-of-time compile check (ops/aot.py): the data2vec 2.0
    decoders, images (768 channels, 16 groups, 3 x 3) and audio (384 channels, 16 groups, k = 7)."""
    for C, G, KH, KW in ((768, 16, 3, 3), (384, 16, 1, 7)):
        cg = C // G
        block_n, block_k = _conv_blocks(cg, cg)
        block_m, block_c = _row_blocks(C)
        for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ints = {"H": "i32", "W": "i32", "M": "i32", "C_SRC": "i32", "C_DST": "i32", "CG_SRC": "i32",
                    "CG_DST": "i32", "n_tiles": "i32", "stride_sn": "i32", "stride_sh": "i32", "stride_sw": "i32"}
            for flip in (False, True):  # forward conv; grad_x (transposed conv + residual gradient)
                yield conv_cl_gemm_kernel, {
                    "src_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dst_ptr": f"*{dt}", "add_ptr": f"*{dt}", **ints,
                }, {"KH": KH, "KW": KW, "FLIP": flip, "ADD": flip, "BLOCK_M": _conv_block_m(dtype), "BLOCK_N": block_n,
                    "BLOCK_K": block_k, "ACC": tl.float32}
            yield conv_cl_wgrad_kernel, {
                "x_ptr": f"*{dt}", "gz_ptr": f"*{dt}", "part_ptr": "*fp32", "H": "i32", "W": "i32", "M": "i32",
                "C_OUT": "i32", "CG_IN": "i32", "CG_OUT": "i32", "rows_per_split": "i32", "n_ci_tiles": "i32",
                "stride_xn": "i32", "stride_xh": "i32", "stride_xw": "i32", "stride_ps": "i32",
            }, {"KH": KH, "KW": KW, "BLOCK_M": _wgrad_block_m(dtype), "BLOCK_CO": _n_block(cg),
                "BLOCK_CI": _n_block(cg),
                "ACC": tl.float32}
            yield conv_decoder_epilogue_fwd_kernel, {
                "z_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "res_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "M": "i32", "C": "i32", "eps": "fp32",
            }, {"HAS_BIAS": True, "RESIDUAL": True, "BLOCK_M": block_m, "BLOCK_C": block_c, "ACC": tl.float32}
            yield conv_decoder_epilogue_bwd_kernel, {
                "gout_ptr": f"*{dt}", "z_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                "gz_ptr": f"*{dt}", "dbpart_ptr": "*fp32", "M": "i32", "C": "i32",
            }, {"HAS_BIAS": True, "ROWS_PER_PROGRAM": max(block_m, _DB_ROWS), "BLOCK_M": block_m, "BLOCK_C": block_c,
                "ACC": tl.float32}
