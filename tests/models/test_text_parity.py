"""The text model against the golden data of the authors' implementation (shared/golden/text), on the
reference backend and on the default (fused where available) backends, plus padding, bad-input and
training-step checks that need no golden data."""

import json
import os
from pathlib import Path

import pytest
import torch

import d2v2_kernels as dk
from d2v2_kernels.models.data2vec2_text import (Data2Vec2Text, Data2Vec2TextConfig, make_positions,
                                                reference_mask_seed)
from d2v2_kernels.parity.text import fairseq_text_name_map, load_fairseq_text_weights, text_parity

GOLDEN = Path(os.environ.get("D2V2_GOLDEN_DIR", Path(__file__).resolve().parents[2] / ".." / "shared" / "golden"))
TEXT = GOLDEN / "text"
needs_golden = pytest.mark.skipif(not (TEXT / "tensors.safetensors").exists(), reason=f"no golden data at {TEXT}")

# inputs of the golden run (injected, not outputs to compare); in.id is checked through the mask-seed rows
INPUTS = {"in.source", "in.id", "in.padding_mask", "mask.ids_keep", "mask.ids_restore", "decoder.noise_full"}


def tiny(**overrides) -> Data2Vec2Text:
    torch.manual_seed(0)
    return Data2Vec2Text(Data2Vec2TextConfig.preset("golden-tiny", **overrides))


