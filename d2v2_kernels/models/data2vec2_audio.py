"""data2vec 2.0 for speech (data2vec2.md, golden/PARITY_NOTES.md §3-§4), built on the d2v2_kernels ops.

One training step (`Data2Vec2Audio.forward`), waveform `source` [B, L] (already normalised per utterance,
as the reference's dataset does with `task.normalize`):

  local    wav2vec2 conv feature extractor (layer-norm mode, no conv bias) [B, C, T], then LayerNorm +
           Linear to the model width: the "local features" [B, T, D], computed once per utterance
  student  the M clones with their masked frames zeroed go through the conv positional encoder at full
           length [B*M, T, D]; dk.gather_visible takes the kept frames of the (un-zeroed) local features
           and of those positions [B*M, K, D]; ALiBi (learned per-head scale, clamped >= 0) gathered to
           the kept rows and columns; prenet LayerNorm (+ blocks), main blocks
  decoder  dk.decoder_input (visible outputs back in place, N(0, 0.01^2) noise elsewhere), ConvDecoder1d
  teacher  EMA copy of the positional encoder, ALiBi scale, prenet and blocks, fed the student's own
           local features (the CNN and projection are shared, not averaged), unmasked, under no grad;
           its top-K FFN outputs go straight into a TargetLayerBuffer
  targets  dk.layer_average_targets: instance norm per layer -> average (no final norm)  [B, T, D] fp32
  loss     dk.masked_regression_loss, sum over masked frames, scale 1 / sqrt(D)

Every op goes through d2v2_kernels, so `with dk.use_backend("reference"):` runs the same model unfused.
Loss convention as the image model (`Data2Vec2Output`, with `cls_pred=None`: audio has no CLS token):
`loss` is the sum, the objective is `loss / sample_size`.

Padding (`padding_mask` [B, L] bool over the waveform samples, True = padded: fairseq's convention,
right padding only) is honoured end to end; the released configs crop every batch to its shortest
utterance (`task.enable_padding=false`), as does the golden run, so none of this is ever used there:

  frames   each utterance's frame count from its number of non-padded samples through the CNN,
           floor((n - kernel) / stride + 1) per layer (fairseq `AudioEncoder.convert_padding_mask`);
           frames from there on are padded [B, T]. Valid frames only see valid samples; padded samples
           are set to 0 first (what the reference's collater pads with), so their content never matters.
  masks    drawn exactly as without padding (the same count on every row, which dk.gather_visible
           needs): a masked pad is simply not counted, a visible pad is a key nobody attends to. The
           reference instead draws the spans inside each utterance (compute_mask_indices with its
           padding mask, require_same_masks), which cannot keep equal counts exactly.
  attention  padded keys are never attended to, in the prenet and the main blocks: the student's
           frame mask is gathered to its kept frames like the tokens, the teacher's is the full one;
           with ALiBi both go in one additive float mask (bias, -inf at padded keys). A student row whose
           kept frames are all padding keeps its keys (an all -inf row would give NaN).
  pos conv padded frames are zeroed before every positional conv layer (wav2vec 2.0 zeroes them before
           the first only, fairseq's data2vec 2.0 not at all), so valid frames see exactly the zero
           padding of an unpadded utterance of their length: with the attention and target handling, a
           padded utterance's teacher targets are those of the utterance alone (to float rounding).
  decoder  sees the whole padded row, as the reference (visible pads' outputs, noise at masked pads).
  targets  the instance-norm statistics run over valid frames only (dk.layer_average_targets with the
           frame mask); padded targets are 0. The reference normalises over the pads too.
  loss     masked pads are not counted: not in the loss, not in `sample_size`, not in the variance
           logs. The reference counts them.

Without padding (`padding_mask` None, or no frame padded) the computation is exactly the unpadded one.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ConvDecoder1d, EMATeacher
from ..ops.conv_decoder import conv_decoder_block
from ..ops.decoder_input import decoder_input
from ..ops.gather import gather_visible
from ..ops.loss import masked_regression_loss
from ..ops.targets import TargetLayerBuffer
from . import masking
from .data2vec2 import Data2Vec2Image, Data2Vec2Output, _weighted_var, fairseq_target_norms
from .vit import AltBlock, Prenet, init_bert_params

__all__ = [
    "AUDIO_PRESETS",
    "AlibiBias",
    "AudioEncoder",
    "ConvFeatureExtractor",
    "ConvPositionalEncoder",
    "Data2Vec2Audio",
    "Data2Vec2AudioConfig",
    "alibi_slopes",
    "block_mask_1d",
    "block_mask_1d_counts",
    "conv_output_lengths",
    "frame_padding_mask",
    "parse_feature_encoder_spec",
]

_NORMS = (None, "instance", "layer")
# wav2vec 2.0's CNN: 20 ms frames (stride 320) with a 400-sample receptive field
WAV2VEC2_SPEC = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


def parse_feature_encoder_spec(spec) -> tuple[tuple[int, int, int], ...]:
    """The reference's `feature_encoder_spec` ("[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...", which it
    `eval`s) or a sequence of (dim, kernel, stride) -> a tuple of int triples. Only list/tuple literals of
    ints, `+` and `*` are accepted (no eval)."""
    if not isinstance(spec, str):
        layers = tuple(tuple(int(v) for v in layer) for layer in spec)
    else:
        def ev(node):
            if isinstance(node, (ast.List, ast.Tuple)):
                return [ev(e) for e in node.elts] if isinstance(node, ast.List) else tuple(ev(e) for e in node.elts)
            if isinstance(node, ast.Constant) and isinstance(node.value, int):
                return node.value
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
                left, right = ev(node.left), ev(node.right)
                return left + right if isinstance(node.op, ast.Add) else left * right
            raise ValueError(f"feature_encoder_spec: unsupported expression {ast.dump(node)} in {spec!r}")

        try:
            value = ev(ast.parse(spec, mode="eval").body)
        except SyntaxError as e:
            raise ValueError(f"feature_encoder_spec: not a Python expression: {spec!r}") from e
        layers = tuple(tuple(int(v) for v in layer) for layer in value)
    if not layers or any(len(layer) != 3 or min(layer) < 1 for layer in layers):
        raise ValueError(f"feature_encoder_spec: expected (dim, kernel, stride) triples of positive ints, got {spec!r}")
    return layers


@dataclass
class Data2Vec2AudioConfig:
    """Everything that defines the audio model and its loss. Defaults: the released base config (fairseq
    `base_audio_only_task.yaml`); `preset(name)` gives the others, `from_fairseq(cfg)` reads a reference
    config (a checkpoint's `cfg` or its `model` section)."""

    # local encoder
    feature_encoder_spec: tuple = WAV2VEC2_SPEC  # (dim, kernel, stride) per CNN layer
    # encoder
    embed_dim: int = 768
    depth: int = 12  # main blocks (targets come from these)
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    prenet_depth: int = 0
    conv_pos_width: int = 95  # kernel = max(3, width // depth)
    conv_pos_depth: int = 5
    conv_pos_groups: int = 16
    use_alibi: bool = True
    alibi_scale: float = 1.0  # initial value of the learned scale
    learned_alibi_scale: bool = True
    alibi_scale_per_head: bool = True
    # dropouts (the released audio config trains with 0.1 and layerdrop 0.05)
    encoder_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    post_mlp_drop: float = 0.1
    prenet_dropout: float = 0.1
    dropout_input: float = 0.0  # on the prenet output, before the main blocks
    layerdrop: float = 0.05  # student main blocks skipped at random in training
    start_drop_path_rate: float = 0.0
    end_drop_path_rate: float = 0.0
    # multi-mask
    clone_batch: int = 8
    mask_prob: float = 0.5
    mask_length: int = 5  # frames per span of 1-D block masking
    mask_prob_adjust: float = 0.05
    inverse_mask: bool = False
    mask_noise_std: float = 0.01
    # targets
    average_top_k_layers: int = 8
    target_layer_norm: str | None = "instance"
    target_final_norm: str | None = None
    # decoder
    decoder_dim: int = 384
    decoder_layers: int = 4
    decoder_kernel: int = 7
    decoder_groups: int = 16
    decoder_residual: bool = True
    decoder_input_dropout: float = 0.1
    # loss
    loss_scale: float | None = None  # None: 1 / sqrt(embed_dim)
    loss_beta: float = 0.0
    # teacher
    ema_decay: float = 0.999
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 75_000

    def __post_init__(self):
        self.feature_encoder_spec = parse_feature_encoder_spec(self.feature_encoder_spec)
        self.validate()

    @property
    def conv_pos_kernel(self) -> int:
        return max(3, self.conv_pos_width // self.conv_pos_depth)

    def num_frames(self, num_samples: int) -> int:
        """Frames of the CNN for a waveform of `num_samples` (1 + (L - k) // s per layer)."""
        T = int(num_samples)
        for _, k, s in self.feature_encoder_spec:
            T = (T - k) // s + 1
        return T

    def len_keep(self, num_frames: int) -> int:
        """Visible frames per masked copy of a T-frame utterance (exact; the same for every row)."""
        _, selected = block_mask_1d_counts(num_frames, self.mask_prob, self.mask_length, self.mask_prob_adjust,
                                           self.inverse_mask)
        return selected if self.inverse_mask else num_frames - selected

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.embed_dim) if self.loss_scale is None else float(self.loss_scale)

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 1 <= self.average_top_k_layers <= self.depth:
            raise ValueError(f"average_top_k_layers {self.average_top_k_layers} must be in [1, depth={self.depth}]")
        if self.clone_batch < 1:
            raise ValueError(f"clone_batch must be >= 1, got {self.clone_batch}")
        if self.mask_length < 1 or not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"masking: expected mask_length >= 1 and 0 < mask_prob < 1, got {self.mask_length}, "
                             f"{self.mask_prob}")
        if self.target_layer_norm not in _NORMS or self.target_final_norm not in _NORMS:
            raise ValueError(f"target norms: expected one of {_NORMS}, got {self.target_layer_norm!r}, "
                             f"{self.target_final_norm!r}")
        if self.embed_dim % self.decoder_groups or self.decoder_dim % self.decoder_groups:
            raise ValueError(f"decoder_groups {self.decoder_groups} must divide embed_dim {self.embed_dim} and "
                             f"decoder_dim {self.decoder_dim}")
        if self.conv_pos_depth < 1 or self.embed_dim % self.conv_pos_groups:
            raise ValueError(f"conv positional encoder: expected depth >= 1 and groups dividing embed_dim "
                             f"{self.embed_dim}, got depth {self.conv_pos_depth}, groups {self.conv_pos_groups}")
        if not 0.0 <= self.layerdrop < 1.0:
            raise ValueError(f"layerdrop: expected a probability in [0, 1), got {self.layerdrop}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Data2Vec2AudioConfig":
        if name not in AUDIO_PRESETS:
            raise ValueError(f"unknown audio preset {name!r}; choose from {', '.join(AUDIO_PRESETS)}")
        return cls(**{**AUDIO_PRESETS[name], **overrides})

    def replace(self, **changes) -> "Data2Vec2AudioConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_fairseq(cls, cfg: dict) -> "Data2Vec2AudioConfig":
        """From a reference config: a checkpoint's `cfg` (plain dict) or its `model` section. Settings
        this model does not implement raise instead of being ignored."""
        model = cfg.get("model", cfg)
        aud = model["modalities"]["audio"]
        dec = aud["decoder"]
        unsupported = {
            "layer_norm_first=True (pre-LN blocks)": model.get("layer_norm_first", False),
            "end_of_block_targets=True": model.get("end_of_block_targets", False),
            "ema_encoder_only=True": model.get("ema_encoder_only", False),
            "cls_loss > 0 (audio has no CLS token)": model.get("cls_loss", 0.0) > 0,
            "recon_loss > 0": model.get("recon_loss", 0.0) > 0,
            "d2v_loss != 1": model.get("d2v_loss", 1.0) != 1.0,
            "shared_decoder": model.get("shared_decoder") is not None,
            "modalities.audio.num_extra_tokens != 0": aud.get("num_extra_tokens", 0) != 0,
            "extractor_mode != 'layer_norm'": aud.get("extractor_mode", "layer_norm") != "layer_norm",
            "conv_pos_pre_ln=True": aud.get("conv_pos_pre_ln", False),
            "learned_alibi=True": aud.get("learned_alibi", False),
            "learned_alibi_scale_per_layer=True": aud.get("learned_alibi_scale_per_layer", False),
            "num_alibi_heads != num_heads": aud.get("use_alibi_encoder", False)
                and int(aud.get("num_alibi_heads", model["num_heads"])) != int(model["num_heads"]),
            "ema_local_encoder=True (the audio teacher shares the student's CNN)": aud.get("ema_local_encoder", False),
            "encoder_zero_mask=False": not aud.get("encoder_zero_mask", True),
            "local_grad_mult != 1": float(aud.get("local_grad_mult", 1.0)) != 1.0,
            "mask_prob_min": aud.get("mask_prob_min") is not None,
            "mask_dropout > 0": aud.get("mask_dropout", 0.0) > 0,
            "add_masks / remove_masks": aud.get("add_masks", False) or aud.get("remove_masks", False),
            "keep_masked_pct > 0": aud.get("keep_masked_pct", 0.0) > 0,
            "mask_channel_prob > 0": aud.get("mask_channel_prob", 0.0) > 0,
            "prenet drop path / layerdrop with prenet blocks": int(aud.get("prenet_depth", 0)) > 0 and (
                aud.get("prenet_layerdrop", 0.0) > 0 or aud.get("start_drop_path_rate", 0.0) > 0
                or aud.get("end_drop_path_rate", 0.0) > 0),
            "decoder.add_positions_*": dec.get("add_positions_masked", False) or dec.get("add_positions_all", False),
            "decoder.projection_layers != 1": dec.get("projection_layers", 1) != 1,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"unsupported reference audio settings: {', '.join(bad)}")
        layer_norm, final_norm = fairseq_target_norms(model)  # raises on unsupported target norms
        return cls(
            feature_encoder_spec=aud["feature_encoder_spec"],
            embed_dim=int(model["embed_dim"]), depth=int(model["depth"]), num_heads=int(model["num_heads"]),
            mlp_ratio=float(model["mlp_ratio"]), norm_eps=float(model["norm_eps"]),
            prenet_depth=int(aud["prenet_depth"]),
            conv_pos_width=int(aud["conv_pos_width"]), conv_pos_depth=int(aud["conv_pos_depth"]),
            conv_pos_groups=int(aud["conv_pos_groups"]),
            use_alibi=bool(aud["use_alibi_encoder"]), alibi_scale=float(aud["alibi_scale"]),
            learned_alibi_scale=bool(aud["learned_alibi_scale"]),
            alibi_scale_per_head=bool(aud["learned_alibi_scale_per_head"]),
            encoder_dropout=float(model["encoder_dropout"]), attention_dropout=float(model["attention_dropout"]),
            activation_dropout=float(model["activation_dropout"]), post_mlp_drop=float(model["post_mlp_drop"]),
            prenet_dropout=float(aud["prenet_dropout"]), dropout_input=float(model.get("dropout_input", 0.0)),
            layerdrop=float(model["layerdrop"]),
            start_drop_path_rate=float(model["start_drop_path_rate"]),
            end_drop_path_rate=float(model["end_drop_path_rate"]),
            clone_batch=int(model["clone_batch"]), mask_prob=float(aud["mask_prob"]),
            mask_length=int(aud["mask_length"]), mask_prob_adjust=float(aud["mask_prob_adjust"]),
            inverse_mask=bool(aud["inverse_mask"]), mask_noise_std=float(aud["mask_noise_std"]),
            average_top_k_layers=int(model["average_top_k_layers"]),
            target_layer_norm=layer_norm, target_final_norm=final_norm,
            decoder_dim=int(dec["decoder_dim"]), decoder_layers=int(dec["decoder_layers"]),
            decoder_kernel=int(dec["decoder_kernel"]), decoder_groups=int(dec["decoder_groups"]),
            decoder_residual=bool(dec["decoder_residual"]), decoder_input_dropout=float(dec["input_dropout"]),
            loss_scale=None if model.get("loss_scale") is None else float(model["loss_scale"]),
            loss_beta=float(model["loss_beta"]),
            ema_decay=float(model["ema_decay"]), ema_end_decay=float(model["ema_end_decay"]),
            ema_anneal_end_step=int(model["ema_anneal_end_step"]),
        )


def conv_output_lengths(lengths: Tensor, spec) -> Tensor:
    """Frames of the CNN for waveforms of `lengths` samples (an int tensor): fairseq's
    get_feat_extract_output_lengths, floor((n - kernel) / stride + 1) per layer, in integer arithmetic
    (exact). A result <= 0 means no frame."""
    lengths = lengths.long()
    for _, k, s in parse_feature_encoder_spec(spec):
        lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
    return lengths


def frame_padding_mask(padding_mask: Tensor, spec, num_frames: int | None = None) -> Tensor:
    """Sample padding [B, L] (bool, True = padded) -> frame padding [B, T] (T: the CNN frames of L
    samples unless given): frame t of an utterance with n non-padded samples is padded when
    t >= conv_output_lengths(n), as fairseq's `AudioEncoder.convert_padding_mask`."""
    spec = parse_feature_encoder_spec(spec)
    if num_frames is None:
        num_frames = int(conv_output_lengths(torch.tensor(padding_mask.shape[1]), spec))
    lengths = conv_output_lengths((~padding_mask).sum(-1), spec)
    return torch.arange(num_frames, device=padding_mask.device)[None] >= lengths[:, None]


AUDIO_PRESETS: dict[str, dict] = {
    # the released base config (base_audio_only_task.yaml): 12 blocks of 768, 5 conv-pos layers of k=19
    "base": {},
    # the golden data's tiny config (shared/golden/audio): 3-layer CNN of 32 (49 frames per second),
    # width 48, 4 blocks, 2 conv-pos layers of k=7, decoder 2 x 32, no dropout
    "golden-tiny": dict(
        feature_encoder_spec=((32, 10, 5), (32, 8, 8), (32, 8, 8)), embed_dim=48, depth=4, num_heads=4,
        conv_pos_width=14, conv_pos_depth=2, encoder_dropout=0.0, attention_dropout=0.0, post_mlp_drop=0.0,
        prenet_dropout=0.0, layerdrop=0.0, clone_batch=2, average_top_k_layers=3, decoder_dim=32,
        decoder_layers=2, decoder_input_dropout=0.0, ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10),
}


# --- 1-D block masking ------------------------------------------------------------------------------


def block_mask_1d_counts(num_frames: int, mask_prob: float, mask_length: int, mask_prob_adjust: float = 0.0,
                         inverse: bool = False) -> tuple[int, int]:
    """(span starts drawn, exact number of selected frames) as the reference (`compute_block_mask_1d`)
    computes them: p = 1 - mask_prob when inverse (the spans are then the visible frames) else
    mask_prob; starts = int(T * ((p + adjust) / mask_length)), selected = int(T * p). The float
    expressions are the reference's own: base (T=49, 0.5, 5, 0.05) gives 5 starts and 24 masked."""
    p = 1 - mask_prob if inverse else mask_prob
    return int(num_frames * ((p + mask_prob_adjust) / mask_length)), int(num_frames * p)


def block_mask_1d(
    num_masks: int,
    num_frames: int,
    mask_prob: float = 0.5,
    mask_length: int = 5,
    mask_prob_adjust: float = 0.05,
    *,
    inverse: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """data2vec 2.0's audio masks: [num_masks, T] bool (True = masked), one independent mask per row.

    Draw `int(T * (R + A) / B)` random span centres with replacement, select the B frames around each
    (offsets -B//2 .. B-1-B//2, clamped to [0, T)), then drop or add uniformly random single frames
    until exactly `int(T * R)` are selected (without `inverse` the selected frames are the masked ones).

    Deviation from the reference (a fix): the reference draws each utterance's masks at that utterance's
    own length in the dataset and the collater then crops longer ones to the batch's shortest length
    with a random start, so rows can end up with different counts while the model uses row 0's count
    for all of them (`make_maskinfo`). Here the masks are drawn at the batch's final length T, so every
    row has exactly the same count. Vectorised over rows like `masking.inverse_block_mask_2d`: one
    randint, one max-pool, one rand, one topk; same law as the reference's multinomial corrections.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames: expected an int >= 1, got {num_frames!r}")
    if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
        raise ValueError(f"num_masks: expected an int >= 1, got {num_masks!r}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob: expected a float in [0, 1], got {mask_prob}")
    if isinstance(mask_length, bool) or not isinstance(mask_length, int) or mask_length < 1:
        raise ValueError(f"mask_length: expected an int >= 1, got {mask_length!r}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    n_starts, target = block_mask_1d_counts(num_frames, mask_prob, mask_length, mask_prob_adjust, inverse)
    target = min(target, num_frames)
    centres = torch.randint(0, num_frames, (num_masks, n_starts), generator=generator, device=device)
    selected = span_cells(centres, num_frames, mask_length)
    uniforms = torch.rand(num_masks, num_frames, generator=generator, device=device)
    chosen = masking.exact_count(selected, target, uniforms)
    return ~chosen if inverse else chosen


def span_cells(centres: Tensor, num_frames: int, mask_length: int) -> Tensor:
    """The frames covered by the reference's spans: [N, T] bool from centres [N, n] (repeats allowed).
    A centre c covers c - off .. c + B - 1 - off (off = B // 2), clamped to [0, T) (the reference clamps
    each index, which covers the same frames): a stride-1 max-pool of the centre indicator padded with
    B - 1 - off zeros before and off after."""
    N = centres.shape[0]
    ind = torch.zeros(N, 1, num_frames, device=centres.device)
    if centres.numel():
        ind.view(N, num_frames).scatter_(1, centres.long(), 1.0)
    off = mask_length // 2
    padded = F.pad(ind, (mask_length - 1 - off, off))
    return F.max_pool1d(padded, kernel_size=mask_length, stride=1).view(N, num_frames) > 0


# --- modules ----------------------------------------------------------------------------------------


class ConvFeatureLayer(nn.Module):
    """One wav2vec2 CNN layer in "layer_norm" mode: Conv1d (no bias) -> LayerNorm over channels in fp32
    (the reference's Fp32LayerNorm, affine) -> GELU, on [B, C, T]. Conv init: Kaiming-normal."""

    def __init__(self, in_dim: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=False)
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        n = self.norm
        y = F.layer_norm(x.transpose(1, 2).float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)
        return F.gelu(y.type_as(x).transpose(1, 2))


class ConvFeatureExtractor(nn.Module):
    """The wav2vec2 feature extractor: waveform [B, L] -> [B, C, T] (channels first, as the reference)."""

    def __init__(self, spec):
        super().__init__()
        spec = parse_feature_encoder_spec(spec)
        dims = [1] + [d for d, _, _ in spec]
        self.layers = nn.ModuleList(ConvFeatureLayer(dims[i], d, k, s) for i, (d, k, s) in enumerate(spec))

    def forward(self, source: Tensor) -> Tensor:
        x = source.unsqueeze(1)
        for layer in self.layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Module):
    """CNN output [B, C, T] -> LayerNorm(C) -> Linear(C -> D): the local features [B, T, D] (the
    reference's `project_features`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x.transpose(1, 2)))


class ConvPositionalEncoder(nn.Module):
    """The reference's `relative_positional_encoder`: `depth` x [grouped Conv1d(D, D, k, pad k // 2)
    -> SamePad -> LayerNorm over channels (no affine) -> GELU] on channels-last [N, T, D]. That is
    exactly one `dk.conv_decoder_block` without residual per layer. Convs keep PyTorch's default init.

    padding_mask [N, T] (bool, True = padded frame): padded frames are zeroed before every layer, so the
    valid frames see what the convs' own zero padding shows an unpadded sequence of their length (the
    layer norm and GELU make a zeroed frame non-zero again, hence every layer)."""

    def __init__(self, dim: int, kernel: int, depth: int, groups: int):
        super().__init__()
        self.groups = groups
        self.layers = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
                                    for _ in range(depth))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        # the op takes one dtype for x and weights: the autocast dtype under autocast (as F.conv1d would)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.layers[0].weight.dtype
        x = x.to(dtype)
        pad = None if padding_mask is None else padding_mask.unsqueeze(-1)
        for conv in self.layers:
            if pad is not None:
                x = x.masked_fill(pad, 0)
            x = conv_decoder_block(x, conv.weight.to(dtype), conv.bias.to(dtype), groups=self.groups,
                                   residual=False)
        return x


def alibi_slopes(num_heads: int) -> list[float]:
    """The standard ALiBi head slopes (the reference's get_slopes): for H a power of two,
    start**(i + 1) with start = 2**(-8 / H); otherwise those of the nearest smaller power of two plus
    every other slope of twice that many."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


class AlibiBias(nn.Module):
    """ALiBi for 1-D sequences with a learned per-head scale: bias[n, h, i, j] = -|p_i - p_j| * slope_h *
    max(scale_h, 0), where p are the frames' positions on the original time axis. The reference builds
    the [T, T] bias, repeats it per clone and gathers rows and columns with ids_keep; computing it from
    the gathered positions gives the same values (same op order: (slope * -|i - j|) * scale).

    forward(T) -> [1, H, T, T] (the teacher's, broadcast over the batch); forward(T, ids_keep [N, K])
    -> [N, H, K, K]. The scale is a 1-D [H] (or [1]) parameter; the reference stores it as (1, 1, H, 1, 1).
    """

    def __init__(self, num_heads: int, scale: float = 1.0, learned: bool = True, per_head: bool = True):
        super().__init__()
        self.register_buffer("slopes", torch.tensor(alibi_slopes(num_heads), dtype=torch.float32), persistent=False)
        self.scale = nn.Parameter(torch.full((num_heads if per_head else 1,), float(scale)), requires_grad=learned)

    def forward(self, num_frames: int, ids_keep: Tensor | None = None) -> Tensor:
        pos = torch.arange(num_frames, device=self.slopes.device)[None] if ids_keep is None else ids_keep.long()
        neg_dist = (pos[:, :, None] - pos[:, None, :]).abs().neg().to(torch.float32)  # [N, K, K]
        bias = neg_dist[:, None] * self.slopes[:, None, None]
        return bias * self.scale.clamp_min(0).to(torch.float32)[:, None, None]


class AudioEncoder(nn.Module):
    """What the teacher copies (the reference's `_ema` keys): conv positional encoder, ALiBi scale, prenet
    (`context_encoder`: LayerNorm + blocks) and the main blocks. The CNN and projection stay outside:
    the teacher reads the student's local features."""

    def __init__(self, cfg: Data2Vec2AudioConfig):
        super().__init__()
        D = cfg.embed_dim
        self.pos_conv = ConvPositionalEncoder(D, cfg.conv_pos_kernel, cfg.conv_pos_depth, cfg.conv_pos_groups)
        self.alibi = (AlibiBias(cfg.num_heads, cfg.alibi_scale, cfg.learned_alibi_scale, cfg.alibi_scale_per_head)
                      if cfg.use_alibi else None)
        block_kwargs = dict(drop=cfg.encoder_dropout, attn_drop=cfg.attention_dropout,
                            mlp_drop=cfg.activation_dropout, post_mlp_drop=cfg.post_mlp_drop)
        self.prenet = Prenet(D, cfg.prenet_depth, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps,
                             dropout=cfg.prenet_dropout, **block_kwargs)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        rates = torch.linspace(cfg.start_drop_path_rate, cfg.end_drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            AltBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, drop_path=rates[i], **block_kwargs)
            for i in range(cfg.depth)
        )
        self.layerdrop = cfg.layerdrop

    def forward(
        self,
        local: Tensor,
        mask: Tensor | None = None,
        ids_keep: Tensor | None = None,
        clones: int = 1,
        layer_results: Callable[[int, Tensor], None] | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """local [B, T, D] -> [B*clones, K, D] (K = ids_keep.shape[1]) or, unmasked, [B, T, D].

        mask [B*clones, T] bool (True = masked) with its ids_keep [B*clones, K]: the masked frames are
        zeroed before the positional convs, which see the full length; the kept frames of the local
        features (not zeroed) and of the positions are then gathered.
        layer_results(i, t): called with each main block's FFN output t (skipped blocks: not called).
        padding_mask [B, T] bool (True = padded frame, None: no padding): padded frames are zeroed
        (before every positional conv layer too) and never attended to (see the module docstring).
        """
        T = local.shape[1]
        key_pad = None  # [rows, keys] bool, True = padded key
        if padding_mask is not None:
            local = local.masked_fill(padding_mask.unsqueeze(-1), 0)
        if ids_keep is None:
            if mask is not None or clones != 1:
                raise ValueError("mask / clones > 1 need ids_keep (the unmasked input is not cloned)")
            x = local + self.pos_conv(local, padding_mask)
            key_pad = padding_mask
        else:
            if mask is None:
                raise ValueError("ids_keep needs the mask it indexes (masked frames are zeroed for the positions)")
            zeroed = local.repeat_interleave(clones, 0) if clones > 1 else local
            zeroed = zeroed * (~mask).unsqueeze(-1).to(local.dtype)
            pad = padding_mask
            if pad is not None and clones > 1:
                pad = pad.repeat_interleave(clones, 0)
            x_pos = self.pos_conv(zeroed, pad)
            x = gather_visible(local, ids_keep, clones) + gather_visible(x_pos, ids_keep, 1)
            if pad is not None:  # the reference gathers the (cloned) padding mask like the tokens
                key_pad = torch.gather(pad, 1, ids_keep.long())
                # a row that kept only padded frames would have no key left (softmax of all -inf: NaN
                # in some attention kernels); its tokens are all padding, so let them attend to each other
                key_pad = key_pad & ~key_pad.all(1, keepdim=True)
        bias = None if self.alibi is None else self.alibi(T, ids_keep)
        if bias is not None and key_pad is not None:
            # one additive mask, built once for all blocks: ALiBi, -inf at padded keys
            bias = bias.masked_fill(key_pad[:, None, None, :], float("-inf"))
            key_pad = None
        x = self.dropout_input(self.prenet(x, key_pad, bias))
        for i, blk in enumerate(self.blocks):
            if self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop:
                continue  # the reference's layerdrop: the whole block skipped (np.random per block)
            x, t = blk(x, key_pad, bias)
            if layer_results is not None:
                layer_results(i, t)
        return x


class Data2Vec2Audio(nn.Module):
    """data2vec 2.0 for speech: CNN + projection, student encoder, conv decoder, EMA teacher (see the
    module docstring).

    Init as the reference: Linear layers N(0, 0.02) with zero bias (init_bert_params), then the projection
    Linear and the decoder projection re-initialised to PyTorch's default; CNN convs Kaiming-normal;
    positional and decoder convs PyTorch's default; LayerNorms (1, 0); ALiBi scale `alibi_scale`. The
    teacher is a copy of `encoder` made at construction; after loading student weights call
    `reset_teacher()` (or load a teacher state).

    Training loop: `out = model(waveforms)`; `(out.loss / out.sample_size).backward()`; optimizer step;
    `model.ema_step()`.
    """

    def __init__(self, config: Data2Vec2AudioConfig | None = None, **overrides):
        super().__init__()
        config = config or Data2Vec2AudioConfig()
        if overrides:
            config = config.replace(**overrides)
        config.validate()
        self.config = cfg = config
        self.log_pred_var = True
        self.feature_extractor = ConvFeatureExtractor(cfg.feature_encoder_spec)
        self.project = FeatureProjection(cfg.feature_encoder_spec[-1][0], cfg.embed_dim)
        self.encoder = AudioEncoder(cfg)
        self.decoder = ConvDecoder1d(cfg.embed_dim, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel,
                                     cfg.decoder_groups, residual=cfg.decoder_residual)
        self.apply(init_bert_params)
        self.project.linear.reset_parameters()
        self.decoder.proj.reset_parameters()
        self.teacher = EMATeacher(self.encoder, decay_start=cfg.ema_decay, decay_end=cfg.ema_end_decay,
                                  anneal_steps=cfg.ema_anneal_end_step)
        self._target_buffer: TargetLayerBuffer | None = None

    # shared with the image model: teacher reset / EMA schedule and step (on `self.encoder`), optimizer
    # groups (no weight decay on biases and 1-D parameters, which includes the ALiBi scale), target buffer
    reset_teacher = Data2Vec2Image.reset_teacher
    ema_decay = Data2Vec2Image.ema_decay
    ema_step = Data2Vec2Image.ema_step
    param_groups = Data2Vec2Image.param_groups
    _buffer_for = Data2Vec2Image._buffer_for

    def named_student_parameters(self):
        """The trainable parameters (CNN, projection, encoder, decoder; not the teacher's)."""
        for prefix in ("feature_extractor", "project", "encoder", "decoder"):
            for name, p in getattr(self, prefix).named_parameters():
                yield f"{prefix}.{name}", p

    # --- forward ---------------------------------------------------------------------------------

    def _check_source(self, source: Tensor) -> int:
        """Validate waveforms [B, L]; returns T, the CNN's frames of L samples."""
        if not isinstance(source, Tensor) or source.dim() != 2:
            what = tuple(source.shape) if isinstance(source, Tensor) else type(source).__name__
            raise ValueError(f"source: expected waveforms [B, L], got shape {what}")
        T = self.config.num_frames(source.shape[1])
        if T < 1:
            raise ValueError(f"source: {source.shape[1]} samples are too short for the CNN (no frame)")
        return T

    def local_features(self, source: Tensor) -> Tensor:
        """Waveforms [B, L] -> local features [B, T, D] (CNN + LayerNorm + Linear)."""
        self._check_source(source)
        return self.project(self.feature_extractor(source))

    def _check_padding(self, source: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validate waveforms [B, L] and their sample padding mask [B, L] (bool, True = padded, right
        padding). Returns (source with its padded samples set to 0, frame padding mask [B, T]), or
        (source, None) when no frame is padded: the unpadded path, exactly (a padded sample past every
        frame's receptive field changes nothing)."""
        T = self._check_source(source)
        if padding_mask is None:
            return source, None
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
            what = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
            raise ValueError(f"padding_mask: expected a bool tensor [B, L] over the waveform samples "
                             f"(True = padded), got {what}")
        if padding_mask.shape != source.shape or padding_mask.device != source.device:
            raise ValueError(f"padding_mask: expected shape {tuple(source.shape)} on {source.device} (as source), "
                             f"got {tuple(padding_mask.shape)} on {padding_mask.device}")
        lengths = conv_output_lengths((~padding_mask).sum(-1), self.config.feature_encoder_spec)  # [B] frames
        holes = padding_mask[:, :-1] & ~padding_mask[:, 1:]  # a valid sample after a padded one
        # one host sync for every check
        padded, not_right, shortest = torch.stack([padding_mask.any().long(), holes.any().long(),
                                                   lengths.min()]).tolist()
        if not padded:
            return source, None
        if not_right:
            raise ValueError("padding_mask: expected right padding (True only after an utterance's last valid sample)")
        if shortest < 1:
            rows = (lengths < 1).nonzero().flatten().tolist()
            raise ValueError(f"padding_mask: utterance(s) {rows} have no valid frame (too few non-padded samples "
                             f"for the CNN)")
        if shortest >= T:
            return source, None
        frames = torch.arange(T, device=source.device)[None] >= lengths[:, None]
        return source.masked_fill(padding_mask, 0), frames

    def make_masks(self, batch_size: int, num_frames: int, *, generator: torch.Generator | None = None,
                   device=None) -> masking.MaskInfo:
        """Fresh masks: [batch_size * clone_batch, num_frames], sample-major rows, drawn on the generator's
        device (default: `device`) and moved to `device`."""
        cfg = self.config
        mask = block_mask_1d(batch_size * cfg.clone_batch, num_frames, cfg.mask_prob, cfg.mask_length,
                             cfg.mask_prob_adjust, inverse=cfg.inverse_mask, generator=generator,
                             device=generator.device if generator is not None else device)
        if device is not None:
            mask = mask.to(device, non_blocking=True)
        return masking.make_mask_info(mask, cfg.len_keep(num_frames))

    def _targets(self, local: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The teacher on the unmasked local features; its top-K FFN outputs -> targets [B, T, D] fp32.
        padding_mask: [B, T] frames (True = padded) or None."""
        cfg = self.config
        first = cfg.depth - cfg.average_top_k_layers
        holder: list[TargetLayerBuffer] = []

        def write(i: int, t: Tensor) -> None:
            if i < first:
                return
            if not holder:
                holder.append(self._buffer_for(cfg.average_top_k_layers, *t.shape, dtype=t.dtype, device=t.device))
            holder[0].slot(i - first).copy_(t)

        self.teacher(local.detach(), layer_results=write, padding_mask=padding_mask)
        return holder[0].targets(layer_norm=cfg.target_layer_norm, final_norm=cfg.target_final_norm,
                                 padding_mask=padding_mask)

    @torch.no_grad()
    def teacher_targets(self, source: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The regression targets [B, T, D] (fp32) of the current teacher for waveforms [B, L]
        (padding_mask: [B, L] samples, True = padded; padded frames' targets are 0)."""
        source, frame_pad = self._check_padding(source, padding_mask)
        return self._targets(self.local_features(source), frame_pad)

    def extract_features(self, source: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The student encoder on unmasked waveforms: [B, T, D], e.g. for fine-tuning or probes
        (padding_mask: [B, L] samples, True = padded; frame_padding_mask gives the frames' one)."""
        source, frame_pad = self._check_padding(source, padding_mask)
        return self.encoder(self.local_features(source), padding_mask=frame_pad)

    def forward(
        self,
        source: Tensor,
        mask: Tensor | None = None,
        *,
        padding_mask: Tensor | None = None,
        ids_keep: Tensor | None = None,
        ids_restore: Tensor | None = None,
        decoder_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Data2Vec2Output:
        """One data2vec 2.0 step's forward for waveforms `source` [B, L].

        mask: [B*M, T] over the CNN's T frames (bool or 0/1, True = masked, sample-major rows; every row
        the same count, else a ValueError); None draws 1-D block masks (from `generator`), as without
        padding. padding_mask: [B, L] bool over the samples, True = padded (right padding), None: none;
        see the module docstring. ids_keep / ids_restore / decoder_noise: as `Data2Vec2Image.forward`
        (inject the reference's own to compare per-token activations bitwise-close; defaults: a stable
        argsort of the mask, noise drawn N(0, mask_noise_std^2)). `sample_size` counts the masked
        frames that are not padding.
        """
        cfg = self.config
        source, frame_pad = self._check_padding(source, padding_mask)  # frame_pad: [B, T] or None
        local = self.local_features(source)  # [B, T, D]
        B, T, D = local.shape
        M = cfg.clone_batch
        N = B * M
        if mask is None:
            if ids_keep is not None or ids_restore is not None:
                raise ValueError("ids_keep / ids_restore given without the mask they index")
            info = self.make_masks(B, T, generator=generator, device=source.device)
            mask, ids_keep, ids_restore = info.mask, info.ids_keep, info.ids_restore
        else:
            if tuple(mask.shape) != (N, T):
                raise ValueError(f"mask: expected shape (B*M, T) = {(N, T)} (T = CNN frames of {source.shape[1]} "
                                 f"samples), got {tuple(mask.shape)}")
            mask = mask.bool() if mask.dtype != torch.bool else mask
            if ids_keep is None or ids_restore is None:
                ids_keep, ids_restore = masking.mask_to_ids(mask)  # raises on unequal counts per row
        if ids_keep.shape[0] != N or tuple(ids_restore.shape) != (N, T):
            raise ValueError(f"ids_keep / ids_restore: expected [{N}, K] / [{N}, {T}], got "
                             f"{tuple(ids_keep.shape)} / {tuple(ids_restore.shape)}")
        K = ids_keep.shape[1]

        # student
        x = self.encoder(local, mask, ids_keep, clones=M, padding_mask=frame_pad)  # [N, K, D]
        if cfg.decoder_input_dropout > 0:
            x = F.dropout(x, cfg.decoder_input_dropout, self.training)

        # decoder
        noise = None
        if decoder_noise is not None:
            if tuple(decoder_noise.shape) != (N, T, D):
                raise ValueError(f"decoder_noise: expected [B*M, T, D] = {(N, T, D)} (position layout), "
                                 f"got {tuple(decoder_noise.shape)}")
            ids_masked = ids_restore.argsort(dim=1)[:, K:]  # ids_shuffle's masked part, in its order
            noise = torch.gather(decoder_noise, 1, ids_masked.unsqueeze(-1).expand(-1, -1, D)).to(x.dtype)
        dec_in = decoder_input(x, ids_restore, cfg.mask_noise_std, noise=noise, generator=generator)
        pred = self.decoder(dec_in)  # [N, T, D]

        # teacher targets, from the student's local features
        with torch.no_grad():
            y = self._targets(local, frame_pad)  # [B, T, D] fp32, 0 at padded frames

        # loss over masked, non-padded frames
        counted = mask if frame_pad is None else mask & ~frame_pad.repeat_interleave(M, 0)
        sample_size = N * (T - K) if frame_pad is None else int(counted.sum())
        losses = {"regression": masked_regression_loss(pred, y, counted, clones=M, scale=cfg.scale,
                                                       beta=cfg.loss_beta, reduction="sum")}
        loss = losses["regression"]

        with torch.no_grad():
            logs = {
                "target_var": _weighted_var(y, counted.view(B, M, T).sum(1)),
                "masked_pct": torch.tensor(1.0 - K / T),
                "ema_decay": torch.tensor(self.ema_decay),
            }
            if self.log_pred_var:
                logs["pred_var"] = _weighted_var(pred.detach(), counted)
        return Data2Vec2Output(loss=loss, losses=losses, sample_size=sample_size, pred=pred, targets=y,
                               mask=mask, cls_pred=None, logs=logs)
