"""Audio parity against the golden data of the authors' implementation (shared/golden/audio, PARITY_NOTES.md).

`audio_parity(golden_dir)` mirrors `parity.image_parity`: build Data2Vec2Audio from the golden
`config.json`, load the reference weights and its `_ema` teacher through an explicit name map (reporting
missing / unexpected keys), run one forward with the golden masks, `ids_keep` / `ids_restore` and decoder
noise injected, the backward, the golden run's manual SGD step (grads * 1/sample_size, lr 0.1), one EMA
step and the forward after the update, and compare every golden tensor. Rows, tolerances and the report
are `parity`'s (`ParityRow`, `LoadReport`, `format_rows`).

Name map (fairseq -> ours), AUDIO = modality_encoders.AUDIO.:
  AUDIO.local_encoder.conv_layers.{i}.0.weight      -> feature_extractor.layers.{i}.conv.weight
  AUDIO.local_encoder.conv_layers.{i}.2.1.*         -> feature_extractor.layers.{i}.norm.*
  AUDIO.project_features.1.* / .2.*                 -> project.norm.* / project.linear.*
  AUDIO.relative_positional_encoder.{i+1}.0.*       -> encoder.pos_conv.layers.{i}.*
  AUDIO.alibi_scale (1, 1, H, 1, 1) [old: 4-D]      -> encoder.alibi.scale [H] (reshaped)
  AUDIO.context_encoder.{norm,blocks}.*             -> encoder.prenet.{norm,blocks}.*
  blocks.*                                          -> encoder.blocks.*
  AUDIO.decoder.*                                   -> decoder.*           (blocks.{i}.0, proj)
  _ema: the same names minus CNN, projection and decoder -> teacher.module.* (encoder-relative)
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import Tensor, nn

from ..backends import use_backend
from ..models.data2vec2_audio import Data2Vec2Audio, Data2Vec2AudioConfig
from ..models.masking import mask_to_ids
from ..ops.targets import layer_average_targets
from . import (TOL_ACT, TOL_EMA, TOL_GRAD, TOL_LOSS, TOL_STUDENT_STEP, HookCapture, LoadReport, ParityRow,
               _golden_model, _grad_names, _load_golden, _row, copy_mapped_weights, format_rows)

__all__ = ["audio_parity", "fairseq_audio_name_map", "format_rows", "load_fairseq_audio_weights"]

_AUDIO = "modality_encoders.AUDIO."
# (pattern on the name under modality_encoders.AUDIO., our name); encoder names are encoder-relative
_ENCODER_RULES = (
    (re.compile(r"relative_positional_encoder\.(\d+)\.0\.(weight|bias)$"),
     lambda m: f"pos_conv.layers.{int(m[1]) - 1}.{m[2]}" if int(m[1]) >= 1 else None),
    (re.compile(r"alibi_scale$"), lambda m: "alibi.scale"),
    (re.compile(r"context_encoder\.(norm|blocks)\.(.+)$"), lambda m: f"prenet.{m[1]}.{m[2]}"),
)
_LOCAL_RULES = (
    (re.compile(r"local_encoder\.conv_layers\.(\d+)\.0\.weight$"),
     lambda m: f"feature_extractor.layers.{m[1]}.conv.weight"),
    (re.compile(r"local_encoder\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$"),
     lambda m: f"feature_extractor.layers.{m[1]}.norm.{m[2]}"),
    (re.compile(r"project_features\.1\.(weight|bias)$"), lambda m: f"project.norm.{m[1]}"),
    (re.compile(r"project_features\.2\.(weight|bias)$"), lambda m: f"project.linear.{m[1]}"),
    (re.compile(r"decoder\.(.+)$"), lambda m: f"decoder.{m[1]}"),
)


def _apply(rules, rest: str) -> str | None:
    for pattern, make in rules:
        m = pattern.match(rest)
        if m:
            return make(m)
    return None


def fairseq_audio_name_map(name: str, teacher: bool = False) -> str | None:
    """The fairseq `data2vec_multi` (audio) parameter name -> our Data2Vec2Audio state_dict name (None:
    no counterpart; see the module docstring). teacher=True: a name of the checkpoint's `_ema` dict
    (same names as the student, but only the encoder part: no CNN, projection or decoder)."""
    if name.startswith("blocks."):
        enc = name
    elif name.startswith(_AUDIO):
        rest = name[len(_AUDIO):]
        enc = _apply(_ENCODER_RULES, rest)
        if enc is None:
            return None if teacher else _apply(_LOCAL_RULES, rest)
    else:
        return None
    return ("teacher.module." if teacher else "encoder.") + enc


def _is_alibi_scale(name: str) -> bool:
    return name.endswith("alibi.scale")


@torch.no_grad()
def load_fairseq_audio_weights(model: Data2Vec2Audio, student_state: dict, teacher_state: dict | None = None
                               ) -> LoadReport:
    """Copy a fairseq audio state dict (and optionally its `_ema` teacher) into `model`.

    Without `teacher_state` the teacher becomes a copy of the loaded encoder (as the reference at update
    0). The ALiBi scale is reshaped from the reference's (1, 1, H, 1, 1) (or older 4-D) layout. Returns
    what was loaded, what of ours got nothing (`missing`) and what was not used (`unexpected`, with the
    reason for a shape mismatch); nothing is dropped silently.
    """
    sources = [(n, t, False) for n, t in student_state.items()]
    if teacher_state is not None:
        sources += [(n, t, True) for n, t in teacher_state.items()]

    def adapt(dst, tensor, ours):  # the reference's (1, 1, H, 1, 1) or older 4-D ALiBi scale -> ours
        return tensor.reshape(ours.shape) if _is_alibi_scale(dst) and tensor.numel() == ours.numel() else tensor

    return copy_mapped_weights(model, sources, fairseq_audio_name_map, teacher_given=teacher_state is not None,
                               adapt=adapt)


class _Capture(HookCapture):
    def __init__(self, model: Data2Vec2Audio):
        super().__init__()
        enc, tenc = model.encoder, model.teacher.module
        self._out(model.feature_extractor, "student.cnn_out")
        self._out(model.project, "student.local_features")
        self._out(enc.pos_conv, "student.conv_pos_out")
        self._in(enc.prenet, "student.context_encoder_in")
        self._out(enc.prenet, "student.prenet_out")
        if enc.alibi is not None:
            self._out(enc.alibi, "student.alibi_bias_masked")
        for i, blk in enumerate(enc.blocks):
            self._out(blk, f"student.block{i}.out", index=0)
        self._in(model.decoder, "decoder.input")
        self._out(model.decoder, "decoder.output")
        self._out(tenc.pos_conv, "teacher.conv_pos_out")
        self._in(tenc.blocks[0], "teacher.blocks_in")
        self._out(tenc.blocks[-1], f"teacher.block{len(tenc.blocks) - 1}.out", index=0)
        for i, blk in enumerate(tenc.blocks):
            self._out(blk, f"teacher.layer_result.{i}", index=1)


def audio_parity(golden_dir: str, backend: str | None = None, *, use_checkpoint_teacher: bool = True,
                 model: nn.Module | None = None) -> tuple[list[ParityRow], LoadReport]:
    """Every comparison against shared/golden/audio (see the module docstring). `backend`: a
    d2v2_kernels backend name for the whole run (None: the one in force). `model`: run on this model instead of
    one built from config.json and weights.safetensors (the same update-0 weights are expected)."""
    cfg_json, weights, gold = _load_golden(golden_dir)
    config = Data2Vec2AudioConfig.from_fairseq(cfg_json["cfg"])
    lr = float(cfg_json["golden"].get("sgd_lr", 0.1))
    grad_order = cfg_json["golden"]["meta"].get("grad_per_param_l2_norm_order")
    model, report = _golden_model(golden_dir, weights, model, lambda: Data2Vec2Audio(config),
                                  load_fairseq_audio_weights, use_checkpoint_teacher)
    model.train()

    rows: list[ParityRow] = []
    add = rows.append
    M = config.clone_batch
    params = dict(model.named_parameters())

    def param(fairseq_name: str, teacher: bool = False) -> Tensor:
        return params[fairseq_audio_name_map(fairseq_name, teacher=teacher)]

    def as_golden(t: Tensor, golden: Tensor) -> Tensor:
        # our ALiBi scale is [H]; the reference's (1, 1, H, 1, 1)
        return t.reshape(golden.shape) if t.numel() == golden.numel() else t

    ctx = use_backend(backend) if backend else contextlib.nullcontext()
    with ctx:
        # -- step 0: forward with everything injected, backward on the unnormalised sum -------------
        source = gold["in.source"]
        mask = gold["mask.precomputed_mask"]
        cap = _Capture(model)
        out = model(source, mask, ids_keep=gold["mask.ids_keep"], ids_restore=gold["mask.ids_restore"],
                    decoder_noise=gold["decoder.noise_full"])
        out.loss.backward()
        cap.remove()
        v = cap.values

        T, K = mask.shape[1], gold["mask.ids_keep"].shape[1]
        add(_row("mask.T_feat (config formula)", config.num_frames(source.shape[1]), torch.tensor(T), 0, "abs"))
        add(_row("mask.len_keep (config formula)", config.len_keep(T), torch.tensor(K), 0, "abs"))
        add(_row("mask.encoder_mask (our bool mask)", out.mask.to(torch.uint8), gold["mask.encoder_mask"], 0, "abs"))
        stable_keep, _ = mask_to_ids(mask.bool())
        add(_row("mask.ids_keep (as sets, stable sort)", stable_keep, gold["mask.ids_keep"].sort(1).values, 0, "abs"))
        for name in ["student.cnn_out", "student.local_features", "student.conv_pos_out",
                     "student.context_encoder_in", "student.prenet_out", "student.alibi_bias_masked"] + [
                f"student.block{i}.out" for i in range(config.depth)] + [
                "decoder.input", "decoder.output", "teacher.conv_pos_out", "teacher.blocks_in",
                f"teacher.block{config.depth - 1}.out"]:
            if name in gold:
                add(_row(name, v[name], gold[name], TOL_ACT, "abs"))
        layers = torch.stack([v[f"teacher.layer_result.{i}"] for i in range(config.depth)])
        add(_row("teacher.layer_results", layers, gold["teacher.layer_results"], TOL_ACT, "abs"))
        top = model._target_buffer.tensor  # what the teacher wrote for the targets: the top-K layers
        add(_row("teacher.layer_results[-K:] (TargetLayerBuffer)", top,
                 gold["teacher.layer_results"][-config.average_top_k_layers:], TOL_ACT, "abs"))
        y = out.targets
        add(_row("target.orig_targets", y, gold["target.orig_targets"], TOL_ACT, "abs"))
        add(_row("target.orig_targets (layer_average_targets of the golden layers)",
                 layer_average_targets(gold["teacher.layer_results"][-config.average_top_k_layers:],
                                       layer_norm=config.target_layer_norm, final_norm=config.target_final_norm),
                 gold["target.orig_targets"], TOL_ACT, "abs"))
        add(_row("loss.target_masked", y.repeat_interleave(M, 0)[mask.bool()], gold["loss.target_masked"],
                 TOL_ACT, "abs"))
        add(_row("loss.sample_size", out.sample_size, gold["loss.sample_size"], 0, "abs"))
        add(_row("loss.term.AUDIO_regression", out.losses["regression"], gold["loss.term.AUDIO_regression"],
                 TOL_LOSS, "rel"))
        add(_row("loss.total", out.loss, gold["loss.total"], TOL_LOSS, "rel"))
        for key in ("masked_pct", "pred_var", "target_var"):
            add(_row(f"log.{key}", out.logs[key], gold[f"log.{key}"], TOL_LOSS, "rel"))

        # -- raw gradients (d loss.total / d p, before the trainer's 1/sample_size) ------------------
        for name in sorted(k for k in gold if k.startswith("grad.") and k[5:] in _grad_names(gold)):
            add(_row(name, as_golden(param(name[5:]).grad, gold[name]), gold[name], TOL_GRAD, "rel"))
        if grad_order and "grad.per_param_l2_norm" in gold:
            norms = torch.stack([param(n).grad.double().norm() for n in grad_order])
            add(_row("grad.per_param_l2_norm", norms, gold["grad.per_param_l2_norm"], TOL_GRAD, "rel"))
        alibi = model.encoder.alibi
        if alibi is not None and bool((alibi.scale < 0).any()):  # clamp_min(0): no gradient at all there
            clamped = alibi.scale.detach() < 0
            add(_row("grad.alibi_scale at clamped (negative) heads is 0", alibi.scale.grad[clamped],
                     torch.zeros(int(clamped.sum())), 0, "abs"))
        student_grads = [p.grad for _, p in model.named_student_parameters() if p.grad is not None]
        total = torch.stack([g.double().norm() for g in student_grads]).norm()
        add(_row("grad.total_l2_norm_raw", total, gold["grad.total_l2_norm_raw"], TOL_GRAD, "rel"))

        # -- the same forward with our own (stable-sort) ids_keep: only the summation order may differ --
        with torch.no_grad():
            out_stable = model(source, mask, decoder_noise=gold["decoder.noise_full"])
        add(_row("loss.total (our stable ids_keep)", out_stable.loss, gold["loss.total"], TOL_LOSS, "rel"))

        # -- the golden run's update: SGD on grads * 1/sample_size, then one EMA step ---------------
        with torch.no_grad():
            inv = 1 / int(gold["loss.sample_size"])
            for _, p in model.named_student_parameters():
                if p.grad is not None:
                    p.grad.mul_(inv)
                    p.add_(p.grad, alpha=-lr)
        decay = model.ema_step(1)
        add(_row("ema.decay_used", torch.tensor(decay, dtype=torch.float64), gold["ema.decay_used"], 1e-7, "rel"))
        for name in sorted(k for k in gold if k.startswith("after_step.student.")):
            add(_row(name, as_golden(param(name[len("after_step.student."):]), gold[name]), gold[name],
                     TOL_STUDENT_STEP, "rel"))
        for name in sorted(k for k in gold if k.startswith("after_step.teacher.")):
            ours = param(name[len("after_step.teacher."):], teacher=True)
            add(_row(name, as_golden(ours, gold[name]), gold[name], TOL_EMA, "rel"))

        # -- the forward after the update (student after SGD: its CNN feeds the teacher too) ------------
        with torch.no_grad():
            out1 = model(source, mask, ids_keep=gold["mask.ids_keep"], ids_restore=gold["mask.ids_restore"],
                         decoder_noise=gold["decoder.noise_full"])
        add(_row("after_step.target.orig_targets", out1.targets, gold["after_step.target.orig_targets"],
                 TOL_ACT, "abs"))
        add(_row("after_step.loss.term.AUDIO_regression", out1.losses["regression"],
                 gold["after_step.loss.term.AUDIO_regression"], TOL_LOSS, "rel"))
        add(_row("after_step.loss.total", out1.loss, gold["after_step.loss.total"], TOL_LOSS, "rel"))
    return rows, report
