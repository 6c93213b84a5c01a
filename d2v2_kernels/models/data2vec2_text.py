"""data2vec 2.0 for text (data2vec2.md, golden/PARITY_NOTES.md §3, §6), built on the d2v2_kernels ops.

One training step (`Data2Vec2Text.forward`):

  embed    token embedding (* embed_scale) + learned positions + LayerNorm + dropout, once per
           sequence: the "local features"                                           [B, T, D]
  student  dk.gather_visible: the M clones' visible tokens, no M-fold copy            [B*M, K, D]
           main blocks (no prenet, no CLS, no final norm: post-LN)                     [B*M, K, D]
  decoder  dk.decoder_input: visible outputs back in place, N(0, 0.01^2) noise elsewhere
           ConvDecoder1d (groups 1, no residual) + 2-layer MLP projection             [B*M, T, D]
  teacher  EMATeacher copy of the *blocks only* (fairseq `ema_encoder_only`), fed the student's own
           local features of the unmasked text (no grad); its top-K FFN outputs go straight into
           one TargetLayerBuffer
  targets  dk.layer_average_targets: instance norm per layer -> average            [B, T, D] fp32
  loss     dk.masked_regression_loss, scale 1 (the released text config), sum over masked tokens

Padding (`padding_mask` [B, T] bool, True = pad; default `source == pad_idx`) is honoured end to end:
padded keys are never attended to (student: the mask gathered like the tokens; teacher: the full one),
padded steps take no part in the instance-norm statistics of the targets, and masked pads are not
counted in the loss. The last two deviate from the reference on purpose (fairseq normalises over pads
and counts masked pads; data2vec2.md §4: padding must not leak into the statistics). Without pads the
computation is the reference's; the golden data has none.

Every op goes through d2v2_kernels, so `with dk.use_backend("reference"):` runs the same model unfused.
Loss convention as the image model (`Data2Vec2Output`): `loss` is the sum, the objective
`loss / sample_size`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ConvDecoder1d, EMATeacher
from ..ops.decoder_input import decoder_input
from ..ops.gather import gather_visible
from ..ops.loss import masked_regression_loss
from ..ops.targets import TargetLayerBuffer
from . import masking
from .data2vec2 import Data2Vec2Image, Data2Vec2Output, _weighted_var, fairseq_target_norms
from .vit import AltBlock, init_bert_params

__all__ = [
    "Data2Vec2Text",
    "Data2Vec2TextConfig",
    "TEXT_PRESETS",
    "TextBlocks",
    "TextEmbedding",
    "make_positions",
    "reference_mask_seed",
]

_NORMS = (None, "instance", "layer")


@dataclass
class Data2Vec2TextConfig:
    """Everything that defines the text model and its loss. Defaults: the released base config (fairseq
    `base_text_only_task.yaml`, RoBERTa's dictionary); `preset(name)` gives the others,
    `from_fairseq(cfg, vocab_size=...)` reads a reference config (the vocabulary size is not in it: it
    is the task dictionary's length, i.e. rows of `embed_tokens.weight`)."""

    # embeddings
    vocab_size: int = 50265  # RoBERTa's GPT-2 BPE dictionary (4 specials + 50260 + <mask>)
    pad_idx: int = 1  # fairseq Dictionary: bos 0, pad 1, eos 2, unk 3
    max_source_positions: int = 512
    learned_pos: bool = True
    no_token_positional_embeddings: bool = False
    no_scale_embedding: bool = True  # False: tokens * sqrt(D)
    layernorm_embedding: bool = True
    embed_dropout: float = 0.1  # modalities.text.dropout, after the embedding LayerNorm
    # encoder
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    encoder_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    post_mlp_drop: float = 0.1
    dropout_input: float = 0.0  # on the student's gathered tokens, before the blocks
    start_drop_path_rate: float = 0.0
    end_drop_path_rate: float = 0.0
    # multi-mask (random masking: mask_length 1)
    clone_batch: int = 8
    mask_prob: float = 0.48
    mask_noise_std: float = 0.01
    # targets
    average_top_k_layers: int = 12
    target_layer_norm: str | None = "instance"
    target_final_norm: str | None = None
    # decoder
    decoder_dim: int = 768
    decoder_layers: int = 5
    decoder_kernel: int = 9
    decoder_groups: int = 1
    decoder_residual: bool = False
    decoder_projection_layers: int = 2
    decoder_projection_ratio: float = 2.0
    decoder_input_dropout: float = 0.1
    # loss
    loss_scale: float | None = 1.0  # None: 1 / sqrt(embed_dim)
    loss_beta: float = 0.0
    # teacher
    ema_decay: float = 0.9999
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100_000

    def __post_init__(self):
        self.validate()

    def len_keep(self, num_tokens: int) -> int:
        """Visible tokens per masked copy of a T-token sequence: the reference's int(T * (1 - p))."""
        return int(num_tokens * (1 - self.mask_prob))

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
        if self.target_layer_norm not in _NORMS or self.target_final_norm not in _NORMS:
            raise ValueError(f"target norms: expected one of {_NORMS}, got {self.target_layer_norm!r}, "
                             f"{self.target_final_norm!r}")
        if not 0 <= self.pad_idx < self.vocab_size:
            raise ValueError(f"pad_idx {self.pad_idx} is not a token id of a {self.vocab_size}-token vocabulary")
        if self.max_source_positions < 1:
            raise ValueError(f"max_source_positions must be >= 1, got {self.max_source_positions}")
        if not self.learned_pos and not self.no_token_positional_embeddings:
            raise ValueError("sinusoidal text positions (learned_pos=False) are not supported")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.embed_dim % self.decoder_groups or self.decoder_dim % self.decoder_groups:
            raise ValueError(f"decoder_groups {self.decoder_groups} must divide embed_dim {self.embed_dim} and "
                             f"decoder_dim {self.decoder_dim}")
        if self.decoder_projection_layers not in (1, 2):
            raise ValueError(f"decoder_projection_layers: expected 1 or 2, got {self.decoder_projection_layers}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Data2Vec2TextConfig":
        if name not in TEXT_PRESETS:
            raise ValueError(f"unknown text preset {name!r}; choose from {', '.join(TEXT_PRESETS)}")
        return cls(**{**TEXT_PRESETS[name], **overrides})

    def replace(self, **changes) -> "Data2Vec2TextConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_fairseq(cls, cfg: dict, *, vocab_size: int | None = None, pad_idx: int = 1) -> "Data2Vec2TextConfig":
        """From a reference config: a checkpoint's `cfg` (plain dict) or its `model` section.
        vocab_size: the task dictionary's length (not in the config; default: the class default)."""
        model = cfg.get("model", cfg)
        txt = model["modalities"]["text"]
        dec = txt["decoder"]
        if model.get("layer_norm_first", False):
            raise ValueError("layer_norm_first=True (pre-LN blocks) is not supported")
        if model.get("end_of_block_targets", False):
            raise ValueError("end_of_block_targets=True is not supported (targets are FFN outputs)")
        if not model.get("ema_encoder_only", True):
            raise ValueError("text with ema_encoder_only=False (a teacher with its own embeddings) is not supported")
        if int(txt.get("prenet_depth", 0)) != 0 or int(txt.get("num_extra_tokens", 0)) != 0:
            raise ValueError("text prenet blocks / extra tokens are not supported (prenet_depth and "
                             "num_extra_tokens must be 0, as released)")
        if txt.get("use_alibi_encoder", False):
            raise ValueError("text ALiBi is not supported")
        if int(txt.get("mask_length", 1)) != 1 or txt.get("mask_prob_min") is not None:
            raise ValueError("text masking: only random masking (mask_length=1, mask_prob_min=None) is supported")
        if float(txt.get("keep_masked_pct", 0.0)) > 0 or float(txt.get("mask_dropout", 0.0)) > 0:
            raise ValueError("text masking: keep_masked_pct / mask_dropout are not supported")
        if float(model.get("layerdrop", 0.0)) > 0:
            raise ValueError("layerdrop > 0 is not supported")
        if model.get("shared_decoder") is not None:
            raise ValueError("a shared decoder is not supported")
        if float(model.get("cls_loss", 0.0)) > 0 or float(model.get("recon_loss", 0.0)) > 0:
            raise ValueError("text: cls_loss / recon_loss are not supported")
        for key in ("add_positions_masked", "add_positions_all"):
            if dec.get(key, False):
                raise ValueError(f"decoder.{key}=True is not supported")
        layer_norm, final_norm = fairseq_target_norms(model)
        extra = {} if vocab_size is None else {"vocab_size": int(vocab_size)}
        return cls(
            **extra, pad_idx=int(pad_idx),
            max_source_positions=int(txt["max_source_positions"]), learned_pos=bool(txt["learned_pos"]),
            no_token_positional_embeddings=bool(txt.get("no_token_positional_embeddings", False)),
            no_scale_embedding=bool(txt["no_scale_embedding"]), layernorm_embedding=bool(txt["layernorm_embedding"]),
            embed_dropout=float(txt["dropout"]),
            embed_dim=int(model["embed_dim"]), depth=int(model["depth"]), num_heads=int(model["num_heads"]),
            mlp_ratio=float(model["mlp_ratio"]), norm_eps=float(model["norm_eps"]),
            encoder_dropout=float(model["encoder_dropout"]), attention_dropout=float(model["attention_dropout"]),
            activation_dropout=float(model["activation_dropout"]), post_mlp_drop=float(model["post_mlp_drop"]),
            dropout_input=float(model.get("dropout_input", 0.0)),
            start_drop_path_rate=float(model["start_drop_path_rate"]),
            end_drop_path_rate=float(model["end_drop_path_rate"]),
            clone_batch=int(model["clone_batch"]), mask_prob=float(txt["mask_prob"]),
            mask_noise_std=float(txt["mask_noise_std"]),
            average_top_k_layers=int(model["average_top_k_layers"]),
            target_layer_norm=layer_norm, target_final_norm=final_norm,
            decoder_dim=int(dec["decoder_dim"]), decoder_layers=int(dec["decoder_layers"]),
            decoder_kernel=int(dec["decoder_kernel"]), decoder_groups=int(dec["decoder_groups"]),
            decoder_residual=bool(dec["decoder_residual"]),
            decoder_projection_layers=int(dec.get("projection_layers", 1)),
            decoder_projection_ratio=float(dec.get("projection_ratio", 2.0)),
            decoder_input_dropout=float(dec["input_dropout"]),
            loss_scale=None if model.get("loss_scale") is None else float(model["loss_scale"]),
            loss_beta=float(model["loss_beta"]),
            ema_decay=float(model["ema_decay"]), ema_end_decay=float(model["ema_end_decay"]),
            ema_anneal_end_step=int(model["ema_anneal_end_step"]),
        )


TEXT_PRESETS: dict[str, dict] = {
    # the released base config (base_text_only_task.yaml)
    "base": {},
    # the golden data's tiny config (shared/golden/text): vocabulary 100, 32 tokens, width 48, 4 blocks
    "golden-tiny": dict(vocab_size=100, max_source_positions=32, embed_dim=48, depth=4, num_heads=4,
                        clone_batch=2, average_top_k_layers=3, embed_dropout=0.0, encoder_dropout=0.0,
                        attention_dropout=0.0, post_mlp_drop=0.0, decoder_dim=48, decoder_layers=2,
                        decoder_input_dropout=0.0, ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10),
}


def make_positions(tokens: Tensor, pad_idx: int) -> Tensor:
    """fairseq's make_positions: real tokens numbered pad_idx + 1, pad_idx + 2, ... in order; pads get
    pad_idx (whose embedding row is zero)."""
    real = tokens.ne(pad_idx).int()
    return (torch.cumsum(real, dim=1).type_as(real) * real).long() + pad_idx


def reference_mask_seed(seed: int, num_updates: int, ids: Tensor | list[int],
                        clone_batch: int) -> tuple[int, list[int]]:
    """The seed of the reference's own text masking generator (fairseq MaskSeed, BASE L232-247, L493-499)
    and the per-clone ids it hashes: clone m of sample id i gets id i + int(hash((seed, m - 1)) % 1e10)
    (m >= 1; clone 0 keeps i), and the generator is seeded with int(hash((seed, num_updates, sum of
    those ids)) % 1e6). The float modulo is the reference's own expression (hash of a tuple of ints is
    deterministic on 64-bit CPython). `torch.rand(B*M, T, generator=torch.Generator().manual_seed(s))`
    is then the noise the reference's random_masking draws."""
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
    clone_hash = [0] + [int(hash((seed, m)) % 1e10) for m in range(clone_batch - 1)]
    clone_ids = [i + h for i in ids for h in clone_hash]
    return int(hash((seed, num_updates, sum(clone_ids))) % 1e6), clone_ids


class TextEmbedding(nn.Module):
    """The reference's TextLocalEncoder: embed_tokens * embed_scale + learned positions -> LayerNorm
    (eps 1e-5, affine) -> dropout. Names as the reference (`embed_tokens`, `embed_positions`,
    `layernorm_embedding`); both embeddings have a zero, never-trained pad row."""

    def __init__(self, cfg: Data2Vec2TextConfig):
        super().__init__()
        D = cfg.embed_dim
        self.pad_idx = cfg.pad_idx
        self.max_positions = cfg.max_source_positions
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(D)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.pad_idx)
        # positions run pad_idx + 1 .. pad_idx + max_source_positions, hence the size
        self.embed_positions = None if cfg.no_token_positional_embeddings else nn.Embedding(
            cfg.max_source_positions + cfg.pad_idx + 1, D, padding_idx=cfg.pad_idx)
        self.layernorm_embedding = nn.LayerNorm(D, eps=1e-5) if cfg.layernorm_embedding else None
        self.dropout = nn.Dropout(cfg.embed_dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed_tokens(tokens)
        if self.embed_scale != 1.0:  # the reference multiplies by 1.0 too: exact either way
            x = x * self.embed_scale
        if self.embed_positions is not None:
            x = x + self.embed_positions(make_positions(tokens, self.pad_idx))
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout(x)


class TextBlocks(nn.Module):
    """The main transformer blocks (post-LN AltBlocks, no final norm): the student's encoder after the
    embedding and, as an EMA copy, the whole teacher (fairseq `ema_encoder_only`)."""

    def __init__(self, cfg: Data2Vec2TextConfig):
        super().__init__()
        rates = torch.linspace(cfg.start_drop_path_rate, cfg.end_drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            AltBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, drop=cfg.encoder_dropout,
                     attn_drop=cfg.attention_dropout, mlp_drop=cfg.activation_dropout,
                     post_mlp_drop=cfg.post_mlp_drop, drop_path=rates[i])
            for i in range(cfg.depth)
        )

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                layer_results: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """x [N, L, D] -> [N, L, D]. padding_mask: [N, L] bool, True = padded key (None: no padding).
        layer_results(i, t): called with each block's FFN output t [N, L, D]."""
        for i, blk in enumerate(self.blocks):
            x, t = blk(x, padding_mask)
            if layer_results is not None:
                layer_results(i, t)
        return x


class Data2Vec2Text(nn.Module):
    """data2vec 2.0 for text: embedding, student blocks, conv decoder, EMA teacher of the blocks (see the
    module docstring).

    Modules: `embed` (TextEmbedding, shared by student and teacher), `encoder` (TextBlocks, the student's
    blocks), `decoder` (ConvDecoder1d), `teacher` (EMATeacher of `encoder`). `Data2Vec2Text(config)`
    initialises as the reference: Linear and Embedding N(0, 0.02) with zero bias and zero pad rows
    (init_bert_params), the decoder convs and its projection PyTorch's default, LayerNorms (1, 0).

    Training loop as the image model: `out = model(tokens)`; `(out.loss / out.sample_size).backward()`;
    optimizer step; `model.ema_step()`. The EMA bookkeeping (`ema_step`, `ema_decay`, `reset_teacher`),
    `param_groups` and the target buffer are the image model's own methods: they only touch
    `self.encoder`, `self.teacher` and `named_student_parameters()`.
    """

    def __init__(self, config: Data2Vec2TextConfig | None = None, **overrides):
        super().__init__()
        config = config or Data2Vec2TextConfig()
        if overrides:
            config = config.replace(**overrides)
        config.validate()
        self.config = cfg = config
        self.log_pred_var = True  # as the image model: a trainer turns it off on steps it does not log
        self.embed = TextEmbedding(cfg)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = TextBlocks(cfg)
        self.decoder = ConvDecoder1d(
            cfg.embed_dim, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel, cfg.decoder_groups,
            residual=cfg.decoder_residual, projection_layers=cfg.decoder_projection_layers,
            projection_ratio=cfg.decoder_projection_ratio,
        )
        self.apply(init_bert_params)
        for m in self.decoder.proj.modules():  # the reference re-initialises the projection to default
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        self.teacher = EMATeacher(
            self.encoder, decay_start=cfg.ema_decay, decay_end=cfg.ema_end_decay,
            anneal_steps=cfg.ema_anneal_end_step,
        )
        self._target_buffer: TargetLayerBuffer | None = None

    # the image model's EMA / optimizer / buffer helpers (they use only encoder, teacher, named_student_parameters)
    reset_teacher = Data2Vec2Image.reset_teacher
    ema_decay = Data2Vec2Image.ema_decay
    ema_step = Data2Vec2Image.ema_step
    param_groups = Data2Vec2Image.param_groups
    _buffer_for = Data2Vec2Image._buffer_for

    def named_student_parameters(self):
        """The trainable parameters (embedding, blocks, decoder; not the teacher's)."""
        for prefix, module in (("embed", self.embed), ("encoder", self.encoder), ("decoder", self.decoder)):
            for name, p in module.named_parameters():
                yield f"{prefix}.{name}", p

    # --- inputs ----------------------------------------------------------------------------------

    def _check_tokens(self, source: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validate tokens [B, T] and the padding mask; returns (int64 tokens, padding mask or None when
        nothing is padded, so attention and targets take the unpadded path as the reference does)."""
        cfg = self.config
        if not isinstance(source, Tensor) or source.dtype not in (torch.int64, torch.int32):
            what = source.dtype if isinstance(source, Tensor) else type(source).__name__
            raise TypeError(f"source: expected token ids as an int64 (or int32) tensor [B, T], got {what}")
        if source.dim() != 2 or source.shape[0] == 0 or source.shape[1] == 0:
            raise ValueError(f"source: expected token ids [B, T] (B, T >= 1), got shape {tuple(source.shape)}")
        T = source.shape[1]
        if T > cfg.max_source_positions:
            raise ValueError(f"source: {T} tokens, more than max_source_positions={cfg.max_source_positions}")
        source = source.long()
        if padding_mask is None:
            padding_mask = source.eq(cfg.pad_idx)
        else:
            if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
                raise TypeError("padding_mask: expected a bool tensor [B, T] (True = padding)")
            if padding_mask.shape != source.shape or padding_mask.device != source.device:
                raise ValueError(f"padding_mask: expected shape {tuple(source.shape)} on {source.device} (as "
                                 f"source), got {tuple(padding_mask.shape)} on {padding_mask.device}")
        # one host sync for the id range check and "any padding?"
        lo, hi, padded = torch.stack([source.min(), source.max(), padding_mask.any().long()]).tolist()
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"source: token ids must be in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]")
        return source, (padding_mask if padded else None)

    def make_masks(self, batch_size: int, num_tokens: int, *, generator: torch.Generator | None = None,
                   device=None) -> masking.MaskInfo:
        """Fresh random masks: [batch_size * clone_batch, T], sample-major rows, exactly
        len_keep(T) visible per row, drawn as the reference (torch.rand(N, T) from `generator`, visible =
        the len_keep smallest) on the generator's device (default: `device`)."""
        cfg = self.config
        draw_device = generator.device if generator is not None else device
        mask = masking.random_mask(batch_size * cfg.clone_batch, num_tokens, cfg.mask_prob, generator=generator,
                                   device=draw_device)
        if device is not None:
            mask = mask.to(device, non_blocking=True)
        return masking.make_mask_info(mask, cfg.len_keep(num_tokens))

    # --- pieces of the step ----------------------------------------------------------------------

    def _targets(self, local: Tensor, padding_mask: Tensor | None) -> Tensor:
        """The teacher blocks on the unmasked local features; their top-K FFN outputs -> targets."""
        cfg = self.config
        first = cfg.depth - cfg.average_top_k_layers
        holder: list[TargetLayerBuffer] = []

        def write(i: int, t: Tensor) -> None:
            if i < first:
                return
            if not holder:
                holder.append(self._buffer_for(cfg.average_top_k_layers, *t.shape, dtype=t.dtype, device=t.device))
            holder[0].slot(i - first).copy_(t)

        self.teacher(local, padding_mask, layer_results=write)
        return holder[0].targets(layer_norm=cfg.target_layer_norm, final_norm=cfg.target_final_norm,
                                 padding_mask=padding_mask)

    @torch.no_grad()
    def teacher_targets(self, source: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The regression targets [B, T, D] (fp32) of the current teacher for unmasked text."""
        source, padding_mask = self._check_tokens(source, padding_mask)
        return self._targets(self.embed(source), padding_mask)

    def extract_features(self, source: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The student on unmasked text: [B, T, D], e.g. for probes or fine-tuning."""
        source, padding_mask = self._check_tokens(source, padding_mask)
        return self.encoder(self.embed(source), padding_mask)

    # --- forward ---------------------------------------------------------------------------------

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
        """One data2vec 2.0 step's forward for token ids `source` [B, T] (int64).

        mask: [B*M, T] (bool or 0/1, True = masked, sample-major rows, every row the same count); None
        draws random masks from `generator`. padding_mask: [B, T] bool, True = pad (default: source ==
        pad_idx). ids_keep / ids_restore / decoder_noise: as `Data2Vec2Image.forward` (inject the
        reference's to compare per-token activations). `cls_pred` of the output is None (no CLS token).
        """
        cfg = self.config
        source, padding_mask = self._check_tokens(source, padding_mask)
        B, T = source.shape
        M = cfg.clone_batch
        N = B * M
        if mask is None:
            if ids_keep is not None or ids_restore is not None:
                raise ValueError("ids_keep / ids_restore given without the mask they index")
            info = self.make_masks(B, T, generator=generator, device=source.device)
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
        if K < 1:
            raise ValueError("mask: every token is masked; the student needs at least one visible token per row")

        # student: embed once per sequence, gather the clones' visible tokens, the blocks
        local = self.embed(source)  # [B, T, D], also the teacher's input
        x = self.dropout_input(gather_visible(local, ids_keep, M))  # [N, K, D]
        visible_pad = None
        if padding_mask is not None:  # the reference gathers the (cloned) padding mask like the tokens
            visible_pad = torch.gather(padding_mask.repeat_interleave(M, 0), 1, ids_keep.long())
            visible_pad = visible_pad if bool(visible_pad.any()) else None
        x = self.encoder(x, visible_pad)
        if cfg.decoder_input_dropout > 0:
            x = F.dropout(x, cfg.decoder_input_dropout, self.training)

        # decoder
        noise = None
        if decoder_noise is not None:
            if tuple(decoder_noise.shape) != (N, T, x.shape[-1]):
                raise ValueError(f"decoder_noise: expected [B*M, T, D] = {(N, T, x.shape[-1])} (position layout), "
                                 f"got {tuple(decoder_noise.shape)}")
            ids_masked = ids_restore.argsort(dim=1)[:, K:]  # ids_shuffle's masked part, in its order
            noise = torch.gather(decoder_noise, 1, ids_masked.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            noise = noise.to(x.dtype)
        dec_in = decoder_input(x, ids_restore, cfg.mask_noise_std, noise=noise, generator=generator)
        pred = self.decoder(dec_in)  # [N, T, D]

        # teacher targets from the same (dropped-out) local features, unmasked and un-cloned
        with torch.no_grad():
            y = self._targets(local.detach(), padding_mask)  # [B, T, D] fp32

        # loss over masked, non-padded tokens
        counted = mask if padding_mask is None else mask & ~padding_mask.repeat_interleave(M, 0)
        sample_size = N * (T - K) if padding_mask is None else int(counted.sum())
        losses = {"regression": masked_regression_loss(pred, y, counted, clones=M, scale=cfg.scale,
                                                       beta=cfg.loss_beta, reduction="sum")}
        loss = sum(losses.values())

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
