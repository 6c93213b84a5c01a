"""Evaluation of pretrained encoders on frozen features (and, for users with time, by fine-tuning).

The protocol (shared/spec/calibration.md): mean-pooled features of all 60k Fashion-MNIST training images
and the 10k test images;
  * k-NN: cosine similarity, k = 20 neighbours, votes weighted exp(sim / T) with T = 0.07 and summed per
    class (the weighted k-NN of InstDisc / DINO);
  * few-shot k-NN: `shots` labelled training images per class (seeded), k = min(20, shots * classes),
    mean and standard deviation over seeds;
  * linear probe: features standardised with training statistics, multinomial logistic regression trained
    full-batch with L-BFGS, its L2 weight decay chosen on a held-out 10% of the training set, then
    retrained on the whole training set;
  * raw pixels, centred by the training set's per-pixel mean (`evaluate(None, ...)`), are the floor
    every method must beat (k-NN 86.05 on the full sets, as in calibration.md; uncentred 85.07, since
    cosine similarity is not shift-invariant).

Every accuracy is in percent. Everything is deterministic given the seeds (and the machine's BLAS).
A method is anything with `encode(images) -> {"mean": [B, D], "cls": [B, D]}` (see train/loop.py), or a
callable returning such a dict or a [B, D] tensor; images are normalised as in training (`to_float`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.images import Augment, to_float

PROTOCOLS = ("knn", "fewshot_knn", "fewshot_linear", "linear")
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
FEWSHOT_WEIGHT_DECAY = 0.1  # few-shot linear: too few labels for a sweep; one value (chosen on 10-shot sets from
# train rows 0-49999 scored on rows 50000-59999: 1e-3..1 within 1 point, 0.1 best, for pixels and 192-d features)


# --- features ------------------------------------------------------------------------------------------


def _as_images(images: Tensor) -> Tensor:
    if images.dim() == 3:  # [N, H, W] grey images
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"images: expected [N, C, H, W] (or [N, H, W]), got shape {tuple(images.shape)}")
    return images


def _encoder_call(encode_fn) -> tuple[Callable[[Tensor], object], nn.Module | None]:
    """(the function to call on a batch, the module whose train/eval mode it runs under)."""
    if isinstance(encode_fn, nn.Module) and hasattr(encode_fn, "encode"):
        return encode_fn.encode, encode_fn
    module = encode_fn if isinstance(encode_fn, nn.Module) else getattr(encode_fn, "__self__", None)
    return encode_fn, module if isinstance(module, nn.Module) else None


def _as_feature_dict(out) -> dict[str, Tensor]:
    if isinstance(out, Tensor):
        return {"mean": out}
    if isinstance(out, dict) and out and all(isinstance(v, Tensor) for v in out.values()):
        return out
    raise TypeError(f"encode returned {type(out).__name__}: expected a dict of [B, D] tensors or a tensor")


@torch.no_grad()
def extract_features(encode_fn, images_uint8: Tensor, batch_size: int = 512,
                     device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Frozen features of uint8 images [N, C, H, W]: {kind: float32 [N, D]} on the CPU.

    encode_fn: a method (its `encode` is called) or a callable; run in eval mode (the module's mode is
    restored afterwards) without gradients, on `device` (the module must already be there), in chunks
    of `batch_size` images normalised with the training's `to_float`.
    """
    images = _as_images(images_uint8)
    fn, module = _encoder_call(encode_fn)
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    chunks: dict[str, list[Tensor]] = {}
    try:
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start : start + batch_size].to(device))
            for kind, value in _as_feature_dict(fn(x)).items():
                if value.dim() != 2 or value.shape[0] != x.shape[0]:
                    raise ValueError(f"encode()[{kind!r}]: expected [{x.shape[0]}, D], got {tuple(value.shape)}")
                chunks.setdefault(kind, []).append(value.float().cpu())
    finally:
        if module is not None:
            module.train(was_training)
    return {kind: torch.cat(parts) for kind, parts in chunks.items()}


