"""decoder_input: the data2vec 2.0 decoder input, `gather(cat([x_vis, noise], 1), ids_restore)`, fused.

out[n, t] = x_vis[n, r] if r = ids_restore[n, t] < K, else noise[n, r - K]. The eager chain allocates
the noise, writes the concatenation and reads it back through the gather; the fused kernels write each
output row once, reading its visible row or drawing its noise in registers.

In-kernel noise is counter-based: element (n, j, c) of the [N, T - K, C] noise is
philox_normal(seed, i) * noise_std with i = (n * (T - K) + j) * C + c its flat offset. One Philox4x32-10
call gives four normals: number i is lane i % 4 of group g = i // 4, whose words (w0, w1, w2, w3) =
Philox(counter = (g_lo, g_hi, 0, 0), key = the 64-bit seed) feed Box-Muller twice in fp32: lanes 0 and 1
are sqrt(-2 ln u) * cos(pi v) and sqrt(-2 ln u) * sin(pi v) of the uniform pair (u, v) from (w0, w1),
lanes 2 and 3 the same from (w2, w3) (csrc/include/d2v2/philox.h). A group may straddle two noise rows
(when C % 4 != 0): each row uses the lanes inside it, so the noise does not depend on how the kernels
split the work. The CPU kernel draws each group once (four outputs per Philox call), the CUDA kernel one
group per thread, the Triton kernel one group per element (keeping its own lane). The kernels use
branch-free log/cos/sin polynomials (within 2 ulp, mirrored in `_log_unit` / `_sincospi_unit`), the
PyTorch reference (`philox_normal_reference`, `philox_normal4_reference`) torch.log/cos/sin: every
backend draws the same noise from one seed up to the rounding of log/cos/sin/sqrt. The seed is drawn
from `generator` (default: torch's CPU generator) once per call, so `torch.manual_seed` reproduces it.

Backward: ids_restore rows are permutations, so each visible row r < K receives exactly one grad row:
grad_x_vis[n, ids_restore[n, t]] = grad_out[n, t]. Every kernel writes each output row once (no
accumulation, no atomics), which is why the op checks the permutation property up front.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..backends import cpu_extension, cuda_extension, register_op, resolve
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_same_device, check_tensor
from ._triton import triton, tl, row_block

OP = "decoder_input"
register_op(OP, fused=("cpu", "triton", "cuda"), prefer_gpu=("triton", "cuda"))


# --- the noise function, in PyTorch: bit-exact Philox, then the same fp32 Box-Muller as philox.h -----

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key bumps


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of a * b for a < 2^32 and int64 b in [0, 2^32), without int64 overflow:
    b is split in 16-bit halves so every partial product stays below 2^48."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10_reference(c0: Tensor, c1, c2, c3, k0, k1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 on int64 tensors (or ints) holding 32-bit words; the Random123 algorithm."""
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _box_muller_reference(w_u: Tensor, w_v: Tensor) -> tuple[Tensor, Tensor]:
    """philox.h's box_muller2 on int64 tensors of Philox words: the (cos, sin) branches, fp32."""
    # Exact in fp32: (2k + 1) * 2^-24 in (0, 1) and (2k + 1) * 2^-23 - 1 in (-1, 1), k the top 23 bits.
    u = ((w_u >> 9).to(torch.float32) + 0.5) * 2.0**-23
    v = ((w_v >> 9).to(torch.float32) + 0.5) * 2.0**-22 - 1.0
    r = torch.sqrt(-2.0 * torch.log(u))
    angle = math.pi * v
    return r * torch.cos(angle), r * torch.sin(angle)


def _seed_words(seed: Tensor | int, device) -> tuple:
    if isinstance(seed, Tensor):
        seed = seed.to(device=device, dtype=torch.int64)
    return seed & _MASK32, (seed >> 32) & _MASK32


