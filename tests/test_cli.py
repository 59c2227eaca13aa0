"""Command-line tests: ``edgeav probe`` / ``--version`` / ``make-clip`` / ``run``.

The product rule checked here: bad input (missing path, directory, empty file,
text renamed .mp4, truncated mp4, audio-only file without --audio-only, unknown
option or value, missing argument, ...) ends with exit code 2 and exactly ONE
line on stderr that names the input, with no Python traceback; output already
printed to stdout is kept.

Most cases call ``edgeav.cli.main`` in process (fast); a few run the real
console script / ``python -m edgeav`` in a subprocess so the real exit codes
and stderr are checked. All media is generated with ``edgeav.media.synth``.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import av
import numpy as np
import pytest

import edgeav
from edgeav.cli import main
from edgeav.media import synth

SMALL = dict(width=160, height=120)
# A segment row of `probe` text output: index, start_s, end_s, frames, audio_rms.
PROBE_ROW = re.compile(r"^\s*(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+)\s+(\d+\.\d+)\s*$")
SEGMENT_KEYS = {"index", "start_s", "end_s", "n_frames", "audio_rms"}


# -- helpers -----------------------------------------------------------------


@dataclasses.dataclass
class Result:
    rc: int
    out: str
    err: str


def cli(capsys, *args) -> Result:
    """Run ``edgeav ARGS`` in process; an escaping exception counts as a traceback (rc 1)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # click turns EPIPE into sys.exit(1)
        rc = e.code if isinstance(e.code, int) else 1
    except Exception:
        rc = 1
        sys.stderr.write(traceback.format_exc())
    out, err = capsys.readouterr()
    return Result(rc, out, err)


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONIOENCODING", None)
    env.update(extra)
    return env


