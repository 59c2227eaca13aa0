"""The synthetic audio-visual world's scenes: its object classes, what a clip holds, and clips drawn
from a seed.

Each of six object classes has one shape, one saturated colour and one sound; a clip places one to
three objects (never overlapping, always inside the frame) moving linearly, says in which whole
seconds each one sounds, and may add sounds heard but not seen. :func:`sample_clip` draws a clip made
for one of Crab's tasks from a seed, :func:`dataset` a stream of them. How a clip looks and sounds,
and what a model should answer about it, is :mod:`edgeav.bench.world`, which re-exports these names:
import the world from there.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

TASK_KINDS = ("ave", "avvp", "s4", "ms3", "arig", "avss", "avqa")
DEFAULT_DURATION_S = {"ave": 10, "avvp": 10, "s4": 5, "ms3": 5, "arig": 5, "avss": 10, "avqa": 10}
HALF_SIZE_RANGE = (0.075, 0.19)  # half-side as a share of the height: 34-85 px boxes on the 224 grid
SHAPES = ("square", "circle", "triangle", "diamond", "cross", "ring")


# --------------------------------------------------------------------------- the world's classes


@dataclass(frozen=True)
class ObjectClass:
    """One kind of object: how it looks and how it sounds.

    Attributes:
        name: the one-word label the model writes.
        shape: one of ``SHAPES``.
        color: RGB, saturated (some channel >= 200), far from every background.
        f0_hz: fundamental frequency.
        partials: frequencies of the partials as multiples of ``f0_hz`` (the first is 1).
        weights: amplitude of each partial.
        am_hz: amplitude-modulation rate (0: steady).
        am_depth: share of the amplitude the modulation takes away at its trough.
    """

    name: str
    shape: str
    color: tuple[int, int, int]
    f0_hz: float
    partials: tuple[float, ...]
    weights: tuple[float, ...]
    am_hz: float = 0.0
    am_depth: float = 0.0

    def waveform(self, t: np.ndarray) -> np.ndarray:
        """The class's sound at times ``t`` (seconds), peak at most 1."""
        wave = np.zeros_like(t)
        for ratio, weight in zip(self.partials, self.weights):
            wave += weight * np.sin(2 * np.pi * self.f0_hz * ratio * t)
        wave *= 1.0 / sum(self.weights)
        if self.am_hz:
            wave *= 1.0 - self.am_depth * 0.5 * (1.0 - np.cos(2 * np.pi * self.am_hz * t))
        return wave


# Fundamentals sit >= 5 mel bins apart in the 128-bin Kaldi fbank at 16 kHz, and every
# partial keeps >= 100 Hz from the other classes' fundamentals: below 1 kHz a tone leaks
# into the mel bins within ~80 Hz (the 25-ms window's main lobe).
CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("bell", "square", (240, 200, 30), 1000.0, (1.0, 2.76), (1.0, 0.5), am_hz=2.0, am_depth=0.8),
    ObjectClass("drum", "circle", (225, 45, 45), 200.0, (1.0, 2.75), (1.0, 0.5), am_hz=6.0, am_depth=1.0),
    ObjectClass("flute", "triangle", (50, 205, 70), 740.0, (1.0, 3.0), (1.0, 0.2)),
    ObjectClass("horn", "diamond", (60, 100, 245), 300.0, (1.0, 2.0, 3.0, 4.0), (1.0, 0.7, 0.5, 0.35)),
    ObjectClass("siren", "cross", (220, 60, 225), 450.0, (1.0, 3.0, 5.0), (1.0, 0.4, 0.2), am_hz=3.0, am_depth=0.6),
    ObjectClass("whistle", "ring", (40, 215, 225), 1550.0, (1.0,), (1.0,), am_hz=12.0, am_depth=0.5),
)
CLASS_NAMES = tuple(c.name for c in CLASSES)

Intervals = tuple[tuple[int, int], ...]  # whole-second [start, end) pairs, sorted and disjoint


# --------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class WorldObject:
    """A visible object.

    Attributes:
        class_index: index into ``CLASSES``.
        half_size: half the side of the shape's square box, as a share of the frame height.
        start_xy: centre at time 0, as shares of the frame width and height.
        end_xy: centre at the end of the clip; the centre moves linearly in between.
        sounding: seconds in which it sounds, whole-second [start, end) pairs.
        visible: seconds in which it is on screen; None means the whole clip.
    """

    class_index: int
    half_size: float
    start_xy: tuple[float, float]
    end_xy: tuple[float, float]
    sounding: Intervals = ()
    visible: Intervals | None = None

    @property
    def name(self) -> str:
        return CLASSES[self.class_index].name


