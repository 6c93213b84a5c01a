"""data2vec 2.0 for images (data2vec2.md, golden/PARITY_NOTES.md), built on the d2v2_kernels ops.

One training step (`Data2Vec2Image.forward`):

  student  patch embed + fixed sin-cos positions, once per image            [B, T, D]
           dk.gather_visible: the M clones' visible tokens, no M-fold copy     [B*M, K, D]
           CLS token prepended, prenet (LayerNorm + blocks), main blocks        [B*M, 1+K, D]
  decoder  dk.decoder_input: visible outputs back in place, N(0, 0.01^2) noise elsewhere
           ConvDecoder2d (dk.conv_decoder_block per layer) + Linear            [B*M, T, D]
  teacher  EMATeacher copy of the encoder on the unmasked image (no grad, eval); its main blocks' top-K
           FFN outputs are written straight into one TargetLayerBuffer
  targets  dk.layer_average_targets: instance norm per layer -> average -> layer norm  [B, T, D] fp32
  loss     dk.masked_regression_loss (sum over masked tokens, the target shared by the clones, never
           repeated) + the CLS term dk.cls_regression_loss * (cls_loss * sample_size)

Every op goes through d2v2_kernels, so `with dk.use_backend("reference"):` runs the same model unfused.
Loss convention (the reference's, see `Data2Vec2Output`): `loss` is the *sum*; the objective is
`loss / sample_size` (the trainer divides gradients by the global masked-token count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ConvDecoder2d, EMATeacher
from ..ops.decoder_input import decoder_input
from ..ops.gather import gather_visible
from ..ops.loss import cls_regression_loss, masked_regression_loss
from ..ops.targets import TargetLayerBuffer
from . import masking
from .vit import AltBlock, PatchEmbed, Prenet, init_bert_params, sincos_pos_embed_2d

__all__ = ["Data2Vec2Image", "Data2Vec2ImageConfig", "Data2Vec2Output", "IMAGE_PRESETS", "ImageEncoder"]

_NORMS = (None, "instance", "layer")


@dataclass
class Data2Vec2ImageConfig:
    """Everything that defines the image model and its loss. Defaults: the released ViT-B config
    (fairseq `base_images_only_task.yaml`); `preset(name)` gives the others, `from_fairseq(cfg)` reads a
    reference config (a checkpoint's `cfg` or its `model` section)."""

    # encoder
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 10  # main blocks (targets come from these)
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    prenet_depth: int = 2  # blocks after the prenet LayerNorm, before the main ones
    # dropouts (all 0 in the released image configs)
    encoder_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    post_mlp_drop: float = 0.0
    prenet_dropout: float = 0.0
    start_drop_path_rate: float = 0.0
    end_drop_path_rate: float = 0.0
    # multi-mask
    clone_batch: int = 16  # M: masked copies per image
    mask_prob: float = 0.8
    mask_length: int = 3  # side of the (visible) squares of inverse block masking
    mask_prob_adjust: float = 0.07
    inverse_mask: bool = True
    mask_noise_std: float = 0.01  # std of the decoder's masked-position noise
    # targets
    average_top_k_layers: int = 10
    target_layer_norm: str | None = "instance"  # per layer: "instance" (over T), "layer" (over C), None
    target_final_norm: str | None = "layer"  # after the average: "layer", "instance", None
    # decoder
    decoder_dim: int = 768
    decoder_layers: int = 6
    decoder_kernel: int = 3
    decoder_groups: int = 16
    decoder_residual: bool = True
    decoder_input_dropout: float = 0.0
    # loss
    loss_scale: float | None = None  # None: 1 / sqrt(embed_dim)
    loss_beta: float = 0.0  # 0: MSE, > 0: smooth-L1
    cls_loss: float = 0.01  # weight of the CLS term (0: off)
    # teacher
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100_000

    def __post_init__(self):
        self.validate()

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def len_keep(self) -> int:
        """Visible tokens per masked copy (exact; the same for every row)."""
        if self.mask_length <= 1:
            return int(self.num_patches * (1 - self.mask_prob))
        _, selected = masking.block_mask_2d_counts(
            self.num_patches, self.mask_prob, self.mask_length, self.mask_prob_adjust, self.inverse_mask
        )
        return selected if self.inverse_mask else self.num_patches - selected

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.embed_dim) if self.loss_scale is None else float(self.loss_scale)

    def validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim {self.embed_dim}: the 2-D sin-cos positions need a multiple of 4")
        if not 1 <= self.average_top_k_layers <= self.depth:
            raise ValueError(f"average_top_k_layers {self.average_top_k_layers} must be in [1, depth={self.depth}]")
        if self.clone_batch < 1:
            raise ValueError(f"clone_batch must be >= 1, got {self.clone_batch}")
        if self.target_layer_norm not in _NORMS or self.target_final_norm not in _NORMS:
            raise ValueError(f"target norms: expected one of {_NORMS}, got {self.target_layer_norm!r}, "
                             f"{self.target_final_norm!r}")
        if self.embed_dim % self.decoder_groups or self.decoder_dim % self.decoder_groups:
            raise ValueError(f"decoder_groups {self.decoder_groups} must divide embed_dim {self.embed_dim} and "
                             f"decoder_dim {self.decoder_dim}")
        if not 0 < self.len_keep < self.num_patches:
            raise ValueError(f"masking keeps {self.len_keep} of {self.num_patches} patches; expected some visible "
                             "and some masked")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Data2Vec2ImageConfig":
        if name not in IMAGE_PRESETS:
            raise ValueError(f"unknown image preset {name!r}; choose from {', '.join(IMAGE_PRESETS)}")
        return cls(**{**IMAGE_PRESETS[name], **overrides})

    def replace(self, **changes) -> "Data2Vec2ImageConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_fairseq(cls, cfg: dict) -> "Data2Vec2ImageConfig":
        """From a reference config: a checkpoint's `cfg` (plain dict) or its `model` section."""
        model = cfg.get("model", cfg)
        img = model["modalities"]["image"]
        dec = img["decoder"]
        if model.get("layer_norm_first", False):
            raise ValueError("layer_norm_first=True (pre-LN blocks) is not supported")
        if model.get("end_of_block_targets", False):
            raise ValueError("end_of_block_targets=True is not supported (targets are FFN outputs)")
        if img.get("num_extra_tokens", 1) != 1:
            raise ValueError(f"num_extra_tokens={img.get('num_extra_tokens')}: only the single CLS token is supported")
        if img.get("use_alibi_encoder", False) or not img.get("fixed_positions", True):
            raise ValueError("image ALiBi / learned positions are not supported")
        for key in ("add_positions_masked", "add_positions_all"):
            if dec.get(key, False):
                raise ValueError(f"decoder.{key}=True is not supported")
        if dec.get("projection_layers", 1) != 1:
            raise ValueError("image decoder: only projection_layers=1 is supported")
        layer_norm, final_norm = fairseq_target_norms(model)
        return cls(
            img_size=int(img["input_size"]), patch_size=int(img["patch_size"]), in_chans=int(img["in_chans"]),
            embed_dim=int(model["embed_dim"]), depth=int(model["depth"]), num_heads=int(model["num_heads"]),
            mlp_ratio=float(model["mlp_ratio"]), norm_eps=float(model["norm_eps"]),
            prenet_depth=int(img["prenet_depth"]),
            encoder_dropout=float(model["encoder_dropout"]), attention_dropout=float(model["attention_dropout"]),
            activation_dropout=float(model["activation_dropout"]), post_mlp_drop=float(model["post_mlp_drop"]),
            prenet_dropout=float(img["prenet_dropout"]),
            start_drop_path_rate=float(model["start_drop_path_rate"]),
            end_drop_path_rate=float(model["end_drop_path_rate"]),
            clone_batch=int(model["clone_batch"]), mask_prob=float(img["mask_prob"]),
            mask_length=int(img["mask_length"]), mask_prob_adjust=float(img["mask_prob_adjust"]),
            inverse_mask=bool(img["inverse_mask"]), mask_noise_std=float(img["mask_noise_std"]),
            average_top_k_layers=int(model["average_top_k_layers"]),
            target_layer_norm=layer_norm, target_final_norm=final_norm,
            decoder_dim=int(dec["decoder_dim"]), decoder_layers=int(dec["decoder_layers"]),
            decoder_kernel=int(dec["decoder_kernel"]), decoder_groups=int(dec["decoder_groups"]),
            decoder_residual=bool(dec["decoder_residual"]), decoder_input_dropout=float(dec["input_dropout"]),
            loss_scale=None if model.get("loss_scale") is None else float(model["loss_scale"]),
            loss_beta=float(model["loss_beta"]), cls_loss=float(model.get("cls_loss", 0.0)),
            ema_decay=float(model["ema_decay"]), ema_end_decay=float(model["ema_end_decay"]),
            ema_anneal_end_step=int(model["ema_anneal_end_step"]),
        )


