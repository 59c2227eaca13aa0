"""SAM 2.1 image predictor: Hiera image encoder, SAM prompt encoder, SAM 2 mask decoder.

One component for every system that prompts SAM 2 on still frames (Crab+'s boxes and points,
OpenAVS's boxes). Parameter names equal the image-predictor keys of the released
``sam2.1_hiera_*.pt`` files (``image_encoder.*``, ``sam_prompt_encoder.*``, ``sam_mask_decoder.*``,
``no_mem_embed``); :func:`load_sam2_state_dict` drops the video-only parts of such a file.

Plain tensors in and out, as the released image predictor computes them:

- :meth:`Sam2.image_features`: pixels ``[1,3,S,S]`` (:func:`edgeav.preprocess.sam2.sam2_pixels`) ->
  :class:`Sam2Features` (stride-16 embedding with ``no_mem_embed`` added, stride-4/8 skip features);
- :meth:`Sam2.predict`: features + prompt points/labels (:func:`edgeav.preprocess.sam2.sam2_prompt`) ->
  one low-res mask logit map, its predicted IoU and the object score;
- :func:`masks_at`: low-res logits -> boolean masks at the requested size.

The single-mask answer falls back to the best of the three multimask answers when its logits are
unstable (``dynamic_multimask_via_stability``, on for image prediction as ``build_sam2`` sets it); the
choice is made with ``torch.where``, so shapes are static and the model exports to ONNX as traced.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import CheckpointError, OptionError
from edgeav.models.sam import MLP, LayerNorm2d, SamConfig, SamPromptEncoder, TwoWayTransformer
from edgeav.models.sam2_hiera import FpnNeck, Hiera, Sam2ImageEncoder
from edgeav.weight_files import read_weights

__all__ = ["SAM2_PRESETS", "SAM2_VIDEO_ONLY_KEYS", "Sam2", "Sam2Config", "Sam2Features", "Sam2MaskDecoder",
           "load_sam2_state_dict", "masks_at", "sam2_config", "sam2_state_dict_from_transformers"]

BACKBONE_STRIDE = 16  # the prompt encoder and decoder work on the stride-16 FPN level

# Top-level prefixes of a released checkpoint that only the video predictor reads (memory bank,
# object pointers); the image predictor never touches them.
SAM2_VIDEO_ONLY_KEYS = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc",
                        "no_obj_ptr", "no_obj_embed_spatial", "obj_ptr_proj.", "obj_ptr_tpos_proj.",
                        "mask_downsample.")


@dataclass(frozen=True)
class Sam2Config:
    """SAM 2.1 sizes. The defaults are ``sam2.1_hiera_l.yaml`` (``sam2.1_hiera_large.pt``)."""

    image_size: int = 1024
    # Hiera trunk: per-stage width, heads and block count (each stage halves the grid)
    stage_dims: tuple[int, ...] = (144, 288, 576, 1152)
    stage_heads: tuple[int, ...] = (2, 4, 8, 16)
    stages: tuple[int, ...] = (2, 6, 36, 4)
    global_att_blocks: tuple[int, ...] = (23, 33, 43)
    window_spec: tuple[int, ...] = (8, 4, 16, 8)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    mlp_ratio: float = 4.0
    # FPN neck (its width is also the prompt encoder's and the mask decoder's)
    d_model: int = 256
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    fpn_interp_model: str = "nearest"
    # prompt encoder
    mask_in_chans: int = 16
    # mask decoder
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    # derived
    backbone_channel_list: tuple[int, ...] = field(init=False)  # trunk outputs, coarsest first
    image_embedding_size: int = field(init=False)  # g: the decoder's grid is g x g
    low_res_size: int = field(init=False)  # the decoder's mask logits are low_res_size^2 (4g)

    def __post_init__(self) -> None:
        for name in ("stage_dims", "stage_heads", "stages", "global_att_blocks", "window_spec",
                     "window_pos_embed_bkg_spatial_size", "fpn_top_down_levels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        grid, depth, d = self.image_size // 4, sum(self.stages), self.d_model
        checks = [  # (broken, what is wrong); `or` short-circuits before any modulo by zero
            (len({len(self.stage_dims), len(self.stage_heads), len(self.stages), len(self.window_spec)}) != 1
             or len(self.stages) != 4, "stage_dims, stage_heads, stages and window_spec need one entry per "
             "stage, four stages (strides 4, 8, 16, 32)"),
            (self.image_size <= 0 or self.image_size % 32,
             f"image_size {self.image_size} is not a positive multiple of 32 (the coarsest stride)"),
            (any(h <= 0 or c % h for c, h in zip(self.stage_dims, self.stage_heads)),
             f"stage_heads {self.stage_heads} do not divide stage_dims {self.stage_dims}"),
            (self.window_spec[0] <= 0 or grid % self.window_spec[0], f"the first window "
             f"{self.window_spec[0]} does not tile the {grid}x{grid} stride-4 grid (its embedding is tiled)"),
            (any(not 0 <= i < depth for i in self.global_att_blocks),
             f"global_att_blocks {self.global_att_blocks} must lie in 0..{depth - 1}"),
            (self.fpn_interp_model not in ("nearest", "bilinear"),
             f"fpn_interp_model {self.fpn_interp_model!r} is not 'nearest' or 'bilinear'"),
            (d % 8 or self.decoder_num_heads <= 0 or d % self.decoder_num_heads
             or (d // self.attention_downsample_rate) % self.decoder_num_heads,
             f"d_model {d} must be a multiple of 8 with {self.decoder_num_heads} decoder heads dividing it "
             f"and its downsampled width"),
            (self.mask_in_chans % 4, f"mask_in_chans {self.mask_in_chans} is not a multiple of 4"),
        ]
        for broken, problem in checks:
            if broken:
                raise OptionError(f"Sam2Config: {problem}; change the config")
        object.__setattr__(self, "backbone_channel_list", self.stage_dims[::-1])
        object.__setattr__(self, "image_embedding_size", self.image_size // BACKBONE_STRIDE)
        object.__setattr__(self, "low_res_size", 4 * self.image_embedding_size)


SAM2_PRESETS: dict[str, Sam2Config] = {
    "sam2.1_hiera_large": Sam2Config(),
    "sam2.1_hiera_base_plus": Sam2Config(
        stage_dims=(112, 224, 448, 896), stage_heads=(2, 4, 8, 16), stages=(2, 3, 16, 3),
        global_att_blocks=(12, 16, 20), window_spec=(8, 4, 14, 7), window_pos_embed_bkg_spatial_size=(14, 14)),
    "sam2.1_hiera_small": Sam2Config(
        stage_dims=(96, 192, 384, 768), stage_heads=(1, 2, 4, 8), stages=(1, 2, 11, 2),
        global_att_blocks=(7, 10, 13), window_spec=(8, 4, 14, 7)),
    "sam2.1_hiera_tiny": Sam2Config(
        stage_dims=(96, 192, 384, 768), stage_heads=(1, 2, 4, 8), stages=(1, 2, 7, 2),
        global_att_blocks=(5, 7, 9), window_spec=(8, 4, 14, 7)),
    # Smallest useful random-weights model for tests (CRABPLUS_SPEC section 9). Windows of 14 and 7 on
    # grids of 16 and 8 are zero-padded, as hiera_t/s/b+ pad theirs at 1024.
    "tiny": Sam2Config(
        image_size=256, stage_dims=(16, 32, 64, 128), stage_heads=(1, 1, 2, 2), stages=(1, 1, 2, 1),
        global_att_blocks=(3,), window_spec=(8, 4, 14, 7), d_model=32, decoder_mlp_dim=64, decoder_num_heads=2,
        iou_head_hidden_dim=32),
}


def sam2_config(preset: str) -> Sam2Config:
    """The config of a named preset; an unknown name gets the list of known ones."""
    if preset not in SAM2_PRESETS:
        raise OptionError(f"SAM2 preset {preset!r} is unknown: expected one of {', '.join(SAM2_PRESETS)}")
    return SAM2_PRESETS[preset]


class Sam2Features(NamedTuple):
    """One image's features as the image predictor caches them (``set_image``)."""

    image_embed: Tensor  # [B, D, g, g]: stride-16 FPN level + no_mem_embed
    feat_s0: Tensor  # [B, D/8, 4g, 4g]: stride-4 level after the decoder's conv_s0
    feat_s1: Tensor  # [B, D/4, 2g, 2g]: stride-8 level after the decoder's conv_s1


