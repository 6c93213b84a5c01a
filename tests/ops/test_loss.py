"""masked_regression_loss and cls_regression_loss: every fused backend against the reference, forward and
backward, on the data2vec 2.0 shapes and odd ones, plus property tests, gradcheck, registration checks,
torch.compile and bad input."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, fused_backends
from hypothesis import given
from hypothesis import strategies as st

import d2v2_kernels as dk
from d2v2_kernels.ops.loss import masked_regression_loss_eager, masked_regression_loss_reference

BACKENDS = fused_backends()
CPU = [b for b in BACKENDS if b == "cpu"]


def make_mask(N, T, counted, *, exact=True):
    """counted of T tokens per row (the masking convention: equal counts), or Bernoulli(counted / T)."""
    if exact:
        return torch.rand(N, T).argsort(1) < counted
    return torch.rand(N, T) < counted / T


def run(backend, pred, target, mask, clones, scale=None, beta=0.0, reduction="mean", dtype=torch.float32, g=None):
    """(out, grad) of the op on `backend` and of the reference, for the same incoming gradient."""
    pred = pred.to(dtype).detach()
    p_ref = pred.clone().requires_grad_(True)
    ref = masked_regression_loss_reference(p_ref, target, mask, clones, scale, beta, reduction)
    if g is None:
        g = torch.randn_like(ref) if reduction == "none" else torch.ones_like(ref)
    ref.backward(g)
    p = pred.clone().requires_grad_(True)
    with dk.use_backend(backend):
        out = dk.masked_regression_loss(p, target, mask, clones=clones, scale=scale, beta=beta, reduction=reduction)
    out.backward(g)
    return out, p.grad, ref, p_ref.grad


def check(backend, pred, target, mask, clones, scale=None, beta=0.0, reduction="mean", dtype=torch.float32, g=None):
    out, grad, ref, ref_grad = run(backend, pred, target, mask, clones, scale, beta, reduction, dtype, g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and out.shape == ref.shape
    assert grad.dtype == dtype and grad.shape == pred.shape
    torch.testing.assert_close(out, ref, **TOL[acc])  # math in fp32 on the same (rounded) inputs
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])
    uncounted = ~mask
    assert torch.equal(grad[uncounted], torch.zeros_like(grad[uncounted])), "grad must be exactly 0 where not counted"
    return out, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_reference(backend, dtype, reduction, beta, scale):
    if backend == "triton" and dtype == torch.float16:
        pytest.skip("fp16 is covered by the cpu backend; keep interpreter time down")
    B, M, T, C = 2, 3, 10, 37  # C not a multiple of any block
    check(backend, torch.randn(B * M, T, C), torch.randn(B, T, C), make_mask(B * M, T, 7), M, scale, beta,
          reduction, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_incoming_gradient_not_one(backend, reduction):
    """Loss scaling / accumulation: the gradient computed in the forward is scaled in the backward."""
    B, M, T, C = 2, 2, 9, 40
    for dtype in (torch.float32, torch.bfloat16):
        check(backend, torch.randn(B * M, T, C), torch.randn(B, T, C), make_mask(B * M, T, 5), M, None, 0.0,
              reduction, dtype, g=torch.tensor(0.37))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_data2vec2_image_shape_cpu(dtype, beta):
    """ViT-B images: T=196 patches, C=768, M=16 clones, 157 of 196 masked (the 38 MB fp32 gradient takes the
    non-temporal store path)."""
    if not CPU:
        pytest.skip("cpu extension not built")
    B, M, T, C = 4, 16, 196, 768
    check("cpu", torch.randn(B * M, T, C), torch.randn(B, T, C), make_mask(B * M, T, 157), M, None, beta, "mean",
          dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,M,T,C,counted,scale",
    [
        (2, 8, 999, 768, 499, None),  # audio base: 1/sqrt(D) scale, half masked
        (2, 8, 512, 768, 246, 1.0),  # text base: scale 1, 48% masked
        (2, 4, 196, 96, 157, None),  # image grid with C cut down (the interpreter's image case)
    ],
)
def test_data2vec2_shapes(backend, B, M, T, C, counted, scale):
    if backend == "triton":
        if C > 96:
            pytest.skip("full-width audio/text shapes run on the cpu backend; the interpreter gets the small case")
    for dtype in (torch.float32, torch.bfloat16):
        for reduction in ("mean", "none"):
            check(backend, torch.randn(B * M, T, C), torch.randn(B, T, C), make_mask(B * M, T, counted), M, scale,
                  0.0, reduction, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "B,M,T,C,counted",
    [
        (3, 1, 7, 37, 4),  # clones = 1
        (4, 3, 1, 8, 1),  # T = 1
        (2, 2, 9, 16, 0),  # nothing counted: 0 (not NaN) and a zero gradient
        (2, 2, 9, 33, 9),  # everything counted
        (1, 5, 6, 1, 3),  # C = 1
    ],
)
def test_odd_shapes(backend, reduction, B, M, T, C, counted):
    out, grad = check(backend, torch.randn(B * M, T, C), torch.randn(B, T, C), make_mask(B * M, T, counted), M,
                      None, 0.0, reduction)
    if counted == 0:
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    B, M, T, C = 2, 3, 8, 24
    pred_t = torch.randn(B * M, C, T).transpose(1, 2)  # channel stride != 1: copied once
    pred_pad = torch.randn(B * M, T, C + 5)[..., :C]  # rows contiguous, padded: read in place
    target = torch.randn(B, C, T).transpose(1, 2)
    mask = make_mask(B * M, T, 5).t().contiguous().t()  # transposed strides
    assert not pred_t.is_contiguous() and not pred_pad.is_contiguous() and not mask.is_contiguous()
    for pred in (pred_t, pred_pad):
        for reduction in ("mean", "none"):
            out, grad, ref, ref_grad = run(backend, pred, target, mask, M, reduction=reduction)
            torch.testing.assert_close(out, ref, **TOL[torch.float32])
            torch.testing.assert_close(grad, ref_grad, **TOL[torch.float32])
    # "none" then .sum(): the incoming gradient is an expanded (stride-0) tensor
    p = pred_pad.clone().requires_grad_(True)
    with dk.use_backend(backend):
        dk.masked_regression_loss(p, target, mask, clones=M, reduction="none").sum().backward()
    p_ref = pred_pad.clone().requires_grad_(True)
    masked_regression_loss_reference(p_ref, target, mask, M, reduction="none").sum().backward()
    torch.testing.assert_close(p.grad, p_ref.grad, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_dtypes(backend):
    """A bf16 target with an fp32 pred, and an fp64 target with a bf16 pred: math in fp32 either way."""
    B, M, T, C = 2, 2, 6, 20
    mask = make_mask(B * M, T, 4)
    for pred_dtype, target_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float64)):
        check(backend, torch.randn(B * M, T, C), torch.randn(B, T, C).to(target_dtype), mask, M,
              dtype=pred_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_gradcheck_fp64(backend, reduction, beta):
    B, M, T, C = 2, 2, 4, 5
    target = torch.randn(B, T, C, dtype=torch.float64)
    mask = make_mask(B * M, T, 3)
    pred = torch.randn(B * M, T, C, dtype=torch.float64, requires_grad=True)

    def f(p):
        return dk.masked_regression_loss(p, target, mask, clones=M, beta=beta, reduction=reduction)

    with dk.use_backend(backend):
        assert torch.autograd.gradcheck(f, (pred,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_retained_graph_second_backward(backend):
    """The gradient computed in the forward is handed out once; a second backward recomputes it."""
    B, M, T, C = 2, 2, 6, 12
    pred = torch.randn(B * M, T, C, requires_grad=True)
    target, mask = torch.randn(B, T, C), make_mask(B * M, T, 4)
    with dk.use_backend(backend):
        loss = dk.masked_regression_loss(pred, target, mask, clones=M)
    loss.backward(retain_graph=True)
    first = pred.grad.clone()
    loss.backward(torch.tensor(2.0))
    torch.testing.assert_close(pred.grad, 3 * first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_target_not_differentiated(backend):
    B, M, T, C = 2, 2, 5, 8
    pred = torch.randn(B * M, T, C)
    target = torch.randn(B, T, C, requires_grad=True)
    mask = make_mask(B * M, T, 3)
    with dk.use_backend(backend):
        with torch.no_grad():
            out = dk.masked_regression_loss(pred.requires_grad_(True), target, mask, clones=M)
        assert not out.requires_grad
        out = dk.masked_regression_loss(pred, target, mask, clones=M)
    out.backward()
    assert target.grad is None and pred.grad is not None


@given(
    B=st.integers(1, 3),
    M=st.integers(1, 4),
    T=st.integers(1, 12),
    C=st.integers(1, 70),
    frac=st.floats(0, 1),
    beta=st.sampled_from([0.0, 0.1, 2.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_cpu_matches_reference(B, M, T, C, frac, beta, reduction, dtype):
    if not CPU:
        pytest.skip("cpu extension not built")
    check("cpu", torch.randn(B * M, T, C), torch.randn(B, T, C), torch.rand(B * M, T) < frac, M, None, beta,
          reduction, dtype)


@pytest.mark.skipif(not CPU, reason="cpu extension not built")
def test_result_independent_of_thread_count():
    """Per-row partials summed in row order: the same bits with 1 and 2 OpenMP threads."""
    script = (
        "import torch, d2v2_kernels as dk\n"
        "torch.manual_seed(0)\n"
        "B, M, T, C = 3, 4, 50, 96\n"
        "p, t, m = torch.randn(B * M, T, C), torch.randn(B, T, C), torch.rand(B * M, T) < 0.8\n"
        "with dk.use_backend('cpu'):\n"
        "    print(dk.masked_regression_loss(p, t, m, clones=M).item().hex())\n"
    )
    outs = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        outs.append(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert outs[0] == outs[1] and outs[0].strip()


@pytest.mark.parametrize("backend", CPU)
def test_opcheck(backend):
    B, M, T, C = 2, 3, 6, 5
    pred = torch.randn(B * M, T, C, requires_grad=True)
    target, mask = torch.randn(B, T, C), make_mask(B * M, T, 4)
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.d2v2.masked_regression_loss.default,
                              (pred, target, mask, M, 0.5, 0.0, reduction, backend))
        torch.library.opcheck(torch.ops.d2v2.masked_regression_loss_with_grad.default,
                              (pred, target, mask, M, 0.5, 0.3, "sum" if reduction == "none" else reduction, backend))
    torch.library.opcheck(torch.ops.d2v2.masked_regression_loss_backward.default,
                          (torch.tensor(1.5), pred.detach(), target, mask, M, 0.5, 0.0, "mean", backend))
    torch.library.opcheck(torch.ops.d2v2.masked_regression_loss_backward.default,
                          (torch.randn(B * M, T), pred.detach(), target, mask, M, 0.5, 0.2, "none", backend))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(reduction, compile_backend):
    if compile_backend == "inductor" and reduction == "none":
        pytest.skip("one inductor case keeps the test time down")
    B, M, T, C = 2, 3, 8, 16
    pred = torch.randn(B * M, T, C, requires_grad=True)
    target, mask = torch.randn(B, T, C), make_mask(B * M, T, 5)

    def objective(p):
        loss = dk.masked_regression_loss(p, target, mask, clones=M, reduction=reduction)
        return loss.sum() * 2 if reduction == "none" else loss * 2

    p_ref = pred.detach().clone().requires_grad_(True)
    expected = masked_regression_loss_reference(p_ref, target, mask, M, reduction=reduction)
    expected = expected.sum() * 2 if reduction == "none" else expected * 2
    expected.backward()
    compiled = torch.compile(objective, fullgraph=True, backend=compile_backend)
    out = compiled(pred)
    out.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(pred.grad, p_ref.grad)


def test_eager_chain_is_the_reference_mean():
    """The benchmark's eager chain (fairseq's d2v_loss form) and the reference agree."""
    B, M, T, C = 2, 4, 12, 32
    pred, target, mask = torch.randn(B * M, T, C), torch.randn(B, T, C), make_mask(B * M, T, 9)
    for beta in (0.0, 0.5):
        torch.testing.assert_close(masked_regression_loss_eager(pred, target, mask, M, None, beta),
                                   masked_regression_loss_reference(pred, target, mask, M, None, beta))


def test_auto_backend_picks_fused_on_cpu():
    with dk.use_backend("auto"):
        want = "-> cpu" if CPU else "-> reference"
        assert dk.available_backends("cpu")["masked_regression_loss"]["auto"] == want
        assert dk.available_backends("cpu")["masked_regression_loss"]["cuda"].endswith("not implemented for "
                                                                                         "masked_regression_loss")


# --- cls_regression_loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cls_loss_matches_direct_formula_and_reference_form(dtype):
    B, M, T, C = 3, 4, 10, 24
    final_target = torch.randn(B, T, C)
    cls_pred = torch.randn(B * M, C).to(dtype).requires_grad_(True)
    out = dk.cls_regression_loss(cls_pred, final_target, clones=M)
    assert out.dtype == torch.float32 and out.dim() == 0
    scale = 1 / math.sqrt(C)
    direct = sum(
        ((cls_pred[n].float() - final_target[n // M].mean(0)) ** 2).sum() * scale for n in range(B * M)
    )
    torch.testing.assert_close(out, direct, **TOL[torch.float32])
    # fairseq: mse(cls_pred, mean.repeat_interleave(M)) * scale * (0.01 * sample_size), summed by the
    # criterion, divided by sample_size by the trainer: 0.01 * ours.
    sample_size = torch.tensor(208)
    cls_target = final_target.mean(dim=1).repeat_interleave(M, 0)
    ref_term = (F.mse_loss(cls_pred.float(), cls_target, reduction="none") * scale * (0.01 * sample_size)).sum()
    torch.testing.assert_close(0.01 * out, ref_term / sample_size, **TOL[torch.float32])
    g_ours = torch.autograd.grad(0.01 * out / sample_size, cls_pred)[0]
    g_ref = torch.autograd.grad(ref_term / sample_size / sample_size, cls_pred)[0]
    torch.testing.assert_close(g_ours, g_ref, **TOL[dtype])


def test_cls_loss_padding_scale_and_gradcheck():
    B, M, T, C = 2, 3, 7, 5
    final_target = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[0, 4:] = True
    cls_pred = torch.randn(B * M, C, dtype=torch.float64, requires_grad=True)
    out = dk.cls_regression_loss(cls_pred, final_target, clones=M, scale=2.0, padding_mask=padding)
    means = torch.stack([final_target[0, :4].mean(0), final_target[1].mean(0)]).detach()
    direct = ((cls_pred - means.repeat_interleave(M, 0)) ** 2).sum() * 2.0
    torch.testing.assert_close(out, direct)
    out.backward()
    assert final_target.grad is None  # the teacher's target is data
    assert torch.autograd.gradcheck(
        lambda p: dk.cls_regression_loss(p, final_target, clones=M, padding_mask=padding), (cls_pred,)
    )


def test_cls_loss_compiles():
    B, M, T, C = 2, 2, 5, 8
    final_target, cls_pred = torch.randn(B, T, C), torch.randn(B * M, C, requires_grad=True)
    f = torch.compile(lambda p: dk.cls_regression_loss(p, final_target, clones=M), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(cls_pred), dk.cls_regression_loss(cls_pred, final_target, clones=M))


# --- bad input -------------------------------------------------------------------------------------


def _args(N=4, T=5, C=3, B=2, **over):
    a = dict(pred=torch.randn(N, T, C), target=torch.randn(B, T, C), mask=torch.ones(N, T, dtype=torch.bool),
             clones=2)
    a.update(over)
    return a


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: _args(pred=torch.randn(4, 5)), ValueError, "pred: expected a 3-D"),
        (lambda: _args(target=torch.randn(2, 5)), ValueError, "target: expected a 3-D"),
        (lambda: _args(mask=torch.ones(4, 5, 1, dtype=torch.bool)), ValueError, "mask: expected a 2-D"),
        (lambda: _args(pred=torch.ones(4, 5, 3, dtype=torch.int32)), TypeError, "pred: expected dtype"),
        (lambda: _args(target=torch.ones(2, 5, 3, dtype=torch.int64)), TypeError, "target: expected dtype"),
        (lambda: _args(mask=torch.ones(4, 5)), TypeError, r"mask: expected dtype in \(bool\), got float32"),
        (lambda: _args(pred=[[1.0]]), TypeError, "pred: expected a torch.Tensor"),
        (lambda: _args(mask=torch.ones(4, 5, dtype=torch.bool, device="meta")), ValueError, "mask: expected device cpu"),
        (lambda: _args(target=torch.randn(2, 5, 3, device="meta")), ValueError, "target: expected device cpu"),
        (lambda: _args(N=5, mask=torch.ones(5, 5, dtype=torch.bool)), ValueError,
         r"pred: expected B\*clones = 2\*2 = 4 rows .* got 5; clones=2 does not divide 5"),
        (lambda: _args(N=6, mask=torch.ones(6, 5, dtype=torch.bool)), ValueError, r"pred: expected B\*clones = 2\*2 = 4"),
        (lambda: _args(clones=3), ValueError, r"pred: expected B\*clones = 2\*3 = 6 rows"),
        (lambda: _args(target=torch.randn(2, 6, 3)), ValueError, r"target: expected shape \(B, T, C\) = \(2, 5, 3\)"),
        (lambda: _args(target=torch.randn(2, 5, 4)), ValueError, r"target: expected shape"),
        (lambda: _args(mask=torch.ones(4, 6, dtype=torch.bool)), ValueError, r"mask: expected shape \(B\*clones, T\) = \(4, 5\)"),
        (lambda: _args(reduction="avg"), ValueError, r"reduction: expected one of \('mean', 'sum', 'none'\), got 'avg'"),
        (lambda: _args(beta=-0.1), ValueError, "beta: expected a finite float >= 0, got -0.1"),
        (lambda: _args(beta=float("nan")), ValueError, "beta: expected a finite float >= 0"),
        (lambda: _args(beta="1"), TypeError, "beta: expected a float, got str"),
        (lambda: _args(scale=float("inf")), ValueError, "scale: expected a finite float, got inf"),
        (lambda: _args(scale=True), TypeError, "scale: expected a float, got bool"),
        (lambda: _args(clones=0), ValueError, "clones: expected an int >= 1, got 0"),
        (lambda: _args(clones=2.0), TypeError, "clones: expected an int, got float"),
        (lambda: _args(N=0, B=0, mask=torch.ones(0, 5, dtype=torch.bool)), ValueError, "pred: expected a non-empty"),
        (lambda: _args(C=0, target=torch.randn(2, 5, 0)), ValueError, "pred: expected a non-empty"),
    ],
)
def test_bad_input(backend, make, exc, match):
    a = make()
    pred, target, mask = a.pop("pred"), a.pop("target"), a.pop("mask")
    with dk.use_backend(backend), pytest.raises(exc, match=match):
        dk.masked_regression_loss(pred, target, mask, **a)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(4, 3, 1), torch.randn(2, 5, 3), {}), ValueError, "cls_pred: expected a 2-D"),
        (lambda: (torch.randn(4, 3), torch.randn(2, 3), {}), ValueError, "final_target: expected a 3-D"),
        (lambda: (torch.randn(5, 3), torch.randn(2, 5, 3), {}), ValueError,
         r"cls_pred: expected B\*clones = 2\*2 = 4 rows .* got 5; clones=2 does not divide 5"),
        (lambda: (torch.randn(4, 4), torch.randn(2, 5, 3), {}), ValueError, "cls_pred: expected 3 channels"),
        (lambda: (torch.randn(4, 3).int(), torch.randn(2, 5, 3), {}), TypeError, "cls_pred: expected dtype"),
        (lambda: (torch.randn(4, 3), torch.randn(2, 5, 3), {"clones": 0}), ValueError, "clones: expected an int >= 1"),
        (lambda: (torch.randn(4, 3), torch.randn(2, 5, 3), {"scale": float("nan")}), ValueError, "scale: expected a finite"),
        (lambda: (torch.randn(4, 3), torch.randn(2, 5, 3), {"padding_mask": torch.zeros(2, 5)}), TypeError,
         "padding_mask: expected dtype"),
        (lambda: (torch.randn(4, 3), torch.randn(2, 5, 3), {"padding_mask": torch.zeros(2, 4, dtype=torch.bool)}),
         ValueError, r"padding_mask: expected shape \(B, T\) = \(2, 5\)"),
        (lambda: (torch.randn(0, 3), torch.randn(0, 5, 3), {}), ValueError, "final_target: expected a non-empty"),
        (lambda: (torch.randn(4, 3), torch.randn(2, 5, 3, device="meta"), {}), ValueError, "final_target: expected device"),
    ],
)
def test_cls_bad_input(make, exc, match):
    cls_pred, final_target, kw = make()
    kw = {"clones": 2, **kw}
    with pytest.raises(exc, match=match):
        dk.cls_regression_loss(cls_pred, final_target, **kw)
