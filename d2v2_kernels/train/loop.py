"""The training loop, shared by data2vec 2.0 and MAE.

A method is an nn.Module with
    make_masks(batch, generator) -> dict of tensors whose dim 0 is the sample (sliceable per rank)
    forward(images, **masks) -> (loss, logs): loss a scalar to minimise, logs a dict of scalar tensors
    after_step(step) -> None  (e.g. the EMA teacher update; may be a no-op)
    set_full_logs(enabled) -> None, optional: costly diagnostics only on the steps that are logged
    checkpoint_tensors() -> {"student": state dict, ...}; load_checkpoint_tensors(groups)
    encode(images) -> [B, D] features for evaluation.

Randomness is keyed by (seed, step) and drawn for the whole global batch on every rank, each rank taking
its rows, so N processes compute the same step as one process with the same global batch, and a resumed
run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from .. import backends
from ..data.images import Augment, InMemoryLoader, load_fashion_mnist, load_image_folder, to_float
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    load_rng_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
)
from .config import RESUMABLE_CHANGES, TrainConfig, config_from_json


class TrainingError(RuntimeError):
    """The run cannot go on: non-finite loss, collapsed targets, or a checkpoint that does not fit."""


# --- distributed -------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


# --- schedule, optimizer -------------------------------------------------------------------------


def lr_at(cfg: TrainConfig, progress: float, step: int) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to min_lr over the run (progress in [0, 1])."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(cfg: TrainConfig, method: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the method's parameter groups (the reference's: no weight decay on biases and 1-D
    parameters); fused on GPU, foreach on CPU."""
    groups = method.param_groups(cfg.weight_decay)
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **kind)


# --- data ----------------------------------------------------------------------------------------


def load_train_data(cfg: TrainConfig):
    if cfg.data == "fmnist":
        images, labels = load_fashion_mnist("train", cfg.data_dir)
    else:
        images, labels, _ = load_image_folder(cfg.data, cfg.image_size)
    if images.shape[1] != cfg.in_chans:
        raise ValueError(f"data has {images.shape[1]} channels, config in_chans={cfg.in_chans}")
    return images, labels


def step_generator(cfg: TrainConfig, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


# --- progress --------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar (step, loss, images/s, ETA) on stderr; plain lines when not a terminal."""

    def __init__(self, total_steps: int, enabled: bool, every: int):
        self.total, self.enabled, self.every = total_steps, enabled, every
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, images_per_s: float, elapsed: float, remaining_s: float) -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        frac = step / max(self.total, 1)
        bar = "#" * int(frac * 24)
        eta = time.strftime("%H:%M:%S", time.gmtime(max(remaining_s, 0)))
        line = (f"[{bar:<24}] {step}/{self.total} loss {loss:.4f} {images_per_s:.0f} img/s "
                f"elapsed {elapsed:.0f}s ETA {eta}")
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# --- the loop ------------------------------------------------------------------------------------


def _check_resumable(saved: TrainConfig, cfg: TrainConfig) -> None:
    diff = [k for k, v in vars(cfg).items() if getattr(saved, k) != v and k not in RESUMABLE_CHANGES]
    if diff:
        raise TrainingError(f"cannot resume: the config differs from the checkpoint's in {diff}")


