"""The stream: three stage threads joined by bounded channels, and the caller's iterator over them.

    decode ─segments─▶ encode ─windows─▶ llm ─results─▶ caller

File sources are processed completely: a full channel makes the stage before it
wait. Live sources (live URLs, push sessions, ``realtime=True``) never make the
decoder wait: the oldest queued second or window is dropped instead, and every
window lost that way is counted in :class:`~edgeav.stream.telemetry.Telemetry`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Iterator

from edgeav.errors import EdgeavError, MediaError
from edgeav.media import MediaSource, PushSource, Segment
from edgeav.media.source import is_url
from edgeav.media.open import open_media
from edgeav.stages import StageTimer, inference_mode
from edgeav.stream.channel import _Channel, _Closed
from edgeav.stream.telemetry import Gap, Telemetry, WindowResult

log = logging.getLogger("edgeav")

# Channel sizes: seconds the decoder may run ahead of the encoder, windows waiting for the llm,
# results waiting for the caller.
SEGMENT_QUEUE = 4
WINDOW_QUEUE_FILE = 2
RESULT_QUEUE = 16
STAGE_TIMEOUT_S = 5.0  # how long close() waits for a stage thread blocked in I/O


class Stream:
    """An iterator of :class:`WindowResult` over a source (build it with :meth:`Runtime.stream`).

    ``pipeline`` is the system's pipeline the :class:`~edgeav.runtime.Runtime` runs; its
    ``stream_stages(spec, ...)`` gives the system's encode and llm stages (what a second is encoded
    into, when a window is ready, how a window is answered). This module runs them in its threads.

    Nothing runs until the first ``next()``. ``telemetry`` is live; :meth:`stop` asks
    the stream to end (the window being generated finishes, results already made are
    still yielded); :meth:`close` stops and joins the threads. Leaving a ``for`` loop
    early does the same (the loop holds the only reference to the results generator);
    after ``next(stream)`` call :meth:`close` or use ``with``.
    """

    def __init__(self, pipeline, source: "str | Path | PushSource", spec, *, window: int,
                 stride: int, question: str | None, expression: str | None, sampling, max_new_tokens: int | None,
                 realtime: bool, reconnect: int, reconnect_backoff_s: float, media: dict | None = None) -> None:
        self.spec = spec
        self._media = media or {}  # audio, fps, silent_audio: how a file source is opened (edgeav.media.open_media)
        self.window, self.stride = window, stride
        self.source = source
        self.realtime = realtime
        self._reconnect, self._backoff_s = reconnect, reconnect_backoff_s
        self.telemetry = Telemetry()
        self.source_size: tuple[int, int] | None = None  # (width, height), known once media arrives
        self.live: bool | None = None  # decided when the stream starts (a URL is asked whether it is live)
        self._stopping = threading.Event()
        self._stages = pipeline.stream_stages(
            spec, window=window, stride=stride, telemetry=self.telemetry, stopping=self._stopping,
            answer_options=dict(question=question, expression=expression, sampling=sampling,
                                max_new_tokens=max_new_tokens))
        self._segments = self._windows = self._results = _Channel(0, drop_oldest=False)  # replaced at the start
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None  # from the encode or llm stage: ends the stream at once
        self._source_error: BaseException | None = None  # from decoding: raised after the work already read
        self._gaps_lock = threading.Lock()
        self._unreported_gaps: list[Gap] = []
        self._iterator: Iterator[WindowResult] | None = None  # made by next(); held here
        self._loop_iterator: "weakref.ref | None" = None  # made by iter(); held by the caller's loop only
        self._connection: MediaSource | None = None  # a live URL opened to ask whether it is live

    def _is_live(self) -> bool:
        """Whether the source is live (a live URL, a push source, or ``realtime``); a live URL's first
        connection is kept for the decoder."""
        if isinstance(self.source, PushSource):
            return True
        if is_url(str(self.source)):
            src = MediaSource(self.source)
            if src.info.is_live:
                self._connection = src
                return True
            src.close()
        return self.realtime

    # -- the caller's side ----------------------------------------------------

    def __iter__(self) -> Iterator[WindowResult]:
        running = self._running_iterator()
        if running is not None:
            return running
        iterator = self._run()
        self._loop_iterator = weakref.ref(iterator)
        return iterator

    def __next__(self) -> WindowResult:
        if self._iterator is None:
            self._iterator = self._running_iterator() or self._run()
        return next(self._iterator)

    def _running_iterator(self) -> Iterator[WindowResult] | None:
        if self._iterator is not None:
            return self._iterator
        return self._loop_iterator() if self._loop_iterator is not None else None

    def stop(self) -> None:
        """End the stream soon: no new windows; the one being generated finishes."""
        self._stopping.set()
        self._segments.close(discard=True)
        if isinstance(self.source, PushSource):
            self.source.close()

    def close(self) -> None:
        """Stop and wait for the stage threads."""
        self.stop()
        iterator = self._running_iterator()
        if iterator is not None:
            iterator.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> Iterator[WindowResult]:
        started = time.perf_counter()
        _RUNNING.add(self)
        self.live = self._is_live()
        # A push source drops its own oldest seconds (counted there); the channel after it waits.
        self._segments = _Channel(SEGMENT_QUEUE, drop_oldest=self.live and not isinstance(self.source, PushSource))
        self._windows = _Channel(1 if self.live else WINDOW_QUEUE_FILE, drop_oldest=self.live)
        self._results = _Channel(RESULT_QUEUE, drop_oldest=False)
        stages = (("decode", self._decode_stage), ("encode", self._encode_stage), ("llm", self._llm_stage))
        # Daemon threads: a decoder blocked reading a dead network source must not keep the process alive.
        self._threads = [threading.Thread(target=self._guard, args=(target,), name=f"edgeav-{name}", daemon=True)
                         for name, target in stages]
        for thread in self._threads:
            thread.start()
        try:
            while True:
                try:
                    yield self._results.get()
                except _Closed:
                    break
            if self._error is not None:
                raise self._error
            if self._source_error is not None:
                raise self._source_error
        finally:
            self.stop()
            self.telemetry.count("windows_skipped", len(self._windows.close(discard=True)))
            self._results.close(discard=True)
            self._join()
            if self._connection is not None:  # stopped before the decoder took it
                self._connection.close()
            self.telemetry.wall_s = time.perf_counter() - started
            self.telemetry.sample_memory()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=STAGE_TIMEOUT_S)

    def _guard(self, stage: Callable[[], None]) -> None:
        """Run a stage; an error there ends the stream and is raised to the caller."""
        try:
            with inference_mode():  # grad mode is per thread
                stage()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            if self._error is None:
                self._error = e
            self.stop()
            self.telemetry.count("windows_skipped", len(self._windows.close(discard=True)))
            self._results.close()

    # -- decode -----------------------------------------------------------------

    def _decode_stage(self) -> None:
        paced_from = None
        try:
            for segment, read_ms in self._timed(self._source_segments()):
                if self._stopping.is_set():
                    break
                if self.realtime:
                    # A camera hands over a second when it is over (a live source keeps its own pace anyway).
                    paced_from = paced_from or time.perf_counter() - segment.start_s
                    delay = paced_from + segment.end_s - time.perf_counter()
                    if delay > 0 and self._stopping.wait(delay):
                        break
                if read_ms is not None:
                    self.telemetry.stages["decode"].add(read_ms)
                self.telemetry.media_s += segment.end_s - segment.start_s
                if self._segments.put((segment, time.perf_counter())) is not None:
                    self.telemetry.count("segments_dropped")
        except EdgeavError as e:
            self._source_error = e
        finally:
            self._segments.close()
            if isinstance(self.source, PushSource):
                self.telemetry.count("segments_dropped", self.source.dropped_segments)

    @staticmethod
    def _timed(segments: Iterator[Segment]) -> Iterator[tuple[Segment, float | None]]:
        """Each segment with the milliseconds spent reading it (None for pushed media: the caller decoded it)."""
        while True:
            start = time.perf_counter()
            try:
                segment, measured = next(segments)
            except StopIteration:
                return
            yield segment, (time.perf_counter() - start) * 1000 if measured else None

    def _source_segments(self) -> Iterator[tuple[Segment, bool]]:
        if isinstance(self.source, PushSource):
            for segment in self.source.segments():
                for start_s, end_s, reason in self.source.take_gaps():
                    self._add_gap(Gap(start_s, end_s, reason))
                yield segment, False
            return
        if self._connection is not None:  # a live URL
            yield from ((segment, True) for segment in self._reconnecting())
            return
        with open_media(self.source, **self._media) as src:
            self.source_size = (src.info.video.width, src.info.video.height)
            for segment in src.segments("stream", frame_size=self._stages.frame_size):
                yield segment, True

    def _reconnecting(self) -> Iterator[Segment]:
        """A live URL's seconds; when it drops (read error or end), reopen it with exponential backoff, up
        to ``reconnect`` times in a row, and place the new seconds after the wall-clock time lost."""
        offset = 0  # source second of the current connection's second 0
        next_second = 0
        failures = 0
        dropped_at: float | None = None  # perf_counter when the last second arrived before a drop
        last_arrival = time.perf_counter()
        reason = ""
        while not self._stopping.is_set():
            src, self._connection = self._connection, None
            try:
                src = src or MediaSource(self.source)
            except MediaError as e:
                reason = str(e)
            if src is not None:
                with src:
                    if self.source_size is None and src.info.video is not None:
                        self.source_size = (src.info.video.width, src.info.video.height)
                    if dropped_at is not None:
                        offset = next_second + math.ceil(time.perf_counter() - dropped_at)
                        self._add_gap(Gap(float(next_second), float(offset),
                                          f"the stream dropped ({reason}); reconnected after {failures} attempt(s)"))
                        next_second, dropped_at = offset, None
                    try:
                        for segment in src.segments("stream", frame_size=self._stages.frame_size):
                            failures = 0
                            last_arrival = time.perf_counter()
                            shifted = _shifted(segment, offset)
                            next_second = shifted.index + 1
                            yield shifted
                        reason = "the stream ended"
                    except MediaError as e:
                        reason = str(e)
            if self._stopping.is_set():
                return
            dropped_at = dropped_at or last_arrival
            if failures >= self._reconnect:
                self._add_gap(Gap(float(next_second), float(next_second + math.ceil(time.perf_counter() - dropped_at)),
                                  f"the stream dropped ({reason}); gave up after {failures} reconnect attempt(s)"))
                return
            delay = self._backoff_s * 2 ** failures
            failures += 1
            log.warning("%s: %s; reconnecting in %.1f s (attempt %d of %d)", self.source, reason, delay, failures,
                        self._reconnect)
            if self._stopping.wait(delay):
                return

    def _add_gap(self, gap: Gap) -> None:
        with self._gaps_lock:
            self.telemetry.gaps.append(gap)
            self._unreported_gaps.append(gap)

    # -- encode -----------------------------------------------------------------

    def _encode_stage(self) -> None:
        stages = self._stages
        try:
            end_of_stream = False
            while not self._stopping.is_set() and not end_of_stream:
                try:
                    segment, arrived = self._segments.get()
                    stages.take(segment, arrived)
                except _Closed:
                    end_of_stream = True
                for job in stages.ready(end_of_stream=end_of_stream):
                    if self._windows.put(job) is not None:  # a live source dropped the oldest window
                        self.telemetry.count("windows_skipped")
                self.telemetry.sample_memory()
        finally:
            self._windows.close()

    # -- llm --------------------------------------------------------------------

    def _llm_stage(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    job = self._windows.get()
                except _Closed:
                    break
                queue_ms = (time.perf_counter() - job.queued_at) * 1000
                timer = StageTimer()
                result = self._stages.answer(job, timer, self.source_size)
                latency_ms = (time.perf_counter() - job.ready_at) * 1000
                for stage in ("translate", "prefill", "decode_tokens", "mask", "boxes"):
                    if stage in timer.ms:
                        self.telemetry.stages[stage].add(timer.ms[stage])
                self.telemetry.stages["window"].add(latency_ms)
                self.telemetry.count("windows_processed")
                with self._gaps_lock:
                    gaps, self._unreported_gaps = self._unreported_gaps, []
                result.timings_ms = {**job.encode_ms, **timer.ms, "queue": queue_ms, "latency": latency_ms}
                self._results.put(WindowResult(
                    index=job.index, start_s=job.start_s, end_s=job.start_s + self.window, result=result,
                    frame_s=job.frame_s, timings_ms=result.timings_ms, gaps=gaps))
        finally:
            dropped = self._windows.close(discard=True)
            self.telemetry.count("windows_skipped", len(dropped))
            self._results.close()


# Streams whose threads may be running. A stream dropped without close() (``next(iter(stream))``)
# keeps its threads busy until its source ends; at exit they are stopped and joined, not left inside
# a model call while the interpreter tears down.
_RUNNING: "weakref.WeakSet[Stream]" = weakref.WeakSet()


@atexit.register
def _stop_running_streams() -> None:
    for stream in list(_RUNNING):
        stream.stop()
        stream._join()


def _shifted(segment: Segment, seconds: int) -> Segment:
    """``segment`` moved ``seconds`` later in source time (a reconnected live source restarts at 0)."""
    if not seconds:
        return segment
    return Segment(segment.index + seconds, segment.start_s + seconds, segment.end_s + seconds, segment.frames,
                   segment.frame_times + seconds, segment.audio, segment.has_audio)


@contextlib.contextmanager
def stop_on_signals(stream: Stream) -> Iterator[dict]:
    """SIGINT and SIGTERM ask ``stream`` to stop (the window in flight finishes); yields a dict whose
    ``"signal"`` is set to the signal received. The previous handlers come back afterwards."""
    import signal

    received: dict = {"signal": None}

    def handler(signum, frame) -> None:
        received["signal"] = signum
        stream.stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
