"""What a system's stream stages keep of the seconds decoded: each second's frame (the last one shown
through seconds without a frame, as a display would) and audio, while a window still needs them, and the
windows whose seconds are all in."""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from edgeav.media import Segment


class SecondsBuffer:
    """Per-second frames and audio for windows of ``window`` seconds every ``stride`` seconds.

    A window missing a second (a gap in a live source, a second before the first frame) is counted as
    skipped in ``telemetry``; after a gap longer than a window the next window starts after it.
    """

    def __init__(self, window: int, stride: int, telemetry, stopping: threading.Event) -> None:
        self.window, self.stride = window, stride
        self.telemetry, self.stopping = telemetry, stopping
        self.frames: dict[int, np.ndarray] = {}
        self.audio: dict[int, np.ndarray] = {}
        self.heard: dict[int, bool] = {}
        self.ready_at: dict[int, float] = {}
        self.missing: set[int] = set()
        self.last_second = -1
        self.last_frame: np.ndarray | None = None
        self.next_start = 0

    def take(self, segment: Segment, arrived: float) -> None:
        k = segment.index
        if k <= self.last_second:
            return
        if k - self.last_second > self.window:  # a gap: no window over it has media, go on after it
            self.next_start = max(self.next_start, -(-k // self.stride) * self.stride)
            self.last_second, self.last_frame = k - 1, None
        self.missing.update(range(self.last_second + 1, k))
        self.last_second = k
        if segment.n_frames:
            self.last_frame = segment.frames[0]
        if self.last_frame is not None:
            self.frames[k] = self.last_frame
        else:
            self.missing.add(k)
        self.audio[k], self.heard[k] = segment.audio, segment.has_audio
        self.ready_at[k] = arrived

    def windows(self) -> Iterator[tuple[int, int, int]]:
        """``(index, first second, last second)`` of every window whose seconds are all in; what a window
        needs stays until the caller has taken it (the next ``next()``)."""
        while not self.stopping.is_set():
            start, last = self.next_start, self.next_start + self.window - 1
            if last > self.last_second:
                return
            index = start // self.stride
            self.next_start += self.stride
            if any(t in self.missing or t not in self.frames for t in range(start, last + 1)):
                self.telemetry.count("windows_skipped")
            else:
                yield index, start, last
            self._evict()

    def waveform(self, start: int, last: int) -> tuple[np.ndarray, bool]:
        """The audio of seconds ``start..last`` and whether any of it was heard (not silence for a missing track)."""
        seconds = range(start, last + 1)
        return np.concatenate([self.audio[t] for t in seconds]), any(self.heard[t] for t in seconds)

    def _evict(self) -> None:
        for store in (self.frames, self.audio, self.heard, self.ready_at):
            for t in [t for t in store if t < self.next_start]:
                del store[t]
        self.missing = {t for t in self.missing if t >= self.next_start}
