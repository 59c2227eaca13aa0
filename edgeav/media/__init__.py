"""Media: sources (files, URLs, pushed arrays) → per-second :class:`Segment` objects."""

from edgeav.media.segment import POLICIES, SAMPLE_RATE, Segment, SegmentAssembler, clip_frame_indices
from edgeav.media.source import (
    AudioInfo,
    DecodeStats,
    MediaInfo,
    MediaSource,
    VideoInfo,
    open_source,
    segments,
)
from edgeav.media.push import PushSource
from edgeav.media.stills import Stills, load_image, open_stills
from edgeav.media.open import check_media_options, open_audio, open_media
from edgeav.media.windows import AudioPlan, AudioWindowCollector, audio_windows

__all__ = [
    "AudioInfo",
    "AudioPlan",
    "AudioWindowCollector",
    "DecodeStats",
    "MediaInfo",
    "MediaSource",
    "POLICIES",
    "PushSource",
    "SAMPLE_RATE",
    "Segment",
    "SegmentAssembler",
    "Stills",
    "VideoInfo",
    "audio_windows",
    "check_media_options",
    "clip_frame_indices",
    "load_image",
    "open_audio",
    "open_media",
    "open_source",
    "open_stills",
    "segments",
]
