"""A run's inputs: the frames and audio pieces Crab's loaders would build from a source.

:func:`decode` reads what ``Runtime.run`` feeds the encoders:

- SOURCE is a video, an image, or a folder of frames (one per second unless
  ``fps`` says otherwise; natural name order);
- the audio is ``audio`` (a separate file, as AVE/AVVP/AVQA ship ``.mp3`` and
  AVSBench ``audio.wav``), else the video's own track, else silence when
  ``silent_audio`` allows it (an image without audio is refused).

Video: the task's frames spread over the clip by frame count (Crab's sampling),
decoded straight to 224x224; the frame of a mask or ARIG second is the first
frame of that second. Frames: the same sampling over the folder's frames; each
loaded as Crab's loaders do (PIL, RGB, bicubic 224x224). One image: it is every
frame of the ``<video>`` block, and the frame segmented or grounded at second 0
(or at ``at_seconds``).

Audio: the clip's whole waveform is cut as Crab's loaders cut it
(:class:`~edgeav.media.windows.ClipAudioCollector`) when it lasts the task's clip
length give or take 1 s (a 5-s ``audio.wav`` for S4, MS3 and ARIG; 10 s for AVE,
AVVP, Ref-AVS and AVSS; 60 s for AVQA); otherwise in exact seconds: the first
clip-length seconds of longer audio, silence after shorter audio (so a 1-s file
for S4 fills second 0 and the other four are silence), with a note.

A video longer than its task's clip (and the 1-s slack) is read for its first
clip-length seconds only; within the slack it is read whole, as decord reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeav.errors import OptionError
from edgeav.media import SAMPLE_RATE, clip_frame_indices, open_source
from edgeav.media.stills import Stills, check_media_options, is_stills, open_audio, open_stills
from edgeav.media.windows import CLIP_AUDIO_SECONDS, WHOLE_CLIP_SLACK_S, AudioWindowCollector, ClipAudioCollector
from edgeav.preprocess import CLIP_SIZE, clip_pixels
from edgeav.tasks import Task

# Seconds a mask task segments by default (CRAB_SPEC 4: S4/MS3 5-s clips, Ref-AVS and AVSS 10 s).
MASK_SECONDS = {"s4": 5, "ms3": 5, "refavs": 10, "avss": 10}
# Tasks whose clips have a fixed length in Crab's data: only that much of a longer source is read.
CLIP_SECONDS = {"ave": 10, "avvp": 10, "refavs": 10, "s4": 5, "ms3": 5, "arig": 5}


@dataclass
class Inputs:
    """Decoded inputs of one source."""

    video_pixels: np.ndarray | None  # [F, 3, 224, 224]
    audio: dict[int | None, np.ndarray]  # [S, samples] per frame second (AVSS) or for the clip (key None)
    image_frames: dict[int, np.ndarray]  # second -> uint8 [224, 224, 3]
    source_size: tuple[int, int]  # (width, height)
    notes: list[str]


def decode(source: str | Path, spec: Task, at_seconds: Sequence[int] | None = None, *,
           audio: str | Path | None = None, fps: float | None = None, silent_audio: bool = False) -> Inputs:
    """Read ``source`` (and ``audio``) for ``spec`` (see the module's docstring)."""
    check_media_options(source, audio=audio, fps=fps, silent_audio=silent_audio)
    notes: list[str] = []
    if is_stills(source):
        stills = open_stills(source, fps)
        audio_s = _audio_duration(audio) if audio is not None else None
        pixels, images, seconds = _stills_frames(stills, spec, at_seconds, audio_s, notes)
        size = stills.size
    else:
        pixels, images, seconds, size = _video_frames(source, spec, at_seconds, notes)
    if silent_audio:
        pieces = _silence(spec, seconds)
        notes.append("the model heard silence (--silent-audio)")
    else:
        pieces = _clip_audio(source, audio, spec, seconds, notes)
    return Inputs(pixels, pieces, images, size, notes)


def check_inputs(source: str | Path | None, *, audio: str | Path | None = None, fps: float | None = None,
                 silent_audio: bool = False) -> None:
    """Open and close what a run reads (SOURCE, ``audio``), so bad input is refused before a model
    loads. ``source`` None: the bundled demo clip, a video."""
    check_media_options(source if source is not None else "demo.mp4", audio=audio, fps=fps,
                        silent_audio=silent_audio)
    if source is not None:
        if is_stills(source):
            open_stills(source, fps)
        else:
            open_source(source).close()
    if audio is not None:
        open_audio(audio).close()


def image_seconds(spec: Task, at_seconds: Sequence[int] | None, duration: float) -> list[int]:
    """The seconds whose frame ``spec`` segments or grounds in a clip of ``duration`` seconds."""
    if not spec.image_frame:
        return []
    seconds = max(math.ceil(duration - 1e-3), 1)
    if at_seconds:
        bad = [t for t in at_seconds if not 0 <= t < seconds]
        if bad:
            raise OptionError(f"--at {bad[0]}: outside the clip (seconds 0 to {seconds - 1})")
        return sorted(set(int(t) for t in at_seconds))
    if spec.name in MASK_SECONDS:
        return list(range(min(MASK_SECONDS[spec.name], seconds)))
    return [0]


def frames_at(source: str | Path, seconds: list[int]) -> dict[int, np.ndarray]:
    """The frame at the start of each second of a video (the stream policy's frame), at 224x224."""
    found: dict[int, np.ndarray] = {}
    with open_source(source) as src:
        # A clip's last, partial second still has its frame (a 4.1-s S4 clip segments second 4).
        for segment in src.segments("stream", frame_size=(CLIP_SIZE,) * 2, span_s=max(seconds) + 1, min_tail_s=0.0):
            if segment.index in seconds and segment.n_frames:
                found[segment.index] = segment.frames[0]
    missing = [t for t in seconds if t not in found]
    if missing:
        raise OptionError(f"{source}: no frame at {missing[0]} s; pick a second inside the video (--at)")
    return found


def measured_duration(source: str | Path) -> float:
    """Length of a source whose header does not give one: one decoding pass (frames kept tiny)."""
    with open_source(source) as src:
        end = 0.0
        for segment in src.segments("stream", frame_size=(16, 16)):
            end = segment.end_s
        return end


# -- frames ---------------------------------------------------------------------


def _long_note(named: str, duration: float, spec: Task, span: int) -> str:
    return f"{named} lasts {duration:.1f} s; Crab's {spec.name} clips last {span} s, so only its first {span} s are read"


def _video_frames(source, spec: Task, at_seconds, notes: list[str]):
    span = CLIP_SECONDS.get(spec.name)
    with open_source(source) as src:
        info = src.info
        duration = info.duration_s or measured_duration(source)
        read_s = span if span is not None and duration > span + WHOLE_CLIP_SLACK_S else None
        if read_s is not None:
            notes.append(_long_note("the source", duration, spec, span))
        seconds = image_seconds(spec, at_seconds, min(duration, span or duration))
        frames = []
        if spec.video_frames:
            for segment in src.segments("clip", clip_frames=spec.video_frames, frame_size=(CLIP_SIZE,) * 2,
                                        span_s=read_s):
                frames.extend(segment.frames)
    if spec.video_frames and not frames:
        raise OptionError(f"{source}: no video frames could be decoded; task {spec.name!r} needs video")
    pixels = clip_pixels(np.stack(frames)) if frames else None
    images = frames_at(source, seconds) if seconds else {}
    return pixels, images, seconds, (info.video.width, info.video.height)


def _stills_frames(stills: Stills, spec: Task, at_seconds, audio_s: float | None, notes: list[str]):
    span = CLIP_SECONDS.get(spec.name)
    size = (CLIP_SIZE, CLIP_SIZE)
    if not stills.is_folder:
        # One image is the whole clip's picture: the video block repeats it; it is the frame of second 0 or --at.
        clip_s = min(audio_s or CLIP_AUDIO_SECONDS[spec.audio_plan], span or math.inf)
        seconds = image_seconds(spec, at_seconds, clip_s) if at_seconds else [0] if spec.image_frame else []
        frame = stills.frame(0, size)
        roles = [f"each of the {spec.video_frames} video frames"] if spec.video_frames else []
        roles += [f"the frame at {', '.join(f'{t} s' for t in seconds)}"] if seconds else []
        note = f"{stills.source} is one image: {' and '.join(roles)}"
        stem = Path(stills.source).stem
        if seconds and not at_seconds and stem.isdigit() and int(stem) != 0:
            note += f" (AVSBench names frames by second: pass --at {int(stem)} if it is second {int(stem)}'s)"
        notes.append(note)
        pixels = clip_pixels(np.repeat(frame[None], spec.video_frames, axis=0)) if spec.video_frames else None
        return pixels, {t: frame for t in seconds}, seconds
    duration = stills.duration_s
    n_frames = stills.n_frames
    if span is not None and duration > span + WHOLE_CLIP_SLACK_S:
        notes.append(_long_note(stills.source, duration, spec, span))
        n_frames = min(n_frames, math.ceil(span * stills.fps - 1e-9))
    seconds = image_seconds(spec, at_seconds, min(duration, span or duration))
    pixels = None
    if spec.video_frames:
        indices = clip_frame_indices(n_frames, spec.video_frames)
        loaded = {i: stills.frame(i, size) for i in set(indices.tolist())}
        pixels = clip_pixels(np.stack([loaded[i] for i in indices.tolist()]))
    images = {}
    for t in seconds:
        index = stills.index_at(t)
        if index is None:
            raise OptionError(f"{stills.source}: no frame at {t} s ({stills.n_frames} frames at {stills.fps:g} fps); "
                              "pick a second inside the clip (--at) or set --fps")
        images[t] = stills.frame(index, size)
    return pixels, images, seconds


# -- audio ----------------------------------------------------------------------


def _audio_duration(path: str | Path) -> float | None:
    with open_audio(path) as src:
        return src.info.duration_s


def _plans(spec: Task, seconds: list[int], duration_s: float | None) -> tuple[dict, dict]:
    """The authors' plans (in clip seconds) and the exact-second plans for a clip of ``duration_s``."""
    if spec.audio_plan == "avss":  # each segmented frame hears its own second
        plans = {t: spec.plan_audio(frame_time_s=t) for t in seconds}
        return plans, plans
    span = CLIP_SECONDS.get(spec.name)
    clip_s = CLIP_AUDIO_SECONDS[spec.audio_plan]
    exact_s = min(duration_s, span) if duration_s and span else duration_s or span
    return {None: spec.plan_audio(duration_s=clip_s)}, {None: spec.plan_audio(duration_s=exact_s)}


def _silence(spec: Task, seconds: list[int]) -> dict:
    return {key: AudioWindowCollector(plan).windows for key, plan in _plans(spec, seconds, None)[1].items()}


def _clip_audio(source: str | Path, audio: str | Path | None, spec: Task, seconds: list[int],
                notes: list[str]) -> dict:
    """The task's audio pieces from ``audio`` (refused without an audio track), else from the video
    ``source``'s own track (silence, with a note, when it has none)."""
    named = "the source's audio" if audio is None else f"the audio {audio}"
    with open_source(source, audio_only=True) if audio is None else open_audio(audio) as src:
        if not src.info.has_audio:
            notes.append("the source has no audio track, so the model heard silence")
            return _silence(spec, seconds)
        clip_s = CLIP_AUDIO_SECONDS[spec.audio_plan]
        collector = ClipAudioCollector(clip_s, *_plans(spec, seconds, src.info.duration_s))
        for segment in src.segments("stream", min_tail_s=0.0):
            collector.add(segment)
            if collector.done:
                break
        decoded = src.stats.audio_samples
    if not collector.is_whole_clip(decoded) and spec.name in CLIP_SECONDS:
        span = CLIP_SECONDS[spec.name]
        heard = decoded / SAMPLE_RATE
        if heard < span:
            notes.append(f"{named} lasts {heard:.1f} s; Crab's {spec.name} clips last {span} s, so the rest is silence")
        elif not (audio is None and any(n.startswith("the source lasts") for n in notes)):
            length = f"over {span + WHOLE_CLIP_SLACK_S:g} s" if collector.done else f"{heard:.1f} s"
            notes.append(f"{named} lasts {length}; Crab's {spec.name} clips last {span} s, so only its first "
                         f"{span} s are heard")
    return collector.pieces(decoded)
