"""The MAE baseline (models/mae.py) and its trainer method: shapes, the reference's random masking, the
loss against a plain re-computation, gradients, fused vs reference backend, a falling loss, init, and
MAEMethod in the training loop (run and resume)."""

import math

import pytest
import torch
import torch.nn.functional as F

import d2v2_kernels as dk
from d2v2_kernels.models.mae import MAE, MAEConfig, patchify, unpatchify
from d2v2_kernels.models.vit import sincos_pos_embed_2d

# 16 px, patch 4 (4 x 4 grid, 16 patches), 3 channels: every part of MAE, fast on 2 cores.
TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, decoder_dim=16,
            decoder_depth=2, decoder_heads=2, mask_ratio=0.75)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast on an idle machine, and avoids OpenMP's stalls (10x
    here) when the 2 shared cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> MAE:
    return MAE(MAEConfig(**{**TINY, **overrides}))


def images(B=4, C=3, size=16, seed=0):
    return torch.randn(B, C, size, size, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_features():
    m = tiny()
    x = images()
    loss, pred, mask = m(x, generator=torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert pred.shape == (4, 16, 4 * 4 * 3) and mask.shape == (4, 16) and mask.dtype == torch.bool
    feats = m.extract_features(x)
    assert feats.shape == (4, 1 + 16, 32)
    # the final norm is applied (LayerNorm (1, 0) at init: zero mean, unit variance per token)
    torch.testing.assert_close(feats.mean(-1), torch.zeros(4, 17), atol=1e-5, rtol=0)
    assert m.pos_embed.shape == (1, 17, 32) and m.decoder_pos_embed.shape == (1, 17, 16)
    names = dict(m.named_parameters())
    for name in ("patch_embed.proj.weight", "cls_token", "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc2.bias",
                 "norm.weight", "decoder_embed.weight", "mask_token", "decoder_blocks.0.norm1.weight",
                 "decoder_norm.bias", "decoder_pred.weight"):
        assert name in names, name
    # patchify is the reference's (row, column, channel) order; unpatchify inverts it
    p = patchify(x, 4)
    assert p.shape == (4, 16, 48)
    torch.testing.assert_close(p[1, 4 + 2].view(4, 4, 3), x[1, :, 4:8, 8:12].permute(1, 2, 0))
    torch.testing.assert_close(unpatchify(p, 4, (4, 4), 3), x)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
def test_random_masking_counts_and_inverse(ratio):
    m = tiny(mask_ratio=ratio)
    T = 16
    K = int(T * (1 - ratio))
    ids_keep, ids_restore, mask = m.random_masking(8, generator=torch.Generator().manual_seed(3))
    assert ids_keep.shape == (8, K) and ids_restore.shape == (8, T)
    assert (mask.sum(1) == T - K).all()
    # ids_restore inverts ids_shuffle = [ids_keep, masked positions]
    ids_shuffle = ids_restore.argsort(1)
    assert torch.equal(ids_shuffle[:, :K], ids_keep)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(T).expand(8, T))
    # the kept positions are exactly the unmasked ones
    visible = torch.zeros(8, T, dtype=torch.bool).scatter_(1, ids_keep, True)
    assert torch.equal(visible, ~mask)
    # reproducible from the generator; another seed, another mask
    again = m.random_masking(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again[0], ids_keep) and torch.equal(again[1], ids_restore)
    other = m.random_masking(8, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other[2], mask)


def test_injected_masks_agree():
    """ids_keep + ids_restore, ids_keep alone, a mask alone, and a permuted ids_keep give one loss."""
    m = tiny()
    x = images()
    ids_keep, ids_restore, mask = m.random_masking(4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, pred, out_mask = m(x, ids_keep, ids_restore)
        assert torch.equal(out_mask, mask)
        for kwargs in (dict(ids_keep=ids_keep), dict(mask=mask), dict(ids_keep=ids_keep.flip(1))):
            loss, p, mk = m(x, **kwargs)
            assert torch.equal(mk, mask)
            torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(p, pred, atol=1e-5, rtol=1e-5)
    uneven = mask.clone()
    uneven[0] = False  # row 0: every patch visible
    with pytest.raises(ValueError, match="same number"):
        m(x, mask=uneven)
    with pytest.raises(ValueError, match="ids_restore given without ids_keep"):
        m(x, ids_restore=ids_restore)


def _ln(x, mod):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def _plain_block(x, blk):
    h = _ln(x, blk.norm1)
    N, L, C = h.shape
    H = blk.attn.num_heads
    qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).view(N, L, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // H), dim=-1)
    o = (a @ v).transpose(1, 2).reshape(N, L, C)
    x = x + F.linear(o, blk.attn.proj.weight, blk.attn.proj.bias)
    h = _ln(x, blk.norm2)
    h = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + h


def _plain_mae(m, x, ids_keep, ids_restore):
    """MAE written out unfused: patch embed as a matmul, torch.gather of the visible tokens, explicit
    attention, the decoder input by scatter, explicit per-patch normalisation and masked mean."""
    cfg = m.config
    B, C, Hh, W = x.shape
    p, D, Dd = cfg.patch_size, cfg.embed_dim, cfg.decoder_dim
    h, w = Hh // p, W // p
    T, K = h * w, ids_keep.shape[1]
    cols = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, T, C * p * p)
    conv = m.patch_embed.proj
    t = cols @ conv.weight.reshape(D, -1).T + conv.bias
    t = t + sincos_pos_embed_2d(D, (h, w))
    t = torch.gather(t, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    t = torch.cat([m.cls_token.expand(B, 1, D), t], 1)  # the CLS position is zero
    for blk in m.blocks:
        t = _plain_block(t, blk)
    t = _ln(t, m.norm)
    y = F.linear(t, m.decoder_embed.weight, m.decoder_embed.bias)
    full = m.mask_token.expand(B, T, Dd).scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, Dd), y[:, 1:])
    y = torch.cat([y[:, :1], full], 1) + torch.cat([torch.zeros(1, Dd), sincos_pos_embed_2d(Dd, (h, w))])
    for blk in m.decoder_blocks:
        y = _plain_block(y, blk)
    pred = F.linear(_ln(y, m.decoder_norm), m.decoder_pred.weight, m.decoder_pred.bias)[:, 1:]
    target = torch.einsum("nchpwq->nhwpqc", x.reshape(B, C, h, p, w, p)).reshape(B, T, p * p * C)
    mean = target.mean(-1, keepdim=True)
    var = (target - mean).square().sum(-1, keepdim=True) / (target.shape[-1] - 1)
    target = (target - mean) / torch.sqrt(var + 1e-6)
    mask = (ids_restore >= K).float()
    per_patch = (pred - target).square().mean(-1)
    return (per_patch * mask).sum() / mask.sum(), pred


