"""OpenAVS's stream stages: the describers run on each second as it arrives (the encode thread), the
translator and GroundingDINO + SAM on each window (the llm thread), so the describers of second t+1 overlap
the segmentation of second t. A window of W seconds is translated as a W-frame clip (frame consistency over
its seconds) and its newest second is segmented; the default window is 1 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from edgeav.media import Segment
from edgeav.results import Result
from edgeav.stages import StageTimer
from edgeav.stream.seconds import SecondsBuffer
from edgeav.systems.openavs.inputs import Second


@dataclass
class StreamJob:
    """One window for the llm stage: its seconds, already described."""

    index: int
    start_s: float
    frame_s: float
    seconds: list[Second]
    heard: bool  # False: the window's seconds are silence (no audio track, or --silent-audio)
    ready_at: float
    encode_ms: dict[str, float] = field(default_factory=dict)
    queued_at: float = field(default_factory=time.perf_counter)


class OpenAVSStreamStages:
    frame_size = None  # each second's frame at the source's size: every model's front end resizes it

    def __init__(self, pipeline, spec: dict, *, window: int, stride: int, telemetry, stopping,
                 answer_options: dict) -> None:
        self.pipeline, self.options = pipeline, spec
        self.pipeline.check_parts(spec)
        self.pipeline.load_translator(spec)  # --translator-checkpoint's model, before the first second arrives
        self.telemetry = telemetry
        self.seconds = SecondsBuffer(window, stride, telemetry, stopping)
        self.described: dict[int, Second] = {}

    def take(self, segment: Segment, arrived: float) -> None:
        self.seconds.take(segment, arrived)

    def ready(self, *, end_of_stream: bool) -> Iterator[StreamJob]:
        for index, start, last in self.seconds.windows():
            timer = StageTimer()
            with torch.inference_mode():
                for t in range(start, last + 1):
                    if t not in self.described:  # a second shared by overlapping windows is described once
                        second = Second(float(t), self.seconds.frames[t], self.seconds.audio[t])
                        second.texts = self.pipeline.describe(second, self.options["variant"], timer)
                        self.described[t] = second
            for stage, ms in timer.ms.items():
                self.telemetry.stages[stage].add(ms)
            self.described = {t: s for t, s in self.described.items() if t >= start}
            _, heard = self.seconds.waveform(start, last)
            yield StreamJob(index, float(start), float(last), [self.described[t] for t in range(start, last + 1)],
                            heard, self.seconds.ready_at[last], encode_ms=dict(timer.ms))

    def answer(self, job: StreamJob, timer: StageTimer, source_size: tuple[int, int] | None) -> Result:
        with torch.inference_mode():
            result = self.pipeline.answer(job.seconds, self.options, timer, heard=job.heard, newest_only=True)
        self.telemetry.count("frames_encoded", 1)
        return result


__all__ = ["OpenAVSStreamStages"]