def fairseq_target_norms(model: dict) -> tuple[str | None, str | None]:
    """(per-layer norm, final norm) of the teacher targets from a reference `model` config, shared by
    the image, audio and text configs; combinations the reference allows but we do not build raise."""
    if model.get("batch_norm_target_layer", False):
        raise ValueError("batch_norm_target_layer is not supported")
    if model.get("instance_norm_target_layer") and model.get("layer_norm_target_layer"):
        raise ValueError("instance_norm_target_layer and layer_norm_target_layer together are not supported")
    if model.get("layer_norm_targets") and model.get("instance_norm_targets"):
        raise ValueError("layer_norm_targets and instance_norm_targets together are not supported")
    layer_norm = "instance" if model.get("instance_norm_target_layer") else (
        "layer" if model.get("layer_norm_target_layer") else None)
    final_norm = "layer" if model.get("layer_norm_targets") else (
        "instance" if model.get("instance_norm_targets") else None)
    return layer_norm, final_norm


IMAGE_PRESETS: dict[str, dict] = {
    # the released ViT-B config (base_images_only_task.yaml): prenet 2 + 10 main blocks
    "base": {},
    # the released ViT-L config (large_images_only_task.yaml): no prenet blocks, 24 main blocks
    "large": dict(embed_dim=1024, depth=24, num_heads=16, prenet_depth=0, clone_batch=16,
                  average_top_k_layers=18, mask_prob=0.75, mask_prob_adjust=0.1, decoder_dim=1024,
                  decoder_layers=3, decoder_kernel=5, decoder_groups=16, ema_anneal_end_step=150_000),
    # the golden data's tiny config (shared/golden/image): 32 px, patch 4, width 48, 1 + 4 blocks
    "golden-tiny": dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=4, prenet_depth=1,
                        clone_batch=2, average_top_k_layers=3, decoder_dim=48, decoder_layers=2,
                        ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10),
}


