"""HTSAT, Pengi's audio encoder: a Swin transformer over a log-mel "image" it computes itself.

The inference path, for a waveform [B, samples] (Pengi feeds 7 s at 44.1 kHz, 308700 samples):

1. Power spectrogram by strided ``Conv1d`` against the stored DFT-times-Hann kernels
   (``spectrogram_extractor.stft.conv_real/conv_imag``; centred frames, reflect padding):
   ``samples // hop + 1`` frames (965 for 7 s), ``n_fft // 2 + 1`` bins.
2. Log-mel: ``10 * log10(max(power @ melW, 1e-10))`` with the stored ``logmel_extractor.melW``
   (ref 1.0, no top_db clamp) -> [B, 1, frames, mel_bins].
3. ``bn0`` over the mel axis with its running statistics (never batch statistics).
4. Pengi's "typical" branch (frames <= freq_ratio * spec_size; longer input is refused):
   bicubic ``align_corners`` interpolation of the time axis up to ``freq_ratio * spec_size``
   frames (965 -> 1024), then the ``freq_ratio`` time chunks are stacked along frequency:
   image row ``k * mel_bins + m``, column ``t`` holds frame ``k * spec_size + t``, bin ``m``.
5. ``patch_embed`` (4x4 conv, LayerNorm), four Swin stages (shifted windows with an additive
   -100 mask; a stage no larger than the window attends globally and never shifts; a 2x2
   patch merge after every stage but the last), final LayerNorm.
6. Token-semantic head (``enable_tscam``): the final token grid is regrouped so time runs
   chunk after chunk; ``embedding`` is the mean over all tokens (Pengi's ``latent_output``);
   ``clipwise_output`` is ``sigmoid(mean_t(tscam_conv(grid)))`` (its loss type is clip_bce).
   ``head`` is built and loaded but, as in Pengi's TSCAM branch, never applied.

Spec augmentation, mixup, the repeat mode and the attention heat map are training or
debugging paths Pengi leaves off at inference; they are absent here.

Pengi's wrapper passes its YAML values (44.1 kHz, fmax 8000) to the encoder, which ignores them:
the front end is built from HTSAT's own module config (32 kHz, fmin 50, fmax 14000, n_fft 1024,
hop 320, 64 bins) and the checkpoint's stored kernels replace it on load. The forward computes
from the stored ``conv_real``/``conv_imag``/``melW`` parameters, so whatever filter bank a
checkpoint holds is the one that runs; the config only sets their initial values.

Module and parameter names are those of Pengi's checkpoint under ``audio_encoder.base.`` (all
starting ``htsat.``), buffers included (``relative_position_index``, the shifted blocks'
``attn_mask``, ``bn0`` statistics), so ``load_state_dict`` is strict.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeav.errors import OptionError
from edgeav.models.grounding_dino_swin import (
    PatchMerging,
    SwinMlp,
    WindowAttention,
    shifted_window_mask,
    window_merge,
    window_partition,
)

__all__ = ["HTSAT", "HTSATConfig", "HTSAT_PRESETS", "HTSATSwinTransformer", "htsat_config",
           "slaney_mel_filters", "stft_kernels"]

# Pengi's log-mel floor (power below it reads as -100 dB); its reference power is 1 and it sets no top-dB clamp.
LOG_AMIN = 1e-10


def _require(holds: bool, problem: str) -> None:
    if not holds:
        raise OptionError(f"HTSATConfig: {problem}; change the config")


@dataclass(frozen=True)
class HTSATConfig:
    """HTSAT sizes; the defaults are Pengi's encoder (``HTSAT_Swin_Transformer`` defaults plus the
    front end of its module config)."""

    sample_rate: int = 44100  # rate the waveform must have (Pengi's data rate); the model never resamples
    mel_sample_rate: int = 32000  # rate the mel filter bank is designed for (Pengi's HTSAT module config)
    window_size: int = 1024  # n_fft = STFT window length
    hop_size: int = 320
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 14000.0
    spec_size: int = 256
    patch_size: int = 4
    patch_stride: tuple[int, int] = (4, 4)
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window: int = 8  # attention window (tokens per side)
    mlp_ratio: float = 4.0
    num_classes: int = 527
    enable_tscam: bool = True
    # derived
    freq_ratio: int = field(init=False)  # time chunks stacked along frequency
    num_features: int = field(init=False)  # embedding width (768 for Pengi)
    max_frames: int = field(init=False)  # longest log-mel the image holds (freq_ratio * spec_size)
    max_samples: int = field(init=False)  # longest waveform giving at most max_frames frames

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_stride", tuple(int(s) for s in self.patch_stride))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        stages = len(self.depths)
        stride = self.patch_stride[0] if len(self.patch_stride) == 2 else 0
        _require(self.enable_tscam, "enable_tscam must be true: Pengi reads the embedding (latent_output) that "
                 "only the token-semantic head produces")
        _require(stride > 0 and self.patch_stride == (stride, stride) and self.patch_size >= stride,
                 f"patch_stride {self.patch_stride} must be two equal positive strides, at most patch_size "
                 f"{self.patch_size}")
        _require(0 < self.mel_bins <= self.spec_size and self.spec_size % self.mel_bins == 0,
                 f"spec_size {self.spec_size} must be a multiple of mel_bins {self.mel_bins}")
        _require(stages > 0 and len(self.num_heads) == stages,
                 f"num_heads {self.num_heads} must give one head count per stage of depths {self.depths}")
        grid = self.spec_size // stride
        _require(self.spec_size % stride == 0 and grid > 0 and grid % 2 ** (stages - 1) == 0,
                 f"spec_size {self.spec_size} / stride {stride} must halve cleanly {stages - 1} times")
        ratio = self.spec_size // self.mel_bins
        last = grid // 2 ** (stages - 1)
        _require(last % ratio == 0, f"the last stage's {last} token rows must be a multiple of freq_ratio {ratio}")
        _require(all(h > 0 and (self.embed_dim * 2 ** i) % h == 0 for i, h in enumerate(self.num_heads)),
                 f"num_heads {self.num_heads} must divide the stage widths {self.embed_dim} * 2^i")
        _require(all(s <= self.window or s % self.window == 0 for s in (grid >> i for i in range(stages))),
                 f"every stage grid larger than the window {self.window} must be a multiple of it")
        object.__setattr__(self, "freq_ratio", ratio)
        object.__setattr__(self, "num_features", self.embed_dim * 2 ** (stages - 1))
        object.__setattr__(self, "max_frames", ratio * self.spec_size)
        object.__setattr__(self, "max_samples", ratio * self.spec_size * self.hop_size - 1)

    def to_dict(self) -> dict:
        """Plain JSON types (tuples become lists); :meth:`from_dict` inverts it."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, values: dict) -> HTSATConfig:
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OptionError(f"HTSATConfig: unknown fields {', '.join(unknown)}; expected some of "
                              f"{', '.join(sorted(known))}")
        return cls(**values)


