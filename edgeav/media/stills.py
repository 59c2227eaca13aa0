"""Inputs as datasets store them: still images and folders of frames.

AVSBench (S4, MS3, AVSS), Ref-AVS and the ARIG examples keep a clip as frames
(``frames/0.jpg`` ... one per second) beside its ``audio.wav``. This module reads them:

- :func:`open_stills`: one image, or a folder of frames in natural name order
  (``2.jpg`` before ``10.jpg``) shown ``fps`` per second (default 1);
- :func:`load_image`: pixels as Crab's loaders make them, PIL
  ``Image.open(p).convert("RGB").resize((224, 224))`` (bicubic).

Combining them with a separate audio file (or silence) into a source of per-second
segments is :mod:`edgeav.media.open`'s job.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgeav.errors import MediaError, OptionError
from edgeav.media.segment import FRAME_EPS_S
from edgeav.media.source import is_url

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_stills(source: str | Path) -> bool:
    """Whether ``source`` names an image file (by its suffix) or a folder of frames."""
    if is_url(str(source)):
        return False
    path = Path(source)
    return path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: ``2.jpg`` < ``10.jpg``."""
    # re.split with a group alternates text and digits, so the list's types line up between names.
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"(\d+)", name))]


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as uint8 RGB [H, W, 3], resized to ``size`` (width, height) as Crab's loaders do
    (``Image.open(p).convert("RGB").resize((224, 224))``, see :func:`resize_image`)."""
    try:
        with Image.open(path) as image:
            rgb = np.array(image.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{path}: not a readable image ({e}); re-save it as .jpg or .png") from None
    return rgb if size is None else resize_image(rgb, size)


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB [H, W, 3] at ``size`` (width, height) with PIL's bicubic, as Crab's loaders resize."""
    if (rgb.shape[1], rgb.shape[0]) == tuple(size):
        return rgb
    return np.array(Image.fromarray(rgb).resize(tuple(size), Image.Resampling.BICUBIC))


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{path}: not a readable image ({e}); re-save it as .jpg or .png") from None


@dataclass(frozen=True)
class Stills:
    """One image, or a folder's frames: frame ``i`` shows at ``i / fps`` seconds.

    A single image has no time of its own (``is_folder`` False): the caller decides
    which second it stands for.
    """

    source: str
    paths: tuple[Path, ...]
    fps: float
    size: tuple[int, int]  # (width, height), the same for every frame
    is_folder: bool

    @property
    def n_frames(self) -> int:
        return len(self.paths)

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps

    def frame(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Frame ``index`` as uint8 RGB, resized to ``size`` (width, height) as Crab's loaders do."""
        return load_image(self.paths[index], size)

    def index_at(self, second: float) -> int | None:
        """The first frame shown at or after ``second`` within that second (the stream policy's frame),
        or None when that second shows no new frame."""
        index = max(math.ceil((second - FRAME_EPS_S) * self.fps - 1e-9), 0)
        if index >= self.n_frames or index / self.fps >= second + 1 - FRAME_EPS_S:
            return None
        return index


MAX_FPS = 240.0  # make-clip's bound too: above it every second would hold thousands of frames


def check_fps(fps: float | None) -> None:
    if fps is None:
        return
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real):
        raise OptionError(f"fps (--fps) {fps!r}: frames per second must be a number, as 1 or 0.5")
    if not (math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise OptionError(f"fps, --fps {fps:g}: frames per second must be a positive number, at most {MAX_FPS:g} "
                          "(a folder of one frame per second: 1)")


def open_stills(source: str | Path, fps: float | None = None) -> Stills:
    """An image file, or a folder of images sorted by name (natural order), shown ``fps`` per second.

    Raises a one-line :class:`~edgeav.errors.MediaError` for a missing, empty or image-less folder,
    an unreadable image, or frames of different sizes.
    """
    check_fps(fps)
    path = Path(source)
    if not path.exists():
        raise MediaError(f"{source}: no such file or folder; check the path")
    if not path.is_dir():
        if fps is not None:
            raise OptionError(f"--fps applies to a folder of frames; {source} is one image, drop --fps")
        return Stills(str(source), (path,), 1.0, _image_size(path), is_folder=False)
    try:
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    except OSError as e:
        raise MediaError(f"{source}: cannot list the folder ({e.strerror or e}); make it readable") from None
    if not entries:
        raise MediaError(f"{source}: the folder is empty; put the clip's frames in it (0.jpg, 1.jpg, ...)")
    images = sorted((p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: (natural_key(p.name), p.name))
    if not images:
        raise MediaError(f"{source}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}); give a folder of "
                         "frames, or a video file")
    size = _image_size(images[0])
    for image in images[1:]:
        other = _image_size(image)
        if other != size:
            raise MediaError(f"{source}: its frames differ in size ({images[0].name} {size[0]}x{size[1]}, "
                             f"{image.name} {other[0]}x{other[1]}); resize them to one size")
    return Stills(str(source), tuple(images), float(fps or 1.0), size, is_folder=True)


__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_FPS",
    "Stills",
    "check_fps",
    "is_stills",
    "load_image",
    "natural_key",
    "open_stills",
    "resize_image",
]