def test_loss_matches_plain_recomputation():
    m = tiny()
    x = images(seed=2)
    ids_keep, ids_restore, _ = m.random_masking(4, generator=torch.Generator().manual_seed(6))
    loss, pred, _ = m(x, ids_keep, ids_restore)
    ref_loss, ref_pred = _plain_mae(m, x, ids_keep, ids_restore)
    torch.testing.assert_close(pred, ref_pred, atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    # without the per-patch normalisation: plain pixels
    m.config.norm_pix_loss = False
    mask = ids_restore >= ids_keep.shape[1]
    plain = ((pred - patchify(x, 4)).square().mean(-1) * mask).sum() / mask.sum()
    assert abs(m.forward_loss(x, pred, mask).item() - plain.item()) < 1e-5


def test_gradients_reach_encoder_decoder_and_tokens():
    m = tiny()
    loss, _, _ = m(images(), generator=torch.Generator().manual_seed(7))
    loss.backward()
    for name in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
                 "norm.weight", "decoder_embed.weight", "mask_token", "decoder_blocks.1.attn.proj.weight",
                 "decoder_norm.weight", "decoder_pred.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_reference_backend_matches_fused_default():
    x = images(seed=3)
    m = tiny()
    ids_keep, ids_restore, _ = m.random_masking(4, generator=torch.Generator().manual_seed(8))
    results = []
    for backend in ("auto", "reference"):
        m.zero_grad(set_to_none=True)
        with dk.use_backend(backend):
            loss, pred, _ = m(x, ids_keep, ids_restore)
            loss.backward()
        results.append((loss.detach(), pred.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, p0, g0), (l1, p1, g1) = results
    torch.testing.assert_close(l0, l1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p0, p1, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-5, rtol=1e-4, msg=n)


def test_attention_kernels_agree_and_auto_choice():
    x = images(seed=4)
    masks = tiny().random_masking(4, generator=torch.Generator().manual_seed(9))[:2]
    torch.manual_seed(0)
    a = tiny(attn_impl="sdpa")
    torch.manual_seed(0)
    b = tiny(attn_impl="math")
    with torch.no_grad():
        torch.testing.assert_close(a(x, *masks)[0], b(x, *masks)[0], atol=1e-5, rtol=1e-5)
    attn = tiny().blocks[0].attn
    h = torch.randn(2, 5, 32)
    assert not attn._use_math(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn._use_math(h)
        loss, pred, _ = tiny()(x, *masks)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_init_as_mae():
    m = tiny()
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
            bound = math.sqrt(6 / (mod.in_features + mod.out_features))
            assert mod.weight.abs().max() <= bound, name
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)) and not mod.bias.any(), name
    w = m.patch_embed.proj.weight
    assert w.abs().max() <= math.sqrt(6 / (w.shape[0] + w[0].numel()))
    big = MAE(MAEConfig(**{**TINY, "embed_dim": 256, "decoder_dim": 256, "num_heads": 4, "decoder_heads": 4}))
    assert abs(big.cls_token.std().item() - 0.02) < 0.006 and abs(big.mask_token.std().item() - 0.02) < 0.006
    assert not m.pos_embed[0, 0].any() and not m.decoder_pos_embed[0, 0].any()
    torch.testing.assert_close(m.pos_embed[0, 1:], sincos_pos_embed_2d(32, 4))
    assert not any(n.endswith("pos_embed") for n, _ in m.named_parameters())  # fixed: buffers


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    m = tiny()
    g = torch.Generator().manual_seed(5)
    x = F.interpolate(torch.randn(8, 3, 4, 4, generator=g), size=16, mode="bilinear")  # smooth images
    masks = m.random_masking(8, generator=torch.Generator().manual_seed(10))[:2]
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for _ in range(30):
        loss, _, _ = m(x, *masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # below predicting zero (mean square of a normalised patch: (P - 1) / P = 0.979), and falling
    assert last < 0.95 and last < 0.8 * first, losses


def test_config_validation():
    with pytest.raises(ValueError, match="keeps"):
        MAEConfig(**{**TINY, "mask_ratio": 1.0})
    with pytest.raises(ValueError, match="decoder_dim"):
        MAEConfig(**{**TINY, "decoder_dim": 18})
    with pytest.raises(ValueError, match="attn_impl"):
        MAEConfig(**{**TINY, "attn_impl": "flash"})
    assert MAEConfig.preset("fmnist-small").len_keep == 12


# --- the trainer method -------------------------------------------------------------------------------


def test_mae_method_interface():
    from d2v2_kernels.train.config import make_config
    from d2v2_kernels.train.methods import METHODS, MAEMethod, build_method

    assert METHODS["mae"] is MAEMethod
    cfg = make_config("fmnist-tiny", ["method=mae"])
    method = build_method(cfg)
    assert isinstance(method, MAEMethod) and len(method.model.blocks) == cfg.depth + cfg.prenet_depth
    assert method.model.config.decoder_dim == cfg.mae_decoder_dim
    groups = method.param_groups(0.05)
    params = dict(method.model.named_parameters())
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(groups[0]).isdisjoint(ids(groups[1])) and len(ids(groups[0]) | ids(groups[1])) == len(params)
    no_decay = ids(groups[1])
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.05
    for name, p in params.items():
        expected = p.dim() == 1 or name.endswith(".bias") or name in ("cls_token", "mask_token")
        assert (id(p) in no_decay) == expected, name
    masks = method.make_masks(6, torch.Generator().manual_seed(0))
    assert set(masks) == {"ids_keep", "ids_restore"} and masks["ids_keep"].shape == (6, 12)
    x = torch.rand(6, 1, 28, 28)
    loss, logs = method(x, **masks)
    assert loss.dim() == 0 and all(v.dim() == 0 for v in logs.values())
    feats = method.encode(x)
    assert feats["mean"].shape == (6, 64) and feats["cls"].shape == (6, 64)
    state = method.checkpoint_tensors()
    other = build_method(cfg)
    other.load_checkpoint_tensors(state)
    torch.testing.assert_close(other.encode(x)["mean"], feats["mean"])


def test_mae_method_trains_and_resumes(tmp_path):
    from d2v2_kernels.data.images import find_fashion_mnist
    from d2v2_kernels.train.config import make_config
    from d2v2_kernels.train.loop import train
    from d2v2_kernels.train.methods import build_method

    try:
        find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST missing")
    base = ["method=mae", "progress=false", f"out_dir={tmp_path}", "batch_size=32"]
    first = train(make_config("fmnist-tiny", base + ["max_steps=3"]), build_method)
    assert first["steps"] == 3 and all(math.isfinite(v) for v in first["losses"])
    assert (tmp_path / "step_00000003" / "student.safetensors").exists()
    resumed = train(make_config("fmnist-tiny", base + ["max_steps=5"]), build_method, resume=True)
    assert resumed["steps"] == 5 and resumed["losses"][:3] == first["losses"]
    full = train(make_config("fmnist-tiny", ["method=mae", "progress=false", f"out_dir={tmp_path / 'full'}",
                                             "batch_size=32", "max_steps=5"]), build_method)
    assert full["losses"] == resumed["losses"]  # the resumed run repeats the uninterrupted one exactly