def philox_normal4_reference(seed: Tensor | int, groups: Tensor) -> Tensor:
    """philox.h's philox_normal4(seed, group) for every int64 group: fp32 [..., 4], the normals
    4 * group + 0..3 of the stream (lanes cos and sin of words (0, 1), then of words (2, 3))."""
    groups = groups.to(torch.int64)
    zero = torch.zeros_like(groups)
    w0, w1, w2, w3 = philox4x32_10_reference(
        groups & _MASK32, (groups >> 32) & _MASK32, zero, zero, *_seed_words(seed, groups.device)
    )
    z0, z1 = _box_muller_reference(w0, w1)
    z2, z3 = _box_muller_reference(w2, w3)
    return torch.stack([z0, z1, z2, z3], dim=-1)


def philox_normal_reference(seed: Tensor | int, offsets: Tensor) -> Tensor:
    """philox.h's philox_normal(seed, offset) for every int64 offset >= 0: fp32 N(0, 1) values, number
    `offset` of the stream = lane offset % 4 of group offset // 4 (one Philox call per element here).

    seed: an int or a 0-dim int64 tensor (kept a tensor, so torch.compile traces it without .item()).
    """
    offsets = offsets.to(torch.int64)
    z = philox_normal4_reference(seed, offsets >> 2)
    return torch.gather(z, -1, (offsets & 3).unsqueeze(-1)).squeeze(-1)


