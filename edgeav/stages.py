"""What every system's run shares between its stages: the stage timer, and the :class:`Trace`
a caller passes to record what each stage was fed and gave back."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch


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
class Trace:
    """What one run fed each stage and what came out (fidelity receipts and int8 calibration read it).

    Pass one to :meth:`edgeav.runtime.Runtime.run`; set ``forced`` (token ids per prompt, e.g. another
    run's ``tokens``) to teacher-force generation and compare next-token distributions.
    """

    forced: list[list[int]] | None = None
    prompt_ids: list[list[int]] = field(default_factory=list)  # the chat prompt's ids per prompt, placeholders in
    pixels: list[np.ndarray] = field(default_factory=list)  # visual encoder inputs, one array per call
    fbank: list[np.ndarray] = field(default_factory=list)  # audio encoder inputs
    tokens: list[list[int]] = field(default_factory=list)  # generated ids per prompt
    logits: list[torch.Tensor] = field(default_factory=list)  # [steps, V] per prompt
    mask_inputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # mask decoder feeds
    mask_logits: list[np.ndarray] = field(default_factory=list)
