"""An OpenAVS run's inputs: every second of the source that has a frame, as the cascade reads it: the
first frame of the second at the source's size, and the second's audio (16 kHz mono; ``audio`` replaces
the source's own track, as AVSBench ships ``audio.wav``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeav.errors import MediaError
from edgeav.media.open import open_media
from edgeav.systems.openavs.translator import FrameTexts


@dataclass
class Second:
    """One second of the source as the cascade reads it."""

    time_s: float
    picture: np.ndarray  # uint8 [H, W, 3] at the source's size: the first frame of the second
    waveform: np.ndarray  # float32 [16000] mono
    texts: FrameTexts = field(default_factory=FrameTexts)


def decode(source, *, audio=None, fps=None, silent_audio=False) -> tuple[list[Second], bool]:
    """Every second of ``source`` with a frame -> (seconds, whether any audio was heard)."""
    seconds, heard, last = [], False, None
    with open_media(source, audio=audio, fps=fps, silent_audio=silent_audio) as media:
        if media.info.video is None:
            raise MediaError(f"{source}: has no video track; OpenAVS needs a video, an image or a folder of frames")
        for segment in media.segments("stream"):
            heard = heard or segment.has_audio
            last = segment.frames[0] if segment.n_frames else last
            if last is not None:
                seconds.append(Second(float(segment.start_s), last, segment.audio))
    if not seconds:
        raise MediaError(f"{source}: no video frame could be decoded; check the file")
    return seconds, heard


__all__ = ["Second", "decode"]
