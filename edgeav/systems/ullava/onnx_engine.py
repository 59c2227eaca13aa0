"""u-LLaVA's ``onnx`` backend: an engine directory (``edgeav export``) run by ONNX Runtime.

:class:`OnnxUllava` offers :class:`~edgeav.systems.ullava.pipeline.UllavaPipeline` what
:class:`~edgeav.systems.ullava.checkpoints.LoadedUllava` offers it (``config``, ``tokenizer``,
``source``, ``to`` and a ``model`` with ``encode_image``, ``encode_video``, ``embed_prompt``,
``encode_sam``, ``mask_logits`` and ``llm``), so a run is the same whichever executes it; the
engine holds no GroundingDINO (``grounding`` is None), so ``rec`` and ``ground`` fall back to
the mask's bounding box as for a checkpoint without it. The
directory, the sessions and the LLM's KV cache are the shared :mod:`edgeav.engines.onnx`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgeav.engines.onnx import OnnxFolder, OnnxLLM, numpy_of
from edgeav.generate import splice_blocks
from edgeav.models.sam import postprocess_masks, sam_config
from edgeav.systems.ullava.config import VOCABULARY, UllavaConfig


class OnnxUllavaModel:
    """The engine's graphs behind :class:`~edgeav.systems.ullava.model.UllavaModel`'s methods."""

    def __init__(self, engine: "OnnxUllava") -> None:
        self.engine = engine
        self.sam_size = sam_config(engine.config.sam).img_size
        self.llm = OnnxLLM(engine.session("llm"), engine.embed_table(engine.manifest["embed"], engine.config),
                           engine.config)

    def _patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        (tokens,) = self.engine.session("vision").run(None, {"pixels": numpy_of(pixels)})
        return torch.from_numpy(tokens)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP pixels [1, 3, S, S] -> visual tokens [P, D]."""
        return self._patch_tokens(pixels)[0]

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP pixels of T frames [T, 3, S, S] -> [T + P, D]: per-frame means first, then per-patch means.

        The graph projects before pooling: the projector is affine, so this equals pooling first."""
        tokens = self._patch_tokens(pixels)
        return torch.cat([tokens.mean(dim=1), tokens.mean(dim=0)], dim=0)

    def embed_prompt(self, token_ids: list[int], blocks: dict[int, torch.Tensor]) -> torch.Tensor:
        return splice_blocks(self.llm.embed(torch.tensor(token_ids)), token_ids, blocks)

    def encode_sam(self, pixels: torch.Tensor) -> torch.Tensor:
        """SAM pixels [1, 3, I, I] -> the image embedding [1, C, g, g]."""
        (embedding,) = self.engine.session("sam_encoder").run(None, {"pixels": numpy_of(pixels)})
        return torch.from_numpy(embedding)

    def mask_logits(self, seg_hidden: torch.Tensor, image_embedding: torch.Tensor, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> torch.Tensor:
        """The states that produced each ``[SEG]`` [N, D] -> mask logits [N, H, W] at the source's size."""
        (low_res,) = self.engine.session("sam_decoder").run(None, {
            "seg_hidden": numpy_of(seg_hidden), "image_embedding": numpy_of(image_embedding[:1])})
        return postprocess_masks(torch.from_numpy(low_res), input_size, original_size, img_size=self.sam_size)[:, 0]


class OnnxUllava(OnnxFolder):
    """A u-LLaVA engine directory on ONNX Runtime; sessions open on first use.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    system = "ullava"
    # GroundingDINO (rec, ground) is not exported: region tasks on an engine box the mask, and say so.
    grounding = None
    grounding_tokenizer = None

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        super().__init__(folder, threads=threads)
        self.config = UllavaConfig.from_dict(self.manifest["config"])
        self.tokenizer = self.read_tokenizer(self.config, VOCABULARY)
        self.model = OnnxUllavaModel(self)


__all__ = ["OnnxUllava", "OnnxUllavaModel"]
