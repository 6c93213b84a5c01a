"""Evaluation protocols: weighted k-NN (against a brute-force loop), the linear probe, few-shot sampling,
feature extraction, the raw-pixel floor on a Fashion-MNIST slice, fine-tuning on a tiny slice, and
`d2v2 eval` on a freshly trained run."""

import json
import math

import pytest
import torch
from torch import nn

from d2v2_kernels import eval as E
from d2v2_kernels.data.images import FASHION_MNIST_INSTALL, find_fashion_mnist, load_fashion_mnist

try:
    find_fashion_mnist()
    HAVE_DATA = True
except FileNotFoundError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"Fashion-MNIST missing: {FASHION_MNIST_INSTALL}")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests are many small ops: one thread keeps them fast on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n_per_class, classes=10, dim=32, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


# --- k-NN ---------------------------------------------------------------------------------------------


def test_knn_clustered_is_perfect_and_random_labels_are_chance():
    xtr, ytr = blobs(100)
    g = torch.Generator().manual_seed(1)
    centres = torch.stack([xtr[ytr == c].mean(0) for c in range(10)])
    yte = torch.arange(10).repeat(50)
    xte = centres[yte] + 0.3 * torch.randn(len(yte), xtr.shape[1], generator=g)
    assert E.knn_accuracy(xtr, ytr, xte, yte) > 99.0

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 16, generator=g)
    y = torch.randint(0, 10, (3000,), generator=g)
    acc = E.knn_accuracy(x[:2000], y[:2000], x[2000:], y[2000:])
    assert 5.0 < acc < 16.0, acc


def test_knn_weighted_vote_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    xtr, ytr = torch.randn(30, 5, generator=g), torch.randint(0, 4, (30,), generator=g)
    xte = torch.randn(9, 5, generator=g)
    k, T, C = 7, 0.07, 4
    expected = []
    for q in xte:
        sims = [float(torch.dot(q, t) / (q.norm() * t.norm())) for t in xtr]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * C
        for i in order:
            votes[int(ytr[i])] += math.exp(sims[i] / T)
        expected.append(max(range(C), key=lambda c: votes[c]))
    pred = E.knn_predict(xtr, ytr, xte, k=k, temperature=T, num_classes=C)
    assert pred.tolist() == expected
    # chunking over test rows changes nothing; k larger than the training set is clipped
    assert torch.equal(E.knn_predict(xtr, ytr, xte, k=k, temperature=T, num_classes=C, chunk_elems=31), pred)
    assert E.knn_predict(xtr, ytr, xte, k=100, num_classes=C).shape == (9,)
    assert E.knn_accuracy(xtr, ytr, xte, torch.tensor(expected), k=k, temperature=T) == 100.0


# --- linear probe ---------------------------------------------------------------------------------------


def test_linear_probe_separates_linearly_separable_data_deterministically():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3000, 20, generator=g)
    scores = z @ torch.randn(20, 3, generator=g)
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 1.0  # separable with a margin
    x, y = (z * torch.linspace(0.1, 10, 20))[keep][:1200], scores.argmax(1)[keep][:1200]  # badly scaled
    details = {}
    acc = E.linear_probe(x[:900], y[:900], x[900:], y[900:], details=details)
    assert acc > 97.0, acc
    assert details["weight_decay"] in E.DEFAULT_WEIGHT_DECAYS and len(details["val_accuracy"]) == 4
    assert E.linear_probe(x[:900], y[:900], x[900:], y[900:]) == acc
    assert E.linear_probe(x[:900], y[:900], x[900:], y[900:], weight_decays=(1e-3,)) > 97.0


def test_joint_weight_decay_fit_equals_separate_fits():
    x, y = blobs(30, classes=3, dim=6, spread=2.0)
    W, b = E._fit_logreg(x, y, 3, [1e-1, 1e-3], 200)
    for i, wd in enumerate((1e-1, 1e-3)):
        Wi, bi = E._fit_logreg(x, y, 3, [wd], 200)
        torch.testing.assert_close(W[i], Wi[0], atol=1e-2, rtol=5e-2)
        torch.testing.assert_close(b[i], bi[0], atol=1e-2, rtol=5e-2)


# --- few-shot --------------------------------------------------------------------------------------------


def test_few_shot_picks_exactly_shots_per_class():
    y = torch.arange(5).repeat_interleave(40)[torch.randperm(200)]
    idx = E.few_shot_indices(y, shots=7, seed=0)
    assert idx.numel() == 35 and idx.unique().numel() == 35
    assert torch.bincount(y[idx], minlength=5).tolist() == [7] * 5
    assert torch.equal(idx, E.few_shot_indices(y, shots=7, seed=0))
    assert not torch.equal(idx, E.few_shot_indices(y, shots=7, seed=1))
    with pytest.raises(ValueError, match="fewer than shots"):
        E.few_shot_indices(y, shots=41, seed=0)


