"""Segment Anything (SAM v1): ViT image encoder, prompt encoder and mask decoder.

One component for every system that segments with SAM v1 (u-LLaVA's ``[SEG]`` head,
OpenAVS's box prompts). Module and parameter names equal those of the released
``sam_vit_{h,l,b}_*.pth`` files (``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``), so a released state dict loads with ``strict=True``.

Plain tensors in and out:

- :meth:`Sam.encode_image`: normalised, padded pixels ``[B,3,S,S]`` -> embeddings ``[B,D,g,g]``;
- :meth:`Sam.prompt_embeddings`: points / boxes / ready-made sparse tokens / mask logits ->
  (sparse ``[N,K,D]``, dense ``[N,D,g,g]``);
- :meth:`Sam.decode_masks`: embeddings + prompts -> low-res logits ``[N,C,4g,4g]`` and IoU ``[N,C]``;
- :func:`postprocess_masks`: low-res logits -> logits at the source size.

Forward paths branch on config values only (window padding and token counts come from the
config) and one image embedding serves many prompts by broadcasting, so the encoder and the
decoder export to ONNX with dynamic image and prompt axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import CheckpointError, OptionError

__all__ = ["SAM_PRESETS", "Sam", "SamConfig", "SamImageEncoder", "SamMaskDecoder", "SamPromptEncoder",
           "load_sam_state_dict", "postprocess_masks", "sam_config"]

# The reference's pixel mean/std are non-persistent buffers; a file that saved them anyway still loads.
_PIXEL_NORM_KEYS = ("pixel_mean", "pixel_std")


@dataclass(frozen=True)
class SamConfig:
    """SAM v1 sizes. The defaults are ViT-H as released (``sam_vit_h_4b8939.pth``)."""

    # image encoder (ViT with windowed attention)
    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_chans: int = 256
    mlp_ratio: float = 4.0
    use_rel_pos: bool = True
    # prompt encoder
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    # mask decoder
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # derived
    image_embedding_size: int = field(init=False)  # g: the embedding grid is g x g
    mlp_dim: int = field(init=False)
    num_mask_tokens: int = field(init=False)
    low_res_size: int = field(init=False)  # the decoder's mask logits are low_res_size^2 (4g)

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
        internal = self.prompt_embed_dim // max(self.attention_downsample_rate, 1)
        checks = [  # (broken, what is wrong); `or` short-circuits before any modulo by zero
            (self.patch_size <= 0 or self.img_size <= 0 or self.img_size % self.patch_size,
             f"img_size {self.img_size} is not a positive multiple of patch_size {self.patch_size}"),
            (self.out_chans != self.prompt_embed_dim, f"out_chans {self.out_chans} must equal prompt_embed_dim "
             f"{self.prompt_embed_dim} (the decoder reads the encoder's output directly)"),
            (self.num_heads <= 0 or self.embed_dim % self.num_heads,
             f"{self.num_heads} heads do not divide embed_dim {self.embed_dim}"),
            (self.decoder_num_heads <= 0 or self.prompt_embed_dim % self.decoder_num_heads
             or internal % self.decoder_num_heads, f"{self.decoder_num_heads} decoder heads do not divide "
             f"prompt_embed_dim {self.prompt_embed_dim} and its downsampled width {internal}"),
            (self.prompt_embed_dim % 8 or self.mask_in_chans % 4,
             "prompt_embed_dim must be a multiple of 8 and mask_in_chans of 4 (the up/down-scaling convs)"),
            (any(not 0 <= i < self.depth for i in self.global_attn_indexes),
             f"global_attn_indexes {self.global_attn_indexes} must lie in 0..{self.depth - 1}"),
        ]
        for broken, problem in checks:
            if broken:
                raise OptionError(f"SamConfig: {problem}; change the config")
        object.__setattr__(self, "image_embedding_size", self.img_size // self.patch_size)
        object.__setattr__(self, "mlp_dim", int(self.embed_dim * self.mlp_ratio))
        object.__setattr__(self, "num_mask_tokens", self.num_multimask_outputs + 1)
        object.__setattr__(self, "low_res_size", 4 * self.img_size // self.patch_size)


SAM_PRESETS: dict[str, SamConfig] = {
    "vit_h": SamConfig(),
    "vit_l": SamConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": SamConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    # Smallest useful random-weights model for tests (ULLAVA_SPEC section 10).
    "tiny": SamConfig(img_size=256, patch_size=16, embed_dim=32, depth=2, num_heads=2, window_size=4,
                      global_attn_indexes=(1,), out_chans=16, prompt_embed_dim=16, decoder_depth=2,
                      decoder_mlp_dim=32, decoder_num_heads=2, iou_head_hidden_dim=16),
}


def sam_config(preset: str) -> SamConfig:
    """The config of a named preset; an unknown name gets the list of known ones."""
    if preset not in SAM_PRESETS:
        raise OptionError(f"SAM preset {preset!r} is unknown: expected one of {', '.join(SAM_PRESETS)}")
    return SAM_PRESETS[preset]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (eps 1e-6, as SAM)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


# --- Image encoder -------------------------------------------------------------------

def _relative_positions(size: int, table: Tensor) -> Tensor:
    """``[size, size, C]``: the table row for each (query, key) offset along one axis."""
    offsets = torch.arange(size, device=table.device)[:, None] - torch.arange(size, device=table.device)[None, :]
    return table[offsets + (size - 1)]


class EncoderAttention(nn.Module):
    """Self-attention over a ``size x size`` token grid with decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, size: int, use_rel_pos: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.size = size
        self.dim = dim
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, dim // num_heads))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, dim // num_heads))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, size, size, dim]`` -> same shape."""
        s, heads, dim = self.size, self.num_heads, self.dim
        # [B, s*s, 3, heads, hd] -> 3 x [B, heads, s*s, hd]
        q, k, v = self.qkv(x).reshape(-1, s * s, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.use_rel_pos:
            # bias[b,h, (qy,qx), (ky,kx)] = q . R_h[qy-ky] + q . R_w[qx-kx] (unscaled q, as trained)
            grid_q = q.reshape(-1, heads, s, s, dim // heads)
            rel_h = torch.einsum("bnyxc,ykc->bnyxk", grid_q, _relative_positions(s, self.rel_pos_h))
            rel_w = torch.einsum("bnyxc,xkc->bnyxk", grid_q, _relative_positions(s, self.rel_pos_w))
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(-1, heads, s * s, s * s)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, s*s, hd]
        # Heads joined by concatenation, not transpose+reshape: with a mask, torch 2.13's dynamo
        # exporter infers other strides for SDPA's output than it traced with and fails on the reshape.
        return self.proj(torch.cat(out.unbind(1), dim=-1).unflatten(1, (s, s)))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block; ``window_size > 0`` attends within non-overlapping windows."""

    def __init__(self, config: SamConfig, window_size: int) -> None:
        super().__init__()
        dim, grid = config.embed_dim, config.image_embedding_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EncoderAttention(dim, config.num_heads, window_size or grid, config.use_rel_pos)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, config.mlp_dim, nn.GELU)
        self.window_size = window_size
        self.grid = grid
        self.dim = dim
        self.pad = (-grid) % window_size if window_size else 0  # zero tokens that complete the last window

    def _windows(self, x: Tensor) -> Tensor:
        """``[B, g, g, C]`` -> ``[B * n * n, w, w, C]`` (zero-padded to n windows a side)."""
        w, c = self.window_size, self.dim
        n = (self.grid + self.pad) // w
        if self.pad:
            x = F.pad(x, (0, 0, 0, self.pad, 0, self.pad))
        return x.reshape(-1, n, w, n, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)

    def _unwindows(self, x: Tensor) -> Tensor:
        w, c = self.window_size, self.dim
        n = (self.grid + self.pad) // w
        x = x.reshape(-1, n, n, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n * w, n * w, c)
        return x[:, :self.grid, :self.grid, :]

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size:
            x = self._unwindows(self.attn(self._windows(x)))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # NHWC, as the blocks work


class SamImageEncoder(nn.Module):
    """ViT (absolute + decomposed relative positions, windowed and global blocks) and a conv neck."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        grid = config.image_embedding_size
        self.img_size = config.img_size
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(config, 0 if i in config.global_attn_indexes else config.window_size)
            for i in range(config.depth))
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        """``[B, 3, S, S]`` normalised, padded pixels -> ``[B, out_chans, g, g]``."""
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


