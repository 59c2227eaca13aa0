"""OpenAVS's ``edgeav bench`` (its System record's ``bench``): the cascade's cost per frame, stage by stage,
for each variant, on one generated clip, in one run.

    options = make_options(preset="openavs-tiny", random_weights=True)
    report = run_bench(options)            # report.to_dict(): every number, JSON-ready

Rows: ``torch fp32`` first (the reference every ratio divides by), then torch bf16 and every onnx precision
OpenAVS's export offers. Every row runs each variant (``lite``, ``edge``, ``default``, ``large``) on the
same generated clip: ``lite`` and ``edge``
straight to GroundingDINO (translator ``none``), ``default`` and ``large`` with the thinker as the local
translator, so every stage the paper times is timed: the describers (``describe_audio``: Pengi's three
prompts, plus the thinker on the sound for ``large``, or BEATs for ``edge``; ``describe_image``: the thinker
on the frame), ``translate``, GroundingDINO (``boxes``) and SAM (``mask``), and ``per_frame``: the whole
cascade over the clip divided by its seconds. With random weights a generator rarely stops early, so the thinker's turns are capped at
``tokens`` new tokens (describers and translator alike) and Pengi writes its 30: the figures are what the
stages cost at those lengths, not what trained models would write. Warm-up runs are excluded; figures are
p50/p95 of the timed runs (per frame); a row's ratios are the reference's p50 over its own.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeav.bench import system_bench
from edgeav.bench.report import write_plot
from edgeav.bench.system_bench import (BenchContext, BenchReport, DeviceStageTimer, Progress, Row, SystemBenchOptions,
                                       TableLayout, stage_key)
from edgeav.bench.timing import run_row as run_timed_row
from edgeav.bench.timing import PeakMemory, hardware_info, percentiles, timed_runs, tool_versions
from edgeav.media.synth import SynthSpec, write_clip
from edgeav.systems.openavs.config import PRESETS
from edgeav.systems.openavs.segment import BOX_THRESHOLD
from edgeav.systems.openavs.inputs import decode
from edgeav.systems.openavs.tasks import check_options

VARIANTS = ("lite", "edge", "default", "large")
# lite and edge as an edge device runs them, straight to GroundingDINO; the
# variants with the thinker translate with it, so the translator's cost is measured there.
TRANSLATORS = {"lite": "none", "edge": "none", "default": "local", "large": "local"}
STAGES = ("describe_audio", "describe_image", "translate", "boxes", "mask", "per_frame")
BOXES_PER_FRAME = "boxes_per_frame"  # GroundingDINO's boxes above the threshold, each one SAM decode
SMALL_PRESET = "openavs-tiny"
CLIP = SynthSpec(duration_s=2.0, width=320, height=240)


class OpenAVSBenchOptions(SystemBenchOptions):
    title = "OpenAVS"
    presets = PRESETS
    small_preset = SMALL_PRESET
    torch_precisions = ("fp32", "bf16")

    @staticmethod
    def export_precisions(fmt: str) -> tuple[str, ...]:
        if fmt != "onnx":
            return ()
        from edgeav.systems.openavs.export import PRECISIONS

        return tuple(PRECISIONS)


def make_options(**values) -> OpenAVSBenchOptions:
    """The bench's options from ``edgeav bench``'s keywords (None: the default); refused before any load."""
    return OpenAVSBenchOptions.from_cli(**values)


@dataclass
class _Context(BenchContext):
    seconds: list = field(default_factory=list)
    media_decode_ms: float = 0.0


def _measure(row: Row, runtime, ctx: _Context) -> None:
    """The timed runs of every variant on the decoded clip, per frame."""
    options, pipeline, device = ctx.options, runtime.pipeline, runtime.device
    pipeline.describe_tokens = pipeline.translate_tokens = options.tokens
    n = len(ctx.seconds)
    def once() -> dict:
        run: dict = {}
        for variant in VARIANTS:
            cascade = check_options(variant=variant, translator=TRANSLATORS[variant])
            timer = DeviceStageTimer(device)
            start = time.perf_counter()
            with torch.inference_mode():
                for second in ctx.seconds:
                    second.texts = pipeline.describe(second, variant, timer)
                result = pipeline.answer(ctx.seconds, cascade, timer)
            run[stage_key(variant, "per_frame")] = (time.perf_counter() - start) * 1000 / n
            run[stage_key(variant, BOXES_PER_FRAME)] = len(result.detections) / n
            run.update({stage_key(variant, stage): timer.ms.get(stage, 0.0) / n for stage in STAGES[:-1]})
        run["end_to_end_s"] = sum(run[stage_key(v, "per_frame")] for v in VARIANTS) * n / 1000
        return run

    with PeakMemory(device).watch() as memory:
        runs = timed_runs(once, options, device)
    row.peak_rss_bytes, row.device_peak_bytes = memory.peak_rss, memory.device_peak
    if len(runs) < options.repeats:
        row.notes.append(f"{len(runs)} of {options.repeats} timed runs: the row budget ran out")
    row.runs = runs
    for variant in VARIANTS:
        for stage in STAGES:
            key = stage_key(variant, stage)
            row.stages_ms[key] = percentiles([run[key] for run in runs])
    row.end_to_end_s = percentiles([run["end_to_end_s"] for run in runs])


ROW_BUILDERS = system_bench.row_builders(_measure)


def run_bench(options: OpenAVSBenchOptions, progress: Progress = lambda message: None) -> BenchReport:
    """Measure every row (see the module docstring) and return the report."""
    device = system_bench.bench_device(options)
    progress(f"loading {options.checkpoint or options.preset or SMALL_PRESET}")
    from edgeav.systems.openavs.checkpoints import load_checkpoint, synthesize

    loaded, model_name = system_bench.load_model(options, load_checkpoint, synthesize)
    missing = [part for part in ("thinker", "beats") if getattr(loaded.model, part) is None]
    if missing:
        from edgeav.errors import OptionError

        raise OptionError(f"{model_name} holds no {' and no '.join(missing)}: the bench runs every variant with "
                          "the local translator; give a checkpoint with all of OpenAVS's components")
    rows = [Row(f"{fmt} {precision}", fmt, precision) for fmt, precision in options.rows()]
    with tempfile.TemporaryDirectory(prefix="edgeav-bench-") as folder:
        ctx = _Context(options, loaded, device, Path(folder), progress)
        progress("writing and decoding the bench clip")
        clip = Path(folder) / "clip.mp4"
        write_clip(clip, CLIP)
        start = time.perf_counter()
        ctx.seconds, _ = decode(clip)
        ctx.media_decode_ms = (time.perf_counter() - start) * 1000
        for row in rows:
            run_timed_row(row, ctx, ROW_BUILDERS)
    system_bench.compare(rows, tuple(stage_key(v, stage) for v in VARIANTS for stage in STAGES))
    benchmark = (f"edgeav bench (OpenAVS): every variant on one generated {CLIP.duration_s:g} s clip (lite and edge "
                 f"untranslated, default and large with the local translator), the thinker capped at {options.tokens} "
                 "new tokens a turn, per frame; p50/p95 of "
                 f"{options.repeats} runs after {options.warmup} warm-up run(s); ratios: torch fp32's p50 over the row's")
    details = {"clip": f"synthetic {CLIP.duration_s:g} s, {CLIP.width}x{CLIP.height} at {CLIP.fps:g} fps "
                       "(edgeav.media.synth.write_clip)", "translators": TRANSLATORS,
               "frames": len(ctx.seconds), "media_decode_ms": ctx.media_decode_ms, "variants": list(VARIANTS)}
    return BenchReport("openavs", benchmark, options, model_name, details,
                       hardware_info(device, torch.get_num_threads()), tool_versions(), rows)


def tables(report: BenchReport) -> list:
    """Per-frame stage latencies (p50) per variant; the ratios to torch fp32 with memory."""
    opts = report.options
    title = (f"edgeav bench: {report.model}, OpenAVS per frame on a generated clip, thinker turns capped at "
             f"{opts.tokens} tokens, {opts.device}; p50 ms of up to {opts.repeats} timed runs")
    columns = tuple((header, header, stage) for header, stage in (
        ("audio", "describe_audio"), ("image", "describe_image"), ("translate", "translate"), ("boxes", "boxes"),
        ("mask", "mask"), ("frame", "per_frame")))
    return system_bench.tables(report, TableLayout(title, columns, tasks=VARIANTS))


def boxes_line(report: BenchReport) -> str | None:
    """GroundingDINO's boxes per frame of each variant that reached it, in the reference row's first run."""
    runs = report.rows[0].runs if report.rows else []
    if not runs:
        return None
    counts = [f"{v} {runs[0][stage_key(v, BOXES_PER_FRAME)]:g}" for v in VARIANTS
              if stage_key(v, BOXES_PER_FRAME) in runs[0]]
    return (f"boxes per frame above the {BOX_THRESHOLD:g} threshold (SAM decodes each; a random detector passes "
            f"many of its queries, a trained one a few): {', '.join(counts)}") if counts else None


def footer(report: BenchReport) -> list[str]:
    """Why rows did not run, the machine, and what the stages are."""
    boxes = boxes_line(report)
    return system_bench.footer(report, [*([boxes] if boxes else []),
        f"clip: {report.details['clip']}, {report.details['frames']} frames; media decode "
        f"{report.details['media_decode_ms']:.0f} ms (once) excluded",
        "audio = the sound's describers (Pengi x 3 prompts; + the thinker for large; BEATs' AudioSet head for "
        "edge); image = the thinker on the frame (default, large); translate = the thinker as the local "
        "translator (default, large; lite and edge go straight to GroundingDINO); boxes = GroundingDINO; mask = SAM "
        "per box; frame = the whole cascade per frame",
        "random weights: generators seldom stop early, so the thinker's turns run to their cap, and its replies hold "
        "no <answer>, so default and large reach no detector here (a real run adds lite's boxes and mask); the "
        "p95s and every run: --json",
    ])


__all__ = ["OpenAVSBenchOptions", "footer", "make_options", "run_bench", "tables", "write_plot"]
