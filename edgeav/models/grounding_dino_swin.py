"""Swin Transformer image backbone of GroundingDINO (``backbone.0.*`` of the release).

Shifted-window self-attention over 4x4 patches in four stages; each stage but
the last ends with a 2x2 patch merge. The stages named in ``out_indices`` are
layer-normed (``norm{i}``) and returned as feature maps [B, C_i, H_i, W_i].

Parameter names are those of the original GroundingDINO Swin (``patch_embed``,
``layers.{i}.blocks.{j}.attn.qkv`` ...), including the persistent
``relative_position_index`` buffers its checkpoints carry. As the original,
windows keep their size whatever the feature size (the map is padded to a
multiple of the window), and shifted windows use an additive -100 mask.

Sizes are whole-step ceil divisions of the image size (stage i: ceil(H / (4 * 2^i))),
never remainders or nested halvings, and views name every axis: torch.export then
traces one graph valid for any height and width (see ``GraphSpec.free_axes``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwinBackbone"]


def ceil_div(size: int, step: int) -> int:
    """Whole ``step``s needed to cover ``size``."""
    return (size + step - 1) // step


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * H/w * W/w, w*w, C]."""
    batch, height, width, channels = x.shape
    rows, cols = height // window, width // window
    x = x.view(batch, rows, window, cols, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch * rows * cols, window * window, channels)


def window_merge(windows: torch.Tensor, window: int, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: -> [B, H, W, C]."""
    channels = windows.shape[-1]
    x = windows.view(batch, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def relative_position_index(window: int) -> torch.Tensor:
    """[w*w, w*w] index into the (2w-1)^2 bias table for each query/key pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask [num_windows, w*w, w*w]: 0 within a region of the rolled map, -100 across regions."""

    def regions(size: int) -> torch.Tensor:
        index = torch.arange(size)
        return (index >= size - window).long() + (index >= size - shift).long()

    region = (regions(height)[:, None] * 3 + regions(width)[None, :]).float()
    region = window_partition(region[None, :, :, None], window).squeeze(-1)
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # persistent, as in the released checkpoints, so their keys load strictly
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        num_windows, tokens, channels = windows.shape
        q, k, v = self.qkv(windows).view(num_windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        scores = scores + bias.view(tokens, tokens, -1).permute(2, 0, 1)[None]
        if mask is not None:  # [num_windows, T, T], windows of every image of the batch
            scores = scores + mask[:, None]
        attended = scores.softmax(-1) @ v
        return self.proj(attended.transpose(1, 2).reshape(num_windows, tokens, channels))


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-LN block: x + W-MSA(ln(x)) over (shifted) windows, then x + MLP(ln(x))."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = x.shape
        window, shift = self.window, self.shift
        h = self.norm1(x).view(batch, height, width, channels)
        # sizes as ceil divisions, not remainders: an exporter's symbolic shapes stay simple (and dynamic)
        padded_h, padded_w = ceil_div(height, window) * window, ceil_div(width, window) * window
        h = F.pad(h, (0, 0, 0, padded_w - width, 0, padded_h - height))
        mask = None
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(padded_h, padded_w, window, shift).to(x).repeat(batch, 1, 1)
        h = self.attn(window_partition(h, window), mask)
        h = window_merge(h, window, batch, padded_h, padded_w)
        if shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        x = x + h[:, :height, :width].reshape(batch, height * width, channels)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbouring patches -> one token of twice the width (odd sizes padded by one)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int, half_h: int, half_w: int) -> torch.Tensor:
        """[B, height*width, C] -> [B, half_h*half_w, 2C]; ``half_*`` = ceil(size / 2), passed in so that an
        exporter sees each stage's size as one division of the image size, not a nest of them."""
        batch, _, channels = x.shape
        x = F.pad(x.view(batch, height, width, channels), (0, 0, 0, 2 * half_w - width, 0, 2 * half_h - height))
        # 2x2 cells as axes rather than strided slices; order (row, col): (0,0), (1,0), (0,1), (1,1), as the
        # pretrained reduction expects
        x = x.view(batch, half_h, 2, half_w, 2, channels)
        x = torch.cat([x[:, :, 0, :, 0], x[:, :, 1, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 1]], -1)
        return self.reduction(self.norm(x.reshape(batch, half_h * half_w, 4 * channels)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, height, width)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, embed_dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, ceil_div(width, self.patch) * self.patch - width,
                                0, ceil_div(height, self.patch) * self.patch - height))
        return self.proj(pixels)


class SwinBackbone(nn.Module):
    """Pixels [B, 3, H, W] -> one feature map per stage in ``out_indices`` (0-based)."""

    def __init__(self, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window: int,
                 patch: int = 4, mlp_ratio: float = 4.0, out_indices: Sequence[int] = (1, 2, 3)):
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch, embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(self.num_features[i], depths[i], num_heads[i], window, mlp_ratio, i < len(depths) - 1)
            for i in range(len(depths)))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    @property
    def out_channels(self) -> list[int]:
        return [self.num_features[i] for i in self.out_indices]

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        batch, _, pixel_h, pixel_w = pixels.shape
        # stage i covers ceil(size / (patch * 2^i)) cells (= the padded halvings, as one division)
        cell = self.patch_embed.patch
        sizes = [(ceil_div(pixel_h, cell * 2 ** i), ceil_div(pixel_w, cell * 2 ** i)) for i in range(len(self.layers))]
        x = self.patch_embed.norm(self.patch_embed(pixels).flatten(2).transpose(1, 2))
        features = []
        for i, stage in enumerate(self.layers):
            height, width = sizes[i]
            x = stage(x, height, width)
            if i in self.out_indices:
                normed = getattr(self, f"norm{i}")(x)
                features.append(normed.view(batch, height, width, self.num_features[i]).permute(0, 3, 1, 2))
            if stage.downsample is not None:
                x = stage.downsample(x, height, width, *sizes[i + 1])
        return features
