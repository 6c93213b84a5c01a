"""Masks for data2vec 2.0 (data2vec2.md §2): inverse block masking on 2-D patch grids, random masking,
and the reference's `ids_keep` / `ids_restore` convention.

Convention (the reference's): `mask` is [N, T] bool with True = masked (not encoded by the student,
predicted, counted in the loss), False = visible. Rows are sample-major (row b * M + m is clone m of
sample b). Every row has exactly the same number of visible tokens, which the model needs.

Index convention (fairseq `make_maskinfo`, BASE L413-441):

    ids_shuffle = argsort(mask, dim=1)          # visible positions first, then masked ones
    ids_restore = argsort(ids_shuffle, dim=1)   # its inverse permutation
    ids_keep    = ids_shuffle[:, :len_keep]      # the student's tokens, gathered in this order

The reference's argsort is unstable (visible tokens come in an arbitrary order on CPU, another one on
CUDA); ours is stable, so `ids_keep` lists the visible positions in increasing order. The model is
permutation-equivariant in that order (positions are added before the gather), so only float summation
order can differ; golden parity injects the reference's own `ids_keep` / `ids_restore` anyway.

Random streams -- where we differ from the reference. The masks are the same *distribution* as the
reference's, not the same numbers for a seed:
* inverse block masking: the reference (`compute_block_mask_2d`, run in dataloader workers on the global
  torch RNG) draws one `torch.randint` of centres per image (its M masks), then, per row in a Python
  loop, one `torch.multinomial` of the cells to reveal or hide until the count is exact; how much RNG it
  consumes depends on the data. Here one `randint` draws the centres of all N = B * M rows and one
  `rand` of [N, T] uniforms breaks the ties of the count correction (`topk` of `selected + u`): keeping
  the `target` best cells keeps a uniform random subset of the selected cells when there are too many,
  and adds a uniform random subset of the others when there are too few -- exactly the law of the
  reference's multinomial corrections, without a per-row loop or a host sync.
* random masking: the reference's text path draws `torch.rand(N, T)` from a generator seeded by
  hash((seed, num_updates, ids.sum())) and keeps `argsort(noise)[:, :len_keep]`; `random_mask` keeps the
  same rule for a given `noise`, but draws the noise from the generator it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MaskInfo",
    "block_cells",
    "block_mask_2d_counts",
    "exact_count",
    "inverse_block_mask_2d",
    "make_mask_info",
    "mask_to_ids",
    "random_mask",
]


@dataclass
class MaskInfo:
    """A batch of masks with the reference's index tensors (see the module docstring)."""

    mask: Tensor  # [N, T] bool, True = masked
    ids_keep: Tensor  # [N, K] int64, the visible positions in the student's order
    ids_restore: Tensor  # [N, T] int64, position t -> its index in cat([visible, masked])

    @property
    def len_keep(self) -> int:
        return self.ids_keep.shape[1]


def _grid(grid) -> tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


def block_mask_2d_counts(num_tokens: int, mask_prob: float, mask_length: int, mask_prob_adjust: float = 0.0,
                         inverse: bool = True) -> tuple[int, int]:
    """(number of block centres drawn, exact number of selected cells) as the reference computes them:
    p = 1 - mask_prob when inverse (the selected cells are the visible ones) else mask_prob;
    centres = int(L * ((p + adjust) / mask_length**2)), selected = int(L * p). The float expressions
    are the reference's own, so e.g. ViT-B (L=196, 0.8, 3, 0.07) gives 5 centres and 39 visible."""
    p = 1 - mask_prob if inverse else mask_prob
    centres = int(num_tokens * ((p + mask_prob_adjust) / mask_length**2))
    return centres, int(num_tokens * p)


