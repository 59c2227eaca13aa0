"""What passes between a run's stages: the encoders' outputs handed to prompting, and the stage timer.

Both the offline run (:mod:`edgeav.runtime`) and the stream's llm stage (:mod:`edgeav.stream`) build
these and hand them to :meth:`edgeav.runtime.Runtime.answer`.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import torch

from edgeav.models.crab import VisualFeatures


class StageTimer:
    """Milliseconds per stage, summed over a run."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.ms[name] += (time.perf_counter() - start) * 1000


@dataclass
class Encoded:
    """Encoder outputs of one clip, ready for prompting (the stream builds these from its per-second cache)."""

    video: torch.Tensor | None  # [frames * Q, D]: the <video> block
    images: dict[int, VisualFeatures]  # source second -> that second's frame (the <image> block, the mask input)
    audio: dict[int | None, torch.Tensor]  # [windows * Q, D]: the <audio> block per image second (AVSS), or None
    ordinals: dict[int, int]  # image second -> which video frame it is (the S4/MS3 instruction names it)
    source_size: tuple[int, int]  # (width, height)
    notes: list[str]
    duration_s: float | None = None  # the clip's length in its own seconds: event ranges are cut there
