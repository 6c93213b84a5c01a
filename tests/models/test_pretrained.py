"""Importing the authors' fairseq checkpoints (golden/*/fairseq_checkpoint.pt, an omegaconf re-save, a
legacy argparse `args` checkpoint), our own format's round trip, and hostile or broken files."""

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import d2v2_kernels as dk
from d2v2_kernels.cli import main as cli_main
from d2v2_kernels.models import Data2Vec2Audio, Data2Vec2Image, Data2Vec2Text
from d2v2_kernels.parity import image_parity
from d2v2_kernels.parity.audio import audio_parity
from d2v2_kernels.parity.text import text_parity
from d2v2_kernels.pretrained import CheckpointImportError, from_pretrained, load_fairseq, save_pretrained

GOLDEN = Path(os.environ.get("D2V2_GOLDEN_DIR", Path(__file__).resolve().parents[2] / ".." / "shared" / "golden"))
DATA = Path(__file__).resolve().parents[1] / "data"
needs_golden = pytest.mark.skipif(not (GOLDEN / "image" / "fairseq_checkpoint.pt").exists(),
                                  reason=f"no golden data at {GOLDEN}")
MODELS = {"image": (Data2Vec2Image, image_parity), "audio": (Data2Vec2Audio, audio_parity),
          "text": (Data2Vec2Text, text_parity)}


def _assert_parity(rows, report):
    assert report.ok
    bad = [f"{r.name}: abs {r.max_abs:.2e} rel {r.max_rel:.2e}" for r in rows if not r.ok]
    assert not bad and len(rows) > 40, bad


def _golden_ckpt(modality):
    return torch.load(GOLDEN / modality / "fairseq_checkpoint.pt", map_location="cpu", weights_only=True)


@needs_golden
@pytest.mark.parametrize("modality", list(MODELS))
def test_from_fairseq_loads_student_and_teacher_of_every_modality(modality):
    model, report = load_fairseq(str(GOLDEN / modality / "fairseq_checkpoint.pt"))
    assert type(model) is MODELS[modality][0]
    assert report.ok, (report.missing, report.unexpected)
    ckpt = _golden_ckpt(modality)
    n_student = len([k for k in ckpt["model"] if k != "_ema"])
    assert len(report.loaded) == n_student + len(ckpt["model"]["_ema"])
    teacher = list(model.teacher.module.state_dict().values())
    for name, value in ckpt["model"]["_ema"].items():
        # (the ALiBi scale is stored (1, 1, H, 1, 1) by the reference, (H,) by us)
        assert any(t.numel() == value.numel() and torch.equal(t.reshape(value.shape), value) for t in teacher), name


@needs_golden
@pytest.mark.parametrize("modality", list(MODELS))
def test_convert_round_trip_reproduces_golden(modality, tmp_path):
    out = tmp_path / modality
    assert cli_main(["convert", str(GOLDEN / modality / "fairseq_checkpoint.pt"), str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "d2v2-kernels" and meta["modality"] == modality
    model = dk.from_pretrained(str(out))
    direct = dk.from_fairseq(str(GOLDEN / modality / "fairseq_checkpoint.pt"))
    assert model.config == direct.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert k == k2 and (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), k
    _assert_parity(*MODELS[modality][1](str(GOLDEN / modality), "reference", model=model))


@needs_golden
def test_omegaconf_resave_loads_without_omegaconf():
    """tests/data/omegaconf_image.pt: the golden image checkpoint re-saved with cfg as an omegaconf
    DictConfig, the student in fp16 and numpy scalars in the trainer state (make_fairseq_fixtures.py)."""
    import sys

    assert "omegaconf" not in sys.modules
    model = dk.from_fairseq(str(DATA / "omegaconf_image.pt"))
    assert "omegaconf" not in sys.modules
    _assert_parity(*image_parity(str(GOLDEN / "image"), "reference", model=model))


@needs_golden
def test_legacy_args_namespace(tmp_path):
    ckpt = _golden_ckpt("image")
    args = argparse.Namespace(arch="data2vec_multi", **{k: v for k, v in ckpt["cfg"]["model"].items() if k != "_name"})
    path = tmp_path / "args.pt"
    torch.save({"args": args, "model": ckpt["model"]}, path)
    model = dk.from_fairseq(str(path))
    assert model.config == dk.from_fairseq(str(GOLDEN / "image" / "fairseq_checkpoint.pt")).config


# --- refused, with a message, nothing executed -------------------------------------------------------


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    _RunsCode.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": {}}, "model": {"x": torch.zeros(1)}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointImportError, match="posix.system|os.system|refusing"):
        dk.from_fairseq(str(path))
    assert not _RunsCode.marker.exists()


def test_legacy_non_zip_pickle_that_would_run_code_is_refused(tmp_path):
    _RunsCode.marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _RunsCode()}, f)
    with pytest.raises(CheckpointImportError):
        dk.from_fairseq(str(path))
    assert not _RunsCode.marker.exists()


