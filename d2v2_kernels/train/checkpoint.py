"""Training checkpoints: safetensors for tensors, JSON for everything else; nothing is ever unpickled.

A checkpoint is a directory `step_<N>/` holding one `<group>.safetensors` per tensor group (student,
teacher, optimizer, rng) and `state.json` (step, config, optimizer hyper-parameters, loader position).
It is written under a temporary name and renamed into place, then `latest` (a one-line text file) is
replaced atomically, so a run killed at any moment leaves either the old or the new checkpoint whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
from torch import Tensor

FORMAT = "d2v2-checkpoint/1"
_GROUP = re.compile(r"^[a-z_]+$")
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not one of ours."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str, step: int, tensors: dict[str, dict[str, Tensor]], state: dict, keep: int = 2) -> str:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = tempfile.mkdtemp(prefix=".tmp_step_", dir=root)
    try:
        for group, named in tensors.items():
            if not _GROUP.match(group):
                raise ValueError(f"tensor group name {group!r}: expected lower-case letters and '_'")
            path = os.path.join(tmp, f"{group}.safetensors")
            save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, path)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"format": FORMAT, "step": step, "groups": sorted(tensors), **state}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = os.path.join(root, ".latest.tmp")
    with open(latest_tmp, "w") as f:
        f.write(os.path.basename(final) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, os.path.join(root, "latest"))
    _fsync_dir(root)
    steps = sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(root: str) -> str | None:
    """The directory `latest` points at, or None when `root` has no checkpoint yet."""
    pointer = os.path.join(root, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read(64).strip()
    if not _STEP_DIR.match(name):
        raise CheckpointError(f"{pointer}: expected a 'step_NNNNNNNN' name, got {name[:40]!r}")
    return os.path.join(root, name)


def load_checkpoint(path: str) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """(tensor groups, state) of a checkpoint directory, or of the latest one in a run directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if os.path.isfile(path):
        raise CheckpointError(
            f"{path}: expected a checkpoint directory (step_NNNNNNNN/ with state.json and .safetensors files) or "
            "a run directory; pickled .pt files are never loaded here (convert fairseq checkpoints with `d2v2 convert`)"
        )
    if not os.path.exists(os.path.join(path, "state.json")):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: no state.json and no 'latest' pointer: not a checkpoint")
        path = latest
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/state.json: unreadable or not JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}/state.json: not a {FORMAT} checkpoint")
    groups = state.get("groups")
    if not isinstance(groups, list) or not all(isinstance(g, str) and _GROUP.match(g) for g in groups):
        raise CheckpointError(f"{path}/state.json: bad 'groups' entry {groups!r}")
    tensors = {}
    for g in groups:
        file = os.path.join(path, f"{g}.safetensors")
        try:
            tensors[g] = load_file(file)
        except (OSError, SafetensorError, ValueError) as e:
            raise CheckpointError(f"{file}: unreadable or corrupt safetensors file ({e})") from None
    return tensors, state


# --- optimizer and RNG state as (tensors, JSON) ------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"optimizer state does not fit this model's optimizer: {e}") from None


def rng_state() -> dict[str, Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def load_rng_state(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