# --- Prompt encoder ------------------------------------------------------------------

class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding; the Gaussian matrix is saved with the checkpoint."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def encode(self, coords: Tensor) -> Tensor:
        """Coordinates normalised to [0, 1], ``[..., 2]`` (x, y) -> ``[..., 2 * feats]``."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, size: int) -> Tensor:
        """Encoding of the pixel centres of a ``size x size`` grid -> ``[2 * feats, size, size]``."""
        matrix = self.positional_encoding_gaussian_matrix
        centres = (torch.arange(size, device=matrix.device, dtype=matrix.dtype) + 0.5) / size
        coords = torch.stack([centres[None, :].expand(size, size), centres[:, None].expand(size, size)], dim=-1)
        return self.encode(coords).permute(2, 0, 1)


class SamPromptEncoder(nn.Module):
    """Points, boxes and masks -> the decoder's sparse tokens and dense map."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        dim, mic = config.prompt_embed_dim, config.mask_in_chans
        self.embed_dim = dim
        self.img_size = config.img_size
        self.grid = config.image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mic // 4, kernel_size=2, stride=2),
            LayerNorm2d(mic // 4),
            nn.GELU(),
            nn.Conv2d(mic // 4, mic, kernel_size=2, stride=2),
            LayerNorm2d(mic),
            nn.GELU(),
            nn.Conv2d(mic, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def dense_pe(self) -> Tensor:
        return self.pe_layer.grid(self.grid).unsqueeze(0)

    def embed_points(self, points: Tensor, labels: Tensor) -> Tensor:
        """``[N,P,2]`` (x, y) in model-input pixels and labels ``[N,P]`` -> tokens ``[N,P,D]``.

        Labels: -1 padding (not a point), 0 negative, 1 positive, 2/3 box corners.
        """
        matrix = self.pe_layer.positional_encoding_gaussian_matrix
        # +0.5: pixel centres; the model input is square, so x and y share one scale
        coords = ((points.to(torch.float32) + 0.5) / self.img_size).to(matrix.dtype)
        pe = self.pe_layer.encode(coords)
        labels = labels[..., None]
        label_embeds = sum((labels == i).to(pe.dtype) * emb.weight for i, emb in enumerate(self.point_embeddings))
        # A padding point carries no position, only the learned not-a-point vector.
        return torch.where(labels == -1, self.not_a_point_embed.weight, pe + label_embeds)

    def forward(self, points: Tensor | None = None, labels: Tensor | None = None, boxes: Tensor | None = None,
                sparse: Tensor | None = None, masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """See :meth:`Sam.prompt_embeddings`."""
        if (points is None) != (labels is None):
            raise ValueError("prompt: points and labels go together; pass both ([N,P,2] and [N,P]) or neither")
        counts = {name: t.shape[0] for name, t in
                  (("points", points), ("boxes", boxes), ("sparse", sparse), ("masks", masks)) if t is not None}
        sizes = list(counts.values())  # compared, never hashed: hashing would pin a traced batch size
        if any(size != sizes[0] for size in sizes[1:]):
            raise ValueError(f"prompt: the prompt batch sizes disagree ({counts}); give every prompt "
                             "input one row per mask to predict")
        batch = sizes[0] if sizes else 1
        device = self.no_mask_embed.weight.device
        tokens = []
        if points is not None:
            if boxes is None:  # as trained: a lone point set ends with one padding point
                points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
                labels = torch.cat([labels, torch.full_like(labels[:, :1], -1)], dim=1)
            tokens.append(self.embed_points(points, labels))
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor([[2, 3]], device=corners.device).expand(corners.shape[0], 2)
            tokens.append(self.embed_points(corners, corner_labels))
        if sparse is not None:
            tokens.append(sparse.to(self.no_mask_embed.weight.dtype))
        if not tokens:
            tokens.append(torch.empty((batch, 0, self.embed_dim), device=device))
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, self.grid, self.grid)
        return torch.cat(tokens, dim=1), dense


# --- Mask decoder --------------------------------------------------------------------

class DecoderAttention(nn.Module):
    """Multi-head attention whose projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise OptionError(f"mask decoder: {num_heads} heads do not divide the attention width "
                              f"{self.internal_dim} (width / downsample rate); change the number of heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)),
                                             self._heads(self.v_proj(v)))
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, tokens -> image, MLP, image -> tokens; post-norm after each."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, rate: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = DecoderAttention(dim, heads, rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = DecoderAttention(dim, heads, rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:  # the first block replaces the tokens by their self-attention
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer (also the core of Crab's mask decoder)."""

    def __init__(self, depth: int, dim: int, heads: int, mlp_dim: int, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(dim, heads, mlp_dim, attention_downsample_rate,
                                                         skip_first_layer_pe=i == 0) for i in range(depth))
        self.final_attn_token_to_image = DecoderAttention(dim, heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """image ``[N,D,g,g]``, image_pe ``[1,D,g,g]``, tokens ``[N,T,D]`` -> (tokens, image ``[N,g*g,D]``)."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)  # broadcasts over the prompts
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    """``num_layers`` linears with ReLU between (hypernetworks and the IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class SamMaskDecoder(nn.Module):
    """Output tokens + prompt tokens attend to the image; hypernetworks turn mask tokens into masks."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        dim = config.prompt_embed_dim
        self.grid = config.image_embedding_size
        self.num_mask_tokens = config.num_mask_tokens
        self.transformer = TwoWayTransformer(config.decoder_depth, config.prompt_embed_dim, config.decoder_num_heads,
                                             config.decoder_mlp_dim, config.attention_downsample_rate)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3)
                                                       for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, config.iou_head_hidden_dim, self.num_mask_tokens,
                                       config.iou_head_depth)

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor,
                multimask_output: bool = False) -> tuple[Tensor, Tensor]:
        """See :meth:`Sam.decode_masks`."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse.to(output_tokens.dtype)], dim=1)
        image = image_embeddings + dense  # [1 or N] + [N]: one image embedding serves every prompt
        tokens_out, image_out = self.transformer(image, image_pe, tokens)
        iou_token_out = tokens_out[:, 0, :]
        mask_tokens_out = tokens_out[:, 1:1 + self.num_mask_tokens, :]

        image_out = image_out.transpose(1, 2).unflatten(2, (self.grid, self.grid))
        upscaled = self.output_upscaling(image_out)  # [N, D/8, 4g, 4g]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                                for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper_in @ upscaled.flatten(2)).unflatten(2, (4 * self.grid, 4 * self.grid))
        iou = self.iou_prediction_head(iou_token_out)
        # Token 0 is the single-mask answer, tokens 1.. the three disambiguating ones.
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou[:, keep]


# --- The model -----------------------------------------------------------------------

class Sam(nn.Module):
    """SAM v1: ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` (released key names)."""

    mask_threshold: float = 0.0

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = SamImageEncoder(config)
        self.prompt_encoder = SamPromptEncoder(config)
        self.mask_decoder = SamMaskDecoder(config)

    @classmethod
    def from_preset(cls, name: str, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> Sam:
        """A randomly initialised model of a named preset (``vit_h``, ``vit_l``, ``vit_b``, ``tiny``)."""
        with torch.device(device or "cpu"):
            model = cls(sam_config(name))
        return model.to(dtype=dtype) if dtype is not None else model

    @classmethod
    def from_checkpoint(cls, path: str | Path, preset: str = "vit_h", *, prefix: str = "",
                        device: torch.device | str = "cpu") -> Sam:
        """Load a SAM state dict (``sam_vit_h_4b8939.pth`` or a ``.safetensors``) without running its code.

        ``prefix`` selects SAM's part of a larger state dict (u-LLaVA: ``"visual_model."``).
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"SAM checkpoint {path}: no such file; pass the path of sam_vit_h_4b8939.pth")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(str(path), device=str(device))
            else:
                state = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # torch and safetensors raise many types for a damaged file
            raise CheckpointError(f"SAM checkpoint {path}: cannot be read as a tensor file "
                                  f"({type(e).__name__}); re-download it") from e
        with torch.device("meta"):
            model = cls(sam_config(preset))
        load_sam_state_dict(model, state, prefix=prefix, source=str(path), assign=True)
        return model.eval()

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Normalised, padded pixels ``[B,3,S,S]`` (:func:`edgeav.preprocess.sam.sam_pixels`) -> ``[B,D,g,g]``."""
        return self.image_encoder(pixels)

    def dense_pe(self) -> Tensor:
        """Positional encoding of the embedding grid ``[1,D,g,g]``."""
        return self.prompt_encoder.dense_pe()

    def prompt_embeddings(self, points: Tensor | None = None, labels: Tensor | None = None,
                          boxes: Tensor | None = None, sparse: Tensor | None = None,
                          masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Prompts for N masks -> (sparse ``[N,K,D]``, dense ``[N,D,g,g]``).

        points ``[N,P,2]`` (x, y) and labels ``[N,P]`` (1 positive, 0 negative, -1 padding) and
        boxes ``[N,4]`` (x0, y0, x1, y1) are in model-input pixels
        (:func:`edgeav.preprocess.sam.sam_coords`); points without boxes get one padding point, as
        SAM was trained. ``sparse`` ``[N,K,D]`` are ready-made tokens appended as given (u-LLaVA:
        one projected ``[SEG]`` state, K=1, no padding point). Token order: points, box corners,
        sparse. masks ``[N,1,4g,4g]`` are low-res mask logits; without them the dense map is the
        learned no-mask vector broadcast over the grid.
        """
        return self.prompt_encoder(points, labels, boxes, sparse, masks)

    def decode_masks(self, image_embeddings: Tensor, sparse: Tensor, dense: Tensor,
                     multimask_output: bool = False) -> tuple[Tensor, Tensor]:
        """-> (low-res mask logits ``[N,C,4g,4g]``, predicted IoU ``[N,C]``); C = 3 if multimask else 1.

        ``image_embeddings`` is ``[1,D,g,g]`` (one image, shared by all N prompts) or ``[N,D,g,g]``.
        """
        return self.mask_decoder(image_embeddings, self.dense_pe(), sparse, dense, multimask_output)

    def postprocess_masks(self, low_res_logits: Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> Tensor:
        return postprocess_masks(low_res_logits, input_size, original_size, img_size=self.config.img_size)


def postprocess_masks(low_res_logits: Tensor, input_size: tuple[int, int], original_size: tuple[int, int],
                      img_size: int = 1024) -> Tensor:
    """Low-res logits ``[N,C,h,w]`` -> fp32 logits ``[N,C,H,W]`` at the source size (mask = logits > 0).

    Upsample to the padded ``img_size`` square, crop the resized image's ``input_size`` (h, w)
    (as :func:`edgeav.preprocess.sam.sam_pixels` returns it), upsample to ``original_size`` (H, W).
    """
    logits = F.interpolate(low_res_logits.float(), (img_size, img_size), mode="bilinear", align_corners=False)
    logits = logits[..., :int(input_size[0]), :int(input_size[1])]
    return F.interpolate(logits, (int(original_size[0]), int(original_size[1])), mode="bilinear",
                         align_corners=False)


def load_sam_state_dict(model: Sam, state_dict: Mapping[str, Tensor], *, prefix: str = "",
                        source: str = "state dict", assign: bool = False) -> Sam:
    """Load ``state_dict`` (keys under ``prefix``) into ``model`` strictly, with errors naming what differs."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"SAM {source}: holds a {type(state_dict).__name__}, not a state dict of tensors; "
                              "pass the segment_anything checkpoint file")
    state = {k[len(prefix):]: v for k, v in state_dict.items()
             if k.startswith(prefix) and k[len(prefix):] not in _PIXEL_NORM_KEYS}
    expected = model.state_dict()
    name = next((n for n, c in SAM_PRESETS.items() if c == model.config), "configured")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"SAM {source}: keys do not fit the {name} model "
                              f"(missing {len(missing)}: {missing[:3]}, unexpected {len(unexpected)}: "
                              f"{unexpected[:3]}); check the preset and the key prefix {prefix!r}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"SAM {source}: {prefix}{key} has shape {tuple(value.shape)}, the "
                                  f"{name} model expects {tuple(expected[key].shape)}; "
                                  "check the preset")
    model.load_state_dict(state, strict=True, assign=assign)
    return model
