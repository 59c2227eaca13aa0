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
from edgeav.media.stills import Stills, load_image, open_media, open_stills
from edgeav.media.windows import (
    CLIP_AUDIO_SECONDS,
    CRAB_AUDIO_PLANS,
    AudioPlan,
    AudioWindowCollector,
    ClipAudioCollector,
    audio_windows,
    crab_audio_plan,
    cut_clip_audio,
)

__all__ = [
    "AudioInfo",
    "AudioPlan",
    "AudioWindowCollector",
    "CLIP_AUDIO_SECONDS",
    "ClipAudioCollector",
    "CRAB_AUDIO_PLANS",
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
    "clip_frame_indices",
    "crab_audio_plan",
    "cut_clip_audio",
    "load_image",
    "open_media",
    "open_source",
    "open_stills",
    "segments",
]
