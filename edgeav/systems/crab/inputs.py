"""A run's inputs: the frames and audio pieces Crab's loaders would build from a source.

:func:`decode` reads what ``Runtime.run`` feeds the encoders, once:

- SOURCE is a video, an image, or a folder of frames (one per second unless
  ``fps`` says otherwise; natural name order);
- the audio is ``audio`` (a separate file, as AVE/AVVP/AVQA ship ``.mp3`` and
  AVSBench ``audio.wav``), else the video's own track, else silence when
  ``silent_audio`` allows it (an image without audio is refused).

Clip lengths are the task's (:class:`~edgeav.tasks.Task` ``clip_s``, ``fixed_clip``).

Video: the task's frames spread over the clip by frame count (Crab's sampling),
decoded straight to 224x224; the frame of a mask or ARIG second is the first
frame of that second. Frames: the same sampling over the folder's frames; each
loaded as Crab's loaders do (PIL, RGB, bicubic 224x224). One image: it is every
frame of the ``<video>`` block, and the frame segmented or grounded at second 0
(or at ``at_seconds``, any second of the task's clip: AVSBench names a frame by
its second, ``3.png``). The frames of those seconds are also kept at the
source's size, for the result's pictures.

Audio: the clip's whole waveform is cut as Crab's loaders cut it
(:class:`~edgeav.media.windows.ClipAudioCollector`) when it lasts the task's clip
length give or take 1 s (a 5-s ``audio.wav`` for S4, MS3 and ARIG; 10 s for AVE,
AVVP, Ref-AVS and AVSS; 60 s for AVQA); otherwise in exact seconds: the first
clip-length seconds of longer audio, silence after shorter audio, with a note.
One image with about 1 s of audio (AVSBench's quick start: a frame and its
second's audio) is one second of the clip: the audio is heard as the image's
own second (S4, MS3, ARIG, Ref-AVS: that second's window of the clip, the others
silence; AVSS: the piece of the segmented frame), with a note. Such an image
stands for one second, so it takes a single ``at_seconds``.

A video longer than its task's clip (and the 1-s slack) is read for its first
clip-length seconds only; within the slack it is read whole, as decord reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeav.errors import OptionError
from edgeav.media import SAMPLE_RATE, clip_frame_indices, open_source
from edgeav.media.open import (MIN_AUDIO_SAMPLES, check_audio_samples, check_media_options, no_samples_error,
                               open_audio)
from edgeav.media.source import FrameScaler
from edgeav.media.stills import Stills, is_stills, open_stills, resize_image
from edgeav.media.windows import AudioWindowCollector
from edgeav.systems.crab.audio_cut import WHOLE_CLIP_SLACK_S, ClipAudioCollector
from edgeav.preprocess.clip import CLIP_SIZE, clip_pixels
from edgeav.systems.crab.tasks import Task

# Audio this close to 1 s beside one image is one second's audio (AVSBench keeps a 1.002-s wav per frame).
ONE_SECOND_SLACK_S = 0.5


@dataclass
class Inputs:
    """Decoded inputs of one source."""

    video_pixels: np.ndarray | None  # [F, 3, 224, 224]
    audio: dict[int | None, np.ndarray]  # [S, samples] per frame second (AVSS) or for the clip (key None)
    image_frames: dict[int, np.ndarray]  # second -> uint8 [224, 224, 3], what the model sees of that second
    source_frames: dict[int, np.ndarray]  # second -> uint8 [H, W, 3] at the source's size, what masks are drawn on
    source_size: tuple[int, int]  # (width, height)
    duration_s: float  # the clip's length: a clip of a longer source ends with the clip
    notes: list[str]


@dataclass
class _Frames:
    """What a source's pictures give a run."""

    pixels: np.ndarray | None
    images: dict[int, np.ndarray]  # at 224x224
    pictures: dict[int, np.ndarray]  # the same seconds at the source's size
    seconds: list[int]
    size: tuple[int, int]
    duration_s: float  # one image: the task's clip (its audio may say otherwise)
    one_image: bool
    cut: bool  # the source outlasts its task's clip: only the clip is read (a note says so)


