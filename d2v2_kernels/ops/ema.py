"""ema_update_: the EMA teacher update over a whole parameter list, in place, in a few launches.

teacher[i] = decay * teacher[i] + (1 - decay) * student[i], computed in fp32 (fp64 when the teacher is
fp64) whatever the student's dtype: a bf16/fp16 student with an fp32 teacher is the usual mixed-precision
case, and the one `torch._foreach_lerp_` cannot take without a converted copy of the student list.

The eager loop costs a cast, a mul_ and an add_ launch per parameter (~450 launches for the ~150
parameters of a ViT-B); the fused backends cover the whole list at once:
  cpu     one OpenMP loop over ~64K-element chunks of every tensor (mixed dtypes in the same loop);
  cuda    apex-style multi-tensor apply: pointer and (tensor, chunk) tables passed by value, one launch
          per table-full (96 tensors / 320 blocks) and dtype pair;
  triton  one launch per (teacher dtype, student dtype) group, with the address and (tensor, chunk)
          tables in device memory (no argument-size limit, so no table-full splits).

`decay` may be a 0-dim tensor: the cuda and triton kernels read it from device memory (no sync), so a
captured CUDA graph replays the current value. Tensor values are not range-checked (that would sync).

Layouts: a dense teacher of any layout (contiguous, channels_last, transposed) is updated where it lies
and a student of another layout is copied into the teacher's layout first; a teacher with gaps (a
strided view) is updated through a contiguous copy that is copied back.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

from ..backends import cpu_extension, cuda_extension, register_op, resolve
from ._checks import FLOAT_DTYPES
from ._triton import triton, tl

OP = "ema_update_"
# The multi-tensor CUDA kernel is the natural GPU default: its tables need no device memory or copies.
register_op(OP, fused=("cpu", "triton", "cuda"), prefer_gpu=("cuda", "triton"))


def _acc_dtype(teacher: Tensor) -> torch.dtype:
    return torch.float64 if teacher.dtype == torch.float64 else torch.float32


# --- reference: the executable definition, and the two eager baselines of the benchmarks -----------


def ema_update_reference(teacher: Sequence[Tensor], student: Sequence[Tensor], decay: float | Tensor) -> None:
    """teacher[i] <- decay * teacher[i] + (1 - decay) * student[i], in fp32 (fp64 for fp64 teachers)."""
    with torch.no_grad():
        for t, s in zip(teacher, student):
            acc = _acc_dtype(t)
            d = decay.to(acc) if isinstance(decay, Tensor) else decay
            t.copy_((d * t.to(acc) + (1 - d) * s.to(acc)).to(t.dtype))


def ema_update_per_param_loop(teacher: Sequence[Tensor], student: Sequence[Tensor], decay: float | Tensor) -> None:
    """The per-parameter eager loop (fairseq's EMA): a cast, a mul_ and an add_ per parameter."""
    with torch.no_grad():
        for t, s in zip(teacher, student):
            if isinstance(decay, Tensor):
                t.mul_(decay).add_(s.to(t.dtype) * (1 - decay))
            else:
                t.mul_(decay).add_(s.to(t.dtype), alpha=1 - decay)


def ema_update_foreach(teacher: Sequence[Tensor], student: Sequence[Tensor], decay: float | Tensor) -> None:
    """What a careful eager user writes: the student list cast to the teacher's dtypes, then one
    `torch._foreach_lerp_` (lerp(t, s, 1 - decay) = t + (1 - decay) (s - t))."""
    with torch.no_grad():
        student = [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in zip(teacher, student)]
        weight = 1 - decay
        if isinstance(weight, Tensor):
            weight = weight.to(teacher[0].dtype)
        torch._foreach_lerp_(list(teacher), student, weight)


# --- layout: every fused backend updates flat memory ------------------------------------------------


def _is_dense(t: Tensor) -> bool:
    """Whether t's elements fill one gap-free block of memory, in whatever dimension order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return all(sa == sb for sz, sa, sb in zip(a.shape, a.stride(), b.stride()) if sz != 1)


def _flat_pair(t: Tensor, s: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(teacher to update, student in its layout, whether to copy the teacher back afterwards)."""
    if _is_dense(t):
        if _same_layout(t, s):
            return t, s, False
        return t, torch.empty_strided(t.shape, t.stride(), dtype=s.dtype, device=s.device).copy_(s), False
    return t.contiguous(), s.contiguous(), True


# --- Triton kernel ---------------------------------------------------------------------------------

# Elements per program (CHUNK) and per step of its loop (BLOCK): 16 fp32 per thread per step at 4 warps.
TRITON_BLOCK = 2048
TRITON_CHUNK = 16384

if triton is not None:

    @triton.jit
    def ema_update_kernel(
        teacher_like, student_like,  # the group's first tensors: carry the element types, not read
        teacher_addrs, student_addrs, numels, block_tensor, block_chunk, decay_ptr,
        BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
    ):
        teacher_ty = teacher_like.dtype.element_ty
        student_ty = student_like.dtype.element_ty
        acc_ty = decay_ptr.dtype.element_ty  # fp32, or fp64 for fp64 teachers
        pid = tl.program_id(0)
        i = tl.load(block_tensor + pid)
        start = tl.load(block_chunk + pid).to(tl.int64) * CHUNK
        n = tl.load(numels + i)
        t_ptr = tl.load(teacher_addrs + i).to(tl.pointer_type(teacher_ty), bitcast=True)
        s_ptr = tl.load(student_addrs + i).to(tl.pointer_type(student_ty), bitcast=True)
        if ALIGNED:  # the host checked every address of this launch: 128-bit vector loads
            t_ptr = tl.multiple_of(t_ptr, 16)
            s_ptr = tl.multiple_of(s_ptr, 16)
        t_ptr += start
        s_ptr += start
        decay = tl.load(decay_ptr)
        one_minus_decay = 1 - decay
        length = tl.minimum(n - start, CHUNK)
        if length == CHUNK:  # a full chunk: no masks, so the loads vectorise
            for b in tl.range(0, CHUNK, BLOCK):
                offs = b + tl.arange(0, BLOCK)
                t = tl.load(t_ptr + offs).to(acc_ty)
                s = tl.load(s_ptr + offs).to(acc_ty)
                tl.store(t_ptr + offs, (decay * t + one_minus_decay * s).to(teacher_ty))
        else:  # the tail of a tensor
            for tail in tl.range(0, length, BLOCK):
                offs = tail + tl.arange(0, BLOCK)
                mask = offs < length
                t = tl.load(t_ptr + offs, mask=mask).to(acc_ty)
                s = tl.load(s_ptr + offs, mask=mask).to(acc_ty)
                tl.store(t_ptr + offs, (decay * t + one_minus_decay * s).to(teacher_ty), mask=mask)


# Device tables keyed by (device, addresses, sizes): a training loop updates the same parameters every
# step, so after the first step a launch costs no host-to-device copy. Tables used while a CUDA graph is
# being captured are pinned for good: the graph reads them at every replay.
_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 16
_TABLES_IN_GRAPHS: dict = {}


def _triton_tables(teacher: list[Tensor], student: list[Tensor], device: torch.device):
    """(int64 [3, n]: teacher addresses, student addresses, numels; int32 [2, blocks]: tensor, chunk)."""
    key = (device, tuple(x for t, s in zip(teacher, student) for x in (t.data_ptr(), s.data_ptr(), t.numel())))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    tables = _TABLE_CACHE.get(key)
    if tables is not None:
        _TABLE_CACHE.move_to_end(key)
        if capturing:
            _TABLES_IN_GRAPHS[key] = tables
        return tables
    if capturing:
        raise RuntimeError(
            "ema_update_(triton): run one update with these tensors before capturing a CUDA graph "
            "(its tables are copied to the device outside the capture)"
        )
    addrs = torch.tensor(key[1], dtype=torch.int64).view(-1, 3).t().contiguous()
    chunks = (addrs[2] + TRITON_CHUNK - 1) // TRITON_CHUNK
    block_tensor = torch.repeat_interleave(torch.arange(len(teacher)), chunks)
    first_block = torch.cumsum(chunks, 0) - chunks
    block_chunk = torch.arange(block_tensor.numel()) - first_block[block_tensor]
    blocks = torch.stack([block_tensor, block_chunk]).to(torch.int32)
    tables = (addrs.to(device), blocks.to(device))
    _TABLE_CACHE[key] = tables
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return tables


def _device_decay(decay: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """decay as a 1-element tensor on the device: a fill kernel for a CPU scalar, no host-to-device copy."""
    if decay.device == device:
        return decay.reshape(1).to(dtype)
    return torch.full((1,), decay.item(), dtype=dtype, device=device)


def _triton_ema_update(teacher: list[Tensor], student: list[Tensor], decay: Tensor) -> None:
    device = teacher[0].device
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    copy_back = []
    for t, s in zip(teacher, student):
        if t.numel() == 0:
            continue
        tw, sw, back = _flat_pair(t, s)
        if back:
            copy_back.append((t, tw))
        aligned = tw.data_ptr() % 16 == 0 and sw.data_ptr() % 16 == 0
        group = groups.setdefault((tw.dtype, sw.dtype, aligned), ([], []))
        group[0].append(tw)
        group[1].append(sw)
    decays = {}
    for (teacher_dtype, _, aligned), (ts, ss) in groups.items():
        acc = torch.float64 if teacher_dtype == torch.float64 else torch.float32
        if acc not in decays:
            decays[acc] = _device_decay(decay, acc, device)
        addrs, blocks = _triton_tables(ts, ss, device)
        ema_update_kernel[(blocks.shape[1],)](
            ts[0], ss[0], addrs[0], addrs[1], addrs[2], blocks[0], blocks[1], decays[acc],
            BLOCK=TRITON_BLOCK, CHUNK=TRITON_CHUNK, ALIGNED=aligned,
        )
    for t, tw in copy_back:
        t.copy_(tw)


# --- the torch.library op --------------------------------------------------------------------------

_FUSED = {
    "cpu": lambda teacher, student, decay: cpu_extension().ema_update_(teacher, student, decay),
    "cuda": lambda teacher, student, decay: cuda_extension().ema_update_(teacher, student, decay),
    "triton": _triton_ema_update,
}


@torch.library.custom_op("d2v2::ema_update_", mutates_args=("teacher",))
def _ema_update_op(teacher: list[Tensor], student: list[Tensor], decay: Tensor, backend: str) -> None:
    _FUSED[backend](teacher, student, decay)


@_ema_update_op.register_fake
def _(teacher, student, decay, backend):
    return None


# --- public API ------------------------------------------------------------------------------------


def _check_list(name: str, seq) -> Sequence[Tensor]:
    if isinstance(seq, Tensor) or not isinstance(seq, (list, tuple)):
        raise TypeError(
            f"{name}: expected a list or tuple of tensors, got {type(seq).__name__}"
            + (" (wrap a generator such as model.parameters() in list(...))" if not isinstance(seq, Tensor) else "")
        )
    return seq


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _raise_for_pair(i: int, t, s, device: torch.device) -> None:
    """The named error for pair i, which failed the fast check in ema_update_."""
    for name, x in ((f"teacher[{i}]", t), (f"student[{i}]", s)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}: expected dtype in ({', '.join(map(_dtype_name, FLOAT_DTYPES))}), got {_dtype_name(x.dtype)}"
            )
        if x.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of teacher[0]), got {x.device}")
    if s.shape != t.shape:
        raise ValueError(
            f"student[{i}]: expected shape {tuple(t.shape)} (the shape of teacher[{i}]), got {tuple(s.shape)}"
        )


