"""What a pipeline computes around a model whose arrays are numpy on the host (an exported engine):
inputs, concatenation, generation, mask resizing, read-back. :class:`edgeav.torch_ops.TorchOps` is the
same for a torch model; a pipeline holds one of the two and never names torch itself.

This module imports no torch, so an engine's run imports none.
"""

from __future__ import annotations

import contextlib

import numpy as np

from edgeav.decoding import Generation, generate_numpy
from edgeav.preprocess.resize import resize_bilinear


class NumpyOps:
    """A model on ONNX Runtime: float32 numpy arrays in and out, on the CPU."""

    backend = "numpy"

    def model_input(self, array: np.ndarray) -> np.ndarray:
        """A host array (pixels, fbank) as the model takes it."""
        return np.ascontiguousarray(array, np.float32)

    def inference(self) -> contextlib.AbstractContextManager:
        """The context a model runs in (nothing to turn off: there is no autograd here)."""
        return contextlib.nullcontext()

    def concat(self, blocks: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(blocks)

    def host(self, array: np.ndarray) -> np.ndarray:
        """A model array as a float32 host array."""
        return np.asarray(array, np.float32)

    def generate(self, llm, inputs_embeds: np.ndarray, **options) -> Generation:
        """:func:`edgeav.decoding.generate_numpy` (options: :func:`edgeav.generate.generate`'s)."""
        return generate_numpy(llm, inputs_embeds, **options)

    def trace_logits(self, rows: list[np.ndarray]):
        """A prompt's next-token logits for :attr:`edgeav.stages.Trace.logits`: a torch tensor [steps, V], as the
        reference's are (only traced runs, which receipts and benches compare with the reference, import torch)."""
        import torch

        return torch.from_numpy(np.stack(rows))

    def mask_at_size(self, logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Mask logits [1, C, h, w] -> the mask at ``size`` (width, height), as :meth:`TorchOps.mask_at_size`
        makes it: resized bilinearly (:func:`edgeav.preprocess.resize.resize_bilinear`), then bool where the
        sigmoid passes 0.5 (one class) or the uint8 argmax over the classes."""
        width, height = size
        resized = resize_bilinear(np.asarray(logits, np.float32)[0], (height, width))
        if resized.shape[0] == 1:
            with np.errstate(over="ignore"):  # exp overflows to inf for very negative logits: sigmoid 0, as it should
                return np.float32(1) / (np.float32(1) + np.exp(-resized[0])) > 0.5
        return resized.argmax(0).astype(np.uint8)

    @property
    def device(self):
        """``torch.device("cpu")``, for callers that time runs on a torch device (benches); asking imports torch."""
        import torch

        return torch.device("cpu")

    @property
    def dtype(self):
        """``torch.float32`` (what the engine takes), for callers that ask; asking imports torch."""
        import torch

        return torch.float32


__all__ = ["NumpyOps"]
