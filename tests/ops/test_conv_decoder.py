"""conv_decoder_block: every fused backend against the reference, forward and every gradient, 1-D and 2-D,
odd and even k, grouped/depthwise, residual or not, no bias, odd shapes; property tests, fp64 gradcheck,
registration checks (opcheck, torch.compile) and bad input.

Triton runs through the interpreter, where tl.dot on bf16/fp16 is wrong: the Triton cases run in fp32
(fp64 for one gradcheck) on small shapes. The bf16 Triton numerics are not tested without a GPU (the
ahead-of-time compile in tests/test_build.py only shows the bf16 kernels build without spills); bf16 and
fp16 numerics of the decomposition are tested through the cpu backend here."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, fused_backends
from hypothesis import given
from hypothesis import strategies as st

import d2v2_kernels as dk
from d2v2_kernels.ops import conv_decoder as cd
from d2v2_kernels.ops.conv_decoder import conv_decoder_block_reference

BACKENDS = fused_backends()
# "reference-op": the custom op's plain-PyTorch backend (channels-last conv + PyTorch epilogue): the cpu
# backend's conv path with the C++ epilogue swapped for PyTorch's.
OP_BACKENDS = ["reference-op"] + BACKENDS


def make(dim, N, S, Cin, Cout, k, groups, *, bias=True, dtype=torch.float32):
    shape = (N, S, Cin) if dim == 1 else (N, S, S, Cin)
    x = torch.randn(shape)
    w = torch.randn((Cout, Cin // groups) + (k,) * dim) / ((Cin // groups) * k**dim) ** 0.5
    b = torch.randn(Cout) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b)


def _run(fn, x, w, b, grad):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True) if b is not None else None
    out = fn(x, w, b)
    out.backward(grad)
    return out, x.grad, w.grad, (b.grad if b is not None else None)


def call(backend, x, w, b, groups, residual, eps=1e-5):
    if backend == "reference-op":
        res = residual and x.shape[-1] == w.shape[0]
        return torch.ops.d2v2.conv_decoder_block(x, w, b, groups, res, eps, "reference")[0]
    with dk.use_backend(backend):
        return dk.conv_decoder_block(x, w, b, groups=groups, residual=residual, eps=eps)


REDUCTIONS = ("grad_weight", "grad_bias")


def check_against_reference(backend, x, w, b, groups, residual=True, eps=1e-5, *, vs_eager=False):
    """Forward and the x, weight, bias gradients against the reference run in fp64 on the same values (the
    truth: the eager chain in bf16 rounds after every op, and even in fp32 it is no better than 1e-5 on
    the weight gradient), within the contract's tolerance for the dtype.

    Widened only where the dtype itself cannot do better, by twice the largest error of the eager
    reference chain run in the same dtype on that tensor: the weight and bias gradients (sums over
    every position: at the image shape the fp32 eager chain is 2.4e-5 off on a weight gradient of
    magnitude 75, the bf16 one 0.3), and, with vs_eager (the property test's random tiny shapes, where a
    LayerNorm over few channels can be arbitrarily ill-conditioned), every tensor."""
    dtype = x.dtype
    cast = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    out_shape = x.shape[:-1] + (w.shape[0],)
    grad = torch.randn(out_shape).to(dtype)
    ref_fn = lambda x, w, b: conv_decoder_block_reference(x, w, b, groups, residual, eps)  # noqa: E731
    ref = _run(ref_fn, cast(x), cast(w), cast(b), grad.to(torch.float64))
    eager = _run(ref_fn, x, w, b, grad) if dtype != torch.float64 else ref
    got = _run(lambda x, w, b: call(backend, x, w, b, groups, residual, eps), x, w, b, grad)
    assert got[0].shape == out_shape and got[0].dtype == dtype
    for name, r, e, g in zip(("out", "grad_x", "grad_weight", "grad_bias"), ref, eager, got):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == r.shape, name
        tol = dict(TOL[dtype])
        if vs_eager or name in REDUCTIONS:
            tol["atol"] += 2 * (e.double() - r).abs().max().item()
        torch.testing.assert_close(g.double(), r, **tol, msg=lambda m: f"{backend} {name}: {m}")


# --- every backend, every geometry (small: the Triton interpreter is slow) ---------------------------

GEOMETRIES = [
    # dim, N, S, Cin, Cout, k, groups, bias
    pytest.param(1, 2, 7, 16, 16, 1, 1, True, id="1d-k1"),
    pytest.param(1, 2, 7, 32, 16, 2, 4, False, id="1d-k2-g4-cin!=cout-nobias"),
    pytest.param(1, 2, 7, 16, 16, 3, 16, True, id="1d-k3-depthwise"),
    pytest.param(1, 2, 7, 16, 32, 4, 2, True, id="1d-k4-g2-cout>cin"),
    pytest.param(2, 2, 5, 16, 16, 3, 1, True, id="2d-k3"),
    pytest.param(2, 2, 5, 32, 16, 2, 4, False, id="2d-k2-g4-nobias"),
    pytest.param(2, 2, 4, 8, 8, 3, 8, True, id="2d-k3-depthwise"),
    pytest.param(1, 3, 1, 16, 16, 1, 2, True, id="T1-k1"),
    pytest.param(1, 2, 9, 24, 24, 5, 3, True, id="1d-k5-C24-not-a-block"),
]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dim,N,S,Cin,Cout,k,groups,bias", GEOMETRIES)
def test_matches_reference(backend, dim, N, S, Cin, Cout, k, groups, bias):
    x, w, b = make(dim, N, S, Cin, Cout, k, groups, bias=bias)
    check_against_reference(backend, x, w, b, groups)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_residual_off_and_eps(backend):
    x, w, b = make(2, 2, 4, 16, 16, 3, 2)
    check_against_reference(backend, x, w, b, 2, residual=False, eps=1e-3)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dim", [1, 2])
def test_noncontiguous_x(backend, dim):
    x, w, b = make(dim, 2, 6 if dim == 1 else 4, 16, 16, 3, 4)
    xt = x.movedim(-1, 1).contiguous().movedim(1, -1)  # channels-first memory: channel stride != 1
    xs = torch.cat([x, x], 0)[::2]  # strided batch
    for xv in (xt, xs):
        assert not xv.is_contiguous()
        check_against_reference(backend, xv, w, b, 4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "dim,N,S,Cin,Cout,k,groups",
    [
        (2, 4, 14, 96, 96, 3, 2),  # images: 14 x 14 patch grid, 16 groups of 768 cut down to 2 of 96
        (1, 2, 150, 64, 64, 7, 16),  # audio: k = 7, 16 groups (384 channels cut down to 64)
        (1, 2, 64, 96, 96, 9, 16),  # text-like: k = 9, 16 groups
        (1, 2, 40, 48, 32, 4, 4),  # first layer (Cin != Cout), even k
    ],
)
def test_cpu_data2vec2_like_shapes(backend, dtype, dim, N, S, Cin, Cout, k, groups):
    x, w, b = make(dim, N, S, Cin, Cout, k, groups, dtype=dtype)
    check_against_reference(backend, x, w, b, groups)


@st.composite
def _conv_cases(draw):
    dim = draw(st.sampled_from([1, 2]))
    S = draw(st.integers(1, 9 if dim == 1 else 6))
    groups = draw(st.integers(1, 4))
    # LayerNorm over >= 8 channels: over 2 or 3 the statistics of random data are ill-conditioned
    # (rstd ~ 1 / |z1 - z2|) and no dtype compares, the reference's fp32 included
    # (rstd ~ 1 / |z1 - z2|) and no dtype compares, the reference's fp32 included. Likewise a fan-in of
    # one (Cin/groups = 1, k = 1, one group) makes every row of z a multiple of the weight: the
    # LayerNorm is scale-invariant, the exact grad_x is 0 and both sides return rounding noise.
    cout_g = draw(st.integers(-(-8 // groups), 8))
    k = draw(st.integers(1, S))
    cin_g = draw(st.integers(1 if (k > 1 or groups > 1) else 2, 6))
    return dict(dim=dim, N=draw(st.integers(1, 3)), S=S, Cin=cin_g * groups, Cout=cout_g * groups, k=k, groups=groups)


@given(case=_conv_cases(), bias=st.booleans(), residual=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_property_matches_reference(case, bias, residual, dtype, seed):
    backend = "cpu" if "cpu" in BACKENDS else "reference-op"
    torch.manual_seed(seed)
    groups = case["groups"]
    x, w, b = make(**case, bias=bias, dtype=dtype)
    check_against_reference(backend, x, w, b, groups, residual, vs_eager=True)


def test_channels_last_conv_needs_no_copy():
    """The cpu backend's premise: channels-last x permuted to NCHW is a channels_last tensor, and the
    conv keeps that format, so permuting its output back gives a contiguous [N, H, W, Cout] (odd k)."""
    for dim in (1, 2):
        x, w, _ = make(dim, 2, 6, 16, 8, 3, 2)
        w4, padding = cd._conv_geometry(x, w)
        z = F.conv2d(cd._nchw_view(x), w4, None, padding=padding, groups=2)
        assert z.permute(0, 2, 3, 1).is_contiguous()


# --- gradcheck (fp64) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "reference-op"] + [b for b in BACKENDS if b == "cpu"])
@pytest.mark.parametrize("dim,S,k,groups,C", [(1, 5, 2, 2, 4), (1, 4, 3, 1, 3), (2, 4, 3, 2, 4), (2, 3, 2, 1, 2)])
def test_gradcheck_fp64(backend, dim, S, k, groups, C):
    x, w, b = make(dim, 1, S, C, C, k, groups, dtype=torch.float64)
    args = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: call(backend, x, w, b, groups, True), args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
def test_gradcheck_fp64_triton_tiny():
    x, w, b = make(1, 1, 3, 2, 2, 2, 1, dtype=torch.float64)
    args = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: call("triton", x, w, b, 1, True), args)


# --- registration: opcheck, torch.compile, backend choice ----------------------------------------------


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(backend, bias):
    if backend == "triton" and not bias:
        pytest.skip("the interpreter is slow: bias None is covered by the reference and cpu opchecks")
    x, w, b = make(2, 1, 3, 4, 4, 3, 2, bias=bias)
    x.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    torch.library.opcheck(torch.ops.d2v2.conv_decoder_block.default, (x, w, b, 2, True, 1e-5, backend))
    with torch.no_grad():
        out, z, mean, rstd = torch.ops.d2v2.conv_decoder_block(x, w, b, 2, True, 1e-5, backend)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.d2v2.conv_decoder_block_backward.default,
                          (g, x.detach(), w.detach(), None if b is None else b.detach(), z, mean, rstd, 2, True,
                           backend))


def test_torch_compile_fullgraph():
    backend = BACKENDS[0] if BACKENDS else "reference"
    x, w, b = make(2, 2, 4, 8, 8, 3, 2)
    params = [t.requires_grad_(True) for t in (x, w, b)]

    def loss(x, w, b):
        y = dk.conv_decoder_block(x, w, b, groups=2)
        return dk.conv_decoder_block(y, w, b, groups=2, residual=False).square().sum()

    ref_params = [t.detach().clone().requires_grad_(True) for t in params]
    y = conv_decoder_block_reference(*ref_params, 2, True)
    expected = conv_decoder_block_reference(y, ref_params[1], ref_params[2], 2, False).square().sum()
    expected_grads = torch.autograd.grad(expected, ref_params)
    with dk.use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        out = compiled(*params)
    out.backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    for p, g in zip(params, expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-4)


def test_auto_backend_picks_fused_on_cpu():
    expected = "-> cpu" if "cpu" in BACKENDS else "-> reference"
    assert dk.available_backends("cpu")["conv_decoder_block"]["auto"] == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_x_only_and_no_grad(backend):
    x, w, b = make(1, 2, 6, 8, 8, 3, 2)
    x.requires_grad_(True)
    with dk.use_backend(backend):
        out = dk.conv_decoder_block(x, w, b, groups=2)
        (gx,) = torch.autograd.grad(out.sum(), x)
        with torch.no_grad():
            out2 = dk.conv_decoder_block(x, w, b, groups=2)
    xr = x.detach().requires_grad_(True)
    (gr,) = torch.autograd.grad(conv_decoder_block_reference(xr, w, b, 2).sum(), xr)
    torch.testing.assert_close(gx, gr, **TOL[torch.float32])
    torch.testing.assert_close(out2, out.detach())
    assert not out2.requires_grad


# --- bad input ------------------------------------------------------------------------------------------


def _bad(kind):
    x2, w2, b2 = make(2, 2, 5, 8, 8, 3, 2)
    x1, w1, _ = make(1, 2, 5, 8, 8, 3, 2)
    return {
        "groups-not-dividing": ((x2, torch.randn(8, 3, 3, 3), b2), dict(groups=3)),
        "weight-rank": ((x2, w1, b2), dict(groups=2)),
        "weight-rank-1d": ((x1, w2, None), dict(groups=2)),
        "kernel-too-large": ((torch.randn(2, 3, 8), torch.randn(8, 4, 5), None), dict(groups=2)),
        "channels-first": ((torch.randn(2, 8, 6, 6), torch.randn(8, 8, 3, 3), b2), dict(groups=1)),
        "bias-shape": ((x2, w2, torch.randn(7)), dict(groups=2)),
        "bias-2d": ((x2, w2, torch.randn(1, 8)), dict(groups=2)),
        "dtype-mismatch": ((x2, w2.double(), b2), dict(groups=2)),
        "bias-dtype": ((x2, w2, b2.half()), dict(groups=2)),
        "int-x": ((x2.int(), w2, b2), dict(groups=2)),
        "eps-zero": ((x2, w2, b2), dict(groups=2, eps=0.0)),
        "eps-negative": ((x2, w2, b2), dict(groups=2, eps=-1e-5)),
        "groups-zero": ((x2, w2, b2), dict(groups=0)),
        "groups-float": ((x2, w2, b2), dict(groups=2.0)),
        "x-5d": ((x2.unsqueeze(0), w2, b2), dict(groups=2)),
        "not-square": ((x2, torch.randn(8, 4, 3, 2), b2), dict(groups=2)),
        "device": ((x2, w2.to("meta"), None), dict(groups=2)),
        "residual-not-bool": ((x2, w2, b2), dict(groups=2, residual="yes")),
        "x-not-tensor": (([[1.0]], w2, b2), dict(groups=2)),
    }[kind]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize(
    "kind, exc, match",
    [
        ("groups-not-dividing", ValueError, r"groups=3 must divide both input channels \(8\)"),
        ("weight-rank", ValueError, r"weight: expected \[Cout, Cin/groups, k, k\] \(4-D"),
        ("weight-rank-1d", ValueError, r"weight: expected \[Cout, Cin/groups, k\] \(3-D"),
        ("kernel-too-large", ValueError, r"weight: kernel size 5 larger than the input's spatial size \(3,\)"),
        ("channels-first", ValueError, "x looks channels-first"),
        ("bias-shape", ValueError, r"bias: expected shape \(8,\), got \(7,\)"),
        ("bias-2d", ValueError, "bias: expected a 1-D tensor"),
        ("dtype-mismatch", TypeError, r"weight: expected dtype in \(float32\), got float64"),
        ("bias-dtype", TypeError, r"bias: expected dtype in \(float32\), got float16"),
        ("int-x", TypeError, "x: expected dtype in"),
        ("eps-zero", ValueError, "eps: expected a positive float, got 0.0"),
        ("eps-negative", ValueError, "eps: expected a positive float"),
        ("groups-zero", ValueError, "groups: expected an int >= 1, got 0"),
        ("groups-float", TypeError, "groups: expected an int"),
        ("x-5d", ValueError, r"x: expected channels-last \[N, T, C\] \(1-D\) or \[N, H, W, C\]"),
        ("not-square", ValueError, "weight: expected a square k x k kernel"),
        ("device", ValueError, "weight: expected device cpu"),
        ("residual-not-bool", TypeError, "residual: expected a bool, got str"),
        ("x-not-tensor", TypeError, "x: expected a torch.Tensor"),
    ],
)
def test_bad_input(backend, kind, exc, match):
    args, kwargs = _bad(kind)
    with dk.use_backend(backend), pytest.raises(exc, match=match):
        dk.conv_decoder_block(*args, **kwargs)
