"""Which implementation a kernel call runs: Triton on CUDA tensors, pure torch elsewhere.

Triton is an optional dependency (the ``gpu`` extra): it is imported only when a Triton path runs.
Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU tensors, which is how the
tests check them on machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from torch import Tensor

from edgeav.errors import OptionError

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked once, without importing it: every layer
    call asks)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET=1`` asks for Triton's CPU interpreter (it must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def import_triton():
    """``(triton, triton.language)``, or an error that says how to install Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        raise OptionError(
            "the Triton kernels need the triton package, which is not installed; "
            "on a machine with an NVIDIA GPU run: pip install \"edgeav[gpu]\" (or pip install triton), "
            "or pass backend=\"torch\" for the pure-torch path"
        ) from None
    return triton, tl


def use_triton(what: str, tensor: Tensor, backend: str) -> bool:
    """Resolve ``backend`` for one call on ``tensor``: ``auto`` picks Triton for CUDA tensors when it is
    installed and torch otherwise; ``triton`` insists and fails with a clear message where it cannot run."""
    if backend not in BACKENDS:
        raise OptionError(f"{what}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        import_triton()  # raises the install hint
    # Checked before triton is imported: importing it outside interpreter mode fixes that mode for the process.
    if not tensor.is_cuda and not triton_interpret():
        raise OptionError(
            f"{what}: backend 'triton' got tensors on {tensor.device}; the Triton kernels run on CUDA tensors "
            f"(or on the CPU with TRITON_INTERPRET=1 set before triton is imported); move the model and inputs "
            f"to CUDA or use backend 'torch'"
        )
    return True


def triton_kernels():
    """The module of jitted kernels (``_triton.py``), compiled or interpreted as triton was imported."""
    triton, tl = import_triton()
    # Triton's own library functions (tl.cdiv, tl.sum, ...) are jitted when triton is imported, so the
    # interpreter works only if TRITON_INTERPRET was set before that import.
    imported_interpreted = type(tl.cdiv).__name__ == "InterpretedFunction"
    if imported_interpreted != triton_interpret():
        raise OptionError(
            f"TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET', 'unset')!r} now but triton was imported "
            f"{'with' if imported_interpreted else 'without'} it; set TRITON_INTERPRET before the first import of "
            f"triton (in the environment of the process) and do not change it afterwards"
        )
    from . import _triton  # first use only: importing edgeav.kernels never imports triton

    return _triton
