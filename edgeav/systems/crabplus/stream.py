"""Crab+'s stream stages: each second's first frame (at the source's size) and audio kept while a window
needs them. A window of W seconds is read as a clip of W seconds: the video tasks take their frames from
its seconds as ``linspace(0, W - 1, k).round()`` picks them, the image tasks its newest frame, whose audio
unit is the last of the task's units; every task cuts the window's audio as it cuts a clip's.

The towers and the thinker run when a window is answered; :class:`edgeav.stream.Stream` runs this in
its encode and llm threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from edgeav.media import Segment
from edgeav.preprocess.qwen_vision import frame_indices
from edgeav.results import Result
from edgeav.stages import StageTimer
from edgeav.stream.seconds import SecondsBuffer
from edgeav.systems.crabplus.inputs import ClipInputs
from edgeav.systems.crabplus.tasks import CrabPlusTask


@dataclass
class StreamJob:
    """One window for the llm stage."""

    index: int
    start_s: float
    frame_s: float  # the second of the window's newest frame (what the image tasks read)
    inputs: ClipInputs
    ready_at: float
    encode_ms: dict[str, float] = field(default_factory=dict)
    queued_at: float = field(default_factory=time.perf_counter)


class CrabPlusStreamStages:
    frame_size = None  # each second's frame at the source's size: the ViT's and SAM2's front ends resize it

    def __init__(self, pipeline, spec: CrabPlusTask, *, window: int, stride: int, telemetry, stopping,
                 answer_options: dict) -> None:
        self.pipeline, self.spec = pipeline, spec
        self.window = window
        self.telemetry = telemetry
        self.answer_options = answer_options
        self.seconds = SecondsBuffer(window, stride, telemetry, stopping)

    def take(self, segment: Segment, arrived: float) -> None:
        self.seconds.take(segment, arrived)

    def ready(self, *, end_of_stream: bool) -> Iterator[StreamJob]:
        for index, start, last in self.seconds.windows():
            frames = self.seconds.frames
            video = None
            if self.spec.video_frames:
                video = np.stack([frames[start + int(i)] for i in frame_indices(self.window, self.spec.video_frames)])
            waveform, heard = self.seconds.waveform(start, last)
            inputs = ClipInputs(video, frames[last], float(last), waveform, heard, float(self.window))
            yield StreamJob(index, float(start), float(last), inputs, self.seconds.ready_at[last])

    def answer(self, job: StreamJob, timer: StageTimer, source_size: tuple[int, int] | None) -> Result:
        with torch.inference_mode():
            result = self.pipeline.answer(self.spec, job.inputs, timer, frame_index=self.spec.audio_units - 1,
                                          clip_start_s=job.start_s, **self.answer_options)
        # The towers run here, not in the encode stage: their time and frames still show in the telemetry.
        for stage in ("audio", "visual"):
            self.telemetry.stages[stage].add(timer.ms[stage])
        self.telemetry.count("frames_encoded", 1 if job.inputs.video is None else len(job.inputs.video))
        self.telemetry.count("audio_windows_encoded", 1)  # the window's whole cut, one audio for the tower
        return result
