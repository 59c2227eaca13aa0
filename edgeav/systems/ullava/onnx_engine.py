"""u-LLaVA's ``onnx`` backend: an engine directory (``edgeav export``) run by ONNX Runtime.

:class:`OnnxUllava` offers :class:`~edgeav.systems.ullava.pipeline.UllavaPipeline` what
:class:`~edgeav.systems.ullava.checkpoints.LoadedUllava` offers it (``config``, ``tokenizer``,
``source``, ``to`` and a ``model`` with ``encode_image``, ``encode_video``, ``embed_prompt``,
``encode_sam``, ``mask_logits`` and ``llm``; ``grounding`` and ``grounding_tokenizer`` for
``rec`` and ``ground``), so a run is the same whichever executes it. An engine exported from a
checkpoint without GroundingDINO has neither (None): its region tasks box the mask, as that
checkpoint's do. The directory, the sessions and the LLM's KV cache are the shared
:mod:`edgeav.engines.onnx`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeav.engines.manifest import read_listed_file
from edgeav.engines.onnx import OnnxFolder, OnnxLLM, numpy_of
from edgeav.errors import CheckpointError
from edgeav.generate import splice_blocks
from edgeav.models.grounding_dino import GroundingDINOConfig
from edgeav.models.sam import postprocess_masks, sam_config
from edgeav.preprocess.grounding_dino import GroundingTokenizer
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


class OnnxGroundingDINO:
    """The ``grounding`` graph, called as :class:`~edgeav.models.grounding_dino.GroundingDINO` is: (pixel_values
    [1,3,H,W], pixel_mask [1,H,W], input_ids, attention_mask, token_type_ids [1,L]) -> (pred_logits [1,Q,T],
    pred_boxes [1,Q,4]) tensors; the session opens on the first call."""

    def __init__(self, engine: "OnnxUllava") -> None:
        self.engine = engine

    def __call__(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [np.ascontiguousarray(t.detach().cpu().numpy().astype(np.int64))
               for t in (pixel_mask, input_ids, attention_mask, token_type_ids)]
        feeds = dict(zip(("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids"),
                         (numpy_of(pixel_values), *ids)))
        logits, boxes = self.engine.session("grounding").run(None, feeds)
        return torch.from_numpy(logits), torch.from_numpy(boxes)


class OnnxUllava(OnnxFolder):
    """A u-LLaVA engine directory on ONNX Runtime; sessions open on first use.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    system = "ullava"

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        super().__init__(folder, threads=threads)
        self.config = UllavaConfig.from_dict(self.manifest["config"])
        self.tokenizer = self.read_tokenizer(self.config, VOCABULARY)
        self.model = OnnxUllavaModel(self)
        # GroundingDINO (rec, ground) with its caption vocabulary, when the checkpoint had it
        self.grounding: OnnxGroundingDINO | None = None
        self.grounding_tokenizer: GroundingTokenizer | None = None
        if "grounding" in self.manifest["graphs"]:
            self.grounding = OnnxGroundingDINO(self)
            self.grounding_tokenizer = self._grounding_tokenizer(self.manifest["grounding_vocab"])

    def _grounding_tokenizer(self, name: str) -> GroundingTokenizer:
        """The listed vocabulary (hash checked as read), cut at the preset's caption length."""
        data = read_listed_file(self.folder, self.manifest, name)
        try:
            tokens = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.folder / name}: not UTF-8 text; export the engine again") from None
        max_text_len = GroundingDINOConfig.from_preset(self.config.grounding).max_text_len
        return GroundingTokenizer.from_tokens(tokens, max_text_len)


__all__ = ["OnnxGroundingDINO", "OnnxUllava", "OnnxUllavaModel"]
