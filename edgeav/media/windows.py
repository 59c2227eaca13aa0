"""Crab's audio windows: which stretches of audio each task feeds to BEATs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from edgeav.errors import OptionError
from edgeav.media.segment import SAMPLE_RATE, Segment


@dataclass(frozen=True)
class AudioPlan:
    """Audio windows of ``length_s`` seconds starting at ``starts_s`` (source time).

    Parts of a window outside the source (before 0 or after the end) are silence.
    """

    starts_s: tuple[float, ...]
    length_s: float

    @property
    def n_samples(self) -> int:
        return round(self.length_s * SAMPLE_RATE)


# Task -> number of consecutive 1-s windows from time 0 (CRAB_SPEC section 4).
_SECOND_WINDOWS = {"ave": 10, "avvp": 10, "refavs": 10, "s4": 5, "ms3": 5, "arig": 5}
CRAB_AUDIO_PLANS = (*_SECOND_WINDOWS, "avqa", "avss")

AVQA_WINDOWS = 10
AVQA_CLIP_S = 60.0


def crab_audio_plan(task: str, *, duration_s: float | None = None, frame_time_s: float = 0.0) -> AudioPlan:
    """The windows Crab uses for ``task``.

    - ave, avvp, refavs: ten 1-s windows from 0 s; s4, ms3, arig: five.
    - avqa: ten 2-s windows [t - 0.5, t + 1.5] centred at t = i * duration / 10
      (0, 6, ..., 54 for Crab's 60-s clips; ``duration_s`` defaults to 60).
    - avss: the 1-s window holding ``frame_time_s``.
    """
    if task in _SECOND_WINDOWS:
        return AudioPlan(tuple(float(i) for i in range(_SECOND_WINDOWS[task])), 1.0)
    if task == "avqa":
        step = (duration_s or AVQA_CLIP_S) / AVQA_WINDOWS
        return AudioPlan(tuple(i * step - 0.5 for i in range(AVQA_WINDOWS)), 2.0)
    if task == "avss":
        return AudioPlan((float(math.floor(frame_time_s)),), 1.0)
    raise OptionError(f"task {task!r} has no audio plan; expected one of {', '.join(CRAB_AUDIO_PLANS)}")


class AudioWindowCollector:
    """Fills a plan's windows from segments as they pass, keeping nothing else."""

    def __init__(self, plan: AudioPlan) -> None:
        self.windows = np.zeros((len(plan.starts_s), plan.n_samples), np.float32)
        self._starts = [round(s * SAMPLE_RATE) for s in plan.starts_s]
        self._end = max(self._starts) + plan.n_samples if self._starts else 0
        self._next_sample = 0

    @property
    def done(self) -> bool:
        """Every later segment lies past the last window."""
        return self._next_sample >= self._end

    def add(self, segment: Segment) -> None:
        lo = segment.index * SAMPLE_RATE
        hi = lo + segment.audio.size
        self._next_sample = hi
        n = self.windows.shape[1]
        for row, start in enumerate(self._starts):
            a, b = max(lo, start), min(hi, start + n)
            if b > a:
                self.windows[row, a - start : b - start] = segment.audio[a - lo : b - lo]


def audio_windows(segments: Iterable[Segment], plan: AudioPlan) -> np.ndarray:
    """Cut the plan's windows out of a segment stream: float32 [n_windows, n_samples].

    Reads segments only until the last window is filled, and keeps nothing
    else, so a long source is never held in memory.
    """
    collector = AudioWindowCollector(plan)
    for segment in segments:
        if collector.done:
            break
        collector.add(segment)
    return collector.windows
