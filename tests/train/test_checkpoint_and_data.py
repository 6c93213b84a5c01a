"""Checkpoint files (atomic, safe, refuse bad input), config overrides, the idx reader, the loader and the
batched augmentation."""

import gzip
import os
import pickle
import struct

import pytest
import torch

from d2v2_kernels.data.images import Augment, InMemoryLoader, read_idx
from d2v2_kernels.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    save_checkpoint,
)
from d2v2_kernels.train.config import config_from_json, make_config


def _model_and_optimizer():
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    return m, opt


def test_round_trip_and_retention(tmp_path):
    m, opt = _model_and_optimizer()
    for step in (1, 2, 3):
        t, meta = optimizer_state(opt)
        save_checkpoint(str(tmp_path), step, {"student": m.state_dict(), "optimizer": t},
                        {"optimizer": meta, "loader": {"epoch": 0, "batch": step}}, keep=2)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("step_")) == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000003")
    groups, state = load_checkpoint(str(tmp_path))
    assert state["step"] == 3 and state["loader"]["batch"] == 3
    for k, v in m.state_dict().items():
        assert torch.equal(groups["student"][k], v)
    opt2 = torch.optim.AdamW(m.parameters(), lr=1e-2)
    load_optimizer_state(opt2, groups["optimizer"], state["optimizer"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_corrupt_truncated_and_pickled(tmp_path):
    m, _ = _model_and_optimizer()
    path = save_checkpoint(str(tmp_path / "run"), 1, {"student": m.state_dict()}, {})
    weights = os.path.join(path, "student.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    open(os.path.join(path, "state.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="not JSON"):
        load_checkpoint(path)

    class Evil:  # would run code when unpickled
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="never loaded"):
        load_checkpoint(str(evil))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "state.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a d2v2-checkpoint"):
        load_checkpoint(str(other))


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    m, _ = _model_and_optimizer()
    save_checkpoint(str(tmp_path), 1, {"student": m.state_dict()}, {})
    import json as json_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(json_mod, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 2, {"student": m.state_dict()}, {})
    monkeypatch.undo()
    assert latest_checkpoint(str(tmp_path)).endswith("step_00000001")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    assert load_checkpoint(str(tmp_path))[1]["step"] == 1


def test_config_overrides_and_json():
    cfg = make_config("fmnist-tiny", ["lr=3e-4", "betas=0.9,0.99", "flip=false"])
    assert (cfg.lr, cfg.betas, cfg.flip) == (3e-4, (0.9, 0.99), False)
    assert config_from_json(cfg.to_json()) == cfg
    for bad, msg in ((["nope=1"], "unknown config field"), (["lr=abc"], "expected a float"),
                     (["depth"], "key=value"), (["average_top_k_layers=99"], "average_top_k_layers")):
        with pytest.raises(ValueError, match=msg):
            make_config("fmnist-tiny", bad)
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("nope")


def _write_idx(path, array_bytes, shape):
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + array_bytes)


def test_idx_reader(tmp_path):
    p = str(tmp_path / "x-idx3-ubyte.gz")
    _write_idx(p, bytes(range(24)), (2, 3, 4))
    assert torch.equal(read_idx(p), torch.arange(24, dtype=torch.uint8).view(2, 3, 4))
    _write_idx(p, bytes(range(23)), (2, 3, 4))
    with pytest.raises(ValueError, match="header says"):
        read_idx(p)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read|magic"):
        read_idx(str(bad))


def test_loader_resumes_and_shards():
    full = InMemoryLoader(100, 10, seed=3)
    seq = [full.next_indices() for _ in range(25)]  # crosses two epoch boundaries
    resumed = InMemoryLoader(100, 10, seed=3)
    resumed.load_state_dict({"epoch": 1, "batch": 7})
    assert all(torch.equal(resumed.next_indices(), seq[i]) for i in range(17, 25))
    ranks = [InMemoryLoader(100, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    for i in range(3):
        a, b = ranks[0].next_indices(), ranks[1].next_indices()
        assert torch.equal(torch.sort(torch.cat([a, b])).values, torch.sort(seq[i]).values)
    with pytest.raises(ValueError, match="divisible"):
        InMemoryLoader(100, 10, seed=0, world_size=3)


def test_augment_sharded_rows_match_whole_batch():
    x = torch.randn(8, 1, 28, 28)
    aug = Augment(28)
    whole = aug(x, torch.Generator().manual_seed(5))
    for r in range(2):
        part = aug(x[r::2], torch.Generator().manual_seed(5), rows=slice(r, None, 2), total=8)
        torch.testing.assert_close(part, whole[r::2])
    assert whole.shape == x.shape and not torch.equal(whole, x)


def test_augment_scale_one_is_flips_only():
    x = torch.randn(16, 1, 28, 28)
    out = Augment(28, scale=(1.0, 1.0))(x, torch.Generator().manual_seed(0))
    flipped = x.flip(-1)
    same = [torch.allclose(o, a, atol=1e-5) or torch.allclose(o, f, atol=1e-5) for o, a, f in zip(out, x, flipped)]
    assert all(same)  # every image is itself or its mirror image: no crop, no aspect jitter
    assert any(torch.allclose(o, f, atol=1e-5) for o, f in zip(out, flipped))
