"""edgeav: run Crab-family audio-visual LLMs on the edge."""

import logging

from edgeav.errors import EdgeavError, MediaError, OptionError
from edgeav.media import MediaInfo, PushSource, Segment, open_source, segments

__version__ = "0.1.0"

__all__ = [
    "EdgeavError",
    "MediaError",
    "MediaInfo",
    "OptionError",
    "PushSource",
    "Segment",
    "__version__",
    "open_source",
    "segments",
]

logging.getLogger("edgeav").addHandler(logging.NullHandler())
