"""Padding masks in the audio model: sample -> frame padding, invariance to the padded content, padded
utterances against the same utterances alone, the loss's count, the unpadded path unchanged, input
checks and backward. golden-tiny model: 16000 samples -> 49 frames, 2 clones."""

import pytest
import torch

import d2v2_kernels as dk
from d2v2_kernels.models import masking
from d2v2_kernels.models.data2vec2_audio import (Data2Vec2Audio, Data2Vec2AudioConfig, block_mask_1d,
                                                 conv_output_lengths, frame_padding_mask)
from d2v2_kernels.ops.loss import masked_regression_loss_reference

L = 16000  # 49 frames
N1 = 9000  # utterance 1's valid samples: 28 frames
T, T1 = 49, 28


def tiny(**overrides) -> Data2Vec2AudioConfig:
    return Data2Vec2AudioConfig.preset("golden-tiny", **overrides)


def make_model(seed: int = 0) -> Data2Vec2Audio:
    torch.manual_seed(seed)
    model = Data2Vec2Audio(tiny())
    # a teacher that differs from the student, and ALiBi scales that differ per head
    with torch.no_grad():
        model.encoder.alibi.scale.copy_(torch.tensor([0.5, 1.0, 2.0, 0.0]))
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def padded_batch(garbage: str = "randn", n1: int = N1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two waveforms of L samples; utterance 1 has n1 valid samples, then `garbage`."""
    wav = torch.randn(2, L, generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1, n1:] = True
    fill = {"randn": lambda n: 100 * torch.randn(n, generator=torch.Generator().manual_seed(1)),
            "const": lambda n: torch.full((n,), 1e4),
            "nan": lambda n: torch.full((n,), float("nan"))}[garbage]
    wav[1, n1:] = fill(L - n1)
    return wav, pad


def test_frame_padding_follows_the_reference_formula():
    cfg = tiny()
    n = torch.arange(0, 20000, 7)
    ours = conv_output_lengths(n, cfg.feature_encoder_spec)
    ref = n.clone().double()  # fairseq's get_feat_extract_output_lengths, in floats
    for _, k, s in cfg.feature_encoder_spec:
        ref = torch.floor((ref - k) / s + 1)
    assert torch.equal(ours, ref.long())
    assert all(int(ours[i]) == cfg.num_frames(int(v)) for i, v in enumerate(n) if int(ours[i]) >= 1)
    _, pad = padded_batch()
    frames = frame_padding_mask(pad, cfg.feature_encoder_spec)
    assert frames.shape == (2, T) and not frames[0].any()
    assert not frames[1, :T1].any() and frames[1, T1:].all()
    assert cfg.num_frames(N1) == T1


@pytest.mark.parametrize("garbage", ["const", "nan"])
def test_padded_content_does_not_matter(garbage):
    model = make_model()
    wav_a, pad = padded_batch("randn")
    wav_b, _ = padded_batch(garbage)
    a = model(wav_a, padding_mask=pad, generator=torch.Generator().manual_seed(1))
    b = model(wav_b, padding_mask=pad, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.mask, b.mask) and a.sample_size == b.sample_size
    assert torch.isfinite(a.loss) and torch.equal(a.loss, b.loss)
    valid = ~frame_padding_mask(pad, tiny().feature_encoder_spec).repeat_interleave(2, 0)
    assert torch.equal(a.pred[valid], b.pred[valid])
    assert torch.equal(a.targets, b.targets) and not a.targets[1, T1:].any()  # padded targets are 0


def test_padded_utterance_matches_it_alone():
    """The teacher (and the unmasked student) on a padded utterance's valid frames = on the utterance
    alone, trimmed. Exact up to float rounding: valid frames only see valid samples in the CNN, padded
    frames are zeroed before every positional conv layer (the convs' own zero padding of the trimmed
    utterance), padded keys get no attention and the instance norm skips them."""
    model = make_model()
    wav, pad = padded_batch()
    padded = model.teacher_targets(wav, pad)
    alone1 = model.teacher_targets(wav[1:, :N1])
    alone0 = model.teacher_targets(wav[:1])
    assert alone1.shape == (1, T1, 48)
    torch.testing.assert_close(padded[1, :T1], alone1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], alone0[0], atol=1e-5, rtol=1e-5)
    feats = model.extract_features(wav, pad)
    torch.testing.assert_close(feats[1, :T1], model.extract_features(wav[1:, :N1])[0], atol=1e-5, rtol=1e-5)
    # and they differ without the padding mask (the pads are attended to / normalised over)
    assert not torch.allclose(model.teacher_targets(wav.masked_fill(pad, 0))[1, :T1], alone1[0], atol=1e-3)


def test_student_ignores_visible_padded_frames():
    """The masked student encoder: the padded utterance's kept valid frames give what the utterance
    alone gives with the same kept frames, whatever padded frames are kept besides."""
    model = make_model()
    wav, pad = padded_batch()
    spec = tiny().feature_encoder_spec
    frames = frame_padding_mask(pad, spec)
    g = torch.Generator().manual_seed(2)
    keep_alone = torch.zeros(1, T1, dtype=torch.bool)
    keep_alone[0, torch.randperm(T1, generator=g)[:14]] = True
    keep = torch.zeros(2, T, dtype=torch.bool)
    keep[0, torch.randperm(T, generator=g)[:20]] = True
    keep[1, :T1] = keep_alone[0]
    keep[1, T1 + torch.randperm(T - T1, generator=g)[:6]] = True  # 6 visible padded frames
    ids_keep, _ = masking.mask_to_ids(~keep)  # stable: row 1's 14 valid frames come first
    ids_alone, _ = masking.mask_to_ids(~keep_alone)
    with torch.no_grad():
        out = model.encoder(model.local_features(wav.masked_fill(pad, 0)), ~keep, ids_keep, padding_mask=frames)
        alone = model.encoder(model.local_features(wav[1:, :N1]), ~keep_alone, ids_alone)
    assert out.shape == (2, 20, 48)
    torch.testing.assert_close(out[1, :14], alone[0], atol=1e-5, rtol=1e-5)


def test_sample_size_and_loss_skip_padded_frames():
    model = make_model()
    wav, pad = padded_batch()
    mask = block_mask_1d(4, T, generator=torch.Generator().manual_seed(3))
    out = model(wav, mask, padding_mask=pad, generator=torch.Generator().manual_seed(4))
    frames = frame_padding_mask(pad, tiny().feature_encoder_spec).repeat_interleave(2, 0)
    counted = mask & ~frames
    assert out.sample_size == int(counted.sum()) < 4 * 24  # some masked frames are padding
    assert torch.equal(out.mask, mask)  # the mask itself is as drawn: equal counts per row
    expected = masked_regression_loss_reference(out.pred, out.targets, counted, clones=2,
                                                scale=tiny().scale, reduction="sum")
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_no_padded_frame_is_the_unpadded_path(backend):
    model = make_model()
    wav = torch.randn(2, L, generator=torch.Generator().manual_seed(5))
    tail = torch.zeros(2, L, dtype=torch.bool)
    tail[1, L - 100:] = True  # 15900 samples still give 49 frames: no frame is padded
    with dk.use_backend(backend):
        ref = model(wav, generator=torch.Generator().manual_seed(6))
        for pad in (torch.zeros(2, L, dtype=torch.bool), tail):
            out = model(wav, padding_mask=pad, generator=torch.Generator().manual_seed(6))
            assert torch.equal(out.loss, ref.loss) and torch.equal(out.pred, ref.pred)
            assert torch.equal(out.targets, ref.targets) and out.sample_size == ref.sample_size
            assert all(torch.equal(out.logs[k], ref.logs[k]) for k in ref.logs)


def test_bad_padding_masks():
    model = make_model()
    wav, pad = padded_batch()
    with pytest.raises(ValueError, match="padding_mask: expected a bool tensor"):
        model(wav, padding_mask=pad.float())
    with pytest.raises(ValueError, match="padding_mask: expected a bool tensor"):
        model(wav, padding_mask=pad.tolist())
    with pytest.raises(ValueError, match=r"padding_mask: expected shape \(2, 16000\)"):
        model(wav, padding_mask=pad[:, :-1])
    with pytest.raises(ValueError, match=r"padding_mask: expected shape"):
        model.teacher_targets(wav, pad[:1])
    left = pad.flip(1)  # left padding
    with pytest.raises(ValueError, match="padding_mask: expected right padding"):
        model(wav, padding_mask=left)
    empty = pad.clone()
    empty[1] = True
    with pytest.raises(ValueError, match=r"padding_mask: utterance\(s\) \[1\] have no valid frame"):
        model(wav, padding_mask=empty)
    short = torch.zeros_like(pad)
    short[0, 300:] = True  # 300 samples: too few for one frame of this CNN
    with pytest.raises(ValueError, match=r"utterance\(s\) \[0\] have no valid frame"):
        model.extract_features(wav, short)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_backward_with_padding(backend):
    model = make_model()
    # utterance 1: 3 valid frames, all masked in its clones, so their visible frames are all padding
    n1 = 1000
    wav, pad = padded_batch("nan", n1=n1)  # NaN padding: backward must not see it either
    t1 = tiny().num_frames(n1)
    assert t1 == 3
    mask = block_mask_1d(4, T, generator=torch.Generator().manual_seed(7))
    for row in (2, 3):
        need = (~mask[row, :t1]).nonzero().flatten()
        mask[row, need] = True
        free = mask[row, t1:].nonzero().flatten()[: len(need)] + t1
        mask[row, free] = False  # keep the count
    assert (mask.sum(1) == 24).all() and mask[2:, :t1].all()
    with dk.use_backend(backend):
        out = model(wav, mask, padding_mask=pad, generator=torch.Generator().manual_seed(8))
        (out.loss / out.sample_size).backward()
    assert torch.isfinite(out.loss) and out.sample_size == int(mask[:2].sum()) + 2 * t1
    grads = {n: p.grad for n, p in model.named_student_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert all(p.grad is None for p in model.teacher.parameters())