@needs_golden
def test_truncated_empty_and_garbage_files(tmp_path):
    data = (GOLDEN / "image" / "fairseq_checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    for name, match in (("truncated.pt", "truncated|corrupt"), ("empty.pt", "empty"), ("garbage.pt", "corrupt|not a")):
        with pytest.raises(CheckpointImportError, match=match):
            dk.from_fairseq(str(tmp_path / name))
    with pytest.raises(CheckpointImportError, match="no such file"):
        dk.from_fairseq(str(tmp_path / "missing.pt"))


@needs_golden
def test_checkpoints_of_other_models_are_refused(tmp_path):
    ckpt = _golden_ckpt("image")
    other = dict(ckpt, cfg=dict(ckpt["cfg"], model=dict(ckpt["cfg"]["model"], _name="wav2vec2")))
    torch.save(other, tmp_path / "w2v.pt")
    with pytest.raises(CheckpointImportError, match="wav2vec2"):
        dk.from_fairseq(str(tmp_path / "w2v.pt"))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointImportError, match="no model configuration"):
        dk.from_fairseq(str(tmp_path / "plain.pt"))
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointImportError, match="expected a fairseq checkpoint"):
        dk.from_fairseq(str(tmp_path / "list.pt"))


@needs_golden
def test_missing_and_unexpected_keys_are_reported_not_ignored(tmp_path, capsys):
    ckpt = _golden_ckpt("image")
    model = dict(ckpt["model"])
    model.pop("blocks.0.attn.qkv.weight")
    model["blocks.0.attn.extra"] = torch.zeros(3)
    torch.save(dict(ckpt, model=model), tmp_path / "edited.pt")
    with pytest.raises(CheckpointImportError, match="blocks.0.attn.extra"):
        dk.from_fairseq(str(tmp_path / "edited.pt"))
    assert cli_main(["convert", str(tmp_path / "edited.pt"), str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "missing: encoder.blocks.0.attn.qkv.weight" in out and "unused: blocks.0.attn.extra" in out
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="not used"):
        dk.from_fairseq(str(tmp_path / "edited.pt"), strict=False)
    # a mismatched modality: the cfg says audio, the weights are an image encoder's
    cfg = dict(ckpt["cfg"], model=dict(ckpt["cfg"]["model"], supported_modality="AUDIO"))
    torch.save(dict(ckpt, cfg=cfg), tmp_path / "mixed.pt")
    with pytest.raises(CheckpointImportError, match="cfg says 'audio'"):
        dk.from_fairseq(str(tmp_path / "mixed.pt"))


@needs_golden
def test_from_pretrained_rejects_broken_folders(tmp_path):
    save_pretrained(dk.from_fairseq(str(GOLDEN / "image" / "fairseq_checkpoint.pt")), str(tmp_path))
    meta = json.loads((tmp_path / "config.json").read_text())
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[:1000])
    with pytest.raises(CheckpointImportError, match="truncated"):
        from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "config.json").write_text(json.dumps(dict(meta, config=dict(meta["config"], depth=5))))
    with pytest.raises(CheckpointImportError, match="does not fit"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(meta, config=dict(meta["config"], depth=2))))
    with pytest.raises(CheckpointImportError, match="invalid config: average_top_k_layers"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(meta, format="something-else")))
    with pytest.raises(CheckpointImportError, match="not a d2v2-kernels config"):
        from_pretrained(str(tmp_path))
    with pytest.raises(TypeError, match="save_pretrained"):
        save_pretrained(torch.nn.Linear(2, 2), str(tmp_path))
