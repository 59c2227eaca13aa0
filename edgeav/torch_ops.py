"""What a pipeline computes around a torch model on ``device`` in ``dtype``: inputs, concatenation,
generation (the CUDA-graph fast path on CUDA), mask resizing, read-back. The numpy twin, for exported
engines, is :class:`edgeav.numpy_ops.NumpyOps`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgeav.decoding import Generation
from edgeav.fastpath import generate_fast


class TorchOps:
    """A torch model on ``device`` (default CPU) in ``dtype`` (default float32)."""

    backend = "torch"

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32

    def model_input(self, array: np.ndarray) -> torch.Tensor:
        """A host array (pixels, fbank) as the model takes it."""
        return torch.from_numpy(array).to(self.device, self.dtype)

    def inference(self) -> torch.inference_mode:
        return torch.inference_mode()

    def concat(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(blocks)

    def host(self, tensor: torch.Tensor) -> np.ndarray:
        """A model tensor as a float32 host array."""
        return tensor.float().cpu().numpy()

    def generate(self, llm, inputs_embeds: torch.Tensor, **options) -> Generation:
        """:func:`edgeav.fastpath.generate_fast`: on CUDA the decode step is a captured graph, no per-token sync."""
        return generate_fast(llm, inputs_embeds, fast=self.device.type == "cuda", **options)

    def trace_logits(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(rows).cpu()

    def mask_at_size(self, logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Logits [1, C, h, w] -> the mask at the source's (width, height): bool where the sigmoid passes 0.5
        (one class), else the uint8 argmax over the classes."""
        width, height = size
        resized = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)[0]
        if resized.shape[0] == 1:
            return (resized[0].sigmoid() > 0.5).cpu().numpy()
        return resized.argmax(0).to(torch.uint8).cpu().numpy()


__all__ = ["TorchOps"]
