"""layer_average_targets: every fused backend against the reference for every (layer_norm, final_norm)
pair, with padding, stacked and list inputs, fp32/bf16/fp16; the data2vec 2.0 configurations; odd shapes;
numerical robustness (constant channels, a 1e4 offset); a property test; registration checks;
TargetLayerBuffer; bad input."""

import math
from itertools import product

import pytest
import torch
from conftest import TOL, fused_backends
from hypothesis import given
from hypothesis import strategies as st

import d2v2_kernels as dk
from d2v2_kernels.ops.targets import (
    TargetLayerBuffer,
    layer_average_targets_eager,
    layer_average_targets_reference,
)

BACKENDS = fused_backends()
LAYER_NORMS = ["instance", "layer", None]
FINAL_NORMS = [None, "layer", "instance"]
# Both sides compute in fp32 from the same (upcast) input values, so 16-bit inputs are held to fp32 tolerances.
FP32 = TOL[torch.float32]


def make_layers(K, B, T, C, dtype=torch.float32, offset=0.0):
    """K teacher-like layers: per-layer scale and per-channel offsets, so every norm has work to do."""
    scale = 1 + 0.25 * torch.arange(K, dtype=torch.float32).view(K, 1, 1, 1)
    channel_mean = torch.randn(K, 1, 1, C)
    return (torch.randn(K, B, T, C) * scale + channel_mean + offset).to(dtype)


