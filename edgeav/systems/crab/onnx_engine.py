"""Crab's ``onnx`` backend: an engine directory run by ONNX Runtime.

It offers what the reference :class:`~edgeav.systems.crab.checkpoints.LoadedCrab` offers the
runtime (``variant(name)`` -> a model with ``encode_frames``, ``encode_audio``,
``embed_prompt``, ``llm`` and ``mask_logits``), so :class:`~edgeav.runtime.Runtime`
runs either the same way. The directory, the sessions and the LLM's KV cache are the shared
:mod:`edgeav.engines.onnx`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgeav.engines.onnx import OnnxFolder, OnnxLLM, numpy_of as _numpy
from edgeav.errors import CheckpointError
from edgeav.generate import splice_blocks
from edgeav.systems.crab.config import VOCABULARY, CrabConfig
from edgeav.systems.crab.model import VisualFeatures


class OnnxModel:
    """One weight variant of an ONNX engine, shaped like :class:`~edgeav.systems.crab.model.CrabModel`."""

    def __init__(self, engine: "OnnxEngine", variant: str) -> None:
        self.engine = engine
        self.variant = variant
        self.llm = engine.llm(variant)

    def encode_frames(self, pixels: torch.Tensor) -> VisualFeatures:
        tokens, low, high = self.engine.session("visual").run(None, {"pixels": _numpy(pixels)})
        return VisualFeatures(torch.from_numpy(tokens), torch.from_numpy(low), torch.from_numpy(high))

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        (tokens,) = self.engine.session("audio").run(None, {"fbank": _numpy(fbank)})
        return torch.from_numpy(tokens)

    def embed_prompt(self, token_ids: list[int], blocks: dict[int, torch.Tensor]) -> torch.Tensor:
        return splice_blocks(self.llm.embed(torch.tensor(token_ids)), token_ids, blocks)

    def mask_logits(self, mask_hidden: torch.Tensor, frame: VisualFeatures) -> torch.Tensor:
        name = self.engine.manifest["variants"][self.variant].get("mask")
        if name is None:
            raise CheckpointError(f"{self.engine.folder}: the {self.variant} weights have no mask decoder")
        (logits,) = self.engine.session(name).run(None, {
            "mask_hidden": _numpy(mask_hidden[None]), "mask_low": _numpy(frame.mask_low[:1]),
            "mask_high": _numpy(frame.mask_high[:1])})
        return torch.from_numpy(logits)


class OnnxEngine(OnnxFolder):
    """A Crab engine directory on ONNX Runtime; sessions open on first use.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    system = "crab"

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        super().__init__(folder, threads=threads)
        self.config = CrabConfig.from_dict(self.manifest["config"])
        self.tokenizer = self.read_tokenizer(self.config, VOCABULARY)
        self._llms: dict[tuple[str, str], OnnxLLM] = {}
        self._models: dict[str, OnnxModel] = {}

    def llm(self, variant: str) -> OnnxLLM:
        entry = self._variant(variant)
        key = (entry["llm"], entry["embed"])
        if key not in self._llms:
            table = self.embed_table(entry["embed"], self.config)
            self._llms[key] = OnnxLLM(self.session(entry["llm"]), table, self.config)
        return self._llms[key]

    def _variant(self, variant: str) -> dict:
        entry = self.manifest["variants"].get(variant)
        if entry is None:
            raise CheckpointError(f"{self.folder}: has no {variant} weights, which this task needs; export the "
                                  "engine again from a checkpoint with them (and without a variants limit)")
        return entry

    def variant(self, name: str) -> OnnxModel:
        if name not in self._models:
            self._variant(name)
            self._models[name] = OnnxModel(self, name)
        return self._models[name]
