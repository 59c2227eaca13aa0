"""Whisper log-mel front end as Qwen2.5-Omni's processor computes it (CRABPLUS_SPEC section 2, "Audio front end").

The processor pads every audio to 300 s with zeros, takes a centred (reflect-padded) STFT of the whole
padded array and keeps the first ``ceil(samples / 160)`` frames. Computing 300 s for a 10-s clip would be
wasteful, so here the waveform is zero-padded only as far as the frames that touch real samples reach:
those frames, and the dynamic-range maximum over them, are then exactly the processor's (every frame of
pure padding is at the ``log10(1e-10)`` floor and cannot raise the maximum).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from edgeav.errors import OptionError

__all__ = ["HOP_LENGTH", "N_FFT", "PADDED_SAMPLES", "SAMPLE_RATE", "frame_count", "log_mel", "mel_filters"]

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
PADDED_SAMPLES = 300 * SAMPLE_RATE  # Qwen2.5-Omni's chunk_length 300 s
_HALF_WINDOW = N_FFT // 2
# Zeros appended past the clip: enough that the right reflect padding mirrors only zeros and that every
# frame overlapping the clip is computed.
_TAIL_ZEROS = 2 * _HALF_WINDOW
_DYNAMIC_RANGE = 8.0  # log10 units kept below the loudest bin
_POWER_FLOOR = 1e-10


def frame_count(samples: int) -> int:
    """Valid mel frames for ``samples`` samples: the processor's attention mask sampled every hop."""
    return math.ceil(min(samples, PADDED_SAMPLES) / HOP_LENGTH)


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = 3.0 * hz / 200.0
    log_step = math.log(6.4) / 27.0
    above = hz >= 1000.0
    return np.where(above, 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) / log_step, mel)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_step = math.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)), 200.0 * mel / 3.0)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int = 128) -> np.ndarray:
    """[N_FFT//2+1, n_mels] slaney-normalised triangular filters on the slaney mel scale, 0 to 8 kHz."""
    edges_mel = np.linspace(_hz_to_slaney_mel(0.0), _hz_to_slaney_mel(SAMPLE_RATE / 2), n_mels + 2)
    edges_hz = _slaney_mel_to_hz(edges_mel)
    bin_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (bin_hz[:, None] - lower) / (centre - lower)
    falling = (upper - bin_hz[:, None]) / (upper - centre)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney normalisation: every filter has unit area in Hz.
    filters *= 2.0 / (upper - lower)
    filters.setflags(write=False)
    return filters


@functools.lru_cache(maxsize=None)
def _periodic_hann() -> np.ndarray:
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)
    window.setflags(write=False)
    return window


def log_mel(waveform: np.ndarray, *, n_mels: int = 128) -> np.ndarray:
    """Float 16 kHz mono samples -> Whisper log-mel float32 [n_mels, frame_count(samples)].

    Audio past 300 s is cut, as the processor truncates it.
    """
    samples = np.asarray(waveform)
    if samples.ndim != 1:
        raise OptionError(f"log_mel: waveform has shape {tuple(samples.shape)}; pass one mono channel [samples]")
    if samples.shape[0] == 0:
        raise OptionError("log_mel: waveform is empty; pass at least one sample of 16 kHz audio")
    # The processor casts to float32 before the STFT; the arithmetic below runs in float64.
    clip = samples[:PADDED_SAMPLES].astype(np.float32).astype(np.float64)
    tail = PADDED_SAMPLES - clip.shape[0]
    if tail <= _TAIL_ZEROS:
        # The clip reaches the end of the 300-s array: pad to it, the right edge is reflected.
        padded = np.concatenate([clip, np.zeros(tail)])
        right = padded[-_HALF_WINDOW - 1:-1][::-1]
    else:
        padded = np.concatenate([clip, np.zeros(_TAIL_ZEROS)])
        right = np.zeros(_HALF_WINDOW)
    left = padded[1:_HALF_WINDOW + 1][::-1]
    centred = np.concatenate([left, padded, right])
    frames = np.lib.stride_tricks.sliding_window_view(centred, N_FFT)[::HOP_LENGTH]
    if tail <= _TAIL_ZEROS:
        frames = frames[:-1]  # the processor drops the STFT's last frame
    spectrum = np.fft.rfft(frames * _periodic_hann(), axis=1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    log_spec = np.log10(np.maximum(power @ mel_filters(n_mels), _POWER_FLOOR)).T
    log_spec = np.maximum(log_spec, log_spec.max() - _DYNAMIC_RANGE)
    valid = frame_count(samples.shape[0])
    return ((log_spec[:, :valid] + 4.0) / 4.0).astype(np.float32)
