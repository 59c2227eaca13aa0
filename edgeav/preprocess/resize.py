"""Image resizes in numpy, computed as torch's ``F.interpolate`` computes them on the CPU (align_corners=False,
float32): bicubic with antialiasing (CLIP's frames) and plain bilinear (mask logits back to the source's size).

An exported engine runs without torch, so these replace ``F.interpolate`` there. Both follow ATen's CPU
kernels term by term: the same weights with the same float32/float64 promotions, separable passes (along
the width, then the height) and the same order of sums. They agree with torch to float32 rounding, not to
the bit: torch's compiled kernels fuse multiply-adds (``tests/test_torch_free.py`` compares them with
torch on random images).
"""

from __future__ import annotations

import math

import numpy as np

_F32 = np.float32
# Keys' cubic convolution with a = -0.5, the antialiasing filter of torch's bicubic (and Pillow's).
_A = _F32(-0.5)


def _cubic(x: np.ndarray) -> np.ndarray:
    """The antialiasing bicubic filter at float32 offsets ``x`` (ATen's ``aa_filter``, a = -0.5)."""
    x = np.abs(x)
    near = ((_A + _F32(2)) * x - (_A + _F32(3))) * x * x + _F32(1)
    far = ((_A * x - _F32(5) * _A) * x + _F32(8) * _A) * x - _F32(4) * _A
    return np.where(x < 1, near, np.where(x < 2, far, _F32(0))).astype(_F32)


def _antialiased_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index, the input indices [out, taps] and normalised float32 weights [out, taps] of an
    antialiased bicubic resize (ATen's ``_compute_indices_min_size_weights_aa``); unused taps weigh 0."""
    scale = _F32(in_size) / _F32(out_size)
    support = _F32(2.0 * float(scale)) if scale >= 1 else _F32(2.0)  # (interp_size / 2) * scale, in double
    taps = math.ceil(support) * 2 + 1
    invscale = _F32(1.0 / float(scale)) if scale >= 1 else _F32(1.0)
    out = np.arange(out_size)
    center = (float(scale) * (out + 0.5)).astype(_F32)  # a double product stored as float
    first = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    count = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size) - first
    count = np.clip(count, 0, taps)
    j = np.arange(taps)
    offsets = ((first[:, None] + j).astype(_F32) - center[:, None]).astype(np.float64) + 0.5
    weights = np.where(j < count[:, None], _cubic((offsets * float(invscale)).astype(_F32)), _F32(0))
    total = weights[:, 0].copy()
    for k in range(1, taps):  # summed in order, in float32, as ATen sums them
        total += weights[:, k]
    weights = np.where(total[:, None] != 0, weights / np.where(total == 0, _F32(1), total)[:, None], weights)
    indices = np.minimum(first[:, None] + j, in_size - 1)
    return indices, weights.astype(_F32)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index, the two input indices [out, 2] and float32 weights [out, 2] of a bilinear resize
    (ATen's ``compute_source_index_and_lambda``)."""
    scale = _F32(in_size) / _F32(out_size)
    source = (float(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(_F32)  # in double, stored as float
    source = np.where(source < 0, _F32(0), source)
    first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    right = np.clip(source - first.astype(_F32), _F32(0), _F32(1))
    second = first + (first < in_size - 1)
    return np.stack([first, second], 1), np.stack([_F32(1) - right, right], 1)


def _along(x: np.ndarray, axis: int, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``x`` resampled along ``axis``: each output is the in-order float32 sum of its taps."""
    shape = [1] * x.ndim
    shape[axis] = -1
    out = np.take(x, indices[:, 0], axis=axis) * weights[:, 0].reshape(shape)
    for k in range(1, indices.shape[1]):
        out += np.take(x, indices[:, k], axis=axis) * weights[:, k].reshape(shape)
    return out


def resize_bicubic_antialiased(x: np.ndarray, size: tuple[int, int], *, axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
    """float32 ``x`` resized to ``size`` (height, width) along ``axes`` as ``F.interpolate(mode="bicubic",
    antialias=True, align_corners=False)`` resizes it: the width first, then the height; an axis already at
    its size is left alone."""
    x = np.asarray(x, _F32)
    height_axis, width_axis = (a % x.ndim for a in axes)
    if x.shape[width_axis] != size[1]:
        x = _along(x, width_axis, *_antialiased_taps(x.shape[width_axis], size[1]))
    if x.shape[height_axis] != size[0]:
        x = _along(x, height_axis, *_antialiased_taps(x.shape[height_axis], size[0]))
    return x


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 ``x`` [..., H, W] resized to ``size`` (height, width) as ``F.interpolate(mode="bilinear",
    align_corners=False)`` resizes it: each output is ``(x00 w0 + x01 w1) h0 + (x10 w0 + x11 w1) h1``."""
    x = np.asarray(x, _F32)
    if x.shape[-1] != size[1]:
        x = _along(x, x.ndim - 1, *_linear_taps(x.shape[-1], size[1]))
    if x.shape[-2] != size[0]:
        x = _along(x, x.ndim - 2, *_linear_taps(x.shape[-2], size[0]))
    return x


__all__ = ["resize_bicubic_antialiased", "resize_bilinear"]
