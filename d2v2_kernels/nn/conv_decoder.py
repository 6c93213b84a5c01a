"""data2vec 2.0's conv decoders on channels-last activations, one `dk.conv_decoder_block` per layer.

Parameter names follow the reference (`blocks.{i}.0.weight`, `proj.weight`, text: `proj.0` / `proj.2`),
so its state dicts load as they are. The convs are `nn.Conv1d` / `nn.Conv2d` used only as parameter
holders with PyTorch's default init (the reference re-initialises only Linear layers, also to default);
their weight layout [Cout, Cin/groups, k(, k)] is the op's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.conv_decoder import conv_decoder_block


class _ConvDecoder(nn.Module):
    conv_type: type[nn.Module]

    def __init__(
        self,
        in_dim: int,
        decoder_dim: int = 384,
        layers: int = 4,
        kernel: int = 7,
        groups: int = 16,
        residual: bool = True,
        out_dim: int | None = None,
        projection_layers: int = 1,
        projection_ratio: float = 2.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers: expected >= 1, got {layers}")
        self.groups, self.residual, self.eps = groups, residual, eps
        self.blocks = nn.ModuleList(
            nn.ModuleList([self.conv_type(in_dim if i == 0 else decoder_dim, decoder_dim, kernel, groups=groups)])
            for i in range(layers)
        )
        out_dim = in_dim if out_dim is None else out_dim
        if projection_layers == 1:
            self.proj = nn.Linear(decoder_dim, out_dim)
        elif projection_layers == 2:
            hidden = int(decoder_dim * projection_ratio)
            self.proj = nn.Sequential(nn.Linear(decoder_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            raise ValueError(f"projection_layers: expected 1 or 2, got {projection_layers}")

    def run_blocks(self, x: Tensor) -> Tensor:
        # The op takes one dtype for x and its parameters: under autocast run the blocks in the autocast
        # dtype with cast weights (what autocast does for F.conv*), else in the parameters' dtype.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.proj_dtype
        x = x.to(dtype)
        for (conv,) in self.blocks:
            bias = None if conv.bias is None else conv.bias.to(dtype)
            x = conv_decoder_block(x, conv.weight.to(dtype), bias, groups=self.groups, residual=self.residual,
                                   eps=self.eps)
        return self.proj(x)

    @property
    def proj_dtype(self) -> torch.dtype:
        return self.blocks[0][0].weight.dtype


class ConvDecoder1d(_ConvDecoder):
    """Audio and text: x [N, T, in_dim] -> [N, T, out_dim]."""

    conv_type = nn.Conv1d

    def forward(self, x: Tensor) -> Tensor:
        return self.run_blocks(x)


class ConvDecoder2d(_ConvDecoder):
    """Images: tokens x [N, T, in_dim] on an h x w grid (row-major; square by default) -> [N, T, out_dim]."""

    conv_type = nn.Conv2d

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        N, T, C = x.shape
        if grid is None:
            side = math.isqrt(T)
            if side * side != T:
                raise ValueError(f"ConvDecoder2d: T={T} tokens is not a square grid; pass grid=(h, w)")
            grid = (side, side)
        if grid[0] * grid[1] != T:
            raise ValueError(f"ConvDecoder2d: grid {grid} does not hold T={T} tokens")
        return self.run_blocks(x.reshape(N, *grid, C)).reshape(N, T, -1)
