"""edgeav: run audio-visual scene-understanding models (Crab, Crab+, u-LLaVA, OpenAVS) on the edge."""

import logging

from edgeav.errors import CheckpointError, EdgeavError, MediaError, OptionError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "EdgeavError",
    "MediaError",
    "MediaInfo",
    "OptionError",
    "PushSource",
    "Result",
    "Runtime",
    "Segment",
    "__version__",
    "open_source",
    "segments",
]

# Imported on first use: the model stack imports torch, the media layer PyAV and numpy, and the command
# line answers --version and --help (and installs its Ctrl-C handler) before either.
_LAZY = {"Runtime": "edgeav.runtime", "Result": "edgeav.results", "MediaInfo": "edgeav.media",
         "PushSource": "edgeav.media", "Segment": "edgeav.media", "open_source": "edgeav.media",
         "segments": "edgeav.media"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeav' has no attribute {name!r}")

logging.getLogger("edgeav").addHandler(logging.NullHandler())
