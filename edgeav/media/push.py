"""A live source fed with numpy frames and audio chunks by embedding software (a camera loop)."""

from __future__ import annotations

import collections
import logging
import math
import numbers
import threading
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

from edgeav.errors import MediaError, OptionError
from edgeav.media.segment import Segment, SegmentAssembler
from edgeav.media.source import DecodeStats, audio_resampler, check_finite_audio, mono_samples

log = logging.getLogger(__name__)

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
MAX_CHANNELS = 8  # mono to 7.1
# Float audio is in [-1, 1]; loud or clipped audio may overshoot a little, never by a thousand times.
MAX_FLOAT_SAMPLE = 1e3
# A stream's clock going back further than this is a reset (a restarted camera), not a late frame or jitter.
CLOCK_RESET_S = 1.0


def _check_time(what: str, t: float) -> None:
    if not math.isfinite(t):
        raise OptionError(f"{what}: the time must be a finite number of seconds, got {t}")


def checked_sample_rate(sample_rate: object) -> int:
    """An integer rate in 8..192 kHz (16000.0 passes as 16000); a one-line OptionError otherwise."""
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(sample_rate, numbers.Real):
        raise OptionError(f"push_audio: sample_rate must be a whole number of Hz, got {sample_rate!r}")
    hint = ""
    if MIN_SAMPLE_RATE / 1000 <= sample_rate <= MAX_SAMPLE_RATE / 1000:
        hint = f"; {sample_rate:g} looks like kHz: pass {round(sample_rate * 1000)}"
    if not (math.isfinite(sample_rate) and sample_rate == int(sample_rate)):
        raise OptionError(f"push_audio: sample_rate must be a whole number of Hz, got {sample_rate!r}{hint}")
    rate = int(sample_rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise OptionError(
            f"push_audio: sample_rate {rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz{hint}"
        )
    return rate


def checked_samples(samples: object) -> np.ndarray:
    """float32 [n, channels] from float32/float64/int16 [n] or [n, channels]; one-line errors otherwise."""
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2) or samples.dtype not in (np.float32, np.float64, np.int16):
        raise OptionError(f"push_audio: expected float32 or int16 samples shaped [n] or [n, channels], "
                          f"got {samples.dtype} {samples.shape}")
    if samples.ndim == 1:
        samples = samples[:, None]
    n, channels = samples.shape
    if channels > MAX_CHANNELS and n <= MAX_CHANNELS:
        raise OptionError(f"push_audio: samples shaped {samples.shape} look channels-first; "
                          f"pass samples.T, shaped [n, channels]")
    if not 1 <= channels <= MAX_CHANNELS:
        raise OptionError(f"push_audio: {channels} channels; 1 to {MAX_CHANNELS} are supported (mono to 7.1): "
                          "mix or pick channels first")
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused just below
        samples = samples.astype(np.float32, copy=False)
    check_finite_audio(samples, "push_audio", "pass finite samples (float audio is in [-1, 1])")
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak > MAX_FLOAT_SAMPLE:
        hint = ("looks like int16 values in a float array: divide by 32768" if peak <= 32768
                else "float audio is in [-1, 1]: scale it down")
        raise MediaError(f"push_audio: float samples reach {peak:g}; {hint}")
    return samples


