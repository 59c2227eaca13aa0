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
from edgeav.stream.seconds import SecondsBuffer
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
        self.window = window
        self.telemetry = telemetry
        self.answer_options = answer_options
        self.size = pipeline.config.vision.image_size
        self.video_frames = pipeline.config.video_frames
        # The picture tasks give SAM the frame at the source's size; the video tasks need CLIP's size only.
        self.frame_size = None if spec.outputs else (self.size, self.size)
        self.seconds = SecondsBuffer(window, stride, telemetry, stopping)

    def take(self, segment: Segment, arrived: float) -> None:
        self.seconds.take(segment, arrived)

    def ready(self, *, end_of_stream: bool) -> Iterator[StreamJob]:
        """Every window whose seconds are all in; a window missing a second is counted as skipped."""
        for index, start, last in self.seconds.windows():
            frames = self.seconds.frames
            video = None
            if self.spec.video:
                picks = [start + int(i * self.window / self.video_frames) for i in range(self.video_frames)]
                video = np.stack([self._clip_sized(frames[t]) for t in picks])
            yield StreamJob(index, float(start), float(last), frames[last], video, self.seconds.ready_at[last])

    def _clip_sized(self, frame: np.ndarray) -> np.ndarray:
        return frame if frame.shape[:2] == (self.size, self.size) else resize_image(frame, (self.size, self.size))

    def answer(self, job: StreamJob, timer: StageTimer, source_size: tuple[int, int] | None) -> Result:
        with torch.inference_mode():
            result = self.pipeline.answer(self.spec, job.picture, job.video, timer, frame_s=job.frame_s,
                                          **self.answer_options)
        # CLIP runs here, not in the encode stage: its time and frames still show in the telemetry.
        self.telemetry.stages["visual"].add(timer.ms["visual"])
        self.telemetry.count("frames_encoded", 1 if job.video is None else len(job.video))
        return result
