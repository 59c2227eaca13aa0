"""Engines: one interface, several executors.

- ``torch``: the PyTorch reference, :class:`edgeav.checkpoints.LoadedCrab` itself.
- ``onnx``: an engine directory written by ``edgeav export``, run by ONNX Runtime
  (:class:`edgeav.engines.onnx.OnnxEngine`).

Each gives ``variant(name)`` -> a model with ``encode_frames``, ``encode_audio``,
``embed_prompt``, ``llm`` (prefill and decode, see :mod:`edgeav.generate`) and
``mask_logits``; :class:`edgeav.runtime.Runtime` runs whichever it is given.
"""

from __future__ import annotations

from pathlib import Path

from edgeav.engines.manifest import read_manifest
from edgeav.errors import CheckpointError

BACKENDS = ("torch", "onnx")


def load_engine(path: str | Path, *, threads: int | None = None):
    """Open the engine directory ``path`` with the backend its manifest names (hashes checked)."""
    manifest = read_manifest(Path(path))
    backend = manifest.get("backend")
    if backend == "onnx":
        from edgeav.engines.onnx import OnnxEngine  # torch and onnxruntime load only when an engine does

        return OnnxEngine(path, threads=threads)
    raise CheckpointError(f"{path}: a {backend!r} engine; edgeav runs onnx engine directories (a TensorRT "
                          "runtime backend is not built yet: export --format onnx)")


__all__ = ["BACKENDS", "load_engine"]
