"""Push sources: arrays from embedding software, their validation, clock jumps and memory."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest

from edgeav.errors import MediaError, OptionError
from edgeav.media import PushSource, Segment, synth

SR = 16000


def tone(n, value=0.5):
    return np.full(n, value, np.float32)


def test_push_source_fed_from_one_thread_and_read_from_another():
    spec = synth.SynthSpec(duration_s=5.0, width=64, height=48, sample_rate=48000)
    source = PushSource()
    received: list[Segment] = []

    def producer():
        chunk = 4800  # 0.1 s at 48 kHz, stereo int16 as a sound card delivers it
        for i in range(50):
            t = i / 10
            source.push_video(synth.render_frame(spec, t), t)
            mono = synth.render_audio(spec, i * chunk, chunk)
            stereo = (np.stack([mono, mono], axis=1) * 32767).astype(np.int16)
            source.push_audio(stereo, 48000, t)
        source.close()

    def consumer():
        received.extend(source.segments(timeout_s=10))

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [s.index for s in received] == [0, 1, 2, 3, 4]
    assert [s.audio_rms for s in received] == pytest.approx([synth.expected_rms(spec, k) for k in range(5)], abs=0.02)
    assert [float(s.frame_times[0]) for s in received] == pytest.approx([0, 1, 2, 3, 4])
    assert source.dropped_segments == 0


def test_push_source_drops_oldest_segments_when_the_reader_lags():
    source = PushSource(audio=False, max_pending_segments=2)
    frame = np.zeros((8, 8, 3), np.uint8)
    for i in range(60):
        source.push_video(frame, 100.0 + i / 10)  # the first time pushed becomes 0
    source.close()
    got = [s.index for s in source.segments(timeout_s=1)]
    assert got == [4, 5]
    assert source.dropped_segments == 4


def test_push_source_rejects_bad_arrays():
    source = PushSource()
    with pytest.raises(OptionError, match="uint8"):
        source.push_video(np.zeros((8, 8), np.uint8), 0.0)
    with pytest.raises(OptionError, match="float32 or int16"):
        source.push_audio(np.zeros(100, np.int32), 16000, 0.0)
    source.close()
    with pytest.raises(OptionError, match="closed"):
        source.push_video(np.zeros((8, 8, 3), np.uint8), 1.0)


def test_push_source_copies_frames_from_a_reused_buffer():
    source = PushSource(audio=False)
    buffer = np.zeros((4, 4, 3), np.uint8)
    for i in range(25):
        buffer[:] = i  # a capture loop writing into the same array
        source.push_video(buffer, i / 10)
    source.close()
    assert [int(s.frames[0, 0, 0, 0]) for s in source.segments(timeout_s=1)] == [0, 10, 20]


def test_push_source_rejects_bad_times_and_sizes():
    with pytest.raises(OptionError, match="at least 1"):
        PushSource(max_pending_segments=0)
    source = PushSource()
    with pytest.raises(OptionError, match="finite"):
        source.push_audio(np.zeros(10, np.float32), 16000, float("nan"))
    source.push_audio(np.zeros(0, np.float32), 16000, 0.0)  # nothing to add, no error
    source.close()


def test_pushed_7_1_audio_is_averaged_over_its_channels():
    source = PushSource(video=False)
    gains = np.linspace(-0.2, 0.6, 8)
    sine = np.sin(2 * np.pi * 440 * np.arange(SR) / SR)
    source.push_audio((sine[:, None] * gains[None]).astype(np.float32), SR, 0.0)
    source.close()
    (seg,) = list(source.segments(timeout_s=1))
    assert np.abs(seg.audio - gains.mean() * sine).max() < 1e-5


def test_pushed_float_audio_of_absurd_magnitude_is_refused_and_loud_audio_is_not():
    """int16 values passed as float would be 32768 times too loud; a little overshoot (clipping) is kept."""
    source = PushSource(video=False)
    as_float = (np.sin(np.arange(1600) / 5) * 20000).astype(np.float32)
    with pytest.raises(MediaError, match="float samples reach 2000.* looks like int16 values in a float array: "
                                         "divide by 32768"):
        source.push_audio(as_float, SR, 0.0)
    with pytest.raises(MediaError, match="float samples reach 1e\\+06; float audio is in \\[-1, 1\\]"):
        source.push_audio(np.full(10, 1e6, np.float32), SR, 0.0)
    source.push_audio(np.full(SR, 1.5, np.float32), SR, 0.0)  # clipped, loud: still audio
    source.close()
    (segment,) = source.segments(timeout_s=1)
    assert segment.audio.max() > 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pushed_nan_or_inf_audio_is_refused(bad):
    source = PushSource(video=False)
    samples = np.zeros((1600, 2), np.float32)
    samples[7, 1] = bad
    with pytest.raises(MediaError, match="push_audio: the audio holds NaN or infinite"):
        source.push_audio(samples, SR, 0.0)
    with pytest.raises(MediaError, match="NaN or infinite"):
        source.push_audio(np.full(10, 1e300), SR, 0.0)  # float64 beyond float32's range
    source.close()
    assert list(source.segments(timeout_s=1)) == []  # nothing of it was kept


# -- push_audio validation --------------------------------------------------------------


@pytest.mark.parametrize("rate, message", [
    (1, "outside 8000..192000 Hz"),
    (0, "sample_rate 0 Hz is outside"),
    (16, "16 looks like kHz: pass 16000"),
    (44.1, "44.1 looks like kHz: pass 44100"),
    (16000.5, "whole number of Hz"),
    (float("nan"), "whole number of Hz"),
    (384000, "outside 8000..192000 Hz"),
    ("16000", "whole number of Hz"),
    (True, "whole number of Hz"),
])
def test_push_audio_refuses_bad_sample_rates_in_one_line(rate, message):
    source = PushSource(video=False)
    with pytest.raises(OptionError, match=message) as error:
        source.push_audio(np.zeros(1600, np.float32), rate, 0.0)
    assert "\n" not in str(error.value) and str(error.value).startswith("push_audio: sample_rate")


def test_push_audio_takes_integral_float_and_numpy_rates():
    source = PushSource(video=False)
    source.push_audio(tone(8000), 16000.0, 0.0)
    source.push_audio(tone(4000), np.int64(8000), 0.5)
    source.close()
    (seg,) = list(source.segments(timeout_s=1))
    assert np.abs(seg.audio[100:-100] - 0.5).max() < 0.01


@pytest.mark.parametrize("shape, message", [
    ((2, 4800), r"look channels-first; pass samples.T"),
    ((8, 100), r"look channels-first; pass samples.T"),
    ((4800, 100), "100 channels; 1 to 8 are supported"),
    ((4800, 9), "9 channels; 1 to 8 are supported"),
    ((4800, 0), "0 channels"),
    ((10, 4800, 2), r"shaped \[n\] or \[n, channels\]"),
])
def test_push_audio_refuses_bad_layouts_in_one_line(shape, message):
    source = PushSource(video=False)
    with pytest.raises(OptionError, match=message) as error:
        source.push_audio(np.zeros(shape, np.float32), SR, 0.0)
    assert "\n" not in str(error.value)


# -- push sources: clock jumps, stalls and memory ------------------------------------------


def push_second(source, t0: float, value: int, *, video=True, audio=True, fps=10) -> None:
    frame = np.full((8, 8, 3), value, np.uint8)
    for i in range(fps):
        if video:
            source.push_video(frame, t0 + i / fps)
        if audio:
            source.push_audio(np.full(SR // fps, value / 255, np.float32), SR, t0 + i / fps)


@pytest.mark.parametrize("restart_at", [0.0, -100.0, 1.5], ids=["back-to-zero", "negative", "one-and-a-half-back"])
def test_a_pushed_clock_reset_keeps_the_later_media_and_reports_it(restart_at):
    """A camera whose clock restarts (back to 0, or to any earlier time) keeps its later seconds: they follow
    the ones already taken, and the reset is reported (before, every later frame was dropped as late)."""
    source = PushSource(max_pending_segments=1000)
    for k in range(3):
        push_second(source, float(k), 10 + k)
    for k in range(3):
        push_second(source, restart_at + k, 100 + k)
    source.close()
    segs = list(source.segments(timeout_s=1))
    assert [s.index for s in segs] == list(range(6)) and source.dropped_segments == 0
    assert [int(s.frames[0, 0, 0, 0]) for s in segs] == [10, 11, 12, 100, 101, 102]
    assert [round(float(s.audio.mean()) * 255) for s in segs] == [10, 11, 12, 100, 101, 102]
    (gap,) = source.take_gaps()
    assert gap[:2] == (3.0, 3.0) and "clock went back" in gap[2] and "reset" in gap[2]


def test_late_frames_and_audio_jitter_are_not_a_reset():
    """Frames up to a second late, and audio chunks that overlap a little, are not taken for a reset."""
    source = PushSource(max_pending_segments=1000)
    push_second(source, 0.0, 10)
    push_second(source, 1.0, 11)
    source.push_video(np.full((8, 8, 3), 50, np.uint8), 1.2)  # late: its second already has a frame
    source.push_audio(np.zeros(800, np.float32), SR, 1.9)  # overlaps the last chunk
    push_second(source, 2.0, 12)
    source.close()
    segs = list(source.segments(timeout_s=1))
    assert [int(s.frames[0, 0, 0, 0]) for s in segs] == [10, 11, 12] and source.take_gaps() == []


@pytest.mark.parametrize("video_jumps, audio_jumps", [(True, True), (True, False), (False, True)])
def test_a_pushed_clock_jump_is_a_gap_not_seconds_to_fill(video_jumps, audio_jumps):
    source = PushSource(max_pending_segments=1000)
    for k in range(3):
        push_second(source, float(k), 10 + k)
    held = []
    for k in range(4):
        push_second(source, 1e5 + k if video_jumps else 3 + k, 100 + k, audio=False)
        push_second(source, 1e5 + k if audio_jumps else 3 + k, 100 + k, video=False)
        held.append(len(source._assembler._pending))
    source.close()
    segs = list(source.segments(timeout_s=1))
    # Video pushed before the audio jumps still fills second 3; after a jump, the other stream's old clock is late.
    before = [0, 1, 2] if video_jumps else [0, 1, 2, 3]
    assert [s.index for s in segs] == before + [100000, 100001, 100002, 100003]
    assert source.stats.segments == len(segs) and max(held) <= 6  # never a segment or frame per missing second
    assert source.take_gaps() == [(float(len(before)), 100000.0, "the pushed clock jumped ahead; no media in between")]
    assert source.take_gaps() == []
    assert [int(s.frames[0, 0, 0, 0]) for s in segs[:3]] == [10, 11, 12]
    after = segs[len(before):]
    if video_jumps:  # the media after the jump is still answered
        assert [int(s.frames[0, 0, 0, 0]) for s in after] == [100, 101, 102, 103]
    if audio_jumps:
        assert [round(float(s.audio.mean()) * 255) for s in after] == [100, 101, 102, 103]


def test_a_stream_the_caller_stops_feeding_holds_the_other_back_only_a_few_seconds():
    source = PushSource()
    for k in range(60):
        push_second(source, float(k), k, audio=k < 2)  # the microphone stops after 2 s
        assert len(source._assembler._pending) <= 7
    source.close()
    segs = list(source.segments(timeout_s=1))
    assert [s.index for s in segs][-30:] == list(range(30, 60))  # max_pending_segments kept the newest


def test_a_closed_and_drained_push_source_holds_no_frames():
    source = PushSource(max_pending_segments=4)
    for k in range(6):
        push_second(source, float(k), k, fps=2)
    source.close()
    segs = list(source.segments(timeout_s=1))
    pushed_copies = [weakref.ref(s.frames.base if s.frames.base is not None else s.frames) for s in segs]
    assert not source.holds_media
    del segs
    gc.collect()
    assert all(ref() is None for ref in pushed_copies)  # the source kept none, not even the last frame


def test_a_reader_that_stops_early_releases_the_buffered_segments():
    source = PushSource(audio=False)
    for k in range(10):
        push_second(source, float(k), k, audio=False, fps=1)
    reader = source.segments(timeout_s=1)
    assert next(reader).index == 0
    reader.close()  # the consumer stopped (a stream stopped, its model failed)
    push_second(source, 10.0, 10, audio=False, fps=1)  # nobody will read these
    source.close()
    assert not source.holds_media and source.dropped_segments == 10


def test_a_push_session_answers_after_its_clock_jumps_and_reports_the_gap(tiny_released):
    from edgeav.systems.crab.checkpoints import load_checkpoint
    from edgeav.runtime import Runtime

    runtime = Runtime(load_checkpoint(tiny_released))
    with runtime.push_session("ave", window=2, max_new_tokens=2) as session:
        for k in range(3):
            push_second(session, float(k), 10 * k, fps=5)
        for k in range(3):
            push_second(session, 1e5 + k, 10 * k, fps=5)
        session.close()
        results = list(session.results(timeout_s=60))
    telemetry = session.telemetry
    # windows of 2 s every second: two before the jump, two after it, none over the gap
    assert telemetry.windows_processed + telemetry.windows_skipped == 4
    assert {r.start_s for r in results} <= {0.0, 1.0, 100000.0, 100001.0} and results[-1].start_s == 100001.0
    assert [(g.start_s, g.end_s) for r in results for g in r.gaps] == [(3.0, 100000.0)]
