"""Media layer: per-second segments from files (pushed arrays: test_push.py)."""

from __future__ import annotations

import tracemalloc

import av
import numpy as np
import pytest

from edgeav.errors import MediaError, OptionError
from edgeav.media import (
    Segment,
    SegmentAssembler,
    audio_windows,
    clip_frame_indices,
    open_source,
    segments,
)
from edgeav.media import synth
from edgeav.systems.crab.audio_cut import crab_audio_plan

from conftest import faststart_copy

SR = 16000


@pytest.fixture(scope="module")
def clip10(tmp_path_factory):
    """The reference clip: 10 s, 25 fps, a 440 Hz tone in odd seconds."""
    path = tmp_path_factory.mktemp("media") / "clip10.mp4"
    return path, synth.write_clip(path)


def write(tmp_path, name, **overrides):
    overrides = {"width": 96, "height": 64, "duration_s": 4.0, **overrides}
    path = tmp_path / name
    return path, synth.write_clip(path, **overrides)


def frame_error(frame: np.ndarray, spec: synth.SynthSpec, t: float) -> float:
    return float(np.abs(frame.astype(np.int16) - synth.render_frame(spec, t).astype(np.int16)).mean())


@pytest.mark.parametrize("policy", ["clip", "stream"])
def test_ten_second_clip_gives_ten_one_second_segments(clip10, policy):
    path, spec = clip10
    segs = list(segments(path, policy))
    assert [s.index for s in segs] == list(range(10))
    assert all(s.end_s - s.start_s == 1.0 and s.start_s == s.index for s in segs)
    assert all(s.audio.shape == (SR,) and s.audio.dtype == np.float32 for s in segs)
    assert all(s.frames.dtype == np.uint8 and s.frames.shape[1:] == (240, 320, 3) for s in segs)
    rms = [s.audio_rms for s in segs]
    assert rms == pytest.approx([synth.expected_rms(spec, k) for k in range(10)], abs=0.01)
    assert rms[1] > 0.3 and rms[2] < 0.01  # the tone pattern, not just a match of two zeros


def test_stream_policy_takes_the_frame_at_the_start_of_each_second(clip10):
    path, spec = clip10
    segs = list(segments(path, "stream"))
    assert [s.n_frames for s in segs] == [1] * 10
    assert [float(s.frame_times[0]) for s in segs] == pytest.approx(list(range(10)))
    for s in segs:
        assert frame_error(s.frames[0], spec, s.start_s) < 6
        # and not a frame half a second later: the shapes move ~0.4 px per frame
        assert frame_error(s.frames[0], spec, s.start_s) < frame_error(s.frames[0], spec, s.start_s + 0.8)


def test_clip_policy_follows_crab_sampling_over_a_long_clip(tmp_path):
    path, spec = write(tmp_path, "long.mp4", duration_s=60.0, fps=5.0, width=64, height=48)
    segs = list(segments(path, "clip"))
    assert len(segs) == 60
    # 300 frames, 10 samples: indices 0, 30, 60, ... -> times 0, 6, 12, ... s
    with_frames = [s.index for s in segs if s.n_frames]
    assert with_frames == list(range(0, 60, 6))
    assert sum(s.n_frames for s in segs) == 10
    assert [float(s.frame_times[0]) for s in segs if s.n_frames] == pytest.approx(list(range(0, 60, 6)))


def test_clip_frame_indices_match_crab_formula():
    assert clip_frame_indices(250, 10).tolist() == list(range(0, 250, 25))
    assert clip_frame_indices(7, 10).tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6]
    for n in (1, 9, 11, 99, 301, 1499):
        got = clip_frame_indices(n, 10)
        assert len(got) == 10 and got[0] == 0 and got[-1] < n
        assert np.all(np.diff(got) >= 0)


def test_clip_policy_repeats_frames_of_a_short_clip(tmp_path):
    path, _ = write(tmp_path, "short.mp4", duration_s=1.4, fps=5.0)
    segs = list(segments(path, "clip"))
    # 7 frames for 10 samples: Crab repeats some; none is lost.
    assert sum(s.n_frames for s in segs) == 10


def test_variable_frame_rate_uses_timestamps(tmp_path):
    path, spec = write(tmp_path, "vfr.mkv", vfr=True, duration_s=6.0)
    times = spec.frame_times()
    for s in segments(path, "stream"):
        expected = times[times >= s.start_s - 1e-3].min()
        assert float(s.frame_times[0]) == pytest.approx(expected, abs=1e-3)


