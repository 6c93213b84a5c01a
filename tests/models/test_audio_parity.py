"""The audio model against the golden data of the authors' implementation (shared/golden/audio), on the
reference backend and on the default (fused where available) backends, plus 1-D block masking, input
checks and construction tests that need no golden data."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import d2v2_kernels as dk
from d2v2_kernels.models.data2vec2_audio import (WAV2VEC2_SPEC, Data2Vec2Audio, Data2Vec2AudioConfig, alibi_slopes,
                                                 block_mask_1d, block_mask_1d_counts, parse_feature_encoder_spec,
                                                 span_cells)
from d2v2_kernels.parity.audio import audio_parity, fairseq_audio_name_map, load_fairseq_audio_weights

GOLDEN = Path(os.environ.get("D2V2_GOLDEN_DIR", Path(__file__).resolve().parents[2] / ".." / "shared" / "golden"))
AUDIO = GOLDEN / "audio"
needs_golden = pytest.mark.skipif(not (AUDIO / "tensors.safetensors").exists(), reason=f"no golden data at {AUDIO}")

# inputs of the golden run (injected, not outputs to compare)
INPUTS = {"in.source", "mask.precomputed_mask", "mask.ids_keep", "mask.ids_restore", "decoder.noise_full"}


def tiny(**overrides) -> Data2Vec2AudioConfig:
    return Data2Vec2AudioConfig.preset("golden-tiny", **overrides)


@pytest.fixture(scope="module", params=["reference", "auto"])
def parity(request):
    return request.param, audio_parity(str(AUDIO), request.param)


@needs_golden
def test_golden_parity(parity):
    backend, (rows, report) = parity
    assert report.ok, (report.missing, report.unexpected)
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n".join(f"{r.name}: abs {r.max_abs:.3e} rel {r.max_rel:.3e} > {r.kind} {r.tol:.0e}"
                              for r in bad)


@needs_golden
def test_every_golden_tensor_is_compared(parity):
    from safetensors.torch import load_file

    _, (rows, _) = parity
    compared = {r.name.split(" (")[0] for r in rows}
    gold = set(load_file(str(AUDIO / "tensors.safetensors")))
    missing = {k for k in gold - INPUTS if k not in compared}
    assert not missing, missing
    assert len(rows) >= len(gold - INPUTS)


@needs_golden
def test_config_from_golden_matches_preset():
    cfg = json.loads((AUDIO / "config.json").read_text())
    assert Data2Vec2AudioConfig.from_fairseq(cfg["cfg"]) == tiny()
    assert Data2Vec2AudioConfig.from_fairseq(cfg["cfg"]["model"]) == tiny()
    # a setting we do not implement is refused, not ignored
    bad = json.loads(json.dumps(cfg["cfg"]))
    bad["model"]["modalities"]["audio"]["conv_pos_pre_ln"] = True
    bad["model"]["modalities"]["audio"]["ema_local_encoder"] = True
    with pytest.raises(ValueError, match="conv_pos_pre_ln.*ema_local_encoder"):
        Data2Vec2AudioConfig.from_fairseq(bad)


@needs_golden
def test_name_map_covers_student_and_teacher():
    from safetensors.torch import load_file

    weights = load_file(str(AUDIO / "weights.safetensors"))
    teacher = torch.load(AUDIO / "fairseq_checkpoint.pt", map_location="cpu", weights_only=True)["model"]["_ema"]
    model = Data2Vec2Audio(tiny())
    report = load_fairseq_audio_weights(model, weights, teacher)
    assert report.ok and len(report.loaded) == len(weights) + len(teacher)
    assert len(set(report.loaded)) == len(report.loaded)
    sd = model.state_dict()
    for k, v in weights.items():
        assert torch.equal(sd[fairseq_audio_name_map(k)].reshape(v.shape), v), k
    for k in teacher:  # the teacher has no CNN, projection or decoder
        assert fairseq_audio_name_map(k, teacher=True).startswith("teacher.module.")
    assert fairseq_audio_name_map("modality_encoders.AUDIO.local_encoder.conv_layers.0.0.weight", teacher=True) is None
    assert fairseq_audio_name_map("modality_encoders.AUDIO.relative_positional_encoder.2.0.bias") == \
        "encoder.pos_conv.layers.1.bias"
    # an old 4-D ALiBi scale loads too; a stray or misshapen key is reported, not silently dropped
    old = {"modality_encoders.AUDIO.alibi_scale": torch.tensor([0.5, 1.0, 2.0, 3.0]).view(1, 4, 1, 1)}
    load_fairseq_audio_weights(model, old)
    assert torch.equal(model.encoder.alibi.scale.detach(), torch.tensor([0.5, 1.0, 2.0, 3.0]))
    bad = {"modality_encoders.AUDIO.nonsense": torch.zeros(1), "blocks.0.norm1.weight": torch.zeros(3),
           "modality_encoders.AUDIO.alibi_scale": torch.zeros(5)}
    report = load_fairseq_audio_weights(model, bad)
    assert len(report.unexpected) == 3 and report.missing


# --- 1-D block masking ------------------------------------------------------------------------------


def _reference_spans(centres: torch.Tensor, T: int, B: int) -> torch.Tensor:
    """The reference's span construction (compute_block_mask_1d), literally: each centre plus offsets
    i - B // 2 for i < B, clamped to [0, T - 1]."""
    mask = torch.zeros(centres.shape[0], T)
    rows = torch.arange(centres.shape[0]).unsqueeze(1).expand_as(centres)
    for i in range(B):
        mask[rows.flatten(), (centres + i - B // 2).clamp(0, T - 1).flatten()] = 1
    return mask.bool()


@pytest.mark.parametrize("B", [1, 2, 5, 6])
def test_spans_match_the_reference_construction(B):
    g = torch.Generator().manual_seed(B)
    for T in (1, 7, 49, 50):
        centres = torch.randint(0, T, (16, 5), generator=g)
        assert torch.equal(span_cells(centres, T, B), _reference_spans(centres, T, B)), (T, B)
    covered = span_cells(torch.tensor([[0, 10, 48]]), 49, 5)[0].nonzero().flatten().tolist()
    assert covered == [0, 1, 2, 8, 9, 10, 11, 12, 46, 47, 48]


@pytest.mark.parametrize("T", [8, 49, 50, 211, 3124])
@pytest.mark.parametrize("prob,length,adjust,inverse", [(0.5, 5, 0.05, False), (0.55, 5, 0.1, False),
                                                        (0.65, 10, 0.0, False), (0.8, 3, 0.07, True)])
def test_block_mask_1d_exact_equal_counts(T, prob, length, adjust, inverse):
    g = torch.Generator().manual_seed(T)
    mask = block_mask_1d(64, T, prob, length, adjust, inverse=inverse, generator=g)
    _, selected = block_mask_1d_counts(T, prob, length, adjust, inverse)
    masked = T - selected if inverse else selected
    assert mask.dtype == torch.bool and mask.shape == (64, T)
    assert (mask.sum(1) == masked).all()  # every row exactly, no cropping defect
    assert len({tuple(r) for r in mask.tolist()}) > 1 or masked in (0, T)  # rows are independent


def test_block_mask_1d_counts_and_determinism():
    assert block_mask_1d_counts(49, 0.5, 5, 0.05) == (5, 24)  # the golden run: 24 masked of 49
    cfg = tiny()
    assert cfg.num_frames(16000) == 49 and cfg.len_keep(49) == 25
    a = block_mask_1d(8, 49, generator=torch.Generator().manual_seed(3))
    b = block_mask_1d(8, 49, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # spans: with few corrections most masked frames sit in runs (unlike random masking)
    m = block_mask_1d(256, 1000, 0.5, 5, 0.05, generator=torch.Generator().manual_seed(0))
    starts = (m[:, 1:] & ~m[:, :-1]).sum(1).float().mean()
    assert starts < 0.5 * 500 / 2  # random masking would start ~250 runs per row


def test_block_mask_1d_bad_input():
    with pytest.raises(ValueError, match="num_frames"):
        block_mask_1d(2, 0)
    with pytest.raises(ValueError, match="mask_length"):
        block_mask_1d(2, 49, 0.5, 0)
    with pytest.raises(ValueError, match="mask_prob"):
        block_mask_1d(2, 49, 1.5)


# --- the model without golden data ------------------------------------------------------------------


def test_forward_rejects_bad_input():
    torch.manual_seed(0)
    model = Data2Vec2Audio(tiny())
    wav = torch.randn(2, 16000)
    mask = block_mask_1d(4, 49, generator=torch.Generator().manual_seed(0))
    uneven = mask.clone()
    uneven[0, (~uneven[0]).nonzero()[0]] = True  # one row with one more masked frame
    with pytest.raises(ValueError, match="same number of visible"):
        model(wav, uneven)
    with pytest.raises(ValueError, match=r"mask: expected shape \(B\*M, T\) = \(4, 49\)"):
        model(wav, mask[:, :48])
    with pytest.raises(ValueError, match="waveforms"):
        model(wav.unsqueeze(1), mask)
    with pytest.raises(ValueError, match="too short"):
        model(torch.randn(2, 50))
    with pytest.raises(ValueError, match="decoder_noise"):
        model(wav, mask, decoder_noise=torch.zeros(4, 49, 47))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_training_step_with_generated_masks(backend):
    torch.manual_seed(0)
    model = Data2Vec2Audio(tiny())
    wav = torch.randn(3, 16000)
    with dk.use_backend(backend):
        out = model(wav, generator=torch.Generator().manual_seed(1))
        again = model(wav, generator=torch.Generator().manual_seed(1))
        targets = model.teacher_targets(wav)
        feats = model.extract_features(wav)
    assert out.sample_size == 3 * 2 * 24 and out.mask.shape == (6, 49) and (out.mask.sum(1) == 24).all()
    assert torch.equal(out.mask, again.mask) and torch.allclose(out.loss, again.loss)
    assert out.pred.shape == (6, 49, 48) and out.targets.shape == (3, 49, 48) and not out.targets.requires_grad
    assert torch.allclose(targets, out.targets) and feats.shape == (3, 49, 48)
    assert out.cls_pred is None and set(out.losses) == {"regression"}
    (out.loss / out.sample_size).backward()
    grads = {n: p.grad for n, p in model.named_student_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert all(p.grad is None for p in model.teacher.parameters())
    y = out.targets.repeat_interleave(2, 0)[out.mask]
    assert torch.allclose(out.logs["target_var"], torch.sqrt(y.var(dim=0) + 1e-6).mean(), rtol=1e-5)


def test_teacher_tracks_encoder_only_and_alibi_clamp():
    torch.manual_seed(0)
    model = Data2Vec2Audio(tiny())
    teacher_names = set(model.teacher.module.state_dict())
    assert teacher_names == set(model.encoder.state_dict())  # no CNN / projection / decoder in the teacher
    with torch.no_grad():
        model.encoder.alibi.scale.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
        model.encoder.blocks[0].attn.qkv.weight.add_(1.0)
    t0 = model.teacher.module.blocks[0].attn.qkv.weight.clone()
    decay = model.ema_step()
    assert torch.allclose(model.teacher.module.blocks[0].attn.qkv.weight, t0 + (1 - decay), atol=1e-6)
    bias = model.encoder.alibi(5)
    assert bias.shape == (1, 4, 5, 5) and not bias[0, 2].any()  # negative scale clamped to 0
    assert bias[0, 0, 0, 3] == -3 * 0.25 * 1.0 and bias[0, 1, 4, 2] == -2 * 0.0625 * 2.0
    ids = torch.tensor([[4, 0, 2]])  # gathered rows / columns keep the original distances
    assert torch.equal(model.encoder.alibi(5, ids)[0], bias[0][:, ids[0]][:, :, ids[0]])


def test_reference_init_and_presets():
    torch.manual_seed(0)
    model = Data2Vec2Audio(tiny(embed_dim=64, decoder_dim=32))
    qkv = model.encoder.blocks[0].attn.qkv
    assert abs(float(qkv.weight.detach().std()) - 0.02) < 0.003 and not qkv.bias.any()  # init_bert_params
    lin = model.project.linear.weight  # PyTorch's default Linear init (the reference resets it)
    assert lin.abs().max() <= 1 / math.sqrt(32) and lin.abs().max() > 0.1
    conv = model.feature_extractor.layers[1].conv.weight  # Kaiming-normal: std sqrt(2 / fan_in)
    assert abs(float(conv.detach().std()) - math.sqrt(2 / (32 * 8))) < 0.01
    assert torch.equal(model.encoder.alibi.scale.detach(), torch.ones(4))
    groups = model.param_groups(0.01)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(model.encoder.alibi.scale) in no_decay
    base = Data2Vec2AudioConfig.preset("base")
    assert base.feature_encoder_spec == WAV2VEC2_SPEC and base.conv_pos_kernel == 19
    assert base.num_frames(16000) == 49 and base.len_keep(49) == 25
    assert parse_feature_encoder_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]") == WAV2VEC2_SPEC
    with pytest.raises(ValueError, match="unsupported expression"):
        parse_feature_encoder_spec("__import__('os').getcwd()")
    assert alibi_slopes(4) == [0.25, 0.0625, 0.015625, 0.00390625] and len(alibi_slopes(12)) == 12
    with pytest.raises(ValueError):
        tiny(average_top_k_layers=5)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bf16_autocast_step(backend):
    torch.manual_seed(0)
    model = Data2Vec2Audio(tiny())
    wav = torch.randn(2, 16000)
    with dk.use_backend(backend):
        full = model(wav, generator=torch.Generator().manual_seed(3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(wav, generator=torch.Generator().manual_seed(3))
        (out.loss / out.sample_size).backward()
    assert out.pred.dtype == torch.bfloat16 and out.targets.dtype == torch.float32
    assert torch.allclose(out.loss, full.loss, rtol=2e-2)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for _, p in model.named_student_parameters())


def test_dropouts_and_layerdrop_train_only():
    torch.manual_seed(0)
    cfg = tiny(encoder_dropout=0.1, attention_dropout=0.1, post_mlp_drop=0.1, dropout_input=0.1,
               decoder_input_dropout=0.1, layerdrop=0.5)
    model = Data2Vec2Audio(cfg)
    wav = torch.randn(2, 16000)
    out = model(wav, generator=torch.Generator().manual_seed(0))
    (out.loss / out.sample_size).backward()
    assert torch.isfinite(out.loss)
    model.eval()  # no dropout, no layerdrop: deterministic for a given mask and noise generator
    with torch.no_grad():
        a = model(wav, generator=torch.Generator().manual_seed(1))
        b = model(wav, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.loss, b.loss)
