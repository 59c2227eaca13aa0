"""Crab's mask decoder (``SegModule``): six LLM hidden states and two CLIP scales in,
224x224 mask logits out (CRAB_SPEC section 2, "Mask decoder").

Submodule and parameter names equal those of the released checkpoint under
``base_model.model.model.seg_module.`` (see :data:`RELEASED_KEY_PREFIX`), so a released
state dict loads with the prefix stripped and nothing renamed, ``strict=True``.

Crab's quirks are reproduced on purpose:

- the query generator feeds the ORIGINAL learned queries to every layer, so only its last
  layer shapes the output (we run only that layer; the others stay for the checkpoint);
- the 3 tokens of a scale are averaged with the fixed weight 1/3, the 2 levels with 1/2
  (Crab kept these in plain Python lists of tensors: never trained, never saved);
- level 1 scales its source by ``sigmoid(mean over classes of the level-0 logits) + 1``;
- every resize is bilinear with ``align_corners=False``, computed in fp32.

The two random-Fourier matrices of the positional encodings are persistent buffers, as
in Crab (:data:`FOURIER_KEYS`): a mask file saved from Crab's state dict holds them, and
then they load with it, exactly. Crab's trainer saved parameters only, so the released
files may lack them; Crab then drew them from the global RNG at every start. Where a
state dict lacks them we keep our own draw from a local generator seeded with
:data:`FOURIER_SEED` (level 0 first, then level 1), so every start gives the same values.

SAM's pieces (``TwoWayTransformer``, ``LayerNorm2d``, ``MLP``) are shared with
:mod:`edgeav.models.sam`; what is Crab's own lives here.

``forward`` has no data-dependent Python control flow: the loops run over config sizes
and the task (binary or AVSS) is fixed when the module is built.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import OptionError
from edgeav.models.sam import MLP, LayerNorm2d, TwoWayTransformer
from edgeav.systems.crab.config import CrabConfig, SegConfig, preset

logger = logging.getLogger("edgeav")

__all__ = [
    "FOURIER_KEYS",
    "FOURIER_SEED",
    "RELEASED_KEY_PREFIX",
    "FourierPositionalEncoding",
    "MultiScaleMaskDecoder",
    "QueryGenerator",
    "SegModule",
    "fourier_matrices",
    "patches_to_grid",
]

# Seed of the random-Fourier positional matrices, used where a checkpoint does not hold them.
FOURIER_SEED = 0
# The matrices' names in SegModule's state dict (and Crab's), level 0 then level 1.
FOURIER_KEYS = ("pe_layer.positional_encoding_gaussian_matrix", "mask_decoder.pe1.positional_encoding_gaussian_matrix")

# Where SegModule's parameters sit in Crab's released avs/avss_finetune_weights.bin.
RELEASED_KEY_PREFIX = "base_model.model.model.seg_module."


def patches_to_grid(patches: Tensor) -> Tensor:
    """CLIP patch tokens ``[B, N, D]`` (CLS dropped, row-major) -> feature map ``[B, D, g, g]``."""
    if patches.dim() != 3:
        raise ValueError(f"patches: expected [batch, patches, width], got shape {tuple(patches.shape)}; "
                         "drop the CLS token and pass one frame per batch row")
    batch, num_patches, width = patches.shape
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"patches: {num_patches} tokens do not form a square grid; "
                         "drop the CLS token (CLIP gives grid*grid + 1)")
    return patches.transpose(1, 2).reshape(batch, width, grid, grid)


def fourier_matrices(num_pos_feats: int, count: int = 2, seed: int = FOURIER_SEED) -> list[Tensor]:
    """The ``count`` Gaussian matrices ``[2, num_pos_feats]`` in draw order (level 0 first)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn((2, num_pos_feats), generator=generator, device="cpu", dtype=torch.float32)
            for _ in range(count)]


