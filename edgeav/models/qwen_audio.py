"""Qwen2.5-Omni audio tower (Whisper-large-v3 shaped), as Crab+ runs it (CRABPLUS_SPEC section 2, "Audio encoder").

Input is one audio's Whisper log-mel ``[n_mels, L]`` (``edgeav.preprocess.whisper_mel.log_mel``). The frames
are cut into chunks of ``2 * n_window`` (2 s); each chunk runs alone up to the pooling:

1. ``conv1`` (k3, p1) + GELU, ``conv2`` (k3, stride 2, p1) + GELU: a chunk of ``c`` frames gives
   ``(c-1)//2 + 1`` tokens. A short last chunk is convolved at its own length, which is what the
   reference's zeroing of ``conv1``'s output past the chunk amounts to.
2. The sinusoidal table, restarting at position 0 in every chunk.
3. Pre-LN transformer layers whose attention is block-diagonal: a token sees only its chunk.

Then, over the whole audio: adjacent token pairs averaged (an odd last token dropped), ``ln_post``,
``proj``. ``audio_token_count`` gives the output length before anything runs.

All chunk bookkeeping is Python arithmetic on the input's shape, so the module traces for export at a
fixed ``L``; full chunks are batched into one attention call, the short last chunk gets a second one.

Parameter names are those under ``thinker.audio_tower.`` in the released Qwen2.5-Omni safetensors, so a
prefix strip loads strict. ``audio_bos_eos_token`` is kept only so that it loads: the thinker never reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import CheckpointError, OptionError

__all__ = ["QwenAudioConfig", "QwenAudioEncoder", "SinusoidalPositions", "audio_token_count"]


@dataclass(frozen=True)
class QwenAudioConfig:
    """Sizes of the audio tower; the defaults are Qwen2.5-Omni-7B's."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    n_window: int = 100  # half a chunk, in mel frames
    output_dim: int = 3584  # the thinker's hidden size
    max_source_positions: int = 1500  # rows of the sinusoidal table

    def __post_init__(self) -> None:
        if self.d_model % self.encoder_attention_heads or self.d_model % 2:
            raise OptionError(
                f"QwenAudioConfig: d_model {self.d_model} must be even and divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}; fix the audio config"
            )
        if chunk_tokens(self) > self.max_source_positions:
            raise OptionError(
                f"QwenAudioConfig: a chunk of {2 * self.n_window} frames gives {chunk_tokens(self)} tokens, more "
                f"than max_source_positions {self.max_source_positions}; lower n_window"
            )

    @classmethod
    def from_hf(cls, audio_config: Mapping[str, Any]) -> QwenAudioConfig:
        """From the ``thinker_config.audio_config`` section of a Qwen2.5-Omni ``config.json``."""
        activation = audio_config.get("activation_function", "gelu")
        if activation != "gelu":
            raise CheckpointError(
                f"audio_config.activation_function is {activation!r}; this encoder implements 'gelu' only "
                "(Qwen2.5-Omni's value): use a Qwen2.5-Omni checkpoint"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in audio_config.items() if k in known})

    def to_hf(self) -> dict[str, Any]:
        """The ``audio_config`` section :meth:`from_hf` reads (the fields carry Qwen2.5-Omni's names)."""
        return {**asdict(self), "activation_function": "gelu"}


def chunk_tokens(cfg: QwenAudioConfig) -> int:
    """Tokens of one full chunk after the stride-2 conv (100 for 200 frames)."""
    return (2 * cfg.n_window - 1) // 2 + 1


def audio_token_count(mel_frames: int) -> int:
    """Output tokens for ``mel_frames`` frames: stride-2 conv, then pair pooling (1 s -> 25, 5 s -> 125)."""
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class SinusoidalPositions(nn.Module):
    """Whisper's fixed ``[sin | cos]`` table, timescales 1 to 10000; computed, never loaded."""

    def __init__(self, length: int, channels: int, max_timescale: float = 10000.0) -> None:
        super().__init__()
        half = channels // 2
        inv_timescales = torch.exp(-math.log(max_timescale) / (half - 1) * torch.arange(half, dtype=torch.float32))
        angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
        self.register_buffer("positional_embedding", torch.cat([angles.sin(), angles.cos()], dim=1), persistent=False)
        self.register_load_state_dict_pre_hook(_drop_saved_table)

    def forward(self, length: int) -> Tensor:
        return self.positional_embedding[:length]


