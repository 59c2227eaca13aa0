"""A synthetic audio-visual world: coloured shapes that sound, drawn from a seed.

edgeav trains its demo model (crab-tiny, every weight from scratch) on clips of this
world and evaluates every export on a held-out set drawn from it. The scenes (the six
object classes, what a clip holds, clips drawn from a seed) are
:mod:`edgeav.bench.world_scene`, re-exported here; this module renders them and says what
they hold: pixels, samples, masks and boxes, the training targets, and :func:`truth`, the
exact text Crab was trained to emit (the short form, no reasoning preamble) with the
structured values the metrics of :mod:`edgeav.metrics` compare with.

    clip = sample_clip(seed=7, kind="ave")
    frame = render_frame(clip, 2.0)                     # uint8 [240, 320, 3]
    audio = render_audio(clip, 0, 16000)                # float32, the first second
    truth(clip, "ave").text   # '<event> bell </event>, and the time range is <range> 1,10 </range>'

Rendering is pure numpy with no codec and no state: a clip and a time (or a sample
range) determine the pixels (or samples) exactly, whatever the chunking.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgeav.bench.world_scene import (
    CLASS_NAMES,
    CLASSES,
    DEFAULT_DURATION_S,
    QUESTIONS,
    SHAPES,
    TASK_KINDS,
    Intervals,
    ObjectClass,
    OffscreenSound,
    WorldClip,
    WorldObject,
    dataset,
    is_on,
    sample_clip,
    seconds_on,
)
from edgeav.media import synth
from edgeav.systems.crab.tasks import MASK_TOKENS, MODEL_IMAGE_SIZE
from edgeav.tasks import Event

SAMPLE_RATE = 16000
FADE_S = 0.010  # linear fade at both edges of every sounding interval: no clicks
SOURCE_AMPLITUDE = 0.25  # peak of one source; at most three sound at once, so the sum stays below 1
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


# --------------------------------------------------------------------------- rendering


def _centre_px(clip: WorldClip, obj: WorldObject, t: float) -> tuple[float, float]:
    a = min(max(t / clip.duration_s, 0.0), 1.0)
    x = obj.start_xy[0] + a * (obj.end_xy[0] - obj.start_xy[0])
    y = obj.start_xy[1] + a * (obj.end_xy[1] - obj.start_xy[1])
    return x * clip.width, y * clip.height


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u, v), in units of the half-size around the centre, the shape covers."""
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "triangle":  # apex up at (0, -1), base from (-1, 1) to (1, 1)
        return (v <= 1) & (v >= 2 * np.abs(u) - 1)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.35) & (av <= 1)) | ((av <= 0.35) & (au <= 1))
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 1) & (d2 >= 0.55**2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _placed(clip: WorldClip, index: int, t: float) -> tuple[int, int, np.ndarray] | None:
    """Object ``index`` at time ``t`` as (top row, left column, bool mask of its box), or None when hidden.

    Pixel (x, y) is covered when its centre (x + 0.5, y + 0.5) is inside the shape.
    """
    obj = clip.objects[index]
    if not is_on(obj.visible, t):
        return None
    cx, cy = _centre_px(clip, obj, t)
    r = obj.half_size * clip.height
    x0, x1 = max(0, math.floor(cx - r)), min(clip.width, math.ceil(cx + r) + 1)
    y0, y1 = max(0, math.floor(cy - r)), min(clip.height, math.ceil(cy + r) + 1)
    u = (np.arange(x0, x1) + 0.5 - cx)[None, :] / r
    v = (np.arange(y0, y1) + 0.5 - cy)[:, None] / r
    return y0, x0, _inside(CLASSES[obj.class_index].shape, u, v)


def render_frame(clip: WorldClip, t: float) -> np.ndarray:
    """The RGB frame (uint8 [H, W, 3]) shown at time ``t`` seconds."""
    frame = np.empty((clip.height, clip.width, 3), np.uint8)
    frame[:] = clip.background
    for i, obj in enumerate(clip.objects):
        placed = _placed(clip, i, t)
        if placed is not None:
            y0, x0, inside = placed
            frame[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]][inside] = CLASSES[obj.class_index].color
    return frame


def object_mask(clip: WorldClip, index: int, t: float) -> np.ndarray:
    """Bool [H, W]: the pixels of object ``index`` at time ``t`` (all False while it is hidden)."""
    mask = np.zeros((clip.height, clip.width), bool)
    placed = _placed(clip, index, t)
    if placed is not None:
        y0, x0, inside = placed
        mask[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]] = inside
    return mask


