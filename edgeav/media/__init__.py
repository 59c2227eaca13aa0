"""Media: sources (files, URLs, pushed arrays) → per-second :class:`Segment` objects."""

from __future__ import annotations

import importlib

# name -> the module that defines it; imported on first use, so that importing one submodule (the task
# tables read edgeav.media.windows) does not load PyAV and every decoder with it.
_HOMES = {
    "POLICIES": "edgeav.media.segment",
    "SAMPLE_RATE": "edgeav.media.segment",
    "Segment": "edgeav.media.segment",
    "SegmentAssembler": "edgeav.media.segment",
    "clip_frame_indices": "edgeav.media.segment",
    "AudioInfo": "edgeav.media.source",
    "DecodeStats": "edgeav.media.source",
    "MediaInfo": "edgeav.media.source",
    "MediaSource": "edgeav.media.source",
    "VideoInfo": "edgeav.media.source",
    "open_source": "edgeav.media.source",
    "segments": "edgeav.media.source",
    "PushSource": "edgeav.media.push",
    "Stills": "edgeav.media.stills",
    "load_image": "edgeav.media.stills",
    "open_stills": "edgeav.media.stills",
    "check_media_options": "edgeav.media.open",
    "open_audio": "edgeav.media.open",
    "open_media": "edgeav.media.open",
    "AudioPlan": "edgeav.media.windows",
    "AudioWindowCollector": "edgeav.media.windows",
    "audio_windows": "edgeav.media.windows",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'edgeav.media' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


__all__ = sorted(_HOMES)
