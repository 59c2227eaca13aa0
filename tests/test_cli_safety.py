"""The command line under attack: outputs, --threads, Ctrl-C, start-up cost.

- Outputs (``run --out``, ``stream --jsonl``) are checked before the model loads, without creating or
  emptying anything; an existing ``--jsonl`` file is emptied only once the source gave a window; mask
  PNGs are written whole (temporary file + rename) with the usual mode; what was computed is printed
  even when saving it fails, then the one-line error (exit 2).
- ``--threads`` has an upper bound.
- Ctrl-C at any point of start-up prints ``edgeav: interrupted`` and exits 130, no traceback; a
  second Ctrl-C ends the process even when the first one's clean-up hangs.
- ``--version`` and ``--help`` import neither torch nor onnx nor onnxruntime.

Permission checks need a process that file permissions apply to: as root, those commands run without
the capabilities that override them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import edgeav
from edgeav.engines import MAX_THREADS
from edgeav.media import synth
from edgeav.outputs import atomic_path, usual_file_mode, usual_folder_mode

from conftest import faststart_copy
from test_cli import Result, assert_user_error, cli

HEAVY = ("torch", "onnx", "onnxruntime")
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 5-s clip, and a 12-s clip cut to 40 % whose header (at the front) still claims 12 s."""
    folder = tmp_path_factory.mktemp("world")
    synth.write_clip(folder / "clip.mp4", duration_s=5, width=160, height=120)
    long = folder / "long.mp4"
    synth.write_clip(folder / "raw.mp4", duration_s=12, width=160, height=120)
    faststart_copy(folder / "raw.mp4", long)
    data = long.read_bytes()
    (folder / "cut.mp4").write_bytes(data[: int(len(data) * 0.4)])  # the index (moov) comes first, so it opens
    return folder


def _drop_permission_override() -> None:
    """In the child before exec: root keeps its uid but loses the capabilities that ignore file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def with_permissions(*args, timeout: float = 120) -> Result:
    """``python -m edgeav ARGS`` in a process that file permissions apply to, even when we are root."""
    root = os.geteuid() == 0
    if root and not sys.platform.startswith("linux"):
        pytest.skip("root ignores file permissions here")
    try:
        r = subprocess.run([sys.executable, "-m", "edgeav", *map(str, args)], capture_output=True, timeout=timeout,
                           preexec_fn=_drop_permission_override if root else None)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot drop root's permission override here ({e})")
    return Result(r.returncode, r.stdout.decode(), r.stderr.decode())


def read_only_folder(parent: Path) -> Path:
    folder = parent / f"locked-{os.urandom(3).hex()}"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# -- start-up ----------------------------------------------------------------------------------------


def test_version_and_help_do_not_import_the_model_stack():
    code = textwrap.dedent(f"""
        import sys
        import edgeav.cli.app
        from edgeav.cli import main
        assert main(["--version"]) == 0
        assert main(["--help"]) == 0
        assert main(["run", "--help"]) == 0
        loaded = [name for name in {HEAVY!r} if name in sys.modules]
        assert not loaded, loaded
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "edgeav " in r.stdout and "Usage" in r.stdout