def _check_decay(decay, device: torch.device | None) -> Tensor:
    """decay as a 0-dim tensor for the op: a float becomes a CPU fp64 scalar (no device traffic)."""
    if isinstance(decay, Tensor):
        if decay.dim() != 0:
            raise ValueError(f"decay: expected a float or a 0-dim tensor, got a tensor of shape {tuple(decay.shape)}")
        if not decay.is_floating_point():
            raise TypeError(f"decay: expected a floating-point tensor, got dtype {_dtype_name(decay.dtype)}")
        if device is not None and decay.device != device and decay.device.type != "cpu":
            raise ValueError(
                f"decay: expected a tensor on {device} (the device of teacher) or the CPU, got {decay.device}"
            )
        return decay
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay: expected a float in [0, 1] or a 0-dim tensor, got {type(decay).__name__}")
    value = float(decay)
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise ValueError(f"decay: expected a float in [0, 1], got {value}")
    return torch.tensor(value, dtype=torch.float64)


def ema_update_(teacher: Sequence[Tensor], student: Sequence[Tensor], decay: float | Tensor) -> None:
    """In place: teacher[i] = decay * teacher[i] + (1 - decay) * student[i] for every i, no autograd.

    teacher, student: lists (or tuples) of equally many tensors, pairwise of equal shape, all on one
    device; any float dtypes (teacher usually fp32, student fp32/bf16/fp16). The math runs in fp32, fp64
    when the teacher is fp64. decay: a float in [0, 1], or a 0-dim float tensor on the teacher's device
    (read by the GPU kernels without a sync; CUDA-graph replayable) or on the CPU. Under torch.compile
    prefer a tensor decay: a changing Python float is a new constant, and so a recompile, every step.
    Teacher parameters that require grad are fine (updated under no_grad). Empty lists are a no-op.
    """
    teacher = _check_list("teacher", teacher)
    student = _check_list("student", student)
    if len(student) != len(teacher):
        raise ValueError(f"student: expected {len(teacher)} tensors (as many as teacher), got {len(student)}")
    if len(teacher) == 0:
        _check_decay(decay, None)
        return
    first = teacher[0]
    if not isinstance(first, Tensor):
        raise TypeError(f"teacher[0]: expected a torch.Tensor, got {type(first).__name__}")
    device = first.device
    float_dtypes = FLOAT_DTYPES
    for i, (t, s) in enumerate(zip(teacher, student)):  # one cheap test per pair; messages only on failure
        if not (
            isinstance(t, Tensor) and isinstance(s, Tensor) and t.dtype in float_dtypes and s.dtype in float_dtypes
            and t.device == device and s.device == device and t.shape == s.shape
        ):
            _raise_for_pair(i, t, s, device)
    decay_tensor = _check_decay(decay, device)
    backend = resolve(OP, device)
    with torch.no_grad():
        if backend == "reference":
            ema_update_reference(teacher, student, decay)
        else:
            _ema_update_op(list(teacher), list(student), decay_tensor, backend)


def aot_specs():
    """Triton kernels and signatures for the ahead-of-time compile check (ops/aot.py)."""
    for student in ("fp32", "bf16"):
        yield ema_update_kernel, {
            "teacher_like": "*fp32", "student_like": f"*{student}",
            "teacher_addrs": "*i64", "student_addrs": "*i64", "numels": "*i64",
            "block_tensor": "*i32", "block_chunk": "*i32", "decay_ptr": "*fp32",
        }, {"BLOCK": TRITON_BLOCK, "CHUNK": TRITON_CHUNK, "ALIGNED": True}
