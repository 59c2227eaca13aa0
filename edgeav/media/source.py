"""Media sources: files and URLs through PyAV (the push source is in :mod:`edgeav.media.push`).

A source yields :class:`~edgeav.media.segment.Segment` objects through a chain of
small generators (demux → decode, skipping corrupt packets → resample audio →
group into seconds); nothing holds more than the seconds not yet emitted.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np

from edgeav.errors import MediaError, OptionError
from edgeav.media.segment import POLICIES, SAMPLE_RATE, Segment, SegmentAssembler, clip_frame_indices

log = logging.getLogger("edgeav")

URL_SCHEMES = ("http://", "https://", "rtsp://", "rtsps://", "rtmp://", "udp://", "tcp://", "srt://")
# Crab samples 10 frames per clip.
CLIP_FRAMES = 10
# A file whose decoded media ends this much before its declared duration, or that
# yields less than this share of its declared frames, is truncated.
TRUNCATION_SLACK_S = 0.5
TRUNCATION_FRAME_SHARE = 0.9


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int
    height: int
    fps: float | None
    n_frames: int | None  # from the container's index; None when it does not say


@dataclass(frozen=True)
class AudioInfo:
    codec: str
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class MediaInfo:
    """What a source holds, read from its headers before any decoding."""

    source: str
    container: str
    duration_s: float | None
    start_s: float
    video: VideoInfo | None
    audio: AudioInfo | None
    is_live: bool

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DecodeStats:
    """Counters a source updates while it decodes."""

    video_frames: int = 0
    audio_samples: int = 0
    corrupt_packets: int = 0
    segments: int = 0


def is_url(source: str) -> bool:
    return source.lower().startswith(URL_SCHEMES)


def _check_local_path(path: str) -> None:
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", path)
    if scheme:
        supported = ", ".join(s.split(":")[0] for s in URL_SCHEMES)
        raise MediaError(f"{path}: unsupported URL scheme {scheme.group(1)!r}; use a local path or one of {supported}")
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{path}: no such file; check the path")
    if p.is_dir():
        raise MediaError(f"{path}: is a directory; give a media file inside it")
    if not p.is_file():
        raise MediaError(f"{path}: is not a regular file (a pipe or device); save the media to a file first")
    if p.stat().st_size == 0:
        raise MediaError(f"{path}: is empty (0 bytes); the file was not written completely")
    if not os.access(p, os.R_OK):
        raise MediaError(f"{path}: permission denied; make the file readable")


def _check_wav_size(path: str) -> None:
    """ffmpeg takes a WAV's length from the file size; its RIFF header says what was written."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(12)
        if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            declared = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                # 0 and 0xFFFFFFFF mark a stream whose writer never knew the length.
                if declared not in (0, 0xFFFFFFFF) and f.tell() + declared > size:
                    raise MediaError(
                        f"{path}: truncated: the header declares {declared} bytes of audio, "
                        f"the file holds {size - f.tell()}; re-copy or re-record it"
                    )
                return
            f.seek(declared + (declared & 1), os.SEEK_CUR)


def audio_resampler() -> av.AudioResampler:
    """To 16 kHz packed float, keeping the channels (averaged by :func:`mono_samples`).

    Packed, because PyAV's array conversion of planar frames with 8 or more channels
    (7.1 audio) reads past its plane table and crashes the process.
    """
    return av.AudioResampler(format="flt", rate=SAMPLE_RATE)


def mono_samples(frame: av.AudioFrame) -> tuple[np.ndarray, int | None]:
    """Average the channels of a packed frame (as librosa, which Crab loads audio with, does;
    ffmpeg's own downmix would weight them instead) and give the sample position."""
    channels = len(frame.layout.channels)
    samples = frame.to_ndarray().reshape(-1, channels).mean(axis=1, dtype=np.float32)
    position = None if frame.pts is None else round(frame.pts * frame.time_base * SAMPLE_RATE)
    return samples, position


def check_finite_audio(samples: np.ndarray, what: str, fix: str) -> None:
    """NaN or infinite samples would reach the model as garbage features: refuse them."""
    if not np.isfinite(samples).all():
        raise MediaError(f"{what}: the audio holds NaN or infinite samples; {fix}")


