"""Model commands: ``run`` (a task on one clip) and ``stream`` (a task over a sliding window)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer

import edgeav
from edgeav.cli import one_line
from edgeav.cli.common import (AudioOpt, CheckpointOpt, DeviceOpt, DType, DTypeOpt, EngineOpt, ExpressionOpt,
                               FpsOpt, LLMWeightsOpt, MaxNewTokensOpt, PresetOpt, QuestionOpt, RandomWeightsOpt,
                               SamplingName, SamplingOpt, SegmenterOpt, SilentAudioOpt, SystemOpt, TaskName,
                               ThreadsOpt, TorchDevice, TranslatorCheckpointOpt, TranslatorModelOpt, TranslatorOpt,
                               TranslatorUrlOpt, VariantOpt, app, check_out, check_task, load_runtime, media_progress,
                               model_line, resolve_system, status, stderr, system_options)
from edgeav.outputs import check_output_file, check_output_folder, nonempty_path

def _print_result(result, model: str, source: str, overlays: list[Path] = (), out_given: bool = False) -> None:
    print(f"model      {model}")
    print(f"source     {one_line(source)}")
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
    for description in result.descriptions:
        print(f"heard      {description.time_s:g} s, {description.describer}: {one_line(description.text)!r}")
    for mask in result.masks:
        where = one_line(str(mask.path)) if mask.path else (
            "not saved (see the error below)" if out_given else "not saved (pass --out DIR)")
        named = f" of {one_line(mask.text)!r}" if result.descriptions else ""
        boxes = sum(1 for d in result.detections if d.time_s == mask.time_s)
        found = f" from {boxes} box{'es' if boxes != 1 else ''}" if result.descriptions else ""
        print(f"mask       {mask.time_s:g} s{named}: {int(mask.mask.astype(bool).sum())} pixels{found}, {where}")
    for path in overlays:
        print(f"overlay    {one_line(str(path))}")
    for note in result.notes:
        print(f"note       {one_line(note)}")
    print("timings    " + ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items()))


def _check_overlay(overlay: Path, system, task: str) -> None:
    """``--overlay``: a task that draws (a box or masks) and a writable .png file or folder."""
    drawn = [name for name, outputs in system.task_outputs.items() if outputs]
    if not system.task_outputs[task]:
        raise edgeav.OptionError(f"--overlay draws masks and boxes; task {task!r} has none (use it with "
                                 f"{', '.join(drawn)})")
    if overlay.suffix.lower() == ".png":
        check_output_file(overlay, "--overlay")
    elif overlay.suffix:
        raise edgeav.OptionError(f"{overlay}: --overlay writes PNG; give a .png file or a folder")
    else:
        check_output_folder(overlay, "--overlay")


def _same_path(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


@app.command()
def run(
    source: Optional[str] = typer.Argument(None, help="Media file or URL; omitted: the bundled demo clip."),
    task: Optional[TaskName] = typer.Option(None, "--task", help="What to ask the model (default: the system's first task: ave for Crab, caption for u-LLaVA)."),
    system: SystemOpt = None,
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
    out: Optional[Path] = typer.Option(None, "--out", parser=nonempty_path("--out"), help="Folder for mask PNGs (at the source's size)."),
    variant: VariantOpt = None,
    translator: TranslatorOpt = None,
    translator_url: TranslatorUrlOpt = None,
    translator_model: TranslatorModelOpt = None,
    translator_checkpoint: TranslatorCheckpointOpt = None,
    segmenter: SegmenterOpt = None,
    overlay: Optional[Path] = typer.Option(None, "--overlay", parser=nonempty_path("--overlay"), help="Write the frame with the mask painted and the box drawn: a .png file (frames side by side) or a folder (one PNG per frame)."),
) -> None:
    """Run a task on a clip (a video, an image, or a folder of frames): events, boxes, answers, captions or masks."""
    # Everything cheap to check is checked before the model loads.
    owner = resolve_system(checkpoint, engine, preset, system, task)
    task_name = check_task(owner, task)
    cascade = system_options(owner, variant=variant, translator=translator, translator_url=translator_url,
                             translator_model=translator_model, translator_checkpoint=translator_checkpoint,
                             segmenter=segmenter)
    owner.check_run(task_name, source=source, question=question, expression=expression,
                    max_new_tokens=max_new_tokens, at_seconds=at, audio=audio, fps=fps, silent_audio=silent_audio,
                    **cascade)
    if out is not None:
        check_out(out, owner, task_name)
    if overlay is not None:
        _check_overlay(overlay, owner, task_name)
        if out is not None and _same_path(out, overlay):
            raise edgeav.OptionError(f"{out}: --out and --overlay name the same path; give each "
                                     "its own")
    for option, path in (("--out", out), ("--overlay", overlay)):
        if path is not None and source is not None and Path(source).exists() and _same_path(path, Path(source)):
            raise edgeav.OptionError(f"{path}: {option} names the source itself; give the output its own path")
    runtime = load_runtime(checkpoint, preset, random_weights, dtype, engine, threads, llm_weights, device, system)
    from edgeav.runtime import DEMO_CLIP

    model = model_line(runtime, checkpoint, random_weights, engine)
    shown_source = source
    if source is None:
        if not DEMO_CLIP.is_file():
            raise edgeav.OptionError(f"{DEMO_CLIP}: the bundled demo clip is missing; pass a SOURCE")
        source, shown_source = str(DEMO_CLIP), f"{DEMO_CLIP} (the bundled demo clip)"
    with status(f"running {task_name}"):
        result = runtime.run(source, task_name, question=question, expression=expression, sampling=sampling.value,
                             max_new_tokens=max_new_tokens, at_seconds=at, audio=audio, fps=fps,
                             silent_audio=silent_audio, **cascade)
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
        _print_result(result, model, shown_source, overlays, out_given=out is not None)
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
    gaps = "".join(f" [{g.describe()}]" for g in window.gaps)
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
        print(f"gap        {gap.describe()}")
    print(f"memory     peak RSS {t['peak_rss_mb']:.0f} MiB")
    print(f"{'stage':<14} {'count':>6} {'p50 ms':>9} {'p95 ms':>9}")
    for name, stats in t["stages"].items():
        if stats["count"]:
            print(f"{name:<14} {stats['count']:>6} {stats['p50_ms']:>9.1f} {stats['p95_ms']:>9.1f}")


@app.command()
def stream(
    source: str = typer.Argument(..., help="Media file, image, folder of frames, or live URL (rtsp://, http://, ...)."),
    task: Optional[TaskName] = typer.Option(None, "--task", help="What to ask the model about each window (default: the system's first task)."),
    system: SystemOpt = None,
    window: Optional[int] = typer.Option(None, "--window", help="Window length in seconds (default: the task's: Crab's clip length, 10 s for ave; u-LLaVA 8 s for caption/ask, 1 s for the picture tasks)."),
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
    out: Optional[Path] = typer.Option(None, "--out", parser=nonempty_path("--out"), help="Folder for mask PNGs (at the source's size)."),
    audio: AudioOpt = None,
    fps: FpsOpt = None,
    silent_audio: SilentAudioOpt = False,
    variant: VariantOpt = None,
    translator: TranslatorOpt = None,
    translator_url: TranslatorUrlOpt = None,
    translator_model: TranslatorModelOpt = None,
    translator_checkpoint: TranslatorCheckpointOpt = None,
    segmenter: SegmenterOpt = None,
) -> None:
    """Run a task over a sliding window of a file or live source, one result every stride.

    Ctrl-C or SIGTERM stops cleanly: the window in flight finishes, everything written stays.
    """
    import signal

    from edgeav.cli import second_interrupt_forces_exit
    from edgeav.stream import stop_on_signals

    owner = resolve_system(checkpoint, engine, preset, system, task)
    task_name = check_task(owner, task)
    if owner.check_stream is None:
        raise edgeav.OptionError(f"{owner.title} does not stream yet; run it on files with `edgeav run`")
    cascade = system_options(owner, variant=variant, translator=translator, translator_url=translator_url,
                             translator_model=translator_model, translator_checkpoint=translator_checkpoint,
                             segmenter=segmenter)
    _, window = owner.check_stream(task_name, window=window, stride=stride, question=question,
                                   expression=expression, max_new_tokens=max_new_tokens, **cascade)
    if jsonl is not None:
        check_output_file(jsonl, "--jsonl", in_place=True)
    if out is not None:
        check_out(out, owner, task_name)
    from edgeav.media import open_media

    # open_media checks the media options as `run` does (edgeav.media.check_media_options), then reads the headers.
    with open_media(source, audio=audio, fps=fps, silent_audio=silent_audio, image_s=window,
                    hears_audio=owner.hears_audio) as src:
        info = src.info
    if not info.is_live and info.duration_s is not None and info.duration_s < window - 0.5:
        raise edgeav.OptionError(f"{source}: {info.duration_s:.1f} s of media, shorter than one {window}-s window; "
                                 "pass a shorter --window")
    runtime = load_runtime(checkpoint, preset, random_weights, dtype, engine, threads, llm_weights, device, system)
    # Opened (emptying an old file) at the first window, so a source that fails first leaves it as it was.
    sink = None
    windows = runtime.stream(source, task_name, window=window, stride=stride, question=question,
                             expression=expression, sampling=sampling.value, max_new_tokens=max_new_tokens,
                             realtime=realtime, reconnect=reconnect, audio=audio, fps=fps,
                             silent_audio=silent_audio, **cascade)
    print(f"model      {model_line(runtime, checkpoint, random_weights, engine)}")
    print(f"stream     {task_name} over {window}-s windows every {stride} s of {one_line(source)}", flush=True)
    try:
        # With --quiet, stdout stays quiet until the summary: a progress bar shows on a terminal.
        shown = (media_progress(None if info.is_live else info.duration_s, "streaming") if quiet
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
