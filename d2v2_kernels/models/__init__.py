"""Models built on the d2v2_kernels ops: data2vec 2.0 for images, audio and text, and the MAE baseline."""

from .data2vec2 import IMAGE_PRESETS, Data2Vec2Image, Data2Vec2ImageConfig, Data2Vec2Output, ImageEncoder
from .data2vec2_audio import AUDIO_PRESETS, Data2Vec2Audio, Data2Vec2AudioConfig
from .data2vec2_text import TEXT_PRESETS, Data2Vec2Text, Data2Vec2TextConfig
from .masking import MaskInfo, inverse_block_mask_2d, make_mask_info, mask_to_ids, random_mask
from .vit import AltBlock, Attention, PatchEmbed, Prenet, sincos_pos_embed_2d

__all__ = [
    "AUDIO_PRESETS",
    "AltBlock",
    "Attention",
    "Data2Vec2Audio",
    "Data2Vec2AudioConfig",
    "Data2Vec2Image",
    "Data2Vec2ImageConfig",
    "Data2Vec2Output",
    "Data2Vec2Text",
    "Data2Vec2TextConfig",
    "IMAGE_PRESETS",
    "ImageEncoder",
    "MaskInfo",
    "PatchEmbed",
    "Prenet",
    "TEXT_PRESETS",
    "inverse_block_mask_2d",
    "make_mask_info",
    "mask_to_ids",
    "random_mask",
    "sincos_pos_embed_2d",
]

from .mae import MAE, MAEConfig  # noqa: E402

__all__ += ["MAE", "MAEConfig"]