def proc(*args, timeout: float = 120, env: dict | None = None, cwd=None) -> Result:
    """Run ``python -m edgeav ARGS`` in a subprocess (args may be bytes: raw file names)."""
    cmd = [sys.executable, "-m", "edgeav", *[a if isinstance(a, bytes) else str(a) for a in args]]
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env or _env(), cwd=cwd)
    return Result(r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace"))


def assert_user_error(r: Result, *needles: str, rc: int = 2) -> str:
    """Exit code ``rc``, one non-empty stderr line holding every needle, no traceback."""
    assert "Traceback" not in r.err, f"traceback on stderr:\n{r.err}"
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr must be exactly one line, got {r.err!r}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not named in {lines[0]!r}"
    assert r.rc == rc, f"exit code {r.rc}, expected {rc}; stderr {r.err!r}"
    return lines[0]


def probe_rows(out: str) -> list[tuple]:
    return [m.groups() for m in map(PROBE_ROW.match, out.splitlines()) if m]


def _remux(src: Path, dst: Path, **options) -> None:
    """Copy the packets of ``src`` into ``dst`` (e.g. with movflags=faststart)."""
    with av.open(str(src)) as i, av.open(str(dst), "w", options=options) as o:
        streams = {s.index: o.add_stream_from_template(s) for s in i.streams}
        for packet in i.demux():
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            o.mux(packet)


def _cut(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


# -- generated media (shared by the whole module) ----------------------------


class Media:
    pass


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Media:
    d = tmp_path_factory.mktemp("media")
    m = Media()
    m.dir = d
    # The one 10-s 25 fps clip with audio (tone in odd seconds).
    m.clip10 = d / "clip10.mp4"
    m.spec10 = synth.write_clip(m.clip10, duration_s=10.0, fps=25.0, **SMALL)
    # 3-s clip: moov atom at the end (as written), and a faststart remux.
    m.small = d / "small.mp4"
    synth.write_clip(m.small, duration_s=3.0, **SMALL)
    m.faststart = d / "faststart.mp4"
    _remux(m.small, m.faststart, movflags="faststart")
    assert m.faststart.read_bytes().find(b"moov") < m.faststart.read_bytes().find(b"mdat")
    assert m.small.read_bytes().find(b"moov") > m.small.read_bytes().find(b"mdat")
    m.half = _cut(m.small, d / "half.mp4")
    m.fs_half = _cut(m.faststart, d / "faststart_half.mp4")
    m.header_only = _cut(m.small, d / "header_only.mp4", 100 / m.small.stat().st_size)
    # The middle of the mdat overwritten with (deterministic) garbage.
    data = bytearray(m.small.read_bytes())
    at = len(data) // 3
    data[at : at + 8000] = np.random.default_rng(0).bytes(8000)
    m.garbled = d / "garbled.mp4"
    m.garbled.write_bytes(bytes(data))
    # Audio only, video only, one frame.
    m.wav = d / "sound.wav"
    synth.write_clip(m.wav, duration_s=3.0)
    m.wav_half = _cut(m.wav, d / "sound_half.wav")
    m.video_only = d / "video_only.mp4"
    synth.write_clip(m.video_only, duration_s=2.0, audio=False, **SMALL)
    m.one_frame = d / "one_frame.mp4"
    synth.write_clip(m.one_frame, duration_s=0.04, **SMALL)
    # Other containers, cut in half.
    m.mkv = d / "clip.mkv"
    synth.write_clip(m.mkv, duration_s=3.0, **SMALL)
    m.mkv_half = _cut(m.mkv, d / "clip_half.mkv")
    m.avi = d / "clip.avi"
    synth.write_clip(m.avi, duration_s=3.0, **SMALL)
    m.avi_half = _cut(m.avi, d / "clip_half.avi")
    # Not media at all.
    m.text = d / "notes.mp4"
    m.text.write_text("this is a text file renamed .mp4\n")
    m.empty = d / "empty.mp4"
    m.empty.write_bytes(b"")
    m.random = d / "random.mp4"
    m.random.write_bytes(np.random.default_rng(1).bytes(50_000))
    m.folder = d / "somefolder"
    m.folder.mkdir()
    m.folder_mp4 = d / "folder.mp4"
    m.folder_mp4.mkdir()
    return m


@pytest.fixture(scope="module")
def http_server(media):
    """A loopback HTTP server over the media folder (no Range support, like many simple servers)."""
    handler = functools.partial(_QuietHandler, directory=str(media.dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# -- --version ---------------------------------------------------------------


def test_version_console_script():
    script = Path(sys.executable).with_name("edgeav")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "edgeav"]
    r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"edgeav {edgeav.__version__}"
    assert r.stderr == ""


# -- probe: good input -------------------------------------------------------


@pytest.mark.parametrize("policy", ["clip", "stream"])
def test_probe_json_10s_clip(media, capsys, policy):
    r = cli(capsys, "probe", media.clip10, "--json", "--policy", policy)
    assert r.rc == 0, r.err
    assert "Traceback" not in r.err
    doc = json.loads(r.out)
    assert {"source", "duration_s", "has_audio", "segments"} <= doc.keys()
    assert doc["source"] == str(media.clip10)
    assert doc["duration_s"] == pytest.approx(10.0, abs=0.05)
    assert doc["has_audio"] is True
    segments = doc["segments"]
    assert len(segments) == 10
    for k, seg in enumerate(segments):
        assert SEGMENT_KEYS <= seg.keys()
        assert seg["index"] == k
        assert seg["start_s"] == pytest.approx(k)
        assert seg["end_s"] == pytest.approx(k + 1)
        assert seg["audio_rms"] == pytest.approx(synth.expected_rms(media.spec10, k), abs=0.03), f"second {k}"
    # The default clip: silence in even seconds, a 0.5-amplitude tone in odd ones.
    assert [seg["audio_rms"] > 0.2 for seg in segments] == [k % 2 == 1 for k in range(10)]
    frames = [seg["n_frames"] for seg in segments]
    if policy == "stream":
        assert frames == [1] * 10  # the first frame of each second
    else:
        assert sum(frames) == 10  # Crab's 10 frames spread over the clip


@pytest.mark.parametrize("policy", ["clip", "stream"])
def test_probe_text_one_line_per_segment(media, capsys, policy):
    r = cli(capsys, "probe", media.clip10, "--policy", policy)
    assert r.rc == 0, r.err
    rows = probe_rows(r.out)
    assert [int(row[0]) for row in rows] == list(range(10))
    for k, row in enumerate(rows):
        assert float(row[1]) == pytest.approx(k) and float(row[2]) == pytest.approx(k + 1)
        assert float(row[4]) == pytest.approx(synth.expected_rms(media.spec10, k), abs=0.03)
    assert f"policy     {policy}" in r.out
    assert "10 segments" in r.out
    assert r.err == ""


def test_probe_json_subprocess(media):
    r = proc("probe", media.small, "--json")
    assert r.rc == 0, r.err
    assert "Traceback" not in r.err
    doc = json.loads(r.out)
    assert len(doc["segments"]) == 3
    assert doc["info"]["video"]["width"] == 160


def test_probe_faststart_clip(media, capsys):
    r = cli(capsys, "probe", media.faststart, "--json")
    assert r.rc == 0, r.err
    assert len(json.loads(r.out)["segments"]) == 3


def test_probe_wav_audio_only(media, capsys):
    r = cli(capsys, "probe", media.wav, "--audio-only", "--json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["has_audio"] is True
    assert [s["n_frames"] for s in doc["segments"]] == [0, 0, 0]
    assert [s["audio_rms"] > 0.2 for s in doc["segments"]] == [False, True, False]


def test_probe_video_file_audio_only(media, capsys):
    r = cli(capsys, "probe", media.small, "--audio-only", "--json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["info"]["video"] is None
    assert [s["n_frames"] for s in doc["segments"]] == [0, 0, 0]


def test_probe_video_only_file(media, capsys):
    r = cli(capsys, "probe", media.video_only, "--json")
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["has_audio"] is False
    assert len(doc["segments"]) == 2
    assert all(s["audio_rms"] == 0 for s in doc["segments"])
    assert sum(s["n_frames"] for s in doc["segments"]) == 10


@pytest.mark.parametrize("policy", ["clip", "stream"])
def test_probe_one_frame_video(media, capsys, policy):
    r = cli(capsys, "probe", media.one_frame, "--json", "--policy", policy)
    assert r.rc == 0, r.err
    segments = json.loads(r.out)["segments"]
    assert len(segments) == 1
    assert segments[0]["n_frames"] >= 1


def test_probe_garbled_middle_is_not_silent(media, capsys):
    """Garbage over the middle of an mp4: either a clean error, or a result that says packets were skipped."""
    r = cli(capsys, "probe", media.garbled, "--json")
    assert "Traceback" not in r.err
    if r.rc == 0:
        doc = json.loads(r.out)
        assert doc["corrupt_packets"] > 0, "damaged file read as if it were intact"
        assert len(doc["segments"]) == 3
    else:
        assert_user_error(r, media.garbled.name)


# -- probe / run: bad input --------------------------------------------------

# (id, argv after `edgeav`, what the stderr line must name); "{x}" is filled from the media fixture.
BAD_INPUT = [
    ("missing-path", ["probe", "{dir}/nope.mp4"], "nope.mp4"),
    ("directory", ["probe", "{folder}"], "somefolder"),
    ("directory-named-mp4", ["probe", "{folder_mp4}"], "folder.mp4"),
    ("zero-bytes", ["probe", "{empty}"], "empty.mp4"),
    ("text-renamed-mp4", ["probe", "{text}"], "notes.mp4"),
    ("random-bytes", ["probe", "{random}"], "random.mp4"),
    ("header-only-mp4", ["probe", "{header_only}"], "header_only.mp4"),
    ("truncated-mp4-moov-at-end", ["probe", "{half}"], "half.mp4"),
    ("truncated-mp4-moov-at-end-json", ["probe", "{half}", "--json"], "half.mp4"),
    ("truncated-mp4-faststart", ["probe", "{fs_half}"], "faststart_half.mp4"),
    ("truncated-mp4-faststart-stream", ["probe", "{fs_half}", "--policy", "stream"], "faststart_half.mp4"),
    ("truncated-mp4-faststart-json", ["probe", "{fs_half}", "--json"], "faststart_half.mp4"),
    ("truncated-mkv", ["probe", "{mkv_half}"], "clip_half.mkv"),
    ("wav-without-audio-only", ["probe", "{wav}"], "sound.wav"),
    ("unknown-policy", ["probe", "{small}", "--policy", "bogus"], "--policy"),
    ("empty-policy", ["probe", "{small}", "--policy", ""], "--policy"),
    ("policy-without-value", ["probe", "{small}", "--policy"], "--policy"),
    ("unknown-option", ["probe", "{small}", "--bogus"], "--bogus"),
    ("missing-argument", ["probe"], "source"),
    ("extra-argument", ["probe", "{small}", "{dir}/other.mp4"], "other.mp4"),
    ("unknown-command", ["bogus-command"], "bogus-command"),
    ("dev-null", ["probe", "/dev/null"], "/dev/null"),
    ("file-url", ["probe", "file:///nonexistent/x.mp4"], "x.mp4"),
    ("url-refused-http", ["probe", "http://127.0.0.1:9/x.mp4"], "http://127.0.0.1:9/x.mp4"),
    ("url-refused-stream", ["probe", "http://127.0.0.1:9/x.mp4", "--policy", "stream"], "127.0.0.1:9"),
    ("url-refused-rtsp", ["probe", "rtsp://127.0.0.1:9/live"], "rtsp://127.0.0.1:9/live"),
    ("url-unknown-scheme", ["probe", "ftp://127.0.0.1:9/x.mp4"], "ftp://127.0.0.1:9/x.mp4"),
    ("run-missing-path", ["run", "{dir}/nope.mp4"], "nope.mp4"),
    ("run-text-renamed-mp4", ["run", "{text}"], "notes.mp4"),
    ("run-wav", ["run", "{wav}"], "sound.wav"),
    ("run-truncated-faststart", ["run", "{fs_half}"], "faststart_half.mp4"),
    ("run-unknown-policy", ["run", "{small}", "--policy", "nope"], "--policy"),
    ("run-unknown-option", ["run", "--bogus"], "--bogus"),
    ("run-url-refused", ["run", "http://127.0.0.1:9/x.mp4"], "127.0.0.1:9"),
]


def _fill(args: list[str], media: Media) -> list[str]:
    values = {k: str(v) for k, v in vars(media).items() if isinstance(v, Path)}
    return [a.format(**values) for a in args]


@pytest.mark.parametrize("args, needle", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_in_process(media, capsys, args, needle):
    assert_user_error(cli(capsys, *_fill(args, media)), needle)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["probe", "{text}"], "notes.mp4"),
        (["probe", "{small}", "--policy", "strem"], "--policy"),
    ],
    ids=["text-renamed-mp4", "unknown-policy"],
)
def test_bad_input_subprocess(media, args, needle):
    assert_user_error(proc(*_fill(args, media)), needle)


def test_unknown_policy_suggests_close_match(media, capsys):
    line = assert_user_error(cli(capsys, "probe", media.small, "--policy", "strem"), "--policy")
    assert "did you mean 'stream'" in line.lower()


def test_truncated_faststart_keeps_printed_segments(media):
    """The segments read before the truncation is found stay on stdout (real process, real pipes)."""
    r = proc("probe", media.fs_half)
    assert_user_error(r, "faststart_half.mp4")
    assert "truncated" in r.err
    rows = probe_rows(r.out)
    assert rows and int(rows[0][0]) == 0
    assert r.out.startswith("source ")


def test_fifo_is_rejected(tmp_path, capsys):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)

    def unblock():  # should opening the FIFO block (no writer), end it after 10 s instead of hanging
        time.sleep(10)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    threading.Thread(target=unblock, daemon=True).start()
    assert_user_error(cli(capsys, "probe", fifo), "pipe.mp4")


# -- URLs on a loopback HTTP server ------------------------------------------


def test_http_faststart_clip_works(media, http_server, capsys):
    r = cli(capsys, "probe", f"{http_server}/faststart.mp4", "--json")
    assert r.rc == 0, r.err
    assert len(json.loads(r.out)["segments"]) == 3


@pytest.mark.parametrize(
    "name", ["missing.mp4", "notes.mp4", "small.mp4"], ids=["404", "text", "moov-at-end-no-range-support"]
)
def test_http_bad_source(media, http_server, name, capsys):
    # small.mp4 has its moov atom at the end and this server cannot seek back to
    # the media data: a clean error (exit 2, one line) is what counts here.
    assert_user_error(cli(capsys, "probe", f"{http_server}/{name}"), name)


# -- make-clip ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".wav"])
def test_make_clip_then_probe(tmp_path, capsys, suffix):
    out = tmp_path / f"made{suffix}"
    r = cli(capsys, "make-clip", out, "--duration", "2", "--width", "160", "--height", "120")
    assert r.rc == 0, r.err
    assert out.is_file() and out.stat().st_size > 0
    assert str(out) in r.out and len(r.out.splitlines()) == 1
    extra = ["--audio-only"] if suffix == ".wav" else []
    r = cli(capsys, "probe", out, "--json", *extra)
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert len(doc["segments"]) == 2
    assert doc["has_audio"] is True
    assert [s["audio_rms"] > 0.2 for s in doc["segments"]] == [False, True]
    if suffix != ".wav":
        assert doc["info"]["video"]["width"] == 160 and doc["info"]["video"]["height"] == 120


def test_make_clip_no_audio_seed(tmp_path, capsys):
    out = tmp_path / "quiet.mp4"
    r = cli(capsys, "make-clip", out, "--duration", "1", "--width", "16", "--height", "16", "--no-audio", "--seed", "-5")
    assert r.rc == 0, r.err
    r = cli(capsys, "probe", out, "--json")
    assert r.rc == 0, r.err
    assert json.loads(r.out)["has_audio"] is False


MAKE_CLIP_BAD = [
    ("unknown-suffix", ["{tmp}/clip.xyz"], "clip.xyz"),
    ("no-suffix", ["{tmp}/clip"], "clip"),
    ("missing-folder", ["{tmp}/no/such/folder/clip.mp4"], "clip.mp4"),
    ("parent-is-a-file", ["{tmp}/file.txt/clip.mp4"], "clip.mp4"),
    ("negative-duration", ["{tmp}/c.mp4", "--duration", "-1"], "--duration"),
    ("zero-duration", ["{tmp}/c.mp4", "--duration", "0"], "--duration"),
    ("nan-duration", ["{tmp}/c.mp4", "--duration", "nan"], "--duration"),
    ("inf-duration", ["{tmp}/c.mp4", "--duration", "inf"], "--duration"),
    ("huge-duration", ["{tmp}/c.mp4", "--duration", "1e12"], "--duration"),
    ("zero-fps", ["{tmp}/c.mp4", "--fps", "0"], "--fps"),
    ("negative-fps", ["{tmp}/c.mp4", "--fps", "-25"], "--fps"),
    ("width-too-small", ["{tmp}/c.mp4", "--width", "15"], "--width"),
    ("negative-height", ["{tmp}/c.mp4", "--height", "-240"], "--height"),
    ("huge-width", ["{tmp}/c.mp4", "--width", "99999999", "--height", "99999999", "--duration", "1"], "--width"),
    ("odd-width", ["{tmp}/c.mp4", "--width", "17", "--height", "16", "--duration", "1"], "17"),
    ("non-numeric-width", ["{tmp}/c.mp4", "--width", "abc"], "--width"),
    ("wav-without-audio", ["{tmp}/c.wav", "--no-audio", "--duration", "1"], "c.wav"),
    ("missing-argument", [], "out"),
    ("option-without-value", ["{tmp}/c.mp4", "--duration"], "--duration"),
]


@pytest.mark.parametrize("args, needle", [c[1:] for c in MAKE_CLIP_BAD], ids=[c[0] for c in MAKE_CLIP_BAD])
def test_make_clip_bad_input(tmp_path, capsys, args, needle):
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli(capsys, "make-clip", *[a.format(tmp=tmp_path) for a in args])
    assert_user_error(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a failed make-clip left files behind"


def test_make_clip_huge_fps_subprocess(tmp_path):
    # A huge frame rate must be refused up front, not attempted (1e8 frames).
    assert_user_error(proc("make-clip", tmp_path / "c.mp4", "--fps", "1e9", "--duration", "0.1", timeout=60), "--fps")


# -- run ---------------------------------------------------------------------


def test_run_demo_clip(capsys):
    """The README's first command: no source, no checkpoint: the demo model on the bundled clip."""
    r = cli(capsys, "run", "--max-new-tokens", "40")
    assert r.rc == 0, r.err
    lines = dict(line.split(None, 1) for line in r.out.splitlines() if line.strip())
    assert "demo model" in lines["model"] and "bundled demo clip" in lines["source"]
    assert lines["task"] == "ave" and "prefill" in lines["timings"]


def test_run_file_json(media, capsys):
    r = cli(capsys, "run", media.small, "--task", "avvp", "--json", "--max-new-tokens", "3")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    assert result["task"] == "avvp" and result["source"] == str(media.small)
    assert {"text", "events", "box", "answer", "masks", "timings_ms"} <= result.keys()


# -- stdout going away -------------------------------------------------------


def test_stdout_closed_early_by_head(media):
    """`edgeav probe CLIP | head -1`: the first line arrives, no traceback on stderr."""
    if shutil.which("head") is None or shutil.which("bash") is None:
        pytest.skip("needs bash and head")
    script = '"$PY" -m edgeav probe "$CLIP" 2>"$ERR" | head -1; echo "rc=${PIPESTATUS[0]}"'
    err = media.dir / "head.err"
    r = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120,
        env=_env(PY=sys.executable, CLIP=str(media.clip10), ERR=str(err)),
    )
    lines = r.stdout.splitlines()
    assert lines[0] == f"source     {media.clip10}"
    stderr = err.read_text()
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_stdout_closed_exit_code(media):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: EPIPE for certain
    try:
        r = subprocess.run(
            [sys.executable, "-m", "edgeav", "probe", str(media.small)],
            stdout=write_end, stderr=subprocess.PIPE, timeout=120, env=_env(),
        )
    finally:
        os.close(write_end)
    assert b"Traceback" not in r.stderr
    assert r.returncode in (0, 141, -13), (r.returncode, r.stderr)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_full_device(media):
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "edgeav", "probe", str(media.small)],
            stdout=full, stderr=subprocess.PIPE, timeout=120, env=_env(),
        )
    err = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and r.returncode != 0


