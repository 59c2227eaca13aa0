"""Media commands: ``probe`` (a source's streams and segments) and ``make-clip`` (a generated test clip)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgeav.cli.common import app, media_progress
from edgeav.media.segment import POLICIES

if TYPE_CHECKING:
    from edgeav.media import MediaInfo, Segment

Policy = Enum("Policy", {name: name for name in POLICIES}, type=str)


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
    from edgeav.media import open_source

    with open_source(source, audio_only=audio_only) as src:
        info = src.info
        if not as_json:
            print("\n".join(_describe(info, policy.value)))
            print(f"{'segment':>7} {'start_s':>8} {'end_s':>8} {'frames':>6} {'audio_rms':>10}")
        rows = []
        with media_progress(info.duration_s, "probing") as advance:
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
    from edgeav.media import synth

    spec = synth.write_clip(out, duration_s=duration, fps=fps, width=width, height=height, audio=audio, seed=seed)
    print(f"wrote {out} ({spec.duration_s:.1f} s, {spec.width}x{spec.height}, {spec.fps:g} fps, audio {'on' if spec.audio else 'off'})")
