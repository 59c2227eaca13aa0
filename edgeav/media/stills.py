"""Inputs as datasets store them: still images, folders of frames, and a separate audio file.

AVSBench (S4, MS3, AVSS), Ref-AVS and the ARIG examples keep a clip as frames
(``frames/0.jpg`` ... one per second) beside its ``audio.wav``; AVE, AVVP and
AVQA ship a video beside its ``.mp3``. This module reads them without muxing:

- :func:`open_stills`: one image, or a folder of frames in natural name order
  (``2.jpg`` before ``10.jpg``) shown ``fps`` per second (default 1);
- :func:`load_image`: pixels as Crab's loaders make them, PIL
  ``Image.open(p).convert("RGB").resize((224, 224))`` (bicubic);
- :func:`open_media`: any of these, optionally with a separate audio file (or
  silence), as a source of per-second :class:`~edgeav.media.segment.Segment`
  objects for streams, with the same ``info`` and ``segments()`` as
  :class:`~edgeav.media.source.MediaSource`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from edgeav.errors import MediaError, OptionError
from edgeav.media.segment import FRAME_EPS_S, SAMPLE_RATE, Segment
from edgeav.media.source import MediaInfo, MediaSource, VideoInfo, is_url, open_source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_TAIL_S = 0.5


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
    """An image as uint8 RGB [H, W, 3], resized to ``size`` (width, height) with PIL's bicubic,
    as Crab's loaders do (``Image.open(p).convert("RGB").resize((224, 224))``)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if size is not None and rgb.size != tuple(size):
                rgb = rgb.resize(tuple(size), Image.Resampling.BICUBIC)
            return np.array(rgb)  # writable: torch.from_numpy warns on read-only arrays
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{path}: not a readable image ({e}); re-save it as .jpg or .png") from None


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


def check_fps(fps: float | None) -> None:
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise OptionError(f"--fps {fps}: frames per second must be a positive number (a folder of one frame "
                          "per second: 1)")


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


def open_audio(path: str | Path) -> MediaSource:
    """The audio track of ``path`` (an audio file, or a video with sound), for ``--audio``."""
    source = open_source(path, audio_only=True)
    if not source.info.has_audio:
        source.close()
        raise MediaError(f"{path}: has no audio track; --audio needs a sound file (.wav, .mp3) or a video with sound")
    return source


def _audio_seconds(path: str | Path | None) -> Iterator[np.ndarray]:
    """``path``'s audio, one 16,000-sample second at a time, then silence for ever (None: silence only)."""
    if path is not None:
        with open_audio(path) as source:
            for segment in source.segments("stream"):
                yield segment.audio
    while True:
        yield np.zeros(SAMPLE_RATE, np.float32)


