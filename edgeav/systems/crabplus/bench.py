"""Crab+'s ``edgeav bench`` (its System record's ``bench``): the PyTorch reference in fp32 and bf16 and every
onnx precision its export offers, stage by stage on one generated clip, in one run.

    options = make_options(preset="crabplus-tiny", random_weights=True)
    report = run_bench(options)            # report.to_dict(): every number, JSON-ready

Rows: ``torch fp32`` first (the reference every ratio divides by), then each requested format x precision;
by default torch bf16 and the ``onnx`` precisions of :data:`edgeav.systems.crabplus.export.PRECISIONS`
(read when a row needs it: without the export the onnx row says so and the others run). Every row runs
two tasks on the same generated 10-s clip (:func:`edgeav.media.synth.write_clip`, decoded once): ``s4``
(one frame, its audio unit, then SAM2) and ``ave`` (10 frames, 10 s of audio), with generation
teacher-forced on the same ``tokens`` tokens of a fixed answer per task, so every row decodes as much;
the s4 mask is SAM2 prompted by that answer's fixed box and three points (on the clip's red square).
Stages per task: ``audio`` (log-mel + audio tower), ``visual`` (ViT + merger), ``prefill``, decode
(tokens/s), ``mask`` (s4: SAM2's encoder and decoder), and ``end_to_end`` (the decoded clip to the
answer and mask). Warm-up runs are excluded; figures are p50/p95 of the timed runs; a row's ratios are
the reference's p50 over its own (above 1: faster). The quality column is each row's mask IoU against
torch fp32's on ``eval_n`` generated frames with the same prompts: with random weights it shows how far a
precision moves the masks, not how good they are. A row that cannot run says why.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeav.bench import system_bench
from edgeav.bench.report import write_plot
from edgeav.bench.system_bench import (END_TO_END, REFERENCE, BenchContext, BenchReport, DeviceStageTimer, Progress,
                                       Row, SystemBenchOptions, TableLayout, stage_key)
from edgeav.bench.timing import run_row as run_timed_row
from edgeav.bench.timing import (PeakMemory, hardware_info, percentiles, synchronize, timed_runs,
                                 tool_versions)
from edgeav.decoding import Generation, ensure_cache
from edgeav.generate import generate
from edgeav.media.synth import SynthSpec, render_frame, write_clip
from edgeav.metrics import mask_iou
from edgeav.stages import StageTimer
from edgeav.systems.crabplus.config import PRESETS
from edgeav.systems.crabplus.inputs import ClipInputs, decode
from edgeav.qwen_thinker import PositionedLLM
from edgeav.systems.crabplus.pipeline import MASK_SPACE, CrabPlusPipeline, build_prompt
from edgeav.systems.crabplus.tasks import CrabPlusTask, get_task

TASKS = ("s4", "ave")
STAGES = ("audio", "visual", "prefill", "per_token", "mask", END_TO_END)  # per task; the ratios' stages
SMALL_PRESET = "crabplus-tiny"  # --random-weights without --preset
CLIP = SynthSpec(duration_s=10.0)  # two moving shapes (the first a red square), a tone in every odd second
AVE_ANSWER = "<event>Church bell</event> <range>1,10</range>"


def _export_precisions(fmt: str) -> tuple[str, ...]:
    try:
        from edgeav.systems.crabplus.export import PRECISIONS as EXPORT_PRECISIONS
    except ModuleNotFoundError as error:
        if error.name != "edgeav.systems.crabplus.export":
            raise
        return ()
    return tuple(name for name, spec in EXPORT_PRECISIONS.items() if fmt in spec.formats)


@dataclass(frozen=True)
class CrabPlusBenchOptions(SystemBenchOptions):
    """What Crab+'s bench measures (:class:`~edgeav.bench.system_bench.SystemBenchOptions`): torch fp32 and
    bf16 and the onnx precisions its export offers by default; ``eval_n`` generated frames per row for the
    mask IoU against torch fp32."""

    title = "Crab+"
    presets = PRESETS
    small_preset = SMALL_PRESET
    torch_precisions = ("fp32", "bf16")
    export_precisions = staticmethod(_export_precisions)


def make_options(**values) -> CrabPlusBenchOptions:
    """:class:`CrabPlusBenchOptions` from ``edgeav bench``'s options (None: the default)."""
    return CrabPlusBenchOptions.from_cli(**values)


