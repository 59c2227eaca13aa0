"""Qwen2.5-VL vision front end as Crab+ feeds the Qwen2.5-Omni thinker (CRABPLUS_SPEC sections 2 and 5).

- Images: RGB (RGBA composited on white), PIL's bicubic resize to 224x224, aspect not kept.
- Video: ``k`` frames at ``linspace(0, n-1, k).round()``, resized as torchvision resizes a uint8
  tensor (float32 antialiased bicubic, clamp to 0..255, round), so pixels stay integers.
- :func:`patchify`: rescale 1/255, CLIP mean/std, pad to an even frame count by repeating the last
  frame (an image becomes two identical frames), then rows of ``3 x 2 x 14 x 14`` (channel-major)
  ordered by (t, h/2, w/2, 2, 2), so every four consecutive rows form one 2x2 merge group; the layout
  ``Qwen2VLImageProcessor`` produces and ``edgeav.models.qwen_vision`` reads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from edgeav.errors import MediaError, OptionError

__all__ = [
    "QWEN_VISION_MEAN",
    "QWEN_VISION_SIZE",
    "QWEN_VISION_STD",
    "frame_indices",
    "image_pixels",
    "patchify",
    "video_frame_pixels",
    "vision_grid",
]

QWEN_VISION_SIZE = 224
QWEN_VISION_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics
QWEN_VISION_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2


def frame_indices(n_frames: int, k: int) -> np.ndarray:
    """Indices of the ``k`` frames Crab+ samples from an ``n_frames`` clip (int64 ``[k]``).

    ``torch.linspace`` in float32 then round-half-even, as the original; numpy's float64 linspace
    could land on the other side of a .5 for some lengths.
    """
    if n_frames < 1 or k < 1:
        raise OptionError(f"frame_indices: need n_frames >= 1 and k >= 1, got n_frames={n_frames}, k={k}; "
                          "pass a clip with frames and a positive frame count")
    return torch.linspace(0, n_frames - 1, k).round().long().numpy()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA":  # transparent pixels become white, not black
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def image_pixels(image: Image.Image | np.ndarray, size: int = QWEN_VISION_SIZE) -> np.ndarray:
    """A PIL image (any mode) or uint8 RGB ``[H,W,3]`` -> uint8 ``[size,size,3]`` by PIL bicubic."""
    if isinstance(image, Image.Image):
        pil = _to_rgb(image)
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise MediaError(f"image_pixels: expected a PIL image or uint8 RGB [H,W,3], got dtype={array.dtype} "
                             f"shape={tuple(array.shape)}; pass one decoded RGB image")
        pil = Image.fromarray(array)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BICUBIC)
    return np.asarray(pil)


def video_frame_pixels(frames: np.ndarray, size: int = QWEN_VISION_SIZE) -> np.ndarray:
    """uint8 RGB ``[T,H,W,3]`` -> uint8 ``[T,size,size,3]`` as torchvision resizes a uint8 tensor."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"video_frame_pixels: expected uint8 RGB [T,H,W,3], got dtype={frames.dtype} "
                         f"shape={tuple(frames.shape)}; pass decoded RGB frames")
    if frames.shape[1:3] == (size, size):  # torchvision returns the input untouched at its own size
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp_(0, 255).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def vision_grid(n_frames: int, height: int = QWEN_VISION_SIZE, width: int = QWEN_VISION_SIZE) -> tuple[int, int, int]:
    """The (t, h, w) patch grid :func:`patchify` gives ``n_frames`` frames (1 for an image)."""
    if n_frames < 1:
        raise OptionError(f"vision_grid: n_frames must be >= 1, got {n_frames}; pass at least one frame")
    factor = PATCH_SIZE * MERGE_SIZE
    if height % factor or width % factor:
        raise OptionError(f"Qwen vision frames must be multiples of {factor} pixels, got {height}x{width}; "
                          f"resize them first (image_pixels / video_frame_pixels give {QWEN_VISION_SIZE})")
    return -(-n_frames // TEMPORAL_PATCH_SIZE), height // PATCH_SIZE, width // PATCH_SIZE


def patchify(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Frames ``[T,H,W,3]`` (or one image ``[H,W,3]``; uint8, or float in 0..255 units) ->
    (patches float32 ``[t*h*w, 1176]``, grid ``(t, h, w)``) in merge-group order."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"patchify: expected RGB frames [T,H,W,3] or one image [H,W,3], got shape "
                         f"{tuple(frames.shape)}; pass image_pixels / video_frame_pixels output")
    n_frames, height, width, channels = frames.shape
    grid_t, grid_h, grid_w = vision_grid(n_frames, height, width)
    mean = np.asarray(QWEN_VISION_MEAN, np.float64)
    std = np.asarray(QWEN_VISION_STD, np.float64)
    pixels = (frames.astype(np.float64) / 255.0 - mean) / std
    if pad := grid_t * TEMPORAL_PATCH_SIZE - n_frames:  # the processor repeats the last frame
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
    m, p = MERGE_SIZE, PATCH_SIZE
    pixels = pixels.reshape(grid_t, TEMPORAL_PATCH_SIZE, grid_h // m, m, p, grid_w // m, m, p, channels)
    # rows (t, group row, group col, row in group, col in group); columns (channel, frame, y, x)
    patches = pixels.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    patches = patches.reshape(grid_t * grid_h * grid_w, channels * TEMPORAL_PATCH_SIZE * p * p)
    return patches.astype(np.float32), (grid_t, grid_h, grid_w)
