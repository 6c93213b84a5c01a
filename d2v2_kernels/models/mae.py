"""MAE (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"), the baseline data2vec 2.0 is
compared with, as its authors define it (facebookresearch/mae `models_mae.py`); our own code.

One training step (`MAE.forward`):

  encoder  patch embed + fixed 2-D sin-cos positions                          [B, T, D]
           random masking: per-sample noise argsort, the first int(T * (1 - mask_ratio)) kept;
           dk.gather_visible takes the visible tokens                           [B, K, D]
           CLS token (+ its zero position) prepended, pre-LN blocks, final norm  [B, 1+K, D]
  decoder  decoder_embed Linear; the learned mask token at every masked position, tokens put back in
           image order (ids_restore); fixed sin-cos decoder positions (zero for CLS); pre-LN blocks,
           norm, prediction Linear to p*p*C pixel values per patch; CLS dropped  [B, T, p*p*C]
  loss     per-patch normalised pixels (mean and unbiased variance over the patch's p*p*C values,
           eps 1e-6 on the variance), mean squared error over a patch's values, averaged over the
           masked patches only (dk.masked_regression_loss with scale 1 / (p*p*C), "mean")

Conventions as in `models_mae.py`: `patchify` orders a patch's values (row, column, channel); the
masking keeps `ids_shuffle[:, :len_keep]` of `ids_shuffle = argsort(noise)` and `ids_restore =
argsort(ids_shuffle)`; the mask is True (the reference: 1) = masked = counted in the loss. Parameter
names are the reference's (`patch_embed.proj`, `cls_token`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}`, `norm`, `decoder_embed`, `mask_token`, `decoder_blocks`, `decoder_norm`,
`decoder_pred`; `pos_embed` / `decoder_pos_embed` are buffers here, frozen parameters there).

Init as the reference's `initialize_weights`: Linear Xavier-uniform with zero bias, LayerNorm (1, 0), the
patch-embed conv Xavier-uniform on its weight viewed as [D, C*p*p] (its bias PyTorch's default), CLS and
mask tokens N(0, 0.02^2).

Attention: vit.py's `Attention` (one qkv Linear, F.scaled_dot_product_attention). On CPU in bf16/fp16
(autocast), PyTorch's SDPA is several times slower than matmul + softmax at these sizes (measured: see
`MAEConfig.attn_impl`), so `attn_impl="auto"` takes matmul + softmax (fp32 softmax) there and SDPA
everywhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.gather import gather_visible
from ..ops.loss import masked_regression_loss
from .vit import ATTN_IMPLS, Attention, Mlp, PatchEmbed, sincos_pos_embed_2d

__all__ = ["MAE", "MAEBlock", "MAEConfig", "MAE_PRESETS", "patchify", "unpatchify"]



@dataclass
class MAEConfig:
    """Everything that defines MAE. Defaults: the reference's `mae_vit_base_patch16` (ViT-B/16 encoder,
    8 x 512-wide decoder blocks with 16 heads, 75% masking); `preset(name)` gives the others."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6  # the reference's partial(nn.LayerNorm, eps=1e-6), encoder and decoder
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # the reference's default is False; its pretraining recipe turns it on
    # "sdpa": F.scaled_dot_product_attention always; "math": q k^T -> fp32 softmax -> @ v always;
    # "auto": math on CPU for bf16/fp16 activations, sdpa otherwise. Forward + backward of one
    # attention on the 2-core CPU (fmnist-small, batch 128): encoder (13 tokens, 3 x 64) fp32 sdpa 3.4 ms
    # / math 6.2 ms, bf16 sdpa 12.4 ms / math 2.1 ms; decoder (50 tokens, 4 x 32) fp32 9.0 / 12.0 ms,
    # bf16 35.4 / 5.3 ms (min of 40 interleaved runs). A whole fmnist-small training step (1 thread, busy
    # machine, min of 10): fp32 sdpa 597 ms, bf16 sdpa 418 ms, bf16 math 198 ms.
    attn_impl: str = "auto"

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
        """Visible patches per image: int(T * (1 - mask_ratio)), as the reference."""
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def patch_dim(self) -> int:
        """Pixel values per patch (the prediction width): p * p * in_chans."""
        return self.patch_size * self.patch_size * self.in_chans

    def validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for name, dim, heads in (("embed_dim", self.embed_dim, self.num_heads),
                                 ("decoder_dim", self.decoder_dim, self.decoder_heads)):
            if dim % heads:
                raise ValueError(f"{name} {dim} is not divisible by its {heads} heads")
            if dim % 4:
                raise ValueError(f"{name} {dim}: the 2-D sin-cos positions need a multiple of 4")
        if self.depth < 1 or self.decoder_depth < 0:
            raise ValueError(f"expected depth >= 1 and decoder_depth >= 0, got {self.depth}, {self.decoder_depth}")
        if not 0 < self.len_keep < self.num_patches:
            raise ValueError(f"mask_ratio {self.mask_ratio} keeps {self.len_keep} of {self.num_patches} patches; "
                             "expected some visible and some masked")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {self.attn_impl!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "MAEConfig":
        if name not in MAE_PRESETS:
            raise ValueError(f"unknown MAE preset {name!r}; choose from {', '.join(MAE_PRESETS)}")
        return cls(**{**MAE_PRESETS[name], **overrides})

    def replace(self, **changes) -> "MAEConfig":
        return dataclasses.replace(self, **changes)


MAE_PRESETS: dict[str, dict] = {
    "base": {},  # mae_vit_base_patch16
    "large": dict(embed_dim=1024, depth=24, num_heads=16),  # mae_vit_large_patch16
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),  # mae_vit_huge_patch14
    # the calibration run's MAE (shared/spec/calibration.md): 28 px, patch 4, width 192, depth 6
    "fmnist-small": dict(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3,
                         decoder_dim=128, decoder_depth=2, decoder_heads=4),
}


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, h*w, p*p*C], patches row-major, a patch's values in (row, column, channel)
    order (the reference's einsum 'nchpwq->nhwpqc')."""
    B, C, H, W = images.shape
    p = patch_size
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> Tensor:
    """The inverse of `patchify`: [B, h*w, p*p*C] -> [B, C, h*p, w*p]."""
    B = patches.shape[0]
    h, w = grid
    p = patch_size
    x = patches.reshape(B, h, w, p, p, in_chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, in_chans, h * p, w * p)


class MAEBlock(nn.Module):
    """timm's pre-LN ViT Block as MAE uses it (qkv bias, no dropout, no drop path, no layer scale):

        x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 attn_impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True, impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_weights(module: nn.Module) -> None:
    """The reference's `_init_weights`: Linear Xavier-uniform, zero bias; LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MAE(nn.Module):
    """MAE with a ViT encoder and a transformer decoder (see the module docstring).

    `loss, pred, mask = model(images)` draws a fresh random mask (from `generator`); `loss` is the mean
    over masked patches of the per-patch mean squared error (fp32). `extract_features(images)` runs the
    encoder on every patch, in image order: [B, 1+T, D] after the final norm, CLS first.
    """

    def __init__(self, config: MAEConfig | None = None, **overrides):
        super().__init__()
        config = config or MAEConfig()
        if overrides:
            config = config.replace(**overrides)
        config.validate()
        self.config = cfg = config
        D, Dd = cfg.embed_dim, cfg.decoder_dim

        # encoder
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)  # conv: Xavier on [D, C*p*p]
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", _with_cls_row(sincos_pos_embed_2d(D, grid)))  # [1, 1+T, D]
        self.blocks = nn.ModuleList(
            MAEBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_impl) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)

        # decoder
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_buffer("decoder_pos_embed", _with_cls_row(sincos_pos_embed_2d(Dd, grid)))  # [1, 1+T, Dd]
        self.decoder_blocks = nn.ModuleList(
            MAEBlock(Dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_impl)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_dim)

        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    # --- masking ---------------------------------------------------------------------------------

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def random_masking(self, batch_size: int, *, generator: torch.Generator | None = None,
                       device=None) -> tuple[Tensor, Tensor, Tensor]:
        """(ids_keep [B, K], ids_restore [B, T], mask [B, T] bool, True = masked) of the reference's
        random masking: per sample U(0, 1) noise over the T patches (drawn from `generator`, on its
        device, then moved to `device`), ids_shuffle = argsort(noise), the first K = len_keep kept,
        ids_restore = argsort(ids_shuffle)."""
        T, K = self.num_patches, self.config.len_keep
        draw = generator.device if generator is not None else (device if device is not None else "cpu")
        noise = torch.rand(batch_size, T, generator=generator, device=draw)
        if device is not None:
            noise = noise.to(device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        return ids_shuffle[:, :K], ids_restore, ids_restore >= K

    def _resolve_masks(self, B: int, device, ids_keep, ids_restore, mask, generator):
        T = self.num_patches
        if ids_keep is None and ids_restore is None:
            if mask is None:
                return self.random_masking(B, generator=generator, device=device)
            mask = _check_mask(mask, B, T)
            visible = T - mask.sum(1)
            if not bool((visible == visible[0]).all()):
                raise ValueError(f"mask: every row must have the same number of visible patches, got counts "
                                 f"{sorted(set(visible.tolist()))}")
            K = int(visible[0])
            # visible positions first (increasing), then the masked ones (increasing)
            ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
            return ids_shuffle[:, :K], ids_shuffle.argsort(dim=1), mask
        if ids_keep is None:
            raise ValueError("ids_restore given without ids_keep")
        if ids_keep.dim() != 2 or ids_keep.shape[0] != B:
            raise ValueError(f"ids_keep: expected [B={B}, K], got shape {tuple(ids_keep.shape)}")
        K = ids_keep.shape[1]
        if not 0 < K < T:
            raise ValueError(f"ids_keep: expected 0 < K < T={T} visible patches per row, got K={K}")
        ids_keep = ids_keep.long()
        if ids_restore is None:
            # ids_shuffle = [ids_keep as given, the other positions in increasing order]
            visible = torch.zeros(B, T, dtype=torch.bool, device=ids_keep.device).scatter_(1, ids_keep, True)
            rest = torch.argsort(visible.to(torch.uint8), dim=1, stable=True)[:, : T - K]
            ids_shuffle = torch.cat([ids_keep, rest], dim=1)
            ids_restore = ids_shuffle.argsort(dim=1)
        elif tuple(ids_restore.shape) != (B, T):
            raise ValueError(f"ids_restore: expected [B, T] = {(B, T)}, got shape {tuple(ids_restore.shape)}")
        ids_restore = ids_restore.long()
        mask = ids_restore >= K if mask is None else _check_mask(mask, B, T)
        return ids_keep, ids_restore, mask

    # --- encoder / decoder -----------------------------------------------------------------------

    def forward_encoder(self, images: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """[B, C, H, W] -> [B, 1+K, D] after the final norm (K = ids_keep.shape[1], or all T patches in
        image order when ids_keep is None)."""
        x = self.patch_embed(images)
        x = x + self.pos_embed[:, 1:].to(x.dtype)
        if ids_keep is not None:
            x = gather_visible(x, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        """Encoder output [B, 1+K, D] -> pixel predictions [B, T, p*p*C] for every patch (CLS dropped)."""
        x = self.decoder_embed(x)
        B, L, Dd = x.shape
        T = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, T + 1 - L, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # back in image order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def targets(self, images: Tensor) -> Tensor:
        """The regression targets [B, T, p*p*C] fp32: patchified pixels, per-patch normalised (mean and
        unbiased variance, eps 1e-6) when `norm_pix_loss`."""
        target = patchify(images.float(), self.config.patch_size)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked patches of the mean squared error over a patch's values (fp32)."""
        target = self.targets(images)
        return masked_regression_loss(pred, target, mask, clones=1, scale=1.0 / target.shape[-1], reduction="mean")

    def extract_features(self, images: Tensor) -> Tensor:
        """The encoder on unmasked images: [B, 1+T, D] after the final norm, CLS first, image order."""
        return self.forward_encoder(images)

    def forward(
        self,
        images: Tensor,
        ids_keep: Tensor | None = None,
        ids_restore: Tensor | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One MAE step's forward for images [B, C, H, W] -> (loss, pred [B, T, p*p*C], mask [B, T] bool).

        With no ids and no mask, draws the reference's random masking from `generator`. ids_keep
        [B, K] (the visible patches in the encoder's order) with ids_restore [B, T] (position t -> its
        index in [visible, masked]) inject a masking; ids_keep alone completes ids_shuffle with the
        other patches in increasing order; a mask [B, T] (True = masked) alone gives ids with visible
        patches in increasing order. `mask` defaults to ids_restore >= K.
        """
        if images.dim() != 4:
            raise ValueError(f"images: expected [B, C, H, W], got shape {tuple(images.shape)}")
        ids_keep, ids_restore, mask = self._resolve_masks(
            images.shape[0], images.device, ids_keep, ids_restore, mask, generator
        )
        latent = self.forward_encoder(images, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(images, pred, mask)
        return loss, pred, mask


def _with_cls_row(table: Tensor) -> Tensor:
    """[T, D] -> [1, 1+T, D] with a zero first row (the CLS position, as the reference)."""
    return torch.cat([table.new_zeros(1, table.shape[1]), table], dim=0).unsqueeze(0)


def _check_mask(mask: Tensor, B: int, T: int) -> Tensor:
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask: expected [B, T] = {(B, T)}, got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0
