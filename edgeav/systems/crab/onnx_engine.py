"""Crab's ``onnx`` backend: an engine directory run by ONNX Runtime.

It offers what the reference :class:`~edgeav.systems.crab.checkpoints.LoadedCrab` offers the
runtime (``variant(name)`` -> a model with ``encode_frames``, ``encode_audio``,
``embed_prompt``, ``llm`` and ``mask_logits``), so :class:`~edgeav.runtime.Runtime`
runs either the same way. The directory, the sessions and the LLM's KV cache are the shared
:mod:`edgeav.engines.onnx`.

The model answers in the kind of array it is given: numpy arrays (the runtime's engine path, which
imports no torch) or torch tensors (the reference's interface, which benches and tests call).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeav.decoding import splice_rows
from edgeav.engines.onnx import OnnxFolder, OnnxLLM, like, numpy_of as _numpy
from edgeav.errors import CheckpointError
from edgeav.systems.crab.config import VOCABULARY, CrabConfig
from edgeav.systems.crab.features import VisualFeatures


class OnnxModel:
    """One weight variant of an ONNX engine, shaped like :class:`~edgeav.systems.crab.model.CrabModel`."""

    def __init__(self, engine: "OnnxEngine", variant: str) -> None:
        self.engine = engine
        self.variant = variant
        self.llm = engine.llm(variant)

    def encode_frames(self, pixels) -> VisualFeatures:
        """CLIP-normalised pixels [F, 3, 224, 224] -> LLM tokens and the two mask scales."""
        tokens, low, high = self.engine.session("visual").run(None, {"pixels": _numpy(pixels)})
        return VisualFeatures(like(pixels, tokens), like(pixels, low), like(pixels, high))

    def encode_audio(self, fbank):
        """Crab fbank [S, T, 128] -> audio tokens [S, Q, llm_hidden]."""
        (tokens,) = self.engine.session("audio").run(None, {"fbank": _numpy(fbank)})
        return like(fbank, tokens)

    def embed_prompt(self, token_ids: list[int], blocks: dict):
        """Token ids with placeholder ids -> input embeddings [1, L, D], each placeholder replaced by its block;
        torch tensors when the blocks are."""
        embeds = splice_rows(self.llm.embed_ids(token_ids), token_ids, {t: _numpy(b) for t, b in blocks.items()})
        torch_blocks = [b for b in blocks.values() if not isinstance(b, np.ndarray)]
        return like(torch_blocks[0], embeds) if torch_blocks else embeds

    def mask_logits(self, mask_hidden, frame: VisualFeatures):
        """The 6 ``<mask_i>`` hidden states [6, D] and the frame's CLIP scales -> logits [1, C, 224, 224]."""
        name = self.engine.manifest["variants"][self.variant].get("mask")
        if name is None:
            raise CheckpointError(f"{self.engine.folder}: the {self.variant} weights have no mask decoder")
        (logits,) = self.engine.session(name).run(None, {
            "mask_hidden": _numpy(mask_hidden[None]), "mask_low": _numpy(frame.mask_low[:1]),
            "mask_high": _numpy(frame.mask_high[:1])})
        return like(mask_hidden, logits)


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