def decode(source: str | Path, spec: Task, at_seconds: Sequence[int] | None = None, *,
           audio: str | Path | None = None, fps: float | None = None, silent_audio: bool = False) -> Inputs:
    """Read ``source`` (and ``audio``) for ``spec`` (see the module's docstring)."""
    check_media_options(source, audio=audio, fps=fps, silent_audio=silent_audio)
    notes: list[str] = []
    if is_stills(source):
        frames = _stills_frames(open_stills(source, fps), spec, at_seconds, notes)
    else:
        frames = _video_frames(source, spec, at_seconds, notes)
    duration = frames.duration_s
    if silent_audio:
        pieces = _silence(spec, frames.seconds)
        notes.append("the model heard silence (--silent-audio)")
    else:
        pieces, audio_end_s = _clip_audio(source, audio, spec, frames, notes)
        if frames.one_image:  # the image shows through its audio
            duration = _clip_length(spec, max(audio_end_s, 1.0))
    return Inputs(frames.pixels, pieces, frames.images, frames.pictures, frames.size, duration, notes)


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
        check_audio_samples(audio)


def image_seconds(spec: Task, at_seconds: Sequence[int] | None, duration: float) -> list[int]:
    """The seconds whose frame ``spec`` segments or grounds in a clip of ``duration`` seconds."""
    if not spec.image_frame:
        return []
    seconds = max(math.ceil(duration - 1e-3), 1)
    if at_seconds:
        bad = [t for t in at_seconds if not 0 <= t < seconds]
        if bad:
            raise OptionError(f"at_seconds, --at {bad[0]}: outside the clip (seconds 0 to {seconds - 1})")
        return sorted(set(int(t) for t in at_seconds))
    if spec.mask_classes:  # a mask task segments every second of its clip
        return list(range(min(spec.clip_s, seconds)))
    return [0]