def raw_pixel_features(images_uint8: Tensor, center: Tensor | None = None) -> dict[str, Tensor]:
    """The floor: flattened pixels normalised as in training, {"pixels": float32 [N, C*H*W]}, minus
    `center` (e.g. the training set's per-pixel mean, as `evaluate(None, ...)` does) when given."""
    x = to_float(_as_images(images_uint8)).flatten(1)
    return {"pixels": x if center is None else x - center}


# --- k-NN --------------------------------------------------------------------------------------------


def _num_classes(num_classes: int | None, *labels: Tensor) -> int:
    return int(num_classes) if num_classes is not None else int(max(int(y.max()) for y in labels if y.numel())) + 1


@torch.no_grad()
def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, chunk_elems: int = 1 << 24) -> Tensor:
    """Weighted k-NN predictions [N_test]: cosine similarity of L2-normalised features, the k most similar
    training rows vote with weight exp(sim / T), summed per class; the class with the most weight wins
    (the lowest class index on a tie). Chunked over test rows so that a similarity block holds at most
    `chunk_elems` values."""
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"train_x has {train_x.shape[0]} rows, train_y {train_y.shape[0]}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature widths differ: train {train_x.shape[1]}, test {test_x.shape[1]}")
    C = _num_classes(num_classes, train_y)
    k = min(k, train_x.shape[0])
    train_n = F.normalize(train_x.float(), dim=1)
    train_y = train_y.long().to(train_n.device)
    rows = max(1, chunk_elems // max(train_n.shape[0], 1))
    preds = []
    for start in range(0, test_x.shape[0], rows):
        q = F.normalize(test_x[start : start + rows].float().to(train_n.device), dim=1)
        sim, idx = (q @ train_n.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], C, device=q.device)
        votes.scatter_add_(1, train_y[idx], sim.div_(temperature).exp_())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None) -> float:
    """Weighted k-NN accuracy in percent (see knn_predict)."""
    num_classes = _num_classes(num_classes, train_y, test_y)
    pred = knn_predict(train_x, train_y, test_x, k, temperature, num_classes)
    return 100.0 * (pred.cpu() == test_y.cpu().long()).float().mean().item()


# --- linear probe ------------------------------------------------------------------------------------


def _standardise(train_x: Tensor, *others: Tensor) -> list[Tensor]:
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    return [(x - mean) / std for x in (train_x, *others)]