# -- the workload ------------------------------------------------------------------------------------


def mask_answer(spec: SynthSpec, t: float) -> str:
    """An S4 answer naming the clip's first shape at ``t`` with its box and three points inside it, in the
    thinker's 224 grid."""
    shape = spec.shapes[0]
    cx, cy = shape.center_px(t, spec.duration_s, spec.width, spec.height)
    half = shape.size * spec.height
    sx, sy = MASK_SPACE / spec.width, MASK_SPACE / spec.height
    box = [round((cx - half) * sx), round((cy - half) * sy), round((cx + half) * sx), round((cy + half) * sy)]
    points = [(cx, cy), (cx - half / 2, cy), (cx + half / 2, cy)]
    written = "".join(f"[{round(x * sx)},{round(y * sy)}]" for x, y in points)
    return f"The object making the sound in the video is the red square. [{','.join(map(str, box))}] {written}"


def forced_tokens(tokenizer, answer: str, n: int) -> list[int]:
    """``n`` tokens of ``answer``, repeated as needed."""
    ids = tokenizer.encode(answer)
    return (ids * (n // len(ids) + 1))[:n]


@dataclass(frozen=True)
class Workload:
    """One task as every row runs it: the decoded clip, the fixed answer and the tokens forced from it."""

    task: CrabPlusTask
    inputs: ClipInputs
    answer: str
    forced: list[int]
    media_decode_ms: float


def run_forced(pipeline: CrabPlusPipeline, work: Workload, timer: StageTimer) -> tuple[Generation, int]:
    """What :meth:`CrabPlusPipeline.answer` runs for ``work``'s task, stage by stage, with generation
    teacher-forced on ``work.forced``, then the pipeline's reading of the fixed answer (s4: SAM2 on its box
    and points) -> the generation and the prompt's length."""
    spec, inputs, model, config = work.task, work.inputs, pipeline.model, pipeline.config
    tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array)).to(pipeline.device, pipeline.dtype)  # noqa: E731
    with torch.inference_mode():
        embeds, positions, delta = build_prompt(model, config, pipeline.tokenizer, spec, inputs, timer=timer,
                                                tensor=tensor)
        ensure_cache(model.llm, embeds.shape[1] + len(work.forced) + 1, config.llm.max_seq_len)
        llm = PositionedLLM(model.llm, positions.to(pipeline.device), delta)
        generation = generate(llm, embeds, max_new_tokens=len(work.forced), eos_id=config.llm.eos_id,
                              forced=work.forced)
        pipeline.read(spec, inputs, work.answer, timer)
    return generation, int(embeds.shape[1])


def _workloads(loaded, folder: Path, tokens: int) -> dict[str, Workload]:
    """The bench clip written to ``folder`` and decoded once per task."""
    clip = write_clip(folder / "bench-clip.mp4", CLIP)
    works = {}
    for name in TASKS:
        task = get_task(name)
        start = time.perf_counter()
        inputs = decode(folder / "bench-clip.mp4", video_frames=task.video_frames or None)
        decode_ms = (time.perf_counter() - start) * 1000
        answer = mask_answer(clip, inputs.picture_s) if task.output == "mask" else AVE_ANSWER
        works[name] = Workload(task, inputs, answer, forced_tokens(loaded.tokenizer, answer, tokens), decode_ms)
    return works