@dataclass
class Data2Vec2Output:
    """What one forward returns. `loss` = sum of `losses` (the reference criterion's unnormalised sum,
    insertion order cls, regression); the objective is `loss / sample_size`: backward `loss` and divide
    the gradients by the (global) sample_size as fairseq does, or backward `loss / sample_size`.
    `logs` are 0-dim tensors (no host sync): target_var, pred_var (the reference's compute_var: mean
    over channels of sqrt(unbiased var over masked tokens + 1e-6); only when `model.log_pred_var`),
    masked_pct and ema_decay."""

    loss: Tensor
    losses: dict[str, Tensor]
    sample_size: int  # masked tokens over all B * M rows
    pred: Tensor  # [B*M, T, D] decoder output (every position)
    targets: Tensor  # [B, T, D] fp32 teacher targets, shared by the clones
    mask: Tensor  # [B*M, T] bool, True = masked
    cls_pred: Tensor  # [B*M, D] student's final CLS output
    logs: dict[str, Tensor] = field(default_factory=dict)


class ImageEncoder(nn.Module):
    """The student (and, as an EMA copy, the teacher) encoder: patch embed + fixed positions, CLS token,
    prenet, main blocks; no final norm (post-LN). Reference names: `patch_embed.proj` =
    local_encoder.proj, `pos_embed` = fixed_positional_encoder.positions (a buffer here: the EMA copies
    it), `cls_token` = extra_tokens, `prenet` = context_encoder, `blocks` = the model's blocks."""

    num_extra_tokens = 1

    def __init__(self, cfg: Data2Vec2ImageConfig):
        super().__init__()
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, self.patch_embed.grid_size).unsqueeze(0))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        block_kwargs = dict(drop=cfg.encoder_dropout, attn_drop=cfg.attention_dropout,
                            mlp_drop=cfg.activation_dropout, post_mlp_drop=cfg.post_mlp_drop)
        self.prenet = Prenet(D, cfg.prenet_depth, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps,
                             dropout=cfg.prenet_dropout, **block_kwargs)
        rates = torch.linspace(cfg.start_drop_path_rate, cfg.end_drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            AltBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, drop_path=rates[i], **block_kwargs)
            for i in range(cfg.depth)
        )

    def forward(
        self,
        source: Tensor,
        ids_keep: Tensor | None = None,
        clones: int = 1,
        layer_results: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """source [B, C, H, W] -> [B*clones, 1+K, D] (K = ids_keep.shape[1], or all T patches).

        ids_keep: [B*clones, K] visible positions per masked copy (None: every patch, clones must be 1).
        layer_results(i, t): called with each main block's FFN output t [N, 1+K, D] (CLS included).
        """
        x = self.patch_embed(source)
        x = x + self.pos_embed.to(x.dtype)
        if ids_keep is not None:
            x = gather_visible(x, ids_keep, clones)
        elif clones != 1:
            raise ValueError("clones > 1 needs ids_keep (the unmasked input is not cloned)")
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = self.prenet(x)
        for i, blk in enumerate(self.blocks):
            x, t = blk(x)
            if layer_results is not None:
                layer_results(i, t)
        return x


class Data2Vec2Image(nn.Module):
    """data2vec 2.0 for images: student encoder, conv decoder, EMA teacher (see the module docstring).

    `Data2Vec2Image(config)` initialises as the reference does: Linear layers N(0, 0.02) with zero bias
    (fairseq's init_bert_params over the whole model), the patch-embed conv Xavier-uniform (its bias and
    the decoder convs PyTorch's default), the CLS token N(0, 1), the decoder projection PyTorch's default
    Linear init (the reference re-initialises it after init_bert_params), LayerNorms (1, 0). The
    teacher is a copy of the encoder made at construction; after loading student weights call
    `reset_teacher()` (or load a teacher state).

    Training loop: `out = model(images)`; `(out.loss / out.sample_size).backward()` (or divide the
    gradients by the global sample size); optimizer step; `model.ema_step()`.
    """

    def __init__(self, config: Data2Vec2ImageConfig | None = None, **overrides):
        super().__init__()
        config = config or Data2Vec2ImageConfig()
        if overrides:
            config = config.replace(**overrides)
        config.validate()
        self.config = cfg = config
        # pred_var costs several passes over the whole decoder output (~10% of a small CPU step); a
        # trainer turns it off on steps it does not log.
        self.log_pred_var = True
        self.encoder = ImageEncoder(cfg)
        self.decoder = ConvDecoder2d(
            cfg.embed_dim, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel, cfg.decoder_groups,
            residual=cfg.decoder_residual,
        )
        self.apply(init_bert_params)
        nn.init.normal_(self.encoder.cls_token)
        self.decoder.proj.reset_parameters()
        self.teacher = EMATeacher(
            self.encoder, decay_start=cfg.ema_decay, decay_end=cfg.ema_end_decay,
            anneal_steps=cfg.ema_anneal_end_step,
        )
        self._target_buffer: TargetLayerBuffer | None = None

    # --- parameters ------------------------------------------------------------------------------

    def named_student_parameters(self):
        """The trainable parameters (encoder and decoder; not the teacher's)."""
        for prefix, module in (("encoder", self.encoder), ("decoder", self.decoder)):
            for name, p in module.named_parameters():
                yield f"{prefix}.{name}", p

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups as the reference: no weight decay on biases and 1-D parameters (the CLS token,
        3-D, is decayed)."""
        decay, no_decay = [], []
        for name, p in self.named_student_parameters():
            if p.requires_grad:
                (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # --- teacher ---------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Make the teacher an exact copy of the current encoder (as at construction), schedule at 0."""
        self.teacher.module.load_state_dict(self.encoder.state_dict())
        self.teacher.num_updates = 0

    @property
    def ema_decay(self) -> float:
        """The decay the next `ema_step()` uses (without an explicit num_updates)."""
        t = self.teacher
        k = max(t.num_updates, 1)
        if k >= t.anneal_steps:
            return t.decay_end
        return t.decay_start + (t.decay_end - t.decay_start) * k / t.anneal_steps

    @torch.no_grad()
    def ema_step(self, num_updates: int | None = None) -> float | None:
        """The EMA teacher update after an optimizer step; returns the decay used (None: nothing done).

        num_updates: optimizer updates done so far (>= 1); default: one more than the last call (1 on
        the first). As the reference (fairseq `set_num_updates(k)` before forward k, i.e. after the
        k-th optimizer step), the k-th update uses the annealed decay of step k: linear from ema_decay at
        0 to ema_end_decay at ema_anneal_end_step, then constant; at decay >= 1 the teacher is frozen.
        A repeated k is a no-op (the reference's update_freq > 1). Bookkeeping: `teacher.num_updates`
        holds the k of the next default call.
        """
        t = self.teacher
        k = max(t.num_updates, 1) if num_updates is None else int(num_updates)
        if k < 1:
            raise ValueError(f"num_updates: expected the number of optimizer updates done (>= 1), got {k}")
        if k < t.num_updates:  # already applied
            return None
        t.num_updates = k
        decay = t.decay
        t.step(self.encoder)  # fused ema_update_ of every parameter; buffers (pos_embed) copied
        return decay if decay < 1.0 else None

    # --- forward ---------------------------------------------------------------------------------

    def make_masks(self, batch_size: int, *, generator: torch.Generator | None = None,
                   device=None) -> masking.MaskInfo:
        """Fresh masks for `batch_size` images: [batch_size * clone_batch, T], sample-major rows, drawn
        on the generator's device (default: `device`) and moved to `device`."""
        cfg = self.config
        draw_device = generator.device if generator is not None else device
        mask = masking.inverse_block_mask_2d(
            batch_size * cfg.clone_batch, self.encoder.patch_embed.grid_size, cfg.mask_prob, cfg.mask_length,
            cfg.mask_prob_adjust, inverse=cfg.inverse_mask, generator=generator, device=draw_device,
        )
        if device is not None:
            mask = mask.to(device, non_blocking=True)
        return masking.make_mask_info(mask, cfg.len_keep)

    def _targets(self, source: Tensor) -> Tensor:
        cfg = self.config
        first = cfg.depth - cfg.average_top_k_layers
        n_extra = ImageEncoder.num_extra_tokens
        holder: list[TargetLayerBuffer] = []

        def write(i: int, t: Tensor) -> None:
            if i < first:
                return
            t = t[:, n_extra:]
            if not holder:
                holder.append(self._buffer_for(cfg.average_top_k_layers, *t.shape, dtype=t.dtype, device=t.device))
            holder[0].slot(i - first).copy_(t)

        self.teacher(source, layer_results=write)
        return holder[0].targets(layer_norm=cfg.target_layer_norm, final_norm=cfg.target_final_norm)

    def _buffer_for(self, K, B, T, C, *, dtype, device) -> TargetLayerBuffer:
        buf = self._target_buffer
        if buf is None or buf.shape != (K, B, T, C) or buf.tensor.dtype != dtype or buf.tensor.device != device:
            buf = self._target_buffer = TargetLayerBuffer(K, B, T, C, dtype=dtype, device=device)
        return buf

    def _decode(self, x: Tensor) -> Tensor:
        """The conv decoder on the patch grid (under autocast its blocks run in the autocast dtype)."""
        return self.decoder(x, grid=self.encoder.patch_embed.grid_size)

    @torch.no_grad()
    def teacher_targets(self, source: Tensor) -> Tensor:
        """The regression targets [B, T, D] (fp32) of the current teacher for unmasked images."""
        return self._targets(source)

    def extract_features(self, source: Tensor) -> Tensor:
        """The student encoder on unmasked images: [B, 1+T, D] (CLS first), e.g. for probes."""
        return self.encoder(source)

    def forward(
        self,
        source: Tensor,
        mask: Tensor | None = None,
        *,
        ids_keep: Tensor | None = None,
        ids_restore: Tensor | None = None,
        decoder_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Data2Vec2Output:
        """One data2vec 2.0 step's forward for images `source` [B, C, H, W].

        mask: [B*M, T] (bool or 0/1, True = masked, sample-major rows; every row the same count);
        None draws inverse block masks (from `generator`). ids_keep [B*M, K] / ids_restore [B*M, T]:
        the reference's index tensors for that mask (default: a stable argsort of it); inject the
        reference's own to compare per-token activations. decoder_noise: [B*M, T, D] noise in position
        layout (values at visible positions ignored), used instead of the N(0, mask_noise_std^2) draw.
        """
        cfg = self.config
        if source.dim() != 4:
            raise ValueError(f"source: expected images [B, C, H, W], got shape {tuple(source.shape)}")
        B, M, T = source.shape[0], cfg.clone_batch, self.encoder.patch_embed.num_patches
        N = B * M
        if mask is None:
            if ids_keep is not None or ids_restore is not None:
                raise ValueError("ids_keep / ids_restore given without the mask they index")
            info = self.make_masks(B, generator=generator, device=source.device)
            mask, ids_keep, ids_restore = info.mask, info.ids_keep, info.ids_restore
        else:
            if tuple(mask.shape) != (N, T):
                raise ValueError(f"mask: expected shape (B*M, T) = {(N, T)}, got {tuple(mask.shape)}")
            mask = mask.bool() if mask.dtype != torch.bool else mask
            if ids_keep is None or ids_restore is None:
                ids_keep, ids_restore = masking.mask_to_ids(mask)
        if ids_keep.shape[0] != N or tuple(ids_restore.shape) != (N, T):
            raise ValueError(f"ids_keep / ids_restore: expected [{N}, K] / [{N}, {T}], got "
                             f"{tuple(ids_keep.shape)} / {tuple(ids_restore.shape)}")
        K = ids_keep.shape[1]
        sample_size = N * (T - K)

        # student
        x = self.encoder(source, ids_keep=ids_keep, clones=M)  # [N, 1+K, D]
        if cfg.decoder_input_dropout > 0:  # the reference drops out in place: the CLS sees it too
            x = F.dropout(x, cfg.decoder_input_dropout, self.training)
        n_extra = ImageEncoder.num_extra_tokens
        cls_pred = x[:, 0]

        # decoder
        noise = None
        if decoder_noise is not None:
            if tuple(decoder_noise.shape) != (N, T, x.shape[-1]):
                raise ValueError(f"decoder_noise: expected [B*M, T, D] = {(N, T, x.shape[-1])} (position layout), "
                                 f"got {tuple(decoder_noise.shape)}")
            ids_masked = ids_restore.argsort(dim=1)[:, K:]  # ids_shuffle's masked part, in its order
            noise = torch.gather(decoder_noise, 1, ids_masked.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            noise = noise.to(x.dtype)
        dec_in = decoder_input(x[:, n_extra:], ids_restore, cfg.mask_noise_std, noise=noise, generator=generator)
        pred = self._decode(dec_in)  # [N, T, D]

        # teacher targets
        with torch.no_grad():
            y = self._targets(source)  # [B, T, D] fp32

        # losses (the reference's insertion order: cls, then regression)
        losses: dict[str, Tensor] = {}
        if cfg.cls_loss > 0:
            losses["cls"] = cls_regression_loss(cls_pred, y, clones=M, scale=cfg.scale) * (cfg.cls_loss * sample_size)
        losses["regression"] = masked_regression_loss(
            pred, y, mask, clones=M, scale=cfg.scale, beta=cfg.loss_beta, reduction="sum"
        )
        loss = sum(losses.values())

        with torch.no_grad():
            counts = mask.view(B, M, T).sum(1)
            logs = {
                "target_var": _weighted_var(y, counts),
                "masked_pct": torch.tensor(1.0 - K / T),
                "ema_decay": torch.tensor(self.ema_decay),
            }
            if self.log_pred_var:
                logs["pred_var"] = _weighted_var(pred.detach(), mask)
        return Data2Vec2Output(loss=loss, losses=losses, sample_size=sample_size, pred=pred, targets=y,
                               mask=mask, cls_pred=cls_pred, logs=logs)


def _weighted_var(x: Tensor, weight: Tensor) -> Tensor:
    """The reference's compute_var of the rows x[n, t] repeated weight[n, t] times (weight: counts):
    mean over channels of sqrt(unbiased variance over those rows + 1e-6), in fp32, without gathering
    (the masked-target matrix of a ViT-B batch would be ~2 GB)."""
    x = x.float()
    w = weight.to(torch.float32).unsqueeze(-1)
    n = w.sum()
    mean = (x * w).sum((0, 1)) / n
    var = ((x - mean).square() * w).sum((0, 1)) / (n - 1)
    return torch.sqrt(var + 1e-6).mean()