def reference_noise(seed, N: int, masked: int, C: int, noise_std: float, dtype, device) -> Tensor:
    """The [N, T - K, C] noise the fused kernels draw in place, materialised (reference path, tests).
    Numbers 0 .. N * (T - K) * C - 1 of the stream: one Philox group per four of them."""
    count = N * masked * C
    groups = torch.arange((count + 3) // 4, device=device, dtype=torch.int64)
    z = philox_normal4_reference(seed, groups).flatten()[:count]
    return (z * noise_std).to(dtype).view(N, masked, C)


# --- reference: the executable definition (and the eager chain the benchmarks compare against) ------


def decoder_input_reference(x_vis: Tensor, ids_restore: Tensor, noise: Tensor) -> Tensor:
    index = ids_restore.long().unsqueeze(-1).expand(-1, -1, x_vis.shape[-1])
    return torch.gather(torch.cat([x_vis, noise], 1), 1, index)


# --- Triton kernels --------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _log_unit(u):
        """philox.h's log_unit: Cephes' logf, branch-free, for u in (0, 1)."""
        bits = u.to(tl.uint32, bitcast=True)
        e = (bits >> 23).to(tl.int32) - 126  # u = m * 2^e, m in [0.5, 1)
        m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
        low = m < 0.707106781186547524
        e = tl.where(low, e - 1, e)
        x = tl.where(low, (m + m) - 1.0, m - 1.0)  # exact
        z = x * x
        p = 7.0376836292e-2 * x - 1.1514610310e-1
        p = p * x + 1.1676998740e-1
        p = p * x - 1.2420140846e-1
        p = p * x + 1.4249322787e-1
        p = p * x - 1.6668057665e-1
        p = p * x + 2.0000714765e-1
        p = p * x - 2.4999993993e-1
        p = p * x + 3.3333331174e-1
        fe = e.to(tl.float32)
        y = x * z * p
        y += -2.12194440e-4 * fe
        y += -0.5 * z
        return (x + y) + 0.693359375 * fe

    @triton.jit
    def _sincospi_unit(v):
        """philox.h's sincospi_unit: (sin(pi v), cos(pi v)) for v in [-1, 1], folded onto [0, 1/4] exactly."""
        a = tl.abs(v)
        flip = a > 0.5
        a = tl.where(flip, 1.0 - a, a)
        swap = a > 0.25
        a = tl.where(swap, 0.5 - a, a)
        x = a * 3.141592653589793
        z = x * x
        pc = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
        ps = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * x + x
        c = tl.where(swap, ps, pc)
        s = tl.where(swap, pc, ps)
        return tl.where(v < 0.0, -s, s), tl.where(flip, -c, c)

    @triton.jit
    def _philox_normal(seed, offset):
        """philox.h's philox_normal on a block of int64 offsets >= 0: each element computes the Philox
        group offset // 4 (redundant 4x across a group's lanes; cheap against memory on a GPU) and keeps
        its lane offset % 4 (same words, same fp32 formula)."""
        w0, w1, w2, w3 = tl.randint4x(seed, offset >> 2)  # counter (g_lo, g_hi, 0, 0), key (seed_lo, seed_hi)
        lane = offset & 3
        wu = tl.where(lane < 2, w0, w2)  # lanes 0, 1: the pair (w0, w1); lanes 2, 3: (w2, w3)
        wv = tl.where(lane < 2, w1, w3)
        u = ((wu >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (2k + 1) * 2^-24
        v = ((wv >> 9).to(tl.float32) + 0.5) * 2.384185791015625e-07 - 1.0  # (2k + 1) * 2^-23 - 1
        s, c = _sincospi_unit(v)
        return tl.sqrt_rn(-2.0 * _log_unit(u)) * tl.where((lane & 1) == 0, c, s)

    @triton.jit
    def decoder_input_fwd_kernel(
        x_ptr, ids_ptr, noise_ptr, out_ptr, T, K, C,
        stride_xn, stride_xk, stride_zn, stride_zr, stride_in, stride_it,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # flat output row n*T + t
        n = row // T
        t = row - n * T
        r = tl.load(ids_ptr + n * stride_in + t * stride_it).to(tl.int64)
        if r < K:
            src = x_ptr + n * stride_xn + r * stride_xk
        else:
            src = noise_ptr + n * stride_zn + (r - K) * stride_zr
        offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = offs < C
        tl.store(out_ptr + row * C + offs, tl.load(src + offs, mask=mask), mask=mask)

    @triton.jit
    def decoder_input_fwd_randn_kernel(
        x_ptr, ids_ptr, out_ptr, seed, noise_std, T, K, C,
        stride_xn, stride_xk, stride_in, stride_it,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # flat output row n*T + t
        n = row // T
        t = row - n * T
        r = tl.load(ids_ptr + n * stride_in + t * stride_it).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = offs < C
        if r < K:
            vals = tl.load(x_ptr + n * stride_xn + r * stride_xk + offs, mask=mask)
        else:
            flat = (n * (T - K) + (r - K)) * C + offs  # the element's offset in the [N, T-K, C] noise
            vals = (_philox_normal(seed, flat) * noise_std).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * C + offs, vals, mask=mask)

    @triton.jit
    def decoder_input_bwd_kernel(
        grad_ptr, ids_ptr, out_ptr, T, K, C, stride_in, stride_it,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # flat grad row n*T + t
        n = row // T
        t = row - n * T
        r = tl.load(ids_ptr + n * stride_in + t * stride_it).to(tl.int64)
        if r < K:  # the one grad row of visible row r (a noise position sends nothing back)
            offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = offs < C
            vals = tl.load(grad_ptr + row * C + offs, mask=mask)
            tl.store(out_ptr + (n * K + r) * C + offs, vals, mask=mask)


def _triton_forward(x_vis: Tensor, ids: Tensor, noise: Tensor | None, seed: int, noise_std: float) -> Tensor:
    N, K, C = x_vis.shape
    T = ids.shape[1]
    out = x_vis.new_empty((N, T, C))
    if out.numel() == 0:
        return out
    if x_vis.stride(2) != 1:
        x_vis = x_vis.contiguous()
    block = row_block(C)
    grid = (N * T, triton.cdiv(C, block))
    if noise is not None:
        if noise.stride(2) != 1:
            noise = noise.contiguous()
        decoder_input_fwd_kernel[grid](
            x_vis, ids, noise, out, T, K, C, x_vis.stride(0), x_vis.stride(1), noise.stride(0), noise.stride(1),
            ids.stride(0), ids.stride(1), BLOCK_C=block,
        )
    else:
        decoder_input_fwd_randn_kernel[grid](
            x_vis, ids, out, seed, noise_std, T, K, C, x_vis.stride(0), x_vis.stride(1),
            ids.stride(0), ids.stride(1), BLOCK_C=block,
        )
    return out


def _triton_backward(grad: Tensor, ids: Tensor, K: int) -> Tensor:
    N, T, C = grad.shape
    grad_x = grad.new_empty((N, K, C))
    if grad_x.numel() == 0:
        return grad_x
    grad = grad.contiguous()
    block = row_block(C)
    decoder_input_bwd_kernel[(N * T, triton.cdiv(C, block))](
        grad, ids, grad_x, T, K, C, ids.stride(0), ids.stride(1), BLOCK_C=block
    )
    return grad_x


# --- the torch.library op: one name, every fused backend behind it -------------------------------


def _reference_forward(x_vis, ids, noise, seed, noise_std):
    if noise is None:
        N, K, C = x_vis.shape
        noise = reference_noise(seed, N, ids.shape[1] - K, C, noise_std, x_vis.dtype, x_vis.device)
    return decoder_input_reference(x_vis, ids, noise)


def _reference_backward(grad: Tensor, ids: Tensor, K: int) -> Tensor:
    source_step = ids.long().argsort(1)[:, :K]  # the inverse permutation: t with ids[n, t] = r
    return torch.gather(grad, 1, source_step.unsqueeze(-1).expand(-1, -1, grad.shape[2]))


_FORWARD = {
    "reference": _reference_forward,
    "cpu": lambda x, ids, noise, seed, std: cpu_extension().decoder_input_forward(x, ids, noise, seed, std),
    "cuda": lambda x, ids, noise, seed, std: cuda_extension().decoder_input_forward(x, ids, noise, seed, std),
    "triton": _triton_forward,
}

_BACKWARD = {
    "reference": _reference_backward,
    "cpu": lambda g, ids, K: cpu_extension().decoder_input_backward(g, ids, K),
    "cuda": lambda g, ids, K: cuda_extension().decoder_input_backward(g, ids, K),
    "triton": _triton_backward,
}


def check_permutation(name: str, ids: Tensor) -> None:
    """Each row of `ids` must be a permutation of 0..T-1. One sort and one device sync."""
    T = ids.shape[1]
    is_perm = ids.sort(dim=1).values == torch.arange(T, device=ids.device, dtype=ids.dtype)
    if not bool(is_perm.all()):
        check_index_range(name, ids, T)  # the more specific message when a value is out of range
        row = int((~is_perm.all(1)).nonzero()[0, 0])
        raise ValueError(f"{name}: expected each row to be a permutation of 0..T-1 (T={T}); row {row} is not")


@torch.library.custom_op("d2v2::decoder_input", mutates_args=())
def _decoder_input_op(
    x_vis: Tensor, ids_restore: Tensor, noise: Tensor | None, seed: Tensor | None, noise_std: float, backend: str
) -> Tensor:
    check_permutation("ids_restore", ids_restore)
    if noise is None and seed is None:
        raise ValueError("seed: required when noise is None (the in-kernel noise is drawn from it)")
    seed_value = int(seed) if noise is None else 0  # eager here, also under torch.compile
    return _FORWARD[backend](x_vis, ids_restore, noise, seed_value, noise_std)


@_decoder_input_op.register_fake
def _(x_vis, ids_restore, noise, seed, noise_std, backend):
    return x_vis.new_empty((x_vis.shape[0], ids_restore.shape[1], x_vis.shape[2]))


@torch.library.custom_op("d2v2::decoder_input_backward", mutates_args=())
def _decoder_input_backward_op(grad: Tensor, ids_restore: Tensor, K: int, backend: str) -> Tensor:
    return _BACKWARD[backend](grad, ids_restore, K)


@_decoder_input_backward_op.register_fake
def _(grad, ids_restore, K, backend):
    return grad.new_empty((grad.shape[0], K, grad.shape[2]))


def _setup_context(ctx, inputs, output):
    x_vis, ids_restore, noise, seed, noise_std, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K, ctx.backend = x_vis.shape[1], backend


def _backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    grad_x_vis = _decoder_input_backward_op(grad, ids_restore, ctx.K, ctx.backend)
    return grad_x_vis, None, None, None, None, None


_decoder_input_op.register_autograd(_backward, setup_context=_setup_context)


# --- public API ------------------------------------------------------------------------------------


def draw_seed(generator: torch.Generator | None = None) -> Tensor:
    """The per-call noise seed: a 0-dim int64 tensor from `generator` (default: the CPU generator).
    A tensor, not an int, so torch.compile keeps the draw in the graph instead of baking in a constant."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64, device=device)


def decoder_input(
    x_vis: Tensor,
    ids_restore: Tensor,
    noise_std: float = 0.01,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`gather(cat([x_vis, noise], 1), ids_restore)` over channels, without the concatenation.

    x_vis: [N, K, C] float; ids_restore: [N, T] int32/int64, each row a permutation of 0..T-1 (K <= T).
    noise: optional [N, T - K, C] tensor (x_vis's dtype and device), used as is; when absent,
    N(0, noise_std^2) noise is drawn inside the kernel from a seed taken from `generator` (default:
    torch's CPU generator, so `torch.manual_seed` reproduces it). Returns [N, T, C]; differentiable in
    x_vis (noise positions send no gradient back).
    """
    check_tensor("x_vis", x_vis, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES)
    check_same_device(x_vis=x_vis, ids_restore=ids_restore)
    N, K, C = x_vis.shape
    if N == 0 or C == 0:
        raise ValueError(f"x_vis: expected a non-empty [N, K, C] tensor (N, C > 0), got shape {tuple(x_vis.shape)}")
    if ids_restore.shape[0] != N:
        raise ValueError(f"ids_restore: expected {N} rows (N of x_vis), got shape {tuple(ids_restore.shape)}")
    T = ids_restore.shape[1]
    if T == 0:
        raise ValueError(f"ids_restore: expected T >= 1 columns, got shape {tuple(ids_restore.shape)}")
    if K > T:
        raise ValueError(f"x_vis: expected K <= T = {T} (columns of ids_restore) visible tokens, got K = {K}")
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)):
        raise TypeError(f"noise_std: expected a float, got {type(noise_std).__name__}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std: expected a finite float >= 0, got {noise_std}")
    noise_std = float(noise_std)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if noise is not None:
        check_tensor("noise", noise, ndim=3)
        if noise.dtype != x_vis.dtype:
            raise TypeError(
                f"noise: expected dtype {str(x_vis.dtype).replace('torch.', '')} (the dtype of x_vis), "
                f"got {str(noise.dtype).replace('torch.', '')}"
            )
        check_same_device(x_vis=x_vis, noise=noise)
        if tuple(noise.shape) != (N, T - K, C):
            raise ValueError(f"noise: expected shape (N, T - K, C) = {(N, T - K, C)}, got {tuple(noise.shape)}")
        seed = None
    else:
        seed = draw_seed(generator)
    backend = resolve(OP, x_vis.device)
    if backend == "reference":
        if not torch.compiler.is_compiling():
            check_permutation("ids_restore", ids_restore)
        if noise is None:
            noise = reference_noise(seed, N, T - K, C, noise_std, x_vis.dtype, x_vis.device)
        return decoder_input_reference(x_vis, ids_restore, noise)
    return _decoder_input_op(x_vis, ids_restore, noise, seed, noise_std, backend)


def aot_specs():
    """Triton kernels and signatures for the ahead-of-time compile check (ops/aot.py)."""
    for dt in ("fp32", "bf16"):
        yield decoder_input_fwd_kernel, {
            "x_ptr": f"*{dt}", "ids_ptr": "*i64", "noise_ptr": f"*{dt}", "out_ptr": f"*{dt}",
            "T": "i32", "K": "i32", "C": "i32", "stride_xn": "i64", "stride_xk": "i64",
            "stride_zn": "i64", "stride_zr": "i64", "stride_in": "i64", "stride_it": "i32",
        }, {"BLOCK_C": 1024}
        yield decoder_input_fwd_randn_kernel, {
            "x_ptr": f"*{dt}", "ids_ptr": "*i64", "out_ptr": f"*{dt}", "seed": "i64", "noise_std": "fp32",
            "T": "i32", "K": "i32", "C": "i32", "stride_xn": "i64", "stride_xk": "i64",
            "stride_in": "i64", "stride_it": "i32",
        }, {"BLOCK_C": 1024}
        yield decoder_input_bwd_kernel, {
            "grad_ptr": f"*{dt}", "ids_ptr": "*i64", "out_ptr": f"*{dt}", "T": "i32", "K": "i32", "C": "i32",
            "stride_in": "i64", "stride_it": "i32",
        }, {"BLOCK_C": 1024}
