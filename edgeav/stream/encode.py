"""The encode stage: each second's tokens as soon as it arrives, cached while a window needs them,
and a window handed to the llm stage once its last second is in."""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from edgeav.media import SAMPLE_RATE, Segment
from edgeav.systems.crab.model import VisualFeatures
from edgeav.preprocess.clip import CLIP_SIZE, clip_pixels
from edgeav.preprocess.fbank import crab_fbank_batch
from edgeav.stream.channel import _Closed
from edgeav.stream.windows import WindowPlan, plan_window


@dataclass
class _Job:
    """One window for the llm stage."""

    plan: WindowPlan
    index: int
    video: torch.Tensor | None
    image: VisualFeatures | None
    audio: torch.Tensor
    ready_at: float  # perf_counter when the window's last second was decoded
    encode_ms: dict[str, float]
    queued_at: float = field(default_factory=time.perf_counter)


class _Encoder:
    """The encode stage's state: raw seconds not yet encoded, the per-second token cache, the next window.

    ``stream`` is the :class:`~edgeav.stream.pipeline.Stream` whose encode stage this is (not imported
    here: the pipeline builds on this module); its channels, telemetry and runtime are used.
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self.spec, self.window, self.stride = stream.spec, stream.window, stream.stride
        self.telemetry = stream.telemetry
        self.model = stream.runtime.engine.variant(stream.spec.weights)
        self.keep_mask_scales = bool(stream.spec.mask_classes)
        self.frames: dict[int, np.ndarray] = {}  # second -> uint8 frame, until encoded
        self.audio: dict[int, np.ndarray] = {}  # second -> float32 [16000], while a window may need it
        self.visual: dict[int, VisualFeatures] = {}  # second -> its frame's features
        self.audio_tokens: dict[int, torch.Tensor] = {}  # window start sample -> tokens [Q, D]
        self.missing: set[int] = set()  # seconds the source never delivered
        self.last_second = -1
        self.last_frame: np.ndarray | None = None
        self.next_start = 0  # start of the next window to hand over
        self.encode_ms: dict[str, float] = collections.defaultdict(float)
        self.ready_at: dict[int, float] = {}

    def run(self) -> None:
        stream = self.stream
        while not stream._stopping.is_set():
            try:
                segment, arrived = stream._segments.get()
            except _Closed:
                break
            self.take(segment, arrived)
            self.encode_due(end_of_stream=False)
            self.hand_over(end_of_stream=False)
            self.telemetry.sample_memory()
        if not stream._stopping.is_set():
            self.encode_due(end_of_stream=True)
            self.hand_over(end_of_stream=True)

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
                if self.stream.source_size is None:
                    self.stream.source_size = (frame.shape[1], frame.shape[0])
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
            features = self.model.encode_frames(self.stream.runtime._tensor(pixels))
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
            tokens = self.model.encode_audio(self.stream.runtime._tensor(crab_fbank_batch(waves)))
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

    def hand_over(self, *, end_of_stream: bool) -> None:
        """Hand the llm every window whose media is all in (at the end, every complete window)."""
        stream = self.stream
        while not stream._stopping.is_set():
            plan = plan_window(self.spec, self.next_start, self.window)
            if end_of_stream and not self._complete(plan):
                break
            if not end_of_stream and plan.last_second > self.last_second:
                break
            index = self.next_start // self.stride
            needed = set(range(plan.first_second, min(plan.last_second, self.last_second) + 1))
            if needed & self.missing or any(t not in self.visual for t in plan.visual_seconds):
                self.telemetry.count("windows_skipped")
                self.encode_ms.clear()
            else:
                if stream._windows.put(self._job(plan, index)) is not None:
                    self.telemetry.count("windows_skipped")
            self.next_start += self.stride
            self._evict()

    def _job(self, plan: WindowPlan, index: int) -> _Job:
        video = (torch.cat([self.visual[t].tokens[0] for t in plan.frame_seconds])
                 if plan.frame_seconds else None)
        audio = torch.cat([self.audio_tokens[round(a * SAMPLE_RATE)] for a in plan.audio_starts])
        image = self.visual[plan.image_second] if plan.image_second is not None else None
        last = min(plan.last_second, self.last_second)
        job = _Job(plan, index, video, image, audio, self.ready_at.get(last, time.perf_counter()),
                   dict(self.encode_ms))
        self.encode_ms.clear()
        return job

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
