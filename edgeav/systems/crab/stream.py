"""Crab's stream stages: which seconds each window reads, each second's tokens as soon as it arrives
(cached while a window needs them), and one window's answer.

A window of W seconds starting at ``s`` reads Crab's inputs for a W-second clip: the task's video
frames spread uniformly over its seconds (one per second for AVE's 10 frames over 10 s), its audio
windows shifted by ``s``, and for tasks that look at one frame (ARIG, masks, Ref-AVS) the newest
such frame. :class:`edgeav.stream.Stream` runs :class:`CrabStreamStages` in its encode and llm threads.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from edgeav.media import SAMPLE_RATE, Segment
from edgeav.preprocess.clip import CLIP_SIZE, clip_pixels
from edgeav.preprocess.fbank import crab_fbank_batch
from edgeav.results import Result
from edgeav.stages import StageTimer
from edgeav.systems.crab.features import Encoded, VisualFeatures
from edgeav.systems.crab.tasks import Task


@dataclass(frozen=True)
class WindowPlan:
    """What the window starting at ``start`` reads, in source seconds."""

    start: int
    frame_seconds: tuple[int, ...]  # the <video> block's frames, one per listed second
    image_second: int | None  # the frame of the <image> block and the mask decoder
    audio_starts: tuple[float, ...]  # the <audio> block's windows
    audio_length_s: float

    @property
    def ordinal(self) -> int:
        """Which video frame the image is (S4/MS3 name it in the instruction)."""
        return self.frame_seconds.index(self.image_second) if self.image_second in self.frame_seconds else 0

    @property
    def visual_seconds(self) -> set[int]:
        return set(self.frame_seconds) | ({self.image_second} if self.image_second is not None else set())

    @property
    def last_second(self) -> int:
        """The last second whose media the window needs."""
        audio_end = max((math.ceil(a + self.audio_length_s - 1e-9) - 1 for a in self.audio_starts), default=0)
        return max(max(self.visual_seconds, default=0), audio_end)

    @property
    def first_second(self) -> int:
        audio_start = min((math.floor(a) for a in self.audio_starts), default=self.start)
        return max(0, min(min(self.visual_seconds, default=self.start), audio_start))


def plan_window(spec: Task, start: int, window: int) -> WindowPlan:
    """The inputs of the ``window``-second window starting at second ``start`` for ``spec``."""
    n = spec.video_frames
    frames = tuple(start + (i * window) // n for i in range(n))
    image = (frames[-1] if frames else start + window - 1) if spec.image_frame else None
    if spec.audio_plan == "avss":
        starts, length = (float(image),), 1.0
    elif spec.audio_plan == "avqa":
        plan = spec.plan_audio(duration_s=window)
        starts, length = tuple(start + a for a in plan.starts_s), plan.length_s
    else:
        plan = spec.plan_audio()
        count = len(plan.starts_s)
        starts, length = tuple(float(start + (i * window) // count) for i in range(count)), plan.length_s
    return WindowPlan(start, frames, image, starts, length)


@dataclass
class StreamJob:
    """One window for the llm stage."""

    plan: WindowPlan
    index: int
    video: Any | None  # the model's arrays: torch tensors (the reference) or numpy (an engine)
    image: VisualFeatures | None
    audio: Any
    ready_at: float  # perf_counter when the window's last second was decoded
    encode_ms: dict[str, float]
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def start_s(self) -> float:
        return float(self.plan.start)

    @property
    def frame_s(self) -> float | None:
        return None if self.plan.image_second is None else float(self.plan.image_second)


class CrabStreamStages:
    """Crab's encode and llm stages of a stream (:class:`edgeav.stream.Stream` runs them in its threads).

    The encode side keeps raw seconds not yet encoded, the per-second token cache and the next window:
    :meth:`take` a second, then :meth:`ready` yields each window whose media is in. The llm side
    (:meth:`answer`) prompts, generates and parses one window. ``telemetry`` (the stream's) gets the
    encoders' times and counts; ``stopping`` is the stream's stop event.
    """

    frame_size = (CLIP_SIZE, CLIP_SIZE)  # what the decoder scales each second's frame to

    def __init__(self, pipeline, spec: Task, *, window: int, stride: int, telemetry, stopping,
                 answer_options: dict) -> None:
        self.pipeline = pipeline
        self.spec, self.window, self.stride = spec, window, stride
        self.telemetry = telemetry
        self.stopping = stopping
        self.answer_options = answer_options
        self.model = pipeline.engine.variant(spec.weights)
        self.keep_mask_scales = bool(spec.mask_classes)
        self.source_size: tuple[int, int] | None = None  # (width, height) of pushed frames, once seen
        # Crab writes event times in frames of its clip (one per second of a 10-s AVE clip); a window of
        # another length spreads those frames over its own seconds.
        self.seconds_per_frame = window / spec.video_frames if spec.video_frames else 1.0
        self.frames: dict[int, np.ndarray] = {}  # second -> uint8 frame, until encoded
        self.audio: dict[int, np.ndarray] = {}  # second -> float32 [16000], while a window may need it
        self.visual: dict[int, VisualFeatures] = {}  # second -> its frame's features
        self.audio_tokens: dict[int, Any] = {}  # window start sample -> tokens [Q, D]
        self.missing: set[int] = set()  # seconds the source never delivered
        self.last_second = -1
        self.last_frame: np.ndarray | None = None
        self.next_start = 0  # start of the next window to hand over
        self.encode_ms: dict[str, float] = collections.defaultdict(float)
        self.ready_at: dict[int, float] = {}

    def take(self, segment: Segment, arrived: float) -> None:
        k = segment.index
        if k <= self.last_second:
            return  # a clock that went back: the second was already seen
        if k - self.last_second > self.window:  # a gap: no window over it has media, go on after it
            self.next_start = max(self.next_start, -(-k // self.stride) * self.stride)
            self.last_second, self.last_frame = k - 1, None
            self._evict()
        self.missing.update(range(self.last_second + 1, k))
        self.last_second = k
        if segment.n_frames:
            frame = segment.frames[0]
            if frame.shape[:2] != (CLIP_SIZE, CLIP_SIZE):  # pushed frames come at the camera's size
                if self.source_size is None:
                    self.source_size = (frame.shape[1], frame.shape[0])
                frame = _resized(frame)
            self.last_frame = frame
        if self.last_frame is not None:  # a second without a frame shows the last one, as a display would
            self.frames[k] = self.last_frame
        else:
            self.missing.add(k)
        self.audio[k] = segment.audio
        self.ready_at[k] = arrived

    def _pending_plans(self, end_of_stream: bool) -> Iterator[WindowPlan]:
        """Plans of the windows not handed over yet whose media has started to arrive."""
        start = self.next_start
        while True:
            plan = plan_window(self.spec, start, self.window)
            if plan.first_second > self.last_second or (end_of_stream and not self._complete(plan)):
                return
            yield plan
            start += self.stride

    def _complete(self, plan: WindowPlan) -> bool:
        """The window's seconds all lie within what the source delivered."""
        return plan.start + self.window - 1 <= self.last_second

    def encode_due(self, *, end_of_stream: bool) -> None:
        """Encode every frame and audio window a pending window needs that can be encoded now."""
        seconds, keys = set(), {}
        for plan in self._pending_plans(end_of_stream):
            seconds |= {t for t in plan.visual_seconds if t in self.frames and t not in self.visual}
            for a in plan.audio_starts:
                key = round(a * SAMPLE_RATE)
                end = math.ceil(a + plan.audio_length_s - 1e-9) - 1
                if key not in self.audio_tokens and (end <= self.last_second or end_of_stream):
                    keys[key] = plan.audio_length_s
        if seconds:
            order = sorted(seconds)
            start = time.perf_counter()
            pixels = clip_pixels(np.stack([self.frames[t] for t in order]))
            features = self.model.encode_frames(self.pipeline.model_input(pixels))
            ms = (time.perf_counter() - start) * 1000
            self.telemetry.stages["visual"].add(ms)
            self.encode_ms["visual"] += ms
            self.telemetry.count("frames_encoded", len(order))
            for i, t in enumerate(order):
                keep = self.keep_mask_scales
                self.visual[t] = VisualFeatures(features.tokens[i : i + 1], features.mask_low[i : i + 1] if keep else None,
                                                features.mask_high[i : i + 1] if keep else None)
                del self.frames[t]
        if keys:
            order = sorted(keys)
            start = time.perf_counter()
            waves = np.stack([self._cut_audio(key, keys[key]) for key in order])
            tokens = self.model.encode_audio(self.pipeline.model_input(crab_fbank_batch(waves)))
            ms = (time.perf_counter() - start) * 1000
            self.telemetry.stages["audio"].add(ms)
            self.encode_ms["audio"] += ms
            self.telemetry.count("audio_windows_encoded", len(order))
            for i, key in enumerate(order):
                self.audio_tokens[key] = tokens[i]

    def _cut_audio(self, start_sample: int, length_s: float) -> np.ndarray:
        """Samples [start, start + length) from the seconds held; silence outside them."""
        n = round(length_s * SAMPLE_RATE)
        out = np.zeros(n, np.float32)
        for k in range(start_sample // SAMPLE_RATE, (start_sample + n - 1) // SAMPLE_RATE + 1):
            samples = self.audio.get(k)
            if samples is None:
                continue
            lo, hi = max(start_sample, k * SAMPLE_RATE), min(start_sample + n, k * SAMPLE_RATE + samples.size)
            if hi > lo:
                out[lo - start_sample : hi - start_sample] = samples[lo - k * SAMPLE_RATE : hi - k * SAMPLE_RATE]
        return out

    def ready(self, *, end_of_stream: bool) -> Iterator[StreamJob]:
        """Encode what pending windows need, then yield every window whose media is all in (at the end,
        every complete window); a window missing media is counted as skipped and not yielded."""
        self.encode_due(end_of_stream=end_of_stream)
        while not self.stopping.is_set():
            plan = plan_window(self.spec, self.next_start, self.window)
            if end_of_stream and not self._complete(plan):
                break
            if not end_of_stream and plan.last_second > self.last_second:
                break
            index = self.next_start // self.stride
            needed = set(range(plan.first_second, min(plan.last_second, self.last_second) + 1))
            skipped = needed & self.missing or any(t not in self.visual for t in plan.visual_seconds)
            job = None if skipped else self._job(plan, index)
            if skipped:
                self.telemetry.count("windows_skipped")
                self.encode_ms.clear()
            self.next_start += self.stride
            self._evict()
            if job is not None:
                yield job

    def _job(self, plan: WindowPlan, index: int) -> StreamJob:
        concat = self.pipeline.ops.concat
        video = concat([self.visual[t].tokens[0] for t in plan.frame_seconds]) if plan.frame_seconds else None
        audio = concat([self.audio_tokens[round(a * SAMPLE_RATE)] for a in plan.audio_starts])
        image = self.visual[plan.image_second] if plan.image_second is not None else None
        last = min(plan.last_second, self.last_second)
        job = StreamJob(plan, index, video, image, audio, self.ready_at.get(last, time.perf_counter()),
                   dict(self.encode_ms))
        self.encode_ms.clear()
        return job

    def answer(self, job: StreamJob, timer: StageTimer, source_size: tuple[int, int] | None) -> Result:
        """Prompt, generate and parse one window; event times in source seconds."""
        plan = job.plan
        images = {plan.image_second: job.image} if job.image is not None else {}
        encoded = Encoded(video=job.video, images=images, audio={None: job.audio},
                          ordinals={plan.image_second: plan.ordinal} if images else {},
                          source_size=source_size or self.source_size or (CLIP_SIZE, CLIP_SIZE), notes=[],
                          duration_s=self.window / self.seconds_per_frame)  # in the clip's frames
        result = self.pipeline.answer(self.model, self.spec, encoded, timer, clip_start_s=float(plan.start),
                                      **self.answer_options)
        result.events = _rescaled(result.events, plan.start, self.seconds_per_frame)
        return result

    def _evict(self) -> None:
        """Drop what no later window reads."""
        upcoming = plan_window(self.spec, self.next_start, self.window)
        keep_from = upcoming.first_second
        first_audio = min((round(a * SAMPLE_RATE) for a in upcoming.audio_starts), default=0)
        for store in (self.frames, self.visual, self.audio, self.ready_at):
            for t in [t for t in store if t < keep_from]:
                del store[t]
        for key in [k for k in self.audio_tokens if k < first_audio]:
            del self.audio_tokens[key]
        self.missing = {t for t in self.missing if t >= keep_from}


def _resized(frame: np.ndarray) -> np.ndarray:
    """A frame at the encoder's 224x224 (bicubic, as decoding to that size does)."""
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((CLIP_SIZE, CLIP_SIZE), Image.BICUBIC))


def _rescaled(events, start: int, seconds_per_frame: float) -> list:
    """Event times read as frames of the window (from ``start``) -> source seconds."""
    if seconds_per_frame == 1.0:
        return list(events)
    return [dataclasses.replace(e, start_s=start + (e.start_s - start) * seconds_per_frame,
                                end_s=start + (e.end_s - start) * seconds_per_frame) for e in events]