def _drop_saved_table(module, state_dict, prefix, *_) -> None:
    """A file that stores the table gets it ignored: the reference recomputes it too."""
    state_dict.pop(prefix + "positional_embedding", None)


class QwenAudioAttention(nn.Module):
    """Multi-head self-attention within consecutive chunks of ``chunk`` tokens (the last may be shorter)."""

    def __init__(self, cfg: QwenAudioConfig) -> None:
        super().__init__()
        dim = cfg.d_model
        self.num_heads = cfg.encoder_attention_heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, hidden: Tensor, chunk: int) -> Tensor:
        tokens = hidden.shape[0]
        full = tokens // chunk * chunk
        q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        # One batched call over the full chunks, one for the short last chunk.
        spans = [(0, full, chunk)] if full else []
        if tokens > full:
            spans.append((full, tokens, tokens - full))
        out = [self._attend(q[a:b], k[a:b], v[a:b], size) for a, b, size in spans]
        return self.out_proj(torch.cat(out, dim=0) if len(out) > 1 else out[0])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, size: int) -> Tensor:
        # [n*size, dim] -> [n, heads, size, head_dim]
        q, k, v = (x.unflatten(0, (-1, size)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).flatten(2).flatten(0, 1)


class QwenAudioEncoderLayer(nn.Module):
    """Pre-LN block: chunked self-attention, then a GELU MLP."""

    def __init__(self, cfg: QwenAudioConfig) -> None:
        super().__init__()
        self.self_attn = QwenAudioAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, hidden: Tensor, chunk: int) -> Tensor:
        hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), chunk)
        return hidden + self.fc2(F.gelu(self.fc1(self.final_layer_norm(hidden))))


class QwenAudioEncoder(nn.Module):
    """One audio's log-mel ``[n_mels, L]`` -> ``[audio_token_count(L), output_dim]`` thinker embeddings."""

    def __init__(self, cfg: QwenAudioConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = SinusoidalPositions(cfg.max_source_positions, dim)
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.layers = nn.ModuleList(QwenAudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, cfg.output_dim)

    def forward(self, mel: Tensor) -> Tensor:
        cfg = self.cfg
        if mel.ndim != 2 or mel.shape[0] != cfg.num_mel_bins:
            raise OptionError(
                f"QwenAudioEncoder: mel has shape {tuple(mel.shape)}; pass one audio as [{cfg.num_mel_bins}, frames]"
            )
        frames = mel.shape[1]
        count = audio_token_count(frames)
        if count < 1:
            raise OptionError(
                f"QwenAudioEncoder: mel has {frames} frames, too few for one token; pass at least 3 (0.02 s of audio)"
            )
        mel = mel.to(self.conv1.weight.dtype)
        chunk_frames = 2 * cfg.n_window
        full = frames // chunk_frames * chunk_frames
        # Full chunks as one batch [n, n_mels, chunk_frames], the short last chunk as a batch of one.
        groups = [mel[:, :full].unflatten(1, (-1, chunk_frames)).transpose(0, 1)] if full else []
        if frames > full:
            groups.append(mel[None, :, full:])
        hidden = torch.cat([self._embed_chunks(group) for group in groups], dim=0)
        for layer in self.layers:
            hidden = layer(hidden, chunk_tokens(cfg))
        pooled = hidden[: 2 * count].unflatten(0, (count, 2)).mean(dim=1)
        return self.proj(self.ln_post(pooled))

    def _embed_chunks(self, chunks: Tensor) -> Tensor:
        """[n, n_mels, c] chunks of equal length -> [n * tokens, d_model], positions restarting per chunk."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(chunks)))).transpose(1, 2)
        x = x + self.positional_embedding(x.shape[1]).to(x.dtype)
        return x.flatten(0, 1)
