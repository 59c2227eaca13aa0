"""Per-second segments: the unit every later stage works on.

:class:`SegmentAssembler` turns time-stamped video frames and 16 kHz mono audio,
arriving in any interleaving, into one :class:`Segment` per second of source
time. It holds only the seconds not yet emitted, so memory does not grow with
the length of the source.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

SAMPLE_RATE = 16000
POLICIES = ("clip", "stream")

# A frame counts for second k when its time is at least k - FRAME_EPS_S (timestamps
# rounded to a millisecond time base must not fall into the previous second).
FRAME_EPS_S = 1e-3
# Audio timestamps that disagree with the running sample count by less than this
# are jitter (time-base rounding, resampler delay): the chunk is taken as contiguous.
AUDIO_JITTER_S = 0.010
# A jump further ahead than this is a broken clock, not lost packets: filling it would
# hold (and emit) that much silence. A file's audio then continues where it was; a live
# source skips ahead, leaving a gap.
MAX_AUDIO_GAP_S = 60.0
MAX_CLOCK_JUMP_S = MAX_AUDIO_GAP_S
# In a live source, a stream this far behind the other is stalled: its seconds go out
# without it rather than holding one frame (or second of audio) per second it stays away.
MAX_STREAM_LEAD_S = 5.0
# Gaps a live source remembers for its consumer; older ones are only counted.
GAPS_KEPT = 100

log = logging.getLogger("edgeav")


@dataclass(frozen=True, eq=False)
class Segment:
    """One second of source time.

    Attributes:
        index: 0-based second number; the segment covers [start_s, end_s).
        start_s, end_s: source time in seconds (end_s = start_s + 1).
        frames: uint8 [F, H, W, 3] RGB frames chosen by the sampling policy. F may
            be 0: the ``clip`` policy picks few frames over a long clip, and a
            second before the video starts has none.
        frame_times: float64 [F], source time of each frame.
        audio: float32 [16000], mono at 16 kHz, zero where the source has no audio.
        has_audio: False when the source has no audio track (audio is silence).
    """

    index: int
    start_s: float
    end_s: float
    frames: np.ndarray
    frame_times: np.ndarray
    audio: np.ndarray
    has_audio: bool

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def audio_rms(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.audio, dtype=np.float64))))


def clip_frame_indices(n_frames: int, n_samples: int) -> np.ndarray:
    """Crab's clip sampling: ``n_samples`` frame indices spread uniformly by count.

    Crab takes ``arange(0, n_frames, n_frames / n_samples)`` truncated to int; the
    float step can yield one index too many, which is dropped here.
    """
    if n_frames <= 0:
        return np.zeros(0, np.int64)
    return np.arange(0, n_frames, n_frames / n_samples).astype(np.int64)[:n_samples]


@dataclass
class _PendingSecond:
    frames: list = field(default_factory=list)
    times: list = field(default_factory=list)


class SegmentAssembler:
    """Collects frames and audio into per-second :class:`Segment` objects.

    Feed it with :meth:`add_video` and :meth:`add_audio` in roughly time order
    (as a demuxer delivers them), take finished segments from :meth:`ready`, and
    call :meth:`finish` at the end of the source for the rest.

    Args:
        policy: ``"stream"`` keeps the first frame at or after the start of each
            second (and repeats the last one through seconds without a frame);
            ``"clip"`` keeps the frames whose decode index is in
            ``clip_indices`` (Crab's uniform sampling over a whole clip).
        has_video, has_audio: which streams will be fed; a missing one never
            holds segments back.
        to_array: converts what :meth:`add_video` receives into uint8 [H, W, 3];
            called only for frames the policy keeps.
        min_tail_s: a last, partial second is emitted (zero-padded) only when it
            holds at least this much media, or frames the policy kept.
        live: a pushed source. A clock that jumps more than ``MAX_CLOCK_JUMP_S``
            ahead of all media so far is a gap: what came before is emitted, the
            seconds between are skipped (recorded in ``gaps``), never filled. A
            stream lagging the other by more than ``MAX_STREAM_LEAD_S`` no longer
            holds seconds back.
    """

    def __init__(
        self,
        policy: str,
        *,
        has_video: bool,
        has_audio: bool,
        clip_indices: np.ndarray | None = None,
        to_array: Callable[[object], np.ndarray] = np.asarray,
        frame_shape: tuple[int, int] = (0, 0),
        min_tail_s: float = 0.5,
        live: bool = False,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
        if policy == "clip" and has_video and clip_indices is None:
            raise ValueError("the clip policy needs clip_indices for a source with video")
        self.policy = policy
        self.has_audio = has_audio
        self._to_array = to_array
        self._frame_shape = frame_shape
        self._min_tail_s = min_tail_s
        # Decode index -> how many times Crab's sampling takes it (short clips repeat frames).
        self._clip_counts: dict[int, int] = {}
        if clip_indices is not None:
            for i in clip_indices.tolist():
                self._clip_counts[i] = self._clip_counts.get(i, 0) + 1
        self._next = 0  # next second to emit
        self._pending: dict[int, _PendingSecond] = {}
        self._held: tuple[float, np.ndarray] | None = None
        self._video_done = not has_video
        self._last_frame_t: float | None = None
        self._frame_interval = math.inf
        self._latest_frame_t = -math.inf
        self._audio_chunks: list[np.ndarray] = []
        self._audio_end = 0  # absolute sample index one past the last buffered sample
        self._audio_done = not has_audio
        self.live = live
        # (start_s, end_s, reason) of each discontinuity of a live clock
        self.gaps: collections.deque[tuple[float, float, str]] = collections.deque(maxlen=GAPS_KEPT)
        self._flushed: collections.deque[Segment] = collections.deque()  # emitted at a jump, not yet taken

    # -- input -------------------------------------------------------------

    def add_video(self, t: float, frame: object, index: int | None = None) -> None:
        """One decoded frame at source time ``t`` (``index``: decode order, for ``clip``)."""
        if self.live and t - self._horizon_s() > MAX_CLOCK_JUMP_S:
            self._jump(math.floor(t + FRAME_EPS_S))
        if self._last_frame_t is not None and t > self._last_frame_t:
            self._frame_interval = min(self._frame_interval, t - self._last_frame_t)
        self._last_frame_t = t
        self._latest_frame_t = max(self._latest_frame_t, t)
        second = math.floor(t + FRAME_EPS_S)
        if second < self._next:
            return  # late frame for a second already emitted
        if self.policy == "stream":
            if second in self._pending and self._pending[second].frames:
                return
            repeats = 1
        else:
            repeats = self._clip_counts.get(index, 0) if index is not None else 0
            if repeats == 0:
                return
        array = self._to_array(frame)
        self._frame_shape = array.shape[:2]
        slot = self._pending.setdefault(second, _PendingSecond())
        slot.frames.extend([array] * repeats)
        slot.times.extend([t] * repeats)

    def add_audio(self, samples: np.ndarray, position: int | None = None) -> None:
        """Mono float32 samples at 16 kHz starting at absolute sample ``position``.

        ``position`` None continues right after the previous chunk. A timestamp
        ahead of the running count (lost packets, a late start) is filled with
        silence; one behind it (overlap, or audio before time 0) loses the
        overlapping samples.
        """
        samples = np.asarray(samples, np.float32)
        if self.live and self._audio_end < self._next * SAMPLE_RATE:
            # The seconds before were emitted without this lagging stream: none of its buffer is needed.
            self._audio_chunks, self._audio_end = [], self._next * SAMPLE_RATE
        if self.live and position is not None and position / SAMPLE_RATE - self._horizon_s() > MAX_CLOCK_JUMP_S:
            self._jump(position // SAMPLE_RATE)
        if position is not None and position - self._audio_end > MAX_AUDIO_GAP_S * SAMPLE_RATE:
            log.warning("audio timestamps jump %.1f s ahead; taken as a discontinuity, not silence",
                        (position - self._audio_end) / SAMPLE_RATE)
            position = None
        if position is not None and abs(position - self._audio_end) > AUDIO_JITTER_S * SAMPLE_RATE:
            if position > self._audio_end:
                self._audio_chunks.append(np.zeros(position - self._audio_end, np.float32))
                self._audio_end = position
            else:
                samples = samples[self._audio_end - position :]
        if samples.size:
            self._audio_chunks.append(samples)
            self._audio_end += samples.size

    # -- output ------------------------------------------------------------

    def ready(self) -> Iterator[Segment]:
        """Segments whose second is complete in every stream, in order."""
        while self._flushed:
            yield self._flushed.popleft()
        while self._second_complete(self._next):
            yield self._emit(self._next)

    @property
    def next_second(self) -> int:
        """The second the next segment will cover."""
        return self._next

    @property
    def media_end_s(self) -> float:
        """End of the media fed so far: the last frame's end or the last audio sample's."""
        audio_end = self._audio_end / SAMPLE_RATE
        if self._last_frame_t is None:
            return audio_end
        # A frame shows until the next one; the last one for the shortest interval seen.
        last_duration = self._frame_interval if self._frame_interval < math.inf else 0.0
        return max(self._latest_frame_t + last_duration, audio_end)

    def finish(self) -> Iterator[Segment]:
        """Mark the end of the source and yield every remaining segment."""
        self._video_done = self._audio_done = True
        while self._flushed:
            yield self._flushed.popleft()
        fed = self._last_frame_t is not None or self._audio_end > 0
        if fed:
            yield from self._drain(self.media_end_s, first=self._next == 0)
        self._release()

    def _drain(self, media_end: float, first: bool) -> Iterator[Segment]:
        """Every second up to ``media_end`` (a short last one only if it holds enough, or sampled frames)."""
        # Clip sampling picked a fixed number of frames: a short tail holding some still counts.
        sampled_tail = self.policy == "clip" and bool(self._pending)
        while first or media_end - self._next >= self._min_tail_s or sampled_tail:
            first = False
            yield self._emit(self._next)
            sampled_tail = self.policy == "clip" and bool(self._pending)

    def _release(self) -> None:
        """Drop every frame and sample still held (a 4K frame is 25 MB)."""
        self._pending.clear()
        self._held = None
        self._audio_chunks = []

    def _horizon_s(self) -> float:
        """How far media has reached: the next second to emit, the newest frame or audio sample."""
        return max(float(self._next), self._latest_frame_t, self._audio_end / SAMPLE_RATE)

    def _jump(self, second: int) -> None:
        """A live clock jumped ahead to ``second``: emit what came before, record the gap, go on there."""
        self._flushed.extend(self._drain(self.media_end_s, first=False))
        self._release()
        gap = (float(self._next), float(second))
        log.warning("live source: the clock jumped from %.1f s to %.1f s; the seconds between are a gap", *gap)
        self.gaps.append((*gap, "the pushed clock jumped ahead; no media in between"))
        self._next = second
        self._audio_end = second * SAMPLE_RATE

    @property
    def holds_media(self) -> bool:
        """Whether any frame or audio sample is still held (segments not yet emitted, or the last frame)."""
        return bool(self._pending or self._held is not None or self._audio_chunks or self._flushed)

    def _second_complete(self, k: int) -> bool:
        if self.live and max(self._latest_frame_t, self._audio_end / SAMPLE_RATE) - (k + 1) > MAX_STREAM_LEAD_S:
            return True
        if self._video_done:
            video_ok = True
        elif self.policy == "stream" and k in self._pending and self._pending[k].frames:
            video_ok = True
        else:
            video_ok = self._latest_frame_t >= k + 1 - FRAME_EPS_S
        audio_ok = self._audio_done or self._audio_end >= (k + 1) * SAMPLE_RATE
        return video_ok and audio_ok

    def _emit(self, k: int) -> Segment:
        slot = self._pending.pop(k, None)
        if slot is not None and slot.frames:
            frames, times = slot.frames, slot.times
            if self.policy == "stream":
                self._held = (times[-1], frames[-1])
        elif self.policy == "stream" and self._held is not None:
            frames, times = [self._held[1]], [self._held[0]]
        else:
            frames, times = [], []
        if len(frames) == 1:
            frame_array = frames[0][None]  # a view: no copy of the one frame
        elif frames:
            frame_array = np.stack(frames)
        else:
            frame_array = np.zeros((0, *self._frame_shape, 3), np.uint8)
        self._next = k + 1
        return Segment(
            index=k,
            start_s=float(k),
            end_s=float(k + 1),
            frames=frame_array,
            frame_times=np.asarray(times, np.float64),
            audio=self._take_audio_second(k),
            has_audio=self.has_audio,
        )

    def _take_audio_second(self, k: int) -> np.ndarray:
        """Cut samples [k, k + 1) s out of the buffer, zero-padded where missing."""
        lo, hi = k * SAMPLE_RATE, (k + 1) * SAMPLE_RATE
        out = np.zeros(SAMPLE_RATE, np.float32)
        buffered = np.concatenate(self._audio_chunks) if self._audio_chunks else np.zeros(0, np.float32)
        start = self._audio_end - buffered.size  # absolute index of buffered[0]
        a, b = max(lo, start), min(hi, self._audio_end)
        if b > a:
            out[a - lo : b - lo] = buffered[a - start : b - start]
        rest = buffered[max(hi - start, 0) :]
        self._audio_chunks = [rest] if rest.size else []
        return out
