"""u-LLaVA's stream stages: each second's frame kept while a window needs it; a window of W seconds is
read as u-LLaVA reads a video (8 of its frames at ``arange(0, W, W/8)``, CLIP size) for ``caption`` and
``ask``, or as its newest frame at the source's size for the picture tasks (``res``, ``rec``, ``ground``).

CLIP runs on a window's frames when the window is answered (8 frames: a few ms at 224 px on a GPU);
:class:`edgeav.stream.Stream` runs this in its encode and llm threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from edgeav.media import Segment
from edgeav.media.stills import resize_image
from edgeav.results import Result
from edgeav.stages import StageTimer
from edgeav.systems.ullava.tasks import Task


@dataclass
class StreamJob:
    """One window for the llm stage."""

    index: int
    start_s: float
    frame_s: float  # the second of the window's newest frame (the picture tasks segment it)
    picture: np.ndarray
    video: np.ndarray | None
    ready_at: float
    encode_ms: dict[str, float] = field(default_factory=dict)
    queued_at: float = field(default_factory=time.perf_counter)


class UllavaStreamStages:
    def __init__(self, pipeline, spec: Task, *, window: int, stride: int, telemetry, stopping,
                 answer_options: dict) -> None:
        self.pipeline, self.spec = pipeline, spec
        self.window, self.stride = window, stride
        self.telemetry, self.stopping = telemetry, stopping
        self.answer_options = answer_options
        self.size = pipeline.config.vision.image_size
        self.video_frames = pipeline.config.video_frames
        # The picture tasks give SAM the frame at the source's size; the video tasks need CLIP's size only.
        self.frame_size = None if spec.outputs else (self.size, self.size)
        self.frames: dict[int, np.ndarray] = {}
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
        if self.last_frame is not None:  # a second without a frame shows the last one, as a display would
            self.frames[k] = self.last_frame
        else:
            self.missing.add(k)
        self.ready_at[k] = arrived

    def ready(self, *, end_of_stream: bool) -> Iterator[StreamJob]:
        """Every window whose seconds are all in; a window missing a second is counted as skipped."""
        while not self.stopping.is_set():
            start, last = self.next_start, self.next_start + self.window - 1
            if last > self.last_second:
                return
            seconds = range(start, last + 1)
            index = start // self.stride
            self.next_start += self.stride
            if any(t in self.missing or t not in self.frames for t in seconds):
                self.telemetry.count("windows_skipped")
            else:
                yield self._job(index, start, last)
            self._evict()

    def _job(self, index: int, start: int, last: int) -> StreamJob:
        video = None
        if self.spec.video:
            picks = [start + int(i * self.window / self.video_frames) for i in range(self.video_frames)]
            video = np.stack([self._clip_sized(self.frames[t]) for t in picks])
        return StreamJob(index, float(start), float(last), self.frames[last], video, self.ready_at[last])

    def _clip_sized(self, frame: np.ndarray) -> np.ndarray:
        return frame if frame.shape[:2] == (self.size, self.size) else resize_image(frame, (self.size, self.size))

    def _evict(self) -> None:
        for store in (self.frames, self.ready_at):
            for t in [t for t in store if t < self.next_start]:
                del store[t]
        self.missing = {t for t in self.missing if t >= self.next_start}

    def answer(self, job: StreamJob, timer: StageTimer, source_size: tuple[int, int] | None) -> Result:
        with torch.inference_mode():
            result = self.pipeline.answer(self.spec, job.picture, job.video, timer, frame_s=job.frame_s,
                                          **self.answer_options)
        # CLIP runs here, not in the encode stage: its time and frames still show in the telemetry.
        self.telemetry.stages["visual"].add(timer.ms["visual"])
        self.telemetry.count("frames_encoded", 1 if job.video is None else len(job.video))
        return result
