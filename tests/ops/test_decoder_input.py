"""decoder_input: every fused backend against the reference, forward and backward, the contract's odd
shapes, property tests, gradcheck, registration checks, the in-kernel noise (Philox known answers,
agreement across backends, statistics, reproducibility) and bad input."""

import math

import pytest
import torch
from conftest import TOL, fused_backends
from hypothesis import given
from hypothesis import strategies as st

import d2v2_kernels as dk
from d2v2_kernels.ops.decoder_input import (
    _decoder_input_op,
    decoder_input_reference,
    draw_seed,
    philox4x32_10_reference,
    philox_normal4_reference,
    philox_normal_reference,
    reference_noise,
)

BACKENDS = fused_backends()
ALL_BACKENDS = ["reference"] + BACKENDS


def make_ids(N, T, dtype=torch.int64):
    return torch.rand(N, T).argsort(1).to(dtype)


def check_against_reference(backend, x_vis, ids, noise, dtype):
    x = x_vis.to(dtype).detach().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    noise = noise.to(dtype)
    ref = decoder_input_reference(x_ref, ids, noise)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    with dk.use_backend(backend):
        out = dk.decoder_input(x, ids, noise=noise)
    out.backward(grad)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])  # a copy: exact in practice
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])


SHAPES = [  # N, T, K, C
    (2, 196, 39, 96),  # image grid, 39 visible of 196 (C cut down for the interpreter)
    (2, 50, 25, 64),  # audio/text-like: half masked
    (3, 7, 4, 37),  # C not a multiple of any block
    (2, 9, 0, 16),  # K = 0: all noise, empty gradient
    (2, 9, 9, 16),  # K = T: no noise
    (4, 1, 1, 8),  # T = 1, visible
    (4, 1, 0, 8),  # T = 1, masked
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,T,K,C", SHAPES)
def test_matches_reference(backend, dtype, N, T, K, C):
    if backend == "triton" and dtype == torch.float16:
        pytest.skip("fp16 is covered by the cpu backend; keep interpreter time down")
    check_against_reference(backend, torch.randn(N, K, C), make_ids(N, T), torch.randn(N, T - K, C), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_data2vec2_image_shape(dtype):
    """ViT-B images: T=196 patches, 39 visible, C=768 (8 rows of the M=16-clone batch)."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    N, T, K, C = 8, 196, 39, 768
    check_against_reference("cpu", torch.randn(N, K, C), make_ids(N, T), torch.randn(N, T - K, C), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_int32_ids(backend):
    N, T, K, C = 3, 12, 5, 20
    x_vis = torch.randn(N, C, K).transpose(1, 2)  # rows strided in C
    noise = torch.randn(T - K, N, C).transpose(0, 1)  # sample stride smaller than row stride
    ids = torch.rand(T, N).argsort(0).t().to(torch.int32)  # a transposed (non-contiguous) permutation
    assert not x_vis.is_contiguous() and not noise.is_contiguous() and not ids.is_contiguous()
    check_against_reference(backend, x_vis, ids, noise, torch.float32)


@given(
    N=st.integers(1, 4),
    T=st.integers(1, 24),
    visible=st.floats(0.0, 1.0),
    C=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    int32_ids=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_cpu(N, T, visible, C, dtype, int32_ids, seed):
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    torch.manual_seed(seed)
    K = round(visible * T)
    ids = make_ids(N, T, torch.int32 if int32_ids else torch.int64)
    x_vis = torch.randn(N, K, C, dtype=dtype)
    check_against_reference("cpu", x_vis, ids, torch.randn(N, T - K, C), dtype)
    # The in-kernel noise is the reference noise of the same seed.
    with dk.use_backend("cpu"):
        drawn = dk.decoder_input(x_vis, ids, 0.25, generator=torch.Generator().manual_seed(seed))
    seed_tensor = draw_seed(torch.Generator().manual_seed(seed))
    noise = reference_noise(seed_tensor, N, T - K, C, 0.25, dtype, "cpu")
    # The noise is computed in fp32 on every backend: fp32 tolerance for fp64 too (log/cos rounding).
    tol = TOL[torch.float32] if dtype == torch.float64 else TOL[dtype]
    torch.testing.assert_close(drawn, decoder_input_reference(x_vis, ids, noise), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("drawn", [False, True])
def test_gradcheck_fp64(backend, drawn):
    N, T, K, C = 2, 6, 3, 5
    x_vis = torch.randn(N, K, C, dtype=torch.float64, requires_grad=True)
    ids = make_ids(N, T)
    noise = None if drawn else torch.randn(N, T - K, C, dtype=torch.float64)

    def f(x):  # a fresh generator per call: the same noise at every evaluation
        return dk.decoder_input(x, ids, 0.1, noise=noise, generator=torch.Generator().manual_seed(5))

    with dk.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x_vis,))


@pytest.mark.parametrize("with_noise", [True, False])
def test_opcheck_cpu(with_noise):
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    N, T, K, C = 2, 7, 3, 10
    x_vis = torch.randn(N, K, C, requires_grad=True)
    ids = make_ids(N, T)
    noise = torch.randn(N, T - K, C) if with_noise else None
    seed = None if with_noise else torch.tensor(123456789012345, dtype=torch.int64)
    torch.library.opcheck(_decoder_input_op, (x_vis, ids, noise, seed, 0.5, "cpu"))


def test_torch_compile_fullgraph_cpu():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    N, T, K, C = 2, 9, 4, 24
    x_vis = torch.randn(N, K, C)
    ids = make_ids(N, T)
    noise = torch.randn(N, T - K, C)
    weight = torch.randn(N, T, C)

    def loss_given(x):
        return (dk.decoder_input(x, ids, noise=noise) * weight).sum()

    def drawn(x):
        return dk.decoder_input(x, ids, 0.5)

    with dk.use_backend("cpu"):
        compiled = torch.compile(loss_given, fullgraph=True, backend="inductor")
        x1 = x_vis.clone().requires_grad_(True)
        x2 = x_vis.clone().requires_grad_(True)
        compiled(x1).backward()
        loss_given(x2).backward()
        torch.testing.assert_close(x1.grad, x2.grad)

    visible = ids < K
    for backend in ["reference", "cpu"]:
        with dk.use_backend(backend):
            compiled_drawn = torch.compile(drawn, fullgraph=True, backend="inductor")
            torch.manual_seed(3)
            a = compiled_drawn(x_vis)
            torch.manual_seed(3)
            b = compiled_drawn(x_vis)
            c = compiled_drawn(x_vis)
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # reseeding reproduces
        assert not torch.equal(a[~visible], c[~visible])  # the seed is drawn per call, not baked into the graph
        torch.testing.assert_close(a[visible], x_vis[torch.arange(N)[:, None].expand(N, T)[visible], ids[visible]])


# --- the in-kernel noise -----------------------------------------------------------------------------


def test_philox_known_answers():
    """Random123's Philox4x32-10 known-answer vectors (kat_vectors)."""
    def words(*v):
        return [torch.tensor([x], dtype=torch.int64) for x in v]

    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        got = philox4x32_10_reference(*words(*counter), *key)
        assert [int(g) for g in got] == list(expected)


def _normal4_from_first_principles(seed: int, group: int) -> list[float]:
    """The four normals of Philox group `group` under `seed`, in double precision: counter (g_lo, g_hi, 0, 0),
    key (seed_lo, seed_hi); Box-Muller's cos and sin branches on words (0, 1), then on words (2, 3)."""
    w = [torch.tensor([x]) for x in (group & 0xFFFFFFFF, group >> 32, 0, 0)]
    words = [int(v) for v in philox4x32_10_reference(*w, seed & 0xFFFFFFFF, seed >> 32)]
    out = []
    for wu, wv in (words[0:2], words[2:4]):
        u, v = ((wu >> 9) + 0.5) * 2.0**-23, ((wv >> 9) + 0.5) * 2.0**-22 - 1.0
        r = math.sqrt(-2.0 * math.log(u))
        out += [r * math.cos(math.pi * v), r * math.sin(math.pi * v)]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drawn_noise_same_on_every_backend(dtype):
    """cpu, triton and the reference draw the same noise from one seed (up to log/cos/sin rounding)."""
    # C > 1024: two channel blocks in the Triton kernel; C % 4 == 1: Philox groups straddle noise rows.
    N, T, K, C = 2, 6, 2, 1101
    x_vis = torch.randn(N, K, C, dtype=dtype)
    ids = make_ids(N, T)
    outs = {}
    for backend in ALL_BACKENDS:
        with dk.use_backend(backend):
            outs[backend] = dk.decoder_input(x_vis, ids, 1.0, generator=torch.Generator().manual_seed(11))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
    for backend in BACKENDS:
        torch.testing.assert_close(outs[backend], outs["reference"], **tol)
    if {"cpu", "triton"} <= set(BACKENDS):
        torch.testing.assert_close(outs["triton"], outs["cpu"], **tol)
    # Spot checks from first principles: element (n, j, c) of the noise is number i = (n * (T - K) + j) * C + c
    # of the stream, lane i % 4 of Philox group i // 4; the first and last channels of a row sit in groups
    # shared with the neighbouring rows.
    seed = int(draw_seed(torch.Generator().manual_seed(11)))
    masked_positions = (ids >= K).nonzero().tolist()
    for (n, t), c in zip(masked_positions, [0, 1100, 517, 1024, 1, 1099, 2, 3]):
        i = (n * (T - K) + int(ids[n, t]) - K) * C + c
        z = _normal4_from_first_principles(seed, i // 4)[i % 4]
        for backend, out in outs.items():
            assert out[n, t, c].item() == pytest.approx(z, abs=1e-5 if dtype == torch.float32 else 2e-2), backend


def test_philox_normal4_reference_lanes():
    """Each group's four normals: the first-principles values, and philox_normal_reference's lanes."""
    seed = 0x0123456789ABCDEF
    groups = torch.tensor([0, 1, 12345, 2**32 - 1, 2**32, 0xFEDCBA9876543], dtype=torch.int64)
    z4 = philox_normal4_reference(torch.tensor(seed), groups)
    assert z4.shape == (len(groups), 4) and z4.dtype == torch.float32
    for row, g in zip(z4.tolist(), groups.tolist()):
        assert row == pytest.approx(_normal4_from_first_principles(seed, g), abs=2e-6)
    offsets = (4 * groups[:, None] + torch.arange(4)).flatten()
    assert torch.equal(philox_normal_reference(seed, offsets), z4.flatten())
    # reference_noise (one group per four numbers) is the per-number function on the flat offsets.
    noise = reference_noise(seed, 3, 5, 7, 0.5, torch.float32, "cpu")
    assert torch.equal(noise.flatten(), philox_normal_reference(seed, torch.arange(3 * 5 * 7)) * 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drawn_noise_statistics(backend):
    noise_std = 0.01
    if backend == "cpu":
        N, T, C = 4, 512, 512  # 1M values
    else:  # the interpreter: keep it small
        N, T, C = 2, 64, 512
    ids = torch.arange(T).expand(N, T)  # K = 0 and the identity: the output is the noise, in stream order
    with dk.use_backend(backend):
        out = dk.decoder_input(torch.randn(N, 0, C), ids, noise_std).double()
    n = out.numel()
    assert abs(out.mean().item()) < 5 * noise_std / math.sqrt(n)
    assert abs(out.std().item() / noise_std - 1) < 5 * math.sqrt(0.5 / n) + 1e-3
    z = out.flatten() / noise_std
    tail = (z.abs() > 3).double().mean().item()  # 0.0027 for N(0, 1)
    assert abs(tail - 0.0027) < 5 * math.sqrt(0.0027 / n)
    assert z.abs().max() < 6  # sqrt(-2 ln 2^-24) = 5.77 bounds Box-Muller with 23-bit uniforms
    # Neighbouring elements are uncorrelated.
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5 / math.sqrt(n)
    # Each lane of the Philox groups (4 consecutive numbers, from one call) is N(0, 1) on its own, and the
    # four lanes of a group are uncorrelated: cos and sin branches of one pair, and the two pairs.
    lanes = z.view(-1, 4).t()
    groups = lanes.shape[1]
    assert (lanes.mean(1).abs() < 5 / math.sqrt(groups)).all()
    assert ((lanes.std(1) - 1).abs() < 5 * math.sqrt(0.5 / groups) + 1e-3).all()
    corr = torch.corrcoef(lanes)
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 5 / math.sqrt(groups)
    # Radius and angle of each Box-Muller pair: z0^2 + z1^2 is chi^2 with 2 degrees of freedom (mean 2),
    # independent of the other pair's.
    r01, r23 = lanes[0] ** 2 + lanes[1] ** 2, lanes[2] ** 2 + lanes[3] ** 2
    assert abs(r01.mean().item() - 2) < 5 * 2 / math.sqrt(groups)
    assert abs(torch.corrcoef(torch.stack([r01, r23]))[0, 1].item()) < 5 / math.sqrt(groups)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_drawn_noise_reproducibility(backend):
    N, T, K, C = 2, 8, 3, 16
    x_vis = torch.randn(N, K, C)
    ids = make_ids(N, T)
    masked = ids >= K
    with dk.use_backend(backend):
        torch.manual_seed(7)
        a = dk.decoder_input(x_vis, ids)
        b = dk.decoder_input(x_vis, ids)  # the next seed
        torch.manual_seed(7)
        c = dk.decoder_input(x_vis, ids)  # reseeded: a again
        g = dk.decoder_input(x_vis, ids, generator=torch.Generator().manual_seed(7))
        state = torch.get_rng_state()
        h = dk.decoder_input(x_vis, ids, generator=torch.Generator().manual_seed(7))
        assert torch.equal(torch.get_rng_state(), state)  # a generator leaves the global one alone
        zero = dk.decoder_input(x_vis, ids, 0.0)
        given = dk.decoder_input(x_vis, ids, noise=torch.zeros(N, T - K, C))
    assert torch.equal(a, c)
    assert not torch.equal(a[masked], b[masked])
    assert torch.equal(g, h) and not torch.equal(g[masked], b[masked])
    assert torch.equal(a[~masked], b[~masked])
    assert torch.count_nonzero(zero[masked]) == 0 and torch.equal(zero, given)


def test_explicit_noise_consumes_no_randomness():
    x_vis, ids = torch.randn(2, 3, 4), make_ids(2, 5)
    for backend in ALL_BACKENDS:
        state = torch.get_rng_state()
        with dk.use_backend(backend):
            dk.decoder_input(x_vis, ids, noise=torch.zeros(2, 2, 4))
        assert torch.equal(torch.get_rng_state(), state)


def test_philox_normal_reference_offsets_above_2_34():
    """The group's high word feeds counter word 1: offsets 2^34 apart (groups 2^32 apart) differ."""
    offsets = torch.tensor([5, 5 + 2**34, 5 + 2**40], dtype=torch.int64)
    z = philox_normal_reference(torch.tensor(9, dtype=torch.int64), offsets)
    assert len(set(z.tolist())) == 3
    assert torch.equal(z, philox_normal_reference(9, offsets))


# --- bad input ---------------------------------------------------------------------------------------


def _call(**overrides):
    args = dict(x_vis=torch.randn(2, 3, 4), ids_restore=make_ids(2, 5), noise_std=0.01)
    args.update(overrides)
    kwargs = {k: args.pop(k) for k in ("noise", "generator") if k in args}
    return dk.decoder_input(args["x_vis"], args["ids_restore"], args["noise_std"], **kwargs)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(x_vis=[[1.0]]), TypeError, "x_vis"),
        (dict(x_vis=torch.randn(3, 4)), ValueError, "x_vis"),
        (dict(x_vis=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "x_vis"),
        (dict(x_vis=torch.randn(0, 3, 4), ids_restore=make_ids(0, 5)), ValueError, "x_vis"),
        (dict(x_vis=torch.randn(2, 3, 0)), ValueError, "x_vis"),
        (dict(x_vis=torch.randn(2, 6, 4)), ValueError, "x_vis: expected K <= T"),
        (dict(ids_restore=make_ids(2, 5).float()), TypeError, "ids_restore"),
        (dict(ids_restore=make_ids(2, 5)[None]), ValueError, "ids_restore"),
        (dict(ids_restore=make_ids(3, 5)), ValueError, "ids_restore"),
        (dict(ids_restore=torch.zeros(2, 0, dtype=torch.int64), x_vis=torch.randn(2, 0, 4)), ValueError,
         "ids_restore"),
        (dict(ids_restore=make_ids(2, 5).to("meta")), ValueError, "ids_restore"),
        (dict(noise_std=-0.1), ValueError, "noise_std"),
        (dict(noise_std=float("nan")), ValueError, "noise_std"),
        (dict(noise_std=float("inf")), ValueError, "noise_std"),
        (dict(noise_std="0.1"), TypeError, "noise_std"),
        (dict(noise_std=True), TypeError, "noise_std"),
        (dict(noise=torch.randn(2, 3, 4)), ValueError, "noise"),
        (dict(noise=torch.randn(2, 2)), ValueError, "noise"),
        (dict(noise=torch.randn(2, 2, 4, dtype=torch.float64)), TypeError, "noise"),
        (dict(noise=torch.randn(2, 2, 4, device="meta")), ValueError, "noise"),
        (dict(noise=[0.0]), TypeError, "noise"),
        (dict(generator=123), TypeError, "generator"),
    ],
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_input(backend, overrides, error, match):
    with dk.use_backend(backend), pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "ids,match",
    [
        (torch.tensor([[0, 1, 2, 3, 5], [4, 3, 2, 1, 0]]), r"ids_restore: expected indices in \[0, 5\), found 5"),
        (torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, -1]]), r"ids_restore: expected indices in \[0, 5\), found -1"),
        (torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 1]]), "ids_restore: expected each row to be a permutation"),
    ],
)
@pytest.mark.parametrize("with_noise", [True, False])
def test_bad_ids_values(backend, ids, match, with_noise):
    noise = torch.randn(2, 2, 4) if with_noise else None
    with dk.use_backend(backend), pytest.raises(ValueError, match=match):
        dk.decoder_input(torch.randn(2, 3, 4), ids, noise=noise)


def test_registered():
    assert "decoder_input" in dk.available_backends("cpu")
