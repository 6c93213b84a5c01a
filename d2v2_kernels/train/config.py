"""Trainer configuration: one flat dataclass, named presets, `key=value` overrides from the command line.

The resolved config is saved as config.json next to the checkpoints, and a resumed run refuses a config
that differs in anything but the run length and logging fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass
class TrainConfig:
    # method and data
    method: str = "data2vec2"  # "data2vec2" or "mae"
    data: str = "fmnist"  # "fmnist" or an ImageNet-style folder path
    data_dir: str | None = None  # Fashion-MNIST idx files (default: the Debian package's directory)
    image_size: int = 28
    in_chans: int = 1
    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = True
    # encoder (shared by both methods)
    patch_size: int = 2
    embed_dim: int = 192
    depth: int = 5  # data2vec 2.0 main blocks (targets come from these); MAE: depth + prenet_depth blocks
    num_heads: int = 3
    mlp_ratio: float = 4.0
    prenet_depth: int = 1  # data2vec 2.0: LayerNorm + blocks before the main ones (not used for targets)
    # data2vec 2.0
    clones: int = 8
    mask_prob: float = 0.8
    mask_length: int = 3  # inverse block masking: side of the visible squares
    mask_prob_adjust: float = 0.07
    average_top_k_layers: int = 5
    decoder_dim: int = 192
    decoder_layers: int = 3
    decoder_kernel: int = 3
    decoder_groups: int = 16
    cls_loss: float = 0.01
    cls_loss_rows: int = 256  # CLS term weighted as at this many rows per device (reference: its per-GPU batch)
    ema_decay: float = 0.99
    ema_end_decay: float = 0.999
    ema_anneal_end_step: int = 2000
    mask_noise_std: float = 0.01
    target_var_min: float = 0.01  # stop when the teacher's target variance collapses below this (0: off)
    # MAE
    mae_mask_ratio: float = 0.75
    mae_decoder_dim: int = 128
    mae_decoder_depth: int = 2
    mae_decoder_heads: int = 4
    mae_norm_pix_loss: bool = True
    # optimisation
    batch_size: int = 128  # global, over all ranks
    epochs: float = 1.0
    max_steps: int = 0  # > 0: overrides epochs
    time_budget_s: float = 0.0  # > 0: stop after this much training time (the schedule spans the budget)
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 4.0
    # run
    seed: int = 0
    deterministic: bool = False
    backend: str = "auto"
    amp: str = "auto"  # "auto" (bf16 on GPU, off on CPU), "bf16", "off"
    out_dir: str = "runs/fmnist-tiny"
    save_every: int = 200
    log_every: int = 10
    progress: bool = True
    keep_checkpoints: int = 2

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


# Fields that may change when a run is resumed (they do not change what a step computes).
RESUMABLE_CHANGES = {"epochs", "max_steps", "time_budget_s", "out_dir", "save_every", "log_every", "progress",
                     "keep_checkpoints", "data_dir", "backend"}

PRESETS: dict[str, dict] = {
    # seconds per epoch on a 2-core CPU: 14x14 tokens of a 4x-downsampled grid, a narrow 4-block encoder
    "fmnist-tiny": dict(patch_size=4, embed_dim=64, depth=3, num_heads=2, prenet_depth=1, average_top_k_layers=3,
                        clones=4, decoder_dim=64, decoder_layers=2, decoder_groups=8, batch_size=64,
                        epochs=1.0, warmup_steps=20, out_dir="runs/fmnist-tiny"),
    # the calibration run's model (shared/spec/calibration.md): width 192, depth 6, patch 4
    "fmnist-small": dict(patch_size=4, embed_dim=192, depth=5, num_heads=3, prenet_depth=1, average_top_k_layers=5,
                         clones=8, decoder_dim=192, decoder_layers=3, decoder_groups=16, batch_size=128,
                         epochs=3.0, out_dir="runs/fmnist-small"),
    # the released ViT-B image config (data2vec 2.0, base_images_only_task)
    "imagenet-base": dict(data="", image_size=224, in_chans=3, crop_scale=(0.35, 1.0), patch_size=16, embed_dim=768,
                          depth=10, num_heads=12, prenet_depth=2, clones=16, average_top_k_layers=10,
                          decoder_dim=768, decoder_layers=6, decoder_kernel=3, decoder_groups=16,
                          cls_loss=0.01, ema_decay=0.9998, ema_end_decay=0.99999, ema_anneal_end_step=100_000,
                          batch_size=2048, epochs=800, lr=2e-3, warmup_steps=6_250, weight_decay=0.05,
                          betas=(0.9, 0.95), clip_grad=4.0, target_var_min=0.1, out_dir="runs/imagenet-base"),
    "imagenet-large": dict(data="", image_size=224, in_chans=3, patch_size=16, embed_dim=1024, depth=24,
                           num_heads=16, prenet_depth=0, clones=8, average_top_k_layers=18, decoder_dim=1024,
                           decoder_layers=3, decoder_kernel=5, decoder_groups=16, ema_decay=0.9998,
                           ema_end_decay=1.0, ema_anneal_end_step=300_000, batch_size=2048, epochs=1600,
                           lr=4e-4, warmup_steps=31_250, out_dir="runs/imagenet-large"),
}


def _parse_value(current, text: str, name: str):
    typ = type(current)
    try:
        if isinstance(current, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, tuple):
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            if len(parts) != len(current):
                raise ValueError
            return tuple(type(c)(p) for c, p in zip(current, parts))
        if current is None:
            return None if text.lower() in ("none", "") else text
        return typ(text)
    except ValueError:
        raise ValueError(f"override {name}={text!r}: expected a {typ.__name__} like {current!r}") from None


def make_config(preset: str | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A preset plus `key=value` overrides (strings from the command line, or a dict)."""
    cfg = TrainConfig()
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        cfg = dataclasses.replace(cfg, **PRESETS[preset])
    fields = {f.name for f in dataclasses.fields(cfg)}
    items = overrides.items() if isinstance(overrides, dict) else (o.split("=", 1) for o in overrides or [])
    for item in items:
        if isinstance(overrides, dict):
            key, value = item
        else:
            if len(item) != 2:
                raise ValueError(f"override {item[0]!r}: expected key=value")
            key, text = item
            key = key.strip().replace("-", "_")
            if key not in fields:
                raise ValueError(f"unknown config field {key!r}")
            value = _parse_value(getattr(cfg, key), text.strip(), key)
        if key not in fields:
            raise ValueError(f"unknown config field {key!r}")
        cfg = dataclasses.replace(cfg, **{key: value})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.method not in ("data2vec2", "mae"):
        raise ValueError(f"method: expected 'data2vec2' or 'mae', got {cfg.method!r}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
    if not 1 <= cfg.average_top_k_layers <= cfg.depth:
        raise ValueError(f"average_top_k_layers {cfg.average_top_k_layers} must be in [1, depth={cfg.depth}]")
    if cfg.batch_size < 1 or cfg.clones < 1:
        raise ValueError("batch_size and clones must be >= 1")
    if cfg.amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp: expected auto, bf16 or off, got {cfg.amp!r}")


def config_from_json(text: str) -> TrainConfig:
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("config.json: expected an object")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"config.json: unknown fields {sorted(unknown)}")
    default = TrainConfig()
    values = {k: tuple(v) if isinstance(getattr(default, k), tuple) else v for k, v in raw.items()}
    return dataclasses.replace(default, **values)


