"""ViT pieces of data2vec 2.0: patch embedding, fixed 2-D sin-cos positions, attention, the post-LN
"AltBlock" and the prenet (the reference's `context_encoder`).

Parameter names follow the reference (fairseq `examples/data2vec/models/modalities/modules.py` and timm):
`proj` (patch embed), `norm1` / `attn.qkv` / `attn.proj` / `norm2` / `mlp.fc1` / `mlp.fc2` (blocks),
`norm` / `blocks` (prenet), so a name map to fairseq is prefix-only.

The only deviation from the reference's op order is the attention: `F.scaled_dot_product_attention`
instead of `softmax(q * scale @ k^T (+ bias), fp32) @ v`; on the golden data the difference is ~1e-7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AltBlock", "Attention", "Mlp", "PatchEmbed", "Prenet", "sincos_pos_embed_2d"]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int]) -> Tensor:
    """MAE's fixed 2-D sin-cos table (`get_2d_sincos_pos_embed`, no CLS row), [h * w, embed_dim] fp32.

    Rows are the row-major patches of an h x w grid. As in MAE (whose meshgrid puts w first), the first
    half of the channels encodes the column index and the second half the row index, each as
    [sin(pos * omega), cos(pos * omega)] with omega_i = 10000^(-i / (D / 4)); computed in float64 like
    the reference's numpy code, then rounded to fp32.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim: the 2-D sin-cos table needs a multiple of 4, got {embed_dim}")
    h, w = _pair(grid_size)
    quarter = embed_dim // 4
    omega = torch.arange(quarter, dtype=torch.float64) / quarter
    omega = 1.0 / 10000**omega
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # grid[1]: the row index
    cols = torch.arange(w, dtype=torch.float64).repeat(h)  # grid[0]: the column index

    def one_d(pos: Tensor) -> Tensor:
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """timm's PatchEmbed as the reference uses it: Conv2d(k = stride = patch, bias), flattened row-major
    to [B, h * w, D]. Init (the reference's ImageEncoder): Xavier-uniform on the conv weight viewed as
    [D, C * p * p]; the bias keeps PyTorch's default."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"source: expected images of size {self.img_size}, got shape {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


ATTN_IMPLS = ("auto", "sdpa", "math")


class Attention(nn.Module):
    """The reference's AltAttention: one `qkv` Linear (with bias), per-head scaled dot product, `proj`.

    attn_bias: optional additive bias broadcastable to [N, H, L, L] (ALiBi); padding_mask: optional
    [N, L] bool, True = padded key (never attended to). Dropout on the attention weights in training.
    impl: "sdpa" (F.scaled_dot_product_attention), "math" (matmul + fp32 softmax), or "auto": math on CPU
    in bf16/fp16 without masks, SDPA otherwise."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, impl: str = "auto"):
        super().__init__()
        if impl not in ATTN_IMPLS:
            raise ValueError(f"impl: expected one of {ATTN_IMPLS}, got {impl!r}")
        self.impl = impl
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _use_math(self, x: Tensor) -> bool:
        # On CPU in bf16/fp16, SDPA measured ~6x slower than matmul + softmax at our sizes (fp32: on par).
        if self.impl == "auto":
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            return x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
        return self.impl == "math"

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        N, L, C = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if padding_mask is None and attn_bias is None and self._use_math(x):
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1, dtype=torch.float32).to(v.dtype)
            if self.training and self.attn_drop > 0:
                attn = F.dropout(attn, self.attn_drop)
            return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(N, L, C)))
        mask = None
        if attn_bias is not None:
            mask = attn_bias.to(q.dtype)
        if padding_mask is not None:
            pad = padding_mask[:, None, None, :].to(torch.bool)
            if mask is None:
                mask = ~pad
            else:
                mask = mask.masked_fill(pad, float("-inf"))
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(N, L, C)))


class Mlp(nn.Module):
    """timm's Mlp (fc1 -> exact GELU -> dropout -> fc2 -> dropout)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample (timm's DropPath)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class AltBlock(nn.Module):
    """The reference's post-LN transformer block (`layer_norm_first=False`, every released config):

        x = x + attn(x);  r = x = norm1(x);  t = mlp(x);  x = norm2(r + t)

    `forward` returns `(x, t)`: t, the FFN output before the residual and norm2, is what the teacher's
    targets average (`end_of_block_targets=False`). Dropouts as the reference wires them: `drop`
    (encoder_dropout) after attn.proj; `attn_drop` on the attention weights; `mlp_drop`
    (activation_dropout) after the GELU and after fc2 (timm's Mlp takes one p for both);
    `post_mlp_drop` on t before the residual (t itself is taken before it); `drop_path` on both branches.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 drop: float = 0.0, attn_drop: float = 0.0, mlp_drop: float = 0.0, post_mlp_drop: float = 0.0,
                 drop_path: float = 0.0, norm_affine: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_affine)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_affine)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=mlp_drop)  # as the reference: p on both Mlp dropouts
        self.post_mlp_dropout = nn.Dropout(post_mlp_drop)
        self.drop_path_rate = drop_path

    def forward(self, x: Tensor, padding_mask: Tensor | None = None,
                attn_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = x + drop_path(self.attn(x, padding_mask, attn_bias), self.drop_path_rate, self.training)
        r = x = self.norm1(x)
        t = self.mlp(x)
        x = self.norm2(r + drop_path(self.post_mlp_dropout(t), self.drop_path_rate, self.training))
        return x, t


class Prenet(nn.Module):
    """The reference's `context_encoder` (BlockEncoder with layer_norm_first=False): LayerNorm ->
    dropout -> `depth` AltBlocks. The LayerNorm exists even with depth 0 (ViT-L)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 dropout: float = 0.0, drop_path_rates=None, **block_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        rates = list(drop_path_rates) if drop_path_rates is not None else [0.0] * depth
        self.blocks = nn.ModuleList(
            AltBlock(dim, num_heads, mlp_ratio, norm_eps, drop_path=rates[i], **block_kwargs) for i in range(depth)
        )

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        x = self.dropout(self.norm(x))
        for blk in self.blocks:
            x, _ = blk(x, padding_mask, attn_bias)
        return x


def init_bert_params(module: nn.Module) -> None:
    """fairseq's init_bert_params for what these models hold: Linear N(0, 0.02) with zero bias,
    Embedding N(0, 0.02) (padding row zero). LayerNorm and convs are left as they are."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
