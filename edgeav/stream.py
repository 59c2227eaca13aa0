"""Streaming: Crab over a sliding window of a live or file source, a result every stride.

Three stages run in their own threads, joined by bounded channels::

    decode ─segments─▶ encode ─windows─▶ llm ─results─▶ caller

- decode reads the source one second at a time (the ``stream`` frame policy: the
  first frame of each second), reconnecting to a live URL that drops;
- encode turns each second into visual and audio tokens as soon as it arrives,
  keeps them in a cache for as long as a later window needs them, and hands the
  llm a window every ``stride`` seconds once its last second is in;
- llm prompts, generates and parses, with times in source seconds.

File sources are processed completely: a full channel makes the stage before it
wait. Live sources (live URLs, push sessions, ``realtime=True``) never make the
decoder wait: the oldest queued second or window is dropped instead, and every
window lost that way is counted in :class:`Telemetry`.

A window of W seconds starting at ``s`` reads Crab's inputs for a W-second clip:
the task's video frames spread uniformly over its seconds (one per second for
AVE's 10 frames over 10 s), its audio windows shifted by ``s``, and for tasks
that look at one frame (ARIG, masks, Ref-AVS) the newest such frame.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import logging
import math
import os
import resource
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from edgeav.errors import EdgeavError, MediaError
from edgeav.media import SAMPLE_RATE, MediaSource, PushSource, Segment, crab_audio_plan
from edgeav.media.source import is_url
from edgeav.media.stills import open_media
from edgeav.models.crab import VisualFeatures
from edgeav.preprocess import CLIP_SIZE, clip_pixels, crab_fbank_batch
from edgeav.tasks import Task

if TYPE_CHECKING:
    from edgeav.runtime import Result, Runtime

log = logging.getLogger("edgeav")

# Tasks' default window: the length of Crab's clips for the task, except AVSS (one frame and its
# second of audio) and the question tasks (Crab's AVQA clips last 60 s; a stream answers about the
# last 10).
DEFAULT_WINDOW_S = {"ave": 10, "avvp": 10, "refavs": 10, "avqa": 10, "ask": 10, "s4": 5, "ms3": 5, "arig": 5,
                    "avss": 1}
MAX_WINDOW_S = 600
# Latency percentiles are over the most recent samples, so a stream of any length holds a bounded number.
PERCENTILE_SAMPLES = 10_000
# Channel sizes: seconds the decoder may run ahead of the encoder, windows waiting for the llm,
# results waiting for the caller.
SEGMENT_QUEUE = 4
WINDOW_QUEUE_FILE = 2
RESULT_QUEUE = 16
STAGE_TIMEOUT_S = 5.0  # how long close() waits for a stage thread blocked in I/O


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Gap:
    """Source time with no media: a live source dropped and was reconnected (or could not be)."""

    start_s: float
    end_s: float
    reason: str

    def to_dict(self) -> dict:
        return {"start_s": self.start_s, "end_s": self.end_s, "reason": self.reason}


@dataclass
class WindowResult:
    """The task's result on one window, times in seconds of the source.

    ``frame_s`` is the second whose frame a box or mask is of (None for tasks that
    read no single frame). ``timings_ms`` holds the encoding of the seconds new to
    this window (visual, audio), the llm stages (prefill, decode_tokens, mask), the
    wait for the llm (queue) and ``latency``: from the moment the window's last
    second was decoded to the result. ``gaps`` lists the gaps in the source since
    the previous result.
    """

    index: int
    start_s: float
    end_s: float
    result: "Result"
    frame_s: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)

    def to_dict(self) -> dict:
        result = self.result.to_dict()
        for key in ("timings_ms", "model", "source"):  # the stream's header says the model and source once
            result.pop(key)
        return {
            "window": self.index,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "frame_s": self.frame_s,
            **result,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "gaps": [g.to_dict() for g in self.gaps],
        }


class StageStats:
    """Latencies of one stage in milliseconds: count and total over the whole stream, percentiles over
    the most recent ``PERCENTILE_SAMPLES``."""

    def __init__(self) -> None:
        self.count = 0
        self.total_ms = 0.0
        self._recent: collections.deque[float] = collections.deque(maxlen=PERCENTILE_SAMPLES)

    def add(self, ms: float) -> None:
        self.count += 1
        self.total_ms += ms
        self._recent.append(ms)

    def percentile(self, q: float) -> float | None:
        recent = self._recent.copy()  # another stage may be appending
        return float(np.percentile(np.fromiter(recent, float), q)) if recent else None

    def to_dict(self) -> dict:
        p50, p95 = self.percentile(50), self.percentile(95)
        return {"count": self.count, "total_ms": round(self.total_ms, 3),
                "p50_ms": None if p50 is None else round(p50, 3), "p95_ms": None if p95 is None else round(p95, 3)}


# Stages whose time is model compute: the real-time factor sums them.
COMPUTE_STAGES = ("visual", "audio", "prefill", "decode_tokens", "mask")
TELEMETRY_STAGES = ("decode", *COMPUTE_STAGES, "window")


@dataclass
class Telemetry:
    """What a stream did so far; read it while the stream runs or after.

    ``stages`` maps decode (per second read; for a live URL this includes waiting for
    the network), visual and audio (per encoder call), prefill, decode_tokens and mask
    (per window) and window (latency from a window's last second to its result) to
    their :class:`StageStats`.
    """

    stages: dict[str, StageStats] = field(default_factory=lambda: {s: StageStats() for s in TELEMETRY_STAGES})
    media_s: float = 0.0  # seconds of media decoded
    windows_processed: int = 0
    windows_skipped: int = 0  # not run: the model fell behind a live source, or their media was missing
    segments_dropped: int = 0  # seconds a live source delivered that the encoder could not take in time
    frames_encoded: int = 0  # frames through the visual encoder
    audio_windows_encoded: int = 0  # audio windows through the audio encoder
    gaps: list[Gap] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # resident memory, sampled once per second of media
    wall_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, counter: str, n: int = 1) -> None:
        """Add ``n`` to a counter (stages in several threads count windows)."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + n)

    @property
    def compute_s(self) -> float:
        return sum(self.stages[s].total_ms for s in COMPUTE_STAGES) / 1000

    @property
    def real_time_factor(self) -> float | None:
        """Seconds of model compute per second of media (decoding excluded; it is its own stage)."""
        return self.compute_s / self.media_s if self.media_s else None

    def sample_memory(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb())

    def to_dict(self) -> dict:
        rtf = self.real_time_factor
        return {
            "stages": {name: stats.to_dict() for name, stats in self.stages.items()},
            "media_s": round(self.media_s, 3),
            "wall_s": round(self.wall_s, 3),
            "real_time_factor": None if rtf is None else round(rtf, 4),
            "windows_processed": self.windows_processed,
            "windows_skipped": self.windows_skipped,
            "segments_dropped": self.segments_dropped,
            "frames_encoded": self.frames_encoded,
            "audio_windows_encoded": self.audio_windows_encoded,
            "gaps": [g.to_dict() for g in self.gaps],
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux: /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class WindowPlan:
    """What the window starting at ``start`` reads, in source seconds."""

    start: int
    frame_seconds: tuple[int, ...]  # the <video> block's frames, one per listed second
    image_second: int | None  # the frame of the <image> block and the mask decoder
    audio_starts: tuple[float, ...]  # the <audio> block's windows
    audio_length_s: float

    @property
    def ordinal(self) -> int:
        """Which video frame the image is (S4/MS3 name it in the instruction)."""
        return self.frame_seconds.index(self.image_second) if self.image_second in self.frame_seconds else 0

    @property
    def visual_seconds(self) -> set[int]:
        return set(self.frame_seconds) | ({self.image_second} if self.image_second is not None else set())

    @property
    def last_second(self) -> int:
        """The last second whose media the window needs."""
        audio_end = max((math.ceil(a + self.audio_length_s - 1e-9) - 1 for a in self.audio_starts), default=0)
        return max(max(self.visual_seconds, default=0), audio_end)

    @property
    def first_second(self) -> int:
        audio_start = min((math.floor(a) for a in self.audio_starts), default=self.start)
        return max(0, min(min(self.visual_seconds, default=self.start), audio_start))


def plan_window(spec: Task, start: int, window: int) -> WindowPlan:
    """The inputs of the ``window``-second window starting at second ``start`` for ``spec``."""
    n = spec.video_frames
    frames = tuple(start + (i * window) // n for i in range(n))
    image = (frames[-1] if frames else start + window - 1) if spec.image_frame else None
    if spec.audio_plan == "avss":
        starts, length = (float(image),), 1.0
    elif spec.audio_plan == "avqa":
        plan = crab_audio_plan("avqa", duration_s=window)
        starts, length = tuple(start + a for a in plan.starts_s), plan.length_s
    else:
        plan = crab_audio_plan(spec.audio_plan)
        count = len(plan.starts_s)
        starts, length = tuple(float(start + (i * window) // count) for i in range(count)), plan.length_s
    return WindowPlan(start, frames, image, starts, length)


# --------------------------------------------------------------------------- channels


class _Closed(Exception):
    """The channel was closed and is empty."""


class _Channel:
    """A bounded queue between two stages.

    ``put`` on a full channel waits (``drop_oldest=False``: a file source, every item
    counts) or drops the oldest item and returns it (a live source: the producer
    never waits). ``get`` raises :class:`_Closed` once the channel is closed and empty.
    """

    def __init__(self, maxsize: int, *, drop_oldest: bool) -> None:
        self._items: collections.deque = collections.deque()
        self._maxsize, self._drop_oldest = maxsize, drop_oldest
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item) -> object | None:
        with self._cond:
            dropped = None
            while len(self._items) >= self._maxsize and not self._closed:
                if self._drop_oldest:
                    dropped = self._items.popleft()
                    break
                self._cond.wait()
            if self._closed:
                return item  # nobody will read it
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def get(self):
        with self._cond:
            while not self._items:
                if self._closed:
                    raise _Closed
                self._cond.wait()
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self, *, discard: bool = False) -> list:
        """No more puts; ``discard`` also empties the channel and returns what it held."""
        with self._cond:
            self._closed = True
            dropped = list(self._items) if discard else []
            if discard:
                self._items.clear()
            self._cond.notify_all()
            return dropped


# --------------------------------------------------------------------------- the stream


@dataclass
class _Job:
    """One window for the llm stage."""

    plan: WindowPlan
    index: int
    video: torch.Tensor | None
    image: VisualFeatures | None
    audio: torch.Tensor
    ready_at: float  # perf_counter when the window's last second was decoded
    encode_ms: dict[str, float]
    queued_at: float = field(default_factory=time.perf_counter)


class Stream:
    """An iterator of :class:`WindowResult` over a source (build it with :meth:`Runtime.stream`).

    Nothing runs until the first ``next()``. ``telemetry`` is live; :meth:`stop` asks
    the stream to end (the window being generated finishes, results already made are
    still yielded); :meth:`close` stops and joins the threads. Leaving a ``for`` loop
    early does the same (the loop holds the only reference to the results generator);
    after ``next(stream)`` call :meth:`close` or use ``with``.
    """

    def __init__(self, runtime: "Runtime", source: "str | Path | PushSource", spec: Task, *, window: int,
                 stride: int, question: str | None, expression: str | None, sampling, max_new_tokens: int | None,
                 realtime: bool, reconnect: int, reconnect_backoff_s: float, media: dict | None = None) -> None:
        self.runtime, self.spec = runtime, spec
        self._media = media or {}  # audio, fps, silent_audio: how a file source is opened (edgeav.media.open_media)
        self.window, self.stride = window, stride
        self.source = source
        self.realtime = realtime
        self._answer_options = dict(question=question, expression=expression, sampling=sampling,
                                    max_new_tokens=max_new_tokens)
        self._reconnect, self._backoff_s = reconnect, reconnect_backoff_s
        # Crab writes event times in frames of its clip (one per second of a 10-s AVE clip); a window of
        # another length spreads those frames over its own seconds.
        self._seconds_per_frame = window / spec.video_frames if spec.video_frames else 1.0
        self.telemetry = Telemetry()
        self.source_size: tuple[int, int] | None = None  # (width, height), known once media arrives
        self.live: bool | None = None  # decided when the stream starts (a URL is asked whether it is live)
        self._stopping = threading.Event()
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
            with torch.inference_mode():  # grad mode is per thread
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
                for start_s, end_s in self.source.take_gaps():
                    self._add_gap(Gap(start_s, end_s, "the pushed clock jumped ahead; no media in between"))
                yield segment, False
            return
        if self._connection is not None:  # a live URL
            yield from ((segment, True) for segment in self._reconnecting())
            return
        with open_media(self.source, **self._media) as src:
            self.source_size = (src.info.video.width, src.info.video.height)
            for segment in src.segments("stream", frame_size=(CLIP_SIZE, CLIP_SIZE)):
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
                        for segment in src.segments("stream", frame_size=(CLIP_SIZE, CLIP_SIZE)):
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
        try:
            _Encoder(self).run()
        finally:
            self._windows.close()

    # -- llm --------------------------------------------------------------------

    def _llm_stage(self) -> None:
        from edgeav.runtime import Encoded, _Timer

        model = self.runtime.engine.variant(self.spec.weights)
        try:
            while not self._stopping.is_set():
                try:
                    job: _Job = self._windows.get()
                except _Closed:
                    break
                queue_ms = (time.perf_counter() - job.queued_at) * 1000
                plan = job.plan
                images = {plan.image_second: job.image} if job.image is not None else {}
                encoded = Encoded(video=job.video, images=images, audio={None: job.audio},
                                  ordinals={plan.image_second: plan.ordinal} if images else {},
                                  source_size=self.source_size or (CLIP_SIZE, CLIP_SIZE), notes=[],
                                  duration_s=self.window / self._seconds_per_frame)  # in the clip's frames
                timer = _Timer()
                result = self.runtime.answer(model, self.spec, encoded, timer, clip_start_s=float(plan.start),
                                             **self._answer_options)
                result.events = _rescaled(result.events, plan.start, self._seconds_per_frame)
                latency_ms = (time.perf_counter() - job.ready_at) * 1000
                for stage in ("prefill", "decode_tokens", "mask"):
                    if stage in timer.ms:
                        self.telemetry.stages[stage].add(timer.ms[stage])
                self.telemetry.stages["window"].add(latency_ms)
                self.telemetry.count("windows_processed")
                with self._gaps_lock:
                    gaps, self._unreported_gaps = self._unreported_gaps, []
                result.timings_ms = {**job.encode_ms, **timer.ms, "queue": queue_ms, "latency": latency_ms}
                self._results.put(WindowResult(
                    index=job.index, start_s=float(plan.start), end_s=float(plan.start + self.window), result=result,
                    frame_s=None if plan.image_second is None else float(plan.image_second), timings_ms=result.timings_ms,
                    gaps=gaps))
        finally:
            dropped = self._windows.close(discard=True)
            self.telemetry.count("windows_skipped", len(dropped))
            self._results.close()


class _Encoder:
    """The encode stage's state: raw seconds not yet encoded, the per-second token cache, the next window."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.spec, self.window, self.stride = stream.spec, stream.window, stream.stride
        self.telemetry = stream.telemetry
        self.model = stream.runtime.engine.variant(stream.spec.weights)
        self.keep_mask_scales = bool(stream.spec.mask_classes)
        self.frames: dict[int, np.ndarray] = {}  # second -> uint8 frame, until encoded
        self.audio: dict[int, np.ndarray] = {}  # second -> float32 [16000], while a window may need it
        self.visual: dict[int, VisualFeatures] = {}  # second -> its frame's features
        self.audio_tokens: dict[int, torch.Tensor] = {}  # window start sample -> tokens [Q, D]
        self.missing: set[int] = set()  # seconds the source never delivered
        self.last_second = -1
        self.last_frame: np.ndarray | None = None
        self.next_start = 0  # start of the next window to hand over
        self.encode_ms: dict[str, float] = collections.defaultdict(float)
        self.ready_at: dict[int, float] = {}

    def run(self) -> None:
        stream = self.stream
        while not stream._stopping.is_set():
            try:
                segment, arrived = stream._segments.get()
            except _Closed:
                break
            self.take(segment, arrived)
            self.encode_due(end_of_stream=False)
            self.hand_over(end_of_stream=False)
            self.telemetry.sample_memory()
        if not stream._stopping.is_set():
            self.encode_due(end_of_stream=True)
            self.hand_over(end_of_stream=True)

    def take(self, segment: Segment, arrived: float) -> None:
        k = segment.index
        if k <= self.last_second:
            return  # a clock that went back: the second was already seen
        if k - self.last_second > self.window:  # a gap: no window over it has media, go on after it
            self.next_start = max(self.next_start, -(-k // self.stride) * self.stride)
            self.last_second, self.last_frame = k - 1, None
            self._evict()
        self.missing.update(range(self.last_second + 1, k))
        self.last_second = k
        if segment.n_frames:
            frame = segment.frames[0]
            if frame.shape[:2] != (CLIP_SIZE, CLIP_SIZE):  # pushed frames come at the camera's size
                if self.stream.source_size is None:
                    self.stream.source_size = (frame.shape[1], frame.shape[0])
                frame = _resized(frame)
            self.last_frame = frame
        if self.last_frame is not None:  # a second without a frame shows the last one, as a display would
            self.frames[k] = self.last_frame
        else:
            self.missing.add(k)
        self.audio[k] = segment.audio
        self.ready_at[k] = arrived

    def _pending_plans(self, end_of_stream: bool) -> Iterator[WindowPlan]:
        """Plans of the windows not handed over yet whose media has started to arrive."""
        start = self.next_start
        while True:
            plan = plan_window(self.spec, start, self.window)
            if plan.first_second > self.last_second or (end_of_stream and not self._complete(plan)):
                return
            yield plan
            start += self.stride

    def _complete(self, plan: WindowPlan) -> bool:
        """The window's seconds all lie within what the source delivered."""
        return plan.start + self.window - 1 <= self.last_second

    def encode_due(self, *, end_of_stream: bool) -> None:
        """Encode every frame and audio window a pending window needs that can be encoded now."""
        seconds, keys = set(), {}
        for plan in self._pending_plans(end_of_stream):
            seconds |= {t for t in plan.visual_seconds if t in self.frames and t not in self.visual}
            for a in plan.audio_starts:
                key = round(a * SAMPLE_RATE)
                end = math.ceil(a + plan.audio_length_s - 1e-9) - 1
                if key not in self.audio_tokens and (end <= self.last_second or end_of_stream):
                    keys[key] = plan.audio_length_s
        if seconds:
            order = sorted(seconds)
            start = time.perf_counter()
            pixels = clip_pixels(np.stack([self.frames[t] for t in order]))
            features = self.model.encode_frames(self.stream.runtime._tensor(pixels))
            ms = (time.perf_counter() - start) * 1000
            self.telemetry.stages["visual"].add(ms)
            self.encode_ms["visual"] += ms
            self.telemetry.count("frames_encoded", len(order))
            for i, t in enumerate(order):
                keep = self.keep_mask_scales
                self.visual[t] = VisualFeatures(features.tokens[i : i + 1], features.mask_low[i : i + 1] if keep else None,
                                                features.mask_high[i : i + 1] if keep else None)
                del self.frames[t]
        if keys:
            order = sorted(keys)
            start = time.perf_counter()
            waves = np.stack([self._cut_audio(key, keys[key]) for key in order])
            tokens = self.model.encode_audio(self.stream.runtime._tensor(crab_fbank_batch(waves)))
            ms = (time.perf_counter() - start) * 1000
            self.telemetry.stages["audio"].add(ms)
            self.encode_ms["audio"] += ms
            self.telemetry.count("audio_windows_encoded", len(order))
            for i, key in enumerate(order):
                self.audio_tokens[key] = tokens[i]

    def _cut_audio(self, start_sample: int, length_s: float) -> np.ndarray:
        """Samples [start, start + length) from the seconds held; silence outside them."""
        n = round(length_s * SAMPLE_RATE)
        out = np.zeros(n, np.float32)
        for k in range(start_sample // SAMPLE_RATE, (start_sample + n - 1) // SAMPLE_RATE + 1):
            samples = self.audio.get(k)
            if samples is None:
                continue
            lo, hi = max(start_sample, k * SAMPLE_RATE), min(start_sample + n, k * SAMPLE_RATE + samples.size)
            if hi > lo:
                out[lo - start_sample : hi - start_sample] = samples[lo - k * SAMPLE_RATE : hi - k * SAMPLE_RATE]
        return out

    def hand_over(self, *, end_of_stream: bool) -> None:
        """Hand the llm every window whose media is all in (at the end, every complete window)."""
        stream = self.stream
        while not stream._stopping.is_set():
            plan = plan_window(self.spec, self.next_start, self.window)
            if end_of_stream and not self._complete(plan):
                break
            if not end_of_stream and plan.last_second > self.last_second:
                break
            index = self.next_start // self.stride
            needed = set(range(plan.first_second, min(plan.last_second, self.last_second) + 1))
            if needed & self.missing or any(t not in self.visual for t in plan.visual_seconds):
                self.telemetry.count("windows_skipped")
                self.encode_ms.clear()
            else:
                if stream._windows.put(self._job(plan, index)) is not None:
                    self.telemetry.count("windows_skipped")
            self.next_start += self.stride
            self._evict()

    def _job(self, plan: WindowPlan, index: int) -> _Job:
        video = (torch.cat([self.visual[t].tokens[0] for t in plan.frame_seconds])
                 if plan.frame_seconds else None)
        audio = torch.cat([self.audio_tokens[round(a * SAMPLE_RATE)] for a in plan.audio_starts])
        image = self.visual[plan.image_second] if plan.image_second is not None else None
        last = min(plan.last_second, self.last_second)
        job = _Job(plan, index, video, image, audio, self.ready_at.get(last, time.perf_counter()),
                   dict(self.encode_ms))
        self.encode_ms.clear()
        return job

    def _evict(self) -> None:
        """Drop what no later window reads."""
        upcoming = plan_window(self.spec, self.next_start, self.window)
        keep_from = upcoming.first_second
        first_audio = min((round(a * SAMPLE_RATE) for a in upcoming.audio_starts), default=0)
        for store in (self.frames, self.visual, self.audio, self.ready_at):
            for t in [t for t in store if t < keep_from]:
                del store[t]
        for key in [k for k in self.audio_tokens if k < first_audio]:
            del self.audio_tokens[key]
        self.missing = {t for t in self.missing if t >= keep_from}


# Streams whose threads may be running. A stream dropped without close() (``next(iter(stream))``)
# keeps its threads busy until its source ends; at exit they are stopped and joined, not left inside
# a model call while the interpreter tears down.
_RUNNING: "weakref.WeakSet[Stream]" = weakref.WeakSet()


@atexit.register
def _stop_running_streams() -> None:
    for stream in list(_RUNNING):
        stream.stop()
        stream._join()


def _rescaled(events, start: int, seconds_per_frame: float) -> list:
    """Event times read as frames of the window (from ``start``) -> source seconds."""
    if seconds_per_frame == 1.0:
        return list(events)
    return [dataclasses.replace(e, start_s=start + (e.start_s - start) * seconds_per_frame,
                                end_s=start + (e.end_s - start) * seconds_per_frame) for e in events]


def _shifted(segment: Segment, seconds: int) -> Segment:
    """``segment`` moved ``seconds`` later in source time (a reconnected live source restarts at 0)."""
    if not seconds:
        return segment
    return Segment(segment.index + seconds, segment.start_s + seconds, segment.end_s + seconds, segment.frames,
                   segment.frame_times + seconds, segment.audio, segment.has_audio)


def _resized(frame: np.ndarray) -> np.ndarray:
    """A frame at the encoder's 224x224 (bicubic, as decoding to that size does)."""
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((CLIP_SIZE, CLIP_SIZE), Image.BICUBIC))


# --------------------------------------------------------------------------- push sessions


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
