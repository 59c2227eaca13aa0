"""What a stream reports: each window's result, the gaps in its source, and its telemetry."""

from __future__ import annotations

import collections
import os
import resource
import threading
from dataclasses import dataclass, field

import numpy as np

from edgeav.results import Result

# Latency percentiles are over the most recent samples, so a stream of any length holds a bounded number.
PERCENTILE_SAMPLES = 10_000


@dataclass(frozen=True)
class Gap:
    """A discontinuity in the source: a dropped live URL (reconnected or not), a pushed clock that
    jumped ahead (the seconds skipped), or a pushed clock that went back (``start_s == end_s``: a reset,
    nothing missing)."""

    @property
    def is_reset(self) -> bool:
        return self.start_s == self.end_s

    def describe(self) -> str:
        where = f"reset at {self.start_s:g} s" if self.is_reset else f"gap {self.start_s:g}-{self.end_s:g} s"
        return f"{where}: {self.reason}"

    start_s: float
    end_s: float
    reason: str

    def to_dict(self) -> dict:
        return {"start_s": self.start_s, "end_s": self.end_s, "reason": self.reason}


@dataclass
class WindowResult:
    """The task's result on one window, times in seconds of the source.

    ``frame_s`` is the second whose frame a box or mask is of (None for tasks that
    read no single frame). ``timings_ms`` holds the encoding of the seconds new to
    this window (visual, audio), the llm stages (prefill, decode_tokens, mask), the
    wait for the llm (queue) and ``latency``: from the moment the window's last
    second was decoded to the result. ``gaps`` lists the gaps in the source since
    the previous result.
    """

    index: int
    start_s: float
    end_s: float
    result: Result
    frame_s: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)

    def to_dict(self) -> dict:
        result = self.result.to_dict()
        for key in ("timings_ms", "model", "source"):  # the stream's header says the model and source once
            result.pop(key)
        return {
            "window": self.index,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "frame_s": self.frame_s,
            **result,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "gaps": [g.to_dict() for g in self.gaps],
        }


class StageStats:
    """Latencies of one stage in milliseconds: count and total over the whole stream, percentiles over
    the most recent ``PERCENTILE_SAMPLES``."""

    def __init__(self) -> None:
        self.count = 0
        self.total_ms = 0.0
        self._recent: collections.deque[float] = collections.deque(maxlen=PERCENTILE_SAMPLES)

    def add(self, ms: float) -> None:
        self.count += 1
        self.total_ms += ms
        self._recent.append(ms)

    def percentile(self, q: float) -> float | None:
        recent = self._recent.copy()  # another stage may be appending
        return float(np.percentile(np.fromiter(recent, float), q)) if recent else None

    def to_dict(self) -> dict:
        p50, p95 = self.percentile(50), self.percentile(95)
        return {"count": self.count, "total_ms": round(self.total_ms, 3),
                "p50_ms": None if p50 is None else round(p50, 3), "p95_ms": None if p95 is None else round(p95, 3)}


# Stages whose time is model compute: the real-time factor sums them.
# The encoders (visual, audio), OpenAVS's describers and translator, the LLM, the mask and box heads.
COMPUTE_STAGES = ("visual", "audio", "describe_audio", "describe_image", "translate", "prefill", "decode_tokens",
                  "mask", "boxes")
TELEMETRY_STAGES = ("decode", *COMPUTE_STAGES, "window")


@dataclass
class Telemetry:
    """What a stream did so far; read it while the stream runs or after.

    ``stages`` maps decode (per second read; for a live URL this includes waiting for
    the network), visual and audio (per encoder call), prefill, decode_tokens and mask
    (per window) and window (latency from a window's last second to its result) to
    their :class:`StageStats`.
    """

    stages: dict[str, StageStats] = field(default_factory=lambda: {s: StageStats() for s in TELEMETRY_STAGES})
    media_s: float = 0.0  # seconds of media decoded
    windows_processed: int = 0
    windows_skipped: int = 0  # not run: the model fell behind a live source, or their media was missing
    segments_dropped: int = 0  # seconds a live source delivered that the encoder could not take in time
    frames_encoded: int = 0  # frames through the visual encoder
    audio_windows_encoded: int = 0  # audio windows through the audio encoder
    gaps: list[Gap] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # resident memory, sampled once per second of media
    wall_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, counter: str, n: int = 1) -> None:
        """Add ``n`` to a counter (stages in several threads count windows)."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + n)

    @property
    def compute_s(self) -> float:
        return sum(self.stages[s].total_ms for s in COMPUTE_STAGES) / 1000

    @property
    def real_time_factor(self) -> float | None:
        """Seconds of model compute per second of media (decoding excluded; it is its own stage)."""
        return self.compute_s / self.media_s if self.media_s else None

    def sample_memory(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb())

    def to_dict(self) -> dict:
        rtf = self.real_time_factor
        return {
            "stages": {name: stats.to_dict() for name, stats in self.stages.items()},
            "media_s": round(self.media_s, 3),
            "wall_s": round(self.wall_s, 3),
            "real_time_factor": None if rtf is None else round(rtf, 4),
            "windows_processed": self.windows_processed,
            "windows_skipped": self.windows_skipped,
            "segments_dropped": self.segments_dropped,
            "frames_encoded": self.frames_encoded,
            "audio_windows_encoded": self.audio_windows_encoded,
            "gaps": [g.to_dict() for g in self.gaps],
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux: /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024