class Sam2MaskDecoder(nn.Module):
    """SAM's two-way decoder plus an object-score token and stride-4/8 skips into the upscaler."""

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        dim = config.d_model
        self.config = config
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(config.decoder_depth, dim, config.decoder_num_heads,
                                             config.decoder_mlp_dim, config.attention_downsample_rate)
        for layer in self.transformer.layers:  # same ReLU MLP; SAM 2 names its linears layers.0/1
            layer.mlp = MLP(dim, config.decoder_mlp_dim, dim, 2)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        if config.pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.conv_s0 = nn.Conv2d(dim, dim // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(dim, dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3)
                                                       for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, config.iou_head_hidden_dim, self.num_mask_tokens,
                                       config.iou_head_depth)
        if config.pred_obj_scores:
            self.pred_obj_score_head = MLP(dim, dim, 1, 3) if config.pred_obj_scores_mlp else nn.Linear(dim, 1)

    def forward(self, features: Sam2Features, image_pe: Tensor, sparse: Tensor,
                dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (all mask logits ``[N,4,4g,4g]``, their IoU ``[N,4]``, object score logit ``[N,1]``).

        ``sparse`` ``[N,K,D]`` are the prompt tokens; ``dense`` ``[N or 1,D,g,g]`` (or broadcastable) the
        dense prompt. Features of one image (batch 1) serve all N prompts by broadcasting.
        """
        weights = [self.iou_token.weight, self.mask_tokens.weight]
        if self.config.pred_obj_scores:  # token order: [object score,] IoU, masks, prompts
            weights.insert(0, self.obj_score_token.weight)
        iou_index = len(weights) - 2
        output_tokens = torch.cat(weights, dim=0)
        tokens = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse.to(output_tokens.dtype)], dim=1)
        image = features.image_embed + dense
        grid = image.shape[-1]
        tokens_out, image_out = self.transformer(image, image_pe, tokens)
        mask_tokens_out = tokens_out[:, iou_index + 1:iou_index + 1 + self.num_mask_tokens, :]

        conv1, norm, act1, conv2, act2 = self.output_upscaling
        image_out = image_out.transpose(1, 2).unflatten(2, (grid, grid))
        upscaled = act1(norm(conv1(image_out) + features.feat_s1))
        upscaled = act2(conv2(upscaled) + features.feat_s0)  # [N, D/8, 4g, 4g]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                                for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper_in @ upscaled.flatten(2)).unflatten(2, upscaled.shape[-2:])

        iou = self.iou_prediction_head(tokens_out[:, iou_index, :])
        if self.config.iou_prediction_use_sigmoid:
            iou = torch.sigmoid(iou)
        if self.config.pred_obj_scores:
            object_score = self.pred_obj_score_head(tokens_out[:, 0, :])
        else:  # without the head the object is taken as present: sigmoid(10) ~ 1
            object_score = torch.full_like(iou[:, :1], 10.0)
        return masks, iou, object_score

    def select_single_mask(self, masks: Tensor, iou: Tensor) -> tuple[Tensor, Tensor]:
        """All four answers -> the single-mask answer ``[N,1,h,w]``, ``[N,1]``.

        With ``dynamic_multimask_via_stability``, a single mask whose area changes by more than
        ``1 - thresh`` between the logit thresholds -delta and +delta is replaced by the multimask
        answer of highest predicted IoU.
        """
        single, single_iou = masks[:, :1], iou[:, :1]
        if not self.config.dynamic_multimask_via_stability:
            return single, single_iou
        multi, multi_iou = masks[:, 1:], iou[:, 1:]
        best = multi_iou.argmax(dim=1, keepdim=True)  # [N, 1]
        best_mask = torch.gather(multi, 1, best[:, :, None, None].expand(-1, -1, *multi.shape[-2:]))
        best_iou = torch.gather(multi_iou, 1, best)
        delta = self.config.dynamic_multimask_stability_delta
        logits = single.flatten(2)
        inner = (logits > delta).sum(-1).float()
        outer = (logits > -delta).sum(-1).float()
        stability = torch.where(outer > 0, inner / outer.clamp(min=1), torch.ones_like(outer))  # [N, 1]
        stable = stability >= self.config.dynamic_multimask_stability_thresh
        return torch.where(stable[..., None, None], single, best_mask), torch.where(stable, single_iou, best_iou)


def _prompt_encoder_config(config: Sam2Config) -> SamConfig:
    """The SAM v1 config whose prompt encoder equals SAM 2's (only its prompt fields are read)."""
    return SamConfig(img_size=config.image_size, patch_size=BACKBONE_STRIDE, prompt_embed_dim=config.d_model,
                     out_chans=config.d_model, mask_in_chans=config.mask_in_chans,
                     decoder_num_heads=config.decoder_num_heads,
                     attention_downsample_rate=config.attention_downsample_rate)


class Sam2(nn.Module):
    """SAM 2.1's image-predictor parts: ``image_encoder``, ``sam_prompt_encoder``, ``sam_mask_decoder``."""

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        self.config = config
        trunk = Hiera(image_size=config.image_size, stage_dims=config.stage_dims, stage_heads=config.stage_heads,
                      stages=config.stages, global_att_blocks=config.global_att_blocks,
                      window_spec=config.window_spec,
                      window_pos_embed_bkg_spatial_size=config.window_pos_embed_bkg_spatial_size,
                      mlp_ratio=config.mlp_ratio)
        neck = FpnNeck(config.d_model, config.backbone_channel_list, config.fpn_top_down_levels,
                       config.fpn_interp_model)
        self.image_encoder = Sam2ImageEncoder(trunk, neck)
        self.sam_prompt_encoder = SamPromptEncoder(_prompt_encoder_config(config))
        self.sam_mask_decoder = Sam2MaskDecoder(config)
        # Learned "no memory" token, added to the stride-16 level when a frame has no video memory.
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, config.d_model))

    @classmethod
    def from_preset(cls, name: str, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> Sam2:
        """A randomly initialised model of a named preset (see :data:`SAM2_PRESETS`)."""
        with torch.device(device or "cpu"):
            model = cls(sam2_config(name))
        return model.to(dtype=dtype) if dtype is not None else model

    @classmethod
    def from_checkpoint(cls, path: str | Path, preset: str = "sam2.1_hiera_large", *,
                        device: torch.device | str = "cpu") -> Sam2:
        """Load ``sam2.1_hiera_*.pt`` (or a ``.safetensors`` in its layout) without running its code."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"SAM2 checkpoint {path}: no such file; pass the path of sam2.1_hiera_large.pt")
        state = read_weights(path)  # weights only; a damaged file is one CheckpointError line
        with torch.device("meta"):
            model = cls(sam2_config(preset))
        load_sam2_state_dict(model, state, source=str(path), assign=True)
        return model.to(device).eval()

    def image_features(self, pixels: Tensor) -> Sam2Features:
        """Normalised pixels ``[B,3,S,S]`` -> the features every prompt on this image reuses."""
        feat_s0, feat_s1, image_embed = self.image_encoder(pixels)
        decoder = self.sam_mask_decoder
        return Sam2Features(image_embed=image_embed + self.no_mem_embed.reshape(1, -1, 1, 1),
                            feat_s0=decoder.conv_s0(feat_s0), feat_s1=decoder.conv_s1(feat_s1))

    def predict(self, features: Sam2Features, points: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One mask per prompt row (``multimask_output=False``, with the stability fallback).

        points ``[N,P,2]`` (x, y) in model-input pixels and labels ``[N,P]`` (2/3 box corners,
        1 positive, 0 negative, -1 padding) exactly as the decoder sees them: no padding point is
        added here (:func:`edgeav.preprocess.sam2.sam2_prompt` appends it). Returns the unclamped
        low-res logits ``[N,1,4g,4g]``, predicted IoU ``[N,1]`` and object-score logit ``[N,1]``.
        """
        prompt = self.sam_prompt_encoder
        sparse = prompt.embed_points(points, labels)
        dense = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)  # no mask prompt: one vector everywhere
        masks, iou, object_score = self.sam_mask_decoder(features, prompt.dense_pe(), sparse, dense)
        masks, iou = self.sam_mask_decoder.select_single_mask(masks, iou)
        return masks, iou, object_score


