"""Parity against the golden data of the authors' implementation (shared/golden, PARITY_NOTES.md).

`image_parity(golden_dir)` builds our model from the golden `config.json`, loads the reference weights
through an explicit fairseq -> ours name map (reporting missing / unexpected keys), runs one forward
with the golden masks, `ids_keep` / `ids_restore` and decoder noise injected, the backward, the golden
run's manual SGD step (grads * 1/sample_size, lr 0.1), one EMA step and the forward after the update,
and compares every golden tensor it can. Each comparison is a `ParityRow` (name, max_abs, max_rel, tol,
ok, kind): `max_rel` is max |ours - golden| / max |golden| (relative to the tensor's scale), and a row is
ok when the error of its `kind` ("abs" or "rel") is within `tol`. Tolerances (PARITY_NOTES §0):
activations 1e-5 abs, summed losses 1e-6 rel, gradients 1e-4 rel, teacher weights after the EMA step
"about 1e-7": here 2**-22 relative to the tensor's largest value, i.e. two fp32 ulps of it -- the fused
`ema_update_` computes decay * t + (1 - decay) * s where fairseq runs t.mul_(decay); t.add_(s, alpha=1 -
decay), so single-ulp differences are expected and a fixed 1e-7 would fail on a bad draw of magnitudes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..backends import use_backend
from ..models.data2vec2 import Data2Vec2Image, Data2Vec2ImageConfig
from ..models.masking import mask_to_ids
from ..ops.targets import layer_average_targets

__all__ = [
    "LoadReport",
    "ParityRow",
    "fairseq_image_name_map",
    "format_rows",
    "image_parity",
    "load_fairseq_image_weights",
]

TOL_ACT = 1e-5  # abs
TOL_LOSS = 1e-6  # rel
TOL_GRAD = 1e-4  # rel
TOL_EMA = 2.0**-22  # rel to scale: two fp32 ulps of the largest weight
TOL_STUDENT_STEP = 1e-6  # rel to scale: the SGD step of a grad known to 1e-4 rel at lr * 1/sample_size


@dataclass
class ParityRow:
    name: str
    max_abs: float
    max_rel: float
    tol: float
    ok: bool
    kind: str = "abs"  # which error `tol` bounds: "abs" or "rel"


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # our names that received a value
    missing: list[str] = field(default_factory=list)  # our names nothing was loaded into
    unexpected: list[str] = field(default_factory=list)  # source names not used (no mapping / bad shape)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected


# --- names -----------------------------------------------------------------------------------------

_IMAGE = "modality_encoders.IMAGE."
# (fairseq prefix under modality_encoders.IMAGE., our prefix in the encoder); order matters (longest first)
_IMAGE_ENCODER_PREFIXES = (
    ("extra_tokens", "cls_token"),
    ("fixed_positional_encoder.positions", "pos_embed"),
    ("local_encoder.proj.", "patch_embed.proj."),
    ("context_encoder.norm.", "prenet.norm."),
    ("context_encoder.blocks.", "prenet.blocks."),
)


def _encoder_name(fairseq_name: str) -> str | None:
    """fairseq student/teacher name -> our ImageEncoder-relative name (None: not an encoder name)."""
    if fairseq_name.startswith("blocks."):
        return fairseq_name
    if fairseq_name.startswith(_IMAGE):
        rest = fairseq_name[len(_IMAGE):]
        for src, dst in _IMAGE_ENCODER_PREFIXES:
            if rest == src or (src.endswith(".") and rest.startswith(src)):
                return dst + rest[len(src):]
    return None


def fairseq_image_name_map(fairseq_name: str, teacher: bool = False) -> str | None:
    """The fairseq `data2vec_multi` (image) parameter name -> our Data2Vec2Image state_dict name.

    Student: modality_encoders.IMAGE.{extra_tokens, fixed_positional_encoder.positions,
    local_encoder.proj.*, context_encoder.norm.*, context_encoder.blocks.*} and blocks.* -> encoder.*;
    modality_encoders.IMAGE.decoder.* -> decoder.* (same sub-names: blocks.{i}.0, proj).
    Teacher (`_ema`, teacher=True): the same encoder names -> teacher.module.*; no decoder.
    """
    enc = _encoder_name(fairseq_name)
    if enc is not None:
        return ("teacher.module." if teacher else "encoder.") + enc
    if not teacher and fairseq_name.startswith(_IMAGE + "decoder."):
        return "decoder." + fairseq_name[len(_IMAGE + "decoder."):]
    return None


@torch.no_grad()
def load_fairseq_image_weights(model: Data2Vec2Image, student: dict[str, Tensor],
                               teacher: dict[str, Tensor] | None = None) -> LoadReport:
    """Copy a fairseq image state dict (and optionally its `_ema` teacher) into `model`.

    Without `teacher` the teacher becomes a copy of the loaded encoder (as the reference at update 0).
    Returns what was loaded, what of ours got nothing (`missing`) and what was not used (`unexpected`,
    with the reason for a shape mismatch).
    """
    sources = [(name, tensor, False) for name, tensor in student.items()]
    if teacher is not None:
        sources += [(name, tensor, True) for name, tensor in teacher.items()]
    return copy_mapped_weights(model, sources, fairseq_image_name_map, teacher_given=teacher is not None)


@torch.no_grad()
def copy_mapped_weights(model: nn.Module, sources, name_map, *, teacher_given: bool,
                        report: LoadReport | None = None, adapt=None) -> LoadReport:
    """Shared by the image, audio and text loaders: copy each (fairseq name, tensor, is_teacher) of
    `sources` to `name_map(name, teacher=is_teacher)` in `model`; report non-tensors, unmapped names and
    shape mismatches as unexpected and everything of ours that got nothing as missing. `adapt(dst, tensor,
    ours)` may reshape a tensor to our layout first. Without a teacher in the sources the teacher becomes
    a copy of the loaded encoder (as the reference at update 0)."""
    ours = model.state_dict()
    report = report if report is not None else LoadReport()
    for name, tensor, is_teacher in sources:
        label = f"_ema.{name}" if is_teacher else name
        if not isinstance(tensor, Tensor):
            report.unexpected.append(f"{label} (not a tensor)")
            continue
        dst = name_map(name, teacher=is_teacher)
        if dst is None or dst not in ours:
            report.unexpected.append(label)
            continue
        if adapt is not None:
            tensor = adapt(dst, tensor, ours[dst])
        if tuple(ours[dst].shape) != tuple(tensor.shape):
            report.unexpected.append(f"{label} (shape {tuple(tensor.shape)}, ours {dst} {tuple(ours[dst].shape)})")
            continue
        ours[dst].copy_(tensor)
        report.loaded.append(dst)
    if not teacher_given:
        model.reset_teacher()
        report.loaded += [f"teacher.module.{k}" for k in model.encoder.state_dict()]
    loaded = set(report.loaded)
    report.missing = [k for k in ours if k not in loaded and not k.endswith("_extra_state")]
    return report


# --- comparisons -----------------------------------------------------------------------------------


def _row(name: str, ours, golden: Tensor, tol: float, kind: str) -> ParityRow:
    ours = torch.as_tensor(ours).detach().to(torch.float64).cpu()
    golden = golden.detach().to(torch.float64).cpu()
    if ours.shape != golden.shape:
        return ParityRow(f"{name} (shape {tuple(ours.shape)} vs {tuple(golden.shape)})", math.inf, math.inf, tol,
                         False, kind)
    diff = (ours - golden).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(golden.abs().max()) if golden.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    err = max_abs if kind == "abs" else max_rel
    ok = bool(err <= tol) and math.isfinite(err)
    return ParityRow(name, max_abs, max_rel, tol, ok, kind)


class HookCapture:
    """Forward hooks recording golden intermediates (module inputs / outputs); each modality's parity
    run subclasses it to say which modules to watch."""

    def __init__(self):
        self.values: dict[str, Tensor] = {}
        self.handles = []

    def _in(self, module, name):
        def hook(_m, args):
            self.values[name] = args[0].detach().clone()
        self.handles.append(module.register_forward_pre_hook(hook))

    def _out(self, module, name, index=None, drop_extra=False):
        def hook(_m, _args, out):
            t = out if index is None else out[index]
            self.values[name] = (t[:, 1:] if drop_extra else t).detach().clone()
        self.handles.append(module.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


class _Capture(HookCapture):
    def __init__(self, model: Data2Vec2Image):
        super().__init__()
        enc, tenc = model.encoder, model.teacher.module
        self._out(enc.patch_embed, "student.local_features")
        self._in(enc.prenet, "student.context_encoder_in")
        self._out(enc.prenet, "student.prenet_out")
        for i, blk in enumerate(enc.blocks):
            self._out(blk, f"student.block{i}.out", index=0)
        self._in(model.decoder, "decoder.input")
        self._out(model.decoder, "decoder.output")
        self._in(tenc.blocks[0], "teacher.blocks_in")
        self._out(tenc.blocks[-1], f"teacher.block{len(tenc.blocks) - 1}.out", index=0)
        for i, blk in enumerate(tenc.blocks):
            self._out(blk, f"teacher.layer_result.{i}", index=1, drop_extra=True)


def _load_golden(golden_dir: str):
    from safetensors.torch import load_file

    with open(os.path.join(golden_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg, load_file(os.path.join(golden_dir, "weights.safetensors")), load_file(
        os.path.join(golden_dir, "tensors.safetensors"))


def _fairseq_teacher(golden_dir: str) -> dict[str, Tensor] | None:
    path = os.path.join(golden_dir, "fairseq_checkpoint.pt")
    if not os.path.exists(path):
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get("model", {}).get("_ema")


def _golden_model(golden_dir: str, weights: dict, model: nn.Module | None, build, loader,
                  use_checkpoint_teacher: bool) -> tuple[nn.Module, LoadReport]:
    """The model a parity run compares: `model` as given (loaded elsewhere, e.g. by from_fairseq; it must
    hold the golden update-0 weights already), or `build()` loaded with the golden weights and, by
    default, the checkpoint's `_ema` teacher."""
    torch.manual_seed(0)
    if model is not None:
        return model, LoadReport(loaded=list(model.state_dict()))
    model = build()
    teacher = _fairseq_teacher(golden_dir) if use_checkpoint_teacher else None
    return model, loader(model, weights, teacher)


