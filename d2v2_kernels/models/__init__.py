"""Models built on the d2v2_kernels ops: data2vec 2.0 for images (audio and text: issue 7)."""

from .data2vec2 import IMAGE_PRESETS, Data2Vec2Image, Data2Vec2ImageConfig, Data2Vec2Output, ImageEncoder
from .masking import MaskInfo, inverse_block_mask_2d, make_mask_info, mask_to_ids, random_mask
from .vit import AltBlock, Attention, PatchEmbed, Prenet, sincos_pos_embed_2d

__all__ = [
    "AltBlock",
    "Attention",
    "Data2Vec2Image",
    "Data2Vec2ImageConfig",
    "Data2Vec2Output",
    "IMAGE_PRESETS",
    "ImageEncoder",
    "MaskInfo",
    "PatchEmbed",
    "Prenet",
    "inverse_block_mask_2d",
    "make_mask_info",
    "mask_to_ids",
    "random_mask",
    "sincos_pos_embed_2d",
]

from .mae import MAE, MAEConfig  # noqa: E402  (issue 6: the MAE baseline)

__all__ += ["MAE", "MAEConfig"]
