"""Qwen2.5-VL windowed ViT, the vision tower of the Qwen2.5-Omni thinker (CRABPLUS_SPEC section 2).

Input: patch rows ``[N, 1176]`` from :func:`edgeav.preprocess.qwen_vision.patchify` and their grid
``(t, h, w)``, for one image or one video. The computation:

1. Patch embed: ``Conv3d(3 -> hidden, kernel = stride = (2, 14, 14))`` without bias; a patch row is
   exactly one kernel window, so it runs as a matmul with the flattened kernel.
2. 2-D RoPE: ``head_dim / 4`` inverse frequencies for the row index and as many for the column
   index, concatenated and duplicated (rotate-half layout), positions in merge-group order.
3. Tokens are permuted window-contiguous: windows of ``window_size`` pixels (112 = 4x4 merge groups =
   8x8 patches) in row-major order per temporal slice, merge groups row-major inside a window.
4. Pre-RMSNorm blocks (eps 1e-6), attention with biased q/k/v/proj, SwiGLU MLP with biases. Blocks
   in ``fullatt_block_indexes`` attend over one temporal slice, the others over one window; no block
   attends across slices. Both are block-diagonal boolean masks given to SDPA.
5. Merger: RMSNorm, the 4 tokens of a merge group concatenated, Linear, GELU (erf), Linear; then the
   merged tokens are put back in (t, h/2, w/2) order: ``t * h * w / 4`` tokens.

The grid is static: masks, the permutation and the RoPE tables are computed once per grid
(:func:`vision_layout`) and the forward branches on shapes only, so it traces at a fixed grid.

Module and parameter names are the on-disk names under ``thinker.visual.`` in the released
Qwen2.5-Omni safetensors (``patch_embed.proj``, ``blocks.{i}.attn.{q,k,v,proj}``,
``blocks.{i}.mlp.{gate,up,down}_proj``, ``merger.ln_q``, ``merger.mlp.{0,2}``), and the state dict
holds nothing else, so it loads strict after stripping that prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import OptionError
from edgeav.models.llama import RMSNorm, apply_rope

__all__ = [
    "PatchMerger",
    "QwenVisionConfig",
    "QwenVisionEncoder",
    "VisionAttention",
    "VisionBlock",
    "VisionLayout",
    "VisionMLP",
    "VisionPatchEmbed",
    "vision_layout",
    "vision_token_count",
]

NORM_EPS = 1e-6


@dataclass(frozen=True)
class QwenVisionConfig:
    """Shape of the tower; the defaults are Qwen2.5-Omni-7B's ``thinker_config.vision_config``."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    in_channels: int = 3
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise OptionError(f"Qwen vision hidden_size {self.hidden_size} must split into {self.num_heads} heads "
                              "of a multiple of 4 (2-D RoPE halves the head twice); fix the vision config")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise OptionError(f"Qwen vision window_size {self.window_size} must be a multiple of patch_size x "
                              f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}; fix the config")
        if any(not 0 <= i < self.depth for i in self.fullatt_block_indexes):
            raise OptionError(f"Qwen vision fullatt_block_indexes {self.fullatt_block_indexes} must lie in "
                              f"0..{self.depth - 1}; fix the vision config")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one patch row: channels x frames x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (4)."""
        return self.spatial_merge_size**2

    @classmethod
    def from_hf(cls, vision_config: Mapping) -> QwenVisionConfig:
        """From a Hugging Face ``vision_config`` dict (``thinker_config.vision_config`` of config.json)."""
        act = vision_config.get("hidden_act", "silu")
        if act != "silu":
            raise OptionError(f"Qwen vision hidden_act {act!r} is not supported: the tower's MLP is SwiGLU "
                              "(silu); check that this is a Qwen2.5-VL/Omni vision config")
        names = ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "temporal_patch_size",
                 "spatial_merge_size", "window_size", "fullatt_block_indexes", "out_hidden_size", "in_channels")
        fields = {name: vision_config[name] for name in names if name in vision_config}
        if "fullatt_block_indexes" in fields:
            fields["fullatt_block_indexes"] = tuple(fields["fullatt_block_indexes"])
        rope = vision_config.get("rope_parameters") or {}
        if "rope_theta" in rope:
            fields["rope_theta"] = float(rope["rope_theta"])
        return cls(**fields)

    def to_hf(self) -> dict:
        """The ``vision_config`` section :meth:`from_hf` reads."""
        data = {**asdict(self), "hidden_act": "silu", "fullatt_block_indexes": list(self.fullatt_block_indexes)}
        data["rope_parameters"] = {"rope_theta": data.pop("rope_theta")}
        return data


def _grid(grid_thw: Sequence[int], cfg: QwenVisionConfig) -> tuple[int, int, int]:
    if len(grid_thw) != 3:
        raise OptionError(f"grid_thw must be (t, h, w), got {tuple(grid_thw)}; pass the grid patchify returned")
    t, h, w = (int(v) for v in grid_thw)
    m = cfg.spatial_merge_size
    if t < 1 or h < m or w < m or h % m or w % m:
        raise OptionError(f"grid_thw {(t, h, w)} is not a patch grid of whole {m}x{m} merge groups; "
                          "pass the grid patchify returned")
    return t, h, w


def vision_token_count(grid_thw: Sequence[int], spatial_merge_size: int = 2) -> int:
    """Tokens the tower gives for a (t, h, w) patch grid: 64 per 224x224 slice."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // spatial_merge_size**2