class PushSource:
    """A live source fed by embedding software with numpy frames and audio chunks.

    Call :meth:`push_video` and :meth:`push_audio` from one thread and iterate
    :meth:`segments` from another; :meth:`close` ends the stream. Times are in
    seconds on the caller's clock; ``origin`` is the time that becomes 0 (by
    default the first time pushed). Frames are sampled with the ``stream``
    policy as they arrive, so only one frame per second is kept.

    When the reader falls behind, the oldest finished segments are dropped
    (counted in ``dropped_segments``): pushing never blocks. A clock that jumps
    more than a minute ahead leaves a gap (see :meth:`take_gaps`), not seconds of
    silence; a clock that goes back more than ``CLOCK_RESET_S`` (a restarted
    camera) is re-anchored so its media continues after what came before, and the
    reset is reported as a discontinuity by :meth:`take_gaps`. A stream the caller
    stops feeding holds the other back for at most a few seconds.
    """

    def __init__(
        self,
        *,
        video: bool = True,
        audio: bool = True,
        origin: float | None = None,
        max_pending_segments: int = 30,
    ) -> None:
        if not (video or audio):
            raise OptionError("PushSource needs video, audio or both")
        if max_pending_segments < 1:
            raise OptionError(f"max_pending_segments must be at least 1, got {max_pending_segments}")
        self._assembler = SegmentAssembler("stream", has_video=video, has_audio=audio, live=True)
        self._origin = origin
        self._lock = threading.Lock()
        self._ready: collections.deque[Segment] = collections.deque()
        self._max_pending = max_pending_segments
        self._changed = threading.Condition(self._lock)
        self._resamplers: dict[tuple[int, int], av.AudioResampler] = {}
        self._closed = False
        self._reader_left = False  # a reader stopped early and none has come back: nobody will read
        self.stats = DecodeStats()
        self.dropped_segments = 0
        self._video_t = -math.inf  # source time of the latest frame
        self._audio_t = -math.inf  # source time where the latest audio chunk ended

    def take_gaps(self) -> list[tuple[float, float, str]]:
        """(start_s, end_s, reason) of the discontinuities since the last call (the latest hundred): a clock
        that jumped ahead (the seconds skipped) or was reset (empty: media goes on at ``start_s``); a
        consumer reports them beside its results."""
        with self._lock:
            gaps = list(self._assembler.gaps)
            self._assembler.gaps.clear()
            return gaps

    @property
    def holds_media(self) -> bool:
        """Whether frames or audio are still buffered (false once closed and read to the end)."""
        with self._lock:
            return bool(self._ready) or self._assembler.holds_media

    def _time(self, t: float, latest: float, what: str) -> float:
        """Source time of caller time ``t``; ``latest`` is where this stream's source time had reached."""
        if self._origin is None:
            self._origin = t
        source_t = t - self._origin
        if source_t < latest - CLOCK_RESET_S:
            # The caller's clock restarted: go on after the media already taken rather than drop it as late.
            assembler = self._assembler
            resume = float(math.ceil(max(assembler.media_end_s, float(assembler.next_second)) - 1e-6))
            log.warning("%s: the clock went back from %.1f s to %.1f s (a reset); its media continues at %.1f s",
                        what, latest, source_t, resume)
            assembler.gaps.append((resume, resume, f"the pushed clock went back {latest - source_t:.1f} s "
                                   "(a reset); media goes on from here"))
            self._origin = t - resume
            source_t = resume
        return source_t

    def push_video(self, frame: np.ndarray, t: float) -> None:
        """One RGB frame, uint8 [H, W, 3], shown at time ``t``."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise OptionError(f"push_video: expected a uint8 [H, W, 3] RGB frame, got {frame.dtype} {frame.shape}")
        _check_time("push_video", t)
        frame = frame.copy()  # capture loops reuse their buffer
        with self._lock:
            self._check_open()
            self.stats.video_frames += 1
            self._video_t = self._time(t, self._video_t, "push_video")
            self._assembler.add_video(self._video_t, frame)
            self._publish(self._assembler.ready())

    def push_audio(self, samples: np.ndarray, sample_rate: int, t: float) -> None:
        """Audio starting at time ``t``: float32 in [-1, 1] or int16, shape [n] or [n, channels]
        (1 to 8 channels, averaged), at an integer ``sample_rate`` of 8000 to 192000 Hz."""
        samples = checked_samples(samples)
        sample_rate = checked_sample_rate(sample_rate)
        _check_time("push_audio", t)
        if samples.shape[0] == 0:
            return
        channels = samples.shape[1]
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples).reshape(1, -1),
            format="flt",
            layout="mono" if channels == 1 else "stereo" if channels == 2 else f"{channels}c",
        )
        frame.sample_rate = sample_rate
        with self._lock:
            self._check_open()
            frame.time_base = Fraction(1, sample_rate)
            start = self._time(t, self._audio_t, "push_audio")
            self._audio_t = start + samples.shape[0] / sample_rate
            frame.pts = round(start * sample_rate)
            resampler = self._resamplers.get((sample_rate, channels))
            if resampler is None:
                resampler = self._resamplers[(sample_rate, channels)] = audio_resampler()
            for out in resampler.resample(frame):
                self._add_resampled(out)
            self._publish(self._assembler.ready())

    def _add_resampled(self, out: av.AudioFrame) -> None:
        samples, position = mono_samples(out)
        self.stats.audio_samples += samples.size
        self._assembler.add_audio(samples, position)

    def close(self) -> None:
        """End of stream: flush the resamplers and release the last segments."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for resampler in self._resamplers.values():
                for out in resampler.resample(None):
                    self._add_resampled(out)
            self._resamplers.clear()
            self._publish(self._assembler.finish())
            self._changed.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise OptionError("PushSource is closed; create a new one to push more media")

    def _publish(self, finished: Iterator[Segment]) -> None:
        for segment in finished:
            self.stats.segments += 1
            if self._reader_left:
                self.dropped_segments += 1
                continue
            if len(self._ready) == self._max_pending:
                self._ready.popleft()
                self.dropped_segments += 1
            self._ready.append(segment)
            self._changed.notify_all()

    def segments(self, timeout_s: float | None = None) -> Iterator[Segment]:
        """Yield segments as they complete, until :meth:`close` (blocks while waiting).

        ``timeout_s`` bounds the wait for each segment; on expiry a
        :class:`~edgeav.errors.MediaError` says the source went quiet. One reader at a
        time: when it stops early, what it left and what is pushed until the next call
        is dropped (counted in ``dropped_segments``), so a stopped consumer holds no frames.
        """
        with self._lock:
            self._reader_left = False
        try:
            while True:
                with self._changed:
                    if not self._changed.wait_for(lambda: self._ready or self._closed, timeout=timeout_s):
                        raise MediaError(f"push source: no segment for {timeout_s} s; is the producer still pushing?")
                    if not self._ready:
                        return
                    segment = self._ready.popleft()
                yield segment
                del segment  # a reader parked at the yield holds no frame of its own
        finally:
            with self._lock:
                self._reader_left = True
                self.dropped_segments += len(self._ready)
                self._ready.clear()