# -- odd file names ----------------------------------------------------------


@pytest.fixture(scope="module")
def non_utf8_names(media):
    """Raw (non-UTF-8) file names: a valid clip and a text file."""
    folder = os.fsencode(media.dir)
    good, bad = folder + b"/good\xff\xfe.mp4", folder + b"/bad\xff.mp4"
    try:
        shutil.copyfile(os.fsencode(media.small), good)
        shutil.copyfile(os.fsencode(media.text), bad)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    return good, bad, None


def test_non_utf8_name_bad_input(non_utf8_names):
    # A subprocess: the real stderr escapes what cannot be encoded (pytest's capture would not).
    _, bad, _ = non_utf8_names
    assert_user_error(proc("probe", bad), "bad")


def test_non_utf8_name_json(non_utf8_names, capsys):
    good, _, _ = non_utf8_names
    r = cli(capsys, "probe", os.fsdecode(good), "--json")
    assert r.rc == 0, r.err
    assert len(json.loads(r.out)["segments"]) == 3


def test_non_utf8_name_text_strict_stdout(non_utf8_names):
    good, _, _ = non_utf8_names
    r = proc("probe", good, env=_env(PYTHONIOENCODING="utf-8:strict"))
    assert "Traceback" not in r.err, r.err
    assert r.rc == 0
    assert len(probe_rows(r.out)) == 3


