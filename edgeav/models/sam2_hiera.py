"""SAM 2's image encoder: the Hiera trunk and the FPN neck.

Module and parameter names equal the ``image_encoder.trunk.*`` / ``image_encoder.neck.*`` keys of the
released ``sam2.1_hiera_*.pt`` files. Every size is fixed at construction from the image size, so the
forward pass has static shapes and no data-dependent branches (it exports to ONNX as traced).

Hiera is a ViT whose token grid halves (and width doubles) at each stage start: that block pools its
queries 2x2 inside each attention window, so the window it writes out is half the one it reads.
Windows that do not tile the grid are zero-padded, attended, and cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FpnNeck", "Hiera", "Sam2ImageEncoder"]


def _ceil_to(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _windows(x: Tensor, window: int) -> Tensor:
    """``[B, H, W, C]`` -> ``[B * n_h * n_w, window, window, C]``, zero-padded to whole windows."""
    _, height, width, channels = x.shape
    padded_h, padded_w = _ceil_to(height, window), _ceil_to(width, window)
    if (padded_h, padded_w) != (height, width):
        x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
    x = x.reshape(-1, padded_h // window, window, padded_w // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)


def _unwindows(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`_windows` for a ``height x width`` grid (the padding is cropped)."""
    padded_h, padded_w = _ceil_to(height, window), _ceil_to(width, window)
    channels = windows.shape[-1]
    x = windows.reshape(-1, padded_h // window, padded_w // window, window, window, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, padded_h, padded_w, channels)
    return x[:, :height, :width, :]


def _pool(x: Tensor, stride: int) -> Tensor:
    """Max-pool an NHWC grid by ``stride`` (identity for 0)."""
    if not stride:
        return x
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).permute(0, 2, 3, 1)


class HieraMLP(nn.Module):
    """Two linears with exact GELU between (``mlp.layers.{0,1}``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers[1](F.gelu(self.layers[0](x)))


class MultiScaleAttention(nn.Module):
    """Self-attention over a token grid whose queries may be max-pooled (``q_stride``) to shrink it."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, H, W, dim]`` -> ``[B, H / q_stride, W / q_stride, dim_out]``."""
        batch, height, width, _ = x.shape
        # [B, H*W, 3, heads, hd]: the projection's columns are ordered (q|k|v, head, channel)
        q, k, v = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).unbind(2)
        if self.q_stride:
            q = _pool(q.reshape(batch, height, width, -1), self.q_stride)
            height, width = q.shape[1:3]
            q = q.reshape(batch, height * width, self.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm block on an NHWC grid; a stage's first block widens the skip path and pools it."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, window: int, q_stride: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window = window  # 0: global attention
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = HieraMLP(dim_out, int(dim_out * mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = _pool(self.proj(x), self.q_stride)
        if self.window:
            x = self.attn(_windows(x, self.window))
            # Pooled queries leave windows of window / q_stride on the pooled grid.
            out_window = self.window // self.q_stride if self.q_stride else self.window
            x = _unwindows(x, out_window, shortcut.shape[1], shortcut.shape[2])
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """7x7 stride-4 convolution to NHWC tokens."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Hiera(nn.Module):
    """Hiera trunk: pixels -> one NCHW feature map per stage, finest first (strides 4, 8, 16, 32)."""

    def __init__(self, *, image_size: int, stage_dims: Sequence[int], stage_heads: Sequence[int],
                 stages: Sequence[int], global_att_blocks: Sequence[int], window_spec: Sequence[int],
                 window_pos_embed_bkg_spatial_size: Sequence[int], q_pool: int = 3, q_stride: int = 2,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.grid = image_size // 4
        self.patch_embed = PatchEmbed(stage_dims[0])
        # Windowed positional embedding: a coarse background resized to the grid plus one tiled window.
        self.pos_embed = nn.Parameter(torch.zeros(1, stage_dims[0], *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, stage_dims[0], window_spec[0], window_spec[0]))
        starts = [sum(stages[:s]) for s in range(len(stages))]
        self.stage_ends = [sum(stages[:s + 1]) - 1 for s in range(len(stages))]
        blocks = []
        for stage, count in enumerate(stages):
            for j in range(count):
                i = starts[stage] + j
                first = stage > 0 and j == 0
                # A stage's first block still reads the previous stage's width and window size.
                window = window_spec[stage - 1] if first else window_spec[stage]
                blocks.append(MultiScaleBlock(
                    dim=stage_dims[stage - 1] if first else stage_dims[stage], dim_out=stage_dims[stage],
                    num_heads=stage_heads[stage], window=0 if i in global_att_blocks else window,
                    q_stride=q_stride if first and stage <= q_pool else 0, mlp_ratio=mlp_ratio))
        self.blocks = nn.ModuleList(blocks)

    def position_embedding(self) -> Tensor:
        """``[1, grid, grid, C]``: bicubic-resized background + the window embedding tiled over the grid."""
        background = F.interpolate(self.pos_embed, size=(self.grid, self.grid), mode="bicubic")
        window = self.pos_embed_window
        tiles = self.grid // window.shape[-1]
        return (background + window.tile(1, 1, tiles, tiles)).permute(0, 2, 3, 1)

    def forward(self, pixels: Tensor) -> list[Tensor]:
        x = self.patch_embed(pixels) + self.position_embedding()
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                features.append(x.permute(0, 3, 1, 2))
        return features


class FpnNeck(nn.Module):
    """1x1 lateral convs to ``d_model``; coarser levels are added (upsampled 2x) on ``top_down_levels`` only.

    The neck's sine position encoding is not computed: only the video memory path reads it.
    """

    def __init__(self, d_model: int, backbone_channel_list: Sequence[int], top_down_levels: Sequence[int],
                 interpolation: str = "nearest") -> None:
        super().__init__()
        # convs[0] reads the coarsest level (backbone_channel_list is coarsest first)
        self.convs = nn.ModuleList(nn.Sequential() for _ in backbone_channel_list)
        for seq, channels in zip(self.convs, backbone_channel_list):
            seq.add_module("conv", nn.Conv2d(channels, d_model, kernel_size=1))
        self.top_down_levels = tuple(top_down_levels)
        self.interpolation = interpolation

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Trunk features, finest first -> FPN levels, finest first."""
        last = len(features) - 1
        coarse_first: list[Tensor] = []
        for level in range(last, -1, -1):
            lateral = self.convs[last - level](features[level])
            if coarse_first and level in self.top_down_levels:
                top_down = F.interpolate(coarse_first[-1], scale_factor=2.0, mode=self.interpolation,
                                         align_corners=None if self.interpolation == "nearest" else False)
                lateral = lateral + top_down
            coarse_first.append(lateral)
        return coarse_first[::-1]


class Sam2ImageEncoder(nn.Module):
    """Trunk + neck; the coarsest FPN level is dropped (``scalp`` 1), leaving strides 4, 8 and 16."""

    def __init__(self, trunk: Hiera, neck: FpnNeck) -> None:
        super().__init__()
        self.trunk = trunk
        self.neck = neck

    def forward(self, pixels: Tensor) -> list[Tensor]:
        return self.neck(self.trunk(pixels))[:-1]
