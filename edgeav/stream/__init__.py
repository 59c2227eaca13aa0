"""Streaming: a system over a sliding window of a live or file source, a result every stride.

Three stages run in their own threads, joined by bounded channels::

    decode ─segments─▶ encode ─windows─▶ llm ─results─▶ caller

- decode reads the source one second at a time (the ``stream`` frame policy: the
  first frame of each second), reconnecting to a live URL that drops;
- encode takes each second as it arrives (Crab encodes it into tokens at once; u-LLaVA keeps
  the frame and runs CLIP on a window's frames in the llm stage), keeps it for as long as a
  later window needs it, and hands the llm a window every ``stride`` seconds once its last
  second is in;
- llm prompts, generates and parses, with times in source seconds.

The encode and llm work is the system's (its pipeline's ``stream_stages``: Crab's in
:mod:`edgeav.systems.crab.stream`); this package runs it.

File sources are processed completely: a full channel makes the stage before it
wait. Live sources (live URLs, push sessions, ``realtime=True``) never make the
decoder wait: the oldest queued second or window is dropped instead, and every
window lost that way is counted in :class:`Telemetry`.

The modules, lowest first: ``telemetry`` (results, gaps, stage statistics), ``channel``
(the bounded queues), ``pipeline`` (:class:`Stream`: the stage threads and the caller's
iterator), ``session`` (:class:`StreamSession`: push sessions). This face re-exports what
callers use.
"""

from edgeav.stream.pipeline import (RESULT_QUEUE, SEGMENT_QUEUE, STAGE_TIMEOUT_S, WINDOW_QUEUE_FILE, Stream,
                                    stop_on_signals)
from edgeav.stream.session import StreamSession
from edgeav.stream.telemetry import (COMPUTE_STAGES, PERCENTILE_SAMPLES, TELEMETRY_STAGES, Gap, StageStats, Telemetry,
                                     WindowResult, rss_mb)

__all__ = [
    "COMPUTE_STAGES",
    "PERCENTILE_SAMPLES",
    "RESULT_QUEUE",
    "SEGMENT_QUEUE",
    "STAGE_TIMEOUT_S",
    "TELEMETRY_STAGES",
    "WINDOW_QUEUE_FILE",
    "Gap",
    "StageStats",
    "Stream",
    "StreamSession",
    "Telemetry",
    "WindowResult",
    "rss_mb",
    "stop_on_signals",
]
