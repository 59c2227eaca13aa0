"""Crab's audio cut: which windows each task's loader reads (:func:`crab_audio_plan`) and how a
whole clip's waveform is cut into them the authors' way (:func:`cut_clip_audio`,
:class:`ClipAudioCollector`); the generic windows and collectors are :mod:`edgeav.media.windows`'.
"""

from __future__ import annotations

import math

import numpy as np

from edgeav.errors import OptionError
from edgeav.media.segment import SAMPLE_RATE, Segment
from edgeav.media.windows import AudioPlan, AudioWindowCollector

# How Crab's loaders cut a clip's audio (the task table, edgeav.systems.crab.tasks.TASKS, says which each task uses):
# "seconds" one 1-s window per clip second, "avqa" ten 2-s windows spread over the clip, "avss" the second of a frame.
CRAB_AUDIO_PLANS = ("seconds", "avqa", "avss")

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