def test_few_shot_protocols():
    xtr, ytr = blobs(50)
    centres = torch.stack([xtr[ytr == c].mean(0) for c in range(10)])
    yte = torch.arange(10).repeat(20)
    xte = centres[yte] + 0.3 * torch.randn(200, 32)
    mean, std = E.few_shot(xtr, ytr, xte, yte, shots=2, seeds=(0, 1, 2))
    assert mean > 99.0 and std >= 0.0
    mean, std = E.few_shot(xtr, ytr, xte, yte, shots=2, seeds=(0,), protocol="linear")
    assert mean > 99.0 and std == 0.0
    with pytest.raises(ValueError, match="protocol"):
        E.few_shot(xtr, ytr, xte, yte, protocol="svm")


# --- features -----------------------------------------------------------------------------------------


class Dummy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 4)
        self.modes = []

    @torch.no_grad()
    def encode(self, images):
        self.modes.append(self.training)
        flat = images.flatten(1)
        return {"mean": self.proj(flat).to(torch.bfloat16), "cls": flat[:, :3]}


def test_extract_features_eval_mode_no_grad_chunks_fp32():
    m = Dummy().train()
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    feats = E.extract_features(m, images, batch_size=4)
    assert m.modes == [False, False, False] and m.training  # eval inside, the mode restored after
    assert feats["mean"].shape == (10, 4) and feats["cls"].shape == (10, 3)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in feats.values())
    torch.testing.assert_close(feats["cls"], images.flatten(1)[:, :3].float() / 127.5 - 1)
    # a bare callable returning a tensor gives {"mean": ...}
    assert set(E.extract_features(lambda x: x.flatten(1), images)) == {"mean"}
    px = E.raw_pixel_features(images)["pixels"]
    assert px.shape == (10, 16) and px.min() >= -1 and px.max() <= 1


@needs_data
def test_raw_pixel_knn_on_a_fashion_mnist_slice():
    tr, ytr = load_fashion_mnist("train")
    te, yte = load_fashion_mnist("test")
    timings = {}
    res = E.evaluate(None, tr[:5000], ytr[:5000], te[:1000], yte[:1000], protocols=("knn", "fewshot_knn"),
                     timings=timings)
    assert 70.0 < res["knn"] < 95.0, res
    assert 45.0 < res["fewshot_knn"] < 85.0 and "fewshot_knn_std" in res
    assert set(timings) == {"features", "knn", "fewshot_knn"}
    with pytest.raises(ValueError, match="unknown protocols"):
        E.evaluate(None, tr[:10], ytr[:10], te[:10], yte[:10], protocols=("svm",))


# --- fine-tuning and the command line -------------------------------------------------------------------

TINY = ["embed_dim=32", "depth=2", "num_heads=2", "average_top_k_layers=2", "decoder_dim=32", "decoder_layers=2",
        "decoder_groups=4", "clones=2", "batch_size=32", "warmup_steps=5", "progress=false"]


@needs_data
def test_finetune_on_a_tiny_slice():
    from d2v2_kernels.train.config import make_config
    from d2v2_kernels.train.methods import build_method

    method = build_method(make_config("fmnist-tiny", TINY))
    before = {k: v.detach().clone() for k, v in method.named_parameters()}
    tr, ytr = load_fashion_mnist("train")
    te, yte = load_fashion_mnist("test")
    acc = E.finetune(method, tr[:128], ytr[:128], te[:64], yte[:64], epochs=2, batch_size=32, lr=2e-3)
    assert 0.0 <= acc <= 100.0
    assert all(torch.equal(v, p) for (k, v), (_, p) in zip(before.items(), method.named_parameters()))  # a copy


@needs_data
def test_d2v2_eval_on_a_trained_run(tmp_path, capsys):
    from d2v2_kernels.cli import main
    from d2v2_kernels.train.config import make_config
    from d2v2_kernels.train.loop import train
    from d2v2_kernels.train.methods import build_method

    run = tmp_path / "run"
    train(make_config("fmnist-tiny", ["max_steps=2", "progress=false", f"out_dir={run}"]), build_method)
    assert main(["eval", str(run), "--limit-train", "2000", "--limit-test", "500", "--raw-pixels"]) == 0
    out = json.load(open(run / "eval.json"))
    assert out["step"] == 2 and out["train_images"] == 2000 and out["feature"] == "mean"
    for row in ("model", "raw_pixels"):
        assert set(out["results"][row]) == {"knn", "fewshot_knn", "fewshot_knn_std", "linear"}
        assert all(0.0 <= v <= 100.0 for v in out["results"][row].values())
    assert "raw pixels" in capsys.readouterr().out

    assert main(["eval", str(tmp_path / "nope")]) == 1
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((run / "config.json").read_text())
    assert main(["eval", str(tmp_path / "empty")]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["eval", str(run), "--protocols", "knn,svm"]) == 1
