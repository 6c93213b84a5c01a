"""Image data for the trainer: Fashion-MNIST from its idx files, ImageNet-style folders, and batched
augmentation on tensors.

Fashion-MNIST is small enough to live in memory as one uint8 tensor, so batches are index lookups and the
loader's position (epoch, batch) is all that resume needs. The Debian package `dataset-fashion-mnist`
installs the files under /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist (or pass --data-dir with the idx files)"
_IDX_DTYPES = {0x08: torch.uint8}


def read_idx(path: str) -> Tensor:
    """An idx file (optionally gzipped) as a uint8 tensor; refuses anything that is not a whole idx file."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read as an idx file: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path}: idx header says shape {shape} ({math.prod(shape)} bytes), file holds "
                         f"{len(data) - header} bytes of data")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*shape)


def find_fashion_mnist(data_dir: str | None = None) -> str:
    candidates = [data_dir] if data_dir else list(FASHION_MNIST_DIRS)
    for d in candidates:
        if any(os.path.exists(os.path.join(d, "train-images-idx3-ubyte" + ext)) for ext in (".gz", "")):
            return d
    raise FileNotFoundError(f"Fashion-MNIST not found in {candidates}: {FASHION_MNIST_INSTALL}")


def load_fashion_mnist(split: str = "train", data_dir: str | None = None) -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of the 'train' (60k) or 'test' (10k) split."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = find_fashion_mnist(data_dir)
    prefix = "train" if split == "train" else "t10k"

    def path(kind):
        p = os.path.join(root, f"{prefix}-{kind}-ubyte")
        return p + ".gz" if os.path.exists(p + ".gz") else p

    images, labels = read_idx(path("images-idx3")), read_idx(path("labels-idx1"))
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
    return images.unsqueeze(1), labels.long()


def load_image_folder(root: str, size: int) -> tuple[Tensor, Tensor, list[str]]:
    """An ImageNet-style folder (root/<class>/<image>) decoded once into uint8 [N, 3, size, size] (a
    center crop after resizing the short side). Needs Pillow. For datasets that do not fit in memory,
    stream them with your own DataLoader and call the trainer's step directly."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("ImageFolder data needs Pillow: pip install pillow") from None
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(root, cls))):
            with Image.open(os.path.join(root, cls, name)) as im:
                im = im.convert("RGB")
                s = size / min(im.size)
                im = im.resize((max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))))
                left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
                im = im.crop((left, top, left + size, top + size))
                images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3))
            labels.append(label)
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), classes


@dataclass
class Augment:
    """Random resized crop + horizontal flip for a whole batch in one `grid_sample` (no per-image loop)."""

    size: int
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __call__(self, x: Tensor, generator: torch.Generator | None = None, rows: slice | None = None,
                 total: int | None = None) -> Tensor:
        """Augment x. With `rows` and `total`, x holds rows `rows` of a batch of `total` images and gets
        exactly the crops those rows get when the whole batch is augmented at once (for data parallelism)."""
        B, dev = x.shape[0], x.device
        total = B if total is None else total

        def uniform(lo, hi):
            u = torch.rand(total, generator=generator)
            return (u if rows is None else u[rows]).to(dev) * (hi - lo) + lo

        if self.scale[0] >= 1.0:  # scale (1, 1): no crop at all (flips only), not a ratio-jittered full view
            w = h = torch.ones(B, device=dev)
            cx = cy = torch.zeros(B, device=dev)
        else:
            area = uniform(*self.scale)
            r = uniform(math.log(self.ratio[0]), math.log(self.ratio[1])).exp()
            w = (area * r).sqrt().clamp(max=1.0)  # crop width / height as fractions of the image
            h = (area / r).sqrt().clamp(max=1.0)
            cx = uniform(-1, 1) * (1 - w)  # crop centre in [-1, 1] coordinates, crop inside the image
            cy = uniform(-1, 1) * (1 - h)
        sx = w * torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if self.flip else w
        theta = torch.zeros(B, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
        grid = F.affine_grid(theta, (B, x.shape[1], self.size, self.size), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_float(images: Tensor, mean: float | tuple = 0.5, std: float | tuple = 0.5) -> Tensor:
    """uint8 [B, C, H, W] -> normalised float32."""
    x = images.float().div_(255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class InMemoryLoader:
    """Shuffled batches of an in-memory dataset, sharded over ranks, resumable at any batch.

    Epoch e's order is a permutation drawn from (seed, e) alone, so a resumed run at (epoch, batch) sees
    exactly the batches the uninterrupted run saw. Rank r of W takes every W-th sample of each global
    batch, so W processes at batch b/W see the same global batch as one process at batch b. Incomplete
    last batches are dropped (fixed shapes; every step has the same cost).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world_size}")
        if n < batch_size:
            raise ValueError(f"dataset of {n} samples is smaller than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.batches_per_epoch = n // batch_size
        self.epoch, self.batch = 0, 0
        self._order = None

    def _epoch_order(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next_indices(self) -> Tensor:
        if self._order is None:
            self._order = self._epoch_order()
        start = self.batch * self.batch_size
        idx = self._order[start : start + self.batch_size][self.rank :: self.world_size]
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"loader state {state} out of range ({self.batches_per_epoch} batches per epoch)")
        self.epoch, self.batch, self._order = epoch, batch, None
