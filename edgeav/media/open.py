"""Choosing and combining sources: a video, an image or a folder of frames, with its own
audio, a separate audio file, or silence.

AVE, AVVP and AVQA ship a video beside its ``.mp3``; AVSBench a folder of frames (or one
frame) beside its ``audio.wav``. :func:`open_media` reads any of them without muxing, as a
source of per-second :class:`~edgeav.media.segment.Segment` objects (the ``stream``
policy) with the same ``info`` and ``segments()`` as :class:`~edgeav.media.source.MediaSource`;
:func:`check_media_options` says what is wrong with the options before any media is read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeav.errors import MediaError, OptionError
from edgeav.media.segment import SAMPLE_RATE, Segment
from edgeav.media.source import MediaInfo, MediaSource, VideoInfo, is_url, open_source
from edgeav.media.stills import Stills, check_fps, is_stills, open_stills

MIN_TAIL_S = 0.5
MIN_AUDIO_SAMPLES = 400  # one fbank frame (25 ms at 16 kHz): less is no audio to hear


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
    the audio, and at least ``image_s`` seconds (a stream's window; default 1). The audio
    is cut or padded with silence to fit.
    """

    def __init__(self, stills: Stills, audio: str | Path | None = None, image_s: float | None = None) -> None:
        self.stills = stills
        self.audio = audio
        audio_info, audio_s = None, None
        if audio is not None:
            with open_audio(audio) as source:
                audio_info, audio_s = source.info.audio, source.info.duration_s
        duration = stills.duration_s if stills.is_folder else max(audio_s or 0.0, image_s or 1.0, 1.0)
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
                        silent_audio: bool = False, hears_audio: bool = True) -> None:
    """What can be said about ``audio``, ``fps`` and ``silent_audio`` without reading any media
    (``run`` and ``stream``, the CLI's and the library's, all check here). ``hears_audio``: the
    system's tasks need sound, so a picture without ``audio`` or ``silent_audio`` is refused."""
    check_fps(fps)
    if not hears_audio and (audio is not None or silent_audio):
        raise OptionError(f"--{'audio' if audio is not None else 'silent-audio'}: this model hears no audio; drop it")
    if audio is not None:
        _check_audio_name(audio)
    if audio is not None and silent_audio:
        raise OptionError("--audio and --silent-audio exclude each other; pass one")
    if (audio is not None or silent_audio) and is_url(str(source)):
        raise OptionError(f"{source}: --audio and --silent-audio apply to files; a URL streams its own audio")
    stills = is_stills(source)
    if fps is not None and not (stills and Path(source).is_dir()):
        raise OptionError(f"--fps applies to a folder of frames; {source} is not one (a video keeps its own rate)")
    if stills and hears_audio and audio is None and not silent_audio:
        what = "a folder of frames" if Path(source).is_dir() else "an image"
        raise OptionError(f"{source}: {what} has no sound and the model's tasks hear audio; pass --audio FILE (the "
                          "clip's .wav), or --silent-audio to run on silence")


def _check_audio_name(audio) -> None:
    if not isinstance(audio, (str, os.PathLike)):
        raise OptionError(f"audio (--audio) takes the path of an audio file (.wav, .mp3), not a "
                          f"{type(audio).__name__}; write the samples to a .wav file first")
    # A path made of a URL has lost one slash ("http:/host"): both forms name a URL.
    if is_url(str(audio)) or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(audio)):
        raise OptionError(f"{audio}: audio (--audio) takes a local file (.wav, .mp3); download it first")


def check_audio_samples(path: str | Path) -> None:
    """Refuse an audio file that holds less than one fbank frame of samples (a header-only WAV, say):
    the model would run on silence. Reads the first second at most."""
    with open_audio(path) as source:
        for _ in source.segments("stream", min_tail_s=0.0):
            if source.stats.audio_samples >= MIN_AUDIO_SAMPLES:
                return
        if source.stats.audio_samples < MIN_AUDIO_SAMPLES:
            raise no_samples_error(path, source.stats.audio_samples)


def no_samples_error(path: str | Path, n_samples: int) -> MediaError:
    held = "no audio samples" if not n_samples else f"only {n_samples} audio samples, under one 25-ms fbank frame"
    return MediaError(f"{path}: holds {held}; give the clip's audio, or --silent-audio")


def open_media(source: str | Path, *, audio: str | Path | None = None, fps: float | None = None,
               silent_audio: bool = False, image_s: float | None = None,
               hears_audio: bool = True) -> MediaSource | StillSource | SeparateAudio:
    """Open a video, an image or a folder of frames, with its own audio, the audio of ``audio``,
    or silence (``silent_audio``), as a source of per-second segments. One image lasts at least
    ``image_s`` seconds (a stream passes its window, so an image gives one window as ``run`` gives one clip)."""
    check_media_options(source, audio=audio, fps=fps, silent_audio=silent_audio, hears_audio=hears_audio)
    if audio is not None:
        check_audio_samples(audio)
    if is_stills(source):
        return StillSource(open_stills(source, fps), audio, image_s)
    video = open_source(source)
    if audio is None and not silent_audio:
        return video
    try:
        return SeparateAudio(video, audio)
    except BaseException:
        video.close()
        raise


__all__ = [
    "SeparateAudio",
    "StillSource",
    "check_audio_samples",
    "check_media_options",
    "open_audio",
    "open_media",
]
