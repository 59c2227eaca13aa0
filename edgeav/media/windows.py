"""Crab's audio windows: which stretches of audio each task feeds to BEATs.

Two ways to cut them:

- a clip (``Runtime.run``) is cut as Crab's dataset loaders cut it
  (:class:`ClipAudioCollector`): the clip's whole waveform of ``n`` samples is
  split into ``clip_s`` parts of ``n // clip_s`` samples, so the pieces follow
  the clip's real length (16,012 samples for a 160,125-sample 10-s clip);
- a stream's windows (``edgeav.stream``) and a clip far from its task's clip
  length are cut in exact 16,000-sample seconds (:class:`AudioWindowCollector`).
"""

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


# How Crab's loaders cut a clip's audio (the task table, edgeav.tasks.TASKS, says which each task uses):
# "seconds" one 1-s window per clip second, "avqa" ten 2-s windows spread over the clip, "avss" the second of a frame.
CRAB_AUDIO_PLANS = ("seconds", "avqa", "avss")
MAX_WINDOW_S = 600  # a stream's window lasts at most this long (its media is held in memory)

AVQA_WINDOWS = 10
# Audio that ends within this of its task's clip length is that clip (the authors' example mp3 of a
# 10-s clip lasts 10.008 s): it is cut whole, their way. Further off, it is cut in exact seconds.
WHOLE_CLIP_SLACK_S = 1.0


def crab_audio_plan(plan: str, *, clip_s: int, duration_s: float | None = None,
                    frame_time_s: float = 0.0) -> AudioPlan:
    """The windows Crab cuts for a task whose clips last ``clip_s`` seconds and whose loader is ``plan``.

    - seconds: ``clip_s`` 1-s windows from 0 s (AVE, AVVP, Ref-AVS: ten; S4, MS3, ARIG: five).
    - avqa: ten 2-s windows [t - 0.5, t + 1.5] centred at t = i * duration / 10
      (0, 6, ..., 54 for Crab's 60-s clips; ``duration_s`` defaults to ``clip_s``).
    - avss: the 1-s window holding ``frame_time_s``.
    """
    if plan == "seconds":
        return AudioPlan(tuple(float(i) for i in range(clip_s)), 1.0)
    if plan == "avqa":
        step = (duration_s or clip_s) / AVQA_WINDOWS
        return AudioPlan(tuple(i * step - 0.5 for i in range(AVQA_WINDOWS)), 2.0)
    if plan == "avss":
        return AudioPlan((float(math.floor(frame_time_s)),), 1.0)
    raise OptionError(f"audio plan {plan!r} is unknown; expected one of {', '.join(CRAB_AUDIO_PLANS)}")


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


def cut_clip_audio(waveform: np.ndarray, plan: AudioPlan, clip_s: int) -> np.ndarray:
    """Cut a clip's whole waveform the way Crab's dataset loaders do: float32 [n_windows, samples].

    With ``nps = len(waveform) // clip_s`` samples per clip second, the window
    starting at ``a`` holds ``waveform[int(max(a, 0) * nps) : int(min(a + length, clip_s) * nps)]``,
    zero-padded to ``length * nps`` samples: at the front when it starts before 0
    (AVQA's first window), else at the back.
    """
    nps = len(waveform) // clip_s
    n = round(plan.length_s * nps)
    pieces = np.zeros((len(plan.starts_s), n), np.float32)
    for row, start in enumerate(plan.starts_s):
        piece = waveform[int(max(start, 0.0) * nps) : int(min(start + plan.length_s, clip_s) * nps)]
        if start < 0:
            pieces[row, n - piece.size :] = piece
        else:
            pieces[row, : piece.size] = piece
    return pieces


class ClipAudioCollector:
    """A clip's audio pieces for one task, from its audio segments as they pass.

    ``crab_plans`` (per key: the clip, or each AVSS frame second) are cut from the
    whole waveform with :func:`cut_clip_audio` when the audio lasts ``clip_s`` seconds
    give or take :data:`WHOLE_CLIP_SLACK_S`; otherwise ``exact_plans`` are filled in
    exact seconds (the first ``clip_s`` seconds of a longer clip, silence after a
    shorter one). At most ``clip_s + WHOLE_CLIP_SLACK_S`` seconds of audio are kept.
    """

    def __init__(self, clip_s: int, crab_plans: dict, exact_plans: dict) -> None:
        self.clip_s = clip_s
        self._crab_plans = crab_plans
        self._exact = {key: AudioWindowCollector(plan) for key, plan in exact_plans.items()}
        self._limit = round((clip_s + WHOLE_CLIP_SLACK_S) * SAMPLE_RATE) + 1
        self._kept: list[np.ndarray] = []
        self._n_kept = 0

    @property
    def done(self) -> bool:
        """More audio than a whole clip is kept, and every exact window is filled."""
        return self._n_kept >= self._limit and all(c.done for c in self._exact.values())

    def add(self, segment: Segment) -> None:
        for collector in self._exact.values():
            collector.add(segment)
        if self._n_kept < self._limit:
            kept = segment.audio[: self._limit - self._n_kept]
            self._kept.append(kept)
            self._n_kept += kept.size

    def is_whole_clip(self, n_samples: int) -> bool:
        """Whether audio of ``n_samples`` decoded samples is cut whole, the authors' way."""
        n = min(n_samples, self._n_kept)
        return abs(n - self.clip_s * SAMPLE_RATE) <= WHOLE_CLIP_SLACK_S * SAMPLE_RATE

    def pieces(self, n_samples: int) -> dict:
        """The pieces per key, given the audio's real length: ``n_samples`` decoded samples
        (segments pad their last second with zeros; those are not the clip's)."""
        if self.is_whole_clip(n_samples):
            waveform = np.concatenate(self._kept)[: min(n_samples, self._n_kept)]
            return {key: cut_clip_audio(waveform, plan, self.clip_s) for key, plan in self._crab_plans.items()}
        return {key: collector.windows for key, collector in self._exact.items()}


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
