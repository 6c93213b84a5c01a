"""The pretraining methods the loop trains (see loop.py for the interface), built from a TrainConfig."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.data2vec2 import Data2Vec2Image, Data2Vec2ImageConfig
from .config import TrainConfig


def _tensors_only(state: dict) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


class Data2Vec2Method(nn.Module):
    """data2vec 2.0 for images. The objective per rank is the mean regression loss over its masked tokens
    plus the CLS term; DDP's gradient average then equals the single-process objective of the global batch
    (every rank has the same masked count)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.model = Data2Vec2Image(Data2Vec2ImageConfig(
            img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, prenet_depth=cfg.prenet_depth,
            clone_batch=cfg.clones, mask_prob=cfg.mask_prob, mask_length=cfg.mask_length,
            mask_prob_adjust=cfg.mask_prob_adjust, mask_noise_std=cfg.mask_noise_std,
            average_top_k_layers=cfg.average_top_k_layers, decoder_dim=cfg.decoder_dim,
            decoder_layers=cfg.decoder_layers, decoder_kernel=cfg.decoder_kernel, decoder_groups=cfg.decoder_groups,
            cls_loss=cfg.cls_loss, ema_decay=cfg.ema_decay, ema_end_decay=cfg.ema_end_decay,
            ema_anneal_end_step=cfg.ema_anneal_end_step,
        ))
        self.clones = cfg.clones
        self.cls_loss_rows = cfg.cls_loss_rows

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.model.param_groups(weight_decay)

    def make_masks(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        info = self.model.make_masks(batch, generator=generator)
        M = self.clones
        return {"mask": info.mask.view(batch, M, -1), "ids_keep": info.ids_keep.view(batch, M, -1),
                "ids_restore": info.ids_restore.view(batch, M, -1)}

    def forward(self, images: Tensor, mask: Tensor, ids_keep: Tensor, ids_restore: Tensor):
        out = self.model(images, mask.flatten(0, 1), ids_keep=ids_keep.flatten(0, 1),
                         ids_restore=ids_restore.flatten(0, 1))
        loss = out.losses["regression"] / out.sample_size
        logs = {"regression": loss.detach(), **out.logs}
        if "cls" in out.losses:
            # losses["cls"] / sample_size = cls_loss * (sum over rows); optionally weighted as at
            # cls_loss_rows rows per device (the reference's per-GPU batch) instead of this batch's rows.
            rows = images.shape[0] * self.clones
            weight = self.cls_loss_rows / rows if self.cls_loss_rows > 0 else 1.0
            cls = out.losses["cls"] / out.sample_size * weight
            loss = loss + cls
            logs["cls"] = cls.detach()
        return loss, logs

    def after_step(self, step: int) -> None:
        self.model.ema_step(step)

    def set_full_logs(self, enabled: bool) -> None:
        """Compute the costly diagnostics (pred_var) only on the steps the trainer logs."""
        self.model.log_pred_var = enabled

    def checkpoint_tensors(self) -> dict[str, dict[str, Tensor]]:
        m = self.model
        student = {f"encoder.{k}": v for k, v in m.encoder.state_dict().items()}
        student.update({f"decoder.{k}": v for k, v in m.decoder.state_dict().items()})
        return {"student": student, "teacher": _tensors_only(m.teacher.module.state_dict())}

    def load_checkpoint_tensors(self, groups: dict[str, dict[str, Tensor]]) -> None:
        m = self.model
        student = groups["student"]
        for prefix, module in (("encoder.", m.encoder), ("decoder.", m.decoder)):
            sub = {k[len(prefix):]: v for k, v in student.items() if k.startswith(prefix)}
            module.load_state_dict(sub, strict=True)
        m.teacher.module.load_state_dict(groups["teacher"], strict=True)

    @torch.no_grad()
    def encode(self, images: Tensor) -> dict[str, Tensor]:
        """Frozen features for evaluation: mean-pooled patch tokens and the CLS token."""
        x = self.model.extract_features(images)
        return {"mean": x[:, 1:].mean(1), "cls": x[:, 0]}


METHODS = {"data2vec2": Data2Vec2Method}


def build_method(cfg: TrainConfig) -> nn.Module:
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r} is not available (have {sorted(METHODS)})")
    return METHODS[cfg.method](cfg)


class MAEMethod(nn.Module):
    """MAE (models/mae.py), the baseline: encoder depth = depth + prenet_depth (as many blocks as the
    data2vec 2.0 encoder it is compared with), the mae_* decoder, random masking at mae_mask_ratio. The
    objective per rank is the mean loss over its masked patches; every rank has the same masked count,
    so DDP's gradient average equals the single-process objective of the global batch."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        from ..models.mae import MAE, MAEConfig

        self.model = MAE(MAEConfig(
            img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
            depth=cfg.depth + cfg.prenet_depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            decoder_dim=cfg.mae_decoder_dim, decoder_depth=cfg.mae_decoder_depth,
            decoder_heads=cfg.mae_decoder_heads, mask_ratio=cfg.mae_mask_ratio, norm_pix_loss=cfg.mae_norm_pix_loss,
        ))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """No weight decay on biases, 1-D parameters (LayerNorms) and the CLS / mask tokens. (The
        reference's timm add_weight_decay without a skip list decays the two tokens.)"""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.dim() == 1 or name.endswith(".bias") or name in ("cls_token", "mask_token")
            (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def make_masks(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        ids_keep, ids_restore, _ = self.model.random_masking(batch, generator=generator)
        return {"ids_keep": ids_keep, "ids_restore": ids_restore}

    def forward(self, images: Tensor, ids_keep: Tensor, ids_restore: Tensor):
        loss, _, mask = self.model(images, ids_keep=ids_keep, ids_restore=ids_restore)
        logs = {"mae": loss.detach(), "masked_pct": torch.tensor(1.0 - ids_keep.shape[1] / mask.shape[1])}
        return loss, logs

    def after_step(self, step: int) -> None:
        pass

    def checkpoint_tensors(self) -> dict[str, dict[str, Tensor]]:
        return {"student": _tensors_only(self.model.state_dict())}

    def load_checkpoint_tensors(self, groups: dict[str, dict[str, Tensor]]) -> None:
        self.model.load_state_dict(groups["student"], strict=True)

    @torch.no_grad()
    def encode(self, images: Tensor) -> dict[str, Tensor]:
        """Frozen features for evaluation: mean-pooled patch tokens and the CLS token, after the final norm."""
        x = self.model.extract_features(images)
        return {"mean": x[:, 1:].mean(1), "cls": x[:, 0]}


METHODS["mae"] = MAEMethod
