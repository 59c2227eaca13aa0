"""Media: sources (files, URLs, pushed arrays) → per-second :class:`Segment` objects."""

from edgeav.media.segment import POLICIES, SAMPLE_RATE, Segment, SegmentAssembler, clip_frame_indices
from edgeav.media.source import (
    AudioInfo,
    DecodeStats,
    MediaInfo,
    MediaSource,
    PushSource,
    VideoInfo,
    open_source,
    segments,
)
from edgeav.media.windows import CRAB_AUDIO_PLANS, AudioPlan, AudioWindowCollector, audio_windows, crab_audio_plan

__all__ = [
    "AudioInfo",
    "AudioPlan",
    "AudioWindowCollector",
    "CRAB_AUDIO_PLANS",
    "DecodeStats",
    "MediaInfo",
    "MediaSource",
    "POLICIES",
    "PushSource",
    "SAMPLE_RATE",
    "Segment",
    "SegmentAssembler",
    "VideoInfo",
    "audio_windows",
    "clip_frame_indices",
    "crab_audio_plan",
    "open_source",
    "segments",
]