def _fit_logreg(x: Tensor, y: Tensor, num_classes: int, weight_decays: Sequence[float], max_iter: int,
                init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, mean cross-entropy + wd / 2 * ||W||^2 (bias not decayed), for
    every wd in `weight_decays` at once: the K problems are independent, so their sum is minimised with
    one full-batch L-BFGS (strong-Wolfe line search) over a [D, K * C] weight, and every pass over x
    serves all K. Starts from zero weights or `init`; deterministic. Returns W [K, D, C], b [K, C]."""
    N, D = x.shape
    K, C = len(weight_decays), num_classes
    if init is None:
        W = torch.zeros(D, K * C)
        b = torch.zeros(K * C)
    else:
        W = init[0].permute(1, 0, 2).reshape(D, K * C).clone()
        b = init[1].reshape(K * C).clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    wd = torch.tensor([float(w) for w in weight_decays]).repeat_interleave(C)
    yy = y.repeat_interleave(K)  # the label of row n for each of the K problems
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.addmm(b, x, W).view(N * K, C)
        loss = F.cross_entropy(logits, yy, reduction="sum") / N + 0.5 * (W.pow(2) * wd).sum()
        loss.backward()
        return loss

    # Small problems run single-threaded: L-BFGS is many tiny ops, and on a shared CPU every one of them
    # waits for the slowest OpenMP thread (10-40x slower under load); large ones use every thread.
    threads = torch.get_num_threads()
    if N * D * K * C < 100_000_000:
        torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return W.detach().view(D, K, C).permute(1, 0, 2).contiguous(), b.detach().view(K, C)


def _accuracy(W: Tensor, b: Tensor, x: Tensor, y: Tensor) -> float:
    return 100.0 * (torch.addmm(b, x, W).argmax(1) == y).float().mean().item()


def _stratified_split(y: Tensor, frac: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit indices, held-out indices): a seeded `frac` of every class held out (at least one row of every
    class with two or more rows)."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n = min(max(1, round(frac * idx.numel())), idx.numel() - 1) if idx.numel() > 1 else 0
        held.append(idx[:n])
        fit.append(idx[n:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, epochs: int = 100,
                 weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, val_frac: float = 0.1, seed: int = 0,
                 num_classes: int | None = None, details: dict | None = None) -> float:
    """Linear-probe test accuracy in percent.

    Features are standardised with the training set's mean and std; a linear softmax classifier (mean
    cross-entropy + wd / 2 * ||W||^2) is trained full-batch with L-BFGS for at most `epochs` iterations
    (about one pass over the features each). With several `weight_decays`, all are fitted together on a
    seeded, stratified (1 - val_frac) of the training rows and scored on the held-out rest; the best (the
    largest on a tie) is then retrained on all training rows, starting from its held-out-split solution.
    `details`, when given, receives the held-out accuracies and the chosen weight decay.
    """
    C = _num_classes(num_classes, train_y, test_y)
    train_y, test_y = train_y.cpu().long(), test_y.cpu().long()
    tr, te = _standardise(train_x.cpu().float(), test_x.cpu().float())
    wds = sorted(set(float(w) for w in weight_decays), reverse=True)
    if not wds:
        raise ValueError("weight_decays: give at least one value")
    val_acc, init, best = {}, None, wds[0]
    if len(wds) > 1:
        fit, held = _stratified_split(train_y, val_frac, seed)
        if held.numel() == 0:
            raise ValueError("linear_probe: too few training rows for a held-out split; give one weight decay")
        W, b = _fit_logreg(tr[fit], train_y[fit], C, wds, epochs)
        val_acc = {wd: _accuracy(W[i], b[i], tr[held], train_y[held]) for i, wd in enumerate(wds)}
        i = max(range(len(wds)), key=lambda j: val_acc[wds[j]])  # max keeps the first (largest wd) on ties
        best, init = wds[i], (W[i : i + 1], b[i : i + 1])
    W, b = _fit_logreg(tr, train_y, C, [best], epochs, init=init)
    if details is not None:
        details.update({"weight_decay": best, "val_accuracy": val_acc})
    return _accuracy(W[0], b[0], te, test_y)


# --- few-shot ----------------------------------------------------------------------------------------


def few_shot_indices(train_y: Tensor, shots: int, seed: int) -> Tensor:
    """Exactly `shots` training indices of every class present in train_y, drawn with the seed (sorted)."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(train_y):
        idx = (train_y == c).nonzero().flatten()
        if idx.numel() < shots:
            raise ValueError(f"class {int(c)} has {idx.numel()} training examples, fewer than shots={shots}")
        picked.append(idx[torch.randperm(idx.numel(), generator=g)[:shots]])
    return torch.cat(picked).sort().values


def few_shot(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, shots: int = 10,
             seeds: Sequence[int] = (0, 1, 2), protocol: str = "knn", k: int = 20, temperature: float = 0.07,
             weight_decay: float = FEWSHOT_WEIGHT_DECAY, num_classes: int | None = None) -> tuple[float, float]:
    """(mean, std) in percent over `seeds` of the accuracy with `shots` labelled examples per class.

    protocol "knn": weighted k-NN with k = min(k, shots * classes); "linear": the linear probe with one
    fixed weight decay (standardised with the few-shot rows' statistics). std is the population standard
    deviation over seeds (0 for one seed).
    """
    if protocol not in ("knn", "linear"):
        raise ValueError(f"protocol: expected 'knn' or 'linear', got {protocol!r}")
    C = _num_classes(num_classes, train_y, test_y)
    train_y = train_y.cpu().long()
    accs = []
    for seed in seeds:
        idx = few_shot_indices(train_y, shots, seed)
        x, y = train_x[idx], train_y[idx]
        if protocol == "knn":
            kk = min(k, shots * int(torch.unique(train_y).numel()))
            accs.append(knn_accuracy(x, y, test_x, test_y, k=kk, temperature=temperature, num_classes=C))
        else:
            accs.append(linear_probe(x, y, test_x, test_y, weight_decays=(weight_decay,), num_classes=C))
    t = torch.tensor(accs, dtype=torch.float64)
    return t.mean().item(), t.std(unbiased=False).item()


