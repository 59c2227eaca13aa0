"""Streaming: windows over files, live URLs and push sessions; the encode cache; telemetry; shutdown."""

from __future__ import annotations

import http.server
import json
import signal
import socketserver
import subprocess
import sys
import threading
import time

import av
import numpy as np
import pytest

from edgeav.bench import world
from edgeav.systems.crab.checkpoints import load_checkpoint
from edgeav.errors import MediaError, OptionError
from edgeav.media import synth
from edgeav.runtime import DEMO_CLIP, Runtime
from edgeav.systems.crab.stream import plan_window
from edgeav.stream.channel import _Channel, _Closed
from edgeav.systems.crab.stream import _rescaled
from edgeav.tasks import Event
from edgeav.systems.crab.tasks import get_task
from test_cli import _env, assert_user_error, cli


@pytest.fixture(scope="module")
def clip60(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "clip60.mp4"
    synth.write_clip(path, duration_s=60, fps=10, width=160, height=120)
    return path


@pytest.fixture(scope="module")
def demo():
    return Runtime.demo()


class Counting:
    """Counts the frames and audio windows the runtime's encoders see (the real encoders run)."""

    def __init__(self, runtime: Runtime, variant: str = "joint") -> None:
        self.frames = self.audio_windows = 0
        model = runtime.engine.variant(variant)
        encode_frames, encode_audio = model.encode_frames, model.encode_audio

        def frames(pixels):
            self.frames += pixels.shape[0]
            return encode_frames(pixels)

        def audio(fbank):
            self.audio_windows += fbank.shape[0]
            return encode_audio(fbank)

        model.encode_frames, model.encode_audio = frames, audio


# -- windows ------------------------------------------------------------------


def test_event_times_of_a_longer_window_are_spread_over_its_seconds():
    """Crab's AVE clock counts its 10 frames; over a 20-s window each frame stands for 2 s."""
    event = Event("bell", 30.0 + 2, 30.0 + 7, "audio-visual")  # frames 2..7 of the window starting at 30 s
    assert _rescaled([event], 30, 2.0) == [Event("bell", 34.0, 44.0, "audio-visual")]
    assert _rescaled([event], 30, 1.0) == [event]


def test_window_plans_follow_crab_inputs():
    ave = plan_window(get_task("ave"), 7, 10)
    assert ave.frame_seconds == tuple(range(7, 17)) and ave.audio_starts == tuple(float(t) for t in range(7, 17))
    assert (ave.first_second, ave.last_second, ave.image_second) == (7, 16, None)
    s4 = plan_window(get_task("s4"), 3, 10)  # 5 frames over 10 s: every other second, the mask on the newest
    assert s4.frame_seconds == (3, 5, 7, 9, 11) and s4.image_second == 11 and s4.ordinal == 4
    avqa = plan_window(get_task("avqa"), 20, 10)  # Crab's 2-s windows around t - 0.5, read past the window's end
    assert avqa.audio_starts[0] == 19.5 and avqa.audio_length_s == 2.0 and avqa.last_second == 30
    avss = plan_window(get_task("avss"), 4, 1)
    assert (avss.image_second, avss.audio_starts, avss.frame_seconds) == (4, (4.0,), ())


def test_sixty_second_clip_gives_51_windows_and_encodes_each_second_once(tiny_released, clip60, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    r = cli(capsys, "stream", clip60, "--task", "ave", "--stride", "1", "--checkpoint", tiny_released,
            "--max-new-tokens", "4", "--jsonl", out)
    assert r.rc == 0, r.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["start_s"] for row in rows] == [float(t) for t in range(51)]
    assert [row["end_s"] for row in rows] == [float(t + 10) for t in range(51)]
    assert "51 processed, 0 skipped" in r.out and "60 frames, 60 audio windows" in r.out

    runtime = Runtime(load_checkpoint(tiny_released))
    counting = Counting(runtime)
    windows = runtime.stream(clip60, "ave", max_new_tokens=4)
    assert len(list(windows)) == 51
    assert (counting.frames, counting.audio_windows) == (60, 60)
    assert (windows.telemetry.frames_encoded, windows.telemetry.audio_windows_encoded) == (60, 60)


def test_a_stride_encodes_only_the_seconds_windows_read(tiny_released, clip60):
    runtime = Runtime(load_checkpoint(tiny_released))
    counting = Counting(runtime, "avs")
    windows = list(runtime.stream(clip60, "s4", stride=20, max_new_tokens=2))
    assert [(w.start_s, w.frame_s) for w in windows] == [(0.0, 4.0), (20.0, 24.0), (40.0, 44.0)]
    assert (counting.frames, counting.audio_windows) == (15, 15)


@pytest.mark.parametrize("task, at", [("ave", None), ("s4", 4)])
def test_a_window_over_a_whole_clip_answers_like_run(demo, task, at):
    """The stream's first 10-s window is the offline run: the same frames, audio and therefore text."""
    reference = demo.run(DEMO_CLIP, task, at_seconds=[at] if at is not None else None)
    with demo.stream(DEMO_CLIP, task) as windows:
        first = next(windows)
    assert first.result.text == reference.text
    assert first.result.events == reference.events
    if at is not None:
        assert first.frame_s == at and first.result.masks[0].time_s == at
        assert (first.result.masks[0].mask == reference.masks[0].mask).all()


def test_an_exported_engine_streams_like_the_reference(demo, demo_engine):
    engine = Runtime.from_engine(demo_engine, threads=1)
    with engine.stream(DEMO_CLIP, "ave", window=5, stride=5) as windows:
        texts = [w.result.text for w in windows]
    with demo.stream(DEMO_CLIP, "ave", window=5, stride=5) as windows:
        assert texts == [w.result.text for w in windows] and len(texts) == 2


def test_the_demo_model_places_events_at_their_absolute_times(demo, tmp_path):
    """A 60-s world clip: a bell sounds over seconds 8-20, a horn over 34-46. Windows mostly covered by an
    event report its label over the span that event covers in source time."""
    bell, horn = world.CLASS_NAMES.index("bell"), world.CLASS_NAMES.index("horn")
    clip = world.WorldClip(duration_s=60, width=320, height=240, fps=10, seed=11, objects=(
        world.WorldObject(bell, 0.15, (0.28, 0.35), (0.3, 0.6), sounding=((8, 21),)),
        world.WorldObject(horn, 0.13, (0.72, 0.6), (0.7, 0.35), sounding=((34, 47),)),
    ))
    path = world.write_clip(clip, tmp_path / "events.mp4")
    truth = {"bell": (8, 21), "horn": (34, 47)}
    checked = good = 0
    for window in demo.stream(path, "ave"):
        for label, (start, end) in truth.items():
            lo, hi = max(start, window.start_s), min(end, window.end_s)
            if hi - lo < 5:
                continue
            checked += 1
            spans = [(e.start_s, e.end_s) for e in window.result.events if e.label == label]
            assert all(window.start_s <= s < e <= window.end_s for s, e in spans), (window.start_s, spans)
            good += any(_iou((s, e), (lo, hi)) >= 0.5 for s, e in spans)
    assert checked == 28
    assert good / checked >= 0.8, f"{good} of {checked} windows place the event"


def _iou(a, b) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


# -- live behaviour -------------------------------------------------------------


def test_a_live_stream_skips_windows_when_the_model_is_slow(tiny_released, tmp_path):
    """--realtime: the decoder keeps the source's pace; a model slower than the stride loses windows,
    counts them, and still answers the newest."""
    path = tmp_path / "clip.mp4"
    synth.write_clip(path, duration_s=8, fps=10, width=160, height=120)
    runtime = Runtime(load_checkpoint(tiny_released))
    answer = runtime.pipeline.answer

    def slow_answer(*args, **kwargs):
        time.sleep(2.5)  # a device slower than real time: 2.5 s per 1-s stride
        return answer(*args, **kwargs)

    runtime.pipeline.answer = slow_answer
    windows = runtime.stream(path, "ave", window=2, max_new_tokens=2, realtime=True)
    starts = [w.start_s for w in windows]
    telemetry = windows.telemetry
    assert telemetry.windows_processed + telemetry.windows_skipped == 7
    assert telemetry.windows_skipped >= 2 and starts[-1] == 6.0 and starts == sorted(starts)
    assert telemetry.media_s == 8.0 and telemetry.segments_dropped == 0


def test_a_file_is_processed_completely_however_slow_the_model(tiny_released, tmp_path):
    path = tmp_path / "clip.mp4"
    synth.write_clip(path, duration_s=6, fps=10, width=160, height=120)
    runtime = Runtime(load_checkpoint(tiny_released))
    answer = runtime.pipeline.answer
    runtime.pipeline.answer = lambda *a, **k: (time.sleep(0.3), answer(*a, **k))[1]
    windows = runtime.stream(path, "ave", window=2, max_new_tokens=2)
    assert [w.start_s for w in windows] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert windows.telemetry.windows_skipped == 0


def test_live_channels_drop_the_oldest_and_file_channels_wait():
    live = _Channel(1, drop_oldest=True)
    assert live.put("a") is None and live.put("b") == "a"
    assert live.get() == "b"
    file = _Channel(1, drop_oldest=False)
    file.put("a")
    waited = threading.Event()

    def producer():
        file.put("b")
        waited.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not waited.wait(0.2)  # full: the producer waits
    assert file.get() == "a"
    thread.join(5)
    assert waited.is_set() and file.get() == "b"
    file.close()
    with pytest.raises(_Closed):
        file.get()


def _mpegts(src, dst) -> bytes:
    with av.open(str(src)) as i, av.open(str(dst), "w", format="mpegts") as o:
        streams = {s.index: o.add_stream_from_template(s) for s in i.streams}
        for packet in i.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                o.mux(packet)
    return dst.read_bytes()


def test_a_dropped_live_url_is_reconnected_and_the_gap_reported(tiny_released, tmp_path):
    """An HTTP MPEG-TS stream (no length: live) that breaks off after half, then plays whole once,
    then refuses: two stretches of windows, a gap between them, and a final gap after the retries."""
    synth.write_clip(tmp_path / "live.mkv", duration_s=8, fps=10, width=160, height=120)
    data = _mpegts(tmp_path / "live.mkv", tmp_path / "live.ts")
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # no Content-Length: the body ends when the connection closes

        def do_GET(self):
            requests.append(self.path)
            if len(requests) > 2:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.end_headers()
            self.wfile.write(data if len(requests) == 2 else data[: len(data) // 2])

        def log_message(self, *args):
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/live.ts"
        runtime = Runtime(load_checkpoint(tiny_released))
        windows = runtime.stream(url, "ave", window=2, max_new_tokens=2, reconnect=2, reconnect_backoff_s=0.05)
        results = list(windows)
    finally:
        server.shutdown()
    gaps = windows.telemetry.gaps
    assert windows.live and len(gaps) == 2, gaps
    assert "reconnected after 1 attempt" in gaps[0].reason and "gave up after 2" in gaps[1].reason
    assert 2 <= gaps[0].start_s <= 5 and gaps[0].end_s > gaps[0].start_s
    assert gaps[0] in [g for w in results for g in w.gaps]
    after = [w for w in results if w.start_s >= gaps[0].end_s]
    assert after and all(w.end_s <= gaps[1].start_s for w in results)
    assert [w.start_s for w in results] == sorted(w.start_s for w in results)


# -- push sessions ----------------------------------------------------------------


def test_push_session_fed_from_one_thread_and_read_from_another(tiny_released):
    runtime = Runtime(load_checkpoint(tiny_released))
    session = runtime.push_session("ave", window=3, max_new_tokens=2)
    clip = world.sample_clip(seed=5, kind="ave", duration_s=8)
    received, errors = [], []

    def camera():
        try:
            for i in range(8 * 10):  # 10 fps video, 0.1-s audio chunks, a little faster than real time
                t = i / 10
                session.push_video(world.render_frame(clip, t), t)
                session.push_audio(world.render_audio(clip, i * 1600, 1600), 16000, t)
                time.sleep(0.01)
            session.close()
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def reader():
        received.extend(session.results(timeout_s=60))

    threads = [threading.Thread(target=camera), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    telemetry = session.telemetry
    starts = [w.start_s for w in received]
    assert starts == sorted(set(starts)) and starts[-1] == 5.0  # the newest window is never the one dropped
    assert telemetry.windows_processed == len(received)
    assert telemetry.windows_processed + telemetry.windows_skipped == 6
    assert all(w.end_s - w.start_s == 3 and w.result.task == "ave" for w in received)
    assert session.telemetry.frames_encoded == 8


def test_push_session_rejects_bad_media(tiny_released):
    runtime = Runtime(load_checkpoint(tiny_released))
    with runtime.push_session("ave", window=2) as session:
        with pytest.raises(OptionError, match="uint8"):
            session.push_video(np.zeros((4, 4), np.float32), 0.0)
        with pytest.raises(OptionError, match="sample_rate"):
            session.push_audio(np.zeros(10, np.float32), 0, 0.0)


# -- the API and the command line ---------------------------------------------------


def _stage_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("edgeav-")]


def test_nothing_runs_until_the_stream_is_iterated(tiny_released, tmp_path):
    runtime = Runtime(load_checkpoint(tiny_released))
    windows = runtime.stream(tmp_path / "missing.mp4", "ave")
    assert not _stage_threads()
    with pytest.raises(MediaError, match="no such file"):
        next(windows)


def test_leaving_a_loop_early_stops_the_threads(tiny_released, clip60):
    runtime = Runtime(load_checkpoint(tiny_released))
    for window in runtime.stream(clip60, "ave", max_new_tokens=2):
        break
    assert window.start_s == 0.0 and not _stage_threads()


@pytest.mark.parametrize("options, message", [
    (dict(window=0), "--window 0"),
    (dict(stride=0), "--stride 0"),
    (dict(question="why?"), "takes no --question"),
])
def test_bad_stream_options(tiny_released, options, message):
    runtime = Runtime(load_checkpoint(tiny_released))
    with pytest.raises(OptionError, match=message):
        runtime.stream(DEMO_CLIP, "ave", **options)


@pytest.mark.parametrize("args, needle", [
    (["--window", "0"], "--window"),
    (["--jsonl", "/nonexistent-folder/out.jsonl"], "does not exist"),
    (["--task", "avqa"], "question"),
])
def test_stream_cli_bad_options(capsys, args, needle):
    assert_user_error(cli(capsys, "stream", DEMO_CLIP, *args), needle)


def test_stream_cli_refuses_a_source_shorter_than_the_window(capsys, tmp_path):
    path = tmp_path / "short.mp4"
    synth.write_clip(path, duration_s=3, fps=10, width=160, height=120)
    assert_user_error(cli(capsys, "stream", path, "--jsonl", tmp_path / "o.jsonl"), "shorter than one 10-s window")


def test_stream_cli_prints_a_line_per_window_and_the_telemetry(capsys, tiny_released):
    r = cli(capsys, "stream", DEMO_CLIP, "--window", "8", "--stride", "2", "--checkpoint", tiny_released,
            "--max-new-tokens", "3")
    assert r.rc == 0, r.err
    lines = [line for line in r.out.splitlines() if " s  " in line and "ms)" in line]
    assert [float(line.split("-")[0]) for line in lines] == [0.0, 2.0]
    assert "2 processed, 0 skipped" in r.out and "real-time factor" in r.out
    for stage in ("decode", "visual", "audio", "prefill", "window"):
        assert any(line.split()[:1] == [stage] for line in r.out.splitlines()), stage


@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_signals_stop_the_stream_cleanly(tmp_path, sig, rc):
    """--realtime over a 40-s clip, stopped once the first window is written: what was written stays,
    the summary prints, no traceback."""
    path = tmp_path / "long.mp4"
    synth.write_clip(path, duration_s=40, fps=10, width=160, height=120)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "edgeav", "stream", str(path), "--window", "2", "--realtime",
                             "--max-new-tokens", "3", "--jsonl", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == rc, stderr
    assert "Traceback" not in stderr and f"stopped by {sig.name}" in stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and "processed" in stdout
    assert len(rows) < 39  # it stopped early
