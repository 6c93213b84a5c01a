"""Modules built on the fused ops."""

from .ema_teacher import EMATeacher

__all__ = ["EMATeacher"]