@dataclass(frozen=True)
class OffscreenSound:
    """A sound heard but not seen: ``class_index`` sounds in the ``sounding`` seconds."""

    class_index: int
    sounding: Intervals


@dataclass(frozen=True)
class WorldClip:
    """Everything that defines a clip; the renderers need nothing else.

    Attributes:
        duration_s: length in whole seconds.
        width, height: frame size in pixels.
        fps: frame rate of :func:`write_clip` and of the frame times a trainer samples.
        objects: the visible objects, one per class at most.
        offscreen: sounds heard but not seen, of classes not on screen.
        noise: standard deviation of the white background noise.
        background: RGB of the (plain, dark) background.
        seed: drives the background noise, and identifies the clip.
        question: the AVQA question drawn with the clip ("" for other kinds).
    """

    duration_s: int
    width: int
    height: int
    fps: int
    objects: tuple[WorldObject, ...]
    offscreen: tuple[OffscreenSound, ...] = ()
    noise: float = 0.01
    background: tuple[int, int, int] = (30, 30, 30)
    seed: int = 0
    question: str = ""


# --------------------------------------------------------------------------- seconds


def is_on(intervals: Intervals | None, t: float) -> bool:
    """Is time ``t`` inside one of the [start, end) intervals (None: the whole clip)?"""
    return intervals is None or any(s <= t < e for s, e in intervals)


def seconds_on(intervals: Intervals | None, duration: int) -> np.ndarray:
    """Bool [duration]: which seconds the intervals cover (None: all)."""
    on = np.zeros(duration, bool)
    if intervals is None:
        on[:] = True
    for s, e in intervals or ():
        on[max(s, 0) : min(e, duration)] = True
    return on


# --------------------------------------------------------------------------- sampling