class FourierPositionalEncoding(nn.Module):
    """Dense positional encoding from random spatial frequencies (SAM's ``PositionEmbeddingRandom``).

    The matrix is a persistent buffer, as in Crab; :class:`SegModule` keeps the seeded one
    when a state dict lacks it.
    """

    def __init__(self, gaussian_matrix: Tensor) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", gaussian_matrix.clone())

    def forward(self, height: int, width: int) -> Tensor:
        """Encoding of an ``height x width`` grid of pixel centres -> ``[1, 2 * feats, H, W]``."""
        matrix = self.positional_encoding_gaussian_matrix
        y = (torch.arange(height, device=matrix.device, dtype=matrix.dtype) + 0.5) / height
        x = (torch.arange(width, device=matrix.device, dtype=matrix.dtype) + 0.5) / width
        coords = torch.stack([x[None, :].expand(height, width), y[:, None].expand(height, width)], dim=-1)
        coords = 2 * math.pi * ((2 * coords - 1) @ matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(2, 0, 1).unsqueeze(0)


class QueryGeneratorLayer(nn.Module):
    """Self-attention, cross-attention to the prompt, GELU FFN; post-norm (``nn.MultiheadAttention``)."""

    def __init__(self, embed_dim: int, num_heads: int, hidden_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, embed_dim))
        self.norm1 = nn.LayerNorm(embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(self, queries: Tensor, prompt: Tensor) -> Tensor:
        queries = self.norm1(queries + self.self_attn(queries, queries, queries, need_weights=False)[0])
        queries = self.norm2(queries + self.cross_attn(queries, prompt, prompt, need_weights=False)[0])
        return self.norm3(queries + self.ffn(queries))


class QueryGenerator(nn.Module):
    """Object queries conditioned on the sparse prompt.

    Crab runs every layer on the ORIGINAL queries and keeps the last result, so the earlier
    layers never reach the output: we run the last one only, with identical results.
    """

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QueryGeneratorLayer(embed_dim, num_heads, hidden_dim) for _ in range(num_layers))

    def forward(self, queries: Tensor, prompt: Tensor) -> Tensor:
        return self.layers[-1](queries, prompt)


class ConvMLP(nn.Module):
    """1x1 convolutions with ReLU between them (Crab's ``MLP_conv``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Conv2d(n, k, kernel_size=1) for n, k in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def _resize(x: Tensor, size: int) -> Tensor:
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False).to(x.dtype)


class MultiScaleMaskDecoder(nn.Module):
    """Crab's ``MaskDecoderMultiScale``: one two-way transformer per level, 300 object queries."""

    def __init__(self, seg: SegConfig, fourier_matrix: Tensor) -> None:
        super().__init__()
        dim = seg.prompt_dim
        self.transformer = nn.ModuleList(
            TwoWayTransformer(seg.transformer_depth, dim, seg.num_heads, seg.mlp_dim, seg.attention_downsample)
            for _ in range(seg.num_scales)
        )
        self.avs_query_tokens = nn.Embedding(seg.num_queries, dim)
        self.query_generator = QueryGenerator(seg.query_generator_layers, dim, seg.num_heads, seg.query_ffn_dim)
        self.hyper_mlp_out = ConvMLP(seg.num_queries, dim, seg.hyper_dim, 3)
        self.hyper_mlp = MLP(dim, dim, seg.hyper_dim, 3)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, seg.hyper_dim, kernel_size=2, stride=2), LayerNorm2d(seg.hyper_dim), nn.GELU())
        self.upsample_2x = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2), LayerNorm2d(dim), nn.GELU())
        self.pe1 = FourierPositionalEncoding(fourier_matrix)  # level 1's own encoding at 2x the grid
        self.level_embed = nn.Embedding(seg.num_scales, dim)
        self.ms3_s4_classfier = nn.Conv2d(seg.hyper_dim, 1, kernel_size=1, bias=False)  # sic, as released
        self.avss_classifier = nn.Conv2d(seg.hyper_dim, seg.avss_classes, kernel_size=1, bias=False)

    def predict_masks(self, level: int, image_embedding: Tensor, image_pe: Tensor, sparse_prompt: Tensor,
                      dense_prompt: Tensor, previous_logits: Tensor | None, avss: bool) -> Tensor:
        """Logits of one level: ``[B, C, 2h, 2w]`` where ``h, w`` is the transformer's grid.

        ``image_embedding [B, D, g, g]`` (after the neck), ``sparse_prompt [B, 1, D]``,
        ``dense_prompt [B, D, g, g]``; level > 0 upsamples to ``2g`` and needs ``previous_logits``.
        """
        batch = sparse_prompt.shape[0]
        queries = self.avs_query_tokens.weight.unsqueeze(0).expand(batch, -1, -1)
        tokens = self.query_generator(queries, sparse_prompt) + self.level_embed.weight[level]

        src = image_embedding
        if level > 0:  # static: unrolled per level
            src = self.upsample_2x(src)
            gate = torch.sigmoid(previous_logits.mean(dim=1, keepdim=True)) + 1
            src = gate * src
            image_pe = self.pe1(src.shape[-2], src.shape[-1])
            dense_prompt = _resize(dense_prompt, src.shape[-1])
        src = src + dense_prompt
        _, dim, height, width = src.shape

        tokens, keys = self.transformer[level](src, image_pe, tokens)
        hyper = self.hyper_mlp(tokens)  # [B, Q, hyper]
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(batch, dim, height, width))
        _, hyper_dim, up_h, up_w = upscaled.shape
        masks = (hyper @ upscaled.reshape(batch, hyper_dim, up_h * up_w)).reshape(batch, -1, up_h, up_w)
        masks = self.hyper_mlp_out(masks)
        return self.avss_classifier(masks) if avss else self.ms3_s4_classfier(masks)


