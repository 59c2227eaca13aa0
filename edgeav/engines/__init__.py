"""Engines: one interface, several executors.

- ``torch``: the PyTorch reference, :class:`edgeav.checkpoints.LoadedCrab` itself.
- ``onnx``: an engine directory written by ``edgeav export``, run by ONNX Runtime
  (:class:`edgeav.engines.onnx.OnnxEngine`).

Each gives ``variant(name)`` -> a model with ``encode_frames``, ``encode_audio``,
``embed_prompt``, ``llm`` (prefill and decode, see :mod:`edgeav.generate`) and
``mask_logits``; :class:`edgeav.runtime.Runtime` runs whichever it is given.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeav.engines.manifest import read_manifest
from edgeav.errors import CheckpointError, OptionError

BACKENDS = ("torch", "onnx")
# More threads than this only cost memory (each has its own stack and scratch buffers).
MAX_THREADS = 4 * (os.cpu_count() or 1)


def check_threads(threads: int | None) -> None:
    """``threads`` (None: the runtime's default) is a whole number in 1..MAX_THREADS, or a one-line OptionError."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise OptionError(f"--threads {threads!r}: expected 1..{MAX_THREADS} (four per CPU core of this machine)")


def load_engine(path: str | Path, *, threads: int | None = None):
    """Open the engine directory ``path`` with the backend its manifest names (hashes checked)."""
    check_threads(threads)
    manifest = read_manifest(Path(path))
    backend = manifest["backend"]
    if backend == "onnx":
        from edgeav.engines.onnx import OnnxEngine  # torch and onnxruntime load only when an engine does

        return OnnxEngine(path, threads=threads)
    raise CheckpointError(f"{path}: a {backend!r} engine; edgeav runs onnx engine directories (a TensorRT "
                          "runtime backend is not built yet: export --format onnx)")


__all__ = ["BACKENDS", "MAX_THREADS", "check_threads", "load_engine"]