def _mask_pictures(n: int) -> list[tuple[ClipInputs, str]]:
    """``n`` frames of the bench clip spread over it (rendered, not decoded), each with its S4 answer."""
    pictures = []
    for t in np.arange(n) * CLIP.duration_s / max(n, 1):
        inputs = ClipInputs(video=None, picture=render_frame(CLIP, float(t)), picture_s=float(t),
                            waveform=np.zeros(0, np.float32), heard=True, duration_s=CLIP.duration_s)
        pictures.append((inputs, mask_answer(CLIP, float(t))))
    return pictures


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class _Context(BenchContext):
    workloads: dict[str, Workload] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    reference_masks: list[np.ndarray] | None = None  # torch fp32's, for the mask IoU column


def _measure(row: Row, runtime, ctx: _Context) -> None:
    """The timed runs of ``runtime`` on both tasks, and the row's mask IoU against torch fp32."""
    options, pipeline, device = ctx.options, runtime.pipeline, runtime.device

    def once() -> dict:
        run: dict = {}
        for name, work in ctx.workloads.items():
            timer = DeviceStageTimer(device)
            synchronize(device)
            start = time.perf_counter()
            generation, ctx.prompt_tokens[name] = run_forced(pipeline, work, timer)
            synchronize(device)
            run[stage_key(name, END_TO_END)] = (time.perf_counter() - start) * 1000
            run.update({stage_key(name, stage): timer.ms.get(stage) for stage in ("audio", "visual", "mask")})
            run[stage_key(name, "prefill")] = generation.prefill_s * 1000
            run[stage_key(name, "decode")] = generation.decode_s * 1000
            run[stage_key(name, "decode_steps")] = len(generation.token_ids)
        return run

    with PeakMemory(device).watch() as memory:
        runs = timed_runs(once, options, device)
    row.peak_rss_bytes, row.device_peak_bytes = memory.peak_rss, memory.device_peak
    if len(runs) < options.repeats:
        row.notes.append(f"{len(runs)} of {options.repeats} timed runs: the row budget ran out")
    row.runs = runs
    for name in ctx.workloads:
        for stage in ("audio", "visual", "prefill", "decode", "mask", END_TO_END):
            key = stage_key(name, stage)
            if runs[0][key] is not None:
                row.stages_ms[key] = percentiles([run[key] for run in runs])
        steps = stage_key(name, "decode_steps")
        row.stages_ms[stage_key(name, "per_token")] = percentiles(
            [run[stage_key(name, "decode")] / max(run[steps], 1) for run in runs])
    row.decode_steps = runs[0][stage_key(TASKS[0], "decode_steps")]
    row.end_to_end_s = percentiles([run["end_to_end_s"] for run in runs])
    per_token_ms = percentiles([sum(run[stage_key(name, "decode")] for name in ctx.workloads)
                                / max(sum(run[stage_key(name, "decode_steps")] for name in ctx.workloads), 1)
                                for run in runs])["p50"]
    row.decode_tokens_per_s = 1000 / per_token_ms if per_token_ms > 0 else None
    if options.eval_n:
        masks = [pipeline.read(get_task("s4"), inputs, answer, StageTimer()).masks[0].mask
                 for inputs, answer in _mask_pictures(options.eval_n)]
        if (row.format, row.precision) == REFERENCE:
            ctx.reference_masks = masks
        if ctx.reference_masks is None:
            row.notes.append("no mask IoU: the torch fp32 row did not run")
        else:
            row.metric = float(np.mean([mask_iou(m, r) for m, r in zip(masks, ctx.reference_masks)]))


ROW_BUILDERS = system_bench.row_builders(_measure)


