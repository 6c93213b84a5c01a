"""Text parity against the golden data of the authors' implementation (shared/golden/text, PARITY_NOTES.md).

`text_parity(golden_dir)` mirrors `parity.image_parity`: build Data2Vec2Text from the golden
`config.json` (vocabulary size from the weights), load the reference weights and its `_ema` teacher
through an explicit name map (reporting missing / unexpected keys), run one forward with the golden
masks, `ids_keep` / `ids_restore` and decoder noise injected, the backward, the golden run's manual SGD
step (grads * 1/sample_size, lr 0.1), one EMA step and the forward after the update, and compare every
golden tensor. Text extras: the reference's own masking draw (MaskSeed -> generator -> noise -> mask)
is reproduced from `in.id`, and the native (non-injected) masking path is checked to give the same loss.
Rows, tolerances and the report are `parity`'s (`ParityRow`, `LoadReport`, `format_rows`).

Name map (fairseq -> ours):
  modality_encoders.TEXT.local_encoder.*   -> embed.*            (embed_tokens, embed_positions, layernorm_embedding)
  blocks.{i}.*                             -> encoder.blocks.{i}.*
  modality_encoders.TEXT.decoder.*         -> decoder.*          (blocks.{i}.0, proj.0, proj.2)
  _ema: {i}.* (block-relative, ema_encoder_only) -> teacher.module.blocks.{i}.*
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..backends import use_backend
from ..models import masking
from ..models.data2vec2_text import Data2Vec2Text, Data2Vec2TextConfig, reference_mask_seed
from ..ops.targets import layer_average_targets
from . import (TOL_ACT, TOL_EMA, TOL_GRAD, TOL_LOSS, TOL_STUDENT_STEP, HookCapture, LoadReport, ParityRow,
               _golden_model, _grad_names, _load_golden, _row, copy_mapped_weights, format_rows)

__all__ = ["fairseq_text_name_map", "format_rows", "load_fairseq_text_weights", "text_parity"]

_TEXT = "modality_encoders.TEXT."
_EMBED_TOKENS = _TEXT + "local_encoder.embed_tokens.weight"


def fairseq_text_name_map(name: str, teacher: bool = False) -> str | None:
    """The fairseq `data2vec_multi` (text) parameter name -> our Data2Vec2Text state_dict name (None:
    no counterpart). teacher=True: a name of the checkpoint's `_ema` dict, block-relative
    (`0.attn.qkv.weight`; a `blocks.`-prefixed name is accepted too)."""
    if teacher:
        rest = name[len("blocks."):] if name.startswith("blocks.") else name
        head = rest.split(".", 1)[0]
        return f"teacher.module.blocks.{rest}" if head.isdigit() and "." in rest else None
    if name.startswith("blocks."):
        return "encoder." + name
    if name.startswith(_TEXT + "local_encoder."):
        return "embed." + name[len(_TEXT + "local_encoder."):]
    if name.startswith(_TEXT + "decoder."):
        return "decoder." + name[len(_TEXT + "decoder."):]
    return None


@torch.no_grad()
def load_fairseq_text_weights(model: Data2Vec2Text, student_state: dict, teacher_state: dict | None = None
                              ) -> LoadReport:
    """Copy a fairseq text state dict (and optionally its `_ema` teacher) into `model`.

    `student_state` may be a checkpoint's whole `model` entry: its `_ema` dict is then used as the teacher
    (unless `teacher_state` is given, in which case it is reported as unexpected). Without a teacher the
    teacher becomes a copy of the loaded blocks (as the reference at update 0). Returns what was loaded,
    what of ours got nothing (`missing`) and what was not used (`unexpected`, with the reason).
    """
    student_state = dict(student_state)
    ema = student_state.pop("_ema", None)
    report = LoadReport()
    if ema is not None:
        if teacher_state is None and isinstance(ema, dict):
            teacher_state = ema
        else:
            report.unexpected.append("_ema (a teacher_state was given too)" if isinstance(ema, dict)
                                     else "_ema (not a dict)")
    sources = [(n, t, False) for n, t in student_state.items()]
    if teacher_state is not None:
        sources += [(n, t, True) for n, t in teacher_state.items()]
    return copy_mapped_weights(model, sources, fairseq_text_name_map, teacher_given=teacher_state is not None,
                               report=report)


class _Capture(HookCapture):
    def __init__(self, model: Data2Vec2Text):
        super().__init__()
        self._out(model.embed, "student.local_features")
        self._in(model.encoder, "student.prenet_out")  # the blocks' input: no context encoder for text
        for i, blk in enumerate(model.encoder.blocks):
            self._out(blk, f"student.block{i}.out", index=0)
        self._in(model.decoder, "decoder.input")
        self._out(model.decoder, "decoder.output")
        tblocks = model.teacher.module.blocks
        self._in(model.teacher.module, "teacher.blocks_in")
        self._out(tblocks[-1], f"teacher.block{len(tblocks) - 1}.out", index=0)
        for i, blk in enumerate(tblocks):
            self._out(blk, f"teacher.layer_result.{i}", index=1)


def text_parity(golden_dir: str, backend: str | None = None, *, use_checkpoint_teacher: bool = True,
                model: nn.Module | None = None) -> tuple[list[ParityRow], LoadReport]:
    """Every comparison against shared/golden/text (see the module docstring). `backend`: a
    d2v2_kernels backend name for the whole run (None: the one in force). `model`: run on this model instead of
    one built from config.json and weights.safetensors (the same update-0 weights are expected)."""
    cfg_json, weights, gold = _load_golden(golden_dir)
    golden = cfg_json["golden"]
    config = Data2Vec2TextConfig.from_fairseq(cfg_json["cfg"], vocab_size=weights[_EMBED_TOKENS].shape[0])
    lr = float(golden.get("sgd_lr", 0.1))
    grad_order = golden["meta"].get("grad_per_param_l2_norm_order")
    model, report = _golden_model(golden_dir, weights, model, lambda: Data2Vec2Text(config),
                                  load_fairseq_text_weights, use_checkpoint_teacher)
    model.train()

    rows: list[ParityRow] = []
    add = rows.append
    M, D = config.clone_batch, config.embed_dim
    source, pad = gold["in.source"], gold["in.padding_mask"].bool()
    mask, noise_full = gold["mask.precomputed_mask"], gold["decoder.noise_full"]
    B, T = source.shape
    ctx = use_backend(backend) if backend else contextlib.nullcontext()
    with ctx:
        # -- the reference's own masking draw: MaskSeed(seed, update 0, clone-hashed ids) -> noise -> mask --
        meta = golden["meta"].get("text_random_masking", {})
        seed, clone_ids = reference_mask_seed(int(cfg_json["cfg"]["model"]["seed"]), 0, gold["in.id"], M)
        if meta:
            add(_row("meta.text_random_masking.clone_ids", torch.tensor(clone_ids), torch.tensor(meta["clone_ids"]),
                     0, "abs"))
            add(_row("meta.text_random_masking.generator_seed", torch.tensor(seed),
                     torch.tensor(meta["generator_seed"]), 0, "abs"))
        g = torch.Generator().manual_seed(seed)
        add(_row("mask.text_random_masking_noise (reference seed)", torch.rand(B * M, T, generator=g),
                 gold["mask.text_random_masking_noise"], 0, "abs"))
        native = model.make_masks(B, T, generator=torch.Generator().manual_seed(seed))
        add(_row("mask.precomputed_mask (our random_mask, reference seed)", native.mask.float(), mask, 0, "abs"))

        # -- step 0: forward with everything injected, backward on the unnormalised sum -------------
        cap = _Capture(model)
        out = model(source, mask, padding_mask=pad, ids_keep=gold["mask.ids_keep"],
                    ids_restore=gold["mask.ids_restore"], decoder_noise=noise_full)
        out.loss.backward()
        cap.remove()
        v = cap.values

        K = gold["mask.ids_keep"].shape[1]
        add(_row("mask.len_keep (config formula)", config.len_keep(T), torch.tensor(K), 0, "abs"))
        add(_row("mask.encoder_mask", out.mask.to(torch.uint8), gold["mask.encoder_mask"], 0, "abs"))
        stable_keep, _ = masking.mask_to_ids(mask.bool())
        add(_row("mask.ids_keep (as sets, stable sort)", stable_keep, gold["mask.ids_keep"].sort(1).values, 0, "abs"))
        for name in ["student.local_features", "student.prenet_out"] + [
                f"student.block{i}.out" for i in range(config.depth)] + [
                "decoder.input", "decoder.output", "teacher.blocks_in", f"teacher.block{config.depth - 1}.out"]:
            add(_row(name, v[name], gold[name], TOL_ACT, "abs"))
        layers = torch.stack([v[f"teacher.layer_result.{i}"] for i in range(config.depth)])
        add(_row("teacher.layer_results", layers, gold["teacher.layer_results"], TOL_ACT, "abs"))
        top = model._target_buffer.tensor  # what the teacher wrote for the targets: the top-K layers
        add(_row("teacher.layer_results[-K:] (TargetLayerBuffer)", top,
                 gold["teacher.layer_results"][-config.average_top_k_layers:], TOL_ACT, "abs"))
        y = out.targets
        add(_row("target.orig_targets", y, gold["target.orig_targets"], TOL_ACT, "abs"))
        # the same targets through the padding-aware statistics (an all-False mask must change nothing)
        padded_path = layer_average_targets(top, layer_norm=config.target_layer_norm,
                                            final_norm=config.target_final_norm, padding_mask=pad)
        add(_row("target.orig_targets (padding_mask path)", padded_path, gold["target.orig_targets"], TOL_ACT, "abs"))
        add(_row("loss.target_masked", y.repeat_interleave(M, 0)[mask.bool()], gold["loss.target_masked"],
                 TOL_ACT, "abs"))
        add(_row("loss.sample_size", out.sample_size, gold["loss.sample_size"], 0, "abs"))
        add(_row("loss.term.TEXT_regression", out.losses["regression"], gold["loss.term.TEXT_regression"],
                 TOL_LOSS, "rel"))
        add(_row("loss.total", out.loss, gold["loss.total"], TOL_LOSS, "rel"))
        for key in ("masked_pct", "pred_var", "target_var"):
            add(_row(f"log.{key}", out.logs[key], gold[f"log.{key}"], TOL_LOSS, "rel"))

        # -- raw gradients (d loss.total / d p, before the trainer's 1/sample_size) ------------------
        params = dict(model.named_parameters())
        for name in sorted(k for k in gold if k.startswith("grad.") and k[5:] in _grad_names(gold)):
            add(_row(name, params[fairseq_text_name_map(name[5:])].grad, gold[name], TOL_GRAD, "rel"))
        if grad_order and "grad.per_param_l2_norm" in gold:
            norms = torch.stack([params[fairseq_text_name_map(n)].grad.double().norm() for n in grad_order])
            add(_row("grad.per_param_l2_norm", norms, gold["grad.per_param_l2_norm"], TOL_GRAD, "rel"))
        student_grads = [p.grad for _, p in model.named_student_parameters() if p.grad is not None]
        total = torch.stack([g_.double().norm() for g_ in student_grads]).norm()
        add(_row("grad.total_l2_norm_raw", total, gold["grad.total_l2_norm_raw"], TOL_GRAD, "rel"))

        # -- the same forward with our own ids: stable-sort ids, then our own masking draw ---------------
        with torch.no_grad():
            out_stable = model(source, mask, padding_mask=pad, decoder_noise=noise_full)
            out_native = model(source, padding_mask=pad, decoder_noise=noise_full,
                               generator=torch.Generator().manual_seed(seed))
        add(_row("loss.total (our stable ids_keep)", out_stable.loss, gold["loss.total"], TOL_LOSS, "rel"))
        add(_row("loss.total (native masking, reference seed)", out_native.loss,
                 torch.tensor(golden["meta"].get("text_native_random_masking_loss", float(gold["loss.total"]))),
                 TOL_LOSS, "rel"))

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
            ours = fairseq_text_name_map(name[len("after_step.student."):])
            add(_row(name, params[ours], gold[name], TOL_STUDENT_STEP, "rel"))
        for name in sorted(k for k in gold if k.startswith("after_step.teacher.")):
            ours = fairseq_text_name_map(name[len("after_step.teacher."):], teacher=True)
            add(_row(name, params[ours], gold[name], TOL_EMA, "rel"))

        # -- the forward after the update ---------------------------------------------------------------
        with torch.no_grad():
            out1 = model(source, mask, padding_mask=pad, ids_keep=gold["mask.ids_keep"],
                         ids_restore=gold["mask.ids_restore"], decoder_noise=noise_full)
        add(_row("after_step.target.orig_targets", out1.targets, gold["after_step.target.orig_targets"],
                 TOL_ACT, "abs"))
        add(_row("after_step.loss.term.TEXT_regression", out1.losses["regression"],
                 gold["after_step.loss.term.TEXT_regression"], TOL_LOSS, "rel"))
        add(_row("after_step.loss.total", out1.loss, gold["after_step.loss.total"], TOL_LOSS, "rel"))
    return rows, report