def test_newline_in_missing_name(tmp_path, capsys):
    assert_user_error(cli(capsys, "probe", tmp_path / "two\nlines.mp4"), "lines.mp4")


# -- cases that once broke ----------------------------------------------------


def test_no_arguments(capsys):
    r = cli(capsys)
    line = assert_user_error(r, "edgeav")
    message = line.replace("(see 'edgeav --help')", "").replace("edgeav:", "").strip()
    assert message, f"the stderr line names no problem: {line!r}"


def test_make_clip_onto_directory(tmp_path, capsys):
    (tmp_path / "target.mp4").mkdir()
    r = cli(capsys, "make-clip", tmp_path / "target.mp4", "--duration", "0.5", "--width", "16", "--height", "16")
    assert_user_error(r, "target.mp4")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (not writable, even as root)")
def test_make_clip_unwritable_folder(capsys):
    r = cli(capsys, "make-clip", "/proc/edgeav-test.mp4", "--duration", "0.5", "--width", "16", "--height", "16")
    assert_user_error(r, "edgeav-test.mp4")


def test_truncated_avi(media, capsys):
    assert_user_error(cli(capsys, "probe", media.avi_half), "clip_half.avi")


def test_truncated_wav_audio_only(media, capsys):
    assert_user_error(cli(capsys, "probe", media.wav_half, "--audio-only"), "sound_half.wav")