def image_parity(golden_dir: str, backend: str | None = None, *, use_checkpoint_teacher: bool = True,
                 model: nn.Module | None = None) -> tuple[list[ParityRow], LoadReport]:
    """Every comparison against shared/golden/image (see the module docstring). `backend`: a
    d2v2_kernels backend name for the whole run (None: the one in force). `model`: run on this model instead of
    one built from config.json and weights.safetensors (the same update-0 weights are expected)."""
    cfg_json, weights, gold = _load_golden(golden_dir)
    config = Data2Vec2ImageConfig.from_fairseq(cfg_json["cfg"])
    lr = float(cfg_json["golden"].get("sgd_lr", 0.1))
    grad_order = cfg_json["golden"]["meta"].get("grad_per_param_l2_norm_order")
    model, report = _golden_model(golden_dir, weights, model, lambda: Data2Vec2Image(config),
                                  load_fairseq_image_weights, use_checkpoint_teacher)
    model.train()

    rows: list[ParityRow] = []
    add = rows.append
    M = config.clone_batch
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

        K = gold["mask.ids_keep"].shape[1]
        add(_row("mask.len_keep (config formula)", config.len_keep, torch.tensor(K), 0, "abs"))
        stable_keep, stable_restore = mask_to_ids(mask.bool())
        add(_row("mask.ids_keep (as sets, stable sort)", stable_keep,
                 gold["mask.ids_keep"].sort(1).values, 0, "abs"))
        for name in ["student.local_features", "student.context_encoder_in", "student.prenet_out"] + [
                f"student.block{i}.out" for i in range(config.depth)] + [
                "decoder.input", "decoder.output", "teacher.blocks_in", f"teacher.block{config.depth - 1}.out"]:
            if name in gold:
                add(_row(name, v[name], gold[name], TOL_ACT, "abs"))
        layers = torch.stack([v[f"teacher.layer_result.{i}"] for i in range(config.depth)])
        add(_row("teacher.layer_results", layers, gold["teacher.layer_results"], TOL_ACT, "abs"))
        top = model._target_buffer.tensor  # what the teacher wrote for the targets: the top-K layers
        add(_row("teacher.layer_results[-K:] (TargetLayerBuffer)", top,
                 gold["teacher.layer_results"][-config.average_top_k_layers:], TOL_ACT, "abs"))
        avg = layer_average_targets(top, layer_norm=config.target_layer_norm, final_norm=None)
        add(_row("target.avg_before_final_layer_norm", avg, gold["target.avg_before_final_layer_norm"],
                 TOL_ACT, "abs"))
        y = out.targets
        add(_row("target.orig_targets", y, gold["target.orig_targets"], TOL_ACT, "abs"))
        add(_row("loss.cls_pred", out.cls_pred, gold["loss.cls_pred"], TOL_ACT, "abs"))
        add(_row("loss.cls_target", y.mean(1).repeat_interleave(M, 0), gold["loss.cls_target"], TOL_ACT, "abs"))
        add(_row("loss.target_masked", y.repeat_interleave(M, 0)[mask.bool()], gold["loss.target_masked"],
                 TOL_ACT, "abs"))
        add(_row("loss.sample_size", out.sample_size, gold["loss.sample_size"], 0, "abs"))
        add(_row("loss.term.cls", out.losses["cls"], gold["loss.term.cls"], TOL_LOSS, "rel"))
        add(_row("loss.term.IMAGE_regression", out.losses["regression"], gold["loss.term.IMAGE_regression"],
                 TOL_LOSS, "rel"))
        add(_row("loss.total", out.loss, gold["loss.total"], TOL_LOSS, "rel"))
        for key in ("masked_pct", "pred_var", "target_var"):
            add(_row(f"log.{key}", out.logs[key], gold[f"log.{key}"], TOL_LOSS, "rel"))

        # -- raw gradients (d loss.total / d p, before the trainer's 1/sample_size) ------------------
        params = dict(model.named_parameters())
        for name in sorted(k for k in gold if k.startswith("grad.") and k[5:] in _grad_names(gold)):
            ours = fairseq_image_name_map(name[5:])
            add(_row(name, params[ours].grad, gold[name], TOL_GRAD, "rel"))
        if grad_order and "grad.per_param_l2_norm" in gold:
            norms = torch.stack([params[fairseq_image_name_map(n)].grad.double().norm() for n in grad_order])
            add(_row("grad.per_param_l2_norm", norms, gold["grad.per_param_l2_norm"], TOL_GRAD, "rel"))
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
        add(_row("ema.decay_used", torch.tensor(decay, dtype=torch.float64), gold["ema.decay_used"],
                 1e-7, "rel"))
        for name in sorted(k for k in gold if k.startswith("after_step.student.")):
            add(_row(name, params[fairseq_image_name_map(name[len("after_step.student."):])], gold[name],
                     TOL_STUDENT_STEP, "rel"))
        for name in sorted(k for k in gold if k.startswith("after_step.teacher.")):
            ours = fairseq_image_name_map(name[len("after_step.teacher."):], teacher=True)
            add(_row(name, params[ours], gold[name], TOL_EMA, "rel"))

        # -- the forward after the update ---------------------------------------------------------------
        with torch.no_grad():
            out1 = model(source, mask, ids_keep=gold["mask.ids_keep"], ids_restore=gold["mask.ids_restore"],
                         decoder_noise=gold["decoder.noise_full"])
        add(_row("after_step.target.orig_targets", out1.targets, gold["after_step.target.orig_targets"],
                 TOL_ACT, "abs"))
        add(_row("after_step.loss.term.cls", out1.losses["cls"], gold["after_step.loss.term.cls"], TOL_LOSS, "rel"))
        add(_row("after_step.loss.term.IMAGE_regression", out1.losses["regression"],
                 gold["after_step.loss.term.IMAGE_regression"], TOL_LOSS, "rel"))
        add(_row("after_step.loss.total", out1.loss, gold["after_step.loss.total"], TOL_LOSS, "rel"))
    return rows, report


def _grad_names(gold: dict) -> set[str]:
    return {k[5:] for k in gold if k.startswith("grad.") and k not in ("grad.per_param_l2_norm",
                                                                         "grad.total_l2_norm_raw")}


def format_rows(rows: list[ParityRow]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'tensor':<{width}}  {'max_abs':>10}  {'max_rel':>10}  {'tol':>12}  ok"]
    for r in rows:
        tol = f"{r.kind} {r.tol:.2g}"
        lines.append(f"{r.name:<{width}}  {r.max_abs:10.3e}  {r.max_rel:10.3e}  {tol:>12}  {'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)
