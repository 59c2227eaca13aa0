"""The ``edgeav`` command line: parses options, calls the library, prints results."""

from __future__ import annotations

import contextlib
import json
import shutil
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

import edgeav
from edgeav.bench.roofline import DEVICES as PROJECTION_DEVICES
from edgeav.config import PRESETS
from edgeav.engines import MAX_THREADS
from edgeav.engines.manifest import FORMATS, PRECISIONS, precision_help
from edgeav.outputs import atomic_path, check_output_file, check_output_folder
# Torch-free modules only up here: --version and --help must not wait for torch, onnx or onnxruntime.
from edgeav.sampling import SAMPLING_PRESETS
from edgeav.media import POLICIES, MediaInfo, Segment, open_source
from edgeav.media import synth
from edgeav.tasks import TASKS

app = typer.Typer(
    name="edgeav",
    help="Run Crab-family audio-visual LLMs on the edge.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True, soft_wrap=True)


Policy = Enum("Policy", {name: name for name in POLICIES}, type=str)


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
def _progress(total_s: float | None, label: str) -> Iterator:
    """A progress bar over seconds of media on stderr, shown only on a terminal."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
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
        with _progress(info.duration_s, "probing") as advance:
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


TaskName = Enum("TaskName", {name: name for name in TASKS}, type=str)
SamplingName = Enum("SamplingName", {name: name for name in SAMPLING_PRESETS}, type=str)
PresetName = Enum("PresetName", {name: name for name in PRESETS}, type=str)
ProjectName = Enum("ProjectName", {name: name for name in PROJECTION_DEVICES}, type=str)
DEFAULT_PRESET = "crab-tiny"


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DType = Enum("DType", {name: name for name in TORCH_DTYPES}, type=str)

# Options that run and stream share.
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="Crab checkpoint folder (released or converted); default: the demo model.")]
EngineOpt = Annotated[Optional[Path], typer.Option("--engine", help="Engine directory from `edgeav export` (instead of a checkpoint).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, max=MAX_THREADS, help="ONNX Runtime threads for --engine (default: one per core).")]
PresetOpt = Annotated[Optional[PresetName], typer.Option("--preset", help="Model preset (with --random-weights, or to check a checkpoint).")]
RandomWeightsOpt = Annotated[bool, typer.Option("--random-weights", help="Random weights of --preset, built in memory.")]
QuestionOpt = Annotated[Optional[str], typer.Option("--question", help="The question (avqa, ask).")]
ExpressionOpt = Annotated[Optional[str], typer.Option("--expression", help="The referring expression (refavs).")]
SamplingOpt = Annotated[SamplingName, typer.Option("--sampling", help="greedy, or crab (temperature 0.6, top-p 0.9, seed 42).")]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Cap on generated tokens (default: the task's).")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Weights and compute precision (Crab's scripts run fp32).")]
TorchDevice = Enum("TorchDevice", {name: name for name in ("cpu", "cuda")}, type=str)
DeviceOpt = Annotated[TorchDevice, typer.Option("--device", help="Where the PyTorch engine runs; cuda: fp16/bf16 with --dtype, the decode step as a CUDA graph.")]
LLMWeights = Enum("LLMWeights", {name: name for name in ("int8", "int4")}, type=str)
AudioOpt = Annotated[Optional[Path], typer.Option("--audio", help="Audio file heard instead of SOURCE's own track (AVSBench's audio.wav, AVE's .mp3).")]
FpsOpt = Annotated[Optional[float], typer.Option("--fps", help="Frames per second of a folder of frames (default 1).")]
SilentAudioOpt = Annotated[bool, typer.Option("--silent-audio", help="The model hears silence: lets an image or frames run without --audio; drops a video's own track.")]
LLMWeightsOpt = Annotated[Optional[LLMWeights], typer.Option("--llm-weights", help="Store the LLM's projections weight-only quantized (PyTorch engine; the I-LoRA stays exact).")]


def _load_runtime(checkpoint: Optional[Path], preset: Optional[PresetName], random_weights: bool, dtype: DType,
                  engine: Optional[Path] = None, threads: Optional[int] = None,
                  llm_weights: Optional[LLMWeights] = None, device: TorchDevice = TorchDevice.cpu):
    import torch

    from edgeav.runtime import Runtime

    if engine is not None:
        if checkpoint is not None or preset is not None or random_weights:
            raise edgeav.OptionError("--engine runs an exported engine; drop --checkpoint, --preset and --random-weights")
        if dtype != DType.fp32 or llm_weights is not None or device != TorchDevice.cpu:
            raise edgeav.OptionError("--dtype, --llm-weights and --device apply to the PyTorch reference; an "
                                     "engine's precision is fixed at export (edgeav export --precision) and it "
                                     "runs on the CPU")
        with _status(f"loading {engine}"):
            return Runtime.from_engine(engine, threads=threads)
    if threads is not None:
        raise edgeav.OptionError("--threads applies to --engine (ONNX Runtime); set torch's with OMP_NUM_THREADS")
    if device == TorchDevice.cuda and not torch.cuda.is_available():
        raise edgeav.OptionError(f"--device cuda: torch {torch.__version__} sees no CUDA device; install a CUDA "
                                 "build of torch on a machine with an NVIDIA GPU, or drop --device")
    options = {"device": device.value, "dtype": getattr(torch, TORCH_DTYPES[dtype.value]),
               "llm_weights": llm_weights.value if llm_weights is not None else None}
    if checkpoint is not None:
        if random_weights:
            raise edgeav.OptionError("--random-weights and --checkpoint exclude each other; pass one")
        with _status(f"loading {checkpoint}"):
            return Runtime.from_checkpoint(checkpoint, preset=preset.value if preset else None, **options)
    if preset is None and not random_weights:
        with _status("loading the demo model"):
            return Runtime.demo(**options)
    name = preset.value if preset else DEFAULT_PRESET
    if not random_weights:
        raise edgeav.OptionError(f"--preset {name} has no weights of its own; add --random-weights or pass --checkpoint")
    with _status(f"building {name} with random weights"):
        return Runtime.from_preset(name, random_weights=True, **options)


def _model_line(runtime, checkpoint: Optional[Path], random_weights: bool, engine: Optional[Path] = None) -> str:
    if random_weights:
        return f"{runtime.source}: random weights, the text is noise"
    return runtime.source if checkpoint or engine else f"{runtime.source} (no --checkpoint given)"


@contextlib.contextmanager
def _status(message: str) -> Iterator:
    if stderr.is_terminal:
        with stderr.status(message):
            yield
    else:
        yield


def _print_result(result, model: str, source: str, overlays: list[Path] = ()) -> None:
    print(f"model      {model}")
    print(f"source     {source}")
    print(f"task       {result.task}")
    print(f"text       {result.text!r}")
    for event in result.events:
        print(f"event      {event.label}: {event.start_s:g}-{event.end_s:g} s ({event.modality})")
    if result.box is not None:
        print(f"box        {', '.join(f'{v:.1f}' for v in result.box)} (source pixels)")
    if result.answer is not None:
        print(f"answer     {result.answer}")
    if result.object_label is not None:
        print(f"object     {result.object_label}")
    for mask in result.masks:
        where = mask.path or "not saved (pass --out DIR)"
        print(f"mask       {mask.time_s:g} s: {int(mask.mask.astype(bool).sum())} pixels, {where}")
    for path in overlays:
        print(f"overlay    {path}")
    for note in result.notes:
        print(f"note       {note}")
    print("timings    " + ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items()))


def _check_overlay(overlay: Path, task: str) -> None:
    """``--overlay``: a task that draws (a box or masks) and a writable .png file or folder."""
    from edgeav.tasks import TASKS

    drawn = [name for name, spec in TASKS.items() if spec.image_frame]
    if not TASKS[task].image_frame:
        raise edgeav.OptionError(f"--overlay draws masks and boxes; task {task!r} has none (use it with "
                                 f"{', '.join(drawn)})")
    if overlay.suffix.lower() == ".png":
        check_output_file(overlay, "--overlay")
    elif overlay.suffix:
        raise edgeav.OptionError(f"{overlay}: --overlay writes PNG; give a .png file or a folder")
    else:
        check_output_folder(overlay, "--overlay")


@app.command()
def run(
    source: Optional[str] = typer.Argument(None, help="Media file or URL; omitted: the bundled demo clip."),
    task: TaskName = typer.Option("ave", "--task", help="What to ask the model."),
    checkpoint: CheckpointOpt = None,
    engine: EngineOpt = None,
    threads: ThreadsOpt = None,
    preset: PresetOpt = None,
    random_weights: RandomWeightsOpt = False,
    question: QuestionOpt = None,
    expression: ExpressionOpt = None,
    at: Optional[list[int]] = typer.Option(None, "--at", min=0, help="Second whose frame a mask task segments (repeatable) or ARIG grounds."),
    audio: AudioOpt = None,
    fps: FpsOpt = None,
    silent_audio: SilentAudioOpt = False,
    sampling: SamplingOpt = SamplingName.greedy,
    max_new_tokens: MaxNewTokensOpt = None,
    dtype: DTypeOpt = DType.fp32,
    llm_weights: LLMWeightsOpt = None,
    device: DeviceOpt = TorchDevice.cpu,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for mask PNGs (at the source's size)."),
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Write the frame with the mask painted and the box drawn: a .png file (frames side by side) or a folder (one PNG per frame)."),
) -> None:
    """Run a Crab task on a clip (a video, an image, or a folder of frames): events, boxes, answers or masks."""
    from edgeav.runtime import check_run_options
    from edgeav.tasks import get_task

    # Everything cheap to check is checked before the model loads.
    check_run_options(get_task(task.value), question=question, expression=expression,
                      max_new_tokens=max_new_tokens, at_seconds=at)
    from edgeav.inputs import check_inputs

    check_inputs(source, audio=audio, fps=fps, silent_audio=silent_audio)
    if out is not None:
        check_output_folder(out, "--out")
    if overlay is not None:
        _check_overlay(overlay, task.value)
    runtime = _load_runtime(checkpoint, preset, random_weights, dtype, engine, threads, llm_weights, device)
    from edgeav.runtime import DEMO_CLIP

    model = _model_line(runtime, checkpoint, random_weights, engine)
    shown_source = source
    if source is None:
        if not DEMO_CLIP.is_file():
            raise edgeav.OptionError(f"{DEMO_CLIP}: the bundled demo clip is missing; pass a SOURCE")
        source, shown_source = str(DEMO_CLIP), f"{DEMO_CLIP} (the bundled demo clip)"
    with _status(f"running {task.value}"):
        result = runtime.run(source, task.value, question=question, expression=expression, sampling=sampling.value,
                             max_new_tokens=max_new_tokens, at_seconds=at, audio=audio, fps=fps,
                             silent_audio=silent_audio)
    save_error, overlays = None, []
    try:
        if out is not None and result.masks:
            result.save_masks(out)
        if overlay is not None:
            overlays = result.save_overlay(overlay)
    except edgeav.EdgeavError as e:
        save_error = e  # what was computed is printed first, then the one-line error
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_result(result, model, shown_source, overlays)
    if save_error is not None:
        raise save_error


def _window_line(window) -> str:
    """One line for a window result: its span, what the task found, its latency."""
    result = window.result
    found = [f"{e.label} {e.start_s:g}-{e.end_s:g} s" + ("" if e.modality == "audio-visual" else f" ({e.modality})")
             for e in result.events]
    if result.box is not None:
        found.append(f"{result.object_label or 'box'} at {', '.join(f'{v:.0f}' for v in result.box)}")
    if result.answer is not None:
        found.append(f"answer: {result.answer}")
    found += [f"mask at {m.time_s:g} s: {int(m.mask.astype(bool).sum())} px" for m in result.masks]
    if not found:
        found.append(repr(result.text[:80]))
    gaps = "".join(f" [gap {g.start_s:g}-{g.end_s:g} s: {g.reason}]" for g in window.gaps)
    return (f"{window.start_s:6.1f}-{window.end_s:6.1f} s  {'; '.join(found)}  "
            f"({window.timings_ms['latency']:.0f} ms){gaps}")


def _open_jsonl(path: Path):
    try:
        return path.open("w", encoding="utf-8")
    except OSError as e:
        raise edgeav.OptionError(f"{path}: cannot write it ({e.strerror}); pick a writable --jsonl") from None


def _print_telemetry(telemetry, skipped_hint: bool) -> None:
    t = telemetry.to_dict()
    rtf = t["real_time_factor"]
    print(f"windows    {t['windows_processed']} processed, {t['windows_skipped']} skipped"
          + (" (the model fell behind the live source, or its media was missing)"
             if skipped_hint and t["windows_skipped"] else ""))
    print(f"media      {t['media_s']:.1f} s in {t['wall_s']:.1f} s; real-time factor "
          f"{'n/a' if rtf is None else f'{rtf:.3f}'} (model compute per second of media)")
    print(f"encoded    {t['frames_encoded']} frames, {t['audio_windows_encoded']} audio windows")
    if t["segments_dropped"]:
        print(f"dropped    {t['segments_dropped']} seconds the encoder could not take in time")
    for gap in telemetry.gaps:
        print(f"gap        {gap.start_s:g}-{gap.end_s:g} s: {gap.reason}")
    print(f"memory     peak RSS {t['peak_rss_mb']:.0f} MiB")
    print(f"{'stage':<14} {'count':>6} {'p50 ms':>9} {'p95 ms':>9}")
    for name, stats in t["stages"].items():
        if stats["count"]:
            print(f"{name:<14} {stats['count']:>6} {stats['p50_ms']:>9.1f} {stats['p95_ms']:>9.1f}")


@app.command()
def stream(
    source: str = typer.Argument(..., help="Media file, image, folder of frames, or live URL (rtsp://, http://, ...)."),
    task: TaskName = typer.Option("ave", "--task", help="What to ask the model about each window."),
    window: Optional[int] = typer.Option(None, "--window", help="Window length in seconds (default: the task's Crab clip length, 10 s for ave)."),
    stride: int = typer.Option(1, "--stride", help="Seconds between windows."),
    checkpoint: CheckpointOpt = None,
    engine: EngineOpt = None,
    threads: ThreadsOpt = None,
    preset: PresetOpt = None,
    random_weights: RandomWeightsOpt = False,
    question: QuestionOpt = None,
    expression: ExpressionOpt = None,
    sampling: SamplingOpt = SamplingName.greedy,
    max_new_tokens: MaxNewTokensOpt = None,
    dtype: DTypeOpt = DType.fp32,
    llm_weights: LLMWeightsOpt = None,
    device: DeviceOpt = TorchDevice.cpu,
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="Also write one JSON line per window to this file (flushed per line)."),
    quiet: bool = typer.Option(False, "--quiet", help="Print no line per window (the summary still prints; a progress bar shows on a terminal)."),
    realtime: bool = typer.Option(False, "--realtime", help="Pace a file at its own speed, as if it were live (windows are skipped when the model falls behind)."),
    reconnect: int = typer.Option(5, "--reconnect", min=0, help="Times a dropped live URL is reopened in a row (backoff 0.5 s, doubling)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for mask PNGs (at the source's size)."),
    audio: AudioOpt = None,
    fps: FpsOpt = None,
    silent_audio: SilentAudioOpt = False,
) -> None:
    """Run a task over a sliding window of a file or live source, one result every stride.

    Ctrl-C or SIGTERM stops cleanly: the window in flight finishes, everything written stays.
    """
    import signal

    from edgeav.cli import second_interrupt_forces_exit
    from edgeav.runtime import check_stream_options
    from edgeav.stream import stop_on_signals

    _, window = check_stream_options(task.value, window=window, stride=stride, question=question,
                                     expression=expression, max_new_tokens=max_new_tokens)
    if jsonl is not None:
        check_output_file(jsonl, "--jsonl", in_place=True)
    if out is not None:
        check_output_folder(out, "--out")
    from edgeav.media import open_media
    from edgeav.media.source import is_url

    if (audio is not None or silent_audio) and is_url(source):
        raise edgeav.OptionError(f"{source}: --audio and --silent-audio apply to files; a URL streams its own audio")
    with open_media(source, audio=audio, fps=fps, silent_audio=silent_audio) as src:
        info = src.info
    if not info.is_live and info.duration_s is not None and info.duration_s < window - 0.5:
        raise edgeav.OptionError(f"{source}: {info.duration_s:.1f} s of media, shorter than one {window}-s window; "
                                 "pass a shorter --window")
    runtime = _load_runtime(checkpoint, preset, random_weights, dtype, engine, threads, llm_weights, device)
    # Opened (emptying an old file) at the first window, so a source that fails first leaves it as it was.
    sink = None
    windows = runtime.stream(source, task.value, window=window, stride=stride, question=question,
                             expression=expression, sampling=sampling.value, max_new_tokens=max_new_tokens,
                             realtime=realtime, reconnect=reconnect, audio=audio, fps=fps,
                             silent_audio=silent_audio)
    print(f"model      {_model_line(runtime, checkpoint, random_weights, engine)}")
    print(f"stream     {task.value} over {window}-s windows every {stride} s of {source}", flush=True)
    try:
        # With --quiet, stdout stays quiet until the summary: a progress bar shows on a terminal.
        shown = (_progress(None if info.is_live else info.duration_s, "streaming") if quiet
                 else contextlib.nullcontext(lambda seconds: None))
        with stop_on_signals(windows) as received, shown as progress:
            second_interrupt_forces_exit()
            for result in windows:
                save_error = None
                if out is not None and result.result.masks:
                    try:
                        result.result.save_masks(out)
                    except edgeav.EdgeavError as e:
                        save_error = e  # the window is still reported, then the one-line error
                if jsonl is not None:
                    sink = sink or _open_jsonl(jsonl)
                    sink.write(json.dumps(result.to_dict()) + "\n")
                    sink.flush()
                if quiet:
                    progress(result.end_s)
                else:
                    print(_window_line(result), flush=True)
                if save_error is not None:
                    raise save_error
    finally:
        windows.close()
        if sink is not None:
            sink.close()
    _print_telemetry(windows.telemetry, skipped_hint=bool(windows.live))
    if received["signal"] is not None:
        stderr.print(f"stopped by {signal.Signals(received['signal']).name}", highlight=False)
        if received["signal"] == signal.SIGINT:
            raise typer.Exit(130)
        return
    if not windows.telemetry.windows_processed and not windows.telemetry.windows_skipped:
        raise edgeav.OptionError(f"{source}: {windows.telemetry.media_s:.0f} s of media, shorter than one "
                                 f"{window}-s window; pass a shorter --window")


@app.command("synth")
def synth_checkpoint(
    out_dir: Path = typer.Argument(..., help="Folder to write (must not exist or be empty)."),
    preset: PresetName = typer.Option(..., "--preset", help="Model preset."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    force: bool = typer.Option(False, "--force", help="Write crab-7b (about 30 GB) anyway."),
) -> None:
    """Write a random-weight checkpoint in Crab's released layout, with a tokenizer."""
    from edgeav.checkpoints import save_released, synthesize

    if preset.value == "crab-7b" and not force:
        raise edgeav.OptionError("crab-7b random weights take about 30 GB on disk; use `edgeav run --preset "
                                 "crab-7b --random-weights` (in memory), or add --force")
    with _fresh_folder(out_dir) as partial, _status(f"writing {preset.value}"):
        save_released(synthesize(preset.value, seed), partial)
    print(f"wrote a random-weight {preset.value} checkpoint (seed {seed}) in Crab's released layout to {out_dir}")


@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="Crab checkpoint folder in the released layout."),
    out_dir: Path = typer.Argument(..., help="Folder to write (must not exist or be empty)."),
    preset: Optional[PresetName] = typer.Option(None, "--preset", help="Preset to check the checkpoint against."),
) -> None:
    """Convert released weights to edgeav's layout: safetensors, a config file, the tokenizer."""
    from edgeav.checkpoints import load_checkpoint, save_converted

    with _status(f"loading {checkpoint}"):
        loaded = load_checkpoint(checkpoint, preset.value if preset else None)
    with _fresh_folder(out_dir) as partial, _status(f"writing {out_dir}"):
        save_converted(loaded, partial)
    print(f"converted {checkpoint} ({loaded.config.name}) to {out_dir}")


