"""Generated test media: moving coloured shapes and tones at known times.

Tests and demos write their clips with this module, so no media file is ever
downloaded. Everything is deterministic for a given :class:`SynthSpec`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np

from edgeav.errors import OptionError

# Container suffix -> (video encoder, audio encoder). A None video encoder means
# an audio-only container.
CONTAINERS = {
    ".mp4": ("libx264", "aac"),
    ".mov": ("libx264", "aac"),
    ".mkv": ("libx264", "aac"),
    ".webm": ("libvpx-vp9", "libopus"),
    ".avi": ("mpeg4", "libmp3lame"),
    ".wav": (None, "pcm_s16le"),
}


@dataclass(frozen=True)
class Shape:
    """A filled rectangle or disc moving linearly across the frame.

    Positions are the centre as fractions of width and height; ``size`` is
    the half-extent as a fraction of the frame height.
    """

    kind: str = "rect"
    color: tuple[int, int, int] = (230, 40, 40)
    size: float = 0.15
    start_xy: tuple[float, float] = (0.2, 0.5)
    end_xy: tuple[float, float] = (0.8, 0.5)

    def center_px(self, t: float, duration_s: float, width: int, height: int) -> tuple[float, float]:
        a = min(max(t / duration_s, 0.0), 1.0) if duration_s > 0 else 0.0
        x = self.start_xy[0] + a * (self.end_xy[0] - self.start_xy[0])
        y = self.start_xy[1] + a * (self.end_xy[1] - self.start_xy[1])
        return x * width, y * height


@dataclass(frozen=True)
class Tone:
    """A sine tone of ``freq_hz`` sounding during [start_s, end_s)."""

    start_s: float
    end_s: float
    freq_hz: float = 440.0
    amplitude: float = 0.5


def alternating_tones(duration_s: float, freq_hz: float = 440.0, amplitude: float = 0.5) -> tuple[Tone, ...]:
    """A tone in every odd second: silent, loud, silent, ... (an easy RMS pattern)."""
    return tuple(
        Tone(float(s), float(s + 1), freq_hz, amplitude) for s in range(1, math.ceil(duration_s), 2)
    )


@dataclass(frozen=True)
class SynthSpec:
    """Everything that defines a generated clip."""

    duration_s: float = 10.0
    fps: float = 25.0
    width: int = 320
    height: int = 240
    video: bool = True
    audio: bool = True
    sample_rate: int = 44100
    channels: int = 2
    # Seconds by which the audio stream starts after the video stream.
    audio_offset_s: float = 0.0
    # Variable frame rate: frame intervals drawn between 0.5/fps and 1.5/fps.
    vfr: bool = False
    background: tuple[int, int, int] = (20, 24, 32)
    shapes: tuple[Shape, ...] = (
        Shape("rect", (230, 40, 40), 0.15, (0.2, 0.3), (0.8, 0.3)),
        Shape("circle", (40, 200, 80), 0.12, (0.7, 0.7), (0.3, 0.7)),
    )
    # None means alternating_tones(duration_s).
    tones: tuple[Tone, ...] | None = None
    noise: float = 0.0
    seed: int = 0
    # Encoder overrides; None picks the container's default (CONTAINERS).
    video_codec: str | None = None
    audio_codec: str | None = None
    bit_rate: int = 400_000
    gop: int = 25
    # Display rotation stored in the container, degrees counter-clockwise (as phones record upright
    # video filmed sideways); the pixels are encoded unrotated.
    rotation: int = 0

    def resolved_tones(self) -> tuple[Tone, ...]:
        return alternating_tones(self.duration_s) if self.tones is None else self.tones

    def frame_times(self) -> np.ndarray:
        """Presentation time of every video frame, in seconds."""
        if not self.vfr:
            return np.arange(0, self.duration_s, 1.0 / self.fps)
        rng = np.random.default_rng(self.seed + 1)
        n_max = int(self.duration_s * self.fps * 2) + 2
        steps = rng.uniform(0.5 / self.fps, 1.5 / self.fps, n_max)
        times = np.concatenate([[0.0], np.cumsum(steps)])
        # Millisecond grid: the time base of the VFR stream.
        return np.round(times[times < self.duration_s], 3)


def render_frame(spec: SynthSpec, t: float) -> np.ndarray:
    """The RGB frame (uint8 [H, W, 3]) shown at time ``t``."""
    frame = np.empty((spec.height, spec.width, 3), np.uint8)
    frame[:] = spec.background
    ys, xs = np.ogrid[: spec.height, : spec.width]
    for shape in spec.shapes:
        cx, cy = shape.center_px(t, spec.duration_s, spec.width, spec.height)
        r = shape.size * spec.height
        if shape.kind == "circle":
            inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        elif shape.kind == "rect":
            inside = (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
        else:
            raise ValueError(f"unknown shape kind {shape.kind!r}; expected 'rect' or 'circle'")
        frame[inside] = shape.color
    return frame


def shape_mask(spec: SynthSpec, shape_index: int, t: float) -> np.ndarray:
    """Boolean [H, W] mask of one shape at time ``t`` (ground truth for tests)."""
    blank = dataclasses.replace(spec, background=(0, 0, 0), shapes=(
        dataclasses.replace(spec.shapes[shape_index], color=(255, 255, 255)),))
    return render_frame(blank, t)[..., 0] > 0


def render_audio(spec: SynthSpec, start_sample: int, n_samples: int) -> np.ndarray:
    """Mono float32 audio for samples [start, start + n) of the audio stream.

    The audio stream starts at ``spec.audio_offset_s``; tones are placed in
    media time, so a tone at [1, 2) s sounds at 1 s whatever the offset.
    """
    out = np.zeros(n_samples, np.float64)
    if n_samples == 0:
        return out.astype(np.float32)
    t = spec.audio_offset_s + (start_sample + np.arange(n_samples)) / spec.sample_rate
    for tone in spec.resolved_tones():
        if tone.end_s <= t[0] or tone.start_s > t[-1]:
            continue  # long clips have thousands of tones; a chunk overlaps one or two
        on = (t >= tone.start_s) & (t < tone.end_s)
        out += on * tone.amplitude * np.sin(2 * np.pi * tone.freq_hz * t)
    if spec.noise > 0:
        rng = np.random.default_rng([spec.seed, start_sample])
        out += spec.noise * rng.standard_normal(n_samples)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def expected_rms(spec: SynthSpec, second: int) -> float:
    """RMS of the generated mono audio over one second of media time (before coding)."""
    first = round((second - spec.audio_offset_s) * spec.sample_rate)
    last = round((spec.duration_s - spec.audio_offset_s) * spec.sample_rate)
    lo, hi = max(first, 0), min(first + spec.sample_rate, last)
    if hi <= lo:
        return 0.0
    samples = render_audio(spec, lo, hi - lo).astype(np.float64)
    return float(np.sqrt(np.sum(samples**2) / spec.sample_rate))


def encodable_rate(path: str | Path, sample_rate: int, audio_codec: str | None = None) -> int:
    """``sample_rate``, or 48 kHz where the audio codec (given, or the container's default) is Opus,
    which encodes at 48 kHz only."""
    codec = audio_codec or CONTAINERS.get(Path(path).suffix.lower(), (None, None))[1]
    return 48000 if codec == "libopus" else sample_rate


def write_clip(path: str | Path, spec: SynthSpec | None = None, **overrides) -> SynthSpec:
    """Encode a clip to ``path``; the container follows the suffix (see CONTAINERS).

    Returns the spec used (``overrides`` replace fields of ``spec``).
    """
    spec = dataclasses.replace(spec or SynthSpec(), **overrides)
    spec = dataclasses.replace(spec, sample_rate=encodable_rate(path, spec.sample_rate, spec.audio_codec))
    write_media(
        path,
        duration_s=spec.duration_s,
        fps=spec.fps,
        width=spec.width,
        height=spec.height,
        render_frame=lambda t: render_frame(spec, t),
        render_audio=lambda start, n: render_audio(spec, start, n),
        sample_rate=spec.sample_rate,
        channels=spec.channels,
        video=spec.video,
        audio=spec.audio,
        frame_times=spec.frame_times,
        vfr=spec.vfr,
        audio_offset_s=spec.audio_offset_s,
        video_codec=spec.video_codec,
        audio_codec=spec.audio_codec,
        bit_rate=spec.bit_rate,
        gop=spec.gop,
        rotation=spec.rotation,
    )
    return spec


def write_media(
    path: str | Path,
    *,
    duration_s: float,
    fps: float,
    width: int,
    height: int,
    render_frame: Callable[[float], np.ndarray],
    render_audio: Callable[[int, int], np.ndarray],
    sample_rate: int = 44100,
    channels: int = 2,
    video: bool = True,
    audio: bool = True,
    frame_times: Callable[[], np.ndarray] | None = None,
    vfr: bool = False,
    audio_offset_s: float = 0.0,
    video_codec: str | None = None,
    audio_codec: str | None = None,
    bit_rate: int = 400_000,
    gop: int = 25,
    rotation: int = 0,
) -> None:
    """Encode frames and audio drawn from callbacks to ``path`` (container from the suffix).

    ``render_frame(t)`` returns the uint8 [height, width, 3] RGB frame at ``t`` seconds;
    ``render_audio(start_sample, n)`` returns n float32 mono samples of the audio
    stream, which starts at ``audio_offset_s``. ``frame_times()`` gives the frame
    times (default: every 1/fps s); ``vfr`` stamps them on a millisecond time base;
    ``rotation`` is stored as the display matrix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONTAINERS:
        raise OptionError(f"{path}: unknown container suffix {suffix!r}; expected one of {', '.join(sorted(CONTAINERS))}")
    if not path.parent.is_dir():
        raise OptionError(f"{path}: folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise OptionError(f"{path}: is a directory; give a file name")
    default_video, default_audio = CONTAINERS[suffix]
    want_video = video and default_video is not None
    if want_video and (width % 2 or height % 2 or width < 16 or height < 16):
        raise OptionError(f"{path}: frame size {width}x{height} must be even and at least 16x16 (yuv420p)")
    if duration_s <= 0 or fps <= 0:
        raise OptionError(f"{path}: duration and fps must be positive, got {duration_s} s at {fps} fps")
    if audio and (audio_codec or default_audio) == "libopus" and sample_rate != 48000:
        raise OptionError(f"{path}: Opus encodes at 48 kHz only, got sample_rate={sample_rate}; use 48000")
    if not (want_video or audio):
        raise OptionError(f"{path}: a clip needs video or audio")
    if rotation % 90:
        raise OptionError(f"{path}: rotation {rotation} is not a multiple of 90 degrees")
    times = np.empty(0)
    if want_video:
        times = frame_times() if frame_times is not None else np.arange(0, duration_s, 1.0 / fps)
    # Written beside the target and renamed at the end: a failed write leaves no half file.
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        with av.open(str(partial), "w") as container:
            vstream = astream = None
            if want_video:
                codec = video_codec or default_video
                vstream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
                vstream.bit_rate = bit_rate
                vstream.codec_context.gop_size = gop
                if vfr:
                    vstream.codec_context.time_base = Fraction(1, 1000)
                if codec == "libx264":
                    vstream.options = {"preset": "ultrafast"}
                if rotation % 360:
                    vstream.set_display_rotation(rotation)
            if audio:
                astream = container.add_stream(audio_codec or default_audio, rate=sample_rate)
                astream.layout = "stereo" if channels == 2 else "mono"
            audio_len = round((duration_s - audio_offset_s) * sample_rate) if audio else 0
            _mux(container, vstream, astream, times, vfr, render_frame, render_audio,
                 audio_len, audio_offset_s, sample_rate, channels)
        partial.replace(path)
    except (av.FFmpegError, OSError) as e:
        raise OptionError(f"{path}: cannot write ({getattr(e, 'strerror', None) or e}); check the folder is writable") from None
    finally:
        partial.unlink(missing_ok=True)


def _mux(container, vstream, astream, video_times, vfr, render_frame, render_audio,
         audio_len, audio_offset_s, sample_rate, channels) -> None:
    """Encode video and audio in time order, so the file is well interleaved."""
    chunk = 1024
    audio_pos, vi = 0, 0
    while vi < len(video_times) or audio_pos < audio_len:
        audio_t = audio_offset_s + audio_pos / sample_rate
        if vi < len(video_times) and (audio_pos >= audio_len or video_times[vi] <= audio_t):
            t = float(video_times[vi])
            frame = av.VideoFrame.from_ndarray(render_frame(t), format="rgb24")
            frame.pts = round(t * 1000) if vfr else vi
            frame.time_base = Fraction(1, 1000) if vfr else 1 / Fraction(vstream.average_rate)
            container.mux(vstream.encode(frame))
            vi += 1
        else:
            n = min(chunk, audio_len - audio_pos)
            mono = np.asarray(render_audio(audio_pos, n), np.float32)
            planes = np.repeat(mono[None, :], channels, axis=0)
            frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=astream.layout.name)
            frame.sample_rate = sample_rate
            frame.pts = round(audio_offset_s * sample_rate) + audio_pos
            frame.time_base = Fraction(1, sample_rate)
            container.mux(astream.encode(frame))
            audio_pos += n
    for stream in (vstream, astream):
        if stream is not None:
            container.mux(stream.encode(None))


__all__ = [
    "CONTAINERS",
    "Shape",
    "SynthSpec",
    "Tone",
    "alternating_tones",
    "expected_rms",
    "render_audio",
    "render_frame",
    "shape_mask",
    "write_clip",
    "write_media",
]