def test_audio_start_offset_keeps_audio_in_media_time(tmp_path):
    # The audio stream starts 0.5 s after the video; tones sit at odd seconds of media time.
    path, spec = write(tmp_path, "offset.mp4", audio_offset_s=0.5, duration_s=6.0)
    rms = [s.audio_rms for s in segments(path, "stream")]
    assert rms == pytest.approx([synth.expected_rms(spec, k) for k in range(6)], abs=0.03)
    assert min(rms[1::2]) > 0.3 and max(rms[0::2]) < 0.03


def test_source_without_audio_gives_silence_and_a_flag(tmp_path):
    path, _ = write(tmp_path, "silent.mp4", audio=False)
    with open_source(path) as src:
        assert not src.info.has_audio
        segs = list(src.segments("stream"))
    assert len(segs) == 4
    assert all(not s.has_audio and not s.audio.any() and s.n_frames == 1 for s in segs)


def test_audio_only_file_needs_audio_only(tmp_path):
    path, spec = write(tmp_path, "tone.wav")
    with pytest.raises(MediaError, match="no video stream"):
        open_source(path)
    segs = list(segments(path, "clip", audio_only=True))
    assert [s.n_frames for s in segs] == [0] * 4
    assert [s.audio_rms for s in segs] == pytest.approx([synth.expected_rms(spec, k) for k in range(4)], abs=0.01)


def test_other_containers_decode(tmp_path):
    for name in ("c.webm", "c.avi", "c.mov"):
        path, _ = write(tmp_path, name, duration_s=3.0)
        segs = list(segments(path, "stream"))
        assert len(segs) == 3, name
        assert segs[1].audio_rms > 0.3 and segs[2].audio_rms < 0.1, name


def test_frame_size_scales_while_decoding(clip10):
    path, _ = clip10
    seg = next(iter(segments(path, "stream", frame_size=(224, 224))))
    assert seg.frames.shape == (1, 224, 224, 3)


