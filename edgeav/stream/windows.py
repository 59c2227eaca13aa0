"""Which seconds each window reads.

A window of W seconds starting at ``s`` reads Crab's inputs for a W-second clip:
the task's video frames spread uniformly over its seconds (one per second for
AVE's 10 frames over 10 s), its audio windows shifted by ``s``, and for tasks
that look at one frame (ARIG, masks, Ref-AVS) the newest such frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeav.systems.crab.tasks import TASKS, Task

# Each task's default window (Task.default_window_s), by name.
DEFAULT_WINDOW_S = {name: spec.default_window_s for name, spec in TASKS.items()}
MAX_WINDOW_S = 600


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
