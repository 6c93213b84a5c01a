"""d2v2-kernels: fused ops and a slim trainer for data2vec 2.0.

Ops (see shared/spec/ops.md for the contract): gather_visible, decoder_input, ema_update_,
layer_average_targets, masked_regression_loss / cls_regression_loss, conv_decoder_block.
Modules: EMATeacher, TargetLayerBuffer, ConvDecoder1d / ConvDecoder2d.
Backends: set_backend / use_backend / D2V2_BACKEND, available_backends(), build_info().
Pretrained: from_fairseq(path) (the authors' checkpoints, read safely), save_pretrained / from_pretrained.
"""

from .backends import available_backends, build_info, get_backend, set_backend, use_backend
from .ops.gather import gather_visible
from .ops.decoder_input import decoder_input
from .ops.ema import ema_update_
from .ops.targets import TargetLayerBuffer, layer_average_targets
from .ops.loss import cls_regression_loss, masked_regression_loss
from .ops.conv_decoder import conv_decoder_block
from .nn import ConvDecoder1d, ConvDecoder2d, EMATeacher

__all__ = [
    "ConvDecoder1d",
    "ConvDecoder2d",
    "EMATeacher",
    "TargetLayerBuffer",
    "available_backends",
    "build_info",
    "cls_regression_loss",
    "conv_decoder_block",
    "decoder_input",
    "ema_update_",
    "gather_visible",
    "get_backend",
    "layer_average_targets",
    "masked_regression_loss",
    "set_backend",
    "use_backend",
]
__version__ = "0.1.0"

_PRETRAINED = ("from_fairseq", "from_pretrained", "save_pretrained")
__all__ += list(_PRETRAINED)


def __getattr__(name):  # imported on first use: the models are not needed to use the ops
    if name in _PRETRAINED:
        from . import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'd2v2_kernels' has no attribute {name!r}")