def masks_at(low_res_logits: Tensor, size: tuple[int, int] = (224, 224), threshold: float = 0.0) -> Tensor:
    """Low-res logits ``[N,C,h,w]`` -> boolean masks ``[N,C,H,W]`` (bilinear, then ``> threshold``)."""
    logits = F.interpolate(low_res_logits.float(), (int(size[0]), int(size[1])), mode="bilinear",
                           align_corners=False)
    return logits > threshold


def load_sam2_state_dict(model: Sam2, state_dict: Mapping[str, Tensor], *, source: str = "state dict",
                         assign: bool = False) -> Sam2:
    """Load a released SAM 2 state dict (or the whole file with its ``model`` entry) into ``model``.

    Keys in :data:`SAM2_VIDEO_ONLY_KEYS` are dropped; every image-predictor key must be present
    with the model's shape, and no other key may appear.
    """
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"SAM2 {source}: holds a {type(state_dict).__name__}, not a state dict of "
                              "tensors; pass sam2.1_hiera_large.pt")
    if any(k.startswith("vision_encoder.") for k in state_dict):
        raise CheckpointError(f"SAM2 {source}: has transformers' Sam2Model key names; convert it with "
                              "edgeav.models.sam2.sam2_state_dict_from_transformers first")
    state = {k: v for k, v in state_dict.items() if not k.startswith(SAM2_VIDEO_ONLY_KEYS)}
    expected = model.state_dict()
    name = next((n for n, c in SAM2_PRESETS.items() if c == model.config), "configured")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"SAM2 {source}: keys do not fit the {name} model (missing {len(missing)}: "
                              f"{missing[:3]}, unexpected {len(unexpected)}: {unexpected[:3]}); pass the "
                              f"complete sam2.1 checkpoint of that size, or pick the preset that matches it")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"SAM2 {source}: {key} has shape {tuple(value.shape)}, the {name} model "
                                  f"expects {tuple(expected[key].shape)}; pick the preset that matches the file")
    model.load_state_dict(state, strict=True, assign=assign)
    return model