def tokens(B=2, T=32, vocab=100, generator_seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randint(4, vocab - 1, (B, T), generator=g)  # no specials, no pad


# --- golden parity ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["reference", "auto"])
def parity(request):
    return request.param, text_parity(str(TEXT), request.param)


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
    names = [r.name for r in rows]
    gold = set(load_file(str(TEXT / "tensors.safetensors")))
    compared = {k for k in gold if any(n == k or n.startswith(k + " ") for n in names)}
    assert gold - INPUTS - compared == set()


@needs_golden
def test_config_from_golden_matches_preset():
    cfg = json.loads((TEXT / "config.json").read_text())
    preset = Data2Vec2TextConfig.preset("golden-tiny")
    assert Data2Vec2TextConfig.from_fairseq(cfg["cfg"], vocab_size=100) == preset
    assert Data2Vec2TextConfig.from_fairseq(cfg["cfg"]["model"], vocab_size=100) == preset
    bad = json.loads(json.dumps(cfg["cfg"]))
    bad["model"]["modalities"]["text"]["prenet_depth"] = 1
    with pytest.raises(ValueError, match="prenet"):
        Data2Vec2TextConfig.from_fairseq(bad, vocab_size=100)


@needs_golden
def test_name_map_and_checkpoint_loading():
    from safetensors.torch import load_file

    weights = load_file(str(TEXT / "weights.safetensors"))
    ckpt = torch.load(TEXT / "fairseq_checkpoint.pt", map_location="cpu", weights_only=True)
    model = tiny()
    # the checkpoint's whole `model` entry: its `_ema` (block-relative names) becomes the teacher
    report = load_fairseq_text_weights(model, ckpt["model"])
    assert report.ok and len(report.loaded) == len(weights) + len(ckpt["model"]["_ema"])
    state = model.state_dict()
    for k, v in weights.items():
        assert torch.equal(state[fairseq_text_name_map(k)], v), k
    for k, v in ckpt["model"]["_ema"].items():
        assert torch.equal(state[fairseq_text_name_map(k, teacher=True)], v), k
    assert fairseq_text_name_map("0.attn.qkv.weight", teacher=True) == "teacher.module.blocks.0.attn.qkv.weight"
    assert fairseq_text_name_map("modality_encoders.TEXT.decoder.proj.2.bias") == "decoder.proj.2.bias"
    # a stray or misshapen key is reported, not silently dropped; what got nothing is listed
    bad = {"modality_encoders.TEXT.nonsense": torch.zeros(1), "blocks.0.norm1.weight": torch.zeros(3),
           "_ema": {"0.norm1.weight": torch.zeros(3)}}
    report = load_fairseq_text_weights(model, bad)
    assert len(report.unexpected) == 3 and "encoder.blocks.1.norm1.weight" in report.missing


def test_reference_mask_seed_matches_golden_meta():
    # the values recorded by the golden run (config.json golden.meta.text_random_masking)
    seed, clone_ids = reference_mask_seed(1, 0, torch.tensor([3, 8]), 2)
    assert clone_ids == [3, 7385056259, 8, 7385056264] and seed == 547072


# --- padding --------------------------------------------------------------------------------------------


def test_positions_skip_padding():
    src = torch.tensor([[0, 5, 6, 2, 1, 1]])
    assert make_positions(src, 1).tolist() == [[2, 3, 4, 5, 1, 1]]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_padding_does_not_leak(backend):
    """Right-padding a sequence changes neither the teacher's targets (attention key padding, instance
    norm over real tokens only) nor the student's features at its real tokens; masked pads are not counted."""
    model = tiny()
    model.eval()
    real = tokens(1, 20)
    padded = torch.cat([real, torch.full((1, 12), 1)], dim=1)  # pad_idx 1
    with dk.use_backend(backend):
        y_real = model.teacher_targets(real)
        y_pad = model.teacher_targets(padded)
        f_real = model.extract_features(real)
        f_pad = model.extract_features(padded)
        # two clones, 16 visible real tokens each; every pad masked
        g = torch.Generator().manual_seed(0)
        vis = torch.stack([torch.randperm(20, generator=g)[:16] for _ in range(2)])
        mask = torch.ones(2, 32, dtype=torch.bool)
        mask.scatter_(1, vis, False)
        out = model(padded, mask, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(y_pad[:, :20], y_real, atol=1e-5, rtol=1e-5)
    assert not y_pad[:, 20:].any()
    torch.testing.assert_close(f_pad[:, :20], f_real, atol=1e-5, rtol=1e-5)
    counted = mask.clone()
    counted[:, 20:] = False
    assert out.sample_size == int(counted.sum()) == 2 * 4
    expected = ((out.pred.detach() - out.targets.repeat_interleave(2, 0)) ** 2).sum(-1)[counted].sum()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    model = tiny()
    src = tokens(2, 32)
    with pytest.raises(TypeError, match="int64"):
        model(src.float())
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(src[0])
    with pytest.raises(ValueError, match="max_source_positions"):
        model(tokens(2, 33))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        model(src.clone().fill_(100))
    with pytest.raises(ValueError, match="B\\*M, T"):
        model(src, torch.zeros(2, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        model(src, padding_mask=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="padding_mask"):
        model(src, padding_mask=torch.zeros(2, 31, dtype=torch.bool))
    uneven = torch.zeros(4, 32, dtype=torch.bool)
    uneven[0, :10] = True
    with pytest.raises(ValueError, match="same number of visible"):
        model(src, uneven)
    with pytest.raises(ValueError, match="ids_keep"):
        model(src, ids_keep=torch.zeros(4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="sinusoidal"):
        Data2Vec2TextConfig(learned_pos=False)


# --- training step ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_training_step_with_generated_masks(backend):
    model = tiny()
    src = tokens(3, 32)
    with dk.use_backend(backend):
        out = model(src, generator=torch.Generator().manual_seed(1))
        again = model(src, generator=torch.Generator().manual_seed(1))
    assert out.sample_size == 3 * 2 * 16 and out.mask.shape == (6, 32) and (out.mask.sum(1) == 16).all()
    assert torch.equal(out.mask, again.mask) and torch.allclose(out.loss, again.loss)
    assert out.pred.shape == (6, 32, 48) and out.targets.shape == (3, 32, 48) and not out.targets.requires_grad
    assert set(out.losses) == {"regression"} and out.cls_pred is None
    (out.loss / out.sample_size).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in model.named_student_parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    y = out.targets.repeat_interleave(2, 0)[out.mask]
    assert torch.allclose(out.logs["target_var"], torch.sqrt(y.var(dim=0) + 1e-6).mean(), rtol=1e-5)
    # the EMA step averages the student's blocks into the teacher's (the image model's bookkeeping)
    t0 = model.teacher.module.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        model.encoder.blocks[0].attn.qkv.weight.add_(1.0)
    decay = model.ema_step()
    assert decay == pytest.approx(0.909)
    assert torch.allclose(model.teacher.module.blocks[0].attn.qkv.weight, t0 + (1 - decay), atol=1e-6)
    assert sum(len(g["params"]) for g in model.param_groups(0.01)) == len(list(model.named_student_parameters()))