@contextlib.contextmanager
def _fresh_folder(folder: Path) -> Iterator[Path]:
    """Write into ``folder.partial`` and rename at the end: a failure leaves nothing half written."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise edgeav.OptionError(f"{folder}: already exists and is not an empty folder; pick a new output folder")
    if not folder.parent.is_dir():
        raise edgeav.OptionError(f"{folder}: folder {folder.parent} does not exist; create it first")
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        raise edgeav.OptionError(f"{partial}: exists (an interrupted write?); remove it first")
    try:
        yield partial
        if folder.exists():
            folder.rmdir()
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


SuiteName = Enum("SuiteName", {"demo": "demo"}, type=str)


@app.command("eval")
def eval_command(
    suite: SuiteName = typer.Option("demo", "--suite", help="Held-out clips to score (demo: the synthetic world)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint folder; default: the demo model."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Engine directory from `edgeav export`."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="ONNX Runtime threads for --engine."),
    n: int = typer.Option(200, "--n", min=1, help="Clips per task."),
    task: Optional[list[TaskName]] = typer.Option(None, "--task", help="Score only these tasks (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Score a model on a held-out suite: the field's metric for every task."""
    from edgeav.evaluate import DEMO_TASKS, evaluate

    tasks = tuple(t.value for t in task) if task else DEMO_TASKS
    runtime = _load_runtime(checkpoint, None, False, DType.fp32, engine, threads)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeRemainingColumn(), console=stderr, transient=True, disable=not stderr.is_terminal)
    with progress:
        bars = {name: progress.add_task(name, total=n) for name in tasks}
        result = evaluate(runtime, suite.value, n=n, tasks=tasks,
                          progress=lambda name, done: progress.update(bars[name], completed=done))
    if as_json:
        print(json.dumps({"model": runtime.source, **result.to_dict()}, indent=2))
        return
    print(f"suite {result.suite}, {result.n} clips per task, model {runtime.source}")
    for name, metrics in result.metrics.items():
        print(f"{name:<6} " + "  ".join(f"{metric} {value:.3f}" for metric, value in metrics.items()))