# -- honest outputs: JSON, overlays, notes, stream lines (issue 12, section 3) ------------------------


def test_run_json_is_the_results_to_dict(media, capsys, monkeypatch):
    """The printed JSON is ``Result.to_dict()`` as is: the CLI adds nothing (model and source are the result's)."""
    from edgeav.runtime import Runtime

    results = []
    real_run = Runtime.run

    def recording_run(self, *args, **kwargs):  # the real run; only its result is kept to compare
        results.append(real_run(self, *args, **kwargs))
        return results[-1]

    monkeypatch.setattr(Runtime, "run", recording_run)
    r = cli(capsys, "run", media.small, "--task", "ave", "--json", "--max-new-tokens", "4")
    assert r.rc == 0, r.err
    (result,) = results
    assert json.loads(r.out) == json.loads(json.dumps(result.to_dict()))
    assert result.to_dict()["source"] == str(media.small) and "demo model" in result.to_dict()["model"]


def test_run_says_when_the_token_limit_cut_the_answer(capsys):
    r = cli(capsys, "run", "--max-new-tokens", "3")
    assert r.rc == 0, r.err
    assert "note       the answer was cut at 3 new tokens (--max-new-tokens) before the model ended it" in r.out


def test_run_overlay_writes_the_frame_with_the_mask(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "overlay.png"
    r = cli(capsys, "run", "--task", "s4", "--at", "1", "--overlay", png, "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    assert [m["time_s"] for m in result["masks"]] == [1.0]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (320, 240)  # the demo clip's own size
        painted = np.asarray(image.convert("RGB"))
    from edgeav.runtime import DEMO_CLIP

    with av.open(str(DEMO_CLIP)) as container:
        frame = next(f for f in container.decode(video=0) if f.time >= 1.0).to_ndarray(format="rgb24")
    changed = np.any(painted != frame, axis=-1)
    assert 0 < changed.mean() < 0.9  # painted where the mask is, the frame elsewhere
    folder = tmp_path / "overlays"
    r = cli(capsys, "run", "--task", "arig", "--overlay", folder)
    assert r.rc == 0, r.err
    assert [p.name for p in folder.iterdir()] == ["overlay_000.00s.png"]
    assert f"overlay    {folder / 'overlay_000.00s.png'}" in r.out


@pytest.mark.parametrize("args, needle", [
    (["--task", "ave", "--overlay", "{tmp}/x.png"], "task 'ave' has none"),
    (["--task", "s4", "--overlay", "{tmp}/x.jpg"], ".png"),
    (["--task", "s4", "--overlay", "{tmp}/missing/x.png"], "does not exist"),
])
def test_run_bad_overlay_is_refused_before_the_model_loads(tmp_path, capsys, args, needle):
    r = cli(capsys, "run", *[a.format(tmp=tmp_path) for a in args])
    assert_user_error(r, "--overlay", needle)
    assert r.out == ""


def test_run_on_an_audio_file_suggests_what_run_takes(media, capsys):
    line = assert_user_error(cli(capsys, "run", media.wav), "sound.wav")
    assert "give the video, or an image or a folder of frames with --audio" in line
    assert "edgeav probe --audio-only" in line  # the one command that reads audio alone


def test_stream_jsonl_still_prints_the_window_lines_and_quiet_silences_them(media, tmp_path, capsys):
    window_line = re.compile(r"^\s*\d+\.\d-\s*\d+\.\d s  ")
    jsonl = tmp_path / "windows.jsonl"
    r = cli(capsys, "stream", media.small, "--window", "2", "--max-new-tokens", "3", "--jsonl", jsonl)
    assert r.rc == 0, r.err
    printed = [line for line in r.out.splitlines() if window_line.match(line)]
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(printed) == len(written) == 2
    assert all(not {"model", "source"} & set(row) for row in written)  # said once, in the header lines
    r = cli(capsys, "stream", media.small, "--window", "2", "--max-new-tokens", "3", "--jsonl", jsonl, "--quiet")
    assert r.rc == 0, r.err
    assert not any(window_line.match(line) for line in r.out.splitlines())
    assert "windows    2 processed" in r.out and len(jsonl.read_text().splitlines()) == 2


# -- issue 12: --out, and what run prints -----------------------------------------------


def test_run_out_on_a_task_without_masks_is_refused_before_the_model_loads(tmp_path, capsys):
    r = cli(capsys, "run", "--task", "ave", "--out", tmp_path / "masks", "--checkpoint", tmp_path / "no-model")
    line = assert_user_error(r, "--out saves masks", "task 'ave' makes none", "s4")
    assert "no-model" not in line and r.out == "" and not (tmp_path / "masks").exists()


def test_run_out_and_overlay_on_one_path_are_refused_up_front(tmp_path, capsys):
    same = tmp_path / "pictures"
    r = cli(capsys, "run", "--task", "s4", "--out", same, "--overlay", same, "--checkpoint", tmp_path / "no-model")
    line = assert_user_error(r, "--out and --overlay name the same path")
    assert "no-model" not in line and r.out == ""


def test_run_says_a_mask_was_not_saved_because_of_the_error_when_out_was_given(tmp_path, capsys):
    out = tmp_path / "masks"
    (out / "mask_001.00s.png").mkdir(parents=True)  # a folder where the mask file goes: saving fails
    r = cli(capsys, "run", "--task", "s4", "--at", "1", "--out", out)
    assert_user_error(r, "cannot write masks")
    mask_lines = [line for line in r.out.splitlines() if line.startswith("mask ")]
    assert mask_lines and all(line.endswith("not saved (see the error below)") for line in mask_lines), r.out
    assert "--out DIR" not in r.out


def test_run_prints_control_characters_in_names_escaped(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "in\ta"
    folder.mkdir()
    image = folder / "frame\n\x1b[31m.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(image)
    out, overlay = tmp_path / "out\nmasks", tmp_path / "over\rlay"
    r = cli(capsys, "run", image, "--task", "s4", "--silent-audio", "--out", out, "--overlay", overlay)
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    labels = ("model", "source", "task", "text", "object", "mask", "overlay", "note", "timings")
    assert all(line.split(" ", 1)[0] in labels for line in lines), lines  # a raw newline would start a stray line
    assert "\x1b" not in r.out and "\r" not in r.out and "\t" not in r.out
    assert f"source     {tmp_path}/in\\ta/frame\\n\\x1b[31m.png" in lines
    assert any(line.startswith("note       ") and "frame\\n\\x1b[31m.png is one image" in line for line in lines)
    assert any(line.startswith("overlay    ") and "over\\rlay" in line for line in lines)
    masks = [line for line in lines if line.startswith("mask ")]
    assert masks and all("out\\nmasks" in line for line in masks), masks


def test_stream_out_on_a_task_without_masks_is_refused_before_the_model_loads(tmp_path, capsys):
    r = cli(capsys, "stream", tmp_path / "missing.mp4", "--task", "ave", "--out", tmp_path / "masks")
    assert_user_error(r, "--out saves masks", "task 'ave' makes none")
    assert r.out == ""
