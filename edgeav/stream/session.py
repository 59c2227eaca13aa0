"""Push sessions: a stream fed frame by frame and chunk by chunk by the caller."""

from __future__ import annotations

import collections
import threading
from typing import Iterator

import numpy as np

from edgeav.errors import MediaError
from edgeav.media import PushSource
from edgeav.stream.pipeline import RESULT_QUEUE, Stream
from edgeav.stream.telemetry import Telemetry, WindowResult


class StreamSession:
    """A stream fed by the caller: ``push_video`` / ``push_audio`` from one thread, ``results()`` from another.

    Build it with :meth:`Runtime.push_session`; the model runs in background threads
    from the start. Pushing never blocks: when the model falls behind, windows are
    skipped (see ``telemetry``). :meth:`close` ends the input; ``results()`` then yields
    what is left and stops.
    """

    def __init__(self, stream: Stream, source: PushSource) -> None:
        self._stream, self._source = stream, source
        self._queue: collections.deque[WindowResult] = collections.deque()
        self._cond = threading.Condition()
        self._done = False
        self._error: BaseException | None = None
        self.results_dropped = 0  # results nobody read before RESULT_QUEUE newer ones arrived
        self._reader = threading.Thread(target=self._read, name="edgeav-session", daemon=True)
        self._reader.start()

    @property
    def telemetry(self) -> Telemetry:
        return self._stream.telemetry

    @property
    def dropped_segments(self) -> int:
        """Seconds the session's own buffer dropped because the encoder fell behind."""
        return self._source.dropped_segments

    def push_video(self, frame: np.ndarray, t: float) -> None:
        """One RGB frame, uint8 [H, W, 3], shown at time ``t`` (seconds on the caller's clock)."""
        self._check_running()
        self._source.push_video(frame, t)

    def push_audio(self, samples: np.ndarray, sample_rate: int, t: float) -> None:
        """Audio starting at time ``t``: float32 in [-1, 1] or int16, shape [n] or [n, channels]."""
        self._check_running()
        self._source.push_audio(samples, sample_rate, t)

    def _check_running(self) -> None:
        """A session whose model failed says why, rather than that its source is closed."""
        if self._stream._error is not None:
            raise self._stream._error

    def close(self) -> None:
        """No more media: the last seconds are processed, then ``results()`` ends."""
        self._source.close()

    def stop(self) -> None:
        """End now: windows not yet generated are dropped."""
        self._stream.stop()

    def results(self, timeout_s: float | None = None) -> Iterator[WindowResult]:
        """Window results as they come, until the session is closed and drained.

        ``timeout_s`` bounds the wait for each result (a :class:`~edgeav.errors.MediaError`
        on expiry). Results are handed out once, to whichever reader takes them.
        """
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._queue or self._done, timeout=timeout_s):
                    raise MediaError(f"push session: no result for {timeout_s} s; is the producer still pushing?")
                if self._queue:
                    item = self._queue.popleft()
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield item

    def _read(self) -> None:
        try:
            for result in self._stream:
                with self._cond:
                    self._queue.append(result)
                    if len(self._queue) > RESULT_QUEUE:  # nobody reads: keep the newest
                        self._queue.popleft()
                        self.results_dropped += 1
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Leaving the block closes the input and waits for the last windows (stops at once on an error)."""
        if exc_type is not None:
            self.stop()
        self.close()
        self._reader.join()
        self._stream.close()
