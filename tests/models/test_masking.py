"""Masks: exact counts, the reference's block geometry and correction law, the ids convention."""

import time

import pytest
import torch

from d2v2_kernels.models import masking
from d2v2_kernels.models.masking import (
    block_cells,
    block_mask_2d_counts,
    exact_count,
    inverse_block_mask_2d,
    make_mask_info,
    mask_to_ids,
    random_mask,
)


def reference_block_mask_2d(B, L, mask_prob, mask_length, mask_prob_adjust, inverse_mask=True, generator=None):
    """A port of fairseq's compute_block_mask_2d (data_utils.py, require_same_masks, no dropout /
    expand_adjacent / non_overlapping): the per-row Python loop we replace."""
    d = int(L**0.5)
    if inverse_mask:
        mask_prob = 1 - mask_prob
    mask = torch.zeros((B, d, d))
    mask_inds = torch.randint(0, L, size=(B, int(L * ((mask_prob + mask_prob_adjust) / mask_length**2))),
                              generator=generator)
    mask.view(B, -1).scatter_(1, mask_inds, 1)
    centers = mask.nonzero(as_tuple=True)
    inds = ([], [], [])
    offset = mask_length // 2
    for i in range(mask_length):
        for j in range(mask_length):
            inds[0].append(centers[0])
            inds[1].append(centers[1] + i - offset)
            inds[2].append(centers[2] + j - offset)
    i0 = torch.cat(inds[0])
    i1 = torch.cat(inds[1]).clamp_(min=0, max=d - 1)
    i2 = torch.cat(inds[2]).clamp_(min=0, max=d - 1)
    mask[(i0, i1, i2)] = 1
    mask = mask.reshape(B, -1)
    n_masks = mask.sum(dim=-1)
    final_target_len = int(L * mask_prob)
    for i in range(len(mask)):
        n, m = n_masks[i], mask[i]
        if n > final_target_len:
            m[torch.multinomial(m, int(n - final_target_len), replacement=False, generator=generator)] = 0
        elif n < final_target_len:
            m[torch.multinomial(1 - m, int(final_target_len - n), replacement=False, generator=generator)] = 1
    if inverse_mask:
        mask = 1 - mask
    return mask


@pytest.mark.parametrize(
    "grid, R, B, A, visible",
    [
        (14, 0.8, 3, 0.07, 39),  # ViT-B: 196 patches, 5 centres
        (14, 0.75, 3, 0.1, 49),  # ViT-L
        (8, 0.8, 3, 0.07, 12),  # the golden tiny grid: 1 centre
        (7, 0.8, 3, 0.07, 9),  # Fashion-MNIST 28 px, patch 4
        (14, 0.6, 2, 0.0, 78),  # even block size
    ],
)
def test_inverse_block_mask_exact_counts(grid, R, B, A, visible):
    g = torch.Generator().manual_seed(1)
    mask = inverse_block_mask_2d(512, grid, R, B, A, generator=g)
    assert mask.dtype == torch.bool and mask.shape == (512, grid * grid)
    assert ((~mask).sum(1) == visible).all()
    assert block_mask_2d_counts(grid * grid, R, B, A)[1] == visible


def test_block_mask_not_inverse_exact_masked_count():
    g = torch.Generator().manual_seed(2)
    mask = inverse_block_mask_2d(256, (6, 10), 0.5, 3, 0.1, inverse=False, generator=g)
    assert (mask.sum(1) == 30).all()


@pytest.mark.parametrize("mask_length", [2, 3, 5])
@pytest.mark.parametrize("grid", [(8, 8), (5, 9)])
def test_block_cells_match_reference_clamped_squares(mask_length, grid):
    h, w = grid
    g = torch.Generator().manual_seed(3)
    centres = torch.randint(0, h * w, (64, 4), generator=g)
    ours = block_cells(centres, grid, mask_length)
    expected = torch.zeros(64, h, w, dtype=torch.bool)
    off = mask_length // 2
    for n in range(64):
        for c in centres[n].tolist():
            r0, c0 = divmod(c, w)
            for i in range(mask_length):
                for j in range(mask_length):
                    expected[n, min(max(r0 + i - off, 0), h - 1), min(max(c0 + j - off, 0), w - 1)] = True
    assert torch.equal(ours, expected.view(64, -1))


