"""layer_average_targets: the data2vec 2.0 teacher targets, per-layer norm + average + final norm, fused.

out = final_norm(sum_k layer_norm(layers[k]) / K), fp32 [B, T, C] (fp64 for fp64 layers), no autograd.
layer_norm: "instance" (over T per (b, c)), "layer" (over C per (b, t)) or None; final_norm: None,
"layer" or "instance". All statistics in fp32, biased variance, no affine, `eps` everywhere. With a
padding_mask ([B, T] bool, True = padded) padded steps take no part in any statistic and are 0 out.

The eager chain (fairseq's make_targets) writes a transposed, normalised fp32 copy of every layer, sums
the copies and normalises the sum: ~3 reads and 2 writes of each layer's size. The cpu backend reads
each layer from memory once, the triton one twice (statistics, then rows); no per-layer copies, no
transposes, no stacking, and one write of the output (a final instance norm adds an in-place pass):
  cpu     one task per sample (per (sample, channel tile) when there are fewer samples than threads
          need): for each layer, Welford statistics of its [T, C] block (streamed once from memory),
          then the block again from L2/L3, normalised and added into the output block, which stays
          cached while the K layers are summed into it; the final norm (layer or instance) on that
          block in place. A per-layer layer norm runs by rows instead: row statistics on the fly,
          the average and a final layer norm in L1, one write; a final instance norm is then a column
          pass over the output in place.
  triton  a column kernel (grid (K*B, channel blocks), loop over T in chunks merged by Chan's rule) takes
          the per-layer instance statistics; a row kernel (grid B*T, one block of next_pow2(C) channels)
          loops over the K layers, normalises (instance: with those statistics; layer: row statistics in
          registers), averages, applies a final layer norm in registers and stores once. A final instance
          norm is a third pass: the column kernel again, over the output in place.
No CUDA C++ backend: the op is two bandwidth-bound reductions, which the Triton kernels cover on the GPU.

Numerics: statistics are taken on x - shift with shift one valid sample of the same set (the first
valid step of a column, channel 0 of a row), by Welford / Chan merges: no E[x^2] - E[x]^2, so constant
channels normalise to 0 (not NaN) and teacher outputs on a 1e4 offset keep fp32 accuracy (the fp32
reference, which normalises x - mean with an fp32 mean of size 1e4, does not). The average is the
reference's sequential sum followed by one division by K.

Stacked or list input: a [K, B, T, C] tensor is read through its stride over K; a list of K [B, T, C]
tensors through a table of K pointers (cpu) or addresses (triton), never stacked. `TargetLayerBuffer`
gives the teacher a preallocated [K, B, T, C] tensor to write its layers into, so nothing is stacked.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import cpu_extension, register_op, resolve
from ._checks import FLOAT_DTYPES, check_int, check_tensor
from ._triton import triton, tl

OP = "layer_average_targets"
register_op(OP, fused=("cpu", "triton"), prefer_gpu=("triton",))

NORMS = ("instance", "layer", None)
_FINAL_NORMS = (None, "layer", "instance")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layer_list(layers) -> list[Tensor]:
    return list(layers.unbind(0)) if isinstance(layers, Tensor) else list(layers)


# --- reference: the executable definition, and the eager chain the benchmarks compare against ------


def _instance_norm(x: Tensor, valid: Tensor | None, eps: float) -> Tensor:
    """Normalise [B, T, C] over T per (b, c); with `valid` ([B, T, 1] bool) over the valid steps only."""
    if valid is None and x.shape[1] > 1:  # F.instance_norm refuses a single step (its output is 0)
        return F.instance_norm(x.transpose(1, 2), eps=eps).transpose(1, 2)
    if valid is None:
        valid = torch.ones_like(x[..., :1], dtype=torch.bool)
    n = valid.sum(1, keepdim=True).clamp_min(1).to(x.dtype)
    mean = torch.where(valid, x, 0).sum(1, keepdim=True) / n
    centred = torch.where(valid, x - mean, 0)
    var = centred.square().sum(1, keepdim=True) / n
    return centred * torch.rsqrt(var + eps)


def _layer_norm(x: Tensor, valid: Tensor | None, eps: float) -> Tensor:
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    return y if valid is None else torch.where(valid, y, 0)


def layer_average_targets_reference(
    layers: Tensor | Sequence[Tensor],
    layer_norm: str | None = "instance",
    final_norm: str | None = None,
    padding_mask: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """The definition: fairseq's make_targets generalised, with masked statistics under padding."""
    layers = _layer_list(layers)
    acc = _acc_dtype(layers[0].dtype)
    valid = None if padding_mask is None else ~padding_mask.bool().unsqueeze(-1)
    with torch.no_grad():
        y = None
        for tl_ in layers:
            x = tl_.to(acc, copy=True)
            if valid is not None:  # padded values never reach a statistic (they may be anything)
                x = torch.where(valid, x, 0)
            if layer_norm == "instance":
                x = _instance_norm(x, valid, eps)
            elif layer_norm == "layer":
                x = _layer_norm(x, valid, eps)
            y = x if y is None else y.add_(x)
        y = y.div_(len(layers))
        if final_norm == "layer":
            y = _layer_norm(y, valid, eps)
        elif final_norm == "instance":
            y = _instance_norm(y, valid, eps)
        return y.contiguous()