def test_version_loads_neither_typer_nor_the_media_stack():
    code = textwrap.dedent(f"""
        import sys
        from edgeav.cli import main
        assert main(["--version"]) == 0
        loaded = [name for name in ("typer", "numpy", "av", "safetensors", *{HEAVY!r}) if name in sys.modules]
        assert not loaded, loaded
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"edgeav {edgeav.__version__}"


def test_help_loads_no_decoder():
    code = textwrap.dedent("""
        import sys
        from edgeav.cli import main
        assert main(["--help"]) == 0 and main(["probe", "--help"]) == 0
        loaded = [name for name in ("av", "safetensors", "PIL") if name in sys.modules]
        assert not loaded, loaded
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_help_lists_the_commands():
    r = subprocess.run([sys.executable, "-m", "edgeav", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for command in ("probe", "run", "stream", "export", "info", "eval", "bench", "synth", "convert"):
        assert f" {command} " in r.stdout, command


# -- --threads -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["100000", str(MAX_THREADS + 1), "0"])
def test_threads_out_of_range_is_one_line(world, capsys, value):
    bound = "1" if value == "0" else str(MAX_THREADS)
    for command in (["run", world / "clip.mp4"], ["stream", world / "clip.mp4"], ["eval"], ["bench"]):
        assert_user_error(cli(capsys, *command, "--threads", value), "--threads", bound)


# -- run --out ------------------------------------------------------------------------------------------


def test_unwritable_out_is_refused_before_the_model_loads(world):
    locked = read_only_folder(world)
    # A checkpoint that does not exist: had the model loaded first, the error would name it instead.
    for out in (locked, locked / "new"):
        r = with_permissions("run", world / "clip.mp4", "--task", "s4", "--out", out, "--checkpoint", world / "no-ckpt")
        assert_user_error(r, str(out), "--out", "writable")
    assert list(locked.iterdir()) == []


def test_unwritable_bench_outputs_are_refused_before_the_benchmark_runs(world):
    """One error line and nothing else on stderr: had a row run, its progress lines would precede it."""
    locked = read_only_folder(world)
    for option, name in (("--json", "bench.json"), ("--plot", "bench.png")):
        r = with_permissions("bench", "--formats", "torch", "--precisions", "fp32", option, locked / name)
        assert_user_error(r, name, option, "writable")
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_outputs_the_mode_bits_allow_but_the_filesystem_refuses_are_refused_up_front():
    """/proc says writable to os.access (for root) but makes no file: the checks try for real, so --out
    /proc/m and --overlay /proc/x.png are refused before a model loads, not after the inference."""
    from edgeav.errors import OptionError
    from edgeav.outputs import check_output_file, check_output_folder

    for check, path in ((check_output_folder, "/proc/m"), (check_output_folder, "/proc"),
                        (check_output_file, "/proc/x.png")):
        with pytest.raises(OptionError, match="cannot be|not writable") as refused:
            check(path, "--out")
        assert path in str(refused.value) and "\n" not in str(refused.value)


def test_output_checks_leave_nothing_behind_and_refuse_empty_paths(tmp_path):
    from edgeav.errors import OptionError
    from edgeav.outputs import check_output_file, check_output_folder, nonempty_path

    assert check_output_folder(tmp_path, "--out") == tmp_path
    assert check_output_folder(tmp_path / "new", "--out") == tmp_path / "new"
    assert check_output_file(tmp_path / "o.png", "--overlay") == tmp_path / "o.png"
    assert list(tmp_path.iterdir()) == []  # the probes are gone, and nothing was made
    for check, option in ((check_output_folder, "--out"), (check_output_file, "--overlay")):
        for empty in ("", "  "):
            with pytest.raises(OptionError, match=f"{option} is empty; give a file or folder name"):
                check(empty, option)
    # Typer turns "" into Path("."), the current folder: the option's parser sees the text first.
    with pytest.raises(OptionError, match="--out is empty"):
        nonempty_path("--out")("")
    assert nonempty_path("--out")("masks") == Path("masks")


def test_out_that_is_a_file_is_refused(world, tmp_path, capsys):
    target = tmp_path / "masks"
    target.write_text("mine")
    assert_user_error(cli(capsys, "run", world / "clip.mp4", "--task", "s4", "--out", target), "--out", "file")
    assert target.read_text() == "mine"


def test_masks_are_written_whole_and_a_failed_save_still_prints_the_result(world, tmp_path, capsys):
    """Masks land whole with the usual mode. When saving fails (a folder sits where the PNG goes), the
    result is printed all the same, then one error line, exit 2, and no temporary file is left."""
    first = cli(capsys, "run", world / "clip.mp4", "--task", "s4", "--at", "1", "--out", tmp_path / "a", "--json")
    assert first.rc == 0, first.err
    paths = [Path(mask["path"]) for mask in json.loads(first.out)["masks"]]
    assert len(paths) == 1 and paths[0].parent == tmp_path / "a" and paths[0].is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(paths[0].stat().st_mode) == 0o666 & ~umask
    assert list((tmp_path / "a").iterdir()) == paths  # no temporary file left beside it

    out = tmp_path / "b"
    (out / paths[0].name).mkdir(parents=True)
    r = cli(capsys, "run", world / "clip.mp4", "--task", "s4", "--at", "1", "--out", out)
    assert_user_error(r, str(out), "cannot write masks")
    assert "task       s4" in r.out and "mask       1 s:" in r.out
    assert [p.name for p in out.iterdir()] == [paths[0].name]
    r = cli(capsys, "run", world / "clip.mp4", "--task", "s4", "--at", "1", "--out", out, "--json")
    assert_user_error(r, "cannot write masks")
    assert json.loads(r.out)["task"] == "s4"


def test_usual_modes_are_those_open_and_mkdir_give(tmp_path):
    """Files and folders made private by their tools (mkstemp, mkdtemp, safetensors) are given these."""
    old = os.umask(0o027)
    try:
        (tmp_path / "made.bin").touch()
        (tmp_path / "made").mkdir()
        file_mode, folder_mode = usual_file_mode(), usual_folder_mode()
    finally:
        os.umask(old)
    assert file_mode == stat.S_IMODE((tmp_path / "made.bin").stat().st_mode) == 0o640
    assert folder_mode == stat.S_IMODE((tmp_path / "made").stat().st_mode) == 0o750


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="no /proc: the umask is read once, at import")
def test_usual_file_mode_reads_the_umask_without_setting_it(monkeypatch):
    """Setting the umask to read it would, for that instant, give files other threads create mode 0666."""
    def refuse(*_):
        raise AssertionError("os.umask was called")

    monkeypatch.setattr(os, "umask", refuse)
    assert usual_file_mode() & 0o600 == 0o600 and usual_folder_mode() & 0o700 == 0o700


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("the writer died")
    assert target.read_text() == "old"
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary.suffix == ".json"
        temporary.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


# -- stream --jsonl ---------------------------------------------------------------------------------------


def test_jsonl_is_untouched_when_the_source_fails_before_a_window(world, tmp_path, capsys):
    jsonl = tmp_path / "windows.jsonl"
    jsonl.write_text("yesterday\n")
    r = cli(capsys, "stream", world / "cut.mp4", "--jsonl", jsonl)
    assert_user_error(r, "cut.mp4")
    assert jsonl.read_text() == "yesterday\n"


def test_jsonl_is_replaced_once_windows_come(world, tmp_path, capsys):
    jsonl = tmp_path / "windows.jsonl"
    jsonl.write_text("yesterday\n")
    r = cli(capsys, "stream", world / "clip.mp4", "--window", "3", "--stride", "2", "--jsonl", jsonl)
    assert r.rc == 0, r.err
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 2
    assert [json.loads(line)["start_s"] for line in lines] == [0, 2]


def test_unwritable_jsonl_is_refused_before_the_model_loads(world):
    locked = read_only_folder(world)
    r = with_permissions("stream", world / "clip.mp4", "--window", "3", "--jsonl", locked / "w.jsonl",
                "--checkpoint", world / "no-ckpt")
    assert_user_error(r, "w.jsonl", "--jsonl", "writable")
    assert list(locked.iterdir()) == []
    kept = world / f"kept-{os.urandom(3).hex()}.jsonl"
    kept.write_text("yesterday\n")
    kept.chmod(0o444)
    r = with_permissions("stream", world / "clip.mp4", "--window", "3", "--jsonl", kept, "--checkpoint", world / "no-ckpt")
    assert_user_error(r, kept.name, "--jsonl")
    assert kept.read_text() == "yesterday\n"


# -- Ctrl-C --------------------------------------------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen:
    # SIGINT back to its default: a test run started in the background inherits it ignored.
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_torch(process: subprocess.Popen, limit_s: float = 120) -> None:
    """Until torch's library is mapped into ``process``: it is then importing the model stack."""
    maps = Path(f"/proc/{process.pid}/maps")
    if not maps.exists():
        time.sleep(3)  # no /proc: give it a moment to get into start-up
        return
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and process.poll() is None:
        if "libtorch" in maps.read_text(errors="replace"):
            return
        time.sleep(0.02)
    pytest.fail(f"the process never loaded torch (exit {process.poll()})")


@pytest.mark.parametrize("presses, after_s", [(1, 0.0), (2, 0.0), (1, 1.5)],
                         ids=["while-importing", "twice", "while-building-the-model"])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(presses, after_s):
    """Whenever it lands in start-up (the whole run takes several seconds), Ctrl-C is one line, exit 130."""
    process = _spawn(sys.executable, "-m", "edgeav", "run", "--preset", "crab-small", "--random-weights")
    _wait_for_torch(process)
    time.sleep(after_s)
    for _ in range(presses):
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
    out, err = process.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert err.split() == ["edgeav:", "interrupted"], err
    assert process.returncode == 130
    assert out == ""


def test_ctrl_c_inside_exec_of_source_text_still_exits_130(tmp_path):
    """``python -m`` dies by SIGINT (-2) when a KeyboardInterrupt once escaped an ``exec`` of text, even
    a handled one; torch's and dataclasses' start-up run such ``exec``s, so Ctrl-C could land in one."""
    (tmp_path / "interrupted_in_exec.py").write_text(textwrap.dedent("""
        import edgeav.cli as cli

        def command(argv):
            exec("import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nwhile True: pass")

        cli._main = command
        cli.entry()
    """))
    done = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.stderr.split() == ["edgeav:", "interrupted"], done.stderr
    assert done.returncode == 130


def test_second_ctrl_c_ends_a_hanging_clean_up():
    """A command whose clean-up after Ctrl-C never ends (the test's stand-in for a slow one): the second
    Ctrl-C ends the process."""
    script = textwrap.dedent("""
        import sys, time
        from edgeav.cli import main
        from edgeav.cli.app import app

        @app.command("hang")
        def hang() -> None:
            try:
                print("ready", flush=True)
                time.sleep(600)
            finally:
                print("cleaning up", flush=True)
                time.sleep(600)

        sys.exit(main(["hang"]))
    """)
    process = _spawn(sys.executable, "-c", script)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGINT)
    assert process.stdout.readline() == "cleaning up\n"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip() == "edgeav: interrupted" and "Traceback" not in err


def test_second_ctrl_c_ends_a_graceful_stop_that_takes_long():
    """``stream`` stops gracefully on the first Ctrl-C (the window in flight finishes); the second exits."""
    script = textwrap.dedent("""
        import signal, time
        from edgeav.cli import second_interrupt_forces_exit

        signal.signal(signal.SIGINT, lambda signum, frame: print("stopping", flush=True))  # a slow graceful stop
        second_interrupt_forces_exit()
        print("ready", flush=True)
        time.sleep(600)
    """)
    process = _spawn(sys.executable, "-c", script)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGINT)
    assert process.stdout.readline() == "stopping\n"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip() == "edgeav: interrupted"


@pytest.mark.parametrize("option", ["--out", "--overlay"])
def test_an_empty_output_path_is_refused_and_writes_nothing(option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_user_error(cli(capsys, "run", "--task", "s4", option, ""), f"{option} is empty")
    assert list(tmp_path.iterdir()) == []