def test_exact_count_keeps_or_extends_the_selection():
    g = torch.Generator().manual_seed(4)
    selected = torch.rand(300, 50, generator=g) < torch.rand(300, 1, generator=g)
    u = torch.rand(300, 50, generator=g)
    out = exact_count(selected, 20, u)
    assert (out.sum(1) == 20).all()
    many = selected.sum(1) >= 20
    assert (out[many] <= selected[many]).all()  # a subset of the selection
    assert (selected[~many] <= out[~many]).all()  # the selection plus more


def test_exact_count_is_uniform():
    # 3 selected cells, keep 2: each selected cell kept with probability 2/3; 2 of 4 others added: 1/2
    g = torch.Generator().manual_seed(5)
    n = 6000
    sel = torch.tensor([True, True, True, False, False, False, False]).expand(n, -1)
    keep2 = exact_count(sel, 2, torch.rand(n, 7, generator=g)).float().mean(0)
    assert torch.allclose(keep2[:3], torch.full((3,), 2 / 3), atol=0.03) and keep2[3:].sum() == 0
    keep5 = exact_count(sel, 5, torch.rand(n, 7, generator=g)).float().mean(0)
    assert keep5[:3].min() == 1 and torch.allclose(keep5[3:], torch.full((4,), 0.5), atol=0.03)


def test_same_law_as_the_reference():
    """Per-cell visibility frequencies of ours and of the reference port agree (border effects of the
    clamped squares included)."""
    n, L = 6000, 64
    ours = inverse_block_mask_2d(n, 8, 0.8, 3, 0.07, generator=torch.Generator().manual_seed(6))
    ref = reference_block_mask_2d(n, L, 0.8, 3, 0.07, generator=torch.Generator().manual_seed(7))
    f_ours, f_ref = (~ours).float().mean(0), (1 - ref).mean(0)
    assert (ref.sum(1) == 52).all()
    assert (f_ours - f_ref).abs().max() < 0.035, (f_ours - f_ref).abs().max()
    # the squares make neighbours co-visible: the same pair statistics too
    pairs_ours = ((~ours[:, :-1]) & (~ours[:, 1:])).float().mean()
    pairs_ref = ((ref[:, :-1] == 0) & (ref[:, 1:] == 0)).float().mean()
    assert abs(float(pairs_ours - pairs_ref)) < 0.01


def test_vectorised_and_reproducible():
    t0 = time.perf_counter()
    a = inverse_block_mask_2d(256 * 16, 14, generator=torch.Generator().manual_seed(8))  # a ViT-B batch
    assert time.perf_counter() - t0 < 2.0  # no per-row Python loop (the reference's takes seconds)
    b = inverse_block_mask_2d(256 * 16, 14, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a[:16], a[16:32])  # independent rows


def test_mask_length_one_falls_back_to_random():
    mask = inverse_block_mask_2d(64, 8, 0.8, 1, 0.07, generator=torch.Generator().manual_seed(9))
    assert ((~mask).sum(1) == int(64 * (1 - 0.8))).all()


def test_random_mask_reference_rule():
    noise = torch.rand(8, 32, generator=torch.Generator().manual_seed(10))
    mask = random_mask(8, 32, 0.48, noise=noise)
    len_keep = int(32 * (1 - 0.48))
    assert ((~mask).sum(1) == len_keep).all()
    visible = noise.argsort(1)[:, :len_keep]
    assert (~mask).gather(1, visible).all()


def test_ids_convention():
    mask = inverse_block_mask_2d(16, 8, generator=torch.Generator().manual_seed(11))
    ids_keep, ids_restore = mask_to_ids(mask)
    N, T = mask.shape
    ids_shuffle = mask.to(torch.uint8).argsort(dim=1, stable=True)
    assert torch.equal(ids_restore, ids_shuffle.argsort(1))
    assert torch.equal(ids_keep, ids_shuffle[:, :12])
    assert (~mask).gather(1, ids_keep).all()
    assert (ids_keep.diff(dim=1) > 0).all()  # stable: visible positions in increasing order
    # gather(cat([visible, masked]), ids_restore) puts every row back in place
    x = torch.arange(T).expand(N, T)
    kept = x.gather(1, ids_keep)
    masked = x.gather(1, ids_shuffle[:, 12:])
    assert torch.equal(torch.cat([kept, masked], 1).gather(1, ids_restore), x)
    info = make_mask_info(mask.float(), 12)
    assert info.len_keep == 12 and info.mask.dtype == torch.bool and torch.equal(info.ids_keep, ids_keep)


def test_ids_require_equal_counts():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :4] = True
    with pytest.raises(ValueError, match="same number of visible"):
        mask_to_ids(mask)


def test_module_documents_rng_difference():
    assert "not the same numbers" in masking.__doc__
