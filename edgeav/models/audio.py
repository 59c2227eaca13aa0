"""BEATs audio encoder as Crab runs it (CRAB_SPEC section 2, "Audio encoder").

Input is Crab's normalised fbank ``[B, T, 128]`` (``edgeav.preprocess.fbank.crab_fbank``:
``(fbank - 15.41663) / (2 * 6.55582)``), never a waveform. The computation:

1. 16x16 patches: ``Conv2d(1, embed_dim, 16, stride 16)`` over (time, mel); the
   ``T mod 16`` trailing frames are dropped, tokens are time-major (t * 8 + f),
   so 98 frames give 6 x 8 = 48 tokens and 198 give 12 x 8 = 96.
2. LayerNorm over the patch features, ``post_extract_proj`` to the encoder width.
3. Convolutional positional embedding: grouped ``Conv1d`` (kernel ``conv_pos``,
   padding ``conv_pos // 2``) with weight normalisation over dim 2, SamePad (drop
   the last frame for an even kernel), GELU, added to the input.
4. ``encoder.layer_norm`` here when ``layer_norm_first`` is false (post-LN), else
   after the last layer.
5. Transformer layers. Layer 0 owns the bucketed relative position table; the
   bias it gives is shared by every layer, each scaling it by its own GRU gate.
   Deep-norm multiplies both residuals by ``(2 * num_layers) ** 0.25``.

The output is the last layer's hidden states ``[B, T', hidden]``. Crab passes an
all-False padding mask, which changes nothing, so there is none here; layerdrop
and dropout never run.

Parameter names are those of the released checkpoint's ``model`` dict (Microsoft
unilm ``beats/``), so ``load_state_dict(checkpoint["model"])`` works strict; the
pre-hooks next to the modules that need them drop the fine-tuned classifier
(``predictor.*``) and the per-layer copies of the shared relative position table.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgeav.config import AudioConfig
from edgeav.errors import OptionError

__all__ = [
    "BeatsEncoder",
    "BeatsEncoderConfig",
    "BeatsSelfAttention",
    "WeightNormConv1d",
    "beats_config_from_checkpoint_cfg",
    "relative_position_buckets",
]

logger = logging.getLogger("edgeav")

# BEATs divides q by this before q.k and multiplies the max-subtracted scores back:
# it keeps fp16 scores in range and is part of the reference arithmetic.
SCORE_SHRINK = 32.0

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # BEATs evaluates its "gelu" in fp32 whatever the input dtype.
    "gelu": lambda x: F.gelu(x.float()).type_as(x),
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BeatsEncoderConfig:
    """Everything the encoder's shape and arithmetic depend on.

    ``audio`` holds the sizes; the other fields are BEATs switches that
    :class:`~edgeav.config.AudioConfig` does not carry. Their defaults are the values
    of the released Crab checkpoint, so ``BeatsEncoderConfig(audio=AudioConfig())`` is
    that model.
    """

    audio: AudioConfig = field(default_factory=AudioConfig)
    conv_bias: bool = False
    layer_norm_first: bool = False
    relative_position_embedding: bool = True
    activation_fn: str = "gelu"
    # Always 0: Crab forces it, and an inference runtime runs every layer. Kept so the
    # resolved config echoes what runs.
    encoder_layerdrop: float = 0.0

    def __post_init__(self) -> None:
        a = self.audio
        if self.encoder_layerdrop != 0.0:
            raise OptionError(f"audio encoder: encoder_layerdrop={self.encoder_layerdrop} is a training "
                              "option; edgeav runs every layer, set it to 0")
        if self.activation_fn not in _ACTIVATIONS:
            raise OptionError(f"audio encoder: activation_fn {self.activation_fn!r} is not supported; "
                              f"expected one of {', '.join(_ACTIVATIONS)}")
        if a.deep_norm and self.layer_norm_first:
            raise OptionError("audio encoder: deep_norm and layer_norm_first are both set; BEATs allows "
                              "deep_norm only with post-LN layers, turn one of them off")
        if a.hidden_size % a.num_heads:
            raise OptionError(f"audio encoder: hidden_size {a.hidden_size} is not a multiple of num_heads "
                              f"{a.num_heads}; choose sizes that divide")
        if a.hidden_size % a.conv_pos_groups:
            raise OptionError(f"audio encoder: hidden_size {a.hidden_size} is not a multiple of "
                              f"conv_pos_groups {a.conv_pos_groups}; choose sizes that divide")
        if a.mel_bins < a.patch_size:
            raise OptionError(f"audio encoder: mel_bins {a.mel_bins} is smaller than patch_size "
                              f"{a.patch_size}; no frequency patch fits")
        if self.relative_position_embedding:
            exact = a.num_buckets // 4
            if exact < 1 or a.max_distance <= exact:
                raise OptionError(f"audio encoder: num_buckets={a.num_buckets}, max_distance={a.max_distance} "
                                  "leave no logarithmic buckets; need num_buckets >= 4 and "
                                  "max_distance > num_buckets // 4")

    @property
    def residual_scale(self) -> float:
        """Deep-norm's alpha: the factor on both residual branches of a post-LN layer."""
        return (2 * self.audio.num_layers) ** 0.25 if self.audio.deep_norm else 1.0

    @property
    def freq_patches(self) -> int:
        return self.audio.mel_bins // self.audio.patch_size

    def num_tokens(self, num_frames: int) -> int:
        """Tokens for ``num_frames`` fbank frames: 98 -> 48, 198 -> 96 with 16x16 patches of 128 bins."""
        return (num_frames // self.audio.patch_size) * self.freq_patches


# Keys of the released checkpoint's ``cfg`` that fix the network. The released files
# carry all of them; a missing one means a foreign or truncated cfg, and BEATs' own
# defaults for them (max_distance 1280, deep_norm off, ...) would build another model.
_REQUIRED_CFG_KEYS = (
    "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "input_patch_size", "embed_dim", "conv_bias", "conv_pos", "conv_pos_groups",
    "relative_position_embedding", "num_buckets", "max_distance", "gru_rel_pos", "deep_norm",
    "layer_norm_first",
)
_BOOL_CFG_KEYS = frozenset({"conv_bias", "relative_position_embedding", "gru_rel_pos", "deep_norm",
                            "layer_norm_first"})


def beats_config_from_checkpoint_cfg(cfg: Mapping) -> BeatsEncoderConfig:
    """Encoder config from the ``cfg`` dict stored in a released BEATs checkpoint.

    The keys of ``_REQUIRED_CFG_KEYS`` must be present; ``activation_fn`` defaults to
    ``"gelu"`` as in BEATs; training-only keys (dropouts, ``layer_wise_gradient_decay_ratio``,
    ``predictor_*``, ``finetuned_model``) are ignored; ``encoder_layerdrop`` is forced to 0
    as Crab does. ``mel_bins`` stays 128 (BEATs' fbank) and LayerNorm eps 1e-5 (BEATs uses
    torch's default).
    """
    if not isinstance(cfg, Mapping):
        raise OptionError(f"BEATs checkpoint cfg: expected a dict, got {type(cfg).__name__}; pass "
                          "checkpoint['cfg'] of a BEATs .pt file")
    missing = [key for key in _REQUIRED_CFG_KEYS if key not in cfg]
    if missing:
        raise OptionError(f"BEATs checkpoint cfg: missing key {missing[0]!r}"
                          + (f" (and {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else "")
                          + "; a released BEATs cfg carries it, check that the file is a BEATs checkpoint")
    values = {}
    for key in _REQUIRED_CFG_KEYS:
        value = cfg[key]
        expected = bool if key in _BOOL_CFG_KEYS else int
        # bool is an int subclass: a flag where a size belongs (or the reverse) is an error.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise OptionError(f"BEATs checkpoint cfg: {key}={value!r} should be {expected.__name__}; "
                              "check that the file is a BEATs checkpoint")
        values[key] = value
    audio = AudioConfig(
        patch_size=values["input_patch_size"],
        patch_embed_dim=values["embed_dim"],
        hidden_size=values["encoder_embed_dim"],
        num_layers=values["encoder_layers"],
        num_heads=values["encoder_attention_heads"],
        intermediate_size=values["encoder_ffn_embed_dim"],
        conv_pos=values["conv_pos"],
        conv_pos_groups=values["conv_pos_groups"],
        num_buckets=values["num_buckets"],
        max_distance=values["max_distance"],
        gru_rel_pos=values["gru_rel_pos"],
        deep_norm=values["deep_norm"],
    )
    return BeatsEncoderConfig(
        audio=audio,
        conv_bias=values["conv_bias"],
        layer_norm_first=values["layer_norm_first"],
        relative_position_embedding=values["relative_position_embedding"],
        activation_fn=cfg.get("activation_fn", "gelu"),
        encoder_layerdrop=0.0,
    )



def beats_checkpoint_cfg(cfg: BeatsEncoderConfig) -> dict:
    """The ``cfg`` dict a BEATs checkpoint of this shape carries (inverse of the reader above)."""
    a = cfg.audio
    return {
        "encoder_layers": a.num_layers, "encoder_embed_dim": a.hidden_size,
        "encoder_ffn_embed_dim": a.intermediate_size, "encoder_attention_heads": a.num_heads,
        "input_patch_size": a.patch_size, "embed_dim": a.patch_embed_dim, "conv_bias": cfg.conv_bias,
        "conv_pos": a.conv_pos, "conv_pos_groups": a.conv_pos_groups,
        "relative_position_embedding": cfg.relative_position_embedding, "num_buckets": a.num_buckets,
        "max_distance": a.max_distance, "gru_rel_pos": a.gru_rel_pos, "deep_norm": a.deep_norm,
        "layer_norm_first": cfg.layer_norm_first, "activation_fn": cfg.activation_fn, "encoder_layerdrop": 0.0,
    }

def relative_position_buckets(relative_positions: torch.Tensor, num_buckets: int,
                              max_distance: int) -> torch.Tensor:
    """BEATs' bidirectional T5-style bucket of each ``key - query`` offset (int64 tensor).

    Half the buckets per direction, positive offsets in the upper half. Within a half
    of ``n = num_buckets // 2`` buckets, distances below ``e = n // 2`` get their own
    bucket, larger ones ``e + trunc(log(d / e) / log(max_distance / e) * (n - e))`` in
    float32, capped at ``n - 1``. Pure tensor arithmetic, so it exports.
    """
    half = num_buckets // 2
    max_exact = half // 2
    direction = (relative_positions > 0).to(torch.long) * half
    distance = relative_positions.abs()
    # Clamping only touches distances that take the exact branch; it keeps log(0) out of the graph.
    far = distance.clamp(min=max_exact).float()
    log_bucket = max_exact + (torch.log(far / max_exact) / math.log(max_distance / max_exact)
                              * (half - max_exact)).to(torch.long)
    log_bucket = log_bucket.clamp(max=half - 1)
    return direction + torch.where(distance < max_exact, distance, log_bucket)


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose weight is ``weight_v * weight_g / ||weight_v||`` (norm over dims 0, 1).

    The arithmetic of ``torch.nn.utils.weight_norm(conv, dim=2)``, written out so the
    parameters keep the checkpoint's names ``weight_g`` [1, 1, K] and ``weight_v``
    [C, C / groups, K] and the graph traces as plain ops.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding = kernel_size // 2
        self.groups = groups
        # BEATs' initialisation; checkpoints overwrite it.
        weight = torch.randn(channels, channels // groups, kernel_size) * math.sqrt(4.0 / (kernel_size * channels))
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(_norm_except_dim2(weight))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_load_state_dict_pre_hook(_accept_parametrized_weight_norm)

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / _norm_except_dim2(self.weight_v))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.conv1d(hidden, self.weight(), self.bias, padding=self.padding, groups=self.groups)


def _norm_except_dim2(weight: torch.Tensor) -> torch.Tensor:
    return weight.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()


def _accept_parametrized_weight_norm(module, state_dict, prefix, *_) -> None:
    """Rename torch's ``parametrizations.weight.original0/1`` (new weight_norm API) to ``weight_g/_v``."""
    for old, new in (("parametrizations.weight.original0", "weight_g"),
                     ("parametrizations.weight.original1", "weight_v")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class SamePad(nn.Module):
    """Drop the extra last frame an even kernel with ``padding = k // 2`` produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, :, :-self.remove] if self.remove else hidden


class BeatsSelfAttention(nn.Module):
    """Multi-head self-attention with BEATs' score scaling and GRU-gated relative position bias."""

    def __init__(self, cfg: BeatsEncoderConfig, owns_position_table: bool):
        super().__init__()
        a = cfg.audio
        width = a.hidden_size
        self.num_heads = a.num_heads
        self.head_dim = width // a.num_heads
        self.scaling = self.head_dim ** -0.5
        self.num_buckets = a.num_buckets
        self.max_distance = a.max_distance
        self.gru_rel_pos = a.gru_rel_pos
        if owns_position_table:
            self.relative_attention_bias = nn.Embedding(a.num_buckets, a.num_heads)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        if a.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, a.num_heads, 1, 1))

    def position_bias(self, length: int | torch.SymInt) -> torch.Tensor:
        """[heads, length, length] bias from the bucket table (layer 0 only)."""
        positions = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_buckets(positions[None, :] - positions[:, None],
                                            self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def rel_pos_gate(self, query: torch.Tensor) -> torch.Tensor:
        """Per-query gate [B, heads, T, 1] on the position bias, from the unscaled ``query`` [B, heads, T, d].

        ``grep_linear`` gives 8 values summed in two groups of 4 into ``a``, ``b``;
        gate = ``sigmoid(a) * (sigmoid(b) * grep_a - 1) + 2`` (1.5 + grep_a / 4 when
        ``grep_linear`` is all zero).
        """
        gates = torch.sigmoid(self.grep_linear(query).unflatten(-1, (2, 4)).sum(-1))
        gate_a, gate_b = gates[..., 0:1], gates[..., 1:2]
        return gate_a * (gate_b * self.grep_a - 1.0) + 2.0

    def forward(self, hidden: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        """``hidden`` [B, T, W], ``position_bias`` [heads, T, T] or None -> [B, T, W]."""
        q, k, v = (proj(hidden).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = torch.matmul(q * self.scaling * (1.0 / SCORE_SHRINK), k.transpose(-1, -2))
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * SCORE_SHRINK
        if position_bias is not None:
            if self.gru_rel_pos:
                # BEATs recovers the unscaled query as q * 32 / scaling; q itself is that value.
                position_bias = self.rel_pos_gate(q) * position_bias
            scores = scores + position_bias
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        attended = torch.matmul(probs, v).transpose(1, 2).flatten(2)
        return self.out_proj(attended)


class BeatsEncoderLayer(nn.Module):
    """Attention + FFN; post-LN with deep-norm residual scaling, or pre-LN (``layer_norm_first``)."""

    def __init__(self, cfg: BeatsEncoderConfig, index: int):
        super().__init__()
        a = cfg.audio
        self.layer_norm_first = cfg.layer_norm_first
        self.residual_scale = cfg.residual_scale
        self.activation = _ACTIVATIONS[cfg.activation_fn]
        self.self_attn = BeatsSelfAttention(cfg, owns_position_table=cfg.relative_position_embedding and index == 0)
        self.self_attn_layer_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.fc1 = nn.Linear(a.hidden_size, a.intermediate_size)
        self.fc2 = nn.Linear(a.intermediate_size, a.hidden_size)
        self.final_layer_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), position_bias)
            return hidden + self.fc2(self.activation(self.fc1(self.final_layer_norm(hidden))))
        hidden = self.self_attn_layer_norm(hidden * self.residual_scale + self.self_attn(hidden, position_bias))
        return self.final_layer_norm(hidden * self.residual_scale + self.fc2(self.activation(self.fc1(hidden))))


class BeatsTransformer(nn.Module):
    """Positional convolution, encoder LayerNorm and the layers, under ``encoder.`` in the checkpoint."""

    def __init__(self, cfg: BeatsEncoderConfig):
        super().__init__()
        a = cfg.audio
        self.layer_norm_first = cfg.layer_norm_first
        self.relative_position_embedding = cfg.relative_position_embedding
        self.pos_conv = nn.Sequential(WeightNormConv1d(a.hidden_size, a.conv_pos, a.conv_pos_groups),
                                      SamePad(a.conv_pos), nn.GELU())
        self.layers = nn.ModuleList(BeatsEncoderLayer(cfg, index) for index in range(a.num_layers))
        self.layer_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.register_load_state_dict_pre_hook(_drop_shared_table_copies)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.pos_conv(hidden.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            hidden = self.layer_norm(hidden)
        position_bias = (self.layers[0].self_attn.position_bias(hidden.shape[1])
                         if self.relative_position_embedding else None)
        for layer in self.layers:
            hidden = layer(hidden, position_bias)
        if self.layer_norm_first:
            hidden = self.layer_norm(hidden)
        return hidden


_TABLE = "self_attn.relative_attention_bias.weight"


def _drop_shared_table_copies(module: BeatsTransformer, state_dict, prefix, *_) -> None:
    """Drop ``layers.{i>0}.self_attn.relative_attention_bias.weight``.

    BEATs shares layer 0's table by assigning the same module to every layer, so its
    state dict (and the released checkpoint) lists one identical copy per layer.
    A copy that differs from layer 0's is refused: BEATs would silently use the last one.
    """
    if not module.relative_position_embedding:
        return  # leave any table key to surface as unexpected
    first = f"{prefix}layers.0.{_TABLE}"
    for index in range(1, len(module.layers)):
        key = f"{prefix}layers.{index}.{_TABLE}"
        if key not in state_dict:
            continue
        copy = state_dict.pop(key)
        if first in state_dict and not torch.equal(copy, state_dict[first]):
            raise OptionError(f"BEATs state dict: {key} differs from {first}; BEATs shares one relative "
                              "position table across layers, so this is not a BEATs checkpoint as released. "
                              "Keep layer 0's table and drop the copies")


class BeatsEncoder(nn.Module):
    """BEATs on Crab's normalised fbank: ``[B, T, mel_bins]`` -> last-layer states ``[B, T', hidden]``.

    Build it from an :class:`~edgeav.config.AudioConfig` (the released switches
    assumed), a :class:`BeatsEncoderConfig`, or a checkpoint ``cfg``.
    """

    def __init__(self, cfg: AudioConfig | BeatsEncoderConfig, classes: int = 0):
        """``classes`` > 0 keeps the fine-tuned checkpoint's classifier (``predictor``, AudioSet's 527 for
        the released fine-tuned BEATs) for :meth:`classify`; 0 drops it on load, as Crab reads only the states."""
        super().__init__()
        if isinstance(cfg, AudioConfig):
            cfg = BeatsEncoderConfig(audio=cfg)
        elif not isinstance(cfg, BeatsEncoderConfig):
            raise OptionError(f"audio encoder: expected an AudioConfig or BeatsEncoderConfig, got "
                              f"{type(cfg).__name__}")
        self.cfg = cfg
        a = cfg.audio
        self.patch_embedding = nn.Conv2d(1, a.patch_embed_dim, kernel_size=a.patch_size, stride=a.patch_size,
                                         bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(a.patch_embed_dim, eps=a.layer_norm_eps)
        # BEATs has no projection when the patch width already is the encoder width.
        self.post_extract_proj = (nn.Linear(a.patch_embed_dim, a.hidden_size)
                                  if a.patch_embed_dim != a.hidden_size else None)
        self.encoder = BeatsTransformer(cfg)
        if classes:
            self.predictor = nn.Linear(a.hidden_size, classes)
        else:
            self.register_load_state_dict_pre_hook(_drop_classifier_head)

    @classmethod
    def from_checkpoint_cfg(cls, cfg: Mapping) -> "BeatsEncoder":
        return cls(beats_config_from_checkpoint_cfg(cfg))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "BeatsEncoder":
        """Build and load a released BEATs ``.pt`` (``{"cfg": ..., "model": ...}``), read without executing code."""
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as error:  # missing; not a weights-only pickle
            raise OptionError(f"BEATs checkpoint {os.fspath(path)!r}: cannot be read ({error}); pass the "
                              "released .pt file") from error
        if not isinstance(checkpoint, Mapping) or "cfg" not in checkpoint or "model" not in checkpoint:
            raise OptionError(f"BEATs checkpoint {os.fspath(path)!r}: expected a dict with 'cfg' and 'model', "
                              "as the released BEATs .pt files are")
        encoder = cls.from_checkpoint_cfg(checkpoint["cfg"])
        encoder.load_state_dict(checkpoint["model"], strict=True)
        return encoder.eval()

    def num_tokens(self, num_frames: int) -> int:
        return self.cfg.num_tokens(num_frames)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """``fbank`` [B, T, mel_bins], normalised as ``crab_fbank`` does -> [B, (T // 16) * 8, hidden]."""
        a = self.cfg.audio
        if fbank.ndim != 3 or fbank.shape[2] != a.mel_bins:
            raise ValueError(f"fbank: expected shape [batch, frames, {a.mel_bins}], got {list(fbank.shape)}; "
                             "compute it with edgeav.preprocess.fbank.crab_fbank and stack segments")
        if fbank.shape[1] < a.patch_size:
            raise ValueError(f"fbank: {fbank.shape[1]} frames is fewer than one {a.patch_size}-frame patch; "
                             f"pass at least {a.patch_size} frames")
        patches = self.patch_embedding(fbank.unsqueeze(1).to(self.patch_embedding.weight.dtype))
        hidden = self.layer_norm(patches.flatten(2).transpose(1, 2))  # time-major tokens: t * freq_patches + f
        if self.post_extract_proj is not None:
            hidden = self.post_extract_proj(hidden)
        return self.encoder(hidden)


    def classify(self, fbank: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, classes] of the fine-tuned head: the head on every token, averaged over
        the tokens, then a sigmoid (BEATs' own inference with no padding)."""
        return torch.sigmoid(self.predictor(self(fbank)).mean(dim=1))


def _drop_classifier_head(module: BeatsEncoder, state_dict, prefix, *_) -> None:
    """Drop the fine-tuned checkpoint's AudioSet classifier (``predictor.*``); Crab reads the hidden states."""
    head = [key for key in state_dict if key.startswith(prefix + "predictor.")]
    for key in head:
        del state_dict[key]
    if head:
        logger.debug("BEATs: dropped %d classifier-head tensors (%s)", len(head), ", ".join(head))