def _random_runs(rng: np.random.Generator, duration: int, max_runs: int = 2) -> Intervals:
    """One to ``max_runs`` separated runs of at least a second."""
    n = int(rng.integers(1, min(max_runs, (duration + 1) // 2) + 1))
    cuts = np.sort(rng.choice(duration + 1, 2 * n, replace=False)).tolist()
    return tuple((cuts[2 * k], cuts[2 * k + 1]) for k in range(n))


def _cover(rng: np.random.Generator, duration: int, k: int) -> list[Intervals]:
    """``k`` single runs whose union is the whole clip, each at least a second, some overlapping."""
    cuts = [0, *sorted(rng.choice(np.arange(1, duration), k - 1, replace=False).tolist()), duration]
    runs = []
    for j in range(k):
        s = max(0, cuts[j] - int(rng.integers(0, 2)))
        e = min(duration, cuts[j + 1] + int(rng.integers(0, 2)))
        runs.append(((s, e),))
    return [runs[j] for j in rng.permutation(k)]


@dataclass(frozen=True)
class _Plan:
    """What an object does before it is placed: class, sounding and visible seconds, motion."""

    class_index: int
    sounding: Intervals = ()
    visible: Intervals | None = None
    static: bool = False
    side: str = ""  # "left"/"right": the centre stays in that half of the frame


def _overlap_at_some_time(p: np.ndarray, q: np.ndarray, reach: float) -> bool:
    """Do two boxes whose centre offset moves linearly from ``p`` (a = 0) by ``q`` (to a = 1)
    ever come closer than ``reach`` on both axes at once?"""
    lo, hi = 0.0, 1.0
    for d0, dd in zip(p, q):
        if abs(dd) < 1e-12:
            if abs(d0) >= reach:
                return False
            continue
        a, b = sorted(((-reach - d0) / dd, (reach - d0) / dd))
        lo, hi = max(lo, a), min(hi, b)
    return lo < hi


def _place(rng: np.random.Generator, plans: Sequence[_Plan], width: int, height: int) -> tuple[WorldObject, ...]:
    """Sizes and trajectories by rejection: inside the frame, boxes >= 2 px apart at every time."""
    size = np.array([width, height], float)
    for _ in range(1000):
        placed: list[tuple[WorldObject, np.ndarray, np.ndarray, float]] = []
        for plan in plans:
            for _ in range(50):
                half = rng.uniform(*HALF_SIZE_RANGE)
                r = half * height
                lo, hi = (r + 1) / size, 1 - (r + 1) / size
                if plan.side == "left":
                    hi[0] = min(hi[0], 0.45)
                elif plan.side == "right":
                    lo[0] = max(lo[0], 0.55)
                if np.any(lo >= hi):
                    continue
                start = rng.uniform(lo, hi)
                end = start if plan.static else start + rng.uniform(0.2, 0.7) * (rng.uniform(lo, hi) - start)
                p0, p1 = start * size, end * size
                if all(
                    not _overlap_at_some_time(p0 - q0, (p1 - p0) - (q1 - q0), r + rq + 2)
                    for _, q0, q1, rq in placed
                ):
                    obj = WorldObject(
                        plan.class_index, float(half), (float(start[0]), float(start[1])),
                        (float(end[0]), float(end[1])), plan.sounding, plan.visible,
                    )
                    placed.append((obj, p0, p1, r))
                    break
            else:
                break  # no room for this object: start the clip's layout again
        else:
            return tuple(obj for obj, *_ in placed)
    raise RuntimeError(f"cannot place {len(plans)} objects in a {width}x{height} frame; make the frame larger")


def _plan_ave(rng, duration, classes):
    n_distractors = int(rng.integers(0, 3))
    length = int(rng.integers(2, duration + 1))
    start = int(rng.integers(0, duration - length + 1))
    plans = [_Plan(classes[0], ((start, start + length),), static=rng.random() < 0.3)]
    plans += [_Plan(c, static=rng.random() < 0.3) for c in classes[1 : 1 + n_distractors]]
    offscreen = ()
    if rng.random() < 0.3:
        offscreen = (OffscreenSound(classes[1 + n_distractors], _random_runs(rng, duration, 1)),)
    return plans, offscreen, ""


def _plan_avvp(rng, duration, classes):
    while True:
        plans, offscreen = [], []
        for j, c in enumerate(classes[: int(rng.integers(1, 4))]):
            role = rng.choice(["sounding", "silent", "offscreen"], p=[0.7, 0.3, 0.0] if j == 0 else [0.4, 0.3, 0.3])
            if role == "offscreen":
                offscreen.append(OffscreenSound(c, _random_runs(rng, duration)))
                continue
            visible = None
            if duration >= 4 and rng.random() < 0.4:  # on screen for part of the clip only
                length = int(rng.integers(3, duration))
                start = int(rng.integers(0, duration - length + 1))
                visible = ((start, start + length),)
            sounding = _random_runs(rng, duration) if role == "sounding" else ()
            plans.append(_Plan(c, sounding, visible, static=rng.random() < 0.3))
        # The task is to tell hearing from seeing: draw again when both tell the same story.
        if offscreen or any((seconds_on(p.sounding, duration) != seconds_on(p.visible, duration)).any() for p in plans):
            return plans, tuple(offscreen), ""


def _plan_single_sounder(rng, duration, classes, static=False):
    n_distractors = int(rng.integers(0, 3))
    plans = [_Plan(classes[0], ((0, duration),), static=static or rng.random() < 0.3)]
    plans += [_Plan(c, static=static or rng.random() < 0.3) for c in classes[1 : 1 + n_distractors]]
    return plans, (), ""


def _plan_covered(rng, duration, classes, n_objects, max_sounders):
    k = int(rng.integers(1, min(max_sounders, n_objects, duration) + 1))
    runs = _cover(rng, duration, k)
    plans = [_Plan(c, runs[j] if j < k else (), static=rng.random() < 0.3) for j, c in enumerate(classes[:n_objects])]
    return plans, (), ""


QUESTIONS = {
    "count": "How many objects are making sound?",
    "which": "Which object is making sound?",
    "when": "Does the {name} start making sound in the first or the second half?",
    "where": "Is the sounding object on the left or the right?",
}


def _plan_avqa(rng, duration, classes):
    kind = ("count", "which", "when", "where")[int(rng.integers(0, 4))]
    if kind == "count":  # the count first, so the three answers come equally often
        k = int(rng.integers(1, 4))
        n = int(rng.integers(k, 4))
    else:
        n = int(rng.integers(1, 4))
        k = int(rng.integers(1, n + 1)) if kind == "when" else 1
    runs = [_random_runs(rng, duration) for _ in range(k)]
    question = QUESTIONS[kind]
    side = ""
    if kind == "when":  # one run for the named object, starting in the half drawn
        half = math.ceil(duration / 2)  # the first second of the second half
        start = int(rng.integers(0, half)) if rng.random() < 0.5 else int(rng.integers(half, duration))
        runs[0] = ((start, int(rng.integers(start + 1, duration + 1))),)
        question = question.format(name=CLASSES[classes[0]].name)
    if kind == "where":
        side = "left" if rng.random() < 0.5 else "right"
    plans = [
        _Plan(c, runs[j] if j < k else (), static=rng.random() < 0.3, side=side if j == 0 else "")
        for j, c in enumerate(classes[:n])
    ]
    return plans, (), question


def sample_clip(
    seed: int, kind: str, duration_s: int | None = None, width: int = 320, height: int = 240, fps: int = 10
) -> WorldClip:
    """A clip made for task ``kind`` (one of ``TASK_KINDS``), fully determined by ``seed``.

    - ave: one visible object sounds during one run of >= 2 s; 0-2 silent visible
      distractors; in 30% of clips a sound off screen, of a class not on screen.
    - avvp: 1-3 classes, each sounding on screen, silent on screen (visual only) or
      off screen (audio only); objects may be on screen for part of the clip only.
    - s4: exactly one object sounds the whole clip; 0-2 silent distractors.
    - ms3: two or three objects, one or two sounding, together covering every second.
    - arig: as s4, with every object static.
    - avss: 1-3 objects, one or more sounding, together covering every second.
    - avqa: 1-3 objects and a question (``QUESTIONS``) the clip answers unambiguously.

    ``duration_s`` defaults to 10 s (ave, avvp, avss, avqa) or 5 s (s4, ms3, arig).
    """
    if kind not in DEFAULT_DURATION_S:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(TASK_KINDS)}")
    duration = DEFAULT_DURATION_S[kind] if duration_s is None else int(duration_s)
    if duration < 2:
        raise ValueError(f"duration_s={duration_s}: a world clip lasts at least 2 s")
    if seed < 0:
        raise ValueError(f"seed={seed}: seeds are non-negative integers")
    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(15, 80, 3))
    noise = float(rng.uniform(0.003, 0.02))
    classes = [int(c) for c in rng.permutation(len(CLASSES))]
    if kind == "ave":
        plans, offscreen, question = _plan_ave(rng, duration, classes)
    elif kind == "avvp":
        plans, offscreen, question = _plan_avvp(rng, duration, classes)
    elif kind in ("s4", "arig"):
        plans, offscreen, question = _plan_single_sounder(rng, duration, classes, static=kind == "arig")
    elif kind == "ms3":
        plans, offscreen, question = _plan_covered(rng, duration, classes, int(rng.integers(2, 4)), 2)
    elif kind == "avss":
        plans, offscreen, question = _plan_covered(rng, duration, classes, int(rng.integers(1, 4)), 3)
    else:
        plans, offscreen, question = _plan_avqa(rng, duration, classes)
    objects = _place(rng, plans, width, height)
    return WorldClip(duration, width, height, fps, objects, offscreen, noise, background, seed, question)


def dataset(
    seed: int, n: int | None, kinds: Sequence[str] = TASK_KINDS, *, width: int = 320, height: int = 240, fps: int = 10
) -> Iterator[tuple[WorldClip, str]]:
    """``n`` (clip, kind) pairs (endless for None), kinds in turn; each clip's seed is spawned
    from ``seed`` (numpy SeedSequence), so two seeds give unrelated samples (train vs held out)."""
    sequence = np.random.SeedSequence(seed)
    for i in itertools.count() if n is None else range(n):
        (child,) = sequence.spawn(1)  # one at a time: the same children as spawn(n), none held
        kind = kinds[i % len(kinds)]
        clip_seed = int(child.generate_state(1, np.uint64)[0])
        yield sample_clip(clip_seed, kind, width=width, height=height, fps=fps), kind



__all__ = [
    "CLASSES", "CLASS_NAMES", "DEFAULT_DURATION_S", "HALF_SIZE_RANGE", "Intervals", "ObjectClass", "OffscreenSound",
    "QUESTIONS", "SHAPES", "TASK_KINDS", "WorldClip", "WorldObject", "dataset", "is_on", "sample_clip", "seconds_on",
]