class StillSource:
    """Stills and an optional audio file as per-second segments (the ``stream`` policy).

    A folder lasts its frames (``n / fps`` seconds); each second shows the first frame
    inside it, else the frame before. A single image shows through every second of
    the audio (at least one). The audio is cut or padded with silence to fit.
    """

    def __init__(self, stills: Stills, audio: str | Path | None = None) -> None:
        self.stills = stills
        self.audio = audio
        audio_info, audio_s = None, None
        if audio is not None:
            with open_audio(audio) as source:
                audio_info, audio_s = source.info.audio, source.info.duration_s
        duration = stills.duration_s if stills.is_folder else max(audio_s or 1.0, 1.0)
        self.info = MediaInfo(
            source=stills.source,
            container="frames" if stills.is_folder else "image",
            duration_s=duration,
            start_s=0.0,
            video=VideoInfo(codec="image", width=stills.size[0], height=stills.size[1],
                            fps=stills.fps if stills.is_folder else None, n_frames=stills.n_frames),
            audio=audio_info,
            is_live=False,
        )

    def segments(self, policy: str = "stream", *, frame_size: tuple[int, int] | None = None) -> Iterator[Segment]:
        if policy != "stream":
            raise OptionError(f"{self.stills.source}: stills are read one frame per second (policy 'stream'); "
                              "Runtime.run reads them directly")
        whole = int(self.info.duration_s)
        # A last partial second counts from half a second on, as the assembler's min_tail_s does for files.
        n_seconds = max(whole + (self.info.duration_s - whole >= MIN_TAIL_S), 1)
        audio = _audio_seconds(self.audio)
        shown, shown_at = None, 0.0
        for k in range(n_seconds):
            index = self.stills.index_at(k) if self.stills.is_folder else (0 if shown is None else None)
            if index is not None:
                shown, shown_at = self.stills.frame(index, frame_size), index / self.stills.fps
            yield Segment(index=k, start_s=float(k), end_s=float(k + 1), frames=shown[None],
                          frame_times=np.array([shown_at if self.stills.is_folder else float(k)]),
                          audio=next(audio), has_audio=self.audio is not None)

    def close(self) -> None:
        pass

    def __enter__(self) -> "StillSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SeparateAudio:
    """A video's segments with the audio of another file (or silence: ``audio`` None) in place of its own.

    The video sets the seconds; the audio file is cut or padded with silence to fit.
    """

    def __init__(self, video: MediaSource, audio: str | Path | None) -> None:
        self.video = video
        self.audio = audio
        audio_info = None
        if audio is not None:
            with open_audio(audio) as source:
                audio_info = source.info.audio
        info = video.info
        self.info = MediaInfo(source=info.source, container=info.container, duration_s=info.duration_s,
                              start_s=info.start_s, video=info.video, audio=audio_info, is_live=info.is_live)

    def segments(self, policy: str = "stream", **options) -> Iterator[Segment]:
        audio = _audio_seconds(self.audio)
        for segment in self.video.segments(policy, **options):
            yield Segment(index=segment.index, start_s=segment.start_s, end_s=segment.end_s, frames=segment.frames,
                          frame_times=segment.frame_times, audio=next(audio), has_audio=self.audio is not None)

    def close(self) -> None:
        self.video.close()

    def __enter__(self) -> "SeparateAudio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_media_options(source: str | Path, *, audio: str | Path | None = None, fps: float | None = None,
                        silent_audio: bool = False) -> None:
    """What can be said about ``audio``, ``fps`` and ``silent_audio`` without reading any media."""
    check_fps(fps)
    if audio is not None and silent_audio:
        raise OptionError("--audio and --silent-audio exclude each other; pass one")
    stills = is_stills(source)
    if fps is not None and not (stills and Path(source).is_dir()):
        raise OptionError(f"--fps applies to a folder of frames; {source} is not one (a video keeps its own rate)")
    if stills and audio is None and not silent_audio:
        what = "a folder of frames" if Path(source).is_dir() else "an image"
        raise OptionError(f"{source}: {what} has no sound and Crab's tasks hear audio; pass --audio FILE (the "
                          "clip's .wav), or --silent-audio to run on silence")


def open_media(source: str | Path, *, audio: str | Path | None = None, fps: float | None = None,
               silent_audio: bool = False) -> MediaSource | StillSource | SeparateAudio:
    """Open a video, an image or a folder of frames, with its own audio, the audio of ``audio``,
    or silence (``silent_audio``), as a source of per-second segments."""
    check_media_options(source, audio=audio, fps=fps, silent_audio=silent_audio)
    if is_stills(source):
        return StillSource(open_stills(source, fps), audio)
    video = open_source(source)
    if audio is None and not silent_audio:
        return video
    try:
        return SeparateAudio(video, audio)
    except BaseException:
        video.close()
        raise


__all__ = [
    "IMAGE_SUFFIXES",
    "SeparateAudio",
    "StillSource",
    "Stills",
    "check_media_options",
    "is_stills",
    "load_image",
    "natural_key",
    "open_audio",
    "open_media",
    "open_stills",
]
