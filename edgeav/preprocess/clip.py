"""CLIP's pixel front end: uint8 frames -> CLIP-normalised float32 at 224x224 (numpy only: exported
engines run without torch)."""

from __future__ import annotations

import numpy as np

from edgeav.preprocess.resize import resize_bicubic_antialiased

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(frames: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    """uint8 RGB [F,H,W,3] (or [H,W,3]) -> CLIP-normalised float32 [F,3,size,size].

    Frames of another size are resized as torch's antialiased bicubic ``F.interpolate`` resizes them,
    then rounded back to pixel levels (as a resize to uint8 would).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(
            "clip_pixels expects uint8 frames of shape [F,H,W,3] or [H,W,3], "
            f"got dtype={frames.dtype} shape={tuple(frames.shape)}")
    if frames.ndim == 3:
        frames = frames[None]
    x = frames.astype(np.float32)
    if x.shape[1:3] != (size, size):
        x = resize_bicubic_antialiased(x, (size, size), axes=(1, 2))
        x = np.round(np.clip(x, 0, 255))
    pixels = (x / np.float32(255.0) - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    # A view, channels last in memory as torch laid out the permuted frames: a torch model sees the same tensor.
    return pixels.transpose(0, 3, 1, 2)


def clip_crop_pixels(frame: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    """uint8 RGB [H,W,3] -> CLIP-normalised float32 [1,3,size,size] as ``CLIPImageProcessor`` makes it:
    shortest side to ``size`` (PIL bicubic on uint8, the long side truncated), centre crop, rescale, normalise.

    The cropped-off sides are not seen (u-LLaVA v1 feeds CLIP this way, without padding to a square).
    """
    from PIL import Image

    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"clip_crop_pixels expects one uint8 frame [H,W,3], got dtype={frame.dtype} "
                         f"shape={tuple(frame.shape)}")
    height, width = frame.shape[:2]
    short, long = (height, width) if height <= width else (width, height)
    scaled_long = int(size * long / short)
    new_h, new_w = (size, scaled_long) if height <= width else (scaled_long, size)
    resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top:top + size, left:left + size].astype(np.float32) / 255.0
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    return ((crop - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
