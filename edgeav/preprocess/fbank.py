"""BEATs' audio front end: Kaldi-compatible 128-bin log-mel fbank, normalised as BEATs
and Crab do."""
from __future__ import annotations

import functools

import numpy as np

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582

_SR = 16000
_FRAME_LEN = 400      # 25 ms
_FRAME_SHIFT = 160    # 10 ms
_NFFT = 512           # frame length rounded up to a power of two
_NUM_MEL = 128
_LOW_FREQ = 20.0
_PREEMPH = 0.97
_EPS = float(np.finfo(np.float32).eps)


def _mel(f):
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=None)
def _mel_banks(num_bins: int = _NUM_MEL) -> np.ndarray:
    """[NFFT//2+1, num_bins] triangular weights in Kaldi's mel scale (Nyquist bin gets 0).

    With 128 bins at 16 kHz / 512-point FFT, bin 3 covers no FFT bin and is all zero:
    Kaldi itself refuses this config, torchaudio (hence BEATs/Crab) silently emits log(eps).
    """
    mel_lo, mel_hi = _mel(_LOW_FREQ), _mel(_SR / 2)
    delta = (mel_hi - mel_lo) / (num_bins + 1)
    b = np.arange(num_bins)[:, None]
    left, center, right = mel_lo + b * delta, mel_lo + (b + 1) * delta, mel_lo + (b + 2) * delta
    m = _mel(np.arange(_NFFT // 2) * (_SR / _NFFT))[None, :]
    up, down = (m - left) / (center - left), (right - m) / (right - center)
    w = np.where((m > left) & (m < right), np.where(m <= center, up, down), 0.0)
    w = np.ascontiguousarray(np.concatenate([w, np.zeros((num_bins, 1))], axis=1).T)
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=None)
def _povey_window() -> np.ndarray:
    n = np.arange(_FRAME_LEN)
    w = (0.5 - 0.5 * np.cos(2 * np.pi * n / (_FRAME_LEN - 1))) ** 0.85
    w.setflags(write=False)
    return w


def fbank(waveform: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """Mono float waveform in [-1,1] at 16 kHz -> Kaldi log-mel fbank float32 [T,128]."""
    return _kaldi_fbank(waveform, sample_rate, _NUM_MEL)


def _kaldi_fbank(waveform: np.ndarray, sample_rate: int, num_bins: int) -> np.ndarray:
    if sample_rate != _SR:
        raise ValueError(f"fbank expects sample_rate={_SR}, got {sample_rate}")
    x = np.asarray(waveform)
    if x.ndim != 1:
        raise ValueError(f"fbank expects a 1-D waveform [N], got shape {tuple(x.shape)}")
    if x.shape[0] < _FRAME_LEN:
        raise ValueError(f"fbank needs at least {_FRAME_LEN} samples, got {x.shape[0]}")
    x = x.astype(np.float64) * 32768.0
    t = 1 + (x.shape[0] - _FRAME_LEN) // _FRAME_SHIFT  # snip_edges=True
    frames = np.lib.stride_tricks.sliding_window_view(x, _FRAME_LEN)[::_FRAME_SHIFT][:t]
    frames = frames - frames.mean(axis=1, keepdims=True)
    # Kaldi pre-emphasis: the first sample is pre-emphasised against itself.
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - _PREEMPH * prev) * _povey_window()
    spec = np.fft.rfft(frames, n=_NFFT, axis=1)
    power = spec.real ** 2 + spec.imag ** 2
    mel = power @ _mel_banks(num_bins)
    return np.log(np.maximum(mel, _EPS)).astype(np.float32)


def crab_fbank(waveform: np.ndarray) -> np.ndarray:
    """fbank normalised the way Crab/BEATs does: (fb - mean) / (2 * std)."""
    return ((fbank(waveform) - FBANK_MEAN) / (2 * FBANK_STD)).astype(np.float32)


def crab_fbank_batch(windows: np.ndarray) -> np.ndarray:
    """[S, N] waveforms -> [S, T, 128] normalised fbank."""
    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise ValueError(f"crab_fbank_batch expects [S, N], got shape {tuple(windows.shape)}")
    if windows.shape[0] == 0:
        return np.zeros((0, 1 + (windows.shape[1] - _FRAME_LEN) // _FRAME_SHIFT, _NUM_MEL), np.float32)
    return np.stack([crab_fbank(w) for w in windows]).astype(np.float32, copy=False)
