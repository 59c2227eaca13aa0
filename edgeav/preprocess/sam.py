"""SAM v1 front end: resize the longest side to the model's input size, normalise, pad.

As SAM's own predictor prepares an image (ULLAVA_SPEC section 5, "SAM path"): scale
``s = S / max(H, W)``, new size ``int(H*s + 0.5)`` x ``int(W*s + 0.5)``, PIL bilinear on the
uint8 image, ``(x - mean) / std`` with ImageNet statistics in 0..255 units, then zeros on the
bottom and right up to ``S x S``. Prompt coordinates follow the same scale (:func:`sam_coords`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from edgeav.errors import MediaError, OptionError

__all__ = ["SAM_MEAN", "SAM_SIZE", "SAM_STD", "sam_coords", "sam_pixels", "sam_resized_size"]

SAM_SIZE = 1024
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


def sam_resized_size(height: int, width: int, img_size: int = SAM_SIZE) -> tuple[int, int]:
    """(h, w) of an ``height x width`` image once its longest side is ``img_size``."""
    if img_size <= 0:
        raise OptionError(f"SAM img_size {img_size} must be positive; use the model config's img_size (1024)")
    if height <= 0 or width <= 0:
        raise MediaError(f"SAM image of size {height}x{width} is empty; pass a frame with pixels")
    scale = img_size * 1.0 / max(height, width)
    # At least one pixel: SAM's rounding gives 0 for a side under 1/2048 of the other (a 1x2049 strip).
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def sam_pixels(frame: np.ndarray, img_size: int = SAM_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 RGB ``[H,W,3]`` -> (float32 ``[1,3,img_size,img_size]``, the resized (h, w) before padding).

    Pass the (h, w) to :func:`edgeav.models.sam.postprocess_masks` as ``input_size``.
    """
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise MediaError(f"SAM frame: expected uint8 RGB of shape [H,W,3], got dtype={frame.dtype} "
                         f"shape={tuple(frame.shape)}; pass one decoded RGB frame")
    size = sam_resized_size(frame.shape[0], frame.shape[1], img_size)
    if size != frame.shape[:2]:
        frame = np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BILINEAR))
    mean = np.asarray(SAM_MEAN, np.float32)
    std = np.asarray(SAM_STD, np.float32)
    pixels = np.zeros((1, 3, img_size, img_size), np.float32)
    pixels[0, :, :size[0], :size[1]] = ((frame.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    return pixels, size


def sam_coords(coords: np.ndarray, original_size: tuple[int, int], img_size: int = SAM_SIZE) -> np.ndarray:
    """Source-pixel (x, y) pairs ``[..., 2]`` (points, or boxes as ``[N,2,2]``/``[N,4]``) -> model-input pixels.

    A box ``[N,4]`` (x0, y0, x1, y1) keeps its shape.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape[-1] % 2:
        raise ValueError(f"sam_coords: the last axis holds (x, y) pairs, got shape {tuple(coords.shape)}")
    height, width = original_size
    new_h, new_w = sam_resized_size(height, width, img_size)
    pairs = coords.reshape(*coords.shape[:-1], -1, 2).copy()
    pairs[..., 0] *= new_w / width
    pairs[..., 1] *= new_h / height
    return pairs.reshape(coords.shape).astype(np.float32)
