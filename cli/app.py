"""The ``edgeav`` command line: parses options, calls the library, prints results."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

import edgeav
from edgeav.media import MediaInfo, Segment, open_source
from edgeav.media import synth

app = typer.Typer(
    name="edgeav",
    help="Run Crab-family audio-visual LLMs on the edge.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)


class Policy(str, Enum):
    clip = "clip"
    stream = "stream"


def _version(value: bool) -> None:
    if value:
        print(f"edgeav {edgeav.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Run Crab-family audio-visual LLMs on the edge."""


@contextlib.contextmanager
def _progress(total_s: float | None, label: str, enabled: bool) -> Iterator:
    """A progress bar over seconds of media on stderr, shown only on a terminal."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not (enabled and stderr.is_terminal),
    )
    with progress:
        task = progress.add_task(label, total=total_s or None)
        yield lambda seconds: progress.update(task, completed=seconds)


def _describe(info: MediaInfo, policy: str) -> list[str]:
    duration = f"{info.duration_s:.2f} s" if info.duration_s is not None else "live / unknown length"
    lines = [f"source     {info.source}", f"container  {info.container}, {duration}"]
    if info.video:
        v = info.video
        fps = f"{v.fps:.2f} fps" if v.fps else "unknown fps"
        frames = f", {v.n_frames} frames" if v.n_frames else ""
        lines.append(f"video      {v.codec} {v.width}x{v.height} {fps}{frames}")
    else:
        lines.append("video      none")
    if info.audio:
        a = info.audio
        lines.append(f"audio      {a.codec} {a.sample_rate} Hz, {a.channels} ch (read as 16 kHz mono)")
    else:
        lines.append("audio      none (segments carry silence)")
    lines.append(f"policy     {policy}")
    return lines


def _segment_row(segment: Segment) -> dict:
    return {
        "index": segment.index,
        "start_s": segment.start_s,
        "end_s": segment.end_s,
        "n_frames": segment.n_frames,
        "audio_rms": round(segment.audio_rms, 6),
    }


@app.command()
def probe(
    source: str = typer.Argument(..., help="Media file or URL (http, https, rtsp, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
    policy: Policy = typer.Option(Policy.clip, "--policy", help="Frame sampling: clip (Crab's 10 frames per clip) or stream (one frame per second)."),
    audio_only: bool = typer.Option(False, "--audio-only", help="Read only the audio track (allows audio files)."),
) -> None:
    """Show a source's streams and its per-second segments."""
    with open_source(source, audio_only=audio_only) as src:
        info = src.info
        if not as_json:
            print("\n".join(_describe(info, policy.value)))
            print(f"{'segment':>7} {'start_s':>8} {'end_s':>8} {'frames':>6} {'audio_rms':>10}")
        rows = []
        with _progress(info.duration_s, "probing", enabled=True) as advance:
            for segment in src.segments(policy.value):
                row = _segment_row(segment)
                rows.append(row)
                advance(segment.end_s)
                if not as_json:
                    print(f"{row['index']:>7} {row['start_s']:>8.2f} {row['end_s']:>8.2f} {row['n_frames']:>6} {row['audio_rms']:>10.4f}", flush=True)
        if as_json:
            document = {
                "source": info.source,
                "duration_s": info.duration_s,
                "has_audio": info.has_audio,
                "segments": rows,
                "info": info.to_dict(),
                "policy": policy.value,
                "corrupt_packets": src.stats.corrupt_packets,
            }
            print(json.dumps(document, indent=2))
        else:
            print(f"{len(rows)} segments, {src.stats.corrupt_packets} corrupt packets skipped")


@app.command("make-clip")
def make_clip(
    out: Path = typer.Argument(..., help="Output file; the suffix picks the container (.mp4 .mkv .webm .avi .mov .wav)."),
    duration: float = typer.Option(10.0, "--duration", min=0.1, max=7200.0, help="Seconds."),
    fps: float = typer.Option(25.0, "--fps", min=1.0, max=240.0, help="Frames per second."),
    width: int = typer.Option(320, "--width", min=16, max=7680, help="Frame width in pixels."),
    height: int = typer.Option(240, "--height", min=16, max=4320, help="Frame height in pixels."),
    audio: bool = typer.Option(True, "--audio/--no-audio", help="Include the audio track (a tone every other second)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the noise and VFR timing."),
) -> None:
    """Write a generated test clip: moving shapes and tones at known times."""
    spec = synth.write_clip(out, duration_s=duration, fps=fps, width=width, height=height, audio=audio, seed=seed)
    print(f"wrote {out} ({spec.duration_s:.1f} s, {spec.width}x{spec.height}, {spec.fps:g} fps, audio {'on' if spec.audio else 'off'})")


@app.command()
def run(
    source: Optional[str] = typer.Argument(None, help="Media file or URL; omitted: a generated demo clip."),
    policy: Policy = typer.Option(Policy.clip, "--policy", help="Frame sampling: clip or stream."),
) -> None:
    """Run the pipeline on a source. No model exists yet: this decodes the source
    into per-second segments and preprocesses them (CLIP pixels, BEATs fbank)."""
    from edgeav.preprocess import clip_pixels, crab_fbank

    with contextlib.ExitStack() as stack:
        if source is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="edgeav-demo-"))
            source = str(Path(folder) / "demo.mp4")
            synth.write_clip(source)
            stderr.print("no SOURCE given: using a generated 10-s demo clip (a tone every other second)")
        src = stack.enter_context(open_source(source))
        print("\n".join(_describe(src.info, policy.value)))
        print(f"{'segment':>7} {'start_s':>8} {'frames':>6} {'pixels':>18} {'fbank':>10} {'audio_rms':>10}")
        n = 0
        with _progress(src.info.duration_s, "running", enabled=True) as advance:
            for segment in src.segments(policy.value, frame_size=(224, 224)):
                pixels = clip_pixels(segment.frames) if segment.n_frames else None
                fbank = crab_fbank(segment.audio)
                shape = "x".join(map(str, pixels.shape)) if pixels is not None else "-"
                print(f"{segment.index:>7} {segment.start_s:>8.2f} {segment.n_frames:>6} {shape:>18} "
                      f"{'x'.join(map(str, fbank.shape)):>10} {segment.audio_rms:>10.4f}", flush=True)
                advance(segment.end_s)
                n += 1
        print(f"{n} segments preprocessed; model inference is not available yet in this version")