def run_bench(options: CrabPlusBenchOptions, progress: Progress = lambda message: None) -> BenchReport:
    """Measure every row (see the module docstring) and return the report."""
    device = system_bench.bench_device(options)
    progress(f"loading {options.checkpoint or options.preset or SMALL_PRESET}")
    from edgeav.systems.crabplus.checkpoints import load_checkpoint, synthesize

    loaded, model_name = system_bench.load_model(options, load_checkpoint, synthesize)
    rows = [Row(f"{fmt} {precision}", fmt, precision) for fmt, precision in options.rows()]
    with tempfile.TemporaryDirectory(prefix="edgeav-bench-") as folder:
        ctx = _Context(options, loaded, device, Path(folder), progress)
        progress("writing and decoding the bench clip")
        ctx.workloads = _workloads(loaded, Path(folder), options.tokens)
        for row in rows:
            run_timed_row(row, ctx, ROW_BUILDERS)
    system_bench.compare(rows, tuple(stage_key(name, stage) for name in TASKS for stage in STAGES))
    benchmark = (f"edgeav bench (Crab+): s4 and ave on one generated {CLIP.duration_s:g} s clip, {options.tokens} "
                 f"forced tokens each, p50/p95 of {options.repeats} runs after {options.warmup} warm-up run(s) "
                 "(warm-up excluded); ratios: torch fp32's p50 over the row's")
    details = {
        "clip": f"synthetic {CLIP.duration_s:g} s, {CLIP.width}x{CLIP.height} at {CLIP.fps:g} fps, two moving shapes, "
                "a tone in every odd second (edgeav.media.synth.write_clip)",
        "tasks": {name: {"prompt_tokens": ctx.prompt_tokens.get(name), "answer": work.answer,
                         "forced_tokens": len(work.forced), "media_decode_ms": work.media_decode_ms}
                  for name, work in ctx.workloads.items()},
    }
    return BenchReport("crabplus", benchmark, options, model_name, details,
                       hardware_info(device, torch.get_num_threads()), tool_versions(), rows)


# -- presenting --------------------------------------------------------------------------------------


def tables(report: BenchReport) -> list:
    """Stage latencies (p50) per task with size and mask IoU; the ratios to torch fp32 with memory
    (:func:`edgeav.bench.system_bench.tables`)."""
    opts = report.options
    title = (f"edgeav bench: {report.model}, Crab+ s4 and ave on a generated clip, {opts.tokens} forced tokens, "
             f"{opts.device}; p50 ms (tok/s) of up to {opts.repeats} timed runs, {opts.warmup} warm-up run(s) "
             "excluded")
    columns = tuple((name, name, stage) for name, stage in (("audio", "audio"), ("visual", "visual"),
                    ("prefill", "prefill"), ("tok/s", "per_token"), ("mask", "mask"), ("e2e", END_TO_END)))
    return system_bench.tables(report, TableLayout(title, columns, metric="mask IoU", tasks=TASKS))


def footer(report: BenchReport) -> list[str]:
    """Why rows did not run, the machine, and what the workload and the columns are."""
    tasks = report.details["tasks"]
    prompts = ", ".join(f"{name} {tasks[name]['prompt_tokens']}" for name in tasks)
    decoding = ", ".join(f"{name} {tasks[name]['media_decode_ms']:.0f} ms" for name in tasks)
    return system_bench.footer(report, [
        f"clip: {report.details['clip']}; prompt tokens: {prompts}; every row decodes the same "
        f"{report.options.tokens} tokens of a fixed answer per task, teacher-forced",
        "s4 = one frame + its 2-s audio unit, then SAM2 on the answer's fixed box and 3 points; ave = 10 frames + "
        "10 s of audio; audio = log-mel + audio tower; visual = ViT + merger; tok/s = forced decode steps per "
        f"second; e2e = one task, decoded clip to answer (and mask); media decode ({decoding}, once) excluded",
        f"mask IoU: SAM2 masks against torch fp32's on {report.options.eval_n} generated frames, same prompts "
        "(random weights: how far a precision moves the masks); whole-run e2e, p95s, row notes: --json",
    ])


__all__ = ["BenchReport", "CrabPlusBenchOptions", "Row", "footer", "forced_tokens", "make_options", "mask_answer",
           "run_bench", "run_forced", "tables", "write_plot"]