# transformers' Sam2Model names -> released names, applied in order after the MLP renumbering.
_FROM_TRANSFORMERS = [
    (r"^vision_encoder\.backbone\.", "image_encoder.trunk."),
    (r"^vision_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
    (r"^prompt_encoder\.", "sam_prompt_encoder."),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (r"^no_memory_embedding$", "no_mem_embed"),
    (r"patch_embed\.projection\.", "patch_embed.proj."),
    (r"shared_embedding\.positional_embedding$", "pe_layer.positional_encoding_gaussian_matrix"),
    (r"mask_embed\.conv1\.", "mask_downscaling.0."), (r"mask_embed\.layer_norm1\.", "mask_downscaling.1."),
    (r"mask_embed\.conv2\.", "mask_downscaling.3."), (r"mask_embed\.layer_norm2\.", "mask_downscaling.4."),
    (r"mask_embed\.conv3\.", "mask_downscaling.6."),
    (r"upscale_conv1\.", "output_upscaling.0."), (r"upscale_layer_norm\.", "output_upscaling.1."),
    (r"upscale_conv2\.", "output_upscaling.3."),
    (r"\.layer_norm([1-4])\.", r".norm\1."),
    (r"layer_norm_final_attn\.", "norm_final_attn."),
    (r"\.o_proj\.", ".out_proj."),
]
_FEED_FORWARD = re.compile(r"^(.*)\.(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$")


def sam2_state_dict_from_transformers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ``transformers.Sam2Model`` state dict (e.g. ``facebook/sam2.1-hiera-large`` safetensors) in the
    released layout that :func:`load_sam2_state_dict` takes.

    transformers keeps two copies of the prompt encoder's Fourier matrix; they must agree.
    """
    state = dict(state)
    dense_pe = state.pop("shared_image_embedding.positional_embedding", None)
    points_pe = state.get("prompt_encoder.shared_embedding.positional_embedding")
    if dense_pe is not None and points_pe is not None and not torch.equal(dense_pe, points_pe):
        raise CheckpointError("SAM2 transformers state dict: shared_image_embedding and prompt_encoder."
                              "shared_embedding differ, which the released layout cannot hold; use the "
                              "original sam2.1_hiera_*.pt instead")
    # Feed-forward stacks (proj_in, layers.0.., proj_out) become one list of linears, layers.0..L-1.
    stacks = {m.group(1) for m in map(_FEED_FORWARD.match, state) if m and m.group(2) == "proj_in"}
    middle = {prefix: 0 for prefix in stacks}
    for match in map(_FEED_FORWARD.match, state):
        if match and match.group(1) in stacks and match.group(3) is not None:
            middle[match.group(1)] = max(middle[match.group(1)], int(match.group(3)) + 1)
    out = {}
    for key, value in state.items():
        match = _FEED_FORWARD.match(key)
        if match and match.group(1) in stacks:
            prefix, part, index, kind = match.groups()
            position = {"proj_in": 0, "proj_out": middle[prefix] + 1}.get(part, int(index or 0) + 1)
            key = f"{prefix}.layers.{position}.{kind}"
        for pattern, replacement in _FROM_TRANSFORMERS:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    # One [4, D] table of point-label embeddings -> four [1, D] embeddings (labels 0..3).
    table = out.pop("sam_prompt_encoder.point_embed.weight", None)
    if table is not None:
        out.update({f"sam_prompt_encoder.point_embeddings.{i}.weight": row[None] for i, row in enumerate(table)})
    return out
