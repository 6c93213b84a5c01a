"""gather_visible: every fused backend against the reference, forward and backward, plus the contract's
odd shapes, property tests, gradcheck, registration checks and bad input."""

import pytest
import torch
from conftest import TOL, fused_backends
from hypothesis import given
from hypothesis import strategies as st

import d2v2_kernels as dk
from d2v2_kernels.ops.gather import gather_visible_reference

BACKENDS = fused_backends()


def make_ids(B, clones, T, K, *, unique=True, dtype=torch.int64):
    if unique:  # the masking convention: a prefix of a random permutation per row
        return torch.rand(B * clones, T).argsort(1)[:, :K].to(dtype)
    return torch.randint(0, T, (B * clones, K), dtype=dtype)


def check_against_reference(backend, x, ids, clones, dtype):
    x = x.to(dtype).detach().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = gather_visible_reference(x_ref, ids, clones)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    with dk.use_backend(backend):
        out = dk.gather_visible(x, ids, clones)
    out.backward(grad)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])  # a copy: exact in practice
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,T,C,clones,K",
    [
        (2, 196, 96, 4, 39),  # image grid, 39 visible of 196 (C cut down for the interpreter)
        (2, 50, 64, 3, 25),  # audio/text-like: half masked
        (3, 7, 37, 1, 4),  # clones = 1, C not a multiple of any block
        (2, 9, 16, 2, 0),  # K = 0: empty output, zero gradient
        (2, 9, 16, 2, 9),  # K = T: every token visible
        (4, 1, 8, 3, 1),  # T = 1
    ],
)
def test_matches_reference(backend, dtype, B, T, C, clones, K):
    if backend == "triton" and dtype == torch.float16:
        pytest.skip("fp16 is covered by the cpu backend; keep interpreter time down")
    check_against_reference(backend, torch.randn(B, T, C), make_ids(B, clones, T, K), clones, dtype)


@pytest.mark.parametrize("backend", ["cpu"])
def test_data2vec2_image_shape(backend):
    """ViT-B images at the paper's shapes: B=16, T=196, C=768, M=16 clones, 39 visible."""
    if backend not in BACKENDS:
        pytest.skip(f"{backend} unavailable")
    check_against_reference(backend, torch.randn(16, 196, 768), make_ids(16, 16, 196, 39), 16, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_ids_accumulate(backend):
    ids = torch.tensor([[1, 1, 1], [0, 1, 1], [2, 2, 0], [2, 2, 2]])
    check_against_reference(backend, torch.randn(2, 3, 5), ids, 2, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_and_int32_ids(backend):
    B, T, C, clones, K = 2, 12, 24, 3, 5
    x = torch.randn(B, C, T).transpose(1, 2)  # [B, T, C] view, channel stride != 1
    ids = make_ids(B, clones, T, 2 * K, dtype=torch.int32)[:, ::2]  # strided index view
    assert not x.is_contiguous() and not ids.is_contiguous()
    check_against_reference(backend, x, ids, clones, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    ids = make_ids(2, 3, 6, 4, unique=False)
    with dk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: dk.gather_visible(x, ids, 3), (x,))


@given(
    B=st.integers(1, 3),
    T=st.integers(1, 20),
    C=st.integers(1, 70),
    clones=st.integers(1, 4),
    k_frac=st.floats(0, 1),
    unique=st.booleans(),
)
def test_property_cpu_matches_reference(B, T, C, clones, k_frac, unique):
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    K = round(k_frac * T) if unique else round(k_frac * 2 * T)
    check_against_reference("cpu", torch.randn(B, T, C), make_ids(B, clones, T, K, unique=unique), clones,
                            torch.float32)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
def test_opcheck(backend):
    x = torch.randn(2, 6, 5, requires_grad=True)
    ids = make_ids(2, 3, 6, 4)
    torch.library.opcheck(torch.ops.d2v2.gather_visible.default, (x, ids, 3, backend))
    g = torch.randn(6, 4, 5)
    torch.library.opcheck(torch.ops.d2v2.gather_visible_backward.default, (g, ids, 3, 6, backend))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 10, 8, requires_grad=True)
    ids = make_ids(2, 4, 10, 3)

    def loss(x):
        return (dk.gather_visible(x, ids, 4) * 2).square().sum()

    expected_loss = (gather_visible_reference(x, ids, 4) * 2).square().sum()
    (expected_grad,) = torch.autograd.grad(expected_loss, x)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    torch.testing.assert_close(out, expected_loss)
    torch.testing.assert_close(x.grad, expected_grad)


def test_auto_backend_picks_fused_on_cpu():
    with dk.use_backend("auto"):
        assert dk.available_backends("cpu")["gather_visible"]["auto"] == ("-> cpu" if "cpu" in BACKENDS else "-> reference")


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(2, 5), torch.zeros(2, 3, dtype=torch.long), 1), ValueError, "x: expected a 3-D"),
        (lambda: (torch.randn(2, 5, 4), torch.zeros(2, dtype=torch.long), 1), ValueError, "ids_keep: expected a 2-D"),
        (lambda: (torch.randn(2, 5, 4).int(), torch.zeros(2, 3, dtype=torch.long), 1), TypeError, "x: expected dtype"),
        (lambda: (torch.randn(2, 5, 4), torch.zeros(2, 3), 1), TypeError, "ids_keep: expected dtype"),
        (lambda: (torch.randn(2, 5, 4), torch.zeros(3, 3, dtype=torch.long), 1), ValueError, r"ids_keep: expected 2 rows"),
        (lambda: (torch.randn(2, 5, 4), torch.zeros(4, 3, dtype=torch.long), 3), ValueError, r"ids_keep: expected 6 rows"),
        (lambda: (torch.randn(2, 5, 4), torch.full((2, 3), 5), 1), ValueError, r"ids_keep: expected indices in \[0, 5\), found 5"),
        (lambda: (torch.randn(2, 5, 4), torch.full((2, 3), -1), 1), ValueError, r"ids_keep: .*found -1"),
        (lambda: (torch.randn(2, 5, 4), torch.zeros(2, 3, dtype=torch.long), 0), ValueError, "clones: expected an int >= 1"),
        (lambda: (torch.randn(2, 5, 4), torch.zeros(2, 3, dtype=torch.long), 1.0), TypeError, "clones: expected an int"),
        (lambda: (torch.randn(0, 5, 4), torch.zeros(0, 3, dtype=torch.long), 1), ValueError, "x: expected a non-empty"),
        (lambda: ([[1.0]], torch.zeros(2, 3, dtype=torch.long), 1), TypeError, "x: expected a torch.Tensor"),
        (lambda: (torch.randn(2, 5, 4), torch.zeros(2, 3, dtype=torch.long, device="meta"), 1), ValueError, "ids_keep: expected device cpu"),
    ],
)
def test_bad_input(backend, make, exc, match):
    args = make()
    with dk.use_backend(backend), pytest.raises(exc, match=match):
        dk.gather_visible(*args)


def test_unavailable_backend_says_why():
    with dk.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda: runs on CUDA tensors"):
        dk.gather_visible(torch.randn(1, 2, 3), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="backend: expected one of"):
        dk.set_backend("fast")
