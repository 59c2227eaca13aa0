"""Audio windows: stretches of audio at given source times, cut from segments as they pass in exact
16,000-sample seconds (:class:`AudioWindowCollector`), and the bounds of a stream's window.

A system that cuts a clip its authors' way builds on these (Crab: :mod:`edgeav.systems.crab.audio_cut`).
"""

from __future__ import annotations

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


MAX_WINDOW_S = 600  # a stream's window lasts at most this long (its media is held in memory)


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


def check_window(window, stride) -> None:
    """A stream's ``window`` and ``stride``: whole seconds, the window 1..MAX_WINDOW_S, the stride at least 1."""
    for name, value in (("window", window), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"{name} (--{name}) {value!r}: give whole seconds, as 2")
    if not 1 <= window <= MAX_WINDOW_S:
        raise OptionError(f"window, --window {window}: a window lasts 1 to {MAX_WINDOW_S} seconds")
    if stride < 1:
        raise OptionError(f"stride, --stride {stride}: the stride is at least 1 second")