def train(cfg: TrainConfig, build_method, *, resume: bool = False, on_eval=None, eval_every_s: float = 0.0,
          stop_after_steps: int | None = None) -> dict:
    """Train `build_method(cfg)` under `cfg`; returns a summary (steps, losses, wall time, images/s).

    on_eval(method, step, train_seconds) is called on rank 0 every `eval_every_s` seconds of training time
    (evaluation time is not counted as training time) and at the end. stop_after_steps: leave the loop
    after that many steps of this invocation without the final checkpoint, as a killed run would (for
    preemption drills and the resume tests).
    """
    rank, world, device = init_distributed()
    is_main = rank == 0
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    backend_ctx = backends.use_backend(cfg.backend)
    backend_ctx.__enter__()
    try:
        images, _ = load_train_data(cfg)
        method = build_method(cfg).to(device)
        optimizer = make_optimizer(cfg, method, device)
        loader = InMemoryLoader(len(images), cfg.batch_size, cfg.seed, rank, world)
        augment = Augment(cfg.image_size, cfg.crop_scale, flip=cfg.flip)
        steps_per_epoch = loader.batches_per_epoch
        total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, round(cfg.epochs * steps_per_epoch))
        step, train_seconds, history = 0, 0.0, []

        if resume:
            ckpt = latest_checkpoint(cfg.out_dir)
            if ckpt is None:
                raise TrainingError(f"--resume: no checkpoint in {cfg.out_dir}")
            groups, state = load_checkpoint(ckpt)
            _check_resumable(config_from_json(json.dumps(state["config"])), cfg)
            method.load_checkpoint_tensors(groups)
            load_optimizer_state(optimizer, groups["optimizer"], state["optimizer"])
            load_rng_state(groups["rng"])
            loader.load_state_dict(state["loader"])
            step, train_seconds, history = int(state["step"]), float(state["train_seconds"]), state["losses"]
        if is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                f.write(cfg.to_json())
            metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
            _truncate_metrics(metrics_path, step)

        start_len = len(history)
        model = nn.parallel.DistributedDataParallel(method) if world > 1 else method
        use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
        progress = Progress(total_steps, cfg.progress and is_main, cfg.log_every)
        rows_per_rank = cfg.batch_size // world
        next_eval = (train_seconds // eval_every_s + 1) * eval_every_s if eval_every_s > 0 else math.inf
        evaluated_step = None  # the final evaluation is skipped when the last step was just evaluated

        def checkpoint():
            if not is_main:
                return
            opt_tensors, opt_meta = optimizer_state(optimizer)
            groups = {**method.checkpoint_tensors(), "optimizer": opt_tensors, "rng": rng_state()}
            save_checkpoint(cfg.out_dir, step, groups, {
                "config": json.loads(cfg.to_json()), "optimizer": opt_meta, "loader": loader.state_dict(),
                "train_seconds": train_seconds, "losses": history,
            }, keep=cfg.keep_checkpoints)

        method.train()
        while step < total_steps and not (cfg.time_budget_s > 0 and train_seconds >= cfg.time_budget_s):
            t0 = time.perf_counter()
            gen = step_generator(cfg, step)
            idx = loader.next_indices()
            # Draw every random choice for the global batch, take this rank's rows.
            rows = slice(rank, None, world)
            batch = images[idx].to(device, non_blocking=True)
            x = augment(to_float(batch), gen, rows=rows, total=cfg.batch_size)
            masks = method.make_masks(cfg.batch_size, gen)
            masks = {k: v[rows].to(device) for k, v in masks.items()}
            progress_frac = (train_seconds / cfg.time_budget_s if cfg.time_budget_s > 0 else step / total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(cfg, progress_frac, step)
            if hasattr(method, "set_full_logs"):
                method.set_full_logs((step + 1) % cfg.log_every == 0 or step + 1 == total_steps)
            amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
            with amp:
                loss, logs = model(x, **masks)
            if not torch.isfinite(loss):
                raise TrainingError(f"step {step}: loss is {loss.item()}; stopping (lower lr or enable clipping)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.clip_grad)
            optimizer.step()
            method.after_step(step + 1)
            step += 1
            loss_value = loss.item()
            logs = {k: float(v) for k, v in logs.items()}
            if cfg.target_var_min > 0 and logs.get("target_var", math.inf) < cfg.target_var_min:
                raise TrainingError(
                    f"step {step}: target variance {logs['target_var']:.4g} < target_var_min={cfg.target_var_min}:"
                    " the teacher's representations collapsed; stopping (set target_var_min=0 to disable)"
                )
            dt = time.perf_counter() - t0
            train_seconds += dt
            history.append(loss_value)
            if is_main:
                rate = rows_per_rank * world / dt
                remaining = ((cfg.time_budget_s - train_seconds) if cfg.time_budget_s > 0
                             else (total_steps - step) * train_seconds / max(len(history), 1))
                progress.update(step, loss_value, rate, train_seconds, remaining)
                if step % cfg.log_every == 0 or step == total_steps:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                                            "images_per_s": rate, "train_seconds": train_seconds, **logs}) + "\n")
                if on_eval is not None and train_seconds >= next_eval:
                    method.eval()
                    on_eval(method, step, train_seconds)
                    evaluated_step = step
                    method.train()
                    next_eval = (train_seconds // eval_every_s + 1) * eval_every_s
            if cfg.save_every > 0 and step % cfg.save_every == 0:
                checkpoint()
            if stop_after_steps is not None and len(history) - start_len >= stop_after_steps:
                return {"steps": step, "losses": history, "train_seconds": train_seconds, "stopped": True}
        checkpoint()
        if is_main and on_eval is not None and evaluated_step != step:
            method.eval()
            on_eval(method, step, train_seconds)
        return {"steps": step, "losses": history, "train_seconds": train_seconds,
                "images_per_s": cfg.batch_size * len(history) / max(train_seconds, 1e-9) if history else 0.0}
    finally:
        backend_ctx.__exit__(None, None, None)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop log lines past `step` (a resumed run rewrites them)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(keep)