def corrupt_middle(data: bytes, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for k in range(20):
        start = len(out) // 4 + k * len(out) // 50
        out[start : start + 300] = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    return bytes(out)


def test_corrupt_packets_are_skipped_and_counted(tmp_path):
    path, _ = write(tmp_path, "good.mp4", width=320, height=240, duration_s=10.0)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(corrupt_middle(path.read_bytes()))
    with open_source(bad) as src:
        segs = list(src.segments("stream"))
        assert src.stats.corrupt_packets > 0
    assert len(segs) == 10
    assert segs[9].audio_rms > 0.3  # decoding went on past the damage


def test_truncated_files_are_refused(tmp_path):
    path, _ = write(tmp_path, "whole.mp4", duration_s=6.0)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # index (moov) at the end: nothing to read
    with pytest.raises(MediaError, match="cut.mp4: not a readable media file"):
        open_source(cut)

    faststart = tmp_path / "faststart.mp4"
    faststart_copy(path, faststart)
    data = faststart.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # index first: the first half still decodes
    got = []
    with pytest.raises(MediaError, match="truncated"):
        for s in segments(cut, "stream"):
            got.append(s)
    assert 1 <= len(got) < 6


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("not a video at all\n" * 50), "not a readable media file"),
    ],
    ids=["missing", "directory", "empty", "text"],
)
def test_bad_files_raise_a_media_error_naming_the_file(tmp_path, make, message):
    path = tmp_path / "input.mp4"
    make(path)
    with pytest.raises(MediaError, match=message) as info:
        open_source(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_policy_is_an_option_error(clip10):
    with pytest.raises(OptionError, match="expected one of clip, stream"):
        next(iter(segments(clip10[0], "frames")))


def test_memory_does_not_grow_with_duration(tmp_path):
    """Python-side allocations while decoding stay flat from 20 s to 120 s of media."""

    def peak_bytes(path):
        tracemalloc.start()
        for _ in segments(path, "stream"):
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    short, _ = write(tmp_path, "short.mp4", duration_s=15.0, fps=5.0, sample_rate=16000)
    long, _ = write(tmp_path, "long.mp4", duration_s=90.0, fps=5.0, sample_rate=16000)
    assert peak_bytes(long) < 1.5 * peak_bytes(short)


# -- the assembler on its own ------------------------------------------------


def tone(n, value=0.5):
    return np.full(n, value, np.float32)


def test_assembler_fills_audio_gaps_with_silence_and_drops_overlap():
    asm = SegmentAssembler("stream", has_video=False, has_audio=True)
    asm.add_audio(tone(8000), 0)
    asm.add_audio(tone(8000), 12000)  # 4000 samples lost before this chunk
    asm.add_audio(tone(8000, 0.25), 16000)  # overlaps the previous chunk by 4000
    segs = list(asm.ready()) + list(asm.finish())
    assert len(segs) == 2
    a = segs[0].audio
    assert a[:8000].min() == 0.5 and not a[8000:12000].any() and a[12000:].min() == 0.5
    b = segs[1].audio  # the second chunk ran to 20000; the third only adds 20000..24000
    assert b[:4000].min() == 0.5 and b[4000:8000].min() == 0.25 and not b[8000:].any()


def test_assembler_treats_small_timestamp_jitter_as_contiguous():
    asm = SegmentAssembler("stream", has_video=False, has_audio=True)
    asm.add_audio(tone(10000), 0)
    asm.add_audio(tone(6000), 10040)  # 2.5 ms late: rounding, not a gap
    seg = next(asm.ready())
    assert np.all(seg.audio == 0.5)


def test_assembler_emits_a_partial_last_second_only_with_enough_media():
    for samples, expected in ((SR * 2 + SR // 10, 2), (SR * 2 + SR * 6 // 10, 3)):
        asm = SegmentAssembler("stream", has_video=False, has_audio=True)
        asm.add_audio(tone(samples), 0)
        assert len(list(asm.ready()) + list(asm.finish())) == expected


def test_assembler_holds_the_last_frame_through_seconds_without_frames():
    asm = SegmentAssembler("stream", has_video=True, has_audio=False)
    red = np.full((4, 4, 3), 200, np.uint8)
    blue = np.full((4, 4, 3), 50, np.uint8)
    asm.add_video(0.0, red)
    asm.add_video(2.5, blue)  # nothing during second 1
    asm.add_video(3.5, blue)
    asm.add_video(3.9, blue)
    segs = list(asm.ready()) + list(asm.finish())
    assert [s.n_frames for s in segs] == [1, 1, 1, 1]
    assert [int(s.frames[0, 0, 0, 0]) for s in segs] == [200, 200, 50, 50]
    assert float(segs[1].frame_times[0]) == 0.0  # the held frame keeps its own time


# -- Crab's audio windows ---------------------------------------------------------


def ramp_segments(n_seconds):
    """Segments whose audio sample i holds i / 1e6, so every sample says where it came from."""
    for k in range(n_seconds):
        audio = (np.arange(k * SR, (k + 1) * SR) / 1e6).astype(np.float32)
        yield Segment(k, float(k), float(k + 1), np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0), audio, True)


def test_avqa_windows_are_two_seconds_centred_every_six_seconds():
    plan = crab_audio_plan("avqa", clip_s=60)
    assert plan.starts_s == pytest.approx([t - 0.5 for t in range(0, 60, 6)])
    windows = audio_windows(ramp_segments(60), plan)
    assert windows.shape == (10, 2 * SR)
    assert not windows[0, : SR // 2].any()  # the first window is padded at the front
    assert windows[0, SR // 2] == 0.0 and windows[0, -1] == pytest.approx((1.5 * SR - 1) / 1e6)
    assert windows[3, 0] == pytest.approx(17.5 * SR / 1e6)


def test_clip_windows_are_zero_padded_at_the_end():
    plan = crab_audio_plan("seconds", clip_s=10)
    windows = audio_windows(ramp_segments(7), plan)  # a 7-s clip for a 10-window task
    assert windows.shape == (10, SR)
    assert windows[6, -1] == pytest.approx((7 * SR - 1) / 1e6)
    assert not windows[7:].any()
    assert len(crab_audio_plan("seconds", clip_s=5).starts_s) == 5
    assert crab_audio_plan("avss", clip_s=10, frame_time_s=3.4).starts_s == (3.0,)
    with pytest.raises(OptionError):
        crab_audio_plan("nope", clip_s=10)


def test_audio_windows_stop_reading_after_the_last_window():
    seen = []

    def counted():
        for s in ramp_segments(60):
            seen.append(s.index)
            yield s

    audio_windows(counted(), crab_audio_plan("seconds", clip_s=5))
    assert seen == [0, 1, 2, 3, 4, 5]


def test_a_source_is_read_once(clip10):
    with open_source(clip10[0]) as src:
        next(iter(src.segments("stream")))
        with pytest.raises(OptionError, match="already read"):
            next(iter(src.segments("stream")))


def test_span_limits_reading_and_clip_sampling(tmp_path):
    path, _ = write(tmp_path, "twenty.mp4", duration_s=20.0, fps=5.0)
    segs = list(segments(path, "clip", span_s=10))
    assert [s.index for s in segs] == list(range(10))
    assert [float(s.frame_times[0]) for s in segs] == pytest.approx(list(range(10)))  # 10 frames over 10 s, not 20


def test_an_audio_clock_jump_is_a_discontinuity_not_an_hour_of_silence():
    asm = SegmentAssembler("stream", has_video=False, has_audio=True)
    asm.add_audio(tone(SR), 0)
    asm.add_audio(tone(SR), 3600 * SR)
    segs = list(asm.ready()) + list(asm.finish())
    assert len(segs) == 2


# -- media the field produces ----------------------------------------------------------


def write_audio(path, codec: str, layout: str, planes: np.ndarray, rate: int = 48000) -> None:
    """Encode float planes [channels, n] with ``layout``; packed frames, as PyAV cannot build 8 planes."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        for start in range(0, planes.shape[1], 1024):
            chunk = np.ascontiguousarray(planes[:, start : start + 1024].T, np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.mark.parametrize("name, codec", [("surround.wav", "pcm_s16le"), ("surround.mka", "flac")])
def test_7_1_audio_is_averaged_over_its_channels(tmp_path, name, codec):
    rate = 48000
    sine = np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)
    gains = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, -0.4])  # each channel its own share
    write_audio(tmp_path / name, codec, "7.1", gains[:, None] * sine[None], rate)
    segs = list(segments(tmp_path / name, "clip", audio_only=True))
    assert len(segs) == 2
    expected = gains.mean() * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)
    for seg in segs:
        assert seg.audio_rms == pytest.approx(gains.mean() / np.sqrt(2), abs=0.005)
        assert np.abs(seg.audio[200:-200] - expected[200:-200]).max() < 0.01  # the mean, sample for sample


def cut_by_stream_copy(source, target, cut_s: float) -> None:
    """Remux every packet, shifted so that ``cut_s`` becomes 0: the mp4 muxer writes an edit list
    that hides the lead-in before the cut, as ``ffmpeg -ss CUT -c copy`` does."""
    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        video_in = src.streams.video[0]
        video_out = dst.add_stream_from_template(video_in)
        shift = round(cut_s / video_in.time_base)
        for packet in src.demux(video_in):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = video_out
            dst.mux(packet)


def test_a_stream_copied_cut_with_an_edit_list_is_not_truncated(tmp_path):
    full, spec = write(tmp_path, "full.mp4", duration_s=4.0, fps=10.0, gop=40, audio=False)
    cut = tmp_path / "cut.mp4"
    cut_by_stream_copy(full, cut, 1.2)
    with av.open(str(cut)) as container:
        assert container.streams.video[0].frames == 40  # the header counts the 12 hidden frames too
    with open_source(cut) as src:
        assert src.info.video.n_frames == 28 and src.media_end_s is None
        segs = list(src.segments("stream"))
        assert src.media_end_s == pytest.approx(2.8)
    assert [s.index for s in segs] == [0, 1, 2]
    # what plays at 0 is the frame at 1.2 s of the original
    assert frame_error(segs[0].frames[0], spec, 1.2) < 6 < frame_error(segs[0].frames[0], spec, 0.0)
    clip = list(segments(cut, "clip"))
    assert sum(s.n_frames for s in clip) == 10 and [s.index for s in clip] == [0, 1, 2]


def test_nan_audio_in_a_float_wav_is_refused_in_one_line(tmp_path):
    planes = np.full((1, SR), 0.1)
    planes[0, 5000] = np.nan
    write_audio(tmp_path / "nan.wav", "pcm_f32le", "mono", planes, SR)
    planes[0, 5000] = np.inf
    write_audio(tmp_path / "inf.wav", "pcm_f32le", "mono", planes, 44100)
    for name in ("nan.wav", "inf.wav"):
        with pytest.raises(MediaError, match="NaN or infinite") as error:
            list(segments(tmp_path / name, "clip", audio_only=True))
        assert name in str(error.value) and "\n" not in str(error.value)

