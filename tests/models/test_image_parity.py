"""The image model against the golden data of the authors' implementation (shared/golden/image), on the
reference backend and on the default (fused where available) backends, plus construction, init and
EMA-schedule checks that need no golden data."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import d2v2_kernels as dk
from d2v2_kernels.cli import main as cli_main
from d2v2_kernels.models import Data2Vec2Image, Data2Vec2ImageConfig
from d2v2_kernels.parity import fairseq_image_name_map, image_parity, load_fairseq_image_weights

GOLDEN = Path(os.environ.get("D2V2_GOLDEN_DIR", Path(__file__).resolve().parents[2] / ".." / "shared" / "golden"))
IMAGE = GOLDEN / "image"
needs_golden = pytest.mark.skipif(not (IMAGE / "tensors.safetensors").exists(), reason=f"no golden data at {IMAGE}")

# inputs of the golden run (injected, not outputs to compare)
INPUTS = {"in.source", "mask.precomputed_mask", "mask.encoder_mask", "mask.ids_keep", "mask.ids_restore",
          "decoder.noise_full"}


@pytest.fixture(scope="module", params=["reference", "auto"])
def parity(request):
    return request.param, image_parity(str(IMAGE), request.param)


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
    names = {r.name for r in rows}
    gold = set(load_file(str(IMAGE / "tensors.safetensors")))
    missing = {k for k in gold - INPUTS if k not in names}
    assert not missing, missing


@needs_golden
def test_config_from_golden_matches_preset():
    cfg = json.loads((IMAGE / "config.json").read_text())
    assert Data2Vec2ImageConfig.from_fairseq(cfg["cfg"]) == Data2Vec2ImageConfig.preset("golden-tiny")
    assert Data2Vec2ImageConfig.from_fairseq(cfg["cfg"]["model"]) == Data2Vec2ImageConfig.preset("golden-tiny")


@needs_golden
def test_name_map_covers_student_and_teacher():
    from safetensors.torch import load_file

    weights = load_file(str(IMAGE / "weights.safetensors"))
    model = Data2Vec2Image(Data2Vec2ImageConfig.preset("golden-tiny"))
    teacher = {k: v for k, v in weights.items() if ".decoder." not in k}
    report = load_fairseq_image_weights(model, weights, teacher)
    assert report.ok and len(report.loaded) == len(weights) + len(teacher)
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[fairseq_image_name_map(k)], v)
    # a stray or misshapen key is reported, not silently dropped
    bad = {"modality_encoders.IMAGE.nonsense": torch.zeros(1), "blocks.0.norm1.weight": torch.zeros(3)}
    report = load_fairseq_image_weights(model, bad)
    assert len(report.unexpected) == 2 and report.missing


@needs_golden
def test_cli_parity(capsys):
    assert cli_main(["parity", str(GOLDEN), "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "loss.total" in out and "FAIL" not in out
    for modality in ("image", "audio", "text"):
        assert f"{modality} (" in out
    assert cli_main(["parity", str(GOLDEN / "text")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("text (") and "FAIL" not in out


@needs_golden
def test_cli_parity_fails_above_tolerance(monkeypatch, capsys):
    import d2v2_kernels.parity as parity_mod

    monkeypatch.setattr(parity_mod, "TOL_ACT", 0.0)  # no activation matches bitwise through SDPA
    assert cli_main(["parity", str(IMAGE), "--backend", "reference"]) == 1
    assert "FAIL" in capsys.readouterr().out


# --- no golden data needed --------------------------------------------------------------------------


def test_reference_init_from_sizes():
    torch.manual_seed(0)
    cfg = Data2Vec2ImageConfig.preset("golden-tiny", embed_dim=64, decoder_dim=64, depth=2, average_top_k_layers=2)
    model = Data2Vec2Image(cfg)
    enc = model.encoder
    qkv = enc.blocks[0].attn.qkv
    assert abs(float(qkv.weight.detach().std()) - 0.02) < 0.002 and not qkv.bias.any()  # init_bert_params
    assert not enc.prenet.blocks[0].mlp.fc2.bias.any()
    assert torch.equal(enc.blocks[1].norm2.weight, torch.ones(64)) and not enc.prenet.norm.bias.any()
    assert abs(float(enc.cls_token.detach().std()) - 1.0) < 0.3  # N(0, 1)
    w = enc.patch_embed.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))  # Xavier-uniform on [D, C * p * p]
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    proj = model.decoder.proj.weight  # PyTorch's default Linear init, not N(0, 0.02)
    assert proj.abs().max() <= 1 / math.sqrt(64) and proj.abs().max() > 0.1
    # the teacher starts as an exact copy of the encoder, frozen to autograd
    for (n, p), (tn, tp) in zip(enc.state_dict().items(), model.teacher.module.state_dict().items()):
        assert n == tn and torch.equal(p, tp)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    names = [n for n, _ in model.named_student_parameters()]
    assert names and not any(n.startswith("teacher") for n in names)
    groups = model.param_groups(0.05)
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_sincos_positions_match_golden_table():
    from d2v2_kernels.models.vit import sincos_pos_embed_2d

    table = sincos_pos_embed_2d(48, 8)
    if (IMAGE / "weights.safetensors").exists():
        from safetensors.torch import load_file

        weights = load_file(str(IMAGE / "weights.safetensors"))
        golden = weights["modality_encoders.IMAGE.fixed_positional_encoder.positions"]
        assert (table - golden[0]).abs().max() < 5e-4  # the golden table is fp16-rounded
    first = torch.tensor([0.0] * 12 + [1.0] * 12 + [0.0] * 12 + [1.0] * 12)  # position (0, 0): sin 0, cos 0
    assert table.shape == (64, 48) and torch.allclose(table[0], first)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_training_step_with_generated_masks(backend):
    torch.manual_seed(0)
    model = Data2Vec2Image(Data2Vec2ImageConfig.preset("golden-tiny"))
    x = torch.randn(3, 3, 32, 32)
    with dk.use_backend(backend):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        out = model(x, generator=g1)
        again = model(x, generator=g2)
    assert out.sample_size == 3 * 2 * 52 and out.mask.shape == (6, 64) and (out.mask.sum(1) == 52).all()
    assert torch.equal(out.mask, again.mask) and torch.allclose(out.loss, again.loss)
    assert out.pred.shape == (6, 64, 48) and out.targets.shape == (3, 64, 48) and not out.targets.requires_grad
    assert set(out.losses) == {"cls", "regression"} and torch.allclose(out.loss, sum(out.losses.values()))
    (out.loss / out.sample_size).backward()
    grads = [p.grad for _, p in model.named_student_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.teacher.parameters())
    for key in ("target_var", "pred_var", "masked_pct", "ema_decay"):
        assert out.logs[key].dim() == 0
    # target_var / pred_var are the reference's compute_var on the gathered masked rows
    y = out.targets.repeat_interleave(2, 0)[out.mask]
    assert torch.allclose(out.logs["target_var"], torch.sqrt(y.var(dim=0) + 1e-6).mean(), rtol=1e-5)
    p = out.pred.detach()[out.mask]
    assert torch.allclose(out.logs["pred_var"], torch.sqrt(p.var(dim=0) + 1e-6).mean(), rtol=1e-5)


def test_ema_schedule_as_the_reference():
    model = Data2Vec2Image(Data2Vec2ImageConfig.preset("golden-tiny"))
    # fairseq: decay(k) = end - (end - start) * (1 - k / anneal) for the k-th update (k >= 1), then end
    expected = [0.99 - 0.09 * (1 - k / 10) if k < 10 else 0.99 for k in range(1, 13)]
    assert model.ema_decay == pytest.approx(expected[0])
    used = [model.ema_step() for _ in range(12)]
    assert used == pytest.approx(expected)
    assert model.ema_step(12) is None  # a repeated update number is a no-op (update_freq > 1)
    assert model.ema_step(20) == pytest.approx(0.99)
    with pytest.raises(ValueError):
        model.ema_step(0)
    # an end decay of 1.0 freezes the teacher
    frozen = Data2Vec2Image(Data2Vec2ImageConfig.preset("golden-tiny", ema_decay=1.0, ema_end_decay=1.0))
    before = {k: v.clone() for k, v in frozen.teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in frozen.encoder.parameters():
            p.add_(1.0)
    assert frozen.ema_step() is None
    assert all(torch.equal(v, frozen.teacher.module.state_dict()[k]) for k, v in before.items())


def test_state_dict_roundtrip_keeps_teacher_and_schedule():
    cfg = Data2Vec2ImageConfig.preset("golden-tiny")
    model = Data2Vec2Image(cfg)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.5)
    for _ in range(3):
        model.ema_step()
    other = Data2Vec2Image(cfg)
    other.load_state_dict(model.state_dict())
    assert other.ema_decay == model.ema_decay and other.ema_step() == model.ema_step()
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, other.state_dict()[k]), k


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bf16_autocast_step(backend):
    torch.manual_seed(0)
    model = Data2Vec2Image(Data2Vec2ImageConfig.preset("golden-tiny"))
    x = torch.randn(2, 3, 32, 32)
    with dk.use_backend(backend):
        full = model(x, generator=torch.Generator().manual_seed(3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, generator=torch.Generator().manual_seed(3))
        (out.loss / out.sample_size).backward()
    assert out.pred.dtype == torch.bfloat16 and out.targets.dtype == torch.float32
    assert torch.allclose(out.loss, full.loss, rtol=2e-2)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for _, p in model.named_student_parameters())


def test_ema_step_moves_teacher_towards_student():
    model = Data2Vec2Image(Data2Vec2ImageConfig.preset("golden-tiny"))
    t0 = model.teacher.module.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        model.encoder.blocks[0].attn.qkv.weight.add_(1.0)
    decay = model.ema_step()
    assert torch.allclose(model.teacher.module.blocks[0].attn.qkv.weight, t0 + (1 - decay), atol=1e-6)


def test_presets_construct_and_validate():
    base = Data2Vec2ImageConfig.preset("base")
    assert (base.num_patches, base.len_keep, base.depth + base.prenet_depth) == (196, 39, 12)
    large = Data2Vec2ImageConfig.preset("large")
    assert (large.len_keep, large.prenet_depth, large.average_top_k_layers) == (49, 0, 18)
    with pytest.raises(ValueError):
        Data2Vec2ImageConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError):
        Data2Vec2ImageConfig.preset("golden-tiny", average_top_k_layers=5)
