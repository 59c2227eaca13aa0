"""edgeav: run Crab-family audio-visual LLMs on the edge."""

import logging

from edgeav.errors import CheckpointError, EdgeavError, MediaError, OptionError
from edgeav.media import MediaInfo, PushSource, Segment, open_source, segments

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

_LAZY = {"Runtime": "edgeav.runtime", "Result": "edgeav.runtime"}


def __getattr__(name: str):
    # The model stack imports torch and every module; media-only users need not pay for it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgeav' has no attribute {name!r}")

logging.getLogger("edgeav").addHandler(logging.NullHandler())
