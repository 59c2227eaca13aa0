"""Engines: one interface, several executors.

- ``torch``: the PyTorch reference, the system's loaded model itself.
- ``onnx``: an engine directory written by ``edgeav export`` (its ``manifest.json`` says the
  system), run by ONNX Runtime through the system's engine class (built on :mod:`edgeav.engines.onnx`).

A system's torch model and its ONNX engine offer the same interface, so the system's pipeline
runs whichever :class:`edgeav.runtime.Runtime` gives it. What a system's engine directory holds
and how it is checked is the system's :class:`~edgeav.engines.spec.SystemExport`.
"""

from __future__ import annotations

import os

from edgeav.errors import OptionError

BACKENDS = ("torch", "onnx")
# More threads than this only cost memory (each has its own stack and scratch buffers).
MAX_THREADS = 4 * (os.cpu_count() or 1)


def check_threads(threads: int | None) -> None:
    """``threads`` (None: the runtime's default) is a whole number in 1..MAX_THREADS, or a one-line OptionError."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise OptionError(f"--threads {threads!r}: expected 1..{MAX_THREADS} (four per CPU core of this machine)")


__all__ = ["BACKENDS", "MAX_THREADS", "check_threads"]
