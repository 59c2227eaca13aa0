"""Crab+'s ``onnx`` backend: an engine directory (``edgeav export``) run by ONNX Runtime.

:class:`OnnxCrabPlus` offers :class:`~edgeav.systems.crabplus.pipeline.CrabPlusPipeline` what
:class:`~edgeav.systems.crabplus.checkpoints.LoadedCrabPlus` offers it (``config``, ``tokenizer``,
``source``, ``to`` and a ``model`` with ``encode_audio``, ``encode_vision``, ``embed_prompt``, ``llm``
and ``sam2``), so a run is the same whichever executes it.

The thinker's graphs run through :class:`~edgeav.engines.qwen_onnx.OnnxQwenTowers` (audio chunk by
chunk, vision slice by slice) and SAM2's through :class:`~edgeav.engines.qwen_onnx.OnnxSam2`, which
OpenAVS's engine shares.
"""

from __future__ import annotations

from pathlib import Path

from edgeav.engines.onnx import OnnxFolder
from edgeav.engines.qwen_onnx import OnnxQwenTowers, OnnxSam2, read_qwen_tokenizer
from edgeav.models.sam2 import sam2_config
from edgeav.systems.crabplus.config import CrabPlusConfig


class OnnxCrabPlusModel(OnnxQwenTowers):
    """The engine's graphs behind :class:`~edgeav.systems.crabplus.model.CrabPlusModel`'s methods
    (``encode_audio``, ``encode_vision``, ``embed_prompt``, ``llm``, ``sam2``)."""

    def __init__(self, engine: "OnnxCrabPlus") -> None:
        super().__init__(engine, engine.config, engine.embed_table(engine.manifest["embed"], engine.config))
        self.config = engine.config
        self.sam2 = OnnxSam2(engine, sam2_config(engine.config.sam2))


class OnnxCrabPlus(OnnxFolder):
    """A Crab+ engine directory on ONNX Runtime; sessions open on first use.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    system = "crabplus"

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        super().__init__(folder, threads=threads)
        self.config = CrabPlusConfig.from_dict(self.manifest["config"])
        self.tokenizer = read_qwen_tokenizer(self.folder, self.manifest)  # each file checked against its hash
        self.model = OnnxCrabPlusModel(self)


__all__ = ["OnnxCrabPlus", "OnnxCrabPlusModel"]