def layer_average_targets_eager(layers: Tensor | Sequence[Tensor], final_layer_norm: bool = True) -> Tensor:
    """fairseq's chain for images (no padding): instance norm per layer, sequential sum / K, layer norm."""
    y = None
    for tl_ in _layer_list(layers):
        tl_ = F.instance_norm(tl_.float().transpose(1, 2)).transpose(1, 2)
        if y is None:
            y = tl_
        else:
            y.add_(tl_)
    y.div_(len(layers))
    if final_layer_norm:
        y = F.layer_norm(y, y.shape[-1:])
    return y


# --- Triton kernels --------------------------------------------------------------------------------

# Column kernel tile: 32 steps x 64 channels (16 fp32 values per thread at 4 warps).
COLUMN_BLOCK_T = 32
COLUMN_BLOCK_C = 64
_NORM_CODE = {None: 0, "none": 0, "instance": 1, "layer": 2}

if triton is not None:

    @triton.jit
    def _layer_base(x_ptr, table_ptr, k, stride_k, stride_b, stride_t, FROM_TABLE: tl.constexpr):
        """(pointer to layer k's element (0, 0, 0), its b stride, its t stride)."""
        if FROM_TABLE:  # a list of layers: rows of (address, stride_b, stride_t)
            base = tl.load(table_ptr + 3 * k).to(tl.pointer_type(x_ptr.dtype.element_ty), bitcast=True)
            sb = tl.load(table_ptr + 3 * k + 1)
            st = tl.load(table_ptr + 3 * k + 2)
        else:
            base = x_ptr + k * stride_k
            sb = stride_b
            st = stride_t
        return base, sb, st

    @triton.jit
    def _inv_std(var_eps, ACC: tl.constexpr):
        """1 / sqrt(var + eps), correctly rounded (sqrt_rn is fp32-only; fp64 sqrt is always exact)."""
        if ACC == tl.float64:
            return 1.0 / tl.sqrt(var_eps)
        else:
            return 1.0 / tl.sqrt_rn(var_eps)

    @triton.jit
    def targets_column_kernel(
        x_ptr, table_ptr, stats_ptr, pad_ptr, first_ptr,
        B, T, C, stride_k, stride_b, stride_t, stats_stride, eps,
        FROM_TABLE: tl.constexpr, HAS_PAD: tl.constexpr, APPLY: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    ):
        """Instance statistics over the valid steps of layer k, sample b, one channel block.
        APPLY=False: store (shift, mean, rstd) at stats[0|1|2][(k*B + b)*C + c]. APPLY=True (the final
        instance norm, x = the fp32 output): normalise the valid steps in place instead."""
        kb = tl.program_id(0).to(tl.int64)
        k = kb // B
        b = kb - k * B
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        base, sb, st = _layer_base(x_ptr, table_ptr, k, stride_k, stride_b, stride_t, FROM_TABLE)
        base += b * sb
        t0 = 0
        if HAS_PAD:
            t0 = tl.load(first_ptr + b).to(tl.int64)
        shift = tl.load(base + t0 * st + offs_c, mask=cmask, other=0).to(ACC)
        count = tl.zeros([BLOCK_C], dtype=ACC)
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        m2 = tl.zeros([BLOCK_C], dtype=ACC)
        for start in range(0, T, BLOCK_T):
            offs_t = start + tl.arange(0, BLOCK_T)
            valid = offs_t < T
            if HAS_PAD:
                valid = valid & (tl.load(pad_ptr + b * T + offs_t, mask=valid, other=1) == 0)
            m = valid[:, None] & cmask[None, :]
            x = tl.load(base + offs_t[:, None] * st + offs_c[None, :], mask=m, other=0).to(ACC)
            d = tl.where(m, x - shift[None, :], 0)
            # Two-pass statistics of the chunk, merged into the running ones by Chan's rule.
            n_c = tl.sum(valid.to(ACC), 0)
            mean_c = tl.sum(d, 0) / tl.maximum(n_c, 1)
            dc = tl.where(m, d - mean_c[None, :], 0)
            m2_c = tl.sum(dc * dc, 0)
            total = count + n_c
            w = n_c / tl.maximum(total, 1)
            delta = mean_c - mean
            mean += delta * w
            m2 += m2_c + delta * delta * count * w
            count = total
        rstd = _inv_std(m2 / tl.maximum(count, 1) + eps, ACC)
        if APPLY:
            for start in range(0, T, BLOCK_T):
                offs_t = start + tl.arange(0, BLOCK_T)
                valid = offs_t < T
                if HAS_PAD:
                    valid = valid & (tl.load(pad_ptr + b * T + offs_t, mask=valid, other=1) == 0)
                m = valid[:, None] & cmask[None, :]
                ptrs = base + offs_t[:, None] * st + offs_c[None, :]
                x = tl.load(ptrs, mask=m, other=0).to(ACC)
                y = ((x - shift[None, :]) - mean[None, :]) * rstd[None, :]
                tl.store(ptrs, y.to(x_ptr.dtype.element_ty), mask=m)
        else:
            out = stats_ptr + kb * C + offs_c
            tl.store(out, shift, mask=cmask)
            tl.store(out + stats_stride, mean, mask=cmask)
            tl.store(out + 2 * stats_stride, rstd, mask=cmask)

    @triton.jit
    def targets_row_kernel(
        x_ptr, table_ptr, stats_ptr, pad_ptr, out_ptr,
        K, B, T, C, stride_k, stride_b, stride_t, stats_stride, eps,
        FROM_TABLE: tl.constexpr, HAS_PAD: tl.constexpr, LAYER_NORM: tl.constexpr, FINAL_LAYER: tl.constexpr,
        BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    ):
        """Row (b, t): sum over k of the normalised layer rows, / K, optional layer norm, one store.
        LAYER_NORM: 0 none, 1 instance (statistics from the column kernel), 2 layer (row statistics)."""
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        t = row - b * T
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        out_row = out_ptr + row * C + offs_c
        is_pad = False
        if HAS_PAD:
            is_pad = tl.load(pad_ptr + row) != 0
        if is_pad:
            tl.store(out_row, tl.zeros([BLOCK_C], dtype=ACC), mask=cmask)
        else:
            acc = tl.zeros([BLOCK_C], dtype=ACC)
            for k in range(0, K):
                base, sb, st = _layer_base(x_ptr, table_ptr, k, stride_k, stride_b, stride_t, FROM_TABLE)
                src = base + b * sb + t * st
                x = tl.load(src + offs_c, mask=cmask, other=0).to(ACC)
                if LAYER_NORM == 1:
                    s = stats_ptr + (k * B + b) * C + offs_c
                    shift = tl.load(s, mask=cmask, other=0)
                    mean = tl.load(s + stats_stride, mask=cmask, other=0)
                    rstd = tl.load(s + 2 * stats_stride, mask=cmask, other=0)
                    x = ((x - shift) - mean) * rstd
                elif LAYER_NORM == 2:
                    d = tl.where(cmask, x - tl.load(src).to(ACC), 0)  # shifted by channel 0
                    mean = tl.sum(d, 0) / C
                    dc = tl.where(cmask, d - mean, 0)
                    x = dc * _inv_std(tl.sum(dc * dc, 0) / C + eps, ACC)
                acc += x
            acc = acc / K
            if FINAL_LAYER:
                d = tl.where(cmask, acc - tl.sum(tl.where(offs_c == 0, acc, 0), 0), 0)
                mean = tl.sum(d, 0) / C
                dc = tl.where(cmask, d - mean, 0)
                acc = dc * _inv_std(tl.sum(dc * dc, 0) / C + eps, ACC)
            tl.store(out_row, acc, mask=cmask)


