"""SAM 2 image predictor front end: pixels and prompt points as the released predictor builds them.

Pixels (CRABPLUS_SPEC section 2, "SAM2 stage"): Crab+ re-reads the frame and resizes it to 224x224
with PIL LANCZOS; then, as the predictor's transforms do, ToTensor (0..1), a square bilinear resize to
the model's resolution (no aspect preserved, no padding) and ImageNet mean/std. Pass
``pre_size=None`` for the predictor alone (OpenAVS): the frame goes straight to the square resize.

Prompts: the predictor merges a box into the point list as two corner points (labels 2 and 3) in
front of the clicks (label 1), and the prompt encoder then appends one padding point (label -1);
:func:`sam2_prompt` returns that final list, in model-input pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from edgeav.errors import MediaError, OptionError

__all__ = ["SAM2_MEAN", "SAM2_SIZE", "SAM2_STD", "sam2_pixels", "sam2_prompt"]

SAM2_SIZE = 1024
SAM2_MEAN = (0.485, 0.456, 0.406)
SAM2_STD = (0.229, 0.224, 0.225)

BOX_CORNER_LABELS = (2, 3)
POINT_LABEL = 1
PADDING_LABEL = -1


def sam2_pixels(image: Image.Image | np.ndarray, *, pre_size: int | None = 224,
                resolution: int = SAM2_SIZE) -> torch.Tensor:
    """RGB PIL image or uint8 ``[H,W,3]`` -> float32 ``[1,3,resolution,resolution]``.

    ``pre_size``: the square size the frame is first resized to with LANCZOS (Crab+: 224), or None.
    """
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise MediaError(f"SAM2 frame: expected uint8 RGB of shape [H,W,3], got dtype={array.dtype} "
                             f"shape={tuple(array.shape)}; pass one decoded RGB frame")
        image = Image.fromarray(array)
    if image.width == 0 or image.height == 0:
        raise MediaError(f"SAM2 frame of size {image.width}x{image.height} is empty; pass a frame with pixels")
    if pre_size is not None:
        if pre_size <= 0:
            raise OptionError(f"SAM2 pre_size {pre_size} must be positive (Crab+: 224) or None")
        image = image.resize((pre_size, pre_size), Image.LANCZOS)
    if resolution <= 0:
        raise OptionError(f"SAM2 resolution {resolution} must be positive; use the model config's image_size")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if pixels.shape[-2:] != (resolution, resolution):
        # torchvision's tensor Resize: bilinear, antialiased (which only matters when shrinking)
        pixels = F.interpolate(pixels, (resolution, resolution), mode="bilinear", align_corners=False,
                               antialias=True)
    mean = torch.tensor(SAM2_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(SAM2_STD).reshape(1, 3, 1, 1)
    return (pixels - mean) / std


def sam2_prompt(box: Sequence[float] | None, points: Sequence[Sequence[float]], space: int | tuple[int, int] = 224,
                *, resolution: int = SAM2_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A box ``(x1, y1, x2, y2)`` and/or clicks ``[(x, y), ...]`` -> (points ``[1,N,2]``, labels ``[1,N]``).

    Coordinates are pixels of an image of size ``space`` (one int for a square, else (height, width));
    they are scaled to ``resolution`` (the prompt encoder adds the half-pixel itself). Order: box
    corners (labels 2, 3), clicks (label 1), one padding point (label -1) at (0, 0).
    """
    height, width = (space, space) if isinstance(space, int) else (int(space[0]), int(space[1]))
    if height <= 0 or width <= 0:
        raise OptionError(f"SAM2 prompt space {space} must be positive: the size of the image the "
                          "coordinates refer to (Crab+: 224)")
    coords, labels = [], []
    if box is not None:
        if len(box) != 4:
            raise OptionError(f"SAM2 box {tuple(box)} must have four numbers (x1, y1, x2, y2)")
        coords += [box[:2], box[2:]]
        labels += list(BOX_CORNER_LABELS)
    for point in points:
        if len(point) != 2:
            raise OptionError(f"SAM2 point {tuple(point)} must have two numbers (x, y)")
        coords.append(point)
        labels.append(POINT_LABEL)
    if not coords:
        raise OptionError("SAM2 prompt is empty: pass a box, at least one point, or both")
    xy = torch.tensor([[float(x), float(y)] for x, y in coords], dtype=torch.float32)
    # As the predictor: normalise by the source size, then scale to the model's input.
    xy = xy / torch.tensor([width, height], dtype=torch.float32) * resolution
    xy = torch.cat([xy, torch.zeros(1, 2)])
    labels.append(PADDING_LABEL)
    return xy[None], torch.tensor([labels], dtype=torch.int64)
