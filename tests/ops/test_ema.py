"""ema_update_: every fused backend against the reference over whole parameter lists (mixed dtypes, odd
sizes, chunk boundaries, layouts), the exact ends decay 0 and 1, property tests, the eager baselines,
registration checks (opcheck, torch.compile) and bad input. GPU-only checks run when a GPU is present."""

import pytest
import torch
from conftest import TOL, fused_backends
from hypothesis import given
from hypothesis import strategies as st

import d2v2_kernels as dk
from d2v2_kernels.ops.ema import (
    TRITON_CHUNK,
    ema_update_foreach,
    ema_update_per_param_loop,
    ema_update_reference,
)

BACKENDS = fused_backends()
CPU_CHUNK = 65536  # kEmaChunkElements of csrc/include/d2v2/cpu_kernels.h


def make_lists(shapes, teacher_dtype, student_dtype):
    teacher = [torch.randn(s).to(teacher_dtype) for s in shapes]
    student = [torch.randn(s).to(student_dtype) for s in shapes]
    return teacher, student


def tol(dtype, backend):
    # The Triton interpreter rounds fp32 -> bf16/fp16 toward zero (the GPU rounds to nearest even): one
    # ulp more than the contract's bf16 tolerance allows near 0, so add an ulp-sized atol there.
    t = dict(TOL[dtype])
    if backend == "triton" and dtype in (torch.bfloat16, torch.float16):
        t["atol"] = 4e-2
    return t


def check_against_reference(backend, teacher, student, decay):
    expected = [t.clone() for t in teacher]
    ema_update_reference(expected, student, decay)
    pointers = [t.data_ptr() for t in teacher]
    with dk.use_backend(backend):
        dk.ema_update_(teacher, student, decay)
    assert [t.data_ptr() for t in teacher] == pointers  # in place
    for t, e in zip(teacher, expected):
        assert t.dtype == e.dtype and t.shape == e.shape
        torch.testing.assert_close(t, e, **tol(t.dtype, backend))


