"""The trainer end to end on Fashion-MNIST: the loss falls, a killed-and-resumed run repeats the
uninterrupted one exactly, two torchrun processes match one process, and the guards stop bad runs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from d2v2_kernels.data.images import FASHION_MNIST_INSTALL, find_fashion_mnist
from d2v2_kernels.train.config import make_config
from d2v2_kernels.train.loop import TrainingError, train
from d2v2_kernels.train.methods import build_method

try:
    find_fashion_mnist()
    HAVE_DATA = True
except FileNotFoundError:
    HAVE_DATA = False
pytestmark = pytest.mark.skipif(not HAVE_DATA, reason=f"Fashion-MNIST missing: {FASHION_MNIST_INSTALL}")

# A model small enough for a few steps per second on 2 cores, still every part of data2vec 2.0.
TINY = ["embed_dim=32", "depth=2", "num_heads=2", "average_top_k_layers=2", "decoder_dim=32", "decoder_layers=2",
        "decoder_groups=4", "clones=2", "batch_size=32", "warmup_steps=5", "progress=false", "log_every=5"]


def cfg_for(tmp_path, *extra):
    return make_config("fmnist-tiny", TINY + [f"out_dir={tmp_path}"] + list(extra))


def test_fmnist_tiny_loss_falls(tmp_path):
    cfg = make_config("fmnist-tiny", [f"out_dir={tmp_path}", "max_steps=80", "progress=false", "lr=2e-3"])
    summary = train(cfg, build_method)
    losses = summary["losses"]
    assert len(losses) == 80
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert lines[-1]["step"] == 80 and {"loss", "lr", "images_per_s", "target_var", "pred_var"} <= set(lines[-1])
    assert json.load(open(tmp_path / "config.json"))["max_steps"] == 80
    assert os.path.exists(tmp_path / "step_00000080" / "teacher.safetensors")


def test_killed_and_resumed_run_repeats_the_uninterrupted_one(tmp_path):
    full = train(cfg_for(tmp_path / "full", "max_steps=12", "save_every=4"), build_method)
    cfg = cfg_for(tmp_path / "killed", "max_steps=12", "save_every=4")
    killed = train(cfg, build_method, stop_after_steps=6)  # dies after step 6; last checkpoint: step 4
    assert killed["stopped"] and killed["steps"] == 6
    resumed = train(cfg, build_method, resume=True)
    assert resumed["steps"] == 12
    assert resumed["losses"] == full["losses"]  # bitwise: same masks, crops, noise, optimizer state
    lines = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "metrics.jsonl")]
    assert lines == [5, 10, 12]  # the steps logged twice (5) were rewritten, not duplicated


def test_resume_refuses_a_different_config(tmp_path):
    train(cfg_for(tmp_path, "max_steps=2"), build_method)
    with pytest.raises(TrainingError, match="embed_dim"):
        train(cfg_for(tmp_path, "max_steps=4", "embed_dim=64", "decoder_dim=64"), build_method, resume=True)
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(cfg_for(tmp_path / "empty", "max_steps=4"), build_method, resume=True)


def test_non_finite_loss_and_collapse_stop_the_run(tmp_path):
    def nan_method(cfg):
        method = build_method(cfg)
        forward = method.forward
        method.forward = lambda *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(forward(*a, **k))
        return method

    with pytest.raises(TrainingError, match="loss is nan"):
        train(cfg_for(tmp_path / "nan", "max_steps=3"), nan_method)
    with pytest.raises(TrainingError, match="target variance"):
        train(cfg_for(tmp_path / "var", "max_steps=3", "target_var_min=100"), build_method)


def test_torchrun_two_processes_match_one(tmp_path):
    # Decoder noise off: its per-row stream depends on the row's index within a rank's batch.
    common = TINY + ["max_steps=4", "save_every=0", "mask_noise_std=0", "lr=1e-3"]
    single = train(make_config("fmnist-tiny", common + [f"out_dir={tmp_path / 'one'}"]), build_method)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "d2v2_kernels.train", "--preset", "fmnist-tiny", *common, f"out_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from d2v2_kernels.train.checkpoint import load_checkpoint

    one, _ = load_checkpoint(str(tmp_path / "one"))
    two, _ = load_checkpoint(str(tmp_path / "two"))
    for group in ("student", "teacher"):
        for k, v in one[group].items():
            torch.testing.assert_close(two[group][k], v, atol=2e-5, rtol=1e-4, msg=f"{group}.{k}")
    assert single["steps"] == 4