class SegModule(nn.Module):
    """Crab's mask decoder.

    ``forward(mask_hidden [B, 6, llm_hidden], feats_low [B, vision_hidden, g, g],
    feats_high [B, vision_hidden, g, g]) -> mask logits [B, C, out_res, out_res]`` with
    ``C = 1`` (S4, MS3, Ref-AVS: sigmoid > 0.5) or ``C = avss_classes`` when built with
    ``avss=True`` (AVSS: argmax). ``feats_low``/``feats_high`` are CLIP hidden states
    ``vision.mask_layers`` (14 and 22) of the frame to segment, see :func:`patches_to_grid`.
    """

    def __init__(self, config: CrabConfig, *, avss: bool = False) -> None:
        super().__init__()
        seg, vision = config.seg, config.vision
        if seg.num_scales != 2 or len(vision.mask_layers) != 2:
            raise OptionError(f"seg config: num_scales={seg.num_scales} with vision.mask_layers={vision.mask_layers}; "
                              "Crab's decoder is defined for exactly 2 scales (its level > 0 path assumes one "
                              "2x upsampling); set both to 2 scales")
        if seg.prompt_dim % 2:
            raise OptionError(f"seg config: prompt_dim={seg.prompt_dim} must be even (sin and cos halves)")
        self.config = config
        self.avss = avss
        self.grid = vision.grid
        self.num_classes = seg.avss_classes if avss else 1
        llm_hidden, dim = config.llm.hidden_size, seg.prompt_dim

        # Sequential inside a ModuleList: Crab's layout, so the keys match `text_hidden_fcs.0.{0,2}`.
        self.text_hidden_fcs = nn.ModuleList([nn.Sequential(
            nn.Linear(llm_hidden, llm_hidden), nn.ReLU(), nn.Linear(llm_hidden, dim))])
        self.no_mask_embed = nn.Embedding(1, dim)
        self.image_feature_neck = nn.Sequential(
            nn.Conv2d(vision.hidden_size, dim, kernel_size=1, bias=False),
            LayerNorm2d(dim),
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(dim),
        )
        level0_matrix, level1_matrix = fourier_matrices(dim // 2)
        self.pe_layer = FourierPositionalEncoding(level0_matrix)
        self.mask_decoder = MultiScaleMaskDecoder(seg, level1_matrix)
        self.register_load_state_dict_pre_hook(_keep_seeded_fourier_when_absent)

    @classmethod
    def from_preset(cls, name: str, *, avss: bool = False) -> "SegModule":
        return cls(preset(name), avss=avss)

    def _check_inputs(self, mask_hidden: Tensor, feats_low: Tensor, feats_high: Tensor) -> None:
        seg, llm_hidden = self.config.seg, self.config.llm.hidden_size
        if mask_hidden.dim() != 3 or mask_hidden.shape[1:] != (seg.num_mask_tokens, llm_hidden):
            raise ValueError(f"mask_hidden: expected [batch, {seg.num_mask_tokens}, {llm_hidden}], got "
                             f"{tuple(mask_hidden.shape)}; pass the hidden states of the last "
                             f"{seg.num_mask_tokens} <mask_i> tokens")
        expected = (self.config.vision.hidden_size, self.grid, self.grid)
        for name, feats in (("feats_low", feats_low), ("feats_high", feats_high)):
            if feats.dim() != 4 or feats.shape[1:] != expected or feats.shape[0] != mask_hidden.shape[0]:
                raise ValueError(f"{name}: expected [{mask_hidden.shape[0]}, {', '.join(map(str, expected))}], "
                                 f"got {tuple(feats.shape)}; reshape CLIP patches with patches_to_grid")

    def sparse_prompts(self, mask_hidden: Tensor) -> Tensor:
        """``[B, 6, llm_hidden]`` -> one prompt per level ``[B, num_scales, prompt_dim]`` (mean of its 3 tokens)."""
        seg = self.config.seg
        prompts = self.text_hidden_fcs[0](mask_hidden)
        prompts = prompts.reshape(prompts.shape[0], seg.num_scales, seg.tokens_per_scale, seg.prompt_dim)
        weight = 1.0 / seg.tokens_per_scale
        fused = weight * prompts[:, :, 0]
        for i in range(1, seg.tokens_per_scale):  # Crab's summation order
            fused = fused + weight * prompts[:, :, i]
        return fused

    def level_logits(self, mask_hidden: Tensor, feats_low: Tensor, feats_high: Tensor) -> list[Tensor]:
        """Per-level logits before the final resizes: ``[B, C, 2g, 2g]`` and ``[B, C, 4g, 4g]``."""
        self._check_inputs(mask_hidden, feats_low, feats_high)
        sparse = self.sparse_prompts(mask_hidden)
        batch, dim = sparse.shape[0], sparse.shape[-1]
        dense = self.no_mask_embed.weight.reshape(1, dim, 1, 1).expand(batch, dim, self.grid, self.grid)
        image_pe = self.pe_layer(self.grid, self.grid)
        logits: list[Tensor] = []
        for level, feats in enumerate((feats_low, feats_high)):
            logits.append(self.mask_decoder.predict_masks(
                level, self.image_feature_neck(feats), image_pe, sparse[:, level:level + 1], dense,
                logits[-1] if logits else None, self.avss))
        return logits

    def forward(self, mask_hidden: Tensor, feats_low: Tensor, feats_high: Tensor) -> Tensor:
        seg = self.config.seg
        weight = 1.0 / seg.num_scales
        low_res = None
        for logits in self.level_logits(mask_hidden, feats_low, feats_high):
            term = weight * _resize(logits, seg.low_res)
            low_res = term if low_res is None else low_res + term
        return _resize(low_res, seg.out_res)


def _keep_seeded_fourier_when_absent(module: SegModule, state_dict, prefix, *_) -> None:
    """A state dict without the Fourier matrices (as Crab's trainer saved them) keeps the seeded ones."""
    buffers = dict(module.named_buffers())
    absent = [key for key in FOURIER_KEYS if prefix + key not in state_dict]
    for key in absent:
        state_dict[prefix + key] = buffers[key].detach().clone()
    if absent:
        logger.debug("mask decoder: no %s in the weights; keeping the matrices seeded with %d",
                     " or ".join(absent), FOURIER_SEED)
