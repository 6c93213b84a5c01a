"""Reading the authors' fairseq checkpoints safely: no fairseq, no omegaconf, nothing executed.

A fairseq checkpoint is a `torch.save` pickle: {"cfg" or "args", "model" (the student's state dict plus
"_ema", the teacher's), optimizer and trainer state}. Its cfg comes as a plain dict, as an omegaconf
DictConfig pickle (a checkpoint loaded with fairseq and saved again), or as a legacy argparse Namespace.
We read it with PyTorch's `weights_only` unpickler, which only rebuilds tensors and plain containers,
plus an allow-list:

- omegaconf containers, nodes and metadata map to inert stand-ins (`_Inert`) that only store what the
  pickle hands them and are converted to plain dicts/lists afterwards;
- numpy scalars / arrays / dtypes and fairseq meters (trainer statistics we never read) map to the same stand-ins;
- argparse.Namespace, typing.Any, collections.defaultdict and plain builtin types (dict, list, int, ...)
  are harmless containers or markers.

Any other global (a function a hostile pickle would call, e.g. os.system) is refused by name before
anything is unpickled.
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import typing

import torch


class CheckpointImportError(RuntimeError):
    """The file is not a data2vec 2.0 checkpoint we can read safely (the message says why)."""


class _Inert:
    """Stands in for a class from a checkpoint we do not import: stores constructor args and state."""

    _qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{self._qualified_name} (not imported)>"


def _inert(qualified_name: str) -> type:
    return type(qualified_name.rsplit(".", 1)[-1], (_Inert,), {"_qualified_name": qualified_name})


_OMEGACONF_CONTAINERS = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")
_OMEGACONF_OTHER = (
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode", "omegaconf.nodes.EnumNode", "omegaconf.nodes.PathNode",
    "omegaconf.nodes.BytesNode",
)
_OPAQUE = (  # trainer state we never read
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.ndarray",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "fairseq.logging.meters.AverageMeter", "fairseq.logging.meters.TimeMeter",
    "fairseq.logging.meters.StopwatchMeter", "fairseq.logging.meters.MetersDict",
)
_STAND_INS = {name: _inert(name) for name in _OMEGACONF_CONTAINERS + _OMEGACONF_OTHER + _OPAQUE}
_HARMLESS = {"argparse.Namespace": argparse.Namespace, "typing.Any": typing.Any,
             "collections.defaultdict": collections.defaultdict,
             # plain types, referenced as values (omegaconf's type metadata, defaultdict factories)
             **{f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, frozenset, int, float, bool, str, bytes)}}


def _check_path(path: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointImportError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointImportError(f"{path}: the file is empty")


def read_fairseq_checkpoint(path: str) -> dict:
    """The checkpoint as plain Python: dicts, lists, tensors; cfg converted to a plain dict."""
    _check_path(path)
    try:
        referenced = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a zip (legacy or garbage) or truncated: let torch.load say which
        referenced = None
        probe_error = e
    if referenced is not None:
        refused = sorted(g for g in referenced if g not in _STAND_INS and g not in _HARMLESS)
        if refused:
            raise CheckpointImportError(
                f"refusing to load {path}: its pickle references {', '.join(refused)}, which a fairseq "
                "data2vec 2.0 checkpoint does not contain and which could run code when unpickled; nothing "
                "from the file was executed")
    allowed = [(cls, name) for name, cls in _STAND_INS.items()] + [(obj, name) for name, obj in _HARMLESS.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()  # torch's message: advice first, the unpickler's reason further down
        reason = next((ln.strip() for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
        raise CheckpointImportError(
            f"refusing to load {path}: {reason} (the file is corrupt, not a checkpoint, or holds objects other "
            "than tensors, plain containers and a fairseq config; nothing from the file was executed)") from None
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if referenced is None:
            detail += f"; as a zip archive: {str(probe_error).splitlines()[0]}"
        raise CheckpointImportError(
            f"cannot read {path} as a PyTorch checkpoint ({detail}): truncated, corrupt, or not a checkpoint"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointImportError(f"{path}: expected a fairseq checkpoint (a dict), got {type(ckpt).__name__}")
    for key in ("cfg", "args"):
        if ckpt.get(key) is not None:
            ckpt[key] = _plain(ckpt[key])
    return ckpt


def _plain(obj):
    """omegaconf stand-ins, Namespaces and containers -> plain dicts / lists / values."""
    if isinstance(obj, _Inert):
        state = obj.state if isinstance(obj.state, dict) else {}
        if obj._qualified_name in _OMEGACONF_CONTAINERS:
            content = state.get("_content")
            return _plain(content) if not isinstance(content, str) else content  # "???" / interpolation
        if "_val" in state:  # a value node
            return _plain(state["_val"])
        return obj
    if isinstance(obj, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def model_config(ckpt: dict, path: str = "checkpoint") -> dict:
    """The `model` section of the checkpoint's cfg (or of a legacy `args` namespace)."""
    cfg = ckpt.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        model = dict(cfg["model"])
    elif isinstance(ckpt.get("args"), dict):  # legacy: a flat argparse namespace
        args = ckpt["args"]
        model = dict(args)
        model.setdefault("_name", args.get("arch"))
    else:
        raise CheckpointImportError(f"{path}: no model configuration (neither cfg.model nor args)")
    if model.get("_name") != "data2vec_multi":
        raise CheckpointImportError(
            f"{path}: a {model.get('_name')!r} model, not data2vec 2.0 pretraining ('data2vec_multi'); "
            "fine-tuned and data2vec 1.0 checkpoints are not supported")
    if not isinstance(model.get("modalities"), dict):
        raise CheckpointImportError(f"{path}: the model configuration has no 'modalities' section")
    return model


def state_dicts(ckpt: dict, path: str = "checkpoint") -> tuple[dict, dict | None]:
    """(student state dict, teacher `_ema` state dict or None)."""
    model = ckpt.get("model")
    if not isinstance(model, dict) or not model:
        raise CheckpointImportError(f"{path}: no model weights ('model' is missing or empty)")
    student = {k: v for k, v in model.items() if k != "_ema"}
    teacher = model.get("_ema")
    if teacher is not None and not isinstance(teacher, dict):
        raise CheckpointImportError(f"{path}: '_ema' is a {type(teacher).__name__}, expected a state dict")
    return student, teacher