def class_map(clip: WorldClip, t: float, *, only: Sequence[int] | None = None) -> np.ndarray:
    """Uint8 [H, W]: 0 for background, class index + 1 where an object is shown at ``t``.

    ``only`` limits the map to those object indexes (AVSS truth keeps the sounding ones).
    """
    labels = np.zeros((clip.height, clip.width), np.uint8)
    for i, obj in enumerate(clip.objects):
        if only is not None and i not in only:
            continue
        placed = _placed(clip, i, t)
        if placed is not None:
            y0, x0, inside = placed
            labels[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]][inside] = obj.class_index + 1
    return labels


def box(clip: WorldClip, index: int, t: float, grid: int = MODEL_IMAGE_SIZE) -> tuple[int, int, int, int]:
    """Box ``(x1, y1, x2, y2)`` of object ``index`` at ``t`` on the ``grid`` x ``grid`` model image.

    The frame is stretched to the square grid (as Crab's preprocessing does); the box
    is the object's pixel extent scaled there, rounded outwards, so it encloses the mask.
    """
    placed = _placed(clip, index, t)
    if placed is None:
        raise ValueError(f"object {index} ({clip.objects[index].name}) is not visible at {t} s; it has no box")
    y0, x0, inside = placed
    if not inside.any():
        raise ValueError(f"object {index} ({clip.objects[index].name}) covers no pixel centre at {t} s; it has no box")
    cols, rows = np.flatnonzero(inside.any(0)), np.flatnonzero(inside.any(1))
    left, top = x0 + int(cols[0]), y0 + int(rows[0])
    right, bottom = x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1  # exclusive pixel edges
    # Integer floor and ceiling: exact, so the box never cuts a pixel through float rounding.
    return (
        left * grid // clip.width,
        top * grid // clip.height,
        -(-right * grid // clip.width),
        -(-bottom * grid // clip.height),
    )


def _sources(clip: WorldClip) -> Iterator[tuple[int, Intervals]]:
    for obj in clip.objects:
        yield obj.class_index, obj.sounding
    for sound in clip.offscreen:
        yield sound.class_index, sound.sounding


def _noise(seed: int, start: int, n: int, block: int) -> np.ndarray:
    # Drawn per fixed block of samples, so any chunking of the stream gives the same noise.
    first, last = start // block, (start + n - 1) // block
    noise = np.concatenate(
        [np.random.default_rng([seed, 0x6E6F6973, b]).standard_normal(block) for b in range(first, last + 1)]
    )
    return noise[start - first * block : start - first * block + n]


def render_audio(clip: WorldClip, start_sample: int, n: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples [start, start + n) of the clip's audio (peak below 1).

    The sum of every sounding source (visible or off screen), each faded in and out
    over ``FADE_S`` inside its intervals, plus the clip's white noise.
    """
    out = np.zeros(n, np.float64)
    if n <= 0:
        return out.astype(np.float32)
    for class_index, intervals in _sources(clip):
        sound = CLASSES[class_index]
        for s, e in intervals:
            lo = max(start_sample, math.ceil(s * sample_rate))
            hi = min(start_sample + n, math.ceil(e * sample_rate))
            if hi <= lo:
                continue
            t = np.arange(lo, hi) / sample_rate
            envelope = np.clip(np.minimum(t - s, e - t) / FADE_S, 0.0, 1.0)
            out[lo - start_sample : hi - start_sample] += SOURCE_AMPLITUDE * envelope * sound.waveform(t)
    if clip.noise > 0:
        out += clip.noise * _noise(clip.seed, start_sample, n, max(1, sample_rate // 4))
    return np.clip(out, -0.99, 0.99).astype(np.float32)


def write_clip(clip: WorldClip, path: str | Path) -> Path:
    """Encode the clip through edgeav's test-media muxer (.mp4: H.264 + AAC, mono 16 kHz)."""
    path = Path(path)
    rate = synth.encodable_rate(path, SAMPLE_RATE)
    synth.write_media(
        path,
        duration_s=clip.duration_s,
        fps=clip.fps,
        width=clip.width,
        height=clip.height,
        render_frame=lambda t: render_frame(clip, t),
        render_audio=lambda start, n: render_audio(clip, start, n, rate),
        sample_rate=rate,
        channels=1,
    )
    return path


# --------------------------------------------------------------------------- training targets


def frame_objects(clip: WorldClip, t: float, grid: int = MODEL_IMAGE_SIZE) -> np.ndarray:
    """Float32 [classes, 5] of what frame ``t`` shows: per class, 1 if an object of it is on
    screen, then its box ``(x1, y1, x2, y2)`` on the ``grid`` as shares of the grid (0 when absent).

    Training uses it as an auxiliary target that teaches the visual tokens where things are."""
    out = np.zeros((len(CLASSES), 5), np.float32)
    for i, obj in enumerate(clip.objects):
        placed = _placed(clip, i, t)
        if placed is not None and placed[2].any():
            out[obj.class_index] = (1.0, *(v / grid for v in box(clip, i, t, grid)))
    return out


def sounds_between(clip: WorldClip, start_s: float, end_s: float) -> np.ndarray:
    """Float32 [classes]: 1 for each class heard (on or off screen) somewhere in [start_s, end_s)."""
    out = np.zeros(len(CLASSES), np.float32)
    for class_index, intervals in _sources(clip):
        if any(s < end_s and start_s < e for s, e in intervals):
            out[class_index] = 1.0
    return out


# --------------------------------------------------------------------------- ground truth


def _runs(on: np.ndarray) -> Intervals:
    """Bool [duration] -> the [start, end) runs of True."""
    edges = np.diff(np.concatenate(([0], on.astype(np.int8), [0])))
    return tuple(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


@dataclass(frozen=True, eq=False)
class Truth:
    """What Crab should answer about a clip for one task.

    Attributes:
        kind: the task.
        text: the exact target text (parses back with the task's parser in edgeav.tasks).
        events: AVE ("audio-visual") or AVVP ("audio", "visual") events.
        box: ARIG box on the 224x224 model grid.
        mask: S4/MS3: bool [H, W] of the sounding objects at ``second``; AVSS: uint8
            [H, W] class map (class index + 1) of the sounding objects; at the clip's size.
        answer: AVQA answer.
        question: AVQA question (None for every other task).
        object_label: the sounding object(s) named by ARIG and the mask tasks.
        second: the second the mask or box is taken at.
    """

    kind: str
    text: str
    events: tuple[Event, ...] = ()
    box: tuple[int, int, int, int] | None = None
    mask: np.ndarray | None = None
    answer: str | None = None
    question: str | None = None
    object_label: str | None = None
    second: int = 0


_MASK_TEXT = "".join(f"<mask_{i}>" for i in range(MASK_TOKENS))


def _class_runs(clip: WorldClip, pick) -> dict[int, Intervals]:
    """class index -> runs of the seconds where ``pick(source) -> bool[duration]`` holds, in class order."""
    per_class: dict[int, np.ndarray] = {}
    for source in (*clip.objects, *clip.offscreen):
        on = pick(source)
        if on.any():
            per_class[source.class_index] = per_class.get(source.class_index, on) | on
    return {c: _runs(per_class[c]) for c in sorted(per_class)}


def _visible_seconds(clip: WorldClip, source) -> np.ndarray:
    if isinstance(source, OffscreenSound):
        return np.zeros(clip.duration_s, bool)
    return seconds_on(source.visible, clip.duration_s)


def _sounders_at(clip: WorldClip, second: int) -> list[int]:
    """Indexes of the objects on screen and sounding in ``second``, in class order."""
    found = [
        i for i, obj in enumerate(clip.objects)
        if is_on(obj.visible, float(second)) and seconds_on(obj.sounding, clip.duration_s)[second]
    ]
    return sorted(found, key=lambda i: clip.objects[i].class_index)


def _truth_ave(clip: WorldClip) -> Truth:
    d = clip.duration_s
    runs = _class_runs(clip, lambda s: _visible_seconds(clip, s) & seconds_on(s.sounding, d))
    spans = sorted((s, e, CLASSES[c].name) for c, rs in runs.items() for s, e in rs)
    events = tuple(Event(name, float(s), float(e), "audio-visual") for s, e, name in spans)
    text = "; ".join(f"<event> {name} </event>, and the time range is <range> {s},{e} </range>" for s, e, name in spans)
    return Truth("ave", text or "There is no audio-visual event.", events=events)


def _truth_avvp(clip: WorldClip) -> Truth:
    d = clip.duration_s
    blocks, events = [], []
    heard, seen = (lambda src: seconds_on(src.sounding, d)), (lambda src: _visible_seconds(clip, src))
    for modality, pick in (("audio", heard), ("visual", seen)):
        for c, runs in _class_runs(clip, pick).items():
            name = CLASSES[c].name
            intervals = ",".join(f"({s} {e})" for s, e in runs)
            blocks.append(f"<{modality}_event>{name},{intervals}</{modality}_event>")
            events += [Event(name, float(s), float(e), modality) for s, e in runs]
    return Truth("avvp", "".join(blocks), events=tuple(events))


def _truth_mask(clip: WorldClip, kind: str, second: int) -> Truth:
    sounders = _sounders_at(clip, second)
    label = " and ".join(clip.objects[i].name for i in sounders) or "nothing"
    t = float(second)
    if kind == "avss":
        mask = class_map(clip, t, only=sounders)
    else:
        mask = np.zeros((clip.height, clip.width), bool)
        for i in sounders:
            mask |= object_mask(clip, i, t)
    text = f"The object making the sound in the video is {label}. <mask_start>{_MASK_TEXT}<mask_end>"
    return Truth(kind, text, mask=mask, object_label=label, second=second)


def _truth_arig(clip: WorldClip, second: int) -> Truth:
    sounding = [i for i, obj in enumerate(clip.objects) if obj.sounding and is_on(obj.visible, float(second))]
    if not sounding:
        raise ValueError(f"clip {clip.seed}: no visible object sounds, so ARIG has no answer; draw an 'arig' clip")
    # The longest-sounding object is the one to ground (an 'arig' clip has exactly one).
    index = max(sounding, key=lambda i: (seconds_on(clip.objects[i].sounding, clip.duration_s).sum(), -i))
    x1, y1, x2, y2 = box(clip, index, float(second))
    name = clip.objects[index].name
    text = (f"The sounding object is {name}. Its coordinate of top left corner is ({x1},{y1}) "
            f"and coordinate of bottom right corner is ({x2},{y2})")
    return Truth("arig", text, box=(x1, y1, x2, y2), object_label=name, second=second)


def _avqa_answer(clip: WorldClip, question: str) -> str:
    d = clip.duration_s
    sounding = [obj for obj in clip.objects if obj.sounding]
    if question == QUESTIONS["count"]:
        return NUMBER_WORDS[len(sounding)]
    if question in (QUESTIONS["which"], QUESTIONS["where"]):
        if len(sounding) != 1:
            raise ValueError(f"question {question!r} needs exactly one sounding object; clip {clip.seed} has "
                             f"{len(sounding)}")
        obj = sounding[0]
        if question == QUESTIONS["which"]:
            return obj.name
        mean_x = (obj.start_xy[0] + obj.end_xy[0]) / 2
        return "left" if mean_x < 0.5 else "right"
    when = re.fullmatch(re.escape(QUESTIONS["when"]).replace(re.escape("{name}"), r"(\w+)"), question)
    if when:
        named = [obj for obj in clip.objects if obj.name == when.group(1) and obj.sounding]
        if not named:
            raise ValueError(f"question {question!r}: no {when.group(1)} sounds in clip {clip.seed}")
        onset = min(s for s, _ in named[0].sounding)
        return "first" if onset < d / 2 else "second"
    raise ValueError(f"question {question!r} is not one of the world's questions; expected one of "
                     + "; ".join(repr(q) for q in QUESTIONS.values()))


def truth(clip: WorldClip, kind: str, *, second: int = 0, question: str | None = None) -> Truth:
    """The target text and structured truth of ``clip`` for task ``kind``.

    ``second``: S4/MS3 (0-4) and AVSS take the mask there; ARIG the box. ``question``
    (AVQA) defaults to the one drawn with the clip. The target texts, short forms of
    what Crab was trained to write (CRAB_SPEC section 4):

    - ave: ``<event> bell </event>, and the time range is <range> 2,5 </range>`` (end
      exclusive), one per run of seconds where an object is both on screen and sounding.
    - avvp: ``<audio_event>bell,(2 5)</audio_event>`` per class heard, then
      ``<visual_event>bell,(0 10)</visual_event>`` per class seen, classes in table order.
    - arig: ``The sounding object is bell. Its coordinate of top left corner is (x1,y1)
      and coordinate of bottom right corner is (x2,y2)``.
    - s4, ms3, avss: ``The object making the sound in the video is bell and drum.
      <mask_start><mask_0>...<mask_5><mask_end>``, naming the objects sounding in ``second``.
    - avqa: ``<answer> two </answer>``.
    """
    if kind not in DEFAULT_DURATION_S:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(TASK_KINDS)}")
    if not 0 <= second < clip.duration_s:
        raise ValueError(f"second={second} is outside the {clip.duration_s}-s clip; expected 0..{clip.duration_s - 1}")
    if kind == "ave":
        return _truth_ave(clip)
    if kind == "avvp":
        return _truth_avvp(clip)
    if kind == "arig":
        return _truth_arig(clip, second)
    if kind in ("s4", "ms3", "avss"):
        return _truth_mask(clip, kind, second)
    question = question or clip.question
    if not question:
        raise ValueError(f"clip {clip.seed} carries no question; pass question=, one of {list(QUESTIONS.values())}")
    answer = _avqa_answer(clip, question)
    return Truth("avqa", f"<answer> {answer} </answer>", answer=answer, question=question)


__all__ = [
    "CLASSES", "CLASS_NAMES", "DEFAULT_DURATION_S", "ObjectClass", "OffscreenSound", "QUESTIONS", "SAMPLE_RATE",
    "TASK_KINDS", "Truth", "WorldClip", "WorldObject", "box", "class_map", "dataset", "frame_objects", "object_mask",
    "render_audio", "render_frame", "sounds_between", "sample_clip", "truth", "write_clip",
]
