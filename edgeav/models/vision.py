"""CLIP ViT vision tower as Crab uses it (CRAB_SPEC section 2, "Visual encoder").

Pre-LN transformer with quick-GELU; the patch convolution has no bias; a class
token and learned position embeddings; ``pre_layrnorm`` (spelled so in Hugging
Face) before the first block; ``post_layernorm`` is never used.

Parameter names are those of Hugging Face ``CLIPVisionModel`` under
``vision_model.``, so its state dict (or a full ``CLIPModel``'s ``vision_model.*``
part) loads directly; the pre-hook next to :class:`CLIPVisionTower` drops what
the tower does not use.

The forward returns the hidden states at the requested indexes, with Hugging
Face ``hidden_states`` semantics (0 = embeddings after ``pre_layrnorm``, i = the
output of block i), the class token dropped, and runs only as many blocks as
the largest index needs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeav.config import VisionConfig
from edgeav.errors import OptionError

__all__ = ["CLIPVisionTower", "default_indexes"]

NUM_CHANNELS = 3  # RGB pixels, as CLIP was trained


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Bidirectional multi-head self-attention over the patch sequence."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, L, W] -> [N, heads, L, W/heads]
        q, k, v = (proj(hidden).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(attended.transpose(1, 2).flatten(2))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate)
        self.fc2 = nn.Linear(intermediate, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(hidden)))


class CLIPEncoderLayer(nn.Module):
    """One pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class CLIPEncoder(nn.Module):
    """Holds the blocks under ``encoder.layers.{i}`` as Hugging Face names them."""

    def __init__(self, cfg: VisionConfig, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(depth))


class CLIPEmbeddings(nn.Module):
    """Patch convolution (no bias), class token, learned position embeddings."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(NUM_CHANNELS, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


def default_indexes(cfg: VisionConfig) -> tuple[int, ...]:
    """Crab's hidden-state indexes, in output order: the LLM layer, then the mask layers."""
    return (cfg.llm_layer, *cfg.mask_layers)


class CLIPVisionTower(nn.Module):
    """CLIP vision tower returning patch features at the requested hidden-state indexes.

    ``indexes`` defaults to :func:`default_indexes` (``(23, 14, 22)`` for Crab);
    negative indexes count from the end as in Hugging Face (``-1`` is
    ``cfg.num_layers``). Only ``max(indexes)`` blocks are built and run.
    """

    def __init__(self, cfg: VisionConfig, indexes: Sequence[int] | None = None):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise OptionError(f"vision config: hidden_size {cfg.hidden_size} is not a multiple of "
                              f"num_heads {cfg.num_heads}; choose sizes that divide")
        if cfg.image_size % cfg.patch_size:
            raise OptionError(f"vision config: image_size {cfg.image_size} is not a multiple of "
                              f"patch_size {cfg.patch_size}; choose sizes that divide")
        self.cfg = cfg
        self.indexes = _normalise_indexes(default_indexes(cfg) if indexes is None else indexes, cfg.num_layers)
        self.depth = max(self.indexes)
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, self.depth)
        self.register_load_state_dict_pre_hook(_accept_hf_clip_keys)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``pixels`` [F, 3, H, W] (CLIP-normalised) -> one [F, num_patches, hidden] per index."""
        size = self.cfg.image_size
        if pixels.ndim != 4 or pixels.shape[1] != NUM_CHANNELS or pixels.shape[2] != size or pixels.shape[3] != size:
            raise ValueError(f"pixels: expected shape [frames, {NUM_CHANNELS}, {size}, {size}], got "
                             f"{list(pixels.shape)}; resize and normalise frames with edgeav.preprocess first")
        hidden = self.pre_layrnorm(self.embeddings(pixels))
        kept = {0: hidden}  # only the requested states stay alive, not every block's output
        for number, block in enumerate(self.encoder.layers, start=1):
            hidden = block(hidden)
            if number in self.indexes:
                kept[number] = hidden
        return tuple(kept[index][:, 1:, :] for index in self.indexes)


def _normalise_indexes(indexes: Sequence[int], num_layers: int) -> tuple[int, ...]:
    if len(indexes) == 0:
        raise OptionError("vision hidden-state indexes: none requested; ask for at least one of "
                          f"0..{num_layers}")
    normalised = []
    for index in indexes:
        resolved = index + num_layers + 1 if index < 0 else index
        if not 0 <= resolved <= num_layers:
            raise OptionError(f"vision hidden-state index {index} is out of range for a {num_layers}-block "
                              f"tower; expected 0..{num_layers} (or -{num_layers + 1}..-1)")
        normalised.append(resolved)
    return tuple(normalised)


_HF_PREFIX = "vision_model."
_IGNORED_KEYS = ("post_layernorm.", "embeddings.position_ids")  # unused head; an old persistent buffer
_BLOCK_KEY = re.compile(r"encoder\.layers\.(\d+)\.")


def _accept_hf_clip_keys(module: CLIPVisionTower, state_dict, prefix, local_metadata, strict,
                         missing_keys, unexpected_keys, error_msgs) -> None:
    """Load a Hugging Face CLIP vision state dict: strip ``vision_model.`` and drop unused keys.

    Blocks the config declares but the requested indexes never reach are dropped too;
    a block beyond ``num_layers`` still surfaces as an unexpected key.
    """
    for key in [k for k in state_dict if k.startswith(prefix + _HF_PREFIX)]:
        state_dict[prefix + key[len(prefix) + len(_HF_PREFIX):]] = state_dict.pop(key)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        block = _BLOCK_KEY.match(name)
        unused_block = block is not None and module.depth <= int(block.group(1)) < module.cfg.num_layers
        if name.startswith(_IGNORED_KEYS) or unused_block:
            del state_dict[key]