FormatName = Enum("FormatName", {name: name for name in FORMATS}, type=str)
PrecisionName = Enum("PrecisionName", {name: name for name in PRECISIONS}, type=str)
CalibrationName = Enum("CalibrationName", {"demo": "demo"}, type=str)


@app.command(help="Export a checkpoint to an engine directory: ONNX graphs (or TensorRT engines), quantized, with "
                  "a fidelity receipt.\n\nPrecisions:\n\n" + precision_help())
def export(
    model: str = typer.Argument(..., help="Checkpoint folder, 'demo' (the bundled demo model) or a preset name "
                                          "(random weights, seed 0)."),
    out: Path = typer.Option(..., "-o", "--out", help="Engine directory to write (replaced only when complete)."),
    fmt: FormatName = typer.Option("onnx", "--format", help="onnx (ONNX Runtime) or tensorrt (needs TensorRT 10)."),
    precision: PrecisionName = typer.Option("fp32", "--precision", help="See the table above."),
    block_size: int = typer.Option(32, "--block-size", help="int4 block size: 32 or 128."),
    calibration: CalibrationName = typer.Option("demo", "--calibration", help="int8 calibration clips: the demo world."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="Merge the I-LoRA with a uniform head mix (lossy; the receipt reports it)."),
    receipt_n: int = typer.Option(4, "--receipt-n", min=0, help="Demo clips per task for the fidelity receipt (0: none)."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Serve a repeated export from $EDGEAV_CACHE (~/.cache/edgeav)."),
) -> None:
    """Export a checkpoint to an engine directory."""
    from edgeav.engines.manifest import check_export_options

    check_export_options(fmt.value, precision.value, block_size)
    with _status(f"loading {model}"):
        loaded = _load_for_export(model)
    from edgeav.export.exporter import export_engine

    result = export_engine(loaded, out, fmt=fmt.value, precision=precision.value, block_size=block_size,
                           calibration=calibration.value, merge_lora=merge_lora, receipt_n=receipt_n,
                           use_cache=cache, progress=lambda message: stderr.print(message, highlight=False))
    print(f"wrote {fmt.value} {precision.value} engine to {result}; see it with: edgeav info {result}")


def _load_for_export(model: str):
    from edgeav.checkpoints import load_checkpoint, load_converted, synthesize
    from edgeav.runtime import DEMO_DIR

    if model == "demo":
        loaded = load_converted(DEMO_DIR)
        loaded.source = "edgeav demo model"
        return loaded
    if model in PRESETS and not Path(model).exists():
        return synthesize(model, 0)
    if not Path(model).exists():
        raise edgeav.OptionError(f"{model}: no such checkpoint folder, and not 'demo' or a preset "
                                 f"({', '.join(PRESETS)})")
    return load_checkpoint(model)


@app.command()
def info(
    engine: Path = typer.Argument(..., help="Engine directory from `edgeav export`."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Print an engine's manifest and fidelity receipt (hashes are checked)."""
    from edgeav.engines.manifest import read_manifest, verify_files

    manifest = read_manifest(engine)
    verify_files(engine, manifest)
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    source = manifest.get("source", {})
    print(f"engine     {engine} ({manifest.get('backend')}, {manifest.get('precision')}, format v{manifest['format_version']})")
    print(f"model      {manifest.get('config', {}).get('name')} from {source.get('checkpoint')} "
          f"(digest {str(source.get('digest', ''))[:16]})")
    print(f"lora       {manifest.get('lora', {}).get('mix')}")
    print("tools      " + ", ".join(f"{k} {v}" for k, v in manifest.get("tools", {}).items()))
    print("files      hashes match the manifest")
    print(f"\n{'graph':<10} {'component':<9} {'precision':<9} {'MB':>7}")
    for name, graph in manifest.get("graphs", {}).items():
        size = (engine / graph["file"]).stat().st_size / 1e6
        print(f"{name:<10} {graph['component']:<9} {graph['precision']:<9} {size:>7.2f}")
    receipt = manifest.get("receipt")
    if not receipt or "skipped" in receipt:
        print(f"\nno fidelity receipt: {receipt['skipped'] if receipt else 'exported with --receipt-n 0'}")
        return
    logits = receipt["logits"]
    print(f"\nreceipt against the PyTorch reference, {receipt['clips_per_task']} demo clips per task:")
    if logits:
        print(f"  next-token logits  max |diff| {logits['max_abs_logit_diff']:.3g}, mean |diff| "
              f"{logits['mean_abs_logit_diff']:.3g}, KL mean {logits['kl_mean']:.3g} (max {logits['kl_max']:.3g}), "
              f"top-1 agreement {logits['top1_agreement']:.3f} over {logits['steps']} steps")
    else:
        print("  next-token logits  no step compared")
    print(f"  greedy text        identical in {receipt['greedy_text_agreement']:.0%} of runs")
    if receipt.get("mask_iou_vs_reference") is not None:
        print(f"  masks              IoU {receipt['mask_iou_vs_reference']:.3f} against the reference's")
    print(f"\n  {'task':<6} {'metric':<20} {'reference':>9} {'engine':>9}")
    for task, pair in receipt["metrics"].items():
        metric = next(iter(pair["reference"]))
        print(f"  {task:<6} {metric:<20} {pair['reference'][metric]:>9.3f} {pair['engine'][metric]:>9.3f}")


@app.command("bench")
def bench_command(
    preset: PresetName = typer.Option(DEFAULT_PRESET, "--preset", help="Model preset (crab-tiny without --random-weights: the demo model)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights of --preset (seed 0), built in memory."),
    formats: str = typer.Option("torch,onnx,tensorrt", "--formats", help="Comma-separated: torch, onnx, tensorrt."),
    precisions: str = typer.Option("fp32,fp16,int8,int4", "--precisions", help="Comma-separated: fp32, bf16, fp16, int8, int4."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number to this JSON file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart (end-to-end latency, tokens/s)."),
    project: Optional[ProjectName] = typer.Option(None, "--project", help="Add a roofline projection (published specs, not a measurement) for this Jetson."),
    device: TorchDevice = typer.Option("cpu", "--device", help="Where torch rows and the baseline run (onnx rows: CPU only)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per row (after the warm-up)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Warm-up runs per row, excluded from the numbers."),
    row_budget: float = typer.Option(60.0, "--row-budget", help="Seconds of timed runs per row; a slower row keeps fewer runs (at least one)."),
    tokens: int = typer.Option(32, "--tokens", min=2, help="Tokens every row decodes (teacher-forced, so all rows do the same work)."),
    eval_n: int = typer.Option(4, "--eval-n", min=0, help="Demo-suite AVE clips per row for the metric (demo model only; 0: skip)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="torch and ONNX Runtime threads (default: torch's)."),
) -> None:
    """Benchmark every format x precision on one 10-s AVE clip against the transformers baseline."""
    from edgeav.bench.harness import TABLE_WIDTH, BenchOptions, footer, run_bench, tables, write_plot

    options = BenchOptions(preset=preset.value, random_weights=random_weights, formats=formats, precisions=precisions,
                           device=device.value, repeats=repeats, warmup=warmup, row_budget_s=row_budget, tokens=tokens, eval_n=eval_n,
                           threads=threads, project=project.value if project else None, json_path=json_path,
                           plot_path=plot)
    report = run_bench(options, progress=lambda message: stderr.print(message, highlight=False))
    # 100 columns at most (less on a narrower terminal); every number is in --json.
    console = Console(width=min(shutil.get_terminal_size((TABLE_WIDTH, 24)).columns, TABLE_WIDTH))
    for table in tables(report):
        console.print(table)
    for line in footer(report):
        console.print(line, highlight=False)
    if json_path is not None:
        with atomic_path(json_path) as temporary:
            report.write_json(temporary)
        print(f"wrote {json_path}")
    if plot is not None:
        with atomic_path(plot) as temporary:
            write_plot(report, temporary)
        print(f"wrote {plot}")