# --- the whole evaluation ------------------------------------------------------------------------------


def evaluate(encode_fn, train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor,
             protocols: Sequence[str] = ("knn", "fewshot_knn", "linear"), feature: str = "mean",
             batch_size: int = 512, device: str | torch.device = "cpu", shots: int = 10,
             seeds: Sequence[int] = (0, 1, 2), timings: dict | None = None) -> dict[str, float]:
    """Accuracies in percent of `encode_fn`'s `feature` features (encode_fn None: raw pixels, centred by
    the training set's per-pixel mean, which reproduces calibration.md's floors).

    protocols: any of knn, fewshot_knn, fewshot_linear, linear. Returns {protocol: accuracy}, plus
    {fewshot_*_std: std over seeds} for the few-shot ones. `timings`, when given, receives the seconds
    spent extracting features ("features") and in each protocol.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; choose from {', '.join(PROTOCOLS)}")
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    if encode_fn is None:  # pixels centred by the training set's per-pixel mean (the calibration's floor)
        train_x = raw_pixel_features(train_images)["pixels"]
        center = train_x.mean(0)
        train_x, test_x = train_x - center, raw_pixel_features(test_images, center)["pixels"]
    else:
        train_f = extract_features(encode_fn, train_images, batch_size, device)
        test_f = extract_features(encode_fn, test_images, batch_size, device)
        if feature not in train_f:
            raise ValueError(f"feature {feature!r}: encode returns {sorted(train_f)}")
        train_x, test_x = train_f[feature], test_f[feature]
    timings["features"] = time.perf_counter() - t0
    train_y, test_y = train_labels.long().cpu(), test_labels.long().cpu()
    C = _num_classes(None, train_y, test_y)
    results: dict[str, float] = {}
    for p in protocols:
        t0 = time.perf_counter()
        if p == "knn":
            results[p] = knn_accuracy(train_x, train_y, test_x, test_y, num_classes=C)
        elif p == "linear":
            results[p] = linear_probe(train_x, train_y, test_x, test_y, num_classes=C)
        else:
            mean, std = few_shot(train_x, train_y, test_x, test_y, shots=shots, seeds=seeds,
                                 protocol=p.removeprefix("fewshot_"), num_classes=C)
            results[p], results[f"{p}_std"] = mean, std
        timings[p] = time.perf_counter() - t0
    return results


# --- fine-tuning -------------------------------------------------------------------------------------


def _features_with_grad(method: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """method.encode with gradients (encode itself is usually wrapped in torch.no_grad)."""
    inner = getattr(method.encode, "__wrapped__", None)
    return _as_feature_dict(inner(method, x) if inner is not None else method.encode(x))


class _FinetuneModel(nn.Module):
    def __init__(self, method: nn.Module, dim: int, num_classes: int, feature: str):
        super().__init__()
        self.method, self.feature = method, feature
        # BatchNorm without affine (as in MAE's probes): pooled features of a post-LN encoder share a large
        # sample-independent component that a per-sample LayerNorm leaves in and that slows the head down.
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.02)
        nn.init.zeros_(self.head[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(_features_with_grad(self.method, x)[self.feature])


def finetune(method: nn.Module, train_images: Tensor, train_labels: Tensor, test_images: Tensor,
             test_labels: Tensor, *, epochs: float = 3.0, batch_size: int = 128, lr: float = 5e-4,
             weight_decay: float = 0.05, head_lr_scale: float = 10.0, warmup_frac: float = 0.1,
             crop_scale: tuple[float, float] = (0.6, 1.0), flip: bool = True, feature: str = "mean",
             device: str | torch.device = "cpu", seed: int = 0, copy_method: bool = True,
             log: Callable[[str], None] | None = None) -> float:
    """Fine-tune the method's encoder with a linear head (after a BatchNorm without affine) on its
    `feature` (mean-pooled) features: AdamW (no decay on biases and 1-D parameters; the new head at
    head_lr_scale x lr), linear warmup then cosine lr, random resized crops and flips; returns the test
    accuracy in percent. The method is deep-copied first unless copy_method=False (then it is left
    fine-tuned). An encoder whose features carry no gradient (frozen) leaves the head alone trained."""
    train_images, test_images = _as_images(train_images), _as_images(test_images)
    train_y = train_labels.long()
    C = _num_classes(None, train_y, test_labels)
    if copy_method:
        method = copy.deepcopy(method)
    method = method.to(device)
    probe = _features_with_grad(method.eval(), to_float(train_images[:2].to(device)))
    if feature not in probe:
        raise ValueError(f"feature {feature!r}: encode returns {sorted(probe)}")
    dim, has_grad = probe[feature].shape[1], probe[feature].requires_grad
    del probe
    torch.manual_seed(seed)
    model = _FinetuneModel(method, dim, C, feature).to(device)
    if not has_grad:
        warnings.warn("finetune: the method's features carry no gradient (a frozen encoder, or an encode() "
                      "that disables gradients other than by a torch.no_grad decorator); training the head only")
    groups = []
    for module, scale in ((model.method, 1.0), (model.head, head_lr_scale)):
        params = [p for p in module.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay, "scale": scale},
                   {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0, "scale": scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    n = train_images.shape[0]
    steps_per_epoch = max(1, n // batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    warmup = int(warmup_frac * total)
    augment = Augment(train_images.shape[-1], crop_scale, flip=flip)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    model.train()
    for step in range(total):
        pos = (step % steps_per_epoch) * batch_size
        if step and pos == 0:
            order = torch.randperm(n, generator=g)
        idx = order[pos : pos + batch_size]
        x = augment(to_float(train_images[idx].to(device)), g)
        if step < warmup:
            scale = (step + 1) / warmup
        else:
            scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale * group["scale"]
        loss = F.cross_entropy(model(x), train_y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step + 1) % max(1, total // 10) == 0:
            log(f"finetune step {step + 1}/{total} loss {loss.item():.4f}")
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, test_images.shape[0], 512):
            x = to_float(test_images[start : start + 512].to(device))
            correct += (model(x).argmax(1).cpu() == test_labels[start : start + 512].long()).sum().item()
    return 100.0 * correct / max(test_images.shape[0], 1)


# --- `d2v2 eval RUN_DIR` ------------------------------------------------------------------------------

CLI_DOC = """Evaluate a training run's latest checkpoint on Fashion-MNIST (frozen features).

    d2v2 eval runs/fmnist-small                              # k-NN, 10-shot k-NN, linear probe
    d2v2 eval runs/fmnist-small --protocols knn --raw-pixels # and the raw-pixel floor beside it
    d2v2 eval runs/fmnist-tiny --limit-train 2000            # a quick look on the first 2000 train images