SHAPES = [(7,), (1,), (33, 17), (3, 5, 7), (TRITON_CHUNK + 5,), (CPU_CHUNK + 3,)]  # chunk-crossing sizes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "teacher_dtype,student_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.float64),
        (torch.float64, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("decay_kind", ["float", "tensor32", "tensor64"])
def test_matches_reference(backend, teacher_dtype, student_dtype, decay_kind):
    decay = {"float": 0.9998, "tensor32": torch.tensor(0.75), "tensor64": torch.tensor(0.9, dtype=torch.float64)}
    teacher, student = make_lists(SHAPES, teacher_dtype, student_dtype)
    check_against_reference(backend, teacher, student, decay[decay_kind])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vit_like_parameter_list(backend):
    """A ViT-B-like list (C cut to 96 for the interpreter): conv patch embed, CLS, pos embed, per block
    LayerNorms, QKV, projections and MLP, plus one odd 1000003-element tensor; bf16 student, fp32 teacher."""
    C = 96
    shapes = [(C, 3, 16, 16), (C,), (1, 1, C), (1, 197, C)]
    for _ in range(2):
        shapes += [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    shapes += [(1000003,)]
    teacher, student = make_lists(shapes, torch.float32, torch.bfloat16)
    check_against_reference(backend, teacher, student, 0.9998)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_list(backend):
    """Pairs of different dtypes in one call: separate launch groups (triton) / one loop (cpu)."""
    pairs = [(torch.float32, torch.bfloat16), (torch.float32, torch.float32), (torch.float64, torch.float32),
             (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)]
    teacher = [torch.randn(100 + i).to(td) for i, (td, _) in enumerate(pairs)]
    student = [torch.randn(100 + i).to(sd) for i, (_, sd) in enumerate(pairs)]
    check_against_reference(backend, teacher, student, 0.99)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_small_tensors(backend):
    """300 tensors: more than one CUDA table-full of pointers (96) and blocks (320), odd sizes 1..300."""
    shapes = [(1 + (i * 37) % 300,) for i in range(300)]
    teacher, student = make_lists(shapes, torch.float32, torch.bfloat16)
    check_against_reference(backend, teacher, student, torch.tensor(0.9))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_decay_one_keeps_teacher_and_zero_copies_student(backend, student_dtype):
    teacher, student = make_lists([(5, 7), (1000,)], torch.float32, student_dtype)
    before = [t.clone() for t in teacher]
    with dk.use_backend(backend):
        dk.ema_update_(teacher, student, 1.0)
    for t, b in zip(teacher, before):
        assert torch.equal(t, b)
    with dk.use_backend(backend):
        dk.ema_update_(teacher, student, torch.tensor(0.0))
    for t, s in zip(teacher, student):
        assert torch.equal(t, s.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_teacher_and_student(backend):
    base = torch.randn(8, 12)
    base_before = base.clone()
    strided_teacher = base[:, ::2]  # gaps: updated through a contiguous copy, copied back
    transposed_teacher = torch.randn(9, 6).t()  # dense, another order: updated where it lies
    channels_last_teacher = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    teacher = [strided_teacher, transposed_teacher, channels_last_teacher, torch.randn(6, 4)]
    student = [
        torch.randn(6, 8).t(),  # transposed student for a strided teacher
        torch.randn(6, 9),  # contiguous student for a transposed teacher
        torch.randn(2, 3, 4, 5),  # contiguous student for a channels_last teacher
        torch.randn(6, 8)[:, ::2],  # strided student for a contiguous teacher
    ]
    check_against_reference(backend, teacher, student, 0.9)
    torch.testing.assert_close(base[:, 1::2], base_before[:, 1::2], rtol=0, atol=0)  # the gaps untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists_and_empty_tensors(backend):
    with dk.use_backend(backend):
        dk.ema_update_([], [], 0.5)  # an empty model: a no-op
        dk.ema_update_((), (), torch.tensor(0.5))
    teacher, student = make_lists([(0,), (3, 0), (4,)], torch.float32, torch.bfloat16)
    check_against_reference(backend, teacher, student, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_parameters_that_require_grad(backend):
    teacher_module = torch.nn.Linear(5, 3)
    student_module = torch.nn.Linear(5, 3).to(torch.bfloat16)
    teacher = list(teacher_module.parameters())
    expected = [t.detach().clone() for t in teacher]
    ema_update_reference(expected, list(student_module.parameters()), 0.9)
    with dk.use_backend(backend):
        dk.ema_update_(teacher, list(student_module.parameters()), 0.9)  # grad mode on
    for t, e in zip(teacher, expected):
        assert t.requires_grad and t.grad_fn is None
        torch.testing.assert_close(t.detach(), e, **TOL[torch.float32])


@given(
    sizes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3), min_size=1, max_size=8),
    decay=st.floats(0, 1),
    bf16_student=st.booleans(),
    as_tensor=st.booleans(),
)
def test_property_matches_reference(sizes, decay, bf16_student, as_tensor):
    shapes = [tuple(s) for s in sizes]
    for backend in BACKENDS:
        teacher, student = make_lists(shapes, torch.float32, torch.bfloat16 if bf16_student else torch.float32)
        check_against_reference(backend, teacher, student, torch.tensor(decay) if as_tensor else decay)


@pytest.mark.parametrize("baseline", [ema_update_per_param_loop, ema_update_foreach])
@pytest.mark.parametrize("decay", [0.9998, torch.tensor(0.9)])
def test_eager_baselines_match_reference(baseline, decay):
    teacher, student = make_lists([(7, 3), (100,)], torch.float32, torch.bfloat16)
    expected = [t.clone() for t in teacher]
    ema_update_reference(expected, student, decay)
    baseline(teacher, student, decay)
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e, **TOL[torch.float32])


def test_reference_backend_through_public_api():
    teacher, student = make_lists([(4, 4)], torch.float32, torch.float16)
    check_against_reference("reference", teacher, student, 0.5)


def test_auto_backend_picks_fused_on_cpu():
    with dk.use_backend("auto"):
        expected = "-> cpu" if "cpu" in BACKENDS else "-> reference"
        assert dk.available_backends("cpu")["ema_update_"]["auto"] == expected


# --- registration: opcheck and torch.compile --------------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_opcheck(backend, student_dtype):
    teacher, student = make_lists([(3, 4), (5,)], torch.float32, student_dtype)
    torch.library.opcheck(torch.ops.d2v2.ema_update_.default, (teacher, student, torch.tensor(0.9), backend))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu extension not built")
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    teacher, student = make_lists([(6, 5), (7,)], torch.float32, torch.bfloat16)
    expected = [t.clone() for t in teacher]
    decay = torch.tensor(0.8)
    ema_update_reference(expected, student, decay)
    ema_update_reference(expected, student, decay)

    def update(teacher, student, decay):
        dk.ema_update_(teacher, student, decay)

    compiled = torch.compile(update, fullgraph=True, backend=compile_backend)
    with dk.use_backend("cpu"):
        compiled(teacher, student, decay)
        compiled(teacher, student, decay)
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e, **TOL[torch.float32])


# --- bad input -------------------------------------------------------------------------------------