def frames_at(source: str | Path, seconds: list[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The frame at the start of each of ``seconds`` of a video (the stream policy's frame), from one
    decoding: at 224x224 as the clip policy decodes frames, and at the source's size (what a mask or box
    is drawn on). Only those seconds' frames are kept."""
    model_size, source_size = FrameScaler((CLIP_SIZE, CLIP_SIZE)), FrameScaler()
    pictures: dict[float, np.ndarray] = {}  # frame time -> the frame at the source's size, until its second passes
    images: dict[int, np.ndarray] = {}
    found: dict[int, np.ndarray] = {}
    with open_source(source) as src:
        origin = src.info.start_s

        def both_sizes(frame) -> np.ndarray:
            # Keyed as the segment's frame_times are: the frame's time less the source's start.
            pictures[frame.time - origin] = source_size(frame)
            return model_size(frame)

        # A clip's last, partial second still has its frame (a 4.1-s S4 clip segments second 4).
        for segment in src.segments("stream", span_s=max(seconds) + 1, min_tail_s=0.0, to_array=both_sizes):
            if not segment.n_frames:
                continue
            shown = float(segment.frame_times[0])
            if segment.index in seconds:
                images[segment.index], found[segment.index] = segment.frames[0], pictures[shown]
            for passed in [t for t in pictures if t < shown]:
                del pictures[passed]
    missing = [t for t in seconds if t not in found]
    if missing:
        raise OptionError(f"{source}: no frame at {missing[0]} s; pick a second inside the video (--at)")
    return images, found


def measured_duration(source: str | Path) -> float:
    """Length of a source whose header does not give one: one decoding pass (frames kept tiny)."""
    with open_source(source) as src:
        for _ in src.segments("stream", frame_size=(16, 16)):
            pass
        return src.media_end_s


# -- frames ---------------------------------------------------------------------


def _long_note(named: str, duration: float, spec: Task) -> str:
    return (f"{named} lasts {duration:.1f} s; Crab's {spec.name} clips last {spec.clip_s} s, so only its first "
            f"{spec.clip_s} s are read")


def _outlasts_clip(spec: Task, duration: float) -> bool:
    return spec.fixed_clip and duration > spec.clip_s + WHOLE_CLIP_SLACK_S


def _clip_length(spec: Task, duration: float) -> float:
    """The clip a source of ``duration`` seconds gives ``spec``: the task's clip when it is longer."""
    return float(spec.clip_s) if _outlasts_clip(spec, duration) else duration


def _video_frames(source, spec: Task, at_seconds, notes: list[str]) -> _Frames:
    with open_source(source) as src:
        info = src.info
        duration = info.duration_s or measured_duration(source)
        cut = _outlasts_clip(spec, duration)
        if cut:
            notes.append(_long_note("the source", duration, spec))
        seconds = image_seconds(spec, at_seconds, min(duration, spec.clip_s) if spec.fixed_clip else duration)
        frames = []
        if spec.video_frames:
            for segment in src.segments("clip", clip_frames=spec.video_frames, frame_size=(CLIP_SIZE,) * 2,
                                        span_s=spec.clip_s if cut else None):
                frames.extend(segment.frames)
    if spec.video_frames and not frames:
        raise OptionError(f"{source}: no video frames could be decoded; task {spec.name!r} needs video")
    pixels = clip_pixels(np.stack(frames)) if frames else None
    images, pictures = frames_at(source, seconds) if seconds else ({}, {})
    return _Frames(pixels, images, pictures, seconds, (info.video.width, info.video.height),
                   _clip_length(spec, duration), one_image=False, cut=cut)


def _stills_frames(stills: Stills, spec: Task, at_seconds, notes: list[str]) -> _Frames:
    size = (CLIP_SIZE, CLIP_SIZE)
    if not stills.is_folder:
        # One image is the whole clip's picture: the video block repeats it; it is the frame of second 0 or --at.
        seconds = image_seconds(spec, at_seconds, spec.clip_s) if at_seconds else [0] if spec.image_frame else []
        picture = stills.frame(0)
        frame = resize_image(picture, size)
        roles = [f"each of the {spec.video_frames} video frames"] if spec.video_frames else []
        roles += [f"the frame at {', '.join(f'{t} s' for t in seconds)}"] if seconds else []
        note = f"{stills.source} is one image: {' and '.join(roles)}"
        stem = Path(stills.source).stem
        if seconds and not at_seconds and stem.isdigit() and 0 < int(stem) < spec.clip_s:
            note += f" (AVSBench names frames by second: pass --at {int(stem)} if it is second {int(stem)}'s)"
        notes.append(note)
        pixels = clip_pixels(np.repeat(frame[None], spec.video_frames, axis=0)) if spec.video_frames else None
        return _Frames(pixels, {t: frame for t in seconds}, {t: picture for t in seconds}, seconds, stills.size,
                       float(spec.clip_s), one_image=True, cut=False)
    duration = stills.duration_s
    n_frames = stills.n_frames
    cut = _outlasts_clip(spec, duration)
    if cut:
        notes.append(_long_note(stills.source, duration, spec))
        n_frames = min(n_frames, math.ceil(spec.clip_s * stills.fps - 1e-9))
    seconds = image_seconds(spec, at_seconds, min(duration, spec.clip_s) if spec.fixed_clip else duration)
    if not at_seconds:  # below 1 fps some seconds start no frame: the default segments those that do
        seconds = [t for t in seconds if stills.index_at(t) is not None] or seconds[:1]
    pixels = None
    if spec.video_frames:
        indices = clip_frame_indices(n_frames, spec.video_frames)
        loaded = {i: stills.frame(i, size) for i in set(indices.tolist())}
        pixels = clip_pixels(np.stack([loaded[i] for i in indices.tolist()]))
    images, pictures = {}, {}
    for t in seconds:
        index = stills.index_at(t)
        if index is None:
            raise OptionError(f"{stills.source}: no frame at {t} s ({stills.n_frames} frames at {stills.fps:g} fps); "
                              "pick a second inside the clip (--at) or set --fps")
        pictures[t] = stills.frame(index)
        images[t] = resize_image(pictures[t], size)
    return _Frames(pixels, images, pictures, seconds, stills.size, _clip_length(spec, duration), one_image=False,
                   cut=cut)


# -- audio ----------------------------------------------------------------------


def _plans(spec: Task, seconds: list[int], duration_s: float | None) -> tuple[dict, dict]:
    """The authors' plans (in clip seconds) and the exact-second plans for a clip of ``duration_s``."""
    if spec.audio_plan == "avss":  # each segmented frame hears its own second
        plans = {t: spec.plan_audio(frame_time_s=t) for t in seconds}
        return plans, plans
    exact_s = min(duration_s or spec.clip_s, spec.clip_s) if spec.fixed_clip else duration_s
    return {None: spec.plan_audio()}, {None: spec.plan_audio(duration_s=exact_s)}


def _silence(spec: Task, seconds: list[int]) -> dict:
    return {key: AudioWindowCollector(plan).windows for key, plan in _plans(spec, seconds, None)[1].items()}


def _second_of_one_image(frames: _Frames, audio: str | Path | None, audio_s: float | None) -> int | None:
    """The second one image and about 1 s of audio are both of (AVSBench's per-second layout), else None."""
    if not (frames.one_image and frames.seconds and audio_s is not None
            and abs(audio_s - 1.0) <= ONE_SECOND_SLACK_S):
        return None
    if len(frames.seconds) > 1:
        raise OptionError(f"{audio}: {audio_s:.1f} s of audio beside one image is one second of the clip; pass a "
                          "single --at (the image's second)")
    return frames.seconds[0]


def _clip_audio(source: str | Path, audio: str | Path | None, spec: Task, frames: _Frames,
                notes: list[str]) -> tuple[dict, float]:
    """The task's audio pieces from ``audio`` (refused without an audio track), else from the video
    ``source``'s own track (silence, with a note, when it has none); and where the audio heard ends (s)."""
    named = "the source's audio" if audio is None else f"the audio {audio}"
    with open_source(source, audio_only=True) if audio is None else open_audio(audio) as src:
        if not src.info.has_audio:
            notes.append("the source has no audio track, so the model heard silence")
            return _silence(spec, frames.seconds), 0.0
        own_second = _second_of_one_image(frames, audio, src.info.duration_s)
        start = own_second or 0
        collector = ClipAudioCollector(spec.clip_s, *_plans(spec, frames.seconds, src.info.duration_s))
        for segment in src.segments("stream", min_tail_s=0.0):
            collector.add(dataclasses.replace(segment, index=segment.index + start, start_s=segment.start_s + start,
                                              end_s=segment.end_s + start) if start else segment)
            if collector.done:
                break
        decoded = src.stats.audio_samples
    if audio is not None and decoded < MIN_AUDIO_SAMPLES:
        raise no_samples_error(audio, decoded)
    heard = decoded / SAMPLE_RATE
    if own_second is not None:
        note = (f"{named} lasts {heard:.1f} s, one second's audio: the model hears it as second {own_second}'s, "
                "the image's")
        if spec.audio_plan == "seconds":
            note += f"; Crab's {spec.name} clips last {spec.clip_s} s, so the rest is silence"
        notes.append(note)
    elif not collector.is_whole_clip(decoded) and spec.fixed_clip:
        if heard < spec.clip_s:
            notes.append(f"{named} lasts {heard:.1f} s; Crab's {spec.name} clips last {spec.clip_s} s, so the rest "
                         "is silence")
        elif not (audio is None and frames.cut):  # the source's own cut already has its note
            length = f"over {spec.clip_s + WHOLE_CLIP_SLACK_S:g} s" if collector.done else f"{heard:.1f} s"
            notes.append(f"{named} lasts {length}; Crab's {spec.name} clips last {spec.clip_s} s, so only its first "
                         f"{spec.clip_s} s are heard")
    return collector.pieces(decoded), start + heard
