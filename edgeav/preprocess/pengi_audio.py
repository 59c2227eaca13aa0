"""Pengi's audio front end: resample to 44.1 kHz, then a fixed 7-s window for HTSAT.

The resampler is torchaudio's ``Resample`` with its defaults (windowed sinc, Hann window,
``lowpass_filter_width`` 6, ``rolloff`` 0.99), which Pengi's wrapper uses: both rates are
divided by their gcd (16 kHz -> 44.1 kHz is 160 -> 441), one kernel of ``441`` phases is
built in float64 and kept in float32, and an fp32 ``conv1d`` with stride 160 produces 441
output samples per 160 input samples; the output is cut to ``ceil(n * new / orig)``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from edgeav.errors import MediaError, OptionError

__all__ = ["fixed_window", "pengi_waveform", "resample", "sinc_resample_kernel"]

LOWPASS_FILTER_WIDTH = 6  # zero crossings of the sinc on each side
ROLLOFF = 0.99  # cutoff as a fraction of the lower rate's Nyquist frequency


@functools.lru_cache(maxsize=8)
def sinc_resample_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Hann-windowed sinc kernel [new, 1, 2 * width + orig] fp32 and its one-sided ``width``, for rates already
    divided by their gcd. Row ``j`` gives output sample ``j`` of each block of ``new`` from ``2 * width + orig``
    input samples."""
    cutoff = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig  # input times, in input blocks
    # Output offsets within a block. torchaudio divides an integer arange, which yields fp32 before the sum
    # promotes it to fp64; the same rounding is kept here.
    offsets = (torch.arange(0, -new, -1) / new).to(torch.float64)
    t = ((offsets[:, None] + taps[None, :]) * cutoff).clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = sinc * window * (cutoff / orig)
    return kernel.to(torch.float32)[:, None, :], width


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D fp32 signal, as torchaudio's ``Resample(orig_rate, new_rate)``; the
    input itself when the rates are equal."""
    if orig_rate <= 0 or new_rate <= 0 or int(orig_rate) != orig_rate or int(new_rate) != new_rate:
        raise OptionError(f"resampling {orig_rate} Hz -> {new_rate} Hz: rates must be positive integers")
    if orig_rate == new_rate:
        return samples
    gcd = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // gcd, int(new_rate) // gcd
    kernel, width = sinc_resample_kernel(orig, new)
    signal = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    padded = F.pad(signal[None, None], (width, width + orig))
    blocks = F.conv1d(padded, kernel, stride=orig)  # [1, new, blocks]: output j of every block
    out = blocks[0].T.reshape(-1)[: math.ceil(new * signal.shape[0] / orig)]
    return out.numpy()


def fixed_window(samples: np.ndarray, length: int) -> np.ndarray:
    """Exactly ``length`` samples: a signal no longer than that is tiled from its start and cut (Pengi's
    wrapper), a longer one loses equal parts at both ends (Pengi crops at a random start; edgeav takes the centre
    so a clip always gives the same caption)."""
    if samples.shape[0] <= length:
        return np.tile(samples, -(-length // samples.shape[0]))[:length]
    start = (samples.shape[0] - length) // 2
    return samples[start:start + length]


def pengi_waveform(samples: np.ndarray, rate: int, *, duration_s: int = 7, target_rate: int = 44100) -> np.ndarray:
    """Mono audio at ``rate`` -> fp32 [duration_s * target_rate], the waveform Pengi's HTSAT takes.

    Resampled as torchaudio's default ``Resample``, then tiled (shorter clips: a 1-s segment becomes that second
    seven times) or centre-cropped (longer clips; deterministic, unlike the original's random crop) to the window.
    """
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.shape[0] == 0:
        raise MediaError(f"Pengi audio of shape {samples.shape}: expected a non-empty mono signal [samples]; "
                         "mix the channels down first")
    if duration_s <= 0:
        raise OptionError(f"Pengi audio window of {duration_s} s: expected a positive whole number of seconds")
    resampled = resample(samples.astype(np.float32, copy=False), rate, target_rate)
    return np.ascontiguousarray(fixed_window(resampled, duration_s * target_rate), dtype=np.float32)