Reads RUN_DIR/config.json and the checkpoint RUN_DIR/latest points at, prints a table of accuracies (%)
and writes RUN_DIR/eval.json.
"""


class EvalError(RuntimeError):
    """The run directory cannot be evaluated (missing, no checkpoint, unsupported data)."""


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a training run's out_dir (config.json + checkpoints)")
    parser.add_argument("--protocols", default="knn,fewshot_knn,linear",
                        help=f"comma-separated, from {','.join(PROTOCOLS)} (default: knn,fewshot_knn,linear)")
    parser.add_argument("--feature", default="mean", choices=("mean", "cls"), help="which encoder features")
    parser.add_argument("--raw-pixels", action="store_true", help="also evaluate raw pixels (the floor)")
    parser.add_argument("--limit-train", type=int, default=0, metavar="N", help="use the first N train images")
    parser.add_argument("--limit-test", type=int, default=0, metavar="N", help="use the first N test images")
    parser.add_argument("--batch-size", type=int, default=512, help="images per encoder forward")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def _load_run(run_dir: str):
    from .train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    from .train.config import config_from_json
    from .train.methods import build_method

    if not os.path.isdir(run_dir):
        raise EvalError(f"{run_dir}: no such run directory")
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise EvalError(f"{run_dir}: no config.json (not a training run's out_dir?)")
    with open(cfg_path) as f:
        cfg = config_from_json(f.read())
    try:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise EvalError(f"{run_dir}: no checkpoint yet (no 'latest' pointer); train first")
        groups, state = load_checkpoint(ckpt)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    method = build_method(cfg)
    try:
        method.load_checkpoint_tensors(groups)
    except (KeyError, RuntimeError) as e:
        raise EvalError(f"{ckpt}: the checkpoint does not fit the model of {cfg_path}: {e}") from None
    return cfg, method, ckpt, int(state.get("step", -1))


def run(args) -> int:
    from .data.images import load_fashion_mnist

    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    try:
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown or not protocols:
            raise EvalError(f"--protocols: unknown {unknown or 'none given'}; choose from {','.join(PROTOCOLS)}")
        cfg, method, ckpt, step = _load_run(args.run_dir)
        if cfg.data != "fmnist":
            raise EvalError(f"d2v2 eval evaluates Fashion-MNIST runs; this run trained on {cfg.data!r}")
        train_images, train_labels = load_fashion_mnist("train", cfg.data_dir)
        test_images, test_labels = load_fashion_mnist("test", cfg.data_dir)
    except (EvalError, ValueError, FileNotFoundError) as e:
        print(f"d2v2 eval: error: {e}", file=sys.stderr)
        return 1
    if args.limit_train > 0:
        train_images, train_labels = train_images[: args.limit_train], train_labels[: args.limit_train]
    if args.limit_test > 0:
        test_images, test_labels = test_images[: args.limit_test], test_labels[: args.limit_test]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    method = method.to(device)
    rows = {}
    timings = {}
    try:
        rows["model"] = evaluate(method, train_images, train_labels, test_images, test_labels, protocols,
                                 args.feature, args.batch_size, device, timings=timings.setdefault("model", {}))
        if args.raw_pixels:
            rows["raw_pixels"] = evaluate(None, train_images, train_labels, test_images, test_labels, protocols,
                                          timings=timings.setdefault("raw_pixels", {}))
    except ValueError as e:
        print(f"d2v2 eval: error: {e}", file=sys.stderr)
        return 1
    names = {"model": f"{cfg.method} step {step} ({args.feature})", "raw_pixels": "raw pixels"}
    width = max(len(n) for n in names.values())
    print(f"{args.run_dir}: {os.path.basename(ckpt)}, train {len(train_labels)} / test {len(test_labels)} images")
    print(f"{'':<{width}}  " + "  ".join(f"{p:>16}" for p in protocols))
    for key, res in rows.items():
        cells = [f"{res[p]:6.2f} ± {res[p + '_std']:5.2f}" if p + "_std" in res else f"{res[p]:6.2f}"
                 for p in protocols]
        print(f"{names[key]:<{width}}  " + "  ".join(f"{c:>16}" for c in cells))
    out = {"run_dir": os.path.abspath(args.run_dir), "checkpoint": os.path.basename(ckpt), "step": step,
           "method": cfg.method, "feature": args.feature, "protocols": protocols,
           "train_images": len(train_labels), "test_images": len(test_labels), "device": str(device),
           "results": rows, "seconds": timings}
    path = os.path.join(args.run_dir, "eval.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return 0