def make_padding(B, T):
    """Unequal lengths: sample 0 fully valid, sample 1 a single valid step, the others in between."""
    lengths = [T, 1] + [max(1, (T * (i + 2)) // (B + 2)) for i in range(B - 2)]
    return torch.arange(T).unsqueeze(0) >= torch.tensor(lengths[:B]).unsqueeze(1)


def run(backend, layers, **kw):
    with dk.use_backend(backend):
        return dk.layer_average_targets(layers, **kw)


def check(backend, layers, *, tol=FP32, **kw):
    ref = layer_average_targets_reference(layers, kw.get("layer_norm", "instance"), kw.get("final_norm"),
                                          kw.get("padding_mask"), kw.get("eps", 1e-5))
    out = run(backend, layers, **kw)
    first = layers if isinstance(layers, torch.Tensor) else layers[0]
    expected_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype and out.shape == first.shape[-3:] and out.is_contiguous()
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, **tol)
    pad = kw.get("padding_mask")
    if pad is not None:
        assert (out[pad] == 0).all()
    return out


def as_input(x, kind):
    return x if kind == "stacked" else list(x.unbind(0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_norm,final_norm", list(product(LAYER_NORMS, FINAL_NORMS)))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kind", ["stacked", "list"])
def test_norm_combinations(backend, layer_norm, final_norm, padded, kind):
    K, B, T, C = 3, 4, 9, 37
    x = make_layers(K, B, T, C)
    pad = make_padding(B, T) if padded else None
    check(backend, as_input(x, kind), layer_norm=layer_norm, final_norm=final_norm, padding_mask=pad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer_norm,final_norm", [("instance", "layer"), ("layer", "instance"), (None, None)])
@pytest.mark.parametrize("kind", ["stacked", "list"])
def test_input_dtypes(backend, dtype, layer_norm, final_norm, kind):
    x = make_layers(4, 3, 10, 48, dtype)
    check(backend, as_input(x, kind), layer_norm=layer_norm, final_norm=final_norm, padding_mask=make_padding(3, 10))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fp64_in_fp64_out(backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} unavailable")
    x = make_layers(3, 3, 8, 20, torch.float64)
    for layer_norm, final_norm in [("instance", "layer"), ("layer", "instance")]:
        check(backend, x, tol=TOL[torch.float64], layer_norm=layer_norm, final_norm=final_norm,
              padding_mask=make_padding(3, 8))


# --- the data2vec 2.0 configurations (shared/spec/data2vec2.md section 4) --------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_config_cpu(dtype):
    """ViT-B images: IN per layer -> average -> LN, K = 10, B = 4, T = 196, C = 768; also the eager chain."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    x = make_layers(10, 4, 196, 768, dtype)
    out = check("cpu", x, layer_norm="instance", final_norm="layer")
    torch.testing.assert_close(out, layer_average_targets_eager(x), **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_config_small(backend):
    x = make_layers(10, 2, 16, 64)
    out = check(backend, list(x.unbind(0)), layer_norm="instance", final_norm="layer")
    torch.testing.assert_close(out, layer_average_targets_eager(x), **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_config(backend):
    """Audio: IN per layer -> average, K = 8, batches of unequal length (padding must not leak)."""
    K, B, T, C = (8, 3, 120, 768) if backend == "cpu" else (8, 3, 20, 48)
    x = make_layers(K, B, T, C)
    pad = make_padding(B, T)
    out = check(backend, x, layer_norm="instance", final_norm=None, padding_mask=pad)
    # The valid part of sample 2 does not depend on what lies in its padding.
    x2 = x.clone()
    x2[:, pad] = 1e6
    torch.testing.assert_close(run(backend, x2, padding_mask=pad), out, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_large_config(backend):
    """Text large: LN per layer -> average -> IN, K = 24."""
    K, B, T, C = (24, 2, 40, 1024) if backend == "cpu" else (24, 2, 7, 40)
    check(backend, make_layers(K, B, T, C), layer_norm="layer", final_norm="instance",
          padding_mask=make_padding(B, T))


# --- odd shapes and layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,B,T,C", [(2, 3, 1, 37), (1, 2, 5, 37), (3, 2, 6, 1), (2, 1, 5, 300), (1, 1, 1, 1)])
@pytest.mark.parametrize("layer_norm,final_norm", [("instance", "layer"), ("layer", "instance"), (None, "layer")])
def test_odd_shapes(backend, K, B, T, C, layer_norm, final_norm):
    check(backend, make_layers(K, B, T, C), layer_norm=layer_norm, final_norm=final_norm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_layers(backend):
    K, B, T, C = 3, 2, 7, 20
    # A list of differently laid-out views: channel-strided, step-strided, and a plain tensor.
    a = torch.randn(B, C, T).transpose(1, 2)
    b = torch.randn(B, 2 * T, C)[:, ::2]
    c = torch.randn(B, T, C)
    assert not a.is_contiguous() and not b.is_contiguous()
    for ln, fn in [("instance", "layer"), ("layer", "instance")]:
        check(backend, [a, b, c], layer_norm=ln, final_norm=fn, padding_mask=make_padding(B, T))
    # Stacked views: K not outermost in memory, and a channel slice.
    stacked = torch.randn(B, K, T, C).transpose(0, 1)
    sliced = torch.randn(K, B, T, C + 5)[..., 2:C + 2]
    for x in (stacked, sliced):
        assert not x.is_contiguous()
        check(backend, x, layer_norm="instance", final_norm="layer", padding_mask=make_padding(B, T))


# --- robustness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_norm,final_norm", [("instance", None), ("instance", "instance"), ("layer", "layer")])
def test_constant_channels_give_zero(backend, layer_norm, final_norm):
    x = torch.full((3, 2, 6, 16), 7.25)
    out = run(backend, x, layer_norm=layer_norm, final_norm=final_norm, padding_mask=make_padding(2, 6))
    assert torch.isfinite(out).all() and (out == 0).all()
    # One constant channel among random ones: that channel is exactly 0 after the instance norm.
    y = torch.randn(3, 2, 6, 16)
    y[:, :, :, 3] = -2.5
    out = run(backend, y, layer_norm="instance", final_norm=None)
    assert (out[..., 3] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_norm,final_norm", [("instance", "layer"), ("instance", None), ("layer", "instance")])
def test_large_offset_keeps_fp32_accuracy(backend, layer_norm, final_norm):
    """Teacher outputs on a 1e4 offset: shifted Welford statistics stay within fp32 tolerance of the
    fp64 definition, where an fp32 mean of size 1e4 (what the fp32 reference does) is off by ~1e-3."""
    K, B, T, C = 3, 3, 40, 24
    x = make_layers(K, B, T, C, offset=1e4)
    pad = make_padding(B, T)
    exact = layer_average_targets_reference(x.double(), layer_norm, final_norm, pad).float()
    out = run(backend, x, layer_norm=layer_norm, final_norm=final_norm, padding_mask=pad)
    torch.testing.assert_close(out, exact, atol=2e-5, rtol=2e-5)
    fp32_reference = layer_average_targets_reference(x, layer_norm, final_norm, pad)
    assert (fp32_reference - exact).abs().max() > 1e-4  # why the comparison is with the fp64 definition


def final_norm_gain(layers, layer_norm, final_norm, pad, eps=1e-5):
    """Per element, 1 / sqrt(var + eps) of the final norm's group, from the fp64 average: how much the
    final norm amplifies an fp32 rounding of the average (1 for unit variance, up to 1/sqrt(eps))."""
    avg = layer_average_targets_reference([t.double() for t in layers], layer_norm, None, pad, eps)
    valid = torch.ones(avg.shape[:2], dtype=torch.bool) if pad is None else ~pad
    w = valid.unsqueeze(-1).double()
    if final_norm == "layer":
        var = avg.var(-1, unbiased=False, keepdim=True)
    elif final_norm == "instance":
        n = w.sum(1, keepdim=True).clamp_min(1)
        mean = (avg * w).sum(1, keepdim=True) / n
        var = ((avg - mean).square() * w).sum(1, keepdim=True) / n
    else:
        return torch.ones(())
    return torch.rsqrt(var + eps).expand_as(avg)


@given(
    K=st.integers(1, 4),
    B=st.integers(1, 3),
    T=st.integers(1, 12),
    C=st.integers(1, 40),
    layer_norm=st.sampled_from(LAYER_NORMS),
    final_norm=st.sampled_from(FINAL_NORMS),
    padded=st.booleans(),
    stacked=st.booleans(),
)
def test_property_cpu_matches_definition(K, B, T, C, layer_norm, final_norm, padded, stacked):
    """Against the fp64 definition: 1e-5, plus fp32 rounding times the final norm's gain where a
    group is nearly constant (e.g. instance-normalised pairs of steps are +-1 up to eps, so a final
    layer norm over few channels of such rows divides rounding noise by sqrt(eps))."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    x = make_layers(K, B, T, C)
    pad = torch.rand(B, T) < 0.4 if padded else None
    layers = x if stacked else list(x.unbind(0))
    out = run("cpu", layers, layer_norm=layer_norm, final_norm=final_norm, padding_mask=pad)
    exact = layer_average_targets_reference(x.double(), layer_norm, final_norm, pad)
    tol = 1e-5 + 1e-5 * exact.abs() + 5e-7 * final_norm_gain(list(x.unbind(0)), layer_norm, final_norm, pad)
    assert ((out.double() - exact).abs() <= tol).all(), (out.double() - exact).abs().max()


def test_fully_padded_sample_is_zero():
    x = make_layers(2, 2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True
    for backend in ["reference"] + BACKENDS:
        for ln, fn in product(LAYER_NORMS, FINAL_NORMS):
            out = run(backend, x, layer_norm=ln, final_norm=fn, padding_mask=pad)
            assert torch.isfinite(out).all() and (out[1] == 0).all()


# --- registration, autograd, buffer ----------------------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
def test_opcheck(backend):
    x = make_layers(3, 2, 5, 6)
    pad = make_padding(2, 5)
    op = torch.ops.d2v2.layer_average_targets.default
    torch.library.opcheck(op, ([x], "instance", "layer", None, 1e-5, backend))
    torch.library.opcheck(op, (list(x.unbind(0)), "layer", "instance", pad, 1e-5, backend))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    x = make_layers(3, 2, 6, 8)
    pad = make_padding(2, 6)

    def targets(x, pad):
        return dk.layer_average_targets(x, final_norm="layer", padding_mask=pad) * 2 + 1

    expected = layer_average_targets_reference(x, "instance", "layer", pad) * 2 + 1
    compiled = torch.compile(targets, fullgraph=True, backend=compiler)
    torch.testing.assert_close(compiled(x, pad), expected, **FP32)
    layers = list(x.unbind(0))
    compiled_list = torch.compile(lambda ls: dk.layer_average_targets(ls, layer_norm="layer"), fullgraph=True,
                                  backend=compiler)
    torch.testing.assert_close(compiled_list(layers), layer_average_targets_reference(layers, "layer"), **FP32)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_no_autograd(backend):
    x = make_layers(2, 2, 4, 8).requires_grad_(True)
    out = run(backend, x, final_norm="layer")
    assert not out.requires_grad and out.grad_fn is None


def test_auto_backend_picks_fused_on_cpu():
    with dk.use_backend("auto"):
        expected = "-> cpu" if "cpu" in BACKENDS else "-> reference"
        assert dk.available_backends("cpu")["layer_average_targets"]["auto"] == expected
    assert "cuda: not implemented" in dk.available_backends("cpu")["layer_average_targets"]["cuda"]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_target_layer_buffer(backend):
    K, B, T, C = 3, 2, 6, 16
    buf = TargetLayerBuffer(K, B, T, C, dtype=torch.bfloat16)
    assert len(buf) == K and buf.shape == (K, B, T, C) and buf.tensor.dtype == torch.bfloat16
    layers = make_layers(K, B, T, C)
    for i in range(K):  # what a teacher block does: residual + FFN output written straight into the slot
        slot = buf.slot(i)
        assert slot.shape == (B, T, C) and slot.data_ptr() == buf.tensor[i].data_ptr()
        if i % 2:
            torch.add(layers[i].bfloat16(), 0, out=slot)
        else:
            slot.copy_(layers[i])
    assert buf.slot(-1).data_ptr() == buf.tensor[K - 1].data_ptr()
    pad = make_padding(B, T)
    with dk.use_backend(backend):
        out = buf.targets(layer_norm="instance", final_norm="layer", padding_mask=pad)
    expected = layer_average_targets_reference(layers.bfloat16(), "instance", "layer", pad)
    torch.testing.assert_close(out, expected, **FP32)
    with pytest.raises(IndexError, match="i: expected a layer index"):
        buf.slot(K)
    with pytest.raises(TypeError, match="i: expected an int"):
        buf.slot(1.0)
    with pytest.raises(ValueError, match="K: expected an int >= 1"):
        TargetLayerBuffer(0, B, T, C)
    with pytest.raises(TypeError, match="dtype: expected one of"):
        TargetLayerBuffer(K, B, T, C, dtype=torch.int32)


# --- bad input -------------------------------------------------------------------------------------


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


BAD_INPUTS = [
    (lambda: (_x(2, 3, 4, 5), dict(layer_norm="batch")), ValueError,
     r"layer_norm: expected one of \('instance', 'layer', None\), got 'batch'"),
    (lambda: (_x(2, 3, 4, 5), dict(final_norm="none")), ValueError, "final_norm: expected one of"),
    (lambda: (_x(2, 3, 4, 5), dict(final_norm=1)), ValueError, "final_norm: expected one of"),
    (lambda: ([], {}), ValueError, "layers: expected at least one layer"),
    (lambda: (_x(0, 3, 4, 5), {}), ValueError, "layers: expected at least one layer"),
    (lambda: (_x(3, 4, 5), {}), ValueError, "layers: expected a 4-D tensor"),
    (lambda: ([_x(3, 4, 5), _x(3, 4)], {}), ValueError, r"layers\[1\]: expected a 3-D tensor"),
    (lambda: ([_x(3, 4, 5), _x(3, 4, 6)], {}), ValueError, r"layers\[1\]: expected shape \(3, 4, 5\)"),
    (lambda: ([_x(3, 4, 5), _x(3, 4, 5), _x(3, 4, 5, dtype=torch.bfloat16)], {}), TypeError,
     r"layers\[2\]: expected dtype float32 \(the dtype of layers\[0\]\), got bfloat16"),
    (lambda: ([_x(3, 4, 5), _x(3, 4, 5, device="meta")], {}), ValueError, r"layers\[1\]: expected device cpu"),
    (lambda: ([_x(3, 4, 5), "layer"], {}), TypeError, r"layers\[1\]: expected a torch.Tensor"),
    (lambda: (torch.ones(2, 3, 4, 5, dtype=torch.int32), {}), TypeError, "layers: expected dtype"),
    (lambda: ((t for t in [_x(3, 4, 5)]), {}), TypeError, "layers: expected a \\[K, B, T, C\\] tensor or a list"),
    (lambda: (_x(2, 0, 4, 5), {}), ValueError, "layers: expected non-empty B, T and C"),
    (lambda: ([_x(3, 4, 0)], {}), ValueError, "layers: expected non-empty B, T and C"),
    (lambda: (_x(2, 3, 4, 5), dict(padding_mask=torch.zeros(3, 5, dtype=torch.bool))), ValueError,
     r"padding_mask: expected shape \(3, 4\)"),
    (lambda: (_x(2, 3, 4, 5), dict(padding_mask=torch.zeros(3, 4))), TypeError, "padding_mask: expected dtype"),
    (lambda: (_x(2, 3, 4, 5), dict(padding_mask=torch.zeros(12, dtype=torch.bool))), ValueError,
     "padding_mask: expected a 2-D tensor"),
    (lambda: (_x(2, 3, 4, 5), dict(padding_mask=torch.zeros(3, 4, dtype=torch.bool, device="meta"))), ValueError,
     "padding_mask: expected device cpu"),
    (lambda: (_x(2, 3, 4, 5), dict(eps=0.0)), ValueError, "eps: expected a positive finite float"),
    (lambda: (_x(2, 3, 4, 5), dict(eps=-1e-5)), ValueError, "eps: expected a positive finite float"),
    (lambda: (_x(2, 3, 4, 5), dict(eps=math.inf)), ValueError, "eps: expected a positive finite float"),
    (lambda: (_x(2, 3, 4, 5), dict(eps=math.nan)), ValueError, "eps: expected a positive finite float"),
    (lambda: (_x(2, 3, 4, 5), dict(eps="1e-5")), TypeError, "eps: expected a positive float"),
]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_bad_input(backend, make, exc, match):
    layers, kw = make()
    with dk.use_backend(backend), pytest.raises(exc, match=match):
        dk.layer_average_targets(layers, **kw)


def test_unavailable_backend_says_why():
    with dk.use_backend("cuda"), pytest.raises(RuntimeError, match="not implemented for this op"):
        dk.layer_average_targets(_x(2, 1, 2, 3))
