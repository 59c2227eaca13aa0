"""GroundingDINO (open-set detection from a caption), in the layout of the original release.

u-LLaVA (v1) turns the phrase it writes between ``[tag]`` and ``[/tag]`` into
boxes with the SwinT-OGC checkpoint; OpenAVS uses the same detector. Data flow:

    pixels [1,3,H,W] ─► Swin-T (stages 2-4) ─► 1x1 conv + GroupNorm per level, + one stride-2 level
    caption ids ─► BERT with phrase-local attention ─► feat_map (768->256)
    ─► encoder (fusion, text enhancer, deformable attention) ─► top-900 proposals ─► decoder
    ─► pred_logits [1, 900, 256] (query . token similarity), pred_boxes [1, 900, 4] (cx, cy, w, h in [0, 1])

Parameter names are those of IDEA-Research's ``groundingdino_swint_ogc.pth``
(its ``model`` dict): ``backbone.0.*`` (Swin), ``bert.*``, ``feat_map``,
``input_proj.*``, ``transformer.*``, ``bbox_embed.*``. The release stores its
one shared box head under both ``bbox_embed.{i}`` and
``transformer.decoder.bbox_embed.{i}``; here too one module sits at both paths.
The release's ``class_embed`` and ``transformer.enc_out_class_embed`` hold no
weights (query . token similarity): here they are :func:`token_similarity`.
Keys the model does not use (``bert.pooler.*``, BERT's position-id buffer, a
``module.`` prefix) are dropped by the load pre-hook next to the model.

:func:`detect` turns the outputs into boxes as the original ``predict`` does.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edgeav.errors import CheckpointError, OptionError
from edgeav.models.grounding_dino_swin import SwinBackbone
from edgeav.models.grounding_dino_text import BertTextEncoder, phrase_attention
from edgeav.models.grounding_dino_transformer import (
    GroundingTransformer,
    inverse_sigmoid,
    sine_embedding,
    token_similarity,
)

__all__ = ["GroundedBox", "GroundingDINO", "GroundingDINOConfig", "PRESETS", "TwoPassGroupNorm", "detect",
           "read_original_checkpoint"]

BOX_THRESHOLD = 0.25
TEXT_THRESHOLD = 0.2  # u-LLaVA's REC code (the GroundingDINO demo uses 0.25)


@dataclass(frozen=True)
class GroundingDINOConfig:
    # Swin image backbone
    swin_embed_dim: int = 96
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_num_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window_size: int = 7
    swin_patch_size: int = 4
    swin_mlp_ratio: float = 4.0
    swin_out_indices: tuple[int, ...] = (1, 2, 3)  # 0-based stages: Swin-T's 2, 3, 4
    # BERT text encoder (bert-base-uncased)
    text_vocab_size: int = 30522
    text_hidden_size: int = 768
    text_num_layers: int = 12
    text_num_heads: int = 12
    text_intermediate_size: int = 3072
    text_max_positions: int = 512
    text_type_vocab_size: int = 2
    text_layer_norm_eps: float = 1e-12
    special_token_ids: tuple[int, ...] = (101, 102, 1012, 1029)  # [CLS] [SEP] . ? in bert-base-uncased
    # encoder-decoder
    d_model: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_queries: int = 900
    num_feature_levels: int = 4
    encoder_points: int = 4
    decoder_points: int = 4
    max_text_len: int = 256
    position_temperature: float = 20.0
    # derived
    backbone_channels: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        stages = len(self.swin_depths)
        channels = tuple(self.swin_embed_dim * 2 ** i for i in self.swin_out_indices)
        object.__setattr__(self, "backbone_channels", channels)
        problems = []
        if len(self.swin_num_heads) != stages:
            problems.append(f"swin_num_heads has {len(self.swin_num_heads)} entries for {stages} stages")
        if not self.swin_out_indices or any(not 0 <= i < stages for i in self.swin_out_indices):
            problems.append(f"swin_out_indices {self.swin_out_indices} must name stages 0..{stages - 1}")
        if self.num_feature_levels < len(self.swin_out_indices):
            problems.append(f"num_feature_levels {self.num_feature_levels} < {len(self.swin_out_indices)} "
                            "backbone outputs")
        if self.d_model % 32:
            problems.append(f"d_model {self.d_model} must be a multiple of 32 (GroupNorm with 32 groups)")
        if self.num_heads < 2 or self.num_heads % 2 or self.d_model % self.num_heads:
            problems.append(f"num_heads {self.num_heads} must be even and divide d_model {self.d_model}")
        if self.ffn_dim % self.num_heads:
            problems.append(f"ffn_dim {self.ffn_dim} must be divisible by num_heads {self.num_heads}")
        if self.num_decoder_layers < 1 or self.num_encoder_layers < 1:
            problems.append("num_encoder_layers and num_decoder_layers must be >= 1")
        if problems:
            raise OptionError("GroundingDINO config: " + "; ".join(problems) + ". Fix the config values.")

    @classmethod
    def from_preset(cls, name: str) -> GroundingDINOConfig:
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(f"GroundingDINO preset {name!r} is unknown{hint}: expected one of "
                              f"{', '.join(sorted(PRESETS))}.")
        return PRESETS[name]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


PRESETS: dict[str, GroundingDINOConfig] = {
    # groundingdino_swint_ogc.pth: Swin-T, BERT-base, 6+6 layers, 900 queries (~172 M parameters)
    "swint_ogc": GroundingDINOConfig(),
    # random-weights test model (ULLAVA_SPEC section 10); 2 decoder layers so the shared box head is exercised
    "tiny": GroundingDINOConfig(
        swin_embed_dim=16, swin_depths=(1, 1, 1, 1), swin_num_heads=(1, 1, 2, 2), swin_window_size=7,
        text_hidden_size=32, text_num_layers=1, text_num_heads=2, text_intermediate_size=64,
        d_model=32, num_heads=4, ffn_dim=64, num_encoder_layers=1, num_decoder_layers=2, num_queries=20,
        encoder_points=2, decoder_points=2, max_text_len=32),
}


class TwoPassGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters) with the variance taken around the mean, in fp32 at least.

    torch's CPU kernel loses about two digits on near-constant maps, which plain pictures give
    (8e-3 on a level whose values vary by 0.04 around 0.5); this stays at float32 rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.float().unflatten(1, (self.num_groups, -1))
        dims = tuple(range(2, groups.ndim))
        centred = groups - groups.mean(dims, keepdim=True)
        normed = (centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + self.eps)).flatten(1, 2)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (normed * self.weight.float().view(shape) + self.bias.float().view(shape)).to(x.dtype)


class GroundingDINO(nn.Module):
    """(pixels, pixel mask, caption ids) -> (pred_logits [B, Q, max_text_len], pred_boxes [B, Q, 4])."""

    def __init__(self, config: GroundingDINOConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.d_model
        # index 0: the release wraps Swin and its (weightless) position encoding in one Sequential
        self.backbone = nn.ModuleList([SwinBackbone(
            cfg.swin_embed_dim, cfg.swin_depths, cfg.swin_num_heads, cfg.swin_window_size,
            cfg.swin_patch_size, cfg.swin_mlp_ratio, cfg.swin_out_indices)])
        self.bert = BertTextEncoder(
            cfg.text_vocab_size, cfg.text_hidden_size, cfg.text_num_layers, cfg.text_num_heads,
            cfg.text_intermediate_size, cfg.text_max_positions, cfg.text_type_vocab_size, cfg.text_layer_norm_eps)
        self.feat_map = nn.Linear(cfg.text_hidden_size, d)
        projections = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), TwoPassGroupNorm(32, d))
                       for c in cfg.backbone_channels]
        in_channels = cfg.backbone_channels[-1]
        for _ in range(cfg.num_feature_levels - len(cfg.backbone_channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1),
                                             TwoPassGroupNorm(32, d)))
            in_channels = d
        self.input_proj = nn.ModuleList(projections)
        self.transformer = GroundingTransformer(
            d, cfg.num_heads, cfg.ffn_dim, cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.num_queries,
            cfg.num_feature_levels, cfg.encoder_points, cfg.decoder_points, cfg.max_text_len)
        self.bbox_embed = self.transformer.decoder.bbox_embed  # same module at both release paths
        self.register_buffer("special_ids", torch.tensor(cfg.special_token_ids), persistent=False)
        self.register_load_state_dict_pre_hook(_drop_unused_release_keys)

    @classmethod
    def from_preset(cls, name: str) -> GroundingDINO:
        return cls(GroundingDINOConfig.from_preset(name))

    def encode_text(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ids [B, L] -> (text features [B, L, d_model], phrase mask [B, L, L], position ids [B, L])."""
        mask, position_ids = phrase_attention(input_ids, self.special_ids)
        hidden = self.bert(input_ids, token_type_ids, position_ids, mask)
        return self.feat_map(hidden), mask, position_ids

    def image_levels(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        """-> per level: projected maps [B, d, h, w], padding [B, h, w] (True = padding), sine positions."""
        features = self.backbone[0](pixel_values)
        sources = [proj(f) for proj, f in zip(self.input_proj, features)]
        for proj in self.input_proj[len(features):]:
            sources.append(proj(features[-1] if len(sources) == len(features) else sources[-1]))
        padding = pixel_mask == 0
        paddings = [F.interpolate(padding[None].float(), size=s.shape[-2:])[0].bool() for s in sources]
        positions = [self.position_embedding(pad).to(s.dtype) for pad, s in zip(paddings, sources)]
        return sources, paddings, positions

    def position_embedding(self, padding: torch.Tensor) -> torch.Tensor:
        """[B, h, w] padding -> [B, d, h, w]: sine of the normalised (y, x) position of each valid cell."""
        valid = (~padding).float()
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps)
        x = x / (x[:, :, -1:] + eps)
        half = self.config.d_model // 2
        pos = sine_embedding(torch.stack([y, x], -1), half, self.config.position_temperature)
        return pos.permute(0, 3, 1, 2)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B,3,H,W] normalised; pixel_mask [B,H,W] (1 = image, 0 = padding); input_ids,
        attention_mask (1 = token, 0 = padding), token_type_ids [B,L]; tokens past max_text_len are cut."""
        limit = self.config.max_text_len
        input_ids, attention_mask, token_type_ids = (t[:, :limit] for t in (input_ids, attention_mask, token_type_ids))
        text, text_mask, position_ids = self.encode_text(input_ids, token_type_ids)
        text_padding = attention_mask == 0
        sources, paddings, positions = self.image_levels(pixel_values, pixel_mask)
        # class logits compare the queries with the encoder's text, not BERT's
        queries, reference, text = self.transformer(sources, paddings, positions, text, text_padding,
                                                    position_ids, text_mask)
        logits = token_similarity(queries, text, text_padding, self.config.max_text_len)
        boxes = (self.bbox_embed[-1](queries) + inverse_sigmoid(reference)).sigmoid()
        return logits, boxes


def _drop_unused_release_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
    """Accept the release's ``model`` dict as saved: strip ``module.``, drop what inference never reads."""
    for key in [k for k in state_dict if k.startswith(prefix + "module.")]:
        state_dict[prefix + key[len(prefix) + len("module."):]] = state_dict.pop(key)
    unused = tuple(prefix + name for name in
                   ("bert.pooler.", "bert.embeddings.position_ids", "bert.embeddings.token_type_ids"))
    for key in [k for k in state_dict if k.startswith(unused)]:
        del state_dict[key]