def inverse_block_mask_2d(
    num_masks: int,
    grid: int | tuple[int, int],
    mask_prob: float = 0.8,
    mask_length: int = 3,
    mask_prob_adjust: float = 0.07,
    *,
    inverse: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """data2vec 2.0's image masks: [num_masks, h * w] bool (True = masked), one independent mask per row.

    With `inverse` (the released configs): draw `int(L * ((1 - R + A) / B**2))` random centres with
    replacement, make the B x B square around each centre (offset B // 2, clamped at the border)
    *visible*, then reveal or hide uniformly random single cells until exactly `int(L * (1 - R))` are
    visible. Without `inverse` the squares are the masked cells and exactly `int(L * R)` are masked.
    `mask_length <= 1` falls back to `random_mask` (as the reference does). Vectorised over all rows:
    one randint, one max-pool, one rand and one topk, whatever num_masks is; no host sync.
    """
    h, w = _grid(grid)
    L = h * w
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob: expected a float in [0, 1], got {mask_prob}")
    if num_masks < 1 or L < 1:
        raise ValueError(f"expected num_masks >= 1 and a non-empty grid, got {num_masks} and {(h, w)}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if mask_length <= 1:
        return random_mask(num_masks, L, mask_prob, generator=generator, device=device)
    n_centres, target = block_mask_2d_counts(L, mask_prob, mask_length, mask_prob_adjust, inverse)
    target = min(target, L)

    idx = torch.randint(0, L, (num_masks, n_centres), generator=generator, device=device)
    selected = block_cells(idx, (h, w), mask_length)
    uniforms = torch.rand(num_masks, L, generator=generator, device=device)
    chosen = exact_count(selected, target, uniforms)
    return ~chosen if inverse else chosen


def block_cells(centres: Tensor, grid: int | tuple[int, int], mask_length: int) -> Tensor:
    """The cells covered by the reference's squares: [N, h * w] bool from centres [N, n] (flat cell
    ids, repeats allowed). A centre (r, c) covers rows r - off .. r + B - 1 - off and the same columns,
    off = B // 2, clamped to the grid (the reference clamps each of the B x B indices, which covers
    the same cells). Computed as a stride-1 max-pool of the centre grid padded with B - 1 - off zeros
    before and off after: cell i is covered iff a centre lies in i - (B - 1 - off) .. i + off."""
    h, w = _grid(grid)
    N = centres.shape[0]
    grid_t = torch.zeros(N, h * w, device=centres.device)
    if centres.numel():
        grid_t.scatter_(1, centres.long(), 1.0)
    off = mask_length // 2
    before, after = mask_length - 1 - off, off
    padded = F.pad(grid_t.view(N, 1, h, w), (before, after, before, after))
    return F.max_pool2d(padded, kernel_size=mask_length, stride=1).view(N, h * w) > 0


def exact_count(selected: Tensor, target: int, uniforms: Tensor) -> Tensor:
    """[N, L] bool with exactly `target` True per row: the `target` largest of selected + uniforms.
    With U(0, 1) uniforms this is the reference's correction in law: too many selected cells -> a
    uniform random subset of them is kept; too few -> all kept plus a uniform random subset of the rest."""
    score = selected.to(uniforms.dtype) + uniforms
    keep = score.topk(target, dim=1, sorted=False).indices
    out = torch.zeros(selected.shape, dtype=torch.bool, device=selected.device)
    return out.scatter_(1, keep, True)


def random_mask(
    num_masks: int,
    num_tokens: int,
    mask_prob: float,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Plain random masking (the reference's `random_masking`): [num_masks, T] bool, True = masked,
    exactly `len_keep = int(T * (1 - mask_prob))` visible per row: those of the `len_keep` smallest
    `noise` values (noise: [num_masks, T], drawn U(0, 1) from `generator` when not given)."""
    len_keep = int(num_tokens * (1 - mask_prob))
    if noise is None:
        if device is None:
            device = generator.device if generator is not None else "cpu"
        noise = torch.rand(num_masks, num_tokens, generator=generator, device=device)
    elif tuple(noise.shape) != (num_masks, num_tokens):
        raise ValueError(f"noise: expected shape {(num_masks, num_tokens)}, got {tuple(noise.shape)}")
    keep = noise.argsort(dim=1)[:, :len_keep]
    mask = torch.ones(noise.shape, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, keep, False)
    return mask


def mask_to_ids(mask: Tensor, len_keep: int | None = None) -> tuple[Tensor, Tensor]:
    """(ids_keep [N, K], ids_restore [N, T]) of a mask in the reference's convention, with a stable
    sort (visible positions in increasing order). `len_keep`: the visible count per row when known
    (no host sync); otherwise it is read from the mask, whose rows must all have the same count."""
    if mask.dim() != 2:
        raise ValueError(f"mask: expected [N, T], got shape {tuple(mask.shape)}")
    N, T = mask.shape
    m = mask.to(torch.uint8) if mask.dtype == torch.bool else (mask != 0).to(torch.uint8)
    if len_keep is None:
        visible = T - m.sum(1, dtype=torch.int64)
        if not bool((visible == visible[0]).all()):
            raise ValueError(
                f"mask: every row must have the same number of visible tokens, got counts "
                f"{sorted(set(visible.tolist()))}"
            )
        len_keep = int(visible[0])
    ids_shuffle = torch.argsort(m, dim=1, stable=True)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(
        1, ids_shuffle, torch.arange(T, device=mask.device).expand(N, T)
    )
    return ids_shuffle[:, :len_keep], ids_restore


def make_mask_info(mask: Tensor, len_keep: int | None = None) -> MaskInfo:
    """A MaskInfo (bool mask + reference-convention ids) for a 0/1 mask of any dtype."""
    ids_keep, ids_restore = mask_to_ids(mask, len_keep)
    return MaskInfo(mask.bool() if mask.dtype != torch.bool else mask, ids_keep, ids_restore)
