"""Pretrained models: the authors' fairseq checkpoints in, our own format out and back in.

    model = from_fairseq("checkpoint.pt")        # image, audio or text, student + teacher, strict
    save_pretrained(model, "out/")               # out/config.json + out/model.safetensors
    model = from_pretrained("out/")

`from_fairseq` never imports fairseq or omegaconf and never runs code from the pickle (see `fairseq.py`).
It builds the model the checkpoint's cfg describes, maps every parameter name, loads the student and the
`_ema` teacher, and refuses (strict) or reports (`load_fairseq`) any key that does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings

import torch
from torch import nn

from ..models.data2vec2 import Data2Vec2Image, Data2Vec2ImageConfig
from ..models.data2vec2_audio import Data2Vec2Audio, Data2Vec2AudioConfig
from ..models.data2vec2_text import Data2Vec2Text, Data2Vec2TextConfig
from ..parity import LoadReport, load_fairseq_image_weights
from ..parity.audio import load_fairseq_audio_weights
from ..parity.text import _EMBED_TOKENS, load_fairseq_text_weights
from .fairseq import CheckpointImportError, model_config, read_fairseq_checkpoint, state_dicts

FORMAT, FORMAT_VERSION = "d2v2-kernels", 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

# modality -> (config class, model class, fairseq weight loader)
MODELS = {
    "image": (Data2Vec2ImageConfig, Data2Vec2Image, load_fairseq_image_weights),
    "audio": (Data2Vec2AudioConfig, Data2Vec2Audio, load_fairseq_audio_weights),
    "text": (Data2Vec2TextConfig, Data2Vec2Text, load_fairseq_text_weights),
}

__all__ = ["CheckpointImportError", "LoadReport", "from_fairseq", "from_pretrained", "load_fairseq",
           "save_pretrained"]


def _modality(model_cfg: dict, student: dict, path: str) -> str:
    """From cfg.model.supported_modality, checked against the encoder the weights contain."""
    in_weights = {k.split(".")[1].lower() for k in student if k.startswith("modality_encoders.")}
    declared = model_cfg.get("supported_modality")
    declared = declared.lower() if isinstance(declared, str) else None
    if declared is None:
        if len(in_weights) != 1:
            raise CheckpointImportError(f"{path}: cannot tell the modality (no supported_modality in the cfg; "
                                        f"weights for {sorted(in_weights) or 'no modality'})")
        declared = in_weights.pop()
    elif in_weights and in_weights != {declared}:
        raise CheckpointImportError(f"{path}: the cfg says {declared!r} but the weights are for {sorted(in_weights)}")
    if declared not in MODELS:
        raise CheckpointImportError(f"{path}: modality {declared!r} is not supported (image, audio, text)")
    return declared


def load_fairseq(path: str) -> tuple[nn.Module, LoadReport]:
    """The model a fairseq data2vec 2.0 checkpoint describes, with its weights, and what was loaded,
    missing or unexpected. Raises CheckpointImportError when the file cannot be read safely or is not a
    data2vec 2.0 pretraining checkpoint."""
    ckpt = read_fairseq_checkpoint(path)
    model_cfg = model_config(ckpt, path)
    student, teacher = state_dicts(ckpt, path)
    modality = _modality(model_cfg, student, path)
    config_cls, model_cls, loader = MODELS[modality]
    try:
        if modality == "text":  # the vocabulary lives in the task's dictionary, not the cfg
            embed = student.get(_EMBED_TOKENS)
            if not isinstance(embed, torch.Tensor) or embed.dim() != 2:
                raise CheckpointImportError(f"{path}: text checkpoint without {_EMBED_TOKENS}")
            config = config_cls.from_fairseq(model_cfg, vocab_size=embed.shape[0])
        else:
            config = config_cls.from_fairseq(model_cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointImportError(f"{path}: cannot build a {modality} model from its cfg: {e!r}") from None
    model = model_cls(config)
    report = loader(model, student, teacher)
    if teacher is None:
        warnings.warn(f"{path}: no '_ema' teacher in the checkpoint; the teacher starts as a copy of the student",
                      stacklevel=2)
    return model, report


def from_fairseq(path: str, *, strict: bool = True) -> nn.Module:
    """A fairseq data2vec 2.0 checkpoint as our model (student and teacher). `strict` (default) raises when
    any checkpoint key found no place or any of our parameters got no value; otherwise that is a warning."""
    model, report = load_fairseq(path)
    if not report.ok:
        msg = (f"{path}: {len(report.missing)} of our parameters got no value "
               f"{_preview(report.missing)}, {len(report.unexpected)} checkpoint keys were not used "
               f"{_preview(report.unexpected)}")
        if strict:
            raise CheckpointImportError(msg + " (strict=False loads it anyway)")
        warnings.warn(msg, stacklevel=2)
    return model


def _preview(names: list[str], n: int = 8) -> str:
    return "[" + ", ".join(names[:n]) + (", ..." if len(names) > n else "") + "]"


def save_pretrained(model: nn.Module, out_dir: str) -> None:
    """Write `out_dir/config.json` (format, modality, model config) and `out_dir/model.safetensors`
    (student and teacher). Each file is written to a temporary name and renamed, so a crash never
    leaves a half-written file under the final name."""
    from safetensors.torch import save_file

    modality = next((m for m, (_, cls, _) in MODELS.items() if type(model) is cls), None)
    if modality is None:
        raise TypeError(f"save_pretrained: expected one of {[c.__name__ for _, c, _ in MODELS.values()]}, "
                        f"got {type(model).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    full = model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in full.items() if isinstance(v, torch.Tensor)}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "modality": modality,
            "config": dataclasses.asdict(model.config),
            # non-tensor module state (the EMA teacher's update count and schedule)
            "extra_state": {k: v for k, v in full.items() if not isinstance(v, torch.Tensor)}}
    _atomic_write(out_dir, WEIGHTS_FILE, lambda p: save_file(state, p, metadata={"format": FORMAT}))
    _atomic_write(out_dir, CONFIG_FILE, lambda p: open(p, "w").write(json.dumps(meta, indent=1)))


def _atomic_write(out_dir: str, name: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, os.path.join(out_dir, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _tuples(value):
    """JSON lists back to the tuples our configs hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def from_pretrained(path: str) -> nn.Module:
    """Load a directory written by `save_pretrained` (or `d2v2 convert`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise CheckpointImportError(f"{path}: missing {os.path.basename(p)} (expected a save_pretrained folder)")
    try:
        with open(config_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointImportError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointImportError(f"{config_path}: not a {FORMAT} config (format {meta.get('format')!r})"
                                    if isinstance(meta, dict) else f"{config_path}: not a {FORMAT} config")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointImportError(f"{config_path}: format version {meta.get('version')!r}, this library "
                                    f"reads {FORMAT_VERSION}")
    if meta.get("modality") not in MODELS or not isinstance(meta.get("config"), dict):
        raise CheckpointImportError(f"{config_path}: unknown modality {meta.get('modality')!r} or no config")
    config_cls, model_cls, _ = MODELS[meta["modality"]]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise CheckpointImportError(f"{config_path}: unknown config keys {unknown}")
    try:
        model = model_cls(config_cls(**{k: _tuples(v) for k, v in meta["config"].items()}))
    except (TypeError, ValueError) as e:
        raise CheckpointImportError(f"{config_path}: invalid config: {e}") from None
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointImportError(f"{weights_path}: cannot read ({e}): truncated or not safetensors") from None
    extra = meta.get("extra_state", {})
    if not isinstance(extra, dict):
        raise CheckpointImportError(f"{config_path}: extra_state must be an object")
    try:
        model.load_state_dict({**state, **extra}, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointImportError(f"{weights_path}: does not fit the config: {str(e).splitlines()[0]} "
                                    f"{str(e).splitlines()[1:3]}") from None
    return model
