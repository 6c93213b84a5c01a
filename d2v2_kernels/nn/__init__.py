"""Modules built on the fused ops."""

from .conv_decoder import ConvDecoder1d, ConvDecoder2d
from .ema_teacher import EMATeacher

__all__ = ["ConvDecoder1d", "ConvDecoder2d", "EMATeacher"]