class FrameScaler:
    """Decoded video frames -> uint8 RGB [H, W, 3], byte for byte as decord returns them.

    Crab reads video with ``decord.VideoReader(uri, height, width)``, which runs each
    frame through the FFmpeg filter graph ``[transpose,]scale=W:H`` into an rgb24 sink.
    libavfilter's scale filter defaults to bilinear, and one swscale pass converts YUV
    to RGB while it scales; the same graph through PyAV gives the same bytes (checked
    against decord in tests/test_pixels_decord.py).

    Args:
        size: (width, height) of the output after rotation; None keeps the displayed size.
    """

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        self.size = size
        self._key: tuple | None = None
        self._graph: av.filter.Graph | None = None

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        # decord rotates by the display matrix in quarter turns (its angle is the negated one).
        turn = -frame.rotation % 360
        key = (frame.width, frame.height, frame.format.name, turn)
        if key != self._key:
            self._graph, self._key = self._build(frame, turn), key
        self._graph.vpush(frame)
        return self._graph.vpull().to_ndarray()

    def _build(self, frame: av.VideoFrame, turn: int) -> av.filter.Graph:
        transposes = {90: ["1"], 180: ["1", "1"], 270: ["2"]}.get(turn, [])
        upright = (frame.height, frame.width) if len(transposes) == 1 else (frame.width, frame.height)
        width, height = self.size or upright
        graph = av.filter.Graph()
        chain = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                  time_base=frame.time_base or Fraction(1, 1000))]
        chain += [graph.add("transpose", direction) for direction in transposes]
        chain += [graph.add("scale", f"{width}:{height}:flags=bilinear"), graph.add("format", "rgb24"),
                  graph.add("buffersink")]
        for upstream, downstream in zip(chain, chain[1:]):
            upstream.link_to(downstream)
        graph.configure()
        return graph


def _ffmpeg_reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


