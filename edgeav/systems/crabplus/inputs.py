"""A Crab+ run's inputs from one source: the frames its ViT reads, the picture masks are drawn on and
the clip's whole waveform (the task's audio cut is made from it later).

- Video tasks read ``k`` frames spread over the whole clip as decord's ``linspace(0, n - 1, k).round()``
  picks them (CRABPLUS_SPEC section 5), at the source's size; the ViT's front end resizes them.
- Image tasks (ARIG, S4, MS3, Ref-AVS) read one frame: the first of second ``at`` (AVSBench names a
  frame by its second), or the image itself.
- Audio: ``audio`` (a separate file, as AVSBench ships ``audio.wav``), else the video's own track, else
  silence when ``silent_audio`` allows it. The waveform ends where the media ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeav.errors import MediaError
from edgeav.media import SAMPLE_RATE
from edgeav.media.open import SeparateAudio, check_media_options, open_media
from edgeav.media.source import MediaSource
from edgeav.media.stills import is_stills, open_stills
from edgeav.preprocess.qwen_vision import frame_indices


@dataclass
class ClipInputs:
    """Decoded inputs of one source."""

    video: np.ndarray | None  # uint8 [k, H, W, 3] at the source's size: the video the ViT reads (video tasks)
    picture: np.ndarray  # uint8 [H, W, 3] at the source's size: the image an image task reads, masks are drawn on
    picture_s: float  # the source time of ``picture``
    waveform: np.ndarray  # float32 [samples] at 16 kHz, mono: the clip's whole audio
    heard: bool  # False: the waveform is silence (--silent-audio)
    duration_s: float


def decode(source: str | Path, *, video_frames: int | None, at_fraction: float = 0.0,
           audio: str | Path | None = None, fps: float | None = None, silent_audio: bool = False) -> ClipInputs:
    """Read ``source`` for a task that reads ``video_frames`` frames as a video (None: an image task reading
    the first frame of the second at ``at_fraction`` of the clip: frame ``i`` of a clip cut into ``T`` units
    is at ``i / T``, second ``i`` of AVSBench's 5-s clips)."""
    check_media_options(source, audio=audio, fps=fps, silent_audio=silent_audio)
    stills = open_stills(source, fps) if is_stills(source) else None
    with open_media(source, audio=audio, fps=fps, silent_audio=silent_audio) as media:
        if media.info.video is None:
            raise MediaError(f"{source}: has no video track; Crab+ needs a video, an image or a folder of frames")
        if video_frames is not None and stills is None:
            # The clip policy's frames, spread over the whole clip by frame count.
            segments = media.segments("clip", clip_frames=video_frames, frame_indices=frame_indices)
        else:
            segments = media.segments("stream")
        at_second = int(at_fraction * (media.info.duration_s or 0.0) + 1e-6)
        kept, pieces, picture, picture_s, heard = [], [], None, 0.0, False
        for segment in segments:
            pieces.append(segment.audio)
            heard = heard or segment.has_audio
            if video_frames is not None and stills is None:
                kept.extend(segment.frames)
            elif segment.index == at_second and len(segment.frames):
                picture, picture_s = segment.frames[0], float(segment.frame_times[0])
        end_s = _media_end_s(media)
    if video_frames is not None:
        if stills is not None:
            kept = [stills.frame(int(i)) for i in frame_indices(stills.n_frames, video_frames)]
        if not kept:
            raise MediaError(f"{source}: no video frame could be decoded; check the file")
        video = np.stack(kept)
        picture, picture_s = video[0], 0.0
    else:
        video = None
        if picture is None:
            raise MediaError(f"{source}: no frame at {at_second} s could be decoded; check the file")
    waveform = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if end_s is not None:
        waveform = waveform[: max(round(end_s * SAMPLE_RATE), 1)]
    if not heard and not silent_audio:
        raise MediaError(f"{source}: has no audio track and Crab+ hears audio; pass --audio FILE (the clip's sound) "
                         "or --silent-audio to run on silence")
    duration = end_s if end_s is not None else len(pieces)
    return ClipInputs(video, picture, picture_s, waveform.astype(np.float32, copy=False), heard, float(duration))


def _media_end_s(media) -> float | None:
    """Where the media decoded ends (a file's real length, whatever its header says)."""
    if isinstance(media, SeparateAudio):
        media = media.video
    return media.media_end_s if isinstance(media, MediaSource) else media.info.duration_s
