"""Graphs of the Qwen2.5-Omni thinker's towers and of SAM2, for every system that exports them (Crab+ and
OpenAVS): thin wrappers over the reference modules, their names and axes, the shapes a config implies and
TensorRT profiles. The engine side is :mod:`edgeav.engines.qwen_onnx`.

- audio chunk (:class:`AudioChunkGraph`): the log-mel of one 2-s chunk ``[128, frames]`` -> its pooled,
  projected tokens ``[frames', D]``; ``frames`` is free (3 to ``2 * n_window``; the engine cuts any audio
  into chunks), so every length of audio runs through the one graph;
- vision slice (:class:`VisionSliceGraph`): the patch rows of one 224x224 temporal slice ``[256, 1176]``
  -> ``[64, D]`` (fixed); an image is one slice, a video of 2k frames k;
- the LLM is :class:`~edgeav.export.graphs.LLMGraph` with M-RoPE's ``positions`` input;
- SAM2 encoder: pixels ``[1, 3, S, S]`` -> ``image_embed`` (with ``no_mem_embed``), ``feat_s0`` and
  ``feat_s1`` (after the decoder's skip convolutions), all fixed;
- SAM2 decoder: those three + prompt ``points [1, P, 2]`` and ``labels [1, P]`` (P free) ->
  ``low_res_logits [1, 1, 4g, 4g]``, ``iou [1, 1]``, ``object_score [1, 1]``, the dynamic-multimask
  choice inside.

Each wrapper reads one attribute of the model it is given (``audio_tower``, ``visual`` or ``sam2``), so a
Crab+ model and OpenAVS's thinker or model serve alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from edgeav.engines.qwen_onnx import SLICE_GRID
from edgeav.engines.llm_io import llm_shapes
from edgeav.export.graphs import GraphSpec, llm_example, llm_profiles
from edgeav.models.sam2 import Sam2Config, Sam2Features

AUDIO_GRAPH = GraphSpec(("mel",), ("audio_tokens",), {"mel": {1: "frames"}}, free_axes=("frames",))
VISION_GRAPH = GraphSpec(("patches",), ("visual_tokens",), {})
SAM2_FEATURES = ("image_embed", "feat_s0", "feat_s1")
SAM2_ENCODER = GraphSpec(("pixels",), SAM2_FEATURES, {})
SAM2_DECODER = GraphSpec((*SAM2_FEATURES, "points", "labels"), ("low_res_logits", "iou", "object_score"),
                         {"points": {1: "points"}, "labels": {1: "points"}})


class AudioChunkGraph(nn.Module):
    """The log-mel of one chunk ``[n_mels, frames]`` -> its tokens ``[frames', D]``: the tower's steps for a
    chunk encoded alone (convolutions, the table from position 0, attention over the chunk), then the pair
    pooling, ``ln_post`` and ``proj`` that the whole audio gets token by token."""

    def __init__(self, model) -> None:
        super().__init__()
        self.audio_tower = model.audio_tower

    def forward(self, mel: Tensor) -> Tensor:
        tower = self.audio_tower
        hidden = tower._embed_chunks(mel[None])
        tokens = hidden.shape[0]
        for layer in tower.layers:
            hidden = layer(hidden, tokens)  # the chunk is one attention block
        pairs = tokens // 2
        pooled = hidden[: 2 * pairs].unflatten(0, (pairs, 2)).mean(dim=1)
        return tower.proj(tower.ln_post(pooled))


class VisionSliceGraph(nn.Module):
    """Patch rows of one 224x224 temporal slice ``[256, 1176]`` -> its merged tokens ``[64, D]``."""

    def __init__(self, model) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, patches: Tensor) -> Tensor:
        return self.visual(patches, SLICE_GRID)


class Sam2EncoderGraph(nn.Module):
    """SAM2 pixels ``[1, 3, S, S]`` -> :class:`~edgeav.models.sam2.Sam2Features` as three tensors."""

    def __init__(self, model) -> None:
        super().__init__()
        self.sam2 = model.sam2

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(self.sam2.image_features(pixels))


class Sam2DecoderGraph(nn.Module):
    """One image's features and one prompt -> the single mask's low-res logits, IoU and object score."""

    def __init__(self, model) -> None:
        super().__init__()
        self.sam2 = model.sam2

    def forward(self, image_embed: Tensor, feat_s0: Tensor, feat_s1: Tensor, points: Tensor,
                labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.sam2.predict(Sam2Features(image_embed, feat_s0, feat_s1), points, labels)


def tower_examples(shapes) -> dict[str, tuple[Tensor, ...]]:
    """Example inputs of the ``audio``, ``vision`` and ``llm`` graphs for ``shapes`` (the thinker's ``audio``,
    ``vision`` and ``llm`` configs; two or more of each dynamic axis)."""
    return {"audio": (torch.randn(shapes.audio.num_mel_bins, 2 * shapes.audio.n_window),),
            "vision": (torch.randn(math.prod(SLICE_GRID), shapes.vision.patch_dim),),
            "llm": llm_example(shapes.llm)}


def sam2_examples(sam2: nn.Module, labels: list[int]) -> dict[str, tuple[Tensor, ...]]:
    """Example inputs of the SAM2 ``encoder`` and ``decoder`` graphs, the prompt with ``labels`` (two or more)."""
    size = sam2.config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        features = tuple(sam2.image_features(pixels))
    points = torch.rand(1, len(labels), 2) * size
    return {"encoder": (pixels,), "decoder": (*features, points, torch.tensor([labels]))}


def tower_shapes(graph: str, shapes) -> dict[str, tuple]:
    """The input/output shapes of the ``audio``, ``vision`` or ``llm`` graph under ``shapes`` (None: free)."""
    llm = shapes.llm
    if graph == "audio":
        return {"mel": (shapes.audio.num_mel_bins, None), "audio_tokens": (None, shapes.audio.output_dim)}
    if graph == "vision":
        patches = math.prod(SLICE_GRID)
        return {"patches": (patches, shapes.vision.patch_dim),
                "visual_tokens": (patches // shapes.vision.merge_unit, shapes.vision.out_hidden_size)}
    if graph == "llm":
        return llm_shapes(llm)
    raise ValueError(f"no thinker graph {graph!r}")


def sam2_shapes(graph: str, sam: Sam2Config) -> dict[str, tuple]:
    """The input/output shapes of the SAM2 ``encoder`` or ``decoder`` graph of ``sam`` (None: free)."""
    grid, d = sam.image_embedding_size, sam.d_model
    features = {"image_embed": (1, d, grid, grid), "feat_s0": (1, d // 8, 4 * grid, 4 * grid),
                "feat_s1": (1, d // 4, 2 * grid, 2 * grid)}
    if graph == "encoder":
        return {"pixels": (1, 3, sam.image_size, sam.image_size), **features}
    if graph == "decoder":
        return {**features, "points": (1, None, 2), "labels": (1, None),
                "low_res_logits": (1, 1, sam.low_res_size, sam.low_res_size), "iou": (1, 1), "object_score": (1, 1)}
    raise ValueError(f"no SAM2 graph {graph!r}")


def tower_profiles(graph: str, shapes) -> dict[str, tuple]:
    """TensorRT profiles (batch 1): a chunk of 3 to ``2 * n_window`` mel frames, one vision slice, the LLM's
    prefill (past 0, up to the whole context) and decode (one token)."""
    llm = shapes.llm
    if graph == "audio":
        mels, chunk = shapes.audio.num_mel_bins, 2 * shapes.audio.n_window
        return {"mel": ((mels, 3), (mels, chunk), (mels, chunk))}
    if graph == "vision":
        return {"patches": (tower_shapes("vision", shapes)["patches"],) * 3}
    if graph == "llm":
        return llm_profiles(llm, typical=700)
    raise ValueError(f"no thinker graph {graph!r}")


def sam2_profiles(graph: str, sam: Sam2Config, *, points: int) -> dict[str, tuple]:
    """TensorRT profiles: one SAM2 image, prompts of 1 to ``points`` points (the largest the system writes)."""
    shapes = sam2_shapes(graph, sam)
    if graph == "encoder":
        return {"pixels": (shapes["pixels"],) * 3}
    fixed = {name: (shapes[name],) * 3 for name in SAM2_FEATURES}
    return {**fixed, "points": ((1, 1, 2), (1, points, 2), (1, points, 2)),
            "labels": ((1, 1), (1, points), (1, points))}


__all__ = ["AUDIO_GRAPH", "AudioChunkGraph", "SAM2_DECODER", "SAM2_ENCODER", "SAM2_FEATURES", "Sam2DecoderGraph",
           "Sam2EncoderGraph", "VISION_GRAPH", "VisionSliceGraph", "sam2_examples", "sam2_profiles", "sam2_shapes",
           "tower_examples", "tower_profiles", "tower_shapes"]