HTSAT_PRESETS: dict[str, HTSATConfig] = {
    # Pengi base / base_no_text_enc: 31.3 M parameters (1.1 M of them the frozen STFT kernels).
    "pengi": HTSATConfig(),
    # Smallest useful random-weights encoder for tests (OPENAVS_SPEC section 9).
    "tiny": HTSATConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=10),
}


def htsat_config(preset: str) -> HTSATConfig:
    """The config of a named preset; an unknown name gets the known ones."""
    if preset not in HTSAT_PRESETS:
        close = difflib.get_close_matches(preset, HTSAT_PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(f"HTSAT preset {preset!r} is unknown{hint}: expected one of {', '.join(HTSAT_PRESETS)}")
    return HTSAT_PRESETS[preset]


# ---------------------------------------------------------------------------------------------
# Front end: the kernels Pengi's checkpoint stores, as its code initialises them


def stft_kernels(n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary one-sided DFT rows times a periodic Hann window, [n_fft // 2 + 1, 1, n_fft] fp32."""
    n = np.arange(n_fft)
    bins = np.arange(n_fft // 2 + 1)
    angle = 2 * np.pi * ((bins[:, None] * n[None, :]) % n_fft) / n_fft  # exact phase, no large-argument loss
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    real = torch.from_numpy((np.cos(angle) * hann).astype(np.float32))
    imag = torch.from_numpy((-np.sin(angle) * hann).astype(np.float32))
    return real[:, None, :], imag[:, None, :]


def slaney_mel_filters(sample_rate: int, n_fft: int, mel_bins: int, fmin: float, fmax: float) -> torch.Tensor:
    """Area-normalised triangular filters on the Slaney mel scale (librosa's default), [n_fft // 2 + 1, mel_bins]
    fp32."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        log_region = hz >= 1000.0
        mel = hz * 3.0 / 200.0
        return np.where(log_region, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mel)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), mel * 200.0 / 3.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(np.float64(fmin)), hz_to_mel(np.float64(fmax)), mel_bins + 2))
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    rising = (freqs[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - freqs[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(np.ascontiguousarray(weights.T).astype(np.float32))


class ConvSTFT(nn.Module):
    """Frames x DFT rows as two strided convolutions (the checkpoint stores the kernels)."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft = n_fft
        bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop, bias=False)
        real, imag = stft_kernels(n_fft)
        with torch.no_grad():
            self.conv_real.weight.copy_(real)
            self.conv_imag.weight.copy_(imag)
        self.requires_grad_(False)  # frozen in Pengi too

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, samples] -> real, imag [B, bins, frames] of centred (reflect-padded) frames."""
        half = self.n_fft // 2
        padded = F.pad(waveform[:, None, :], (half, half), mode="reflect")
        return self.conv_real(padded), self.conv_imag(padded)


class Spectrogram(nn.Module):
    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.stft = ConvSTFT(n_fft, hop)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> power [B, 1, frames, bins]."""
        real, imag = self.stft(waveform)
        return (real ** 2 + imag ** 2).transpose(1, 2)[:, None]


class LogmelFilterBank(nn.Module):
    def __init__(self, config: HTSATConfig):
        super().__init__()
        self.melW = nn.Parameter(slaney_mel_filters(config.mel_sample_rate, config.window_size, config.mel_bins,
                                                    config.fmin, config.fmax), requires_grad=False)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        """[..., bins] power -> [..., mel_bins] dB (ref 1, floor 1e-10, no top-db clamp)."""
        return 10.0 * torch.log10(torch.clamp(power @ self.melW, min=LOG_AMIN))


# ---------------------------------------------------------------------------------------------
# Swin stages with HTSAT's fixed resolutions (stored masks, windows shrunk to small stages)


class HTSATBlock(nn.Module):
    """Pre-LN Swin block on a fixed [height, width] token grid."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, shift: int,
                 mlp_ratio: float):
        super().__init__()
        if min(resolution) <= window:  # the whole grid is one window: no partition, no shift
            window, shift = min(resolution), 0
        self.resolution = resolution
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))
        # Stored in the checkpoint for shifted blocks; None (absent from the state dict) otherwise.
        self.register_buffer("attn_mask", shifted_window_mask(*resolution, window, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, channels = x.shape
        height, width = self.resolution
        h = self.norm1(x).view(batch, height, width, channels)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        mask = None if self.attn_mask is None else self.attn_mask.repeat(batch, 1, 1)
        h = window_merge(self.attn(window_partition(h, self.window), mask), self.window, batch, height, width)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(batch, height * width, channels)
        return x + self.mlp(self.norm2(x))


class HTSATStage(nn.Module):
    """``depth`` blocks (odd ones shifted by half a window), then a 2x2 patch merge unless last."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float, downsample: bool):
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            HTSATBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            height, width = self.resolution
            x = self.downsample(x, height, width, height // 2, width // 2)
        return x


class HTSATPatchEmbed(nn.Module):
    def __init__(self, config: HTSATConfig):
        super().__init__()
        padding = (config.patch_size - config.patch_stride[0]) // 2
        self.proj = nn.Conv2d(1, config.embed_dim, config.patch_size, stride=config.patch_stride, padding=padding)
        self.norm = nn.LayerNorm(config.embed_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 1, spec, spec] -> [B, tokens, embed_dim], row-major over the patch grid."""
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))


class HTSATSwinTransformer(nn.Module):
    """Pengi's ``htsat`` module: log-mel front end, bn0, Swin stages, token-semantic head."""

    def __init__(self, config: HTSATConfig):
        super().__init__()
        self.config = config
        self.spectrogram_extractor = Spectrogram(config.window_size, config.hop_size)
        self.logmel_extractor = LogmelFilterBank(config)
        self.bn0 = nn.BatchNorm2d(config.mel_bins)
        self.patch_embed = HTSATPatchEmbed(config)
        grid = config.spec_size // config.patch_stride[0]
        stages = len(config.depths)
        self.layers = nn.ModuleList(
            HTSATStage(config.embed_dim * 2 ** i, (grid >> i, grid >> i), config.depths[i], config.num_heads[i],
                       config.window, config.mlp_ratio, downsample=i < stages - 1)
            for i in range(stages))
        self.norm = nn.LayerNorm(config.num_features)
        last = grid >> (stages - 1)
        self.tscam_conv = nn.Conv2d(config.num_features, config.num_classes,
                                    kernel_size=(last // config.freq_ratio, 3), padding=(0, 1))
        self.head = nn.Linear(config.num_classes, config.num_classes)  # stored, unused by the TSCAM path
        self.apply(_init_weights)

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> [B, 1, samples // hop + 1, mel_bins] dB, from the stored kernels."""
        samples = waveform.shape[-1]
        c = self.config
        if waveform.dim() != 2 or not c.window_size // 2 < samples <= c.max_samples:
            raise OptionError(f"HTSAT waveform of shape {tuple(waveform.shape)}: expected [batch, samples] with "
                              f"{c.window_size // 2} < samples <= {c.max_samples} at {c.sample_rate} Hz; prepare it "
                              "with edgeav.preprocess.pengi_audio.pengi_waveform")
        return self.logmel_extractor(self.spectrogram_extractor(waveform))

    def spectrogram_image(self, log_mel: torch.Tensor) -> torch.Tensor:
        """bn0 then Pengi's reshape: [B, 1, frames, mel] -> [B, 1, spec_size, spec_size]."""
        c = self.config
        frames = log_mel.shape[2]
        if frames > c.max_frames or log_mel.shape[3] != c.mel_bins:
            raise OptionError(f"HTSAT log-mel of shape {tuple(log_mel.shape)}: expected at most {c.max_frames} "
                              f"frames of {c.mel_bins} bins; shorten the audio")
        bn = self.bn0  # running statistics always: this is the inference path
        x = F.batch_norm(log_mel.transpose(1, 3), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         False, 0.0, bn.eps).transpose(1, 3)
        if frames < c.max_frames:
            x = F.interpolate(x, (c.max_frames, c.mel_bins), mode="bicubic", align_corners=True)
        # [B, 1, T, M] -> rows k * M + m, columns t: time chunk k stacked above chunk k + 1
        x = x.view(x.shape[0], 1, c.freq_ratio, c.spec_size, c.mel_bins).permute(0, 1, 2, 4, 3)
        return x.reshape(x.shape[0], 1, c.freq_ratio * c.mel_bins, c.spec_size)

    def forward_log_mel(self, log_mel: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything after the spectrogram: [B, 1, frames, mel] dB -> embedding, clipwise_output."""
        c = self.config
        x = self.patch_embed(self.spectrogram_image(log_mel))
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        batch, tokens, channels = x.shape
        side = math.isqrt(tokens)
        rows_per_chunk = side // c.freq_ratio
        # token grid [C, rows, cols] -> [C, rows_per_chunk, chunks * cols]: chunks back in time order
        grid = x.transpose(1, 2).reshape(batch, channels, c.freq_ratio, rows_per_chunk, side)
        grid = grid.permute(0, 1, 3, 2, 4).reshape(batch, channels, rows_per_chunk, c.freq_ratio * side)
        embedding = grid.flatten(2).mean(-1)
        clipwise = torch.sigmoid(self.tscam_conv(grid).flatten(2).mean(-1))
        return {"embedding": embedding, "clipwise_output": clipwise}

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_log_mel(self.log_mel(waveform))


def _init_weights(module: nn.Module) -> None:
    """HTSAT's initialisation, so a random-weights model has the released one's scales."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)


class HTSAT(nn.Module):
    """Pengi's ``audio_encoder.base``: waveform [B, samples] at ``config.sample_rate`` -> ``embedding``
    [B, num_features] and ``clipwise_output`` [B, num_classes] (sigmoid)."""

    def __init__(self, config: HTSATConfig):
        super().__init__()
        self.config = config
        self.htsat = HTSATSwinTransformer(config)

    @classmethod
    def from_preset(cls, name: str) -> HTSAT:
        """A randomly initialised encoder of a named preset (see :data:`HTSAT_PRESETS`)."""
        return cls(htsat_config(name))

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.htsat(waveform)