def _pair(n=2, student_dtype=torch.float32):
    return [torch.randn(3, 4) for _ in range(n)], [torch.randn(3, 4).to(student_dtype) for _ in range(n)]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(2, 3), _pair()[1], 0.9), TypeError, "teacher: expected a list or tuple"),
        (lambda: (_pair()[0], torch.randn(2, 3), 0.9), TypeError, "student: expected a list or tuple"),
        (lambda: ((t for t in _pair()[0]), _pair()[1], 0.9), TypeError, r"teacher: .*list\(\.\.\.\)"),
        (lambda: (_pair(12)[0], _pair(11)[1], 0.9), ValueError,
         r"student: expected 12 tensors \(as many as teacher\), got 11"),
        (lambda: (_pair()[0], [torch.randn(3, 4), torch.randn(4, 3)], 0.9), ValueError,
         r"student\[1\]: expected shape \(3, 4\)"),
        (lambda: (_pair()[0], [torch.randn(3, 4), torch.randn(3, 4, device="meta")], 0.9), ValueError,
         r"student\[1\]: expected device cpu"),
        (lambda: ([torch.randn(3, 4), torch.randn(3, 4, device="meta")], _pair()[1], 0.9), ValueError,
         r"teacher\[1\]: expected device cpu"),
        (lambda: ([torch.zeros(3, 4, dtype=torch.int32)], [torch.randn(3, 4)], 0.9), TypeError,
         r"teacher\[0\]: expected dtype"),
        (lambda: ([torch.randn(3, 4)], [torch.zeros(3, 4, dtype=torch.long)], 0.9), TypeError,
         r"student\[0\]: expected dtype"),
        (lambda: ([torch.randn(3, 4)], [[1.0]], 0.9), TypeError, r"student\[0\]: expected a torch.Tensor"),
        (lambda: (*_pair(), float("nan")), ValueError, r"decay: expected a float in \[0, 1\], got nan"),
        (lambda: (*_pair(), 1.5), ValueError, r"decay: expected a float in \[0, 1\], got 1.5"),
        (lambda: (*_pair(), -0.1), ValueError, "decay: expected a float in"),
        (lambda: (*_pair(), True), TypeError, "decay: expected a float"),
        (lambda: (*_pair(), "0.9"), TypeError, "decay: expected a float"),
        (lambda: (*_pair(), torch.tensor([0.9])), ValueError, "decay: expected a float or a 0-dim tensor"),
        (lambda: (*_pair(), torch.tensor(1)), TypeError, "decay: expected a floating-point tensor"),
        (lambda: (*_pair(), torch.tensor(0.9, device="meta")), ValueError, "decay: expected a tensor on cpu"),
        (lambda: ([], [], 2.0), ValueError, "decay: expected a float in"),
    ],
)
def test_bad_input(backend, make, exc, match):
    teacher, student, decay = make()
    before = [t.clone() for t in teacher] if isinstance(teacher, list) else None
    with dk.use_backend(backend), pytest.raises(exc, match=match):
        dk.ema_update_(teacher, student, decay)
    if before is not None:  # rejected before any kernel ran
        for t, b in zip(teacher, before):
            if t.device.type == "cpu":
                assert torch.equal(t, b)


def test_unavailable_backend_says_why():
    teacher, student = _pair()
    with dk.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda: runs on CUDA tensors"):
        dk.ema_update_(teacher, student, 0.9)


# --- GPU: the cuda and triton kernels for real (skipped without a GPU) ---------------------------------

GPU_BACKENDS = ["cuda", "triton"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_matches_reference(backend, student_dtype):
    # > 96 tensors and > 320 blocks: several table-fulls on cuda, a tensor split across tables; odd sizes
    # and an unaligned view take the scalar paths.
    shapes = [(1 + (i * 7919) % 5000,) for i in range(200)] + [(3, 1000003), (65536 * 5 + 1,)]
    teacher = [torch.randn(s, device="cuda") for s in shapes]
    student = [torch.randn(s, device="cuda").to(student_dtype) for s in shapes]
    teacher.append(torch.randn(1001, device="cuda")[1:])  # storage offset 1: not 16-byte aligned
    student.append(torch.randn(1001, device="cuda").to(student_dtype)[1:])
    for decay in (0.9998, torch.tensor(0.99, device="cuda")):
        check_against_reference(backend, teacher, student, decay)
    check_against_reference(backend, [t.double() for t in teacher[:5]], [s.double() for s in student[:5]], 0.9)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_replays_tensor_decay(backend):
    teacher, student = make_lists([(1000,), (64, 64)], torch.float32, torch.bfloat16)
    teacher = [t.cuda() for t in teacher]
    student = [s.cuda() for s in student]
    decay = torch.tensor(0.5, device="cuda")
    with dk.use_backend(backend):
        dk.ema_update_(teacher, student, decay)  # warm-up: compiles, builds the tables
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dk.ema_update_(teacher, student, decay)
    expected = [t.clone() for t in teacher]
    decay.fill_(0.25)
    ema_update_reference(expected, student, 0.25)
    graph.replay()
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e, **TOL[torch.float32])
