"""What Crab's encoders hand the prompt and the mask decoder: arrays of whichever kind the model computes in
(torch tensors from the reference, numpy arrays from an exported engine). Kept free of torch so that an
engine's run imports none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class VisualFeatures:
    """CLIP outputs of a batch of frames."""

    tokens: Any  # [F, Q, llm_hidden]: what the LLM reads
    mask_low: Any  # [F, vision_hidden, g, g]: CLIP layer 14, the mask decoder's first scale
    mask_high: Any  # [F, vision_hidden, g, g]: CLIP layer 22


@dataclass
class Encoded:
    """Encoder outputs of one clip, ready for prompting (the stream builds these from its per-second cache)."""

    video: Any | None  # [frames * Q, D]: the <video> block
    images: dict[int, VisualFeatures]  # source second -> that second's frame (the <image> block, the mask input)
    audio: dict[int | None, Any]  # [windows * Q, D]: the <audio> block per image second (AVSS), or None
    ordinals: dict[int, int]  # image second -> which video frame it is (the S4/MS3 instruction names it)
    source_size: tuple[int, int]  # (width, height)
    notes: list[str]
    duration_s: float | None = None  # the clip's length in its own seconds: event ranges are cut there


__all__ = ["Encoded", "VisualFeatures"]