@dataclass(frozen=True)
class VisionLayout:
    """Everything that depends on the grid only; patch-level tensors are in window order."""

    grid_thw: tuple[int, int, int]
    window_order: Tensor  # [N] long: patch index (patchify order) at each window-order position
    restore_order: Tensor  # [N/4] long: window-order merged token at each (t, h/2, w/2) position
    window_mask: Tensor  # [N, N] bool: same window
    slice_mask: Tensor  # [N, N] bool: same temporal slice
    cos: Tensor  # [N, head_dim] fp32
    sin: Tensor  # [N, head_dim] fp32


def vision_layout(cfg: QwenVisionConfig, grid_thw: Sequence[int], device: torch.device | str | None = None
                  ) -> VisionLayout:
    """Window permutation, attention masks and RoPE tables of one (t, h, w) grid."""
    t, h, w = _grid(grid_thw, cfg)
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    groups_h, groups_w = h // m, w // m
    per_window = cfg.window_size // (cfg.patch_size * m)  # merge groups per window side
    windows_w = -(-groups_w // per_window)
    windows_per_slice = -(-groups_h // per_window) * windows_w

    # Merge groups in patchify order (t, gy, gx); sort by (window, gy, gx) to make windows contiguous.
    slice_of, gy, gx = (a.ravel() for a in np.meshgrid(np.arange(t), np.arange(groups_h), np.arange(groups_w),
                                                         indexing="ij"))
    window_of = slice_of * windows_per_slice + (gy // per_window) * windows_w + gx // per_window
    group_order = np.lexsort((gx, gy, window_of))
    window_order = (group_order[:, None] * unit + np.arange(unit)).ravel()
    restore_order = np.argsort(group_order)

    window_ids = torch.from_numpy(np.repeat(window_of[group_order], unit)).to(device)
    slice_ids = torch.from_numpy(np.repeat(slice_of[group_order], unit)).to(device)

    # Patch (row, col) inside its frame, in patchify order: group position times m plus offset in group.
    dy, dx = np.divmod(np.arange(unit), m)
    rows = (gy[:, None] * m + dy).ravel()[window_order]
    cols = (gx[:, None] * m + dx).ravel()[window_order]
    quarter = cfg.head_dim // 4
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))
    rows_t = torch.from_numpy(rows).to(device=device, dtype=torch.float32)
    cols_t = torch.from_numpy(cols).to(device=device, dtype=torch.float32)
    angles = torch.cat([rows_t[:, None] * inv_freq, cols_t[:, None] * inv_freq], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return VisionLayout(
        grid_thw=(t, h, w),
        window_order=torch.from_numpy(window_order).to(device),
        restore_order=torch.from_numpy(restore_order).to(device),
        window_mask=window_ids[:, None] == window_ids[None, :],
        slice_mask=slice_ids[:, None] == slice_ids[None, :],
        cos=angles.cos(),
        sin=angles.sin(),
    )


class VisionPatchEmbed(nn.Module):
    """The Conv3d patch embedding, run as a matmul: each patch row is one whole kernel window."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: Tensor) -> Tensor:
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        n = x.shape[0]

        def heads(t: Tensor) -> Tensor:  # [N, dim] -> [1, heads, N, head_dim]
            return t.view(n, self.num_heads, -1).transpose(0, 1).unsqueeze(0)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # RoPE in fp32 whatever the compute dtype, as the reference does.
        q = apply_rope(q.float(), cos, sin).to(v.dtype)
        k = apply_rope(k.float(), cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    """SwiGLU with biases; three separate Linears so I-LoRA can wrap each by name."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, NORM_EPS)
        self.norm2 = RMSNorm(cfg.hidden_size, NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 group of consecutive tokens concatenated and projected to the LLM width."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        merged = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.out_hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class QwenVisionEncoder(nn.Module):
    """Patch rows of one image or video -> visual tokens ``[t*h*w/4, out_hidden_size]`` in (t, h/2, w/2) order."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = VisionPatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self._layouts: dict[tuple, VisionLayout] = {}

    def layout(self, grid_thw: Sequence[int]) -> VisionLayout:
        """The grid's layout on the weights' device, computed once per grid."""
        device = self.patch_embed.proj.weight.device
        key = (_grid(grid_thw, self.cfg), str(device))
        if key not in self._layouts:
            self._layouts[key] = vision_layout(self.cfg, key[0], device)
        return self._layouts[key]

    def forward(self, patches: Tensor, grid_thw: Sequence[int]) -> Tensor:
        layout = self.layout(grid_thw)
        t, h, w = layout.grid_thw
        if tuple(patches.shape) != (t * h * w, self.cfg.patch_dim):
            raise OptionError(f"patches of shape {tuple(patches.shape)} do not fit grid {(t, h, w)}: expected "
                              f"[{t * h * w}, {self.cfg.patch_dim}]; pass patchify's patches with its grid")
        x = self.patch_embed(patches)[layout.window_order]
        for index, block in enumerate(self.blocks):
            mask = layout.slice_mask if index in self.cfg.fullatt_block_indexes else layout.window_mask
            x = block(x, layout.cos, layout.sin, mask)
        return self.merger(x)[layout.restore_order]