def _row_warps(block_c: int) -> int:
    """4 warps up to 1024 channels (8 fp32 per thread per live vector: no spills), then more."""
    return max(4, min(16, block_c // 256))


def _triton_layer_average_targets(
    layers: list[Tensor], layer_norm: str, final_norm: str, padding_mask: Tensor | None, eps: float
) -> Tensor:
    stacked = len(layers) == 1 and layers[0].dim() == 4
    first = layers[0]
    K = first.shape[0] if stacked else len(layers)
    B, T, C = first.shape[-3:]
    device = first.device
    acc_dtype = _acc_dtype(first.dtype)
    acc_tl = tl.float64 if acc_dtype == torch.float64 else tl.float32
    out = torch.empty((B, T, C), dtype=acc_dtype, device=device)
    if stacked:
        x = first if first.stride(-1) == 1 else first.contiguous()
        table = x  # unused
        stride_k, stride_b, stride_t = x.stride(0), x.stride(1), x.stride(2)
        from_table = False
    else:
        kept = [t if t.stride(-1) == 1 else t.contiguous() for t in layers]
        x = kept[0]
        rows = [(t.data_ptr(), t.stride(0), t.stride(1)) for t in kept]
        table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        stride_k = stride_b = stride_t = 0
        from_table = True
        layers = kept  # keeps any contiguous copies alive until the kernels are queued
    has_pad = padding_mask is not None
    if has_pad:
        pad = padding_mask.to(torch.int8).contiguous()
        first_valid = (pad == 0).to(torch.int32).argmax(1).to(torch.int32)  # shift row of each sample
    else:
        pad = first_valid = out  # unused
    ln, fn = _NORM_CODE[layer_norm], _NORM_CODE[final_norm]
    stats = torch.empty((3, K * B * C) if ln == 1 else (3, 1), dtype=acc_dtype, device=device)
    if ln == 1:
        grid = (K * B, triton.cdiv(C, COLUMN_BLOCK_C))
        targets_column_kernel[grid](
            x, table, stats, pad, first_valid, B, T, C, stride_k, stride_b, stride_t, stats.stride(0), eps,
            FROM_TABLE=from_table, HAS_PAD=has_pad, APPLY=False,
            BLOCK_T=COLUMN_BLOCK_T, BLOCK_C=COLUMN_BLOCK_C, ACC=acc_tl,
        )
    block = max(16, triton.next_power_of_2(C))
    targets_row_kernel[(B * T,)](
        x, table, stats, pad, out, K, B, T, C, stride_k, stride_b, stride_t, stats.stride(0), eps,
        FROM_TABLE=from_table, HAS_PAD=has_pad, LAYER_NORM=ln, FINAL_LAYER=fn == 2,
        BLOCK_C=block, ACC=acc_tl, num_warps=_row_warps(block),
    )
    if fn == 1:  # the final instance norm needs statistics of the average: a third pass, in place
        grid = (B, triton.cdiv(C, COLUMN_BLOCK_C))
        targets_column_kernel[grid](
            out, out, stats, pad, first_valid, B, T, C, 0, T * C, C, 0, eps,
            FROM_TABLE=False, HAS_PAD=has_pad, APPLY=True,
            BLOCK_T=COLUMN_BLOCK_T, BLOCK_C=COLUMN_BLOCK_C, ACC=acc_tl,
        )
    return out


# --- the torch.library op --------------------------------------------------------------------------

_FUSED = {
    "cpu": lambda layers, ln, fn, pad, eps: cpu_extension().layer_average_targets(layers, ln, fn, pad, eps),
    "triton": _triton_layer_average_targets,
}


@torch.library.custom_op("d2v2::layer_average_targets", mutates_args=())
def _layer_average_targets_op(
    layers: list[Tensor], layer_norm: str, final_norm: str, padding_mask: Optional[Tensor], eps: float, backend: str
) -> Tensor:
    """layers: [stacked [K, B, T, C]] or K tensors [B, T, C]; norms "instance" | "layer" | "none"."""
    return _FUSED[backend](layers, layer_norm, final_norm, padding_mask, eps)


@_layer_average_targets_op.register_fake
def _(layers, layer_norm, final_norm, padding_mask, eps, backend):
    first = layers[0]
    return first.new_empty(tuple(first.shape[-3:]), dtype=_acc_dtype(first.dtype))


# --- public API ------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_layers(layers) -> tuple[list[Tensor], tuple[int, int, int]]:
    """(the op's layer list, (B, T, C)); raises the named error for anything else."""
    if isinstance(layers, Tensor):
        check_tensor("layers", layers, ndim=4, dtypes=FLOAT_DTYPES)
        if layers.shape[0] == 0:
            raise ValueError(f"layers: expected at least one layer, got shape {tuple(layers.shape)}")
        return [layers], tuple(layers.shape[1:])
    if not isinstance(layers, (list, tuple)):
        raise TypeError(
            f"layers: expected a [K, B, T, C] tensor or a list/tuple of [B, T, C] tensors, got {type(layers).__name__}"
        )
    if len(layers) == 0:
        raise ValueError("layers: expected at least one layer, got an empty sequence")
    first = layers[0]
    check_tensor("layers[0]", first, ndim=3, dtypes=FLOAT_DTYPES)
    for i in range(1, len(layers)):
        t = layers[i]
        check_tensor(f"layers[{i}]", t, ndim=3, dtypes=FLOAT_DTYPES)
        if t.dtype != first.dtype:
            raise TypeError(
                f"layers[{i}]: expected dtype {_dtype_name(first.dtype)} (the dtype of layers[0]), "
                f"got {_dtype_name(t.dtype)}"
            )
        if t.device != first.device:
            raise ValueError(f"layers[{i}]: expected device {first.device} (the device of layers[0]), got {t.device}")
        if t.shape != first.shape:
            raise ValueError(
                f"layers[{i}]: expected shape {tuple(first.shape)} (the shape of layers[0]), got {tuple(t.shape)}"
            )
    return list(layers), tuple(first.shape)


def _check_norm(name: str, value, allowed) -> None:
    if not (value is None or isinstance(value, str)) or value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def layer_average_targets(
    layers: Tensor | Sequence[Tensor],
    *,
    layer_norm: str | None = "instance",
    final_norm: str | None = None,
    padding_mask: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """final_norm(mean over k of layer_norm(layers[k])): the data2vec 2.0 regression targets.

    layers: a [K, B, T, C] tensor or a list/tuple of K [B, T, C] tensors of one dtype and device
    (fp32/bf16/fp16; fp64 computes and returns fp64). layer_norm: "instance" (over T per (b, c)),
    "layer" (over C per (b, t)) or None; final_norm: None, "layer" or "instance". padding_mask: [B, T]
    bool, True = padded: padded steps are excluded from every statistic and 0 in the output.
    Statistics in fp32, biased variance, no affine, eps everywhere. Returns a contiguous fp32 [B, T, C]
    tensor that does not require grad (the targets are constants).
    """
    op_layers, (B, T, C) = _check_layers(layers)
    first = op_layers[0]
    if B == 0 or T == 0 or C == 0:
        raise ValueError(f"layers: expected non-empty B, T and C, got [B, T, C] = {[B, T, C]}")
    _check_norm("layer_norm", layer_norm, NORMS)
    _check_norm("final_norm", final_norm, _FINAL_NORMS)
    if padding_mask is not None:
        check_tensor("padding_mask", padding_mask, ndim=2, dtypes=(torch.bool,))
        if tuple(padding_mask.shape) != (B, T):
            raise ValueError(f"padding_mask: expected shape {(B, T)} ([B, T]), got {tuple(padding_mask.shape)}")
        if padding_mask.device != first.device:
            raise ValueError(
                f"padding_mask: expected device {first.device} (the device of layers), got {padding_mask.device}"
            )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a positive float, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a positive finite float, got {eps}")
    backend = resolve(OP, first.device)
    with torch.no_grad():
        if backend == "reference":
            return layer_average_targets_reference(layers, layer_norm, final_norm, padding_mask, eps)
        return _layer_average_targets_op(
            op_layers, layer_norm or "none", final_norm or "none", padding_mask, eps, backend
        )


class TargetLayerBuffer:
    """Preallocated [K, B, T, C] storage for the teacher's K target layers, so targets need no stack copy.

    The teacher writes layer i's FFN output into `slot(i)` (a [B, T, C] view), e.g. `buf.slot(i).copy_(t)`
    or `torch.add(residual, ffn, out=buf.slot(i))`, and `targets(...)` runs layer_average_targets on the
    whole buffer (read through its K stride, in place). One buffer serves every step of a fixed shape.
    """

    def __init__(self, K: int, B: int, T: int, C: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        for name, v in (("K", K), ("B", B), ("T", T), ("C", C)):
            check_int(name, v, minimum=1)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of ({', '.join(map(_dtype_name, FLOAT_DTYPES))}), got {dtype}")
        self.tensor = torch.empty((K, B, T, C), dtype=dtype, device=device)

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def slot(self, i: int) -> Tensor:
        """The [B, T, C] view layer i is written into (negative i counts from the end)."""
        check_int("i", i)
        K = len(self)
        if not -K <= i < K:
            raise IndexError(f"i: expected a layer index in [{-K}, {K}), got {i}")
        return self.tensor[i]

    def targets(self, **norm_kwargs) -> Tensor:
        """layer_average_targets(self.tensor, **norm_kwargs): layer_norm, final_norm, padding_mask, eps."""
        return layer_average_targets(self.tensor, **norm_kwargs)


def aot_specs():
    """Triton kernels and signatures for the ahead-of-time compile check (ops/aot.py)."""
    common = {"stride_k": "i64", "stride_b": "i64", "stride_t": "i64", "stats_stride": "i64", "eps": "fp32"}
    for dt in ("fp32", "bf16"):
        yield targets_column_kernel, {
            "x_ptr": f"*{dt}", "table_ptr": "*i64", "stats_ptr": "*fp32", "pad_ptr": "*i8", "first_ptr": "*i32",
            "B": "i32", "T": "i32", "C": "i32", **common,
        }, {"FROM_TABLE": False, "HAS_PAD": True, "APPLY": False, "BLOCK_T": COLUMN_BLOCK_T,
            "BLOCK_C": COLUMN_BLOCK_C, "ACC": tl.float32}
        for layer_norm, from_table in ((1, False), (2, True)):
            yield targets_row_kernel, {
                "x_ptr": f"*{dt}", "table_ptr": "*i64", "stats_ptr": "*fp32", "pad_ptr": "*i8", "out_ptr": "*fp32",
                "K": "i32", "B": "i32", "T": "i32", "C": "i32", **common,
            }, {"FROM_TABLE": from_table, "HAS_PAD": True, "LAYER_NORM": layer_norm, "FINAL_LAYER": True,
                "BLOCK_C": 1024, "ACC": tl.float32}
    # The final instance norm: the column kernel applied in place to the fp32 output.
    yield targets_column_kernel, {
        "x_ptr": "*fp32", "table_ptr": "*fp32", "stats_ptr": "*fp32", "pad_ptr": "*i8", "first_ptr": "*i32",
        "B": "i32", "T": "i32", "C": "i32", **common,
    }, {"FROM_TABLE": False, "HAS_PAD": True, "APPLY": True, "BLOCK_T": COLUMN_BLOCK_T,
        "BLOCK_C": COLUMN_BLOCK_C, "ACC": tl.float32}
