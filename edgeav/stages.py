"""What every system's run shares between its stages: the stage timer, the :class:`Trace` a caller
passes to record what each stage was fed and gave back, and the inference mode stage threads run in.
Free of torch: an exported engine's run imports none."""

from __future__ import annotations

import contextlib
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
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
    # [steps, V] per prompt, torch tensors as the receipts compare them (a traced engine run imports torch)
    logits: list[torch.Tensor] = field(default_factory=list)
    mask_inputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # mask decoder feeds
    mask_logits: list[np.ndarray] = field(default_factory=list)


def inference_mode() -> contextlib.AbstractContextManager:
    """``torch.inference_mode()`` where torch is loaded (a torch model may run: grad mode is per thread), else
    nothing: a process that never imported torch runs no torch model, and need not import it to say so."""
    loaded = sys.modules.get("torch")
    return loaded.inference_mode() if loaded is not None else contextlib.nullcontext()