def read_original_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model`` dict of a released ``groundingdino_*.pth``, read without executing code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GroundingDINO checkpoint {path} does not exist: pass the path of "
                              "groundingdino_swint_ogc.pth.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file it cannot unpickle safely
        raise CheckpointError(f"GroundingDINO checkpoint {path} cannot be read safely ({type(e).__name__}): "
                              "use the released .pth or a plain state-dict file.") from e
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"GroundingDINO checkpoint {path} holds no state dict of tensors: expected the "
                              "release's {{'model': {{name: tensor}}}}.")
    return state


class GroundedBox(NamedTuple):
    box_xyxy: tuple[float, float, float, float]  # pixels of the original image
    score: float  # the query's highest token probability
    phrase: str  # the caption tokens above the text threshold, "." removed


def detect(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, input_ids, image_size: tuple[int, int],
           decode, box_threshold: float = BOX_THRESHOLD, text_threshold: float = TEXT_THRESHOLD) -> list[GroundedBox]:
    """Boxes whose best token probability passes ``box_threshold``, in query order, as the release's ``predict``.

    pred_logits [1, Q, T] or [Q, T]; pred_boxes [1, Q, 4] or [Q, 4] (cx, cy, w, h in [0, 1]); input_ids the
    caption's token ids; image_size (height, width) of the original image; ``decode(ids) -> str`` the
    tokenizer's decoder (special tokens kept, word pieces joined).
    """
    for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
        if not 0.0 <= value <= 1.0:
            raise OptionError(f"{name}={value} is outside [0, 1]: pass a probability.")
    probs = pred_logits.detach().float().reshape(-1, pred_logits.shape[-1]).sigmoid()
    boxes = pred_boxes.detach().float().reshape(-1, 4)
    ids = [int(i) for i in torch.as_tensor(input_ids).reshape(-1).tolist()]
    height, width = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    results = []
    for query in torch.nonzero(probs.max(-1).values > box_threshold).flatten().tolist():
        token_probs = probs[query]
        # [CLS] and the last slot never name a phrase (the release's posmap window)
        chosen = [i for i in torch.nonzero(token_probs > text_threshold).flatten().tolist()
                  if 0 < i < probs.shape[-1] - 1 and i < len(ids)]
        cx, cy, w, h = (boxes[query] * scale).tolist()
        results.append(GroundedBox((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
                                   float(token_probs.max()), decode([ids[i] for i in chosen]).replace(".", "")))
    return results