class MediaSource:
    """A file or URL opened with PyAV. Use as a context manager, or call :meth:`close`.

    Args:
        source: a local path, or a URL PyAV can open (http(s), rtsp, ...).
        audio_only: read only the audio track (a ``.wav`` is then fine).
        timeout_s: network open/read timeout for URLs.
    """

    def __init__(self, source: str | os.PathLike, *, audio_only: bool = False, timeout_s: float = 10.0) -> None:
        self.source = str(source)
        self.audio_only = audio_only
        self.stats = DecodeStats()
        self._read = False
        self._assembler: SegmentAssembler | None = None
        live = is_url(self.source)
        if not live:
            _check_local_path(self.source)
        options = {"rtsp_transport": "tcp"} if self.source.lower().startswith("rtsp") else {}
        try:
            self._container = av.open(self.source, options=options, timeout=timeout_s if live else None)
        except av.FFmpegError as e:
            if live:
                raise MediaError(
                    f"{self.source}: cannot open stream ({_ffmpeg_reason(e)}); check the URL and that the server is up"
                ) from None
            raise MediaError(
                f"{self.source}: not a readable media file ({_ffmpeg_reason(e)}); "
                "it may be truncated or not audio/video: re-encode or re-copy it"
            ) from None
        try:
            self.info = self._read_info(live)
        except MediaError:
            self._container.close()
            raise

    def _read_info(self, live: bool) -> MediaInfo:
        c = self._container
        vstream = c.streams.video[0] if c.streams.video else None
        astream = c.streams.audio[0] if c.streams.audio else None
        if vstream is None and astream is None:
            raise MediaError(f"{self.source}: has no audio or video stream; give a video file")
        if vstream is None and not self.audio_only:
            # run and stream take audio alone only beside pictures; probe reads it with --audio-only.
            raise MediaError(
                f"{self.source}: has no video stream (audio only); give the video, or an image or a folder of "
                f"frames with --audio {self.source} where the model hears audio (`edgeav probe --audio-only` "
                "reads the audio alone)"
            )
        if self.audio_only:
            vstream = None
        video = audio = None
        if vstream is not None:
            rate = vstream.average_rate or vstream.guessed_rate
            video = VideoInfo(
                codec=vstream.codec_context.name,
                width=vstream.codec_context.width,
                height=vstream.codec_context.height,
                fps=float(rate) if rate else None,
                n_frames=self._shown_frames(vstream),
            )
        if astream is not None:
            audio = AudioInfo(
                codec=astream.codec_context.name,
                sample_rate=astream.codec_context.sample_rate,
                channels=astream.codec_context.channels,
            )
        starts = [
            float(s.start_time * s.time_base) for s in (vstream, astream) if s is not None and s.start_time is not None
        ]
        if c.format.name == "wav" and not live:
            _check_wav_size(self.source)
        duration = c.duration / av.time_base if c.duration else None
        self._vstream, self._astream = vstream, astream
        self._origin = min(starts) if starts else 0.0
        return MediaInfo(
            source=self.source,
            container=c.format.name,
            duration_s=duration,
            start_s=self._origin,
            video=video,
            audio=audio,
            is_live=live and duration is None,
        )

    def _shown_frames(self, stream: av.video.stream.VideoStream) -> int | None:
        """The header's frame count less the frames an edit list hides (a stream-copied cut
        starts at the keyframe before the cut point; the decoder drops the lead-in)."""
        if not stream.frames:
            return None
        hidden = 0
        if self._container.format.name.startswith("mov"):  # only mov/mp4 edit lists mark entries discarded
            hidden = sum(1 for entry in stream.index_entries if entry.is_discard)
        return stream.frames - hidden or None

    # -- decoding ----------------------------------------------------------

    def segments(
        self,
        policy: str = "clip",
        *,
        clip_frames: int = CLIP_FRAMES,
        frame_size: tuple[int, int] | None = None,
        min_tail_s: float = 0.5,
        span_s: float | None = None,
        to_array: Callable[[av.VideoFrame], np.ndarray] | None = None,
        frame_indices: Callable[[int, int], np.ndarray] = clip_frame_indices,
    ) -> Iterator[Segment]:
        """Yield one :class:`Segment` per second of the source. A source is read once.

        Args:
            policy: ``"clip"`` (Crab's: ``clip_frames`` frames spread uniformly by
                frame count over the whole clip) or ``"stream"`` (the first frame
                of each second, decided on the fly; works on live sources).
            frame_size: (width, height) to scale kept frames to while decoding
                (Crab decodes straight to 224x224); None keeps the source size.
            min_tail_s: emit a last, partial second only if it holds this much media.
            span_s: read only the first ``span_s`` seconds, and take the clip
                policy's frames from them (a task whose clips are that long).
            to_array: converts each kept frame to uint8 [H, W, 3] in place of
                ``FrameScaler(frame_size)`` (a caller that keeps a frame at two sizes).
            frame_indices: ``(n_frames, clip_frames) -> indices``: the clip policy's sampling (Crab's by default).
        """
        if policy not in POLICIES:
            raise OptionError(f"policy {policy!r} is unknown; expected one of {', '.join(POLICIES)}")
        if self._read:
            raise OptionError(f"{self.source}: segments() was already read; open the source again to re-read it")
        self._read = True
        clip_indices = None
        if self._vstream is not None and policy == "clip":
            if self.info.is_live:
                raise OptionError(
                    f"{self.source}: policy 'clip' needs the whole clip's length; use policy 'stream' for live sources"
                )
            clip_indices = frame_indices(self._count_video_frames(span_s), clip_frames)
        if frame_size is not None:
            width, height = frame_size
        elif self.info.video is not None:
            width, height = self.info.video.width, self.info.video.height
        else:
            width, height = 0, 0
        self._assembler = assembler = SegmentAssembler(
            policy,
            has_video=self._vstream is not None,
            has_audio=self._astream is not None,
            clip_indices=clip_indices,
            to_array=to_array or FrameScaler(frame_size),
            frame_shape=(height, width),
            min_tail_s=min_tail_s,
        )
        for kind, payload, where in self._decoded():
            if kind == "video":
                assembler.add_video(payload.time - self._origin, payload, where)
            else:
                assembler.add_audio(payload, where)
            for segment in assembler.ready():
                if span_s is not None and segment.start_s >= span_s:
                    return
                self.stats.segments += 1
                yield segment
        for segment in assembler.finish():
            if span_s is not None and segment.start_s >= span_s:
                return
            self.stats.segments += 1
            yield segment
        self._check_complete(assembler.media_end_s)

    @property
    def media_end_s(self) -> float | None:
        """Seconds of media decoded so far (its real length once segments() is exhausted), None before
        decoding; bounds what results may claim where a header's duration says otherwise."""
        return None if self._assembler is None else self._assembler.media_end_s

    def _check_complete(self, media_end_s: float) -> None:
        """Refuse a file whose media stops short of what its header declares."""
        if self.info.is_live:
            return
        declared = self.info.duration_s
        shortfall = None
        if declared is not None and media_end_s < declared - TRUNCATION_SLACK_S:
            shortfall = f"media ends at {media_end_s:.2f} s of the {declared:.2f} s its header declares"
        frames = self.info.video.n_frames if self.info.video else None
        if frames and self.stats.video_frames < TRUNCATION_FRAME_SHARE * frames:
            shortfall = f"{self.stats.video_frames} of the {frames} frames its header declares could be decoded"
        if shortfall:
            raise MediaError(
                f"{self.source}: truncated: {shortfall} (the first {self.stats.segments} segments were read); "
                "re-copy or re-encode the file"
            )

    def _count_video_frames(self, span_s: float | None = None) -> int:
        """Frames for clip sampling (those before ``span_s``): the index's count, else one demux pass."""
        if self.info.video.n_frames and span_s is None:
            return self.info.video.n_frames
        with av.open(self.source) as counter:
            stream = counter.streams.video[0]
            limit = None if span_s is None else self._origin + span_s
            return sum(1 for p in counter.demux(stream) if p.size and not p.is_discard
                       and (limit is None or p.pts is None or p.pts * stream.time_base < limit))

    def _decoded(self) -> Iterator[tuple[str, object, int | None]]:
        """(kind, payload, position): video frames with their decode index, and
        16 kHz mono audio with its absolute sample position."""
        streams = [s for s in (self._vstream, self._astream) if s is not None]
        if self._vstream is not None:
            self._vstream.thread_type = "AUTO"
        resampler = audio_resampler()
        origin_samples = round(self._origin * SAMPLE_RATE)
        frame_index = 0
        packets = self._container.demux(streams)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError as e:
                # A demuxer error ends the stream: the data after it cannot be located.
                self.stats.corrupt_packets += 1
                log.warning("%s: stopped reading at a damaged part (%s)", self.source, _ffmpeg_reason(e))
                break
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                self.stats.corrupt_packets += 1
                log.debug("%s: skipped a corrupt %s packet (%s)", self.source, packet.stream.type, _ffmpeg_reason(e))
                continue
            for frame in frames:
                if packet.stream.type == "video":
                    if frame.time is None:
                        continue
                    self.stats.video_frames += 1
                    yield "video", frame, frame_index
                    frame_index += 1
                else:
                    yield from self._resampled(resampler, frame, origin_samples)
        yield from self._resampled(resampler, None, origin_samples)

    def _resampled(self, resampler: av.AudioResampler, frame: av.AudioFrame | None, origin_samples: int):
        for out in resampler.resample(frame):
            samples, position = mono_samples(out)
            check_finite_audio(samples, self.source, "the file is damaged or was written from bad data: re-encode it")
            self.stats.audio_samples += samples.size
            yield "audio", samples, None if position is None else position - origin_samples

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "MediaSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(source: str | os.PathLike, *, audio_only: bool = False, timeout_s: float = 10.0) -> MediaSource:
    """Open a file or URL; raises :class:`~edgeav.errors.MediaError` with a one-line reason."""
    return MediaSource(source, audio_only=audio_only, timeout_s=timeout_s)


def segments(source: str | os.PathLike, policy: str = "clip", **options) -> Iterator[Segment]:
    """Open ``source`` and yield its segments, closing it at the end (see :meth:`MediaSource.segments`)."""
    audio_only = options.pop("audio_only", False)
    with open_source(source, audio_only=audio_only) as src:
        yield from src.segments(policy, **options)
